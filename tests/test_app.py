"""The Gradio app on localhost, driven through gradio_client as a program would use the Space.

The tiny preset on CPU, paced to real time (a 12-frame chunk every 0.5 s), so streams behave as for a viewer.
"""

import asyncio
import base64
import io
import json
import logging
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio.routes
import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from helpers import GARMENTS, REFERENCE, ROOT, probe_video
from PIL import Image

import app
from fashionchameleon.errors import UserInputError
from fashionchameleon.serving import (
    DONE,
    QUEUE_CHUNKS,
    STARTING,
    STOPPED,
    STOPPING,
    STREAMING,
    SWITCHING,
    StreamService,
)
from fashionchameleon.serving.checks import env_number

GARMENT, NEXT_GARMENT = GARMENTS[:2]
#: Streams long enough to act on mid-way, short enough to keep the suite quick (0.5 s of video per chunk).
MID_STREAM = 10
#: Chunks the producer may have made beyond the last one Gradio took: the queue, plus one being made.
CHUNKS_AHEAD = QUEUE_CHUNKS + 1
#: The stream key these tests send with Generate, stop and switch (each client is its own session).
KEY = secrets.token_hex(16)
#: Seconds to wait for a server or a stream (generous: CI machines are slow).
PATIENCE = 60
#: A cancelled or disconnected stream must be gone this soon (it would otherwise run for 20 s).
LEAVE_SECONDS = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    service = StreamService.load("tiny", root=tmp_path_factory.mktemp("streams"))
    demo = app.build_demo(service)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            **app.LAUNCH_OPTIONS)
    yield url, service
    demo.close()
    service.shutdown()


@pytest.fixture
def connect(server, tmp_path):
    """Open clients (one per session); `files=True` downloads the per-chunk mp4s into tmp_path."""
    url, _ = server
    clients = []

    def open_client(files: bool = False) -> Client:
        client = Client(url, verbose=False, download_files=str(tmp_path) if files else False)
        clients.append(client)
        return client

    yield open_client
    with ThreadPoolExecutor() as pool:  # each close waits about a second for its heartbeat thread
        list(pool.map(Client.close, clients))


def generate(client: Client, garment: str | None = GARMENT, chunks: int = 3, *, reference: str | None = REFERENCE,
             prompt: str = "", seed: int = 0, key: object = KEY):
    return client.submit(handle_file(reference) if reference else None, handle_file(garment) if garment else None,
                         prompt, chunks, seed, key, api_name="/generate")


def switch(client: Client, garment: str, key: str = KEY) -> dict:
    return client.predict(handle_file(garment), key, api_name="/switch_garment")


def stop(client: Client, key: str = KEY) -> dict:
    return client.predict(key, api_name="/stop")


def is_chunk(frames: object) -> bool:
    """Whether an update of /generate carries a chunk (else: the start, or the whole stream's video at the end)."""
    return isinstance(frames, dict) and "image" in frames


def statuses(job) -> list[dict]:
    """The statuses of the chunks."""
    return [status for frames, _, status in job.outputs() if is_chunk(frames)]


def last_status(job) -> dict:
    """The stream's last status: how it ended."""
    return job.outputs()[-1][2]


def wait_for_chunk(job, index: int) -> None:
    deadline = time.monotonic() + PATIENCE
    while len(statuses(job)) <= index:
        assert not job.done(), f"stream ended early: {statuses(job)}"
        assert time.monotonic() < deadline, "timed out waiting for a chunk"
        time.sleep(0.01)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_api_names_and_parameters(connect):
    endpoints = connect().view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/generate", "/switch_garment", "/stop"}
    assert [p["parameter_name"] for p in endpoints["/generate"]["parameters"]] == [
        "reference", "garment", "prompt", "chunks", "seed", "key"]
    assert [r["label"] for r in endpoints["/generate"]["returns"]] == [
        "frames", "The whole stream (H.264 mp4, when it ends)", "status"]
    assert [p["parameter_name"] for p in endpoints["/switch_garment"]["parameters"]] == ["garment", "key"]
    assert [p["parameter_name"] for p in endpoints["/stop"]["parameters"]] == ["key"]


