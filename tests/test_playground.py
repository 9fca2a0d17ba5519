"""The web playground in a real browser: headless Chromium, driven by Selenium, against a real
router and workers on the tiny model.

Chromium and its driver are Debian packages that `tests/setup_system_packages.sh` installs (the
test command runs it); when they are missing these tests fail, they never skip: a skipped browser
test would let a broken page pass CI.

Set PLAYGROUND_SCREENSHOT=docs/playground.png to refresh the screenshot in the docs; otherwise the
screenshot of the finished generation goes to the test's temporary folder.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.helpers import b64_image, open_image, png

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parent.parent
GENERATION_TIMEOUT = 60  # seconds for one 256x256 image with 4 steps on the tiny model

# Records every change of a result card's progress bars: the bar moving is observed in the page
# itself, however fast the generation, instead of being sampled by polling from the test.
WATCH_PROGRESS_BARS = """
window.barHistory = [];
new MutationObserver((mutations) => {
  for (const m of mutations) {
    if (m.target.tagName === "PROGRESS") window.barHistory.push([m.target.className, m.target.value, m.target.max]);
  }
}).observe(document.getElementById("results"), {attributes: true, subtree: true, attributeFilter: ["value", "max"]});
"""

# Drops files on the drop zone as a user's drag and drop does: a `drop` event carrying them.
DROP_FILES = """
const [zone, files] = arguments;
const transfer = new DataTransfer();
for (const [name, b64] of files) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  transfer.items.add(new File([bytes], name, {type: "image/png"}));
}
zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
"""

# The bytes behind a link (the download), as base64, read by the page itself.
FETCH_AS_B64 = """
const [url, done] = arguments;
fetch(url).then((r) => r.blob()).then((blob) => {
  const reader = new FileReader();
  reader.onload = () => done(reader.result.split(",")[1]);
  reader.readAsDataURL(blob);
}).catch((err) => done("error: " + err));
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> WebDriver:
    """Headless Chromium on loopback only, with a fresh profile."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: run tests/setup_system_packages.sh "
                    "(Debian packages chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never looks for (or downloads) a driver.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def open_playground(browser: WebDriver, url: str) -> None:
    """Load the page and wait until it has read the server's limits (the presets are filled)."""
    browser.get(url)
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "preset").get_attribute("value"))


def fill(browser: WebDriver, element_id: str, text: str) -> None:
    element = browser.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(text)


def fill_form(browser: WebDriver, prompt: str, size: str, steps: int = 4, partials: int = 2, seed: int = 5) -> None:
    fill(browser, "prompt", prompt)
    Select(browser.find_element(By.ID, "preset")).select_by_value(size)
    fill(browser, "steps", str(steps))
    fill(browser, "seed", str(seed))
    Select(browser.find_element(By.ID, "partials")).select_by_value(str(partials))


def loaded_images(browser: WebDriver, selector: str) -> list[WebElement]:
    """The <img> elements matching `selector` whose image has been decoded."""
    return [img for img in browser.find_elements(By.CSS_SELECTOR, selector)
            if img.is_displayed() and browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)]


def wait_for_final_image(browser: WebDriver) -> WebElement:
    """The final image of the first card, once shown; fails early with the page's error if one appears."""
    def final_or_error(b: WebDriver):
        error = b.find_element(By.ID, "error")
        if error.is_displayed():
            raise AssertionError(f"the page shows an error: {error.text}")
        images = loaded_images(b, ".card .view img.is-final")
        return images[0] if images else False
    return WebDriverWait(browser, GENERATION_TIMEOUT).until(final_or_error)


def natural_size(browser: WebDriver, img: WebElement) -> tuple[int, int]:
    return tuple(browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img))


def downloaded_image(browser: WebDriver, link: WebElement):
    """The image behind a download link, fetched by the page."""
    b64 = browser.execute_async_script(FETCH_AS_B64, link.get_attribute("href"))
    assert not b64.startswith("error"), b64
    return b64_image(b64)


