"""The serving layer without Gradio: the file mailbox, pacing, and a stream whose producer runs in a forked
process the way ZeroGPU runs `spaces.GPU` functions (fork context, arguments and yields pickled)."""

import base64
import io
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import GARMENTS, REFERENCE, probe_video
from PIL import Image

from fashionchameleon import media
from fashionchameleon.engine import Stream
from fashionchameleon.errors import UserInputError
from fashionchameleon.serving import (
    DONE,
    QUEUE_CHUNKS,
    STOP,
    STOPPED,
    STREAMING,
    SWITCH,
    SWITCHING,
    ChunkReady,
    Mailbox,
    Message,
    Pacer,
    StreamService,
    StreamVideo,
    checks,
    pacing,
)
from fashionchameleon.serving.producer import Producer

GARMENT, NEXT_GARMENT = GARMENTS[:2]
#: Long enough that only a stop can end the stream within the test (about 20 s of paced video).
LONG_STREAM = 40
#: The stream key the tests' streams are made with.
KEY = "k" * 32
#: Seconds to wait for anything the test expects (generous: CI machines are slow).
PATIENCE = 60
#: Seconds a test's slow encoder waits for something that the old, serial producer never lets happen.
NEVER = 5


# -- mailbox -------------------------------------------------------------------------------------------------------
def test_mailbox_delivers_in_order_once(tmp_path):
    box = Mailbox(tmp_path)
    box.open("s")
    box.post("s", Message(SWITCH, garment="a.png"))
    box.post("s", Message(SWITCH, garment="b.png"))
    box.post("s", Message(STOP))
    (tmp_path / "s" / ".half-written.json.part").write_text("{")  # a writer mid-rename is never read
    assert box.drain("s") == [Message(SWITCH, "a.png"), Message(SWITCH, "b.png"), Message(STOP)]
    assert box.drain("s") == []


def test_removed_mailbox_refuses_posts(tmp_path):
    box = Mailbox(tmp_path)
    box.open("s")
    box.remove("s")
    assert not box.exists("s")
    assert box.drain("s") == []
    with pytest.raises(FileNotFoundError):
        box.post("s", Message(STOP))


# -- pacing --------------------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pacer_keeps_production_one_lead_ahead_of_playback():
    clock = FakeClock()
    pacer = Pacer(fps=24, speed=1.0, clock=clock)
    assert pacer.delay() == 0.0  # nothing produced: start at once
    pacer.produced(48, making_seconds=1.0 / pacing.LEAD_FACTOR)  # 2 s of video at t = 100; a lead of 1 s
    assert pacer.delay() == pytest.approx(1.0)  # wait until only 1 s is left to play
    clock.now += 0.25
    assert pacer.delay() == pytest.approx(0.75)
    clock.now += 5
    assert pacer.delay() == 0.0  # behind real time: never wait


def test_pacer_speed_scales_and_zero_disables():
    fast, off = Pacer(24, speed=2.0, clock=FakeClock()), Pacer(24, speed=0, clock=FakeClock())
    for pacer in (fast, off):
        pacer.produced(72, making_seconds=0.5 / pacing.LEAD_FACTOR)  # 3 s of video; a lead of 1 s of video at 2x
    assert fast.delay() == pytest.approx(1.0)  # (3 - 1) s of video at 2x
    assert off.delay() == 0.0


def test_pacer_lead_follows_the_slowest_recent_chunk():
    """The lead is LEAD_FACTOR x the slowest of the last LEAD_WINDOW making times, never below LEAD_MIN_SECONDS: a
    fast machine keeps little video ahead (a switch shows sooner), a slow one keeps more (no stall)."""
    clock = FakeClock()
    pacer = Pacer(fps=12, clock=clock)
    pacer.produced(3, making_seconds=0.01)
    assert pacer.lead == pacing.LEAD_MIN_SECONDS
    pacer.produced(3, making_seconds=0.2)
    assert pacer.lead == pytest.approx(pacing.LEAD_FACTOR * 0.2)
    assert pacer.delay() == pytest.approx(0.5 - pacing.LEAD_FACTOR * 0.2)  # 0.5 s made at t = 100
    for _ in range(pacing.LEAD_WINDOW):
        pacer.produced(3, making_seconds=0.1)
    assert pacer.lead == pytest.approx(pacing.LEAD_FACTOR * 0.1)  # the slow chunk has left the window


