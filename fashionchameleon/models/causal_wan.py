"""Block-causal Wan2.2 transformer: diffusers' `WanTransformer3DModel` with a KV cache, frame positions and masks.

Parameters and their names are the stock ones, so Wan2.2-TI2V-5B diffusers weights load unchanged. The stock
blocks are reused as they are: a block hands its `rotary_emb` argument to the self-attention processor
untouched, so we pass a `CausalAttentionContext` (RoPE for explicit frame positions + the cache plan + an
optional mask) through that slot, and swap in processors that understand it. Cross-attention processors accept
precomputed text K/V (`TextKV`), computed once per stream.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanAttention, _get_qkv_projections
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .kv_cache import KVCache, KVPlan, KVSlot, WindowPolicy


@dataclass
class CausalAttentionContext:
    """Travels through the stock block's `rotary_emb` argument to `CausalWanAttnProcessor`."""

    freqs_cos: torch.Tensor  # [1, L, 1, head_dim]
    freqs_sin: torch.Tensor
    kv_plan: KVPlan | None = None
    attention_mask: torch.Tensor | None = None  # [L, L] bool, True = may attend (full-sequence training only)


@dataclass
class TextKV:
    """Cross-attention keys/values of one prompt for every layer ([B, text_len, H, D] each)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def embedding_timesteps(t: torch.Tensor) -> torch.Tensor:
    """Timesteps as the authors' time embedding saw them: rounded through bf16, then truncated to an integer
    (1000, 937.5, 833.3, 625 -> 1000, 936, 832, 624; docs/method.md §1)."""
    return t.to(torch.bfloat16).long().float()


def apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs; the same arithmetic as the closure inside diffusers 0.42 `WanAttnProcessor`."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention [B, L, H, D] under a `BlockMask`, compiled. diffusers' flex backend calls `flex_attention`
    eagerly, which materialises the whole score matrix (over 100 GB per layer at the 5B's 40,480 training
    tokens); compiled, it is the fused block-sparse kernel. Training only (the Space never builds a BlockMask)."""
    out = _compiled_flex_attention()(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                     block_mask=block_mask)
    return out.transpose(1, 2)


class _LayerAttnProcessor:
    """A processor bound to one layer (caches are per layer); diffusers sets `_attention_backend` on it."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int) -> None:
        self.layer = layer

    def _attend(self, attn: WanAttention, query, key, value, mask: torch.Tensor | BlockMask | None = None):
        if isinstance(mask, BlockMask):
            hidden_states = block_sparse_attention(query, key, value, mask)
        else:
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=mask, backend=self._attention_backend)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class CausalWanAttnProcessor(_LayerAttnProcessor):
    """Self-attention over [cached K/V ; this call's K/V], or under a mask for full-sequence training."""

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: CausalAttentionContext | None = None,
    ) -> torch.Tensor:
        ctx = rotary_emb
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, L, H, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query = apply_rotary_emb(query, ctx.freqs_cos, ctx.freqs_sin)
        key = apply_rotary_emb(key, ctx.freqs_cos, ctx.freqs_sin)
        if ctx.kv_plan is not None:
            key, value = ctx.kv_plan.extend(self.layer, key, value)
        return self._attend(attn, query, key, value, ctx.attention_mask)


class CachedTextAttnProcessor(_LayerAttnProcessor):
    """Cross-attention to the prompt; with `TextKV` it skips re-projecting the same 512 tokens every pass."""

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | TextKV | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
    ) -> torch.Tensor:
        if isinstance(encoder_hidden_states, TextKV):
            key, value = encoder_hidden_states.keys[self.layer], encoder_hidden_states.values[self.layer]
        else:
            key, value = text_kv_projections(attn, encoder_hidden_states)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        return self._attend(attn, query, key, value)


