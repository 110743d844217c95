"""The page in a real browser: upload photos, generate, switch mid-stream, and watch the video play.

Playwright drives Debian's chromium (it plays H.264 through MSE; Playwright's own builds may not, and are never
downloaded here: no `playwright install`). Skipped only when that chromium is missing.
"""

import re
import shutil
import socket
from pathlib import Path

import pytest

import app
from fashionchameleon.serving import StreamService
from helpers import GARMENTS, REFERENCE

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--autoplay-policy=no-user-gesture-required"]
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason="Debian chromium is not installed (apt-get install chromium)")

GARMENT = GARMENTS[0]
#: 10 s of video: time to see it play, switch, and see it play on.
CHUNKS = 20
#: Milliseconds to wait for the page, the first frames, or a switch (generous: CI machines are slow).
PATIENCE_MS = 60_000
#: Seconds of playback that count as "playing" (more than one 0.5 s chunk).
PLAYED_SECONDS = 1.0

VIDEO_PLAYS = """([after, played]) => {
  const video = document.querySelector('#video video');
  return video !== null && video.readyState >= 2 && video.currentTime > after + played;
}"""
VIDEO_TIME = "() => document.querySelector('#video video').currentTime"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    service = StreamService.load("tiny", root=tmp_path_factory.mktemp("streams"))
    demo = app.build_demo(service)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            **app.LAUNCH_OPTIONS)
    yield url
    demo.close()
    service.shutdown()


def test_upload_generate_switch_and_play(url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(PATIENCE_MS)
            console = []
            page.on("console", lambda message: console.append(message.text))
            page.goto(url)
            expect(page.locator("#banner")).to_contain_text("noise by design")

            page.locator("#reference input[type=file]").set_input_files(REFERENCE)
            page.locator("#garment input[type=file]").set_input_files(GARMENT)
            expect(page.locator("#reference img")).to_be_visible()
            expect(page.locator("#garment img")).to_be_visible()
            chunks = page.locator("#chunks input[type=number]")
            chunks.fill(str(CHUNKS))
            chunks.press("Enter")
            page.click("#generate")

            page.wait_for_function(VIDEO_PLAYS, arg=[0, PLAYED_SECONDS])
            expect(page.locator("#status-line")).to_contain_text("garment v0")
            expect(page.locator("#status-line")).to_contain_text(f"/ {CHUNKS}")

            page.locator("#wardrobe .thumbnail-item").nth(1).click()  # pick a garment from the wardrobe
            expect(page.locator("#next-garment img")).to_have_attribute("src", re.compile(Path(GARMENTS[1]).name))
            page.click("#switch")
            expect(page.locator("#status-line")).to_contain_text("garment v1")
            page.wait_for_function(VIDEO_PLAYS, arg=[page.evaluate(VIDEO_TIME), PLAYED_SECONDS])

            page.screenshot(path=tmp_path / "app.png", full_page=True)
            assert (tmp_path / "app.png").stat().st_size > 0
            # Fatal only: a loaded machine may stall playback for a moment (hls.js logs that as non-fatal).
            assert not [m for m in console if m.startswith("HLS error")], console
        finally:
            browser.close()