# -- checks ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks, seed", [("abc", 0), (1, "x"), (None, 0), (1.5, 0), (True, 0), (float("nan"), 0),
                                          (float("inf"), 0), ([2], 0), (1, -1), (1, 2**32), (0, 0), (1, {"a": 1})])
def test_request_values_of_any_type_are_refused_with_a_sentence(chunks, seed):
    with pytest.raises(UserInputError, match="Length must be a whole number|Seed must be a whole number"):
        checks.check_request("", chunks, seed, max_chars=10, max_chunks=4)


def test_request_values_that_are_whole_numbers_are_taken():
    assert checks.check_request(None, 4.0, checks.MAX_SEED, max_chars=10, max_chunks=4) == ("", 4, checks.MAX_SEED)
    with pytest.raises(UserInputError, match="prompt must be text"):
        checks.check_request(123, 1, 0, max_chars=10, max_chunks=4)


class HeldDecodes:
    """Stands in for the decoder: counts the decodes in progress and holds each until `release` is set."""

    def __init__(self, monkeypatch) -> None:
        self.now = self.most = 0
        self.lock, self.release = threading.Lock(), threading.Event()
        monkeypatch.setattr(media, "probe_image", self)

    def __call__(self, path, name):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        self.release.wait(PATIENCE)
        with self.lock:
            self.now -= 1
        return "RGB", False


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def decode_concurrently(check_image, decodes: HeldDecodes, calls: int, at_once: int) -> list:
    """`calls` checks from as many threads; once `at_once` decode together, let them all finish."""
    with ThreadPoolExecutor(calls) as pool:
        futures = [pool.submit(check_image, GARMENT, "garment photo") for _ in range(calls)]
        wait_until(lambda: decodes.now == at_once, f"{at_once} decodes at once")
        decodes.release.set()
        return [future.result(PATIENCE) for future in futures]


def test_image_checks_of_all_sessions_decode_at_most_max_decodes_at_once(service, monkeypatch):
    calls = 4 * checks.MAX_DECODES
    decodes = HeldDecodes(monkeypatch)
    assert decode_concurrently(service.check_image, decodes, calls, checks.MAX_DECODES) == [[]] * calls
    assert decodes.most == checks.MAX_DECODES
    # Negative control: with as many slots as calls, every call decodes at once.
    unlimited = HeldDecodes(monkeypatch)
    decode_concurrently(checks.DecodeSlots(slots=calls).check_image, unlimited, calls, calls)
    assert unlimited.most == calls


def test_an_image_check_that_finds_no_free_slot_in_time_is_refused(monkeypatch):
    decodes = HeldDecodes(monkeypatch)
    slots = checks.DecodeSlots(slots=1, wait=0)
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(slots.check_image, GARMENT, "garment photo")
        wait_until(lambda: decodes.now == 1, "the first decode")
        with pytest.raises(UserInputError, match="busy"):
            slots.check_image(GARMENT, "garment photo")
        decodes.release.set()
        assert holder.result(PATIENCE) == []
    assert slots.check_image(GARMENT, "garment photo") == []  # the slot came back


def test_a_switch_without_a_stream_decodes_nothing(service, monkeypatch):
    decodes = HeldDecodes(monkeypatch)
    decodes.release.set()
    with pytest.raises(UserInputError, match="No stream is running"):
        service.switch("no-stream-session", GARMENT, key=KEY)
    assert decodes.most == 0