def text_kv_projections(attn: WanAttention, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected, normed, head-split text keys and values of one cross-attention layer."""
    if attn.fused_projections:
        key, value = attn.to_kv(text).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(text), attn.to_v(text)
    return attn.norm_k(key).unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))


class CausalWanTransformer3DModel(WanTransformer3DModel):
    """Wan2.2 transformer for block-causal streaming; same weights and config keys as the stock model.

    Extra forward inputs: `frame_positions` (RoPE temporal index of each latent frame), `kv_cache` with
    `cache_write`/`cache_read` (which slots this call stores to and attends to), `attention_mask` for a
    full-sequence forward (teacher forcing, equivalence tests); `encoder_hidden_states` may be a precomputed `TextKV`.
    `timestep` may be per sample [B], per frame [B, F] or per token [B, F*tokens_per_frame], always the exact
    flow-matching t = sigma * num_train_timesteps: the model applies its own input rules to it.

    Input rules (docs/method.md §1-§2): with `round_timesteps` (the authors' models, hence the default) the time
    embedding sees t rounded through bf16 and truncated to an integer (937.5 -> 936), while the noise level stays
    exact. The in-context layout puts the conditioning latents (reference, garment) in front of the video at t = 0
    and RoPE positions 0, 1 (`in_context_velocity`).

    `prediction_type="sample"` (our `mini` preset; Wan2.2 is "flow") lets the network predict the clean latent x0
    and returns the velocity (x_t - x0) / max(sigma, sample_sigma_min), sigma = t / num_train_timesteps: the noise
    reaches the output through that skip instead of through a narrow network (EDM-style preconditioning). Callers
    still see a velocity, so the engine and the losses are the same for both.
    """

    _skip_keys = ["kv_cache"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 24,
        attention_head_dim: int = 128,
        in_channels: int = 48,
        out_channels: int = 48,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 14336,
        num_layers: int = 30,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        prediction_type: str = "flow",
        sample_sigma_min: float = 0.05,
        num_train_timesteps: int = 1000,
        round_timesteps: bool = True,
    ) -> None:
        if prediction_type not in ("flow", "sample"):
            raise ValueError(f"prediction_type must be 'flow' or 'sample', got {prediction_type!r}")
        if image_dim is not None or added_kv_proj_dim is not None:
            raise ValueError("the causal Wan supports the TI2V layout only (no CLIP image branch)")
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        for layer, block in enumerate(self.blocks):
            block.attn1.set_processor(CausalWanAttnProcessor(layer))
            block.attn2.set_processor(CachedTextAttnProcessor(layer))

    # -- sizes derived from the config ------------------------------------------------------------------
    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens of one latent frame of `height` x `width` latents."""
        _, p_h, p_w = self.config.patch_size
        return (height // p_h) * (width // p_w)

    def new_kv_cache(
        self,
        batch_size: int,
        latent_height: int,
        latent_width: int,
        policy: WindowPolicy = WindowPolicy(),
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        return KVCache(
            num_layers=self.config.num_layers,
            batch_size=batch_size,
            frame_tokens=self.tokens_per_frame(latent_height, latent_width),
            num_heads=self.config.num_attention_heads,
            head_dim=self.config.attention_head_dim,
            policy=policy,
            dtype=dtype or self.dtype,
            device=device or self.device,
        )

    @torch.no_grad()
    def precompute_text_kv(self, encoder_hidden_states: torch.Tensor) -> TextKV:
        """Text K/V for every layer, once per prompt (the prompt does not change while a stream runs)."""
        text = self.condition_embedder.text_embedder(encoder_hidden_states)
        kv = [text_kv_projections(block.attn2, text) for block in self.blocks]
        return TextKV([k for k, _ in kv], [v for _, v in kv])

    # -- pieces of the forward --------------------------------------------------------------------------
    def rope_at(self, frame_positions: Sequence[int] | torch.Tensor, height: int, width: int, device) -> tuple:
        """RoPE cos/sin [1, F*h*w, 1, D] for latent frames at explicit temporal positions (stock RoPE tables).

        A `range` of positions (every streaming call) slices the table, which is already on the device: no
        host-to-device copy, so the chunk loop never waits on the host. Other sequences are indexed.
        """
        rope = self.rope
        ppf = len(frame_positions)
        if ppf and int(max(frame_positions)) >= rope.max_seq_len:
            raise ValueError(f"RoPE frame position {int(max(frame_positions))} exceeds the table ({rope.max_seq_len})")
        if isinstance(frame_positions, range) and frame_positions.step == 1:
            positions = slice(frame_positions.start, frame_positions.stop)
        else:
            positions = torch.as_tensor(frame_positions, device=device, dtype=torch.long)
        _, p_h, p_w = self.config.patch_size
        pph, ppw = height // p_h, width // p_w
        split = [rope.t_dim, rope.h_dim, rope.w_dim]
        out = []
        for table in (rope.freqs_cos, rope.freqs_sin):
            t_tab, h_tab, w_tab = table.split(split, dim=1)
            parts = [
                t_tab[positions].view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1),
                h_tab[:pph].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1),
                w_tab[:ppw].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1),
            ]
            out.append(torch.cat(parts, dim=-1).reshape(1, ppf * pph * ppw, 1, -1))
        return tuple(out)

    def embed_timesteps(self, timestep: torch.Tensor, num_frames: int, frame_tokens: int, dtype: torch.dtype):
        """adaLN inputs from exact [B], [B, F] or [B, L] timesteps, rounded first when `round_timesteps`.

        One timestep per sample ([B]: every streaming pass) gives temb [B, C] and timestep_proj [B, 6, C], which the
        stock blocks broadcast over the tokens (their Wan2.1 layout): no per-token copy, ~15 GB less memory traffic
        per forward at 5B. Per-frame timesteps are embedded per frame and repeated over the frame's tokens
        (temb [B, L, C], timestep_proj [B, L, 6, C]). Either way the values equal the stock per-token path's.
        """
        batch = timestep.shape[0]
        per_sample = timestep.ndim == 1
        if per_sample:  # embedded as F equal rows, then one kept: the matmuls see the shapes of the per-frame path
            timestep = timestep[:, None].expand(batch, num_frames)
        elif timestep.shape[1] not in (num_frames, num_frames * frame_tokens):
            raise ValueError(f"timestep has {timestep.shape[1]} entries per sample; expected 1, {num_frames} or "
                             f"{num_frames * frame_tokens}")
        if self.config.round_timesteps:
            timestep = embedding_timesteps(timestep)
        embedder = self.condition_embedder
        emb = embedder.timesteps_proj(timestep.flatten()).unflatten(0, timestep.shape)
        time_dtype = next(iter(embedder.time_embedder.parameters())).dtype
        if emb.dtype != time_dtype and time_dtype != torch.int8:
            emb = emb.to(time_dtype)
        temb = embedder.time_embedder(emb).to(dtype)
        proj = embedder.time_proj(embedder.act_fn(temb)).unflatten(2, (6, -1))
        if per_sample:
            return temb[:, 0], proj[:, 0]
        if timestep.shape[1] == num_frames:
            temb = temb.repeat_interleave(frame_tokens, dim=1)
            proj = proj.repeat_interleave(frame_tokens, dim=1)
        return temb, proj

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | TextKV | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        *,
        frame_positions: Sequence[int] | torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_write: KVSlot | Sequence[KVSlot] | None = None,
        cache_read: Iterable[KVSlot] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Denoiser output (flow velocity) for latents [B, C, F, H, W]; shapes as in the stock forward.
        `encoder_hidden_states` are UMT5 embeddings [B, L, text_dim] or a prompt's precomputed `TextKV`."""
        if encoder_hidden_states_image is not None:
            raise ValueError("the causal Wan takes no CLIP image embeddings")
        batch, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        ppf, pph, ppw = num_frames // p_t, height // p_h, width // p_w
        frame_tokens = pph * ppw
        positions = range(ppf) if frame_positions is None else frame_positions

        freqs_cos, freqs_sin = self.rope_at(positions, height, width, hidden_states.device)
        plan = None
        if kv_cache is not None:
            plan = kv_cache.plan([int(p) for p in positions], write=cache_write, read=cache_read)
        context = CausalAttentionContext(freqs_cos, freqs_sin, plan, attention_mask)

        inputs = hidden_states
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # [B, L, C]
        temb, timestep_proj = self.embed_timesteps(timestep, ppf, frame_tokens, hidden_states.dtype)
        if encoder_hidden_states is None:
            raise ValueError("pass encoder_hidden_states: text embeddings or a TextKV")
        text = encoder_hidden_states
        if not isinstance(text, TextKV):
            text = self.condition_embedder.text_embedder(text)

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, text, timestep_proj, context)
            else:
                hidden_states = block(hidden_states, text, timestep_proj, context)

        # Output norm, projection and unpatchify: the stock TI2V (per-token) path.
        if temb.ndim == 2:  # one timestep per sample: [B, 1, C], broadcast over the tokens
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        else:
            shift, scale = (part.squeeze(2) for part in
                            (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2))
        normed = self.norm_out(hidden_states.float()) * (1 + scale) + shift
        hidden_states = self.proj_out(normed.type_as(hidden_states))
        hidden_states = hidden_states.reshape(batch, ppf, pph, ppw, p_t, p_h, p_w, -1)
        output = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if self.config.prediction_type == "sample":
            output = self.velocity_from_sample(inputs, output, timestep, frame_tokens)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


    def velocity_from_sample(self, noisy: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor,
                             frame_tokens: int) -> torch.Tensor:
        """(x_t - x0) / max(sigma, sample_sigma_min) per frame, from [B], [B, F] or per-token timesteps."""
        batch, frames = noisy.shape[0], noisy.shape[2]
        t = timestep.float().reshape(batch, -1)
        t = t.expand(batch, frames) if t.shape[1] == 1 else t[:, ::frame_tokens] if t.shape[1] != frames else t
        sigma = (t / self.config.num_train_timesteps).clamp_min(self.config.sample_sigma_min)
        velocity = (noisy.float() - sample.float()) / sigma[:, None, :, None, None]
        return velocity.to(sample.dtype)


