"""The streaming engine: chunk contract, cached == recompute, slot contents, and garment switching."""

import os
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from fashionchameleon import media
from fashionchameleon.engine import Stream, StreamingEngine, SwitchMode
from fashionchameleon.models.kv_cache import KVSlot
from fashionchameleon.presets import build_tiny, get_preset

ASSETS = os.path.join(os.path.dirname(__file__), "..", "assets")
REFERENCE = os.path.join(ASSETS, "reference.png")
GARMENTS = [os.path.join(ASSETS, f"garment_{name}.png") for name in ("red_stripes", "blue_checks", "green_dots")]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny(seed=0)


@pytest.fixture(scope="module")
def stream_config():
    return get_preset("tiny").stream


@pytest.fixture(scope="module")
def small_config():
    """A 32x32 stream (one token per latent frame) for the long-stream tests: same code, less decode work."""
    return replace(get_preset("tiny").stream, height=32, width=32)


def positions(stream: Stream) -> dict[str, list[int]]:
    return {slot.value: stream.cache.positions(slot) for slot in KVSlot}


def test_chunks_frame_counts_and_determinism(pipe, stream_config):
    engine = StreamingEngine(pipe, stream_config)
    chunks = list(engine.start(REFERENCE, GARMENTS[0], "a person walks", seed=3, chunks=3))
    assert [len(c.frames) for c in chunks] == [9, 12, 12]
    assert [c.first_frame for c in chunks] == [0, 9, 21]
    assert [c.index for c in chunks] == [0, 1, 2]
    assert {c.garment_version for c in chunks} == {0}
    assert chunks[0].frames.dtype == np.uint8 and chunks[0].frames.shape[1:] == (96, 64, 3)
    again = list(engine.start(REFERENCE, GARMENTS[0], "a person walks", seed=3, chunks=3))
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(chunks, again))
    other = list(engine.start(REFERENCE, GARMENTS[0], "a person walks", seed=4, chunks=1))
    assert not np.array_equal(chunks[0].frames, other[0].frames)


def test_cached_stream_equals_recompute_stream(pipe, stream_config):
    """The KV cache changes the cost, not the result: the same stream with every pass re-running the whole
    visible context under the block-causal mask gives the same latents, across a switch (before the window
    evicts; after that the cache holds K/V computed with frames recompute no longer sees)."""
    config = replace(get_preset("tiny").stream, history_frames=30)
    results = []
    for use_cache in (True, False):
        engine = StreamingEngine(pipe, config, use_kv_cache=use_cache, switch_mode=SwitchMode.REFRESH_WITHDRAW)
        stream = engine.start(REFERENCE, GARMENTS[0], seed=1, chunks=6)
        latents = []
        for chunk in stream:
            latents.append(chunk.latents)
            if chunk.index == 3:
                stream.request_switch(GARMENTS[1])
        results.append(torch.cat(latents, dim=2))
    assert float((results[0] - results[1]).abs().max()) < 1e-4
    # Negative control: a stream that loses its history every chunk is a different video.
    stream = StreamingEngine(pipe, config, switch_mode=SwitchMode.REFRESH_WITHDRAW).start(
        REFERENCE, GARMENTS[0], seed=1, chunks=6
    )
    forgetful = []
    for chunk in stream:
        forgetful.append(chunk.latents)
        stream.cache.clear([KVSlot.SINK, KVSlot.HISTORY])
        if chunk.index == 3:
            stream.request_switch(GARMENTS[1])
    assert float((torch.cat(forgetful, dim=2) - results[0]).abs().max()) > 1e-2


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
    assert stream.cache.num_frames() == stream_config.window.window