# -- the producer in a forked worker -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tmp_path_factory):
    # CPU even on a GPU machine: CUDA cannot be used in a forked child once the parent has touched it (on ZeroGPU
    # the server process never does; spaces fakes CUDA there).
    service = StreamService.load("tiny", device="cpu", root=tmp_path_factory.mktemp("serving"))
    yield service
    service.shutdown()


def _worker(service: StreamService, args_queue, results) -> None:
    """The forked side: arguments arrive pickled, every yield leaves pickled (as in spaces.zero.wrappers)."""
    args = args_queue.get()
    for ready in service.produce(*args):
        results.put(ready)
    results.put(getattr(service, "set_after_fork", None))  # negative control: parent memory is not shared


class ForkedProducer:
    """Stands in for `spaces.GPU(service.produce)` on ZeroGPU: each call forks a worker."""

    def __init__(self, service: StreamService) -> None:
        self.service = service
        self.context = multiprocessing.get_context("fork")
        self.after_fork_value = "missing"

    def __call__(self, *args):
        args_queue, results = self.context.SimpleQueue(), self.context.SimpleQueue()
        process = self.context.Process(target=_worker, args=(self.service, args_queue, results), daemon=True)
        process.start()
        self.service.set_after_fork = True  # visible to the parent only
        args_queue.put(args)
        try:
            while isinstance(item := results.get(), ChunkReady | StreamVideo):
                yield item
            self.after_fork_value = item
        finally:
            process.join(PATIENCE)
            del self.service.set_after_fork
        assert process.exitcode == 0


def test_forked_producer_gets_switch_and_stop_through_the_mailbox(service):
    producer = ForkedProducer(service)
    seen: list[dict] = []  # statuses of chunks
    ends: list[tuple[int | None, dict]] = []  # (frames in the video, status) after the chunks
    session = "forked-session"
    stream = service.stream(session, REFERENCE, GARMENT, "", LONG_STREAM, 0, producer=producer, key=KEY)

    def consume() -> None:
        for frames, video, status in stream:  # the video goes once the next update is asked for: probe it now
            (seen.append(status) if frames is not None else ends.append((video and probe_video(video).frames, status)))

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + PATIENCE
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}; got {seen}"
            time.sleep(0.01)

    wait_for(lambda: len(seen) >= 2, "two chunks")
    switched_after = service.switch(session, NEXT_GARMENT, key=KEY)[0]["chunk"]
    wait_for(lambda: seen[-1]["garment_version"] == 1, "the switch")
    first_new = next(s["chunk"] for s in seen if s["garment_version"] == 1)
    # Chunks made after the last one handed over (the queue, plus one) and the one being made when the switch
    # came keep the old garment; the next has the new one.
    assert switched_after < first_new <= switched_after + QUEUE_CHUNKS + 2
    assert all(s["garment_version"] == (1 if s["chunk"] >= first_new else 0) for s in seen)
    # Until the new garment comes, the statuses say the switch is on its way, not "streaming" with the old one.
    assert [s["state"] for s in seen if switched_after < s["chunk"] < first_new] == [SWITCHING] * (
        first_new - switched_after - 1)

    stopped_after = service.stop(session, key=KEY)["chunk"]
    consumer.join(PATIENCE)
    assert not consumer.is_alive()
    # Ends within the chunk in flight (marked STOPPED if the stop came while it was being made).
    assert seen[-1]["chunk"] <= stopped_after + QUEUE_CHUNKS + 1 < LONG_STREAM
    # The whole stream's video comes last; the last status says stopped.
    assert all(s["state"] in (STREAMING, SWITCHING) for s in seen[:-1]) and ends[-1][1]["state"] == STOPPED
    assert [s["chunk"] for s in seen] == list(range(len(seen)))
    assert [frames for frames, _ in ends] == [len(seen) * 12 - 3]  # the whole stream: 9 frames, then 12 a chunk
    assert producer.after_fork_value is None, "the worker saw parent memory written after the fork"
    assert len(service.sessions) == 0
    assert os.listdir(service.chunk_root) == [] and os.listdir(service.mailbox.root) == []


