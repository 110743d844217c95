"""Click to screen on the app's page in headless chromium: Generate to the first frame, Switch to the new garment.

    python scripts/live_latency.py --streams 8 --switches 2 --json live.json [--visitors 2] [--screenshots DIR]

Starts `python app.py` on the `mini` preset, paced to real time, and drives its page with Playwright and Debian's
chromium (`apt-get install chromium`; never `playwright install`). What is on screen is read where the viewer sees
it: on every animation frame that draws a new video frame, the page counts the player canvas's pixels near each
wardrobe garment's colours; a frame shows garment g when g has the most such pixels and at least `MIN_PIXELS`.

- first frame: from the Generate click to the first frame drawn;
- switch: from the Switch click to the first drawn frame that shows the asked-for garment, when the garment shown at
  the click was another one and the next `STEADY_FRAMES` frames show the new one too;
- negative control: a switch to the garment already shown must show no other garment within `CONTROL_SECONDS`;
- stalls: frames that came more than a frame period after their time (the player counts them), per stream.

Each stream switches between two plain garments of the wardrobe (`SWITCH_PAIR`), whose colours the mini model
renders apart, with `GAP_SECONDS` between clicks, and back (see `one_stream`). Results: one JSON with every stream's
numbers and the summary; `--screenshots` also writes the page at 1280 x 800 and 390 x 844 while it plays.
`tests/test_browser.py` runs the same code, shorter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "fashionchameleon/assets/world"
REFERENCE = WORLD / "reference.png"
WARDROBE = sorted(WORLD.glob("garment_*.png"))  # the app's wardrobe order
#: Two wardrobe garments the mini model renders in clearly different colours: a blue tee, whose colour holds, and a
#: mauve one, whose colour drifts towards orange after a second or two (the mini model's drift), so the negative
#: control switches to the blue one only.
SWITCH_PAIR = (WORLD / "garment_solid_2.png", WORLD / "garment_solid_3.png")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-background-timer-throttling", "--disable-renderer-backgrounding"]
VIEWPORTS = {"desktop": (1280, 800), "phone": (390, 844)}
#: A canvas pixel is near a garment when within this RGB distance of one of its colours (the model's colours are near
#: the flat lay's, not equal).
COLOUR_DISTANCE = 60
#: Pixels near a garment's colours for a frame to show it (a 48 x 64 frame's tee covers about 250).
MIN_PIXELS = 60
#: Frames after the first that must show the new garment too (one stray frame is not a switch).
STEADY_FRAMES = 3
#: How long a switch may take to show before it counts as not shown; the negative control waits this long. Switches
#: show within 0.6 s; a longer window lets the mini model's own drift register (on a busy machine a control once
#: registered 2.5 s after its click: the colour the model locks into after its third switch, issue 12).
CONTROL_SECONDS = 1.5
#: Seconds between clicks: past the longest switch, so that each starts from a settled garment.
GAP_SECONDS = 2.5
#: Milliseconds Playwright waits for the page to react.
PATIENCE_MS = 60_000

SAMPLER_JS = """
([palettes, distance]) => {
  window.__clicks = [];
  window.__samples = [];
  for (const id of ["generate", "switch"]) {
    document.querySelector(`#${id}`).addEventListener("click",
      () => window.__clicks.push({id, t: performance.now()}), {capture: true});
  }
  let shown = 0;
  const limit = distance * distance;
  function sample(now) {
    const stats = window.FashionChameleonPlayer.stats;
    const canvas = document.querySelector("#player-canvas");
    if (stats.framesShown !== shown && canvas) {
      shown = stats.framesShown;
      const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      const counts = palettes.map(() => 0);
      for (let p = 0; p < pixels.length; p += 4) {
        palettes.forEach((colours, g) => {
          for (const [r, gr, b] of colours) {
            const dr = pixels[p] - r, dg = pixels[p + 1] - gr, db = pixels[p + 2] - b;
            if (dr * dr + dg * dg + db * db < limit) { counts[g] += 1; break; }
          }
        });
      }
      window.__samples.push({t: now, shown, counts, version: stats.garmentVersion});
    }
    requestAnimationFrame(sample);
  }
  requestAnimationFrame(sample);
}
"""


def palette(path: Path) -> list[list[int]]:
    """A flat-lay garment's colours: every non-white colour of its image."""
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    colours = np.unique(pixels[(pixels != 255).any(axis=1)], axis=0)
    return colours.tolist()


def shown_garment(counts: list[int]) -> int | None:
    """The wardrobe index a frame shows, or None when no garment has enough pixels."""
    best = int(np.argmax(counts))
    return best if counts[best] >= MIN_PIXELS else None


