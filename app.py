"""FashionChameleon Space: stream a try-on video and switch the garment while it plays.

Wiring only: components, events with chosen API names, queue and concurrency groups, examples. Streams, the
per-session mailbox, pacing and cleanup live in `fashionchameleon.serving`; the model in `fashionchameleon.engine`;
what the page offers for a model (examples, streams at once, default length) in its preset.

Environment:
  FASHIONCHAMELEON_PRESET      model preset (default: the package default)
  FASHIONCHAMELEON_CHECKPOINT  weights for that preset
  FASHIONCHAMELEON_PACING      playback speed output is paced to (1 = real time, 0 = no pacing)
  FASHIONCHAMELEON_STREAMS     streams generated at once (default: the preset's; model calls interleave by chunk)
  GRADIO_SERVER_NAME / GRADIO_SERVER_PORT   where to listen (default 127.0.0.1:7860)
A bad value stops the app before the model loads: one line on stderr and exit code 2, as in the CLI.

API (gradio_client; one Client is one session):
  /generate(reference, garment, prompt, chunks, seed, key) -> streamed (frames, video, status): a "starting" status
      alone first; per chunk its `frames` (a PNG or JPEG data URL of the chunk's frames stacked top to bottom, with
      their count and fps) and status; at the end the whole stream's H.264 mp4 as `video`, with the last status
      ("done" or "stopped"). A stream runs until /stop, up to `chunks` (at most the cap the page shows).
  /switch_garment(garment, key) -> status      /stop(key) -> status
`key` is a secret the caller makes (16 to 256 characters, e.g. `secrets.token_hex(16)`) and sends with all three: stop
and switch act only on the session's stream made with the same key. The session hash cannot serve, as it is in every
stream URL (`/gradio_api/stream/<session_hash>/...`) and Gradio keeps a session's `gr.State` by it; the page makes its
key in the browser, so the key never travels from the server.
"""

import spaces  # noqa: I001 - first: on ZeroGPU it patches torch before anything touches CUDA

import logging
import os
import signal
import sys
from pathlib import Path

import gradio as gr

from fashionchameleon.errors import UserInputError
from fashionchameleon.presets import CHECKPOINT_ENV, DEFAULT_PRESET
from fashionchameleon.serving import IDLE, STARTING, StreamService
from fashionchameleon.serving.checks import env_number

PRESET_ENV = "FASHIONCHAMELEON_PRESET"
PACING_ENV = "FASHIONCHAMELEON_PACING"
STREAMS_ENV = "FASHIONCHAMELEON_STREAMS"
#: Generate requests allowed to wait for a free stream; ZeroGPU silently makes an unset queue size 1.
QUEUE_SIZE = 16
#: Places the queue keeps beyond the waiting Generates for stop and switch: Gradio refuses every call once its queue is
#: full, and gradio_client sends every call through the queue, `queue=False` ones included.
CONTROL_ROOM = 16
#: Photos larger than this are refused at upload (decompression bombs are caught later, by pixel count).
MAX_UPLOAD = "20mb"
#: Pixel heights that keep the video, the wardrobe and Switch on one screen (1280 x 800 desktop, 390 x 844 phone); the
#: player's own height is set in player.js.
PHOTO_HEIGHT, NEXT_GARMENT_HEIGHT, WARDROBE_HEIGHT = 200, 110, 110
#: Shown in the prompt box; within every preset's prompt limit (mini's is 32 characters).
PROMPT_PLACEHOLDER = "a person turns slowly"
#: Gradio's cache (uploads and the copies it serves of per-chunk files) is swept every 5 minutes of files older than 15:
#: long enough for a photo uploaded now to be used for a stream of up to `budget.MAX_GPU_SECONDS` some minutes later.
#: A session's chunk copies go sooner, when it closes (`StreamService.close_session`); uploads only by this sweep.
CACHE_SWEEP = (300, 900)