def locks_in_a_forked_child(service: StreamService) -> tuple[bool, bool]:
    """Whether a child forked while another thread holds the service's locks can take them (as a ZeroGPU worker
    forked mid-request must)."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with service.sessions._lock, service._producer._model_lock:
            held.set()
            release.wait(PATIENCE)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(PATIENCE)
    try:
        context = multiprocessing.get_context("fork")
        result = context.SimpleQueue()
        child = context.Process(target=lambda: result.put(tuple(  # the locks as the child sees them after the fork
            lock.acquire(timeout=1) for lock in (service.sessions._lock, service._producer._model_lock))))
        child.start()
        child.join(PATIENCE)
        return result.get()
    finally:
        release.set()
        holder.join()


def test_a_forked_worker_makes_its_locks_afresh(service, monkeypatch):
    assert locks_in_a_forked_child(service) == (True, True)
    # Negative control: without the after-fork reset the child inherits locks that no thread will release.
    monkeypatch.setattr("fashionchameleon.serving.locks._OWNERS", set())
    assert locks_in_a_forked_child(service) == (False, False)


def test_chunks_come_as_strips_and_the_stream_as_one_h264_mp4(service):
    stream = service.stream("plain-session", REFERENCE, GARMENT, "", 2, 0, key=KEY)
    updates = [(f, v and probe_video(v), s) for f, v, s in stream]  # the video goes when the next update is asked for
    frames = [f for f, _, _ in updates if f is not None]
    assert [(f["chunk"], f["frames"], f["fps"], f["garment_version"]) for f in frames] == [
        (0, 9, 24, 0), (1, 12, 24, 0)]
    for chunk in frames:
        header, data = chunk["image"].split(",", 1)
        strip = Image.open(io.BytesIO(base64.b64decode(data)))
        assert header == "data:image/png;base64" and strip.size == (64, 96 * chunk["frames"])
    (video, status), = [(v, s) for f, v, s in updates if f is None]  # the last update: the whole stream
    assert updates[-1][1] == video and status["state"] == DONE
    assert (video.codec, video.frames, video.width, video.height) == ("h264", 21, 64, 96)
    ready = ChunkReady(b"strip", 0, 9, 0, 0, 10.0, DONE)
    assert pickle.loads(pickle.dumps(ready)) == ready
    assert os.listdir(service.chunk_root) == []  # gone once the consumer asked past the video


def test_leaving_early_removes_the_streams_files(service):
    stream = service.stream("plain-session", REFERENCE, GARMENT, "", LONG_STREAM, 0, key=KEY)
    next(stream)
    stream.close()  # leaving early: the producer ends and the folder goes
    deadline = time.monotonic() + PATIENCE
    while os.listdir(service.chunk_root) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.listdir(service.chunk_root) == []


# -- the producer's engine and encoder threads ------------------------------------------------------------------------
@pytest.fixture
def unpaced(service):
    """An unpaced producer on the service's model with its own thread set, and a stream id with mailbox and folder."""
    threads: set[threading.Thread] = set()
    producer = Producer(service.engine, service.mailbox, service.sessions.folders, threads, fps=service.fps, pacing=0,
                        strip_format="png")
    stream_id = uuid.uuid4().hex
    service.mailbox.open(stream_id)
    service.sessions.folders.create(stream_id)
    yield producer, stream_id, threads
    service.mailbox.remove(stream_id)
    service.sessions.folders.delete(stream_id)


def all_ended(threads: set[threading.Thread]) -> bool:
    for thread in list(threads):
        thread.join(PATIENCE)
    return not threads


