"""The streaming engine: chunk contract, cached == recompute, slot contents, and garment switching."""

import gc
import os
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from fashionchameleon import media
from fashionchameleon.bench import RecomputeEngine
from fashionchameleon.engine import Chunk, Stream, StreamingEngine, SwitchMode
from fashionchameleon.models.kv_cache import KVSlot
from fashionchameleon.presets import load_preset
from helpers import GARMENTS, REFERENCE


@pytest.fixture(scope="module")
def pipe():
    return load_preset("tiny", device="cpu")[1]


@pytest.fixture(scope="module")
def stream_config(pipe):
    return pipe.stream


@pytest.fixture(scope="module")
def small_config(pipe):
    """A 32x32 stream (one token per latent frame) for the long-stream tests: same code, less decode work."""
    return replace(pipe.stream, height=32, width=32)


def positions(stream: Stream) -> dict[str, list[int]]:
    return {slot.value: stream.rollout.cache.positions(slot) for slot in KVSlot}


def garment_latent(pipe, path, config):
    return pipe.encode_garment(media.load_image(path), config)


def test_student_schedule_is_the_papers(pipe):
    """docs/method.md §3.5: steps [1000, 750, 500, 250] warped by shift 5; the time embedding sees 1000, 936, 832,
    624 (bf16, then an integer), the noise level the exact sigma."""
    from fashionchameleon.models.causal_wan import embedding_timesteps

    sigmas = pipe.student_sigmas(pipe.stream.denoising_steps)
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.9375, 5 / 6, 0.625]))
    timesteps = sigmas * pipe.transformer.config.num_train_timesteps
    assert embedding_timesteps(timesteps).tolist() == [1000.0, 936.0, 832.0, 624.0]


def test_chunks_frame_counts_and_determinism(pipe, stream_config):
    engine = StreamingEngine(pipe, stream_config)
    chunks = list(engine.start(REFERENCE, GARMENTS[0], "a person walks", seed=3, chunks=3))
    assert [len(c.frames) for c in chunks] == [9, 12, 12]
    assert [c.first_frame for c in chunks] == [0, 9, 21]
    assert [c.index for c in chunks] == [0, 1, 2]
    assert {c.garment_version for c in chunks} == {0}
    assert chunks[0].frames.dtype == np.uint8 and chunks[0].frames.shape[1:] == (96, 64, 3)
    assert [c.num_frames for c in chunks] == [9, 12, 12]
    again = list(engine.start(REFERENCE, GARMENTS[0], "a person walks", seed=3, chunks=3))
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(chunks, again))
    other = list(engine.start(REFERENCE, GARMENTS[0], "a person walks", seed=4, chunks=1))
    assert not np.array_equal(chunks[0].frames, other[0].frames)


def stream_latents(engine, forget: bool = False) -> torch.Tensor:
    """Six chunks of latents with a switch before chunk 4 (refresh+withdraw: no pixels involved); `forget` drops
    the history after every chunk."""
    stream = engine.start(REFERENCE, GARMENTS[0], seed=1, chunks=6)
    latents = []
    for index in range(6):
        if index == 4:
            stream.switch_garment(media.load_image(GARMENTS[1]))
        latents.append(stream.rollout.next_latents())
        if forget:
            stream.rollout.cache.clear([KVSlot.SINK, KVSlot.HISTORY])
    return torch.cat(latents, dim=2)


def test_cached_stream_equals_recompute_stream(pipe, stream_config):
    """The KV cache changes the cost, not the result: the same stream with every pass re-running the whole
    visible context under the block-causal mask gives the same latents, across a switch (before the window
    evicts; after that the cache holds K/V computed with frames recompute no longer sees)."""
    config = replace(stream_config, history_frames=30)
    cached = stream_latents(StreamingEngine(pipe, config, switch_mode=SwitchMode.REFRESH_WITHDRAW))
    recomputed = stream_latents(RecomputeEngine(pipe, config, switch_mode=SwitchMode.REFRESH_WITHDRAW))
    assert float((cached - recomputed).abs().max()) < 1e-4
    # Negative control: a stream that loses its history every chunk is a different video.
    forgetful = stream_latents(StreamingEngine(pipe, config, switch_mode=SwitchMode.REFRESH_WITHDRAW), forget=True)
    assert float((forgetful - cached).abs().max()) > 1e-2