CSS = """
#player-box { display: flex; justify-content: center; align-items: center; min-height: 12em; position: relative; }
#player-canvas { background: var(--block-background-fill); }
#player-box .player-note { position: absolute; color: var(--body-text-color-subdued); }
#player-box.playing .player-note { display: none; }
#status-line { min-height: 2.5em; }
#wardrobe .grid-container {  /* one row of equal columns however narrow the screen */
  grid-template-columns: none !important; grid-auto-flow: column; grid-auto-columns: minmax(0, 1fr);
}
@media (max-width: 640px) {
  #live { min-height: 100vh; }  /* stacked under the inputs: Generate can bring it to the top of the screen */
  #wardrobe-hint { display: none; }
}
"""
#: The page's player (see the file); it lives in the page's <head>.
PLAYER_JS = (Path(__file__).parent / "player.js").read_text()
PLAYER_HTML = """<div id="player-box"><canvas id="player-canvas" width="48" height="64"></canvas>
<span class="player-note">The video plays here.</span></div>"""
#: Hands each chunk to the player as it arrives (no server round trip).
PUSH_FRAMES_JS = "(frames) => { window.FashionChameleonPlayer.push(frames); }"
#: On a narrow screen the inputs sit above the player: bring the player into view when Generate is pressed.
SHOW_PLAYER_JS = """
(...inputs) => {
  const live = document.querySelector("#live");
  const box = live ? live.getBoundingClientRect() : null;
  if (box && (box.top < 0 || box.top > window.innerHeight / 2)) live.scrollIntoView({block: "start"});
  return inputs;
}
"""
#: Renders the status JSON as one line in the browser (no server round trip per chunk).
STATUS_LINE_JS = """
(s) => {
  if (!s || !s.state) return "";
  if (s.state === "idle") return "No stream is running.";
  const parts = [`**${s.state}**`];
  if (s.chunk !== undefined) {
    parts.push(`chunk ${s.chunk + 1} / ${s.chunks}`, `garment v${s.garment_version}`,
               `${s.fps} fps generated, plays at ${s.playback_fps} fps`);
    if (s.streams > 1) parts.push(`${s.streams} streams share the model`);
    if (s.state === "streaming" && s.fps < s.playback_fps) {
      parts.push(`generation is slower than playback${s.streams > 1 ? " (the streams take turns)" : ""}: ` +
                 "the video pauses while it catches up");
    }
  }
  return parts.join(" · ");
}
"""
#: Makes the page's stream key: 128 random bits as hex (`crypto.getRandomValues` works on plain http too).
NEW_KEY_JS = """
() => Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("")
"""
LAUNCH_OPTIONS = dict(max_file_size=MAX_UPLOAD, theme=gr.themes.Soft(), css=CSS, head=f"<script>{PLAYER_JS}</script>")

logger = logging.getLogger(__name__)


def uploaded(image: dict | None) -> str | None:
    """The file behind an image input of an event with `preprocess=False`: Gradio has moved it into its cache and
    checked where it came from, but not opened it, so `fashionchameleon.media` judges it (gr.Image's own
    preprocessing opens and converts the file, turning corrupt files and bombs into a generic error)."""
    return image["path"] if image else None


def refuse(error: UserInputError) -> gr.Error:
    """The page shows the sentence; the log gets one line for it, not Gradio's traceback."""
    logger.info("refused: %s", error)
    return gr.Error(str(error), print_exception=False)


def garment_name(path: Path) -> str:
    return path.stem.removeprefix("garment_").replace("_", " ")


def banner(service: StreamService) -> str:
    preset = service.preset
    text = f"## FashionChameleon: live try-on\n**Model:** `{preset.name}`: {preset.description}."
    if preset.random_weights:
        text += ("\n\n> This preset has **random weights**: the video is noise by design. It exercises the whole "
                 "streaming path (chunks, garment switching, pacing) without a trained model.")
    if preset.serving.notice:
        text += f"\n\n> {preset.serving.notice}"
    return text