def record(monkeypatch, generate=None, encode=None) -> list[tuple[str, int]]:
    """Log ("generate", k) when the engine starts chunk k and ("encoded", k) when strip k is made; `generate`
    and `encode` run first with k (to wait or to raise)."""
    events: list[tuple[str, int]] = []
    original_next, original_encode = Stream.__next__, media.encode_strip

    def next_chunk(stream):
        events.append(("generate", stream.chunk_index))
        if generate:
            generate(stream.chunk_index)
        return original_next(stream)

    def encode_strip(frames, image_format):
        index = sum(kind == "encoded" for kind, _ in events)  # strips are made in chunk order
        if encode:
            encode(index)
        strip = original_encode(frames, image_format)
        events.append(("encoded", index))
        return strip

    monkeypatch.setattr(Stream, "__next__", next_chunk)
    monkeypatch.setattr(media, "encode_strip", encode_strip)
    return events


def test_the_engine_makes_the_next_chunk_while_the_previous_is_encoded(unpaced, monkeypatch):
    producer, stream_id, threads = unpaced
    second_started = threading.Event()
    running = []

    def encode(index):
        if index == 0:
            running.extend(sorted(thread.name.split("-")[0] for thread in threads))
            second_started.wait(NEVER)

    events = record(monkeypatch, generate=lambda k: k == 1 and second_started.set(), encode=encode)
    *ready, video = producer.produce(stream_id, REFERENCE, GARMENT, "", 0, 3)
    assert running == ["encode", "stream"]
    assert events.index(("generate", 1)) < events.index(("encoded", 0))  # chunk 0's encoding did not hold the engine
    assert [(r.index, r.frames, r.state) for r in ready] == [(0, 9, STREAMING), (1, 12, STREAMING), (2, 12, DONE)]
    assert [Image.open(io.BytesIO(r.strip)).height for r in ready] == [96 * 9, 96 * 12, 96 * 12]
    assert all(r.fps > 0 for r in ready)
    assert probe_video(video.path).frames == 33
    assert all_ended(threads)


def test_an_engine_error_comes_after_the_chunks_made_before_it(unpaced, monkeypatch):
    producer, stream_id, threads = unpaced
    failed = threading.Event()

    def generate(index):
        if index == 2:
            failed.set()
            raise RuntimeError("the engine failed")

    record(monkeypatch, generate=generate, encode=lambda k: k == 1 and failed.wait(NEVER))
    seen = []
    with pytest.raises(RuntimeError, match="the engine failed"):
        for ready in producer.produce(stream_id, REFERENCE, GARMENT, "", 0, LONG_STREAM):
            seen.append(ready.index)
    assert seen == [0, 1]
    assert all_ended(threads)


def test_an_encode_error_reaches_the_consumer_and_ends_both_threads(unpaced, service, monkeypatch):
    producer, stream_id, threads = unpaced

    def encode(index):
        if index == 1:
            raise OSError("disk full")

    events = record(monkeypatch, encode=encode)
    seen = []
    with pytest.raises(OSError, match="disk full"):
        for ready in producer.produce(stream_id, REFERENCE, GARMENT, "", 0, LONG_STREAM):
            seen.append(ready.index)
    assert seen == [0]
    assert all_ended(threads)
    assert max(k for kind, k in events if kind == "generate") <= QUEUE_CHUNKS + 1  # chunk 0 taken; the engine stopped
    assert (service.sessions.folders.path(stream_id) / ".producer-done").exists()  # the folder is handed over


def test_production_stays_bounded_ahead_of_a_consumer_that_does_not_take(unpaced, monkeypatch):
    """At most QUEUE_CHUNKS + 1 chunks are made and not taken, encoder stage or not (a switch lands as soon)."""
    producer, stream_id, threads = unpaced
    events = record(monkeypatch)
    items = producer.produce(stream_id, REFERENCE, GARMENT, "", 0, LONG_STREAM)
    assert next(items).index == 0
    deadline = time.monotonic() + PATIENCE
    while ("encoded", 1 + QUEUE_CHUNKS) not in events:  # the pipeline is full
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)  # room for the engine to run ahead if it could
    generated = [k for kind, k in events if kind == "generate"]
    assert generated == list(range(1 + QUEUE_CHUNKS + 1))
    items.close()
    assert all_ended(threads)