def javascript_errors(browser: WebDriver) -> list[str]:
    """Uncaught errors the page logged (network 4xx lines are the server answering, not page bugs)."""
    return [entry["message"] for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE" and entry.get("source") != "network"]


def test_page_and_limits_are_served(cluster):
    page = httpx.get(cluster.url + "/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    # Everything the page loads comes from this server: no CDN, works offline.
    for asset in ("/playground/static/playground.js", "/playground/static/playground.css"):
        assert asset in page.text
        assert httpx.get(cluster.url + asset, timeout=10).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text
    limits = httpx.get(cluster.url + "/playground/limits", timeout=10).json()
    assert limits["default_size"] in limits["presets"]
    assert "256x256" in limits["presets"] and "2048x2048" in limits["presets"]
    assert limits["num_inference_steps"] == 4  # the tiny stage config's DiT default


def test_generation_shows_progress_partial_previews_and_the_final_image(cluster, browser, tmp_path):
    open_playground(browser, cluster.url)
    fill_form(browser, 'a red cube, "GLM" written on it', "256x256", steps=4, partials=2)
    # The preset filled the steppers, which stay within the limits in steps of 32.
    width = browser.find_element(By.ID, "width")
    assert (width.get_attribute("value"), browser.find_element(By.ID, "height").get_attribute("value")) == ("256", "256")
    assert (width.get_attribute("step"), width.get_attribute("min"), width.get_attribute("max")) == ("32", "256", "2048")
    browser.execute_script(WATCH_PROGRESS_BARS)
    browser.find_element(By.ID, "generate").click()

    # A progress bar moves while the image is made...
    WebDriverWait(browser, GENERATION_TIMEOUT).until(lambda b: b.execute_script(
        "return [...document.querySelectorAll('.card progress')].some((bar) => bar.value > 0)"))
    # ... partial previews arrive before the final image ...
    partial = WebDriverWait(browser, GENERATION_TIMEOUT).until(lambda b: loaded_images(b, ".card .partials img.partial"))
    assert natural_size(browser, partial[0]) == (256, 256)
    # ... and the final image comes at the chosen size, with a download link to it.
    final = wait_for_final_image(browser)
    assert natural_size(browser, final) == (256, 256)
    link = browser.find_element(By.CSS_SELECTOR, ".card a.download")
    assert link.is_displayed() and link.get_attribute("download").endswith(".png")
    downloaded = downloaded_image(browser, link)
    assert downloaded.format == "PNG" and downloaded.size == (256, 256)

    history = browser.execute_script("return window.barHistory")
    for stage in ("bar-ar", "bar-dit"):
        values = [value for name, value, _ in history if name == stage]
        assert values, f"the {stage} bar never changed: {history}"
        # It moved through values short of full, then ended full.
        top = max(bar_max for name, _, bar_max in history if name == stage)
        assert any(0 < value < top for value in values), f"{stage} jumped straight to the end: {values}"
        assert values[-1] == top
    dit_values = [value for name, value, _ in history if name == "bar-dit"]
    assert dit_values == sorted(dit_values), f"the DiT bar went backwards: {dit_values}"
    # Up to the 2 asked for (a preview is dropped rather than delay the stream under back-pressure).
    assert 1 <= len(browser.find_elements(By.CSS_SELECTOR, ".card .partials img.partial")) <= 2
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert "done in" in browser.find_element(By.ID, "status").text
    assert javascript_errors(browser) == []

    screenshot = Path(os.environ.get("PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    if not screenshot.is_absolute():
        screenshot = ROOT / screenshot
    browser.execute_script("window.scrollTo(0, 0)")  # clicking Generate scrolled the page
    assert browser.save_screenshot(str(screenshot))
    assert open_image(screenshot.read_bytes()).format == "PNG"


def test_invalid_sizes_are_refused_with_the_servers_message(cluster, browser):
    open_playground(browser, cluster.url)
    fill(browser, "prompt", "a blue sphere")
    # The steppers are checked in the page: nothing is sent.
    fill(browser, "width", "1000")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 10).until(lambda b: error.is_displayed())
    assert "multiples of 32" in error.text
    assert browser.find_elements(By.CSS_SELECTOR, ".card") == []

    # A custom size goes to the server as typed; the page shows the server's refusal.
    fill(browser, "custom-size", "1000x1000")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 30).until(lambda b: "nearest valid size is 992x992" in error.text)
    assert error.text.startswith("400: size 1000x1000 is not supported")
    assert browser.find_elements(By.CSS_SELECTOR, ".card") == []
    assert browser.find_element(By.ID, "generate").is_enabled()
    assert javascript_errors(browser) == []


def test_dropped_condition_image_makes_an_edit(cluster, browser):
    open_playground(browser, cluster.url)
    fill(browser, "prompt", "the same, in green")
    zone = browser.find_element(By.ID, "drop")
    condition = base64.b64encode(png(320, 320, color=(30, 160, 60))).decode()
    browser.execute_script(DROP_FILES, zone, [["green.png", condition]])
    WebDriverWait(browser, 10).until(lambda b: loaded_images(b, "#thumbs img"))
    # "auto" (the first condition image's size) is offered once there is a condition image.
    Select(browser.find_element(By.ID, "preset")).select_by_value("auto")
    fill(browser, "steps", "2")
    Select(browser.find_element(By.ID, "partials")).select_by_value("1")
    browser.find_element(By.ID, "generate").click()
    final = wait_for_final_image(browser)
    assert natural_size(browser, final) == (320, 320)
    assert javascript_errors(browser) == []


def test_stop_ends_a_running_generation(cluster, browser):
    open_playground(browser, cluster.url)
    fill_form(browser, "a long one", "1024x1024", steps=50, partials=0)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, GENERATION_TIMEOUT).until(lambda b: b.execute_script(
        "return [...document.querySelectorAll('.card progress')].some((bar) => bar.value > 0)"))
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "status").text == "stopped")
    assert browser.find_element(By.ID, "generate").is_enabled()
    assert browser.find_elements(By.CSS_SELECTOR, ".card.failed")
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert javascript_errors(browser) == []


