"""The page in a real browser: upload photos, generate, switch mid-stream, and see the new garment on the player.

`python app.py` on `mini` (paced to real time) driven by Playwright and Debian's chromium, through the code of
`scripts/live_latency.py`, which measures the same things at length. What is on screen is read from the player's
canvas by colour. Skipped only when that chromium is missing. No timing is asserted: the numbers are printed (and
live in the README, from the script); what is asserted is that things show up, in the right order.
"""

import importlib.util
from pathlib import Path

import pytest
from helpers import ROOT

_spec = importlib.util.spec_from_file_location("live_latency", ROOT / "scripts/live_latency.py")
live = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(live)

pytestmark = pytest.mark.skipif(not Path(live.CHROMIUM).is_file(),
                                reason="Debian chromium is not installed (apt-get install chromium)")
A, B = live.SWITCH_PAIR


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with live.app_server("mini") as url, sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=live.CHROMIUM, headless=True,
                                              args=live.CHROMIUM_FLAGS)
        yield chromium, url
        chromium.close()


def test_generate_switch_back_and_a_same_garment_control_on_screen(browser):
    """One stream of the measurement: from garment A, switch to B, back to A, then to A again (the control)."""
    chromium, url = browser
    page = live.LivePage(chromium, url)
    try:
        result = live.one_stream(page, switches=2)
        print(result)
        samples = page.samples()  # once: the stream may still draw a frame or two after its stop
        shown = [live.shown_garment(s["counts"]) for s in samples]
        assert shown[0] == live.WARDROBE.index(A)  # the stream starts in garment A, drawn on the canvas
        assert all(s is not None for s in result["switch_s"]), shown  # each switch shows its garment
        assert all(s is not None for s in result["switch_changed_s"])  # the control's detector sees real switches
        assert result["control_changed_s"] == [None]  # and registers nothing for a switch to the same garment
        assert result["first_frame_s"] > 0 and result["frames_shown"] > 0
        assert [s["shown"] for s in samples] == list(range(1, len(samples) + 1))  # every drawn frame looked at
        page.page.locator("#status-line").filter(has_text="garment v3").wait_for()
        download = page.page.locator("#stream-file a").first  # the whole stream, playable, once it has ended
        download.wait_for()
        assert download.get_attribute("href").endswith("-stream.mp4")
        assert not [m for m in page.console if m.startswith("error")], page.console
        # The way to gradio_client's docs (Gradio itself hides it on phone-wide screens).
        assert page.page.locator("footer").get_by_text("Use via API").is_visible()
    finally:
        page.close()


def test_after_the_page_could_not_play_the_player_rejoins_the_live_edge(browser):
    """A page that cannot play for a while (a hidden tab, a busy page) gets the chunks that came meanwhile all at
    once; played at 1x they would delay every later switch by as long. The player drops that backlog instead."""
    chromium, url = browser
    page = live.LivePage(chromium, url)
    try:
        page.generate(A)
        page.wait(1.5)
        page.page.evaluate("() => { const end = performance.now() + 3500; while (performance.now() < end) {} }")
        page.wait(0.5)
        click = page.switch(B)
        page.wait(live.CONTROL_SECONDS)
        assert page.stats()["skipped"] > 0
        shown = live.switch_seconds(page.samples(), click, live.WARDROBE.index(B))
        assert shown is not None, "the switch waited behind the backlog"  # without the skip: about 3.5 s late
        page.stop()
    finally:
        page.close()


@pytest.mark.parametrize("viewport", sorted(live.VIEWPORTS))
def test_video_wardrobe_and_switch_fit_one_screen(browser, viewport, tmp_path):
    chromium, url = browser
    page = live.LivePage(chromium, url, live.VIEWPORTS[viewport])
    try:
        page.generate(A, example=True)  # an example's button fills both photos without moving the page
        page.switch(B)
        page.wait(1.0)
        layout = page.layout()
        page.page.screenshot(path=tmp_path / f"{viewport}.png")
        print(f"screenshot: {tmp_path / f'{viewport}.png'}; layout {layout}")
        assert all(box["visible"] for box in layout.values()), layout
        player = layout["player"]
        scale = player["width"] / player["frame_width"]
        assert scale == int(scale) >= 2 and player["height"] == scale * player["frame_height"]  # whole factor
        assert player["rendering"] == "pixelated"  # nearest neighbour: the small frames stay sharp
        page.stop()
    finally:
        page.close()
