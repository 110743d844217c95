"""`FashionChameleonPipeline`: the diffusers components of one model, its stream settings, and a `__call__` that
streams a try-on video (with garment switches) through the engine.

    pipe = FashionChameleonPipeline.from_pretrained("path/to/pipeline")
    video = pipe(reference, garment, num_chunks=8, switches={4: other_garment}).frames  # uint8 [F, H, W, 3]

For interactive use (switch while it plays, stop) open a stream with `engine.StreamingEngine(pipe).start(...)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from PIL import Image
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from . import media
from .engine import DEFAULT_CHUNKS, StreamingEngine, SwitchMode
from .models.causal_wan import CausalWanTransformer3DModel, TextKV
from .models.text import PromptEncoder
from .models.vae import AutoencoderPixelShuffle, WanLatentCodec, latent_codec
from .rollout import StreamConfig


@dataclass
class FashionChameleonPipelineOutput(BaseOutput):
    frames: np.ndarray  # uint8 [F, H, W, 3]
    garment_versions: np.ndarray  # int [F]: how many switches had landed when each frame was made


class FashionChameleonPipeline(DiffusionPipeline):
    """Tokenizer, UMT5, causal Wan transformer, Wan VAE (or the `mini` pixel-shuffle codec), the flow-matching
    scheduler, and `stream` (a `StreamConfig` as a dict: frame size, chunking, steps, cache window, fps).

    It holds no stream state, so many streams share one pipeline. `save_pretrained`/`from_pretrained` give a
    standard diffusers folder whose `model_index.json` also records the stream settings.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: UMT5EncoderModel,
        transformer: CausalWanTransformer3DModel,
        vae: AutoencoderKLWan | AutoencoderPixelShuffle,
        scheduler: FlowMatchEulerDiscreteScheduler,
        stream: dict | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
        )
        self.register_to_config(stream=stream)
        self._codec: WanLatentCodec | None = None

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
            dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")  # diffusers takes both; only `dtype` from 1.0
            kwargs["transformer"] = CausalWanTransformer3DModel.from_pretrained(
                pretrained_model_name_or_path, subfolder="transformer", dtype=dtype
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # -- settings and adapters --------------------------------------------------------------------------------
    @property
    def stream(self) -> StreamConfig:
        if self.config.stream is None:
            raise ValueError("this pipeline has no stream settings: load it with presets.load_preset, or register "
                             "them with pipe.register_to_config(stream=StreamConfig(...).to_dict())")
        return StreamConfig.from_dict(self.config.stream)

    @property
    def codec(self) -> WanLatentCodec:
        """The latent codec adapter of the `vae` component (built once per VAE)."""
        if self._codec is None or self._codec.vae is not self.vae:
            self._codec = latent_codec(self.vae)
        return self._codec

    def student_sigmas(self, denoising_steps: tuple[int, ...]) -> torch.Tensor:
        """Warped noise levels of the few-step student: [1000, 750, 500, 250] -> sigma [1, .9375, .8333, .625].

        The scheduler's own shift does the warping (sigma' = s*sigma / (1 + (s-1)*sigma)).
        """
        steps = self.scheduler.config.num_train_timesteps
        self.scheduler.set_timesteps(sigmas=[step / steps for step in denoising_steps])
        return self.scheduler.sigmas[:-1].clone()

    # -- inputs -------------------------------------------------------------------------------------------------
    def encode_text_kv(self, prompt: str, max_length: int,
                       transformer: CausalWanTransformer3DModel | None = None) -> TextKV:
        """UMT5 embeddings of `prompt` turned into every layer's cross-attention K/V (once per stream), by
        `transformer`'s own projections: the pipeline's, or another model's (a teacher) that will attend to them."""
        transformer = transformer or self.transformer
        encoder = PromptEncoder(self.tokenizer, self.text_encoder, max_length=max_length)
        embeds = encoder.encode(prompt, device=transformer.device, dtype=transformer.dtype)
        return transformer.precompute_text_kv(embeds)

    def encode_reference(self, image: Image.Image, stream: StreamConfig | None = None) -> torch.Tensor:
        """Reference photo: cover + centre crop to the stream size, one latent frame [1, C, 1, h, w]."""
        stream = stream or self.stream
        return self.encode_pixels(media.image_to_tensor(media.fit_reference(image, stream.width, stream.height)))

    def encode_garment(self, image: Image.Image, stream: StreamConfig | None = None) -> torch.Tensor:
        """Garment photo: letterboxed on white to the stream size, one latent frame [1, C, 1, h, w]."""
        stream = stream or self.stream
        return self.encode_pixels(media.image_to_tensor(media.letterbox_garment(image, stream.width, stream.height)))

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[3, H, W] in [-1, 1] at the stream size -> one normalized latent frame [1, C, 1, h, w]."""
        latent = self.codec.encode_image(pixels[None].to(self.transformer.device))
        return latent.to(self.transformer.dtype)

    # -- a whole video -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        reference: Image.Image | str,
        garment: Image.Image | str,
        prompt: str = "",
        num_chunks: int = DEFAULT_CHUNKS,
        switches: dict[int, Image.Image | str] | None = None,
        seed: int = 0,
        switch_mode: SwitchMode | str = SwitchMode.FULL,
        return_dict: bool = True,
    ) -> FashionChameleonPipelineOutput | tuple[np.ndarray, np.ndarray]:
        """Stream `num_chunks` chunks of the person in `reference` wearing `garment`, switching to `switches[k]` before
        chunk k (k >= 1) with `switch_mode`, and return every frame. Garment words are removed from `prompt`."""
        # 1. check the inputs
        switches = switches or {}
        if num_chunks < 1 or any(not 1 <= k < num_chunks for k in switches):
            raise ValueError(f"num_chunks must be >= 1 and switch chunks in 1 .. {num_chunks - 1}, "
                             f"got {num_chunks} and {sorted(switches)}")
        # 2. stream, switching where asked
        engine = StreamingEngine(self, switch_mode=switch_mode)
        stream = engine.start(reference, garment, prompt, seed, num_chunks)
        chunks = list(stream.play(switches))
        # 3. collect the frames
        frames = np.concatenate([chunk.frames for chunk in chunks])
        versions = np.concatenate([np.full(len(chunk.frames), chunk.garment_version) for chunk in chunks])
        if not return_dict:
            return frames, versions
        return FashionChameleonPipelineOutput(frames=frames, garment_versions=versions)
