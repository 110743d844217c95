"""The model bundle: diffusers components of one preset, saved and loaded as a diffusers pipeline folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from .models.causal_wan import CausalWanTransformer3DModel, TextKV
from .models.text import PromptEncoder
from .models.vae import AutoencoderPixelShuffle, WanLatentCodec, latent_codec


class FashionChameleonPipeline(DiffusionPipeline):
    """Tokenizer, UMT5, causal Wan transformer, Wan VAE (or the `mini` pixel-shuffle codec) and the flow-matching
    scheduler.

    It holds no stream state: the chunk loop lives in `fashionchameleon.engine`, which many streams share
    one pipeline through. `save_pretrained`/`from_pretrained` give a standard diffusers folder.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: UMT5EncoderModel,
        transformer: CausalWanTransformer3DModel,
        vae: AutoencoderKLWan | AutoencoderPixelShuffle,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
        )

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """A standard diffusers folder. `model_index.json` names the transformer as diffusers'
        `WanTransformer3DModel` (its weights are exactly that), so stock diffusers tools can read the folder;
        `from_pretrained` below puts the causal class back."""
        super().save_pretrained(save_directory, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["transformer"] = ["diffusers", "WanTransformer3DModel"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "FashionChameleonPipeline":
        """Standard diffusers loading, with the transformer loaded as the causal subclass (same weights), so a
        stock Wan2.2 diffusers folder loads too."""
        if "transformer" not in kwargs:
            kwargs["transformer"] = CausalWanTransformer3DModel.from_pretrained(
                pretrained_model_name_or_path, subfolder="transformer", torch_dtype=kwargs.get("torch_dtype")
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def codec(self) -> WanLatentCodec:
        return latent_codec(self.vae)

    def encode_text_kv(self, prompt: str, max_length: int) -> TextKV:
        """UMT5 embeddings of `prompt` turned into every layer's cross-attention K/V (once per stream)."""
        encoder = PromptEncoder(self.tokenizer, self.text_encoder, max_length=max_length)
        embeds = encoder.encode(prompt, device=self.transformer.device, dtype=self.transformer.dtype)
        return self.transformer.precompute_text_kv(embeds)

    def student_sigmas(self, denoising_steps: tuple[int, ...]) -> torch.Tensor:
        """Warped noise levels of the few-step student: [1000, 750, 500, 250] -> sigma [1, .9375, .8333, .625].

        The scheduler's own shift does the warping (sigma' = s*sigma / (1 + (s-1)*sigma)).
        """
        self.scheduler.set_timesteps(sigmas=[step / self.scheduler.config.num_train_timesteps for step in denoising_steps])
        return self.scheduler.sigmas[:-1].clone()