def switch_seconds(samples: list[dict], click: float, target: int) -> float | None:
    """Seconds from `click` (page ms) to the first frame showing `target` for STEADY_FRAMES more frames, when the
    frame on screen at the click did not show it; None if it does not come within CONTROL_SECONDS or the frame at the
    click showed `target` already (a switch to the same garment cannot register)."""
    before = [s for s in samples if s["t"] <= click]
    if not before or shown_garment(before[-1]["counts"]) == target:
        return None
    after = [s for s in samples if click < s["t"] <= click + CONTROL_SECONDS * 1000]
    shows = [shown_garment(s["counts"]) for s in after]
    for i in range(len(after) - STEADY_FRAMES):
        if all(g == target for g in shows[i:i + STEADY_FRAMES + 1]):
            return (after[i]["t"] - click) / 1000
    return None


def changed_seconds(samples: list[dict], click: float) -> float | None:
    """Seconds from `click` to the first frame showing a garment other than the one at the click, steadily (as in
    `switch_seconds`), or None: what the negative control looks for."""
    before = [s for s in samples if s["t"] <= click]
    if not before:
        return None
    at_click = shown_garment(before[-1]["counts"])
    after = [s for s in samples if click < s["t"] <= click + CONTROL_SECONDS * 1000]
    shows = [shown_garment(s["counts"]) for s in after]
    for i in range(len(after) - STEADY_FRAMES):
        window = shows[i:i + STEADY_FRAMES + 1]
        if window[0] not in (None, at_click) and all(g == window[0] for g in window):
            return (after[i]["t"] - click) / 1000
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def app_server(preset: str = "mini", streams: int | None = None):
    """`python app.py` on `preset`, paced to real time, until the block ends; yields its URL."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "FASHIONCHAMELEON_PRESET": preset,
           "FASHIONCHAMELEON_PACING": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if streams is not None:
        env["FASHIONCHAMELEON_STREAMS"] = str(streams)
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if "Running on local URL" in line:
                break
        else:
            raise RuntimeError(f"app.py ended before serving (exit code {server.wait()})")
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


class LivePage:
    """One visitor: a page of the app in its own browser context (its own Gradio session)."""

    def __init__(self, browser, url: str, viewport: tuple[int, int] = VIEWPORTS["desktop"]) -> None:
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.page = self.context.new_page()
        self.page.set_default_timeout(PATIENCE_MS)
        self.console: list[str] = []
        self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        self.page.goto(url)
        self.page.wait_for_function("() => window.FashionChameleonPlayer && document.querySelector('#generate')")
        self.page.evaluate(SAMPLER_JS, [[palette(p) for p in WARDROBE], COLOUR_DISTANCE])

    def generate(self, garment: Path, chunks: int | None = None, example: bool = False) -> float:
        """Upload the example person and `garment` (or click their example), press Generate; seconds to the first
        frame on screen."""
        page = self.page
        if example:
            page.get_by_text(f"person in {garment.stem.removeprefix('garment_').replace('_', ' ')}").click()
        else:
            page.locator("#reference input[type=file]").set_input_files(REFERENCE)
            page.locator("#garment input[type=file]").set_input_files(garment)
        page.locator("#reference img").wait_for()
        page.locator("#garment img").wait_for()
        if chunks is not None:
            field = page.locator("#chunks input[type=number]")
            field.fill(str(chunks))
            field.press("Enter")
        clicks = self.clicks()
        page.click("#generate")
        page.wait_for_function(f"() => window.__clicks.length > {len(clicks)}")
        click = self.clicks()[-1]["t"]
        page.wait_for_function(f"() => (window.FashionChameleonPlayer.stats.firstFrameAt || 0) > {click}")
        return (self.stats()["firstFrameAt"] - click) / 1000

    def switch(self, garment: Path) -> float:
        """Pick `garment` in the wardrobe and press Switch; returns the click's page time (ms)."""
        page = self.page
        page.locator("#wardrobe .thumbnail-item").nth(WARDROBE.index(garment)).click()
        page.wait_for_function("(name) => (document.querySelector('#next-garment img') || {}).src?.includes(name)",
                               arg=garment.name)
        count = len(self.clicks())
        page.click("#switch")
        page.wait_for_function(f"() => window.__clicks.length > {count}")
        return self.clicks()[-1]["t"]

    def wait(self, seconds: float) -> None:
        self.page.wait_for_timeout(seconds * 1000)

    def clicks(self) -> list[dict]:
        return self.page.evaluate("() => window.__clicks")

    def samples(self) -> list[dict]:
        return self.page.evaluate("() => window.__samples")

    def stats(self) -> dict:
        return self.page.evaluate("() => window.FashionChameleonPlayer.stats")

    def stop(self) -> None:
        self.page.click("#stop")
        self.page.locator("#status-line").filter(has_text="stopped").wait_for()

    def layout(self) -> dict:
        """Where the player, the wardrobe and the Switch button are, and whether each is wholly in the viewport."""
        boxes = {}
        size = self.page.viewport_size
        for name, selector in (("player", "#player-canvas"), ("wardrobe", "#wardrobe"), ("switch", "#switch")):
            box = self.page.locator(selector).bounding_box()
            boxes[name] = {**box, "visible": box["y"] >= 0 and box["y"] + box["height"] <= size["height"]
                           and box["x"] >= 0 and box["x"] + box["width"] <= size["width"]}
        canvas = self.page.evaluate("() => { const c = document.querySelector('#player-canvas');"
                                    " return [c.width, c.height, getComputedStyle(c).imageRendering]; }")
        boxes["player"].update(frame_width=canvas[0], frame_height=canvas[1], rendering=canvas[2])
        return boxes

    def close(self) -> None:
        self.context.close()


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def one_stream(page: LivePage, switches: int = 2) -> dict:
    """A stream from garment A with `switches` timed switches A <-> B and, each time A is back on, a same-garment
    control (to A); stopped at the end. (The mini model follows two switches in a stream reliably; in the paper's
    `full` mode it stops following after two or three, which issue 12 is about: keep `switches` at 2 to time the
    serving path, not that.)"""
    a, b = SWITCH_PAIR
    first = page.generate(a)
    page.wait(GAP_SECONDS)
    current, clicks = a, []
    for _ in range(switches):
        current = b if current == a else a
        clicks.append(("switch", page.switch(current), WARDROBE.index(current)))
        page.wait(GAP_SECONDS)
        if current == a:
            clicks.append(("control", page.switch(a), WARDROBE.index(a)))
            page.wait(CONTROL_SECONDS)
    samples, stats = page.samples(), page.stats()
    page.stop()
    return {
        "first_frame_s": first,
        "switch_s": [switch_seconds(samples, t, g) for kind, t, g in clicks if kind == "switch"],
        # The control's detector on the real switches: it must fire there (its positive control).
        "switch_changed_s": [changed_seconds(samples, t) for kind, t, g in clicks if kind == "switch"],
        "control_changed_s": [changed_seconds(samples, t) for kind, t, g in clicks if kind == "control"],
        "stalls": stats["stalls"], "stall_ms": round(stats["stallMs"]), "frames_shown": stats["framesShown"],
        "frames_skipped": stats["skipped"],  # the player jumped to the live edge (it could not play for a while)
    }