def test_stream_yields_each_chunks_frames_then_the_whole_mp4(connect, server):
    _, service = server
    chunks = 3
    job = generate(connect(files=True), chunks=chunks)
    job.result(timeout=PATIENCE)
    starting, *updates, (_, video, end) = job.outputs()
    assert starting[1:] == (None, {"state": STARTING})  # no video yet (a previous stream's goes)
    assert len(updates) == chunks and all(is_chunk(frames) for frames, _, _ in updates)
    assert len({frames["stream"] for frames, _, _ in updates}) == 1  # how the page's player tells streams apart
    config = service.preset.stream
    for i, (frames, _, status) in enumerate(updates):
        count = 9 if i == 0 else 12
        strip = Image.open(io.BytesIO(base64.b64decode(frames["image"].split(",", 1)[1])))
        assert strip.size == (config.width, config.height * count)
        assert (frames["chunk"], frames["frames"], frames["fps"]) == (i, count, config.fps)
        assert (status["chunk"], status["frames"], status["garment_version"]) == (i, count, 0)
        assert status["state"] == (DONE if i == chunks - 1 else STREAMING)
    info = probe_video(video)
    assert (info.codec, info.frames, info.width, info.height) == ("h264", 33, config.width, config.height)
    assert info.fps == pytest.approx(config.fps)
    assert end["state"] == DONE


def test_switch_mid_stream_bumps_garment_version_at_next_chunk(connect):
    client = connect()
    job = generate(client, chunks=MID_STREAM)
    wait_for_chunk(job, 2)
    reply = switch(client, NEXT_GARMENT)
    assert reply["state"] == SWITCHING and reply["garment_version"] == 0
    job.result(timeout=PATIENCE)
    versions = [s["garment_version"] for s in statuses(job)]
    assert len(versions) == MID_STREAM
    first_new = versions.index(1)
    # reply["chunk"] is the last chunk handed to Gradio; chunks already made after it and the one being made when
    # the switch came keep the old garment, the next one has the new garment.
    assert reply["chunk"] < first_new <= reply["chunk"] + CHUNKS_AHEAD + 1
    assert versions == [0] * first_new + [1] * (MID_STREAM - first_new)


def test_stop_ends_stream_within_one_chunk(connect):
    client = connect()
    job = generate(client, chunks=MID_STREAM * 4)
    wait_for_chunk(job, 1)
    reply = stop(client)
    job.result(timeout=PATIENCE)
    last = statuses(job)[-1]["chunk"]
    assert last <= reply["chunk"] + CHUNKS_AHEAD  # chunks already made and the one in flight, then nothing
    assert stop(client) == {"state": "idle"}  # nothing left to stop


def test_the_last_status_after_a_stop_or_a_new_generate_says_stopped(connect):
    """Paced, the producer is ahead of playback and mostly waits for its turn, so a stop usually lands between
    chunks rather than on one; the viewer must still hear that the stream stopped."""
    client = connect()
    job = generate(client, chunks=MID_STREAM * 4)
    wait_for_chunk(job, 1)
    stop(client)
    job.result(timeout=PATIENCE)
    assert last_status(job)["state"] == STOPPED
    replaced = generate(client, chunks=MID_STREAM * 4)
    wait_for_chunk(replaced, 1)
    replacing = generate(client, chunks=1)  # the same session's new Generate stops the running stream
    replaced.result(timeout=PATIENCE)
    replacing.result(timeout=PATIENCE)
    assert last_status(replaced)["state"] == STOPPED
    assert [s["state"] for s in statuses(replacing)] == [DONE]


def test_stop_and_switch_take_effect_while_the_queue_is_full(server, monkeypatch):
    """Gradio refuses every call, controls included, once its queue is full, so Generates alone must not fill it."""
    _, service = server
    monkeypatch.setattr(app, "QUEUE_SIZE", 2)  # a full queue with few clients
    streams = service.preset.serving.streams
    demo = app.build_demo(service)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            **app.LAUNCH_OPTIONS)
    clients = [Client(url, verbose=False, download_files=False) for _ in range(streams + app.QUEUE_SIZE + 1)]
    try:
        streaming = [generate(client, chunks=MID_STREAM * 4) for client in clients[:streams]]
        for job in streaming:
            wait_for_chunk(job, 0)
        waiting = [generate(client, chunks=1) for client in clients[streams:-1]]
        wait_until(lambda: all(job.status().code == Status.IN_QUEUE for job in waiting), "the queue to fill")
        with pytest.raises(ValueError, match=f"{app.QUEUE_SIZE} visitors are waiting"):
            generate(clients[-1]).result(timeout=PATIENCE)
        viewer, job = clients[0], streaming[0]
        assert switch(viewer, NEXT_GARMENT)["state"] == SWITCHING
        wait_until(lambda: statuses(job)[-1]["garment_version"] == 1, "the switch to land")
        assert stop(viewer)["state"] == STOPPING
        job.result(timeout=PATIENCE)
        assert last_status(job)["state"] == STOPPED
        stop(clients[1])
        for job in waiting:  # they ran once the streams ended
            job.result(timeout=PATIENCE)
            assert [s["state"] for s in statuses(job)] == [DONE]
    finally:
        with ThreadPoolExecutor() as pool:
            list(pool.map(Client.close, clients))
        demo.close()


