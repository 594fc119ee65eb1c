"""The web page at ``/`` of the HTTP port, in a real headless Chromium (selenium).

Submit, watch the progress bar move and a preview appear, cancel a queued job, play the
finished video. Screenshots are saved under ``out/test-artifacts/web/`` (the repository's
ignored ``out`` folder). Chromium and its driver come from the distribution's packages
(``make install`` adds them where apt is available); without them the test is skipped.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

selenium = pytest.importorskip("selenium")
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromedriver are not installed")

ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "test-artifacts" / "web"
TOKEN = "w3b-token"


@pytest.fixture(scope="module")
def page_server(tiny_models):
    from test_serve import LiveServer

    live = LiveServer(tiny_models["t2v"], max_queue=4, tokens=[TOKEN])
    live.start_http()
    yield live
    live.stop()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1400",
                 "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _until(predicate, timeout=90.0, every=0.05):
    """Polls ``predicate`` (a page condition: the browser has no barrier to offer) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def test_web_page_submits_shows_progress_cancels_and_plays(page_server, browser):
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.get(page_server.http_url + "/")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.execute_script("document.getElementById('token').dispatchEvent(new Event('change'))")
    _until(lambda: browser.execute_script("return document.getElementById('model').options.length") == 1)

    def submit(steps, seed):
        for field, value in (("prompt", "a red kite over the sea"), ("size", "64x64"), ("steps", str(steps)),
                             ("seed", str(seed))):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        before = len(browser.find_elements(By.CSS_SELECTOR, ".job"))
        browser.find_element(By.ID, "submit").click()
        _until(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".job")) == before + 1)
        return browser.find_elements(By.CSS_SELECTOR, ".job")[0]  # the newest is on top

    running = submit(120, 3)
    queued = submit(8, 4)
    seen = set()

    def moving():
        value = int(running.find_element(By.TAG_NAME, "progress").get_attribute("value"))
        seen.add(value)
        return len([v for v in seen if 0 < v < 100]) >= 2

    _until(moving)
    preview = _until(lambda: running.find_element(By.CSS_SELECTOR, "img.preview").get_attribute("src"))
    assert preview.startswith("data:image/png;base64,")
    browser.save_screenshot(str(ARTIFACTS / "1-progress-and-preview.png"))

    queued.find_element(By.CSS_SELECTOR, "button.cancel").click()
    _until(lambda: queued.get_attribute("data-status") == "cancelled")
    browser.save_screenshot(str(ARTIFACTS / "2-cancelled.png"))

    _until(lambda: running.get_attribute("data-status") == "completed", timeout=180)
    video = _until(lambda: running.find_elements(By.TAG_NAME, "video"))[0]
    # Playing: the decoder has frames and the clock moves.
    _until(lambda: browser.execute_script("return arguments[0].readyState >= 2", video))
    _until(lambda: browser.execute_script("return arguments[0].currentTime > 0 || arguments[0].ended", video))
    link = running.find_element(By.CSS_SELECTOR, ".result a")
    assert link.get_attribute("download").endswith(".mp4") and link.get_attribute("href").startswith("blob:")
    browser.save_screenshot(str(ARTIFACTS / "3-playing.png"))
    assert sorted(seen)[-1] <= 100 and max(seen) > min(seen)