def summary(streams: list[dict]) -> dict:
    switches = [s for r in streams for s in r["switch_s"]]
    shown = [s for s in switches if s is not None]
    controls = [c for r in streams for c in r["control_changed_s"]]
    firsts = [r["first_frame_s"] for r in streams]
    return {
        "first_frame_s": {"median": statistics.median(firsts), "max": max(firsts), "n": len(firsts)},
        "switch_s": {"median": percentile(shown, 50), "p95": percentile(shown, 95), "max": max(shown, default=None),
                     "shown": len(shown), "n": len(switches)},
        "control_registered": sum(c is not None for c in controls), "controls": len(controls),
        "stalls": sum(r["stalls"] for r in streams), "stall_ms": sum(r["stall_ms"] for r in streams),
        "frames_shown": sum(r["frames_shown"] for r in streams),
        "frames_skipped": sum(r["frames_skipped"] for r in streams),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8, help="streams, one after another (default 8)")
    parser.add_argument("--switches", type=int, default=2, help="timed switches per stream (default 2)")
    parser.add_argument("--visitors", type=int, default=1, help="visitors streaming at once, each its own session")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--screenshots", type=Path, help="write the page at both sizes, playing, into this folder")
    args = parser.parse_args()
    if not Path(CHROMIUM).is_file():
        print("error: Debian chromium is not installed (apt-get install chromium)", file=sys.stderr)
        raise SystemExit(2)
    from concurrent.futures import ThreadPoolExecutor

    from playwright.sync_api import sync_playwright

    report: dict = {"preset": args.preset, "visitors": args.visitors, "load_before": os.getloadavg()}
    with app_server(args.preset, streams=max(args.visitors, 1) if args.visitors > 1 else None) as url:
        if args.screenshots:
            report["layout"] = screenshots(url, args.screenshots)

        def visitor(index: int) -> list[dict]:
            with sync_playwright() as playwright:  # one driver per thread: Playwright's sync API is not thread-safe
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
                page = LivePage(browser, url)
                try:
                    time.sleep(index * 1.0)  # visitors start apart, as people do
                    return [one_stream(page, args.switches) for _ in range(args.streams)]
                finally:
                    browser.close()

        with ThreadPoolExecutor(args.visitors) as pool:
            results = list(pool.map(visitor, range(args.visitors)))
    report["load_after"] = os.getloadavg()
    report["per_visitor"] = [{"summary": summary(streams), "streams": streams} for streams in results]
    report["summary"] = summary([s for streams in results for s in streams])
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    print(json.dumps(report["summary"], indent=1))


def screenshots(url: str, folder: Path) -> dict:
    """The page at each viewport while it plays, after a switch: screenshots and where things are."""
    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    layout = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            for name, viewport in VIEWPORTS.items():
                page = LivePage(browser, url, viewport)
                page.generate(SWITCH_PAIR[0])
                page.wait(1.0)
                page.switch(SWITCH_PAIR[1])
                page.wait(1.5)
                layout[name] = page.layout()
                page.page.screenshot(path=folder / f"{name}.png")
                page.stop()
                page.close()
        finally:
            browser.close()
    return layout


if __name__ == "__main__":
    main()