def in_context_velocity(model, condition: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor,
                        text: torch.Tensor | TextKV) -> torch.Tensor:
    """One bidirectional in-context forward (the teacher's layout, docs/method.md §2.1): [condition ; noisy video].

    `model` is the transformer or a wrapper that calls it (accelerate, DDP, FSDP). `condition` [B, C, n, h, w] are
    the reference and garment latents (t = 0, RoPE 0 .. n-1), `noisy` [B, C, F, h, w] the video at exact `t` [B]
    or [B, F], `text` UMT5 embeddings [B, L, D] or a prompt's precomputed `TextKV`.
    Returns the velocity of the video frames [B, C, F, h, w]; the conditioning frames' outputs are dropped.
    """
    batch, frames, condition_frames = noisy.shape[0], noisy.shape[2], condition.shape[2]
    t = t[:, None].expand(batch, frames) if t.ndim == 1 else t
    frame_t = torch.cat([t.new_zeros(batch, condition_frames), t], dim=1)
    inputs = torch.cat([condition, noisy.to(condition.dtype)], dim=2)
    return model(inputs, frame_t, text).sample[:, :, condition_frames:]


def block_causal_mask(
    chunk_ids: Sequence[int] | torch.Tensor,
    frame_tokens: int,
    *,
    recent_chunks: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[L, L] bool mask of the streaming student, for one full-sequence forward.

    `chunk_ids` has one id per latent frame: 0 for the conditioning frames (they see each other), 1 for the
    first chunk (the attention sink), 2, 3, ... after. A frame attends to frames of its own and earlier chunks
    (bidirectional inside a chunk). With `recent_chunks`, a chunk sees only the conditioning frames, the sink
    and the `recent_chunks` chunks before it: the cache window.
    """
    ids = torch.as_tensor(chunk_ids, device=device).repeat_interleave(frame_tokens)
    query, key = ids[:, None], ids[None, :]
    mask = query >= key
    if recent_chunks is not None:
        mask &= (key <= 1) | (query - key <= recent_chunks)
    return mask


def teacher_forcing_mask(
    chunk_ids: Sequence[int] | torch.Tensor,
    frame_tokens: int,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[2L, 2L] bool mask of in-context teacher forcing (docs/method.md §3.2), True = may attend.

    The sequence is [clean half ; noisy half], both holding the same frames. `chunk_ids` has one id per latent
    frame of one half, as in `block_causal_mask`: 0 for the conditioning frames, 1, 2, ... for the video chunks.
    Clean frames attend block-causally among clean frames; noisy conditioning frames only to each other (their
    outputs are discarded); a noisy chunk attends to itself and to the clean conditioning frames and earlier chunks.
    """
    allowed = _teacher_forcing_rule(torch.as_tensor(chunk_ids, device=device).repeat_interleave(frame_tokens))
    index = torch.arange(2 * len(chunk_ids) * frame_tokens, device=device)
    return allowed(index[:, None], index[None, :])


def teacher_forcing_block_mask(
    chunk_ids: Sequence[int] | torch.Tensor,
    frame_tokens: int,
    *,
    device: torch.device | str | None = None,
):
    """The same rule as `teacher_forcing_mask` as a FlexAttention `BlockMask` (sparse; for the `flex` backend)."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device("cpu") if device is None else torch.device(device)
    allowed = _teacher_forcing_rule(torch.as_tensor(chunk_ids, device=device).repeat_interleave(frame_tokens))
    length = 2 * len(chunk_ids) * frame_tokens
    return create_block_mask(lambda b, h, q, k: allowed(q, k), None, None, length, length, device=device)


def _teacher_forcing_rule(ids: torch.Tensor):
    """(query index, key index) -> may attend, for [clean ; noisy] halves whose tokens carry chunk `ids` [L]."""
    half = ids.numel()

    def allowed(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        query_noisy, key_noisy = query >= half, key >= half
        query_id, key_id = ids[query % half], ids[key % half]
        clean_to_clean = ~query_noisy & ~key_noisy & (query_id >= key_id)
        noisy_to_clean = query_noisy & ~key_noisy & (query_id > key_id)
        noisy_to_itself = query_noisy & key_noisy & (query_id == key_id)
        return clean_to_clean | noisy_to_clean | noisy_to_itself

    return allowed
