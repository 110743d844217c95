"""The causal subclass is the stock Wan transformer, and cached chunking is the masked full forward."""

import torch
from diffusers import WanTransformer3DModel

from fashionchameleon.models.causal_wan import CausalWanTransformer3DModel, block_causal_mask, embedding_timesteps
from fashionchameleon.models.kv_cache import KVSlot, WindowPolicy
from helpers import TINY_TRANSFORMER

H, W = 4, 6  # latents -> 2 x 3 = 6 tokens per frame
TEXT = 7


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def inputs(frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 48, frames, H, W, generator=g)
    text = torch.randn(1, TEXT, TINY_TRANSFORMER["text_dim"], generator=g)
    return x, text


def test_subclass_equals_stock_transformer(tiny_transformer, tmp_path):
    """With the stock input rule the subclass is the stock model for any t; with the authors' rule (the default) it
    is the stock model fed bf16-rounded timesteps."""
    tiny_transformer.save_pretrained(tmp_path / "causal")
    stock = WanTransformer3DModel.from_pretrained(tmp_path / "causal").eval()
    reloaded = CausalWanTransformer3DModel.from_pretrained(tmp_path / "causal").eval()
    exact = CausalWanTransformer3DModel.from_pretrained(tmp_path / "causal", round_timesteps=False).eval()
    x, text = inputs(5)
    frame_t = torch.tensor([[0.0, 0.0, 937.0, 937.0, 500.0]])
    token_t = frame_t.repeat_interleave(H * W // 4, dim=1)
    with torch.no_grad():
        for t in (frame_t, token_t):
            assert err(exact(x, t, text).sample, stock(x, token_t, text).sample) < 1e-5
        expected = stock(x, embedding_timesteps(token_t), text).sample
        assert err(expected, stock(x, token_t, text).sample) > 1e-4  # negative control: the rounding is visible
        for model in (tiny_transformer, reloaded):
            for t in (frame_t, token_t):
                assert err(model(x, t, text).sample, expected) < 1e-5
        # The cached text K/V path gives the same numbers as projecting the prompt each call.
        text_kv = tiny_transformer.precompute_text_kv(text)
        assert err(tiny_transformer(x, frame_t, text_kv).sample, expected) < 1e-5
        # RoPE is relative: shifting every frame changes nothing, moving one frame does (negative control).
        assert err(tiny_transformer(x, frame_t, text, frame_positions=range(7, 12)).sample, expected) < 1e-5
        moved = tiny_transformer(x, frame_t, text, frame_positions=[0, 1, 2, 3, 5]).sample
        assert err(moved, expected) > 1e-3


def chunked_vs_masked(model, chunks, policy, recent_chunks, read_cache=True):
    x, text = inputs(2 + sum(chunks), seed=3)
    g = torch.Generator().manual_seed(4)
    frame_t = torch.zeros(1, x.shape[2])
    ids = [0, 0]
    start = 2
    for c, n in enumerate(chunks):
        frame_t[:, start : start + n] = torch.randint(0, 1000, (1,), generator=g).float()
        ids += [c + 1] * n
        start += n
    tokens = H * W // 4
    with torch.no_grad():
        mask = block_causal_mask(ids, tokens, recent_chunks=recent_chunks)
        full = model(x, frame_t, text, attention_mask=mask).sample
        cache = model.new_kv_cache(1, H, W, policy=policy)
        outs = [model(x[:, :, :2], frame_t[:, :2], text, kv_cache=cache, cache_write=[KVSlot.REFERENCE, KVSlot.GARMENT],
                      cache_read=()).sample]
        start = 2
        for n in chunks:
            pos = list(range(start, start + n))
            cache.make_room(n)
            slot = KVSlot.SINK if cache.free(KVSlot.SINK) >= n else KVSlot.HISTORY
            outs.append(model(x[:, :, start : start + n], frame_t[:, start : start + n], text, frame_positions=pos,
                              kv_cache=cache, cache_write=slot, cache_read=None if read_cache else ()).sample)
            start += n
    return full, torch.cat(outs, dim=2)


def test_chunked_cache_equals_masked_full_forward(tiny_transformer):
    policy = WindowPolicy(sink_frames=3, history_frames=60)
    full, chunked = chunked_vs_masked(tiny_transformer, [1, 3, 2, 3], policy, None)
    assert err(full, chunked) < 1e-5
    # Negative control: the same chunks without reading the cache.
    _, uncached = chunked_vs_masked(tiny_transformer, [1, 3, 2, 3], policy, None, read_cache=False)
    assert err(full, uncached) > 1e-2


def test_window_eviction_equals_windowed_mask(tiny_transformer):
    # Window 2 + 3 + 6: a chunk sees the sink and the one chunk before it (6 - 3 = 3 history frames).
    policy = WindowPolicy(sink_frames=3, history_frames=6)
    full, chunked = chunked_vs_masked(tiny_transformer, [3] * 6, policy, recent_chunks=1)
    assert err(full, chunked) < 1e-5
    unwindowed, _ = chunked_vs_masked(tiny_transformer, [3] * 6, policy, recent_chunks=None)
    assert err(unwindowed, chunked) > 1e-3