def test_cache_slots_fill_then_slide(pipe, stream_config):
    stream = StreamingEngine(pipe, stream_config).start(REFERENCE, GARMENTS[0], chunks=9)
    assert positions(stream) == {"reference": [0], "garment": [1], "sink": [], "history": []}
    next(stream)
    assert positions(stream) == {"reference": [0], "garment": [1], "sink": [2, 3, 4], "history": []}
    for _ in range(6):
        next(stream)
    # 7 chunks = 21 frames: the window (1 + 1 + 3 + 18 = 23) is exactly full, nothing evicted yet.
    assert positions(stream)["history"] == list(range(5, 23))
    next(stream)
    next(stream)
    # Two more chunks: FIFO on history only; the sink and the conditioning frames stay.
    assert positions(stream) == {"reference": [0], "garment": [1], "sink": [2, 3, 4], "history": list(range(11, 29))}
    assert stream.rollout.cache.num_frames() == stream_config.window.window


@pytest.mark.parametrize("mode", list(SwitchMode))
def test_switch_modes_leave_the_cache_as_specified(pipe, stream_config, mode):
    """docs/method.md §7.3: refresh keeps sink/history and positions; withdraw drops them and restarts at RoPE 2;
    full also takes the last shown frame, VAE-encoded as an image, as the new reference."""
    engine = StreamingEngine(pipe, stream_config, switch_mode=mode)
    stream = engine.start(REFERENCE, GARMENTS[0], chunks=5)
    rollout, cache = stream.rollout, stream.rollout.cache
    for _ in range(3):
        next(stream)
    before = positions(stream)
    old_reference = rollout.reference_latent.clone()
    old_garment_key = cache.keys[0][:, cache.frame_tokens : 2 * cache.frame_tokens].clone()
    stream.switch_garment(media.load_image(GARMENTS[1]))
    after = positions(stream)
    assert after["reference"] == [0] and after["garment"] == [1]
    new_garment_key = cache.keys[0][:, cache.frame_tokens : 2 * cache.frame_tokens]
    assert float((new_garment_key - old_garment_key).abs().max()) > 1e-3  # garment KV refreshed
    assert stream.garment_version == 1
    if mode is SwitchMode.REFRESH:
        assert after == before and rollout.next_position == 11
    else:
        assert after["sink"] == [] and after["history"] == [] and rollout.next_position == 2
    if mode is SwitchMode.FULL:
        expected = pipe.encode_pixels(media.image_to_tensor(media.frame_to_image(stream.last_frame.cpu().numpy())))
        assert torch.equal(rollout.reference_latent, expected)
        assert float((rollout.reference_latent - old_reference).abs().max()) > 1e-3
    else:
        assert torch.equal(rollout.reference_latent, old_reference)
    chunk = next(stream)
    assert chunk.garment_version == 1
    if mode is not SwitchMode.REFRESH:
        assert positions(stream)["sink"] == [2, 3, 4]  # the first chunk after a withdraw is the new sink


def test_the_last_frame_stays_on_the_device_and_is_the_last_one_shown(pipe, stream_config):
    stream = StreamingEngine(pipe, stream_config).start(REFERENCE, GARMENTS[0], chunks=2)
    chunks = list(stream)
    assert stream.last_frame.dtype == torch.uint8 and stream.last_frame.device == pipe.transformer.device
    assert np.array_equal(stream.last_frame.cpu().numpy(), chunks[-1].frames[-1])


class FakeCopy:
    """Stands in for the CUDA event of a host copy in flight."""

    def __init__(self) -> None:
        self.waits = 0

    def synchronize(self) -> None:
        self.waits += 1


def test_a_chunk_waits_for_its_host_copy_only_for_the_frames():
    copy = FakeCopy()
    chunk = Chunk(0, torch.zeros(5, 4, 6, 3, dtype=torch.uint8), 0, 0, 0, copied=copy)
    assert chunk.num_frames == 5 and copy.waits == 0  # the frame count needs no sync
    assert chunk.frames.shape == (5, 4, 6, 3) and chunk.frames.dtype == np.uint8
    assert copy.waits == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_chunks_copy_to_pinned_memory_after_an_event():
    pipe = load_preset("tiny", device="cuda")[1]
    stream = StreamingEngine(pipe).start(REFERENCE, GARMENTS[0], chunks=2)
    chunks = list(stream)
    assert all(c.host_frames.is_pinned() and isinstance(c.copied, torch.cuda.Event) for c in chunks)
    assert [c.num_frames for c in chunks] == [len(c.frames) for c in chunks]
    assert stream.last_frame.is_cuda and np.array_equal(stream.last_frame.cpu().numpy(), chunks[-1].frames[-1])
    stream.disentangle_reference()  # on the device; equal to the host path
    host_path = pipe.encode_pixels(media.image_to_tensor(media.frame_to_image(chunks[-1].frames[-1])))
    assert torch.equal(stream.rollout.reference_latent, host_path)