# -- the real spaces.GPU wrapper, with only the ZeroGPU scheduler and torch patching stubbed --------------------------
SIMULATED_ZEROGPU = r'''
import json, os, secrets, sys, time, types
os.environ.update(SPACES_ZERO_GPU="true", SPACES_ZERO_DEVICE_API_URL="http://127.0.0.1:9")
torch_patching = types.ModuleType("spaces.zero.torch")  # CPU torch cannot be patched for CUDA
for name in ["enter_mode", "patch", "unpatch", "init", "move"]:
    setattr(torch_patching, name, lambda *args, **kwargs: None)
torch_patching.pack = torch_patching.size = lambda *args, **kwargs: 0
torch_patching.is_in_bad_fork = lambda *args, **kwargs: False
sys.modules["spaces.zero.torch"] = torch_patching
import spaces
from spaces.zero import client
requested = []
client.schedule = lambda **kwargs: requested.append(kwargs["duration"].total_seconds()) or types.SimpleNamespace(
    allowToken="token", nvidiaIndex=0, nvidiaUUID="gpu", idle=False)
client.release = client.startup_report = client.allow = lambda *args, **kwargs: None

import app
from fashionchameleon.serving import StreamService
from gradio_client import Client, handle_file

service = StreamService.load("tiny", device="cpu")
demo = app.build_demo(service)
_, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **app.LAUNCH_OPTIONS)
connection = Client(url, verbose=False, download_files=False)
reference, garments = service.preset.example_inputs()
KEY = secrets.token_hex(16)  # the stream's key, sent again with switch and stop
job = connection.submit(handle_file(str(reference)), handle_file(str(garments[0])), "", {chunks}, 0, KEY,
                        api_name="/generate")
result = {"statuses": [], "threads_in_server": 0}
for i, (_, _, status) in enumerate(job):
    if i == 0:  # the stream is starting
        continue
    result["statuses"].append(status)
    result["threads_in_server"] = max(result["threads_in_server"], len(service._threads))
    if i == 3:
        reply = connection.predict(handle_file(str(garments[1])), KEY, api_name="/switch_garment")
        result["switched_after"] = reply["chunk"]
    if i == 8:
        result["stopped_after"] = connection.predict(KEY, api_name="/stop")["chunk"]
time.sleep(1)
result["left_over"] = os.listdir(service.chunk_root) + os.listdir(service.mailbox.root)
result["requested_seconds"] = requested
connection.close()
demo.close()
service.shutdown()
print("RESULT " + json.dumps(result))
'''


def test_real_spaces_wrapper_in_simulated_zerogpu(service):
    """`spaces.GPU` as on ZeroGPU (the decorator forks a worker per call): the app's producer runs in the forked
    worker that spaces makes, arguments and yields go through its pipes, and its stop logic is live."""
    root = Path(__file__).resolve().parent.parent
    script = SIMULATED_ZEROGPU.replace("{chunks}", str(LONG_STREAM))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          timeout=PATIENCE * 2, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    seen = result["statuses"]
    assert result["threads_in_server"] == 0, "the engine ran in the server process, not in the spaces worker"
    first_new = next(s["chunk"] for s in seen if s["garment_version"] == 1)
    assert result["switched_after"] < first_new <= result["switched_after"] + QUEUE_CHUNKS + 2
    assert seen[-1]["chunk"] <= result["stopped_after"] + QUEUE_CHUNKS + 1 < LONG_STREAM
    assert result["left_over"] == []
    assert result["requested_seconds"] == [service.gpu_duration("", REFERENCE, GARMENT, "", 0, LONG_STREAM)]