def build_demo(service: StreamService, streams: int | None = None) -> gr.Blocks:
    """The page; `streams` is how many sessions may generate at once (default: the preset's)."""
    serving = service.preset.serving
    streams = streams or serving.streams
    gpu_produce = spaces.GPU(duration=service.gpu_duration)(service.produce)

    def generate(reference: dict, garment: dict, prompt: str, chunks: int, seed: int, key: str,
                 request: gr.Request):
        """Stream a try-on video: per chunk its frames and a status; at the end the whole stream as an mp4."""
        reference, garment = uploaded(reference), uploaded(garment)
        try:
            key = service.check_key(key)
            notes = service.check_image(reference, "reference photo") + service.check_image(garment, "garment photo")
            prompt, chunks, seed = service.check_request(prompt, chunks, seed)
        except UserInputError as error:
            raise refuse(error) from None
        for note in notes:
            gr.Info(note)
        # Yield before the stream starts: Gradio can close a generator only once it has yielded, and a cancel that
        # comes while the first value is made would leave the stream open, unread and never closed.
        yield gr.skip(), None, {"state": STARTING}  # None: the previous stream's video goes
        try:
            for frames, whole, status in service.stream(request.session_hash, reference, garment, prompt, chunks,
                                                        seed, producer=gpu_produce, key=key):
                if frames is not None and status["chunk"] == 0 and status["removed_words"]:
                    gr.Warning(f"Garment words were removed from the prompt ({', '.join(status['removed_words'])}): "
                               "the garment photo decides what is worn.")
                yield gr.skip() if frames is None else frames, gr.skip() if whole is None else whole, status
        except UserInputError as error:
            raise refuse(error) from None

    def admit(*inputs: object) -> list[dict]:
        """Gradio's validator, run before a Generate joins the queue: refused while QUEUE_SIZE Generates wait, so
        that the queue's last CONTROL_ROOM places stay free for stop and switch. (`len` of the queue counts the
        calls waiting in it; stop and switch never wait, having no concurrency limit.)"""
        verdicts = [gr.validate(True, "")] * len(inputs)  # the inputs themselves are judged by `generate`
        if len(demo._queue) >= QUEUE_SIZE:
            message = f"{QUEUE_SIZE} visitors are waiting for a stream already; try again in a minute."
            logger.info("refused: %s", message)
            verdicts[0] = gr.validate(False, message)
        return verdicts

    def switch_garment(garment: dict, key: str, request: gr.Request) -> dict:
        """Switch the running stream to this garment at its next chunk."""
        try:
            status, notes = service.switch(request.session_hash, uploaded(garment), key=key)
        except UserInputError as error:
            raise refuse(error) from None
        for note in notes:
            gr.Info(note)
        return status

    def stop(key: str, request: gr.Request) -> dict:
        """End the running stream at its next chunk."""
        status = service.stop(request.session_hash, key=key)
        if status["state"] == IDLE:
            gr.Warning("No stream is running.")
        return status

    def close_session(request: gr.Request) -> None:
        service.close_session(request.session_hash, cache=demo.GRADIO_CACHE)

    example_reference, garments = service.preset.example_inputs()

    def pick_garment(event: gr.SelectData) -> str:
        """The wardrobe garment clicked. Private in the API, yet callable over HTTP with any index."""
        if type(event.index) is not int or not 0 <= event.index < len(garments):
            raise refuse(UserInputError(f"Pick one of the {len(garments)} wardrobe garments: an index from 0 to "
                                        f"{len(garments) - 1}, got {event.index!r}."))
        return str(garments[event.index])

    cap = f"{service.max_chunks * service.chunk_seconds:.0f} s"
    with gr.Blocks(title="FashionChameleon", delete_cache=CACHE_SWEEP) as demo:
        gr.Markdown(banner(service), elem_id="banner")
        with gr.Row(equal_height=False):
            with gr.Column(min_width=320, elem_id="inputs"):
                with gr.Row():
                    reference = gr.Image(label="Person", type="filepath", elem_id="reference", height=PHOTO_HEIGHT)
                    garment = gr.Image(label="Garment", type="filepath", elem_id="garment", height=PHOTO_HEIGHT)
                gr.Examples([[str(example_reference), str(g)] for g in garments], [reference, garment],
                            label="Examples (run on the loaded model)", examples_per_page=len(garments),
                            example_labels=[f"person in {garment_name(g)}" for g in garments])
                prompt = gr.Textbox(label="Prompt (motion and scene)", max_length=service.max_prompt_chars,
                                    placeholder=PROMPT_PLACEHOLDER[:service.max_prompt_chars],
                                    info=f"Up to {service.max_prompt_chars} characters. {serving.prompt_note}".strip(),
                                    elem_id="prompt")
                with gr.Row():
                    chunks = gr.Slider(1, service.max_chunks, value=service.max_chunks, step=1,
                                       label=f"Length in chunks of {service.chunk_seconds:g} s",
                                       info=f"Streams until Stop, at most {service.max_chunks} chunks ({cap}): the cap "
                                            "for shared hardware.", elem_id="chunks")
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="seed")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                key = gr.Textbox(visible=False, elem_id="stream-key")  # set in the browser at load: NEW_KEY_JS
            with gr.Column(min_width=320, elem_id="live"):
                gr.HTML(PLAYER_HTML, elem_id="player")
                frames = gr.JSON(visible="hidden", label="frames", elem_id="frames")
                status_line = gr.Markdown("Add a person and a garment, then press Generate.", elem_id="status-line")
                status = gr.JSON(visible="hidden", label="status", elem_id="status")
                gr.Markdown("**Wardrobe**: pick one (or upload a next garment), then Switch while it plays.",
                            elem_id="wardrobe-hint")
                wardrobe = gr.Gallery([(str(g), garment_name(g)) for g in garments], show_label=False,
                                      columns=len(garments), rows=1, height=WARDROBE_HEIGHT, object_fit="contain",
                                      allow_preview=False, elem_id="wardrobe")
                with gr.Row(equal_height=True):
                    next_garment = gr.Image(label="Next garment", type="filepath", elem_id="next-garment",
                                            height=NEXT_GARMENT_HEIGHT, min_width=120)
                    with gr.Column(min_width=120):
                        switch_button = gr.Button("Switch garment", variant="primary", elem_id="switch")
                        stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                video = gr.File(label="The whole stream (H.264 mp4, when it ends)", elem_id="stream-file")

        demo.load(None, None, [key], js=NEW_KEY_JS, api_visibility="private")
        generate_button.click(generate, [reference, garment, prompt, chunks, seed, key], [frames, video, status],
                              api_name="generate", concurrency_id="gpu", concurrency_limit=streams,
                              validator=admit, preprocess=False, show_progress="hidden", js=SHOW_PLAYER_JS)
        switch_button.click(switch_garment, [next_garment, key], [status], api_name="switch_garment",
                            concurrency_id="control", concurrency_limit=None, preprocess=False, show_progress="hidden")
        stop_button.click(stop, [key], [status], api_name="stop", concurrency_id="control", concurrency_limit=None,
                          show_progress="hidden")
        wardrobe.select(pick_garment, None, [next_garment], queue=False, api_visibility="private",
                        show_progress="hidden")
        frames.change(None, [frames], None, js=PUSH_FRAMES_JS, api_visibility="private")
        status.change(None, [status], [status_line], js=STATUS_LINE_JS, api_visibility="private")
        demo.unload(close_session)
    return demo.queue(max_size=QUEUE_SIZE + CONTROL_ROOM, default_concurrency_limit=None)


def remove_files_on_sigterm(service: StreamService) -> None:
    """SIGTERM (a Space restarting, `docker stop`) ends the process without running `finally` blocks: delete the
    service's files first, then end by the signal as its default action would. Only in this process: ZeroGPU's
    workers are forked from it and share the folder."""
    server = os.getpid()

    def on_sigterm(signum: int, frame: object) -> None:
        if os.getpid() == server:
            service.shutdown()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's calls to itself at start-up
    try:
        streams, pacing = env_number(STREAMS_ENV, int, 1), env_number(PACING_ENV, float, 0)
        service = StreamService.load(os.environ.get(PRESET_ENV, DEFAULT_PRESET), os.environ.get(CHECKPOINT_ENV),
                                     pacing=1.0 if pacing is None else pacing)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    remove_files_on_sigterm(service)
    demo = build_demo(service, streams=streams)
    try:
        demo.launch(**LAUNCH_OPTIONS)
    finally:
        service.shutdown()


if __name__ == "__main__":
    main()