@pytest.mark.parametrize("mode", list(SwitchMode))
def test_switch_modes_leave_the_cache_as_specified(pipe, stream_config, mode):
    """METHOD.md §7.3: refresh keeps sink/history and positions; withdraw drops them and restarts at RoPE 2;
    full also takes the last shown frame, VAE-encoded as an image, as the new reference."""
    engine = StreamingEngine(pipe, stream_config, switch_mode=mode)
    stream = engine.start(REFERENCE, GARMENTS[0], chunks=5)
    for _ in range(3):
        next(stream)
    before = positions(stream)
    old_reference = stream.reference_latent.clone()
    old_garment_key = stream.cache.keys[0][:, stream.cache.frame_tokens : 2 * stream.cache.frame_tokens].clone()
    stream.switch_garment(media.load_image(GARMENTS[1]))
    after = positions(stream)
    assert after["reference"] == [0] and after["garment"] == [1]
    new_garment_key = stream.cache.keys[0][:, stream.cache.frame_tokens : 2 * stream.cache.frame_tokens]
    assert float((new_garment_key - old_garment_key).abs().max()) > 1e-3  # garment KV refreshed
    assert stream.garment_version == 1
    if mode is SwitchMode.REFRESH:
        assert after == before and stream.next_position == 11
    else:
        assert after["sink"] == [] and after["history"] == [] and stream.next_position == 2
    if mode is SwitchMode.FULL:
        expected = engine.encode_pixels(media.image_to_tensor(media.frame_to_image(stream.last_frame)))
        assert torch.equal(stream.reference_latent, expected)
        assert float((stream.reference_latent - old_reference).abs().max()) > 1e-3
    else:
        assert torch.equal(stream.reference_latent, old_reference)
    chunk = next(stream)
    assert chunk.garment_version == 1
    if mode is not SwitchMode.REFRESH:
        assert positions(stream)["sink"] == [2, 3, 4]  # the first chunk after a withdraw is the new sink


def test_switch_requested_mid_chunk_lands_at_next_boundary(pipe, stream_config):
    stream = StreamingEngine(pipe, stream_config).start(REFERENCE, GARMENTS[0], chunks=4)
    inside = threading.Event()
    resume = threading.Event()
    original = stream.denoise_chunk

    def denoise_and_wait(pos):
        if stream.chunk_index == 1:
            inside.set()
            resume.wait(10)
        return original(pos)

    stream.denoise_chunk = denoise_and_wait
    requester = threading.Thread(target=lambda: (inside.wait(10), stream.request_switch(GARMENTS[1]), resume.set()))
    requester.start()
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
    assert torch.equal(stream.garment_latent, stream.engine.encode_garment(media.load_image(GARMENTS[2])))


def test_concurrent_switch_requests_are_safe(pipe, small_config):
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
        versions.append(chunk.garment_version)
    for thread in threads:
        thread.join()
    assert not errors
    assert all(0 <= b - a <= 1 for a, b in zip(versions, versions[1:]))
    assert versions[-1] >= 1


def test_long_stream_with_switches_stays_bounded(pipe, small_config):
    import resource

    stream = StreamingEngine(pipe, small_config).start(REFERENCE, GARMENTS[0], chunks=200)
    cache_bytes = stream.cache.nbytes
    rss = []
    for chunk in stream:
        if (chunk.index + 1) % 10 == 0:
            stream.request_switch(GARMENTS[(chunk.index // 10) % 3])
        assert stream.cache.num_frames() <= small_config.window.window
        if chunk.index in (50, 199):
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert chunk.garment_version == 19
    assert stream.cache.nbytes == cache_bytes
    assert stream.next_position < pipe.transformer.config.rope_max_seq_len
    assert rss[1] - rss[0] < 64 * 1024  # KiB: no growth with the number of chunks


def test_long_stream_without_switches_reanchors_before_the_rope_table_ends(small_config):
    pipe = build_tiny(seed=0)
    pipe.transformer.register_to_config(rope_max_seq_len=20)  # a short table so the limit comes quickly
    stream = StreamingEngine(pipe, small_config).start(REFERENCE, GARMENTS[0], chunks=15)
    highest = 0
    for chunk in stream:
        highest = max(highest, max(stream.cache.positions(KVSlot.SINK) + stream.cache.positions(KVSlot.HISTORY)))
        assert chunk.garment_version == 0
    assert highest < 20
    assert stream.cache.positions(KVSlot.REFERENCE) == [0]


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
    for _ in range(3):
        next(stream)
    tokens = stream.cache.frame_tokens
    before = positions(stream)
    history_keys = stream.cache.keys[1][:, 2 * tokens :].clone()

    stream.garment_latent = stream.engine.encode_garment(media.load_image(GARMENTS[2]))
    stream.refresh_garment_kv()
    assert positions(stream) == before and stream.next_position == 11
    assert torch.equal(stream.cache.keys[1][:, 2 * tokens :], history_keys)

    reference_keys = stream.cache.keys[1][:, :tokens].clone()
    stream.disentangle_reference()
    assert positions(stream) == before and torch.equal(stream.cache.keys[1][:, :tokens], reference_keys)
    expected = stream.engine.encode_pixels(media.image_to_tensor(media.frame_to_image(stream.last_frame)))
    assert torch.equal(stream.reference_latent, expected)

    stream.withdraw_history_kv()
    assert positions(stream) == {"reference": [0], "garment": [1], "sink": [], "history": []}
    assert stream.next_position == 2