def while_inside(obj, method: str, action, when=lambda: True) -> threading.Thread:
    """Run `action` on another thread while `obj.method` is running (on calls where `when()` holds)."""
    original = getattr(obj, method)
    inside, done = threading.Event(), threading.Event()

    def paused(*args):
        if when():
            inside.set()
            done.wait(10)
        return original(*args)

    setattr(obj, method, paused)
    thread = threading.Thread(target=lambda: (inside.wait(10), action(), done.set()))
    thread.start()
    return thread


def test_switch_requested_mid_chunk_lands_at_next_boundary(pipe, stream_config):
    stream = StreamingEngine(pipe, stream_config).start(REFERENCE, GARMENTS[0], chunks=4)
    requester = while_inside(stream.rollout, "denoise_chunk", lambda: stream.request_switch(GARMENTS[1]),
                             when=lambda: stream.chunk_index == 1)
    versions = [chunk.garment_version for chunk in stream]
    requester.join()
    assert versions == [0, 0, 1, 1]


def test_last_request_before_a_boundary_wins(pipe, stream_config):
    stream = StreamingEngine(pipe, stream_config).start(REFERENCE, GARMENTS[0], chunks=2)
    next(stream)
    stream.request_switch(GARMENTS[1])
    stream.request_switch(GARMENTS[2])
    chunk = next(stream)
    assert chunk.garment_version == 1  # one switch, not two
    assert torch.equal(stream.rollout.garment_latent, garment_latent(pipe, GARMENTS[2], stream_config))


def test_a_request_made_while_a_switch_is_applied_lands_at_the_next_boundary(pipe, small_config):
    """Another thread's request that arrives while the engine applies the previous one is not lost: the engine takes
    a request before it starts the (slow) switch, so the new one waits for the next boundary."""
    stream = StreamingEngine(pipe, small_config).start(REFERENCE, GARMENTS[0], chunks=3)
    next(stream)
    poster = while_inside(stream.rollout, "refresh_garment_kv", lambda: stream.request_switch(GARMENTS[2]))
    stream.request_switch(GARMENTS[1])
    assert next(stream).garment_version == 1
    poster.join()
    assert next(stream).garment_version == 2
    assert torch.equal(stream.rollout.garment_latent, garment_latent(pipe, GARMENTS[2], small_config))