BIG_SEED = "9007199254740993"  # 2^53 + 1: a JavaScript number (a double) would make it ...992


def test_a_seed_beyond_2_53_is_sent_shown_and_reused_exactly(cluster, browser):
    open_playground(browser, cluster.url)
    # The page's own JSON helpers: seeds are digit strings both ways, whatever else the JSON holds.
    parsed = browser.execute_script(
        'return parseJson(arguments[0])',
        '{"seed": 9007199254740993, "seeds": [9223372036854775807, 1], "n": 2, '
        '"prompt": "say \\"seed\\": 5", "b64_json": "QUJD"}')
    assert parsed == {"seed": BIG_SEED, "seeds": ["9223372036854775807", "1"], "n": 2, "prompt": 'say "seed": 5',
                      "b64_json": "QUJD"}
    assert browser.execute_script('return requestJson({prompt: "a", n: 1, seed: arguments[0]})', BIG_SEED) == \
        '{"prompt":"a","n":1,"seed":9007199254740993}'

    fill_form(browser, "an exact seed", "256x256", steps=1, partials=0, seed=int(BIG_SEED))
    browser.find_element(By.ID, "generate").click()
    wait_for_final_image(browser)
    # The server reports the seed it used: shown as sent, so it was sent exactly and read back exactly.
    title = browser.find_element(By.CSS_SELECTOR, ".card .title").text
    assert title.endswith(f"seed {BIG_SEED}"), title
    assert f"seed{BIG_SEED}." in browser.find_element(By.CSS_SELECTOR, ".card a.download").get_attribute("download")
    first = downloaded_image(browser, browser.find_element(By.CSS_SELECTOR, ".card a.download")).tobytes()

    # "Use this seed" puts the exact digits back in the field, and they make the same image again.
    fill(browser, "seed", "1")
    browser.find_element(By.CSS_SELECTOR, ".card .reuse-seed").click()
    assert browser.find_element(By.ID, "seed").get_attribute("value") == BIG_SEED
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, GENERATION_TIMEOUT).until(
        lambda b: b.find_element(By.ID, "status").text.startswith("done"))
    assert browser.find_element(By.CSS_SELECTOR, ".card .title").text.endswith(f"seed {BIG_SEED}")
    assert downloaded_image(browser, browser.find_element(By.CSS_SELECTOR, ".card a.download")).tobytes() == first
    assert javascript_errors(browser) == []
