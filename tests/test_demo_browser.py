"""The demo page in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`,
installed by `tessera setup browser`) driven by Selenium. It types a prompt, clicks Generate and
checks the image; then it checks that bad input shows its message in the page. Screenshots are
kept in $TESSERA_TEST_ARTIFACTS (default tests/artifacts/)."""
from __future__ import annotations

import io
import os
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from tessera.assets import DEFAULT_MODEL
from test_demo import IMAGE_SIZE, TIMING, running_demo, tiny_models  # noqa: F401 (tiny_models: a fixture)

ARTIFACTS = Path(os.environ.get("TESSERA_TEST_ARTIFACTS", Path(__file__).resolve().parent / "artifacts"))
WAIT_S = 60


@pytest.fixture(scope="module")
def page_url(tiny_models, tmp_path_factory) -> Iterator[str]:  # noqa: F811
    models = [tiny_models["maskgit"], tiny_models["next_token"]]  # MaskGIT first: its steps field is live
    with running_demo(models, 1, tmp_path_factory.mktemp("demo_browser")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from tessera.demo.browser import BrowserSetupError, find_browser
    try:
        chromium, driver = find_browser()
    except BrowserSetupError as err:
        missing = str(err)
    else:
        missing = ""
    if missing:
        pytest.fail(missing, pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(str(driver)), options=options)
    yield chrome
    chrome.quit()


def open_page(browser, url: str):
    """Load the page; returns a waiter (WebDriverWait) once the prompt box is there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(url)
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    return wait


def replace_text(element, text: str) -> None:
    from selenium.webdriver.common.keys import Keys
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.BACKSPACE)
    element.send_keys(text)


def loaded_image(browser):
    """The result image once the browser has loaded it, else False (for WebDriverWait). The image
    is looked up on each try (the page may swap the <img> element after the timing text updates) and
    scrolled into view (a lazily loaded image outside the viewport is never fetched)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    try:
        image = browser.find_element(By.CSS_SELECTOR, "#result img")
        loaded = browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); "
                                        "return arguments[0].complete && arguments[0].naturalWidth", image)
        return image if loaded else False
    except StaleElementReferenceException:
        return False


def toast_texts(browser) -> list[str]:
    """The texts of the error toasts shown, read at once (a toast re-renders while it fades in)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    try:
        return [t.text for t in browser.find_elements(By.CSS_SELECTOR, "[data-testid='toast-text']") if t.text]
    except StaleElementReferenceException:
        return []


def screenshot(browser, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    assert browser.save_screenshot(str(path))
    assert Image.open(path).size[0] > 0
    return path


def test_type_a_prompt_click_generate_and_get_the_image(browser, page_url):
    from selenium.webdriver.common.by import By
    wait = open_page(browser, page_url)
    replace_text(browser.find_element(By.CSS_SELECTOR, "#prompt textarea"), "a red circle")
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    timing = browser.find_element(By.CSS_SELECTOR, "#timing textarea")
    wait.until(lambda b: "generated in" in timing.get_attribute("value"))
    assert TIMING.match(timing.get_attribute("value")) and "(maskgit, seed 0)" in timing.get_attribute("value")
    image = wait.until(loaded_image)
    shown = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert shown == [IMAGE_SIZE, IMAGE_SIZE]
    with urllib.request.urlopen(image.get_attribute("src"), timeout=10) as response:
        pixels = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and pixels.std() > 0  # a picture, not a blank
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1
    screenshot(browser, "demo_screenshot.png")


@pytest.mark.parametrize("prompt, steps, message", [
    ("", "12", "Enter a prompt: maskgit is text-conditional"),
    ("a red circle", "0", "steps=0 is out of range [1, 100]"),
])
def test_invalid_input_shows_its_message_in_the_page(browser, page_url, prompt, steps, message):
    from selenium.webdriver.common.by import By
    wait = open_page(browser, page_url)
    replace_text(browser.find_element(By.CSS_SELECTOR, "#prompt textarea"), prompt)
    replace_text(browser.find_element(By.CSS_SELECTOR, "#steps input"), steps)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    assert wait.until(toast_texts)[0] == message
    assert "Traceback" not in browser.page_source
    screenshot(browser, f"demo_error_{'prompt' if not prompt else 'steps'}.png")


def test_the_shipped_default_model_in_the_page(browser, tmp_path):
    """`tessera demo` with no --ckpt: the shipped default model draws the README's prompt."""
    from selenium.webdriver.common.by import By
    with running_demo([], 1, tmp_path) as url:
        wait = open_page(browser, url)
        replace_text(browser.find_element(By.CSS_SELECTOR, "#prompt textarea"), "a red circle left of a blue square")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        timing = browser.find_element(By.CSS_SELECTOR, "#timing textarea")
        wait.until(lambda b: "generated in" in timing.get_attribute("value"))
        assert f"({DEFAULT_MODEL}, seed 0)" in timing.get_attribute("value")
        image = wait.until(loaded_image)
        assert browser.execute_script("return arguments[0].naturalWidth", image) == 64
        screenshot(browser, "demo_default_model.png")