def test_concurrent_switch_requests_are_safe(pipe, small_config):
    """Six threads request switches while the stream runs: every boundary applies at most one switch, nothing
    raises, and the request made after the burst is the garment of the next chunk."""
    stream = StreamingEngine(pipe, small_config).start(REFERENCE, GARMENTS[0], chunks=12)
    errors = []

    def hammer(index):
        try:
            for i in range(15):
                stream.request_switch(GARMENTS[(index + i) % 3])
        except Exception as error:  # noqa: BLE001 - the test reports any failure in a thread
            errors.append(error)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(6)]
    versions = []
    for chunk in stream:
        if chunk.index == 1:
            for thread in threads:
                thread.start()
        if chunk.index == 9:
            for thread in threads:
                thread.join()
            stream.request_switch(GARMENTS[3])
        versions.append(chunk.garment_version)
    assert not errors
    assert all(0 <= b - a <= 1 for a, b in zip(versions, versions[1:]))
    assert versions[10] == versions[9] + 1 and versions[11] == versions[10]
    assert torch.equal(stream.rollout.garment_latent, garment_latent(pipe, GARMENTS[3], small_config))


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage reachable from Python (what a leak of tensors per chunk would grow)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor or type(obj) is torch.nn.Parameter:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def resident_bytes() -> int:
    """The process's current resident set (not its peak), Linux."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def long_stream_growth(pipe, config, keep_latents: bool) -> tuple[int, int, Stream]:
    """(live tensor bytes, resident bytes) gained from chunk 50 to 199 of a stream switching every 10 chunks;
    `keep_latents` holds on to each chunk's latents (a leak, for the negative control)."""
    stream = StreamingEngine(pipe, config).start(REFERENCE, GARMENTS[0], chunks=200)
    cache_bytes = stream.rollout.cache.nbytes
    kept, next_latents = [], stream.rollout.next_latents
    if keep_latents:
        stream.rollout.next_latents = lambda: kept.append(next_latents()) or kept[-1]
    measured = {}
    for chunk in stream:
        if (chunk.index + 1) % 10 == 0:
            stream.request_switch(GARMENTS[(chunk.index // 10) % 3])
        assert stream.rollout.cache.num_frames() <= config.window.window
        if chunk.index in (50, 199):
            measured[chunk.index] = (live_tensor_bytes(), resident_bytes())
    assert chunk.garment_version == 19
    assert stream.rollout.cache.nbytes == cache_bytes
    return measured[199][0] - measured[50][0], measured[199][1] - measured[50][1], stream


def test_long_stream_with_switches_stays_bounded(pipe, small_config):
    tensors, resident, stream = long_stream_growth(pipe, small_config, keep_latents=False)
    assert stream.rollout.next_position < pipe.transformer.config.rope_max_seq_len
    assert tensors <= 0  # the same tensors live at chunk 199 as at chunk 50
    assert resident < 64 * 2**20
    # Negative control: holding 2.3 KB of latents per chunk is seen.
    leaked, _, _ = long_stream_growth(pipe, small_config, keep_latents=True)
    assert leaked >= 149 * 48 * 3 * 2 * 2 * 4


def test_long_stream_without_switches_reanchors_before_the_rope_table_ends(small_config):
    def short_table_stream():
        pipe = load_preset("tiny", device="cpu")[1]
        pipe.transformer.register_to_config(rope_max_seq_len=20)  # a short table so the limit comes quickly
        return StreamingEngine(pipe, small_config).start(REFERENCE, GARMENTS[0], chunks=15)

    stream = short_table_stream()
    cache = stream.rollout.cache
    highest = 0
    for chunk in stream:
        highest = max(highest, max(cache.positions(KVSlot.SINK) + cache.positions(KVSlot.HISTORY)))
        assert chunk.garment_version == 0
    assert highest < 20
    assert cache.positions(KVSlot.REFERENCE) == [0]
    # Negative control: without re-anchoring the same stream runs off the table.
    stream = short_table_stream()
    stream.reanchor = lambda: None
    with pytest.raises(ValueError, match="exceeds the table"):
        list(stream)


def test_same_seed_and_switch_schedule_give_the_same_video(pipe, stream_config):
    def run():
        stream = StreamingEngine(pipe, stream_config).start(REFERENCE, GARMENTS[0], seed=7, chunks=5)
        frames = []
        for chunk in stream:
            frames.append(chunk.frames)
            if chunk.index in (1, 3):
                stream.request_switch(GARMENTS[chunk.index // 2 + 1])
        return np.concatenate(frames)

    first, second = run(), run()
    assert first.shape[0] == 9 + 4 * 12 and np.array_equal(first, second)


def test_stop_ends_at_the_next_boundary(pipe, stream_config):
    stream = StreamingEngine(pipe, stream_config).start(REFERENCE, GARMENTS[0])
    seen = []
    for chunk in stream:
        seen.append(chunk.index)
        if chunk.index == 2:
            stream.stop()
    assert seen == [0, 1, 2]


def test_prompt_garment_words_are_removed_and_reported(pipe, stream_config):
    stream = StreamingEngine(pipe, stream_config).start(
        REFERENCE, GARMENTS[0], "a woman wearing a red striped shirt walks forward", chunks=1
    )
    assert "shirt" not in stream.prompt and "walks" in stream.prompt
    assert stream.removed_words


def test_each_primitive_alone(pipe, stream_config):
    """refresh: only REFERENCE/GARMENT rewritten; withdraw: SINK/HISTORY empty and position back to 2;
    disentangle: the reference latent becomes the last shown frame, the cache is untouched."""
    stream = StreamingEngine(pipe, stream_config).start(REFERENCE, GARMENTS[0], chunks=4)
    rollout, cache = stream.rollout, stream.rollout.cache
    for _ in range(3):
        next(stream)
    tokens = cache.frame_tokens
    before = positions(stream)
    history_keys = cache.keys[1][:, 2 * tokens :].clone()

    rollout.refresh_garment_kv(garment_latent(pipe, GARMENTS[2], stream_config))
    assert positions(stream) == before and rollout.next_position == 11
    assert torch.equal(cache.keys[1][:, 2 * tokens :], history_keys)

    reference_keys = cache.keys[1][:, :tokens].clone()
    stream.disentangle_reference()
    assert positions(stream) == before and torch.equal(cache.keys[1][:, :tokens], reference_keys)
    expected = pipe.encode_pixels(media.image_to_tensor(media.frame_to_image(stream.last_frame.cpu().numpy())))
    assert torch.equal(rollout.reference_latent, expected)

    rollout.withdraw_history_kv()
    assert positions(stream) == {"reference": [0], "garment": [1], "sink": [], "history": []}
    assert rollout.next_position == 2