def test_two_clients_never_see_each_others_switches(connect):
    first, second = connect(), connect()
    first_job, second_job = generate(first, chunks=MID_STREAM), generate(second, chunks=MID_STREAM)
    wait_for_chunk(first_job, 2)
    wait_for_chunk(second_job, 0)
    switch(first, NEXT_GARMENT)
    first_job.result(timeout=PATIENCE)
    second_job.result(timeout=PATIENCE)
    assert statuses(first_job)[-1]["garment_version"] == 1
    assert [s["garment_version"] for s in statuses(second_job)] == [0] * MID_STREAM
    assert max(s["streams"] for s in statuses(second_job)) == 2  # the status says the model is shared


def test_a_forged_session_hash_can_neither_stop_nor_switch_anothers_stream(connect, server):
    """The session hash is in every stream URL (`/gradio_api/stream/<session_hash>/...`), so anyone holding one can
    send calls as that session; stop and switch also need the stream's key, which no URL holds."""
    url, _ = server
    owner = connect()
    job = generate(owner, chunks=MID_STREAM * 4)
    wait_for_chunk(job, 1)
    fn_index = {d["api_name"]: d["id"] for d in httpx.get(f"{url}config", timeout=PATIENCE).json()["dependencies"]}
    with open(NEXT_GARMENT, "rb") as photo:
        uploaded = httpx.post(f"{url}gradio_api/upload", files={"files": photo}, timeout=PATIENCE).json()[0]
    wrong_key = secrets.token_hex(16)

    def forge(api_name: str, *data) -> None:
        body = {"fn_index": fn_index[api_name], "data": list(data), "session_hash": owner.session_hash}
        httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=PATIENCE).raise_for_status()

    forge("switch_garment", {"path": uploaded, "meta": {"_type": "gradio.FileData"}}, wrong_key)
    forge("stop", wrong_key)
    forged_at = statuses(job)[-1]["chunk"]
    wait_for_chunk(job, forged_at + CHUNKS_AHEAD + 2)  # a stop would have ended it by now, a switch landed
    assert {s["garment_version"] for s in statuses(job)} == {0}
    # Positive control: the owner, with the key, switches and stops.
    assert switch(owner, NEXT_GARMENT)["state"] == SWITCHING
    wait_until(lambda: statuses(job)[-1]["garment_version"] == 1, "the owner's switch to land")
    assert stop(owner)["state"] == STOPPING
    job.result(timeout=PATIENCE)
    assert last_status(job)["state"] == STOPPED


def test_a_switch_without_a_stream_never_decodes_the_photo(connect, monkeypatch):
    opened = []
    original_open = Image.open

    def spy(fp, *args, **kwargs):
        opened.append(Path(fp).name if isinstance(fp, (str, os.PathLike)) else "?")
        return original_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    client = connect()
    with pytest.raises(AppError, match="No stream is running"):
        switch(client, NEXT_GARMENT)
    assert Path(NEXT_GARMENT).name not in opened
    # Positive control: with a stream running, the same request decodes the photo.
    job = generate(client, chunks=MID_STREAM)
    wait_for_chunk(job, 0)
    switch(client, NEXT_GARMENT)
    stop(client)
    job.result(timeout=PATIENCE)
    assert Path(NEXT_GARMENT).name in opened


def test_wardrobe_pick_with_a_bad_index_is_refused_with_a_sentence(server):
    """The wardrobe's select event is private in the API, but the page calls it over HTTP, so anyone can."""
    url, service = server
    _, garments = service.preset.example_inputs()
    config = httpx.get(f"{url}config", timeout=PATIENCE).json()
    fn_index = next(d["id"] for d in config["dependencies"] if d["api_name"] == "pick_garment")

    def pick(index) -> dict:
        body = {"fn_index": fn_index, "data": [], "session_hash": "wardrobe-test",
                "event_data": {"index": index, "value": None, "selected": True}}
        return httpx.post(f"{url}gradio_api/run/predict", json=body, timeout=PATIENCE).json()

    assert pick(1)["data"][0]["path"].endswith(garments[1].name)
    for index in (len(garments), 99, -1, "x", None, 1.0, True):
        assert pick(index)["error"].startswith(f"Pick one of the {len(garments)} wardrobe garments"), index


@pytest.mark.parametrize("text, value", [("", None), ("3", 3), (" 2 ", 2)])
def test_environment_numbers_are_read(monkeypatch, text, value):
    monkeypatch.setenv(app.STREAMS_ENV, text)
    assert env_number(app.STREAMS_ENV, int, 1) == value


@pytest.mark.parametrize("text", ["0", "-1", "abc", "1.5", "nan"])
def test_bad_environment_numbers_are_one_sentence(monkeypatch, text):
    monkeypatch.setenv(app.STREAMS_ENV, text)
    with pytest.raises(UserInputError, match=f"{app.STREAMS_ENV} must be a whole number from 1 up, got '{text}'"):
        env_number(app.STREAMS_ENV, int, 1)
    monkeypatch.setenv(app.PACING_ENV, "-0.5")
    with pytest.raises(UserInputError, match=f"{app.PACING_ENV} must be a number from 0 up"):
        env_number(app.PACING_ENV, float, 0)


def test_python_app_with_a_bad_environment_value_exits_with_one_line():
    env = {**os.environ, app.PRESET_ENV: "tiny", app.STREAMS_ENV: "abc", "GRADIO_ANALYTICS_ENABLED": "False"}
    done = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=PATIENCE)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {app.STREAMS_ENV} must be a whole number from 1 up, got 'abc'."]


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG header claiming `width` x `height`, with almost no pixel data: a decompression bomb's shape."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    valid = Path(GARMENT).read_bytes()
    files = {
        "text.png": b"this is a text file, not an image",
        "truncated.png": valid[: len(valid) // 3],
        "bomb.png": _png_header(30_000, 30_000),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    Image.new("RGB", (8, 8), "red").save(folder / "tiny.png")
    rgb = Image.open(GARMENT).convert("RGB")
    half_transparent = rgb.convert("RGBA")
    half_transparent.putalpha(Image.fromarray(np.full(rgb.size[::-1], 128, np.uint8)))
    half_transparent.save(folder / "rgba.png")
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    return {path.name: str(path) for path in folder.iterdir()}


def messages(job) -> list[str]:
    """The gr.Info / gr.Warning messages a finished job received."""
    async def collect() -> list[str]:
        return [update.log[0] async for update in job if getattr(update, "log", None)]
    return asyncio.run(collect())


def test_bad_inputs_get_messages_while_another_stream_carries_on(connect, server, bad_files, caplog, capfd):
    _, service = server
    caplog.set_level(logging.INFO, logger=app.logger.name)
    bystander_client = connect()
    bystander = generate(bystander_client, chunks=MID_STREAM * 8)  # 40 s: stopped below, once the checks are done
    wait_for_chunk(bystander, 0)
    client = connect()
    refused = [
        (dict(garment=bad_files["text.png"]), "not a readable image"),
        (dict(garment=bad_files["truncated.png"]), "corrupt or truncated"),
        (dict(reference=bad_files["bomb.png"]), "too large"),
        (dict(garment=bad_files["tiny.png"]), "too small"),
        (dict(reference=None), "Add a reference photo"),
        (dict(garment=None), "Add a garment photo"),
        (dict(prompt="walk " * service.max_prompt_chars), "prompt is .* characters long"),
        (dict(chunks=service.max_chunks + 1), "Length must be a whole number"),
        (dict(seed=-1), "Seed must be a whole number"),
        (dict(chunks="abc"), "Length must be a whole number"),  # the API takes any JSON value
        (dict(seed="x"), "Seed must be a whole number"),
        (dict(key="guessable"), "stream key must be a secret text of 16 to 256 characters"),
        (dict(key=None), "stream key must be"),
    ]
    for kwargs, message in refused:
        with pytest.raises(AppError, match=message):
            generate(client, **kwargs).result(timeout=PATIENCE)
    with pytest.raises(AppError, match="No stream is running"):
        switch(client, NEXT_GARMENT)
    with pytest.raises(AppError, match="No stream is running"):  # the stream is looked for first
        switch(client, bad_files["text.png"])
    refusals = [r.getMessage() for r in caplog.records if r.name == app.logger.name]
    assert len(refusals) == len(refused) + 2 and all(r.startswith("refused: ") for r in refusals)
    assert "Traceback" not in capfd.readouterr().err  # one line each, not Gradio's traceback
    converted = [("rgba.png", "has transparency"), ("grey.png", "is greyscale"), ("cmyk.jpg", "is CMYK")]
    for name, message in converted:
        job = generate(client, garment=bad_files[name], chunks=1)
        assert any(message in text for text in messages(job)), name
        assert [s["chunk"] for s in statuses(job)] == [0], name
    assert not bystander.done(), "the bystander's stream ended while the bad inputs were sent"
    stop(bystander_client)
    bystander.result(timeout=PATIENCE)
    seen = statuses(bystander)
    assert [s["chunk"] for s in seen] == list(range(len(seen))) and len(seen) > MID_STREAM


def test_cancel_and_disconnect_clean_up_without_stalling_others(connect, server, monkeypatch):
    _, service = server
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")  # notice the leaver's disconnect quickly
    bystander = generate(connect(), chunks=MID_STREAM)
    probe, leaver = connect(), connect()
    long_stream = MID_STREAM * 4  # 20 s of video: only a cancel or a disconnect ends it within the test
    job = generate(leaver, chunks=long_stream)
    wait_for_chunk(job, 1)
    job.cancel()
    started = time.monotonic()
    assert stop(probe) == {"state": "idle"}  # the server answers others meanwhile
    assert time.monotonic() - started < LEAVE_SECONDS
    wait_for_chunk(generate(leaver, chunks=long_stream), 0)
    leaver.close()  # the heartbeat ends: Gradio closes the stream and runs unload
    left = time.monotonic()
    wait_until(lambda: len(service.sessions) <= 1, "the leaver's stream to end")
    assert time.monotonic() - left < LEAVE_SECONDS
    bystander.result(timeout=PATIENCE)
    assert [s["chunk"] for s in statuses(bystander)] == list(range(MID_STREAM))
    wait_until(lambda: len(service.sessions) == 0, "all streams to end")
    wait_until(lambda: not os.listdir(service.chunk_root), "chunk folders to be deleted")
    assert os.listdir(service.mailbox.root) == []


def test_a_stream_cancelled_before_its_first_chunk_ends_and_frees_the_model(connect, server, monkeypatch):
    """Gradio closes a cancelled generator only if it has yielded: one cancelled while it made its first value was
    left open and unread, its producer waiting to hand over a chunk for good."""
    _, service = server
    arrived = threading.Event()
    original_cancel = gradio.routes.cancel_tasks

    async def cancel_tasks(task_ids):
        arrived.set()
        return await original_cancel(task_ids)

    monkeypatch.setattr(gradio.routes, "cancel_tasks", cancel_tasks)
    client = connect()
    with service._producer._model_lock:  # the stream cannot make its first chunk until the cancel has come
        job = generate(client, chunks=MID_STREAM * 4)
        wait_until(lambda: service.sessions.get(client.session_hash) is not None, "the stream to open")
        canceller = threading.Thread(target=job.cancel)  # /cancel answers once the generator is closed
        canceller.start()
        assert arrived.wait(PATIENCE)
    canceller.join(PATIENCE)
    wait_until(lambda: service.sessions.get(client.session_hash) is None, "the cancelled stream to end")
    wait_until(lambda: not service._threads, "its engine and encoder threads to end")
    later = generate(connect(), chunks=1)  # the next visitor's stream runs
    later.result(timeout=PATIENCE)
    assert [s["state"] for s in statuses(later)] == [DONE]


#: An app server with near-limit uploads: its resident memory when idle, at its peak during a round of them, and after
#: the round. A round is MEMORY_REQUESTS concurrent Generate requests: two check a near-limit garment and stream with it
#: (decoded again there), the others check a near-limit reference and are refused for their garment. A round with small
#: photos first warms sessions, threads and streams.
NEAR_LIMIT_SERVER = r"""
import gc, json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from PIL import Image
import app
from fashionchameleon import media
from fashionchameleon.serving import StreamService
from gradio_client import Client, handle_file

folder, requests = sys.argv[1], int(sys.argv[2])
side = int(media.MAX_IMAGE_PIXELS ** 0.5)
near_limit, not_an_image = os.path.join(folder, "ramp16.png"), os.path.join(folder, "notes.png")
ramp = (np.arange(side, dtype=np.uint32) * 65535 // (side - 1)).astype(np.uint16)
Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(near_limit)  # 16-bit, ~90 KB
open(not_an_image, "w").write("not an image")


def status_mb(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024


def resident_mb():
    gc.collect()
    return status_mb("VmRSS:")


service = StreamService.load("tiny", device="cpu", pacing=0)
demo = app.build_demo(service)
_, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **app.LAUNCH_OPTIONS)
reference, garments = service.preset.example_inputs()
pool = ThreadPoolExecutor(requests)
clients = list(pool.map(lambda _: Client(url, verbose=False, download_files=False), range(requests)))


def send(i, photo):
    photos = (reference, photo) if i < 2 else (photo, not_an_image)
    try:
        clients[i].submit(*map(handle_file, map(str, photos)), "", 1, 0, "k" * 32, api_name="/generate").result()
    except Exception:
        pass


def round_of_requests(photo=near_limit):
    list(pool.map(send, range(requests), [photo] * requests))
    time.sleep(1)  # the streams' threads end
    return resident_mb()


round_of_requests(str(garments[0]))
result = {"idle": resident_mb()}
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from now
result["after"] = round_of_requests()
result["peak"] = status_mb("VmHWM:")
print("RESULT " + json.dumps(result), flush=True)
os._exit(0)
"""
#: Concurrent requests per round of NEAR_LIMIT_SERVER.
MEMORY_REQUESTS = 8
#: The issue's acceptance line: the server's resident memory is back within this of its idle level after near-limit
#: uploads. Measured: -9 to +45 MB after peaks of +360 to +440 MB; +265 MB before the fixes of issue 14. The negative
#: control is the peak, which must pass twice this: a round of small photos peaks at +53 MB and fails it, and coming back
#: from so little would prove nothing. The arm without malloc_trim is not asserted: glibc kept +160 to +340 MB here but
#: once only +42 MB on CI, as it depends on how the decoding threads interleave.
IDLE_RETURN_MB = 100


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads resident memory from Linux /proc")
def test_memory_returns_to_idle_after_near_limit_uploads(tmp_path):
    done = subprocess.run([sys.executable, "-c", NEAR_LIMIT_SERVER, str(tmp_path), str(MEMORY_REQUESTS)], cwd=ROOT,
                          capture_output=True, text=True, timeout=PATIENCE * 4,
                          env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    mb = json.loads(lines[-1].removeprefix("RESULT "))
    assert mb["after"] - mb["idle"] < IDLE_RETURN_MB, mb
    assert mb["peak"] - mb["idle"] > 2 * IDLE_RETURN_MB, mb  # negative control: the round did hold memory


def test_python_app_serves_the_page_and_sigterm_removes_its_files(tmp_path):
    port = free_port()
    temp = tmp_path / "temp"  # where the app makes its folder
    temp.mkdir()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), app.PRESET_ENV: "tiny", "GRADIO_ANALYTICS_ENABLED": "False",
           "TMPDIR": str(temp)}
    log = (tmp_path / "app.log").open("w")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + PATIENCE
        while True:
            assert process.poll() is None, (tmp_path / "app.log").read_text()
            assert time.monotonic() < deadline, "app.py did not start serving"
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert page.status_code == 200
        config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=5).text
        assert "`tiny`" in config and "noise by design" in config
        assert [p.name for p in temp.glob("fashionchameleon-*")]  # the service's folder exists while it serves
        process.send_signal(signal.SIGTERM)  # a Space restarting, `docker stop`
        assert process.wait(PATIENCE) == -signal.SIGTERM  # ended by the signal, as by default
        assert not list(temp.glob("fashionchameleon-*"))
    finally:
        process.kill()
        process.wait(PATIENCE)


def test_a_closed_sessions_video_copies_leave_gradio_cache(connect):
    """Gradio keeps a copy of every file it serves until its sweep; a closed session's copies go at once. (Chunks
    travel inline, as data URLs: no file per chunk.)"""
    client = connect()
    jobs = []
    for chunks in (2, 1):  # one after the other: two videos
        jobs.append(generate(client, chunks=chunks))
        jobs[-1].result(timeout=PATIENCE)
    copies = [Path(video["path"]) for job in jobs for _, video, _ in job.outputs() if isinstance(video, dict)
              and "path" in video]
    assert len(copies) == 2 and all(copy.is_file() for copy in copies)  # served, and kept while the session lives
    bystander = connect()
    kept = generate(bystander, chunks=1)
    kept.result(timeout=PATIENCE)
    client.close()  # the heartbeat ends: Gradio runs unload
    wait_until(lambda: not any(copy.exists() for copy in copies), "the closed session's video copies to go")
    assert Path(kept.outputs()[-1][1]["path"]).is_file()  # another session's copy stays
