"""``quantduo serve`` in a real headless Chromium (selenium + Debian's chromium-driver): type a prompt, click
Generate, wait for the picture, check it is the library's picture for that seed; screenshots in out/ui/."""
from __future__ import annotations

import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest

webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from .helpers import library_digit, model_pixels  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
OUT = Path(__file__).resolve().parents[2] / "out" / "ui"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1500")

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromium-driver")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="quantduo-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _fill(driver, elem_id: str, text: str) -> None:
    """Type into the input/textarea of a Gradio component."""
    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    field.clear()
    field.send_keys(text)


def _image_src(driver, elem_id: str) -> str | None:
    imgs = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
    return imgs[0].get_attribute("src") if imgs else None


def test_generate_in_browser(server, browser):
    url, cache = server
    OUT.mkdir(parents=True, exist_ok=True)
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(EC.element_to_be_clickable((By.ID, "generate")))
    _fill(browser, "prompt", "digit 3")
    _fill(browser, "seed", "11")
    _fill(browser, "steps", "12")
    browser.find_element(By.CSS_SELECTOR, "#compare input").click()
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: _image_src(d, "image") and "done" in d.find_element(By.ID, "image-status").text)
    wait.until(lambda d: _image_src(d, "reference"))
    browser.save_screenshot(str(OUT / "image_tab.png"))
    png = urllib.request.urlopen(_image_src(browser, "image"), timeout=30).read()
    assert np.array_equal(model_pixels(png), library_digit(3, 11, 12, "int4", cache))
    ref = urllib.request.urlopen(_image_src(browser, "reference"), timeout=30).read()
    assert np.array_equal(model_pixels(ref), library_digit(3, 11, 12, "bf16", cache))
    assert "PSNR vs bf16" in browser.find_element(By.ID, "image-metrics").text


def test_bad_input_in_browser(server, browser):
    browser.get(server[0])
    wait = WebDriverWait(browser, 60)
    wait.until(EC.element_to_be_clickable((By.ID, "generate")))
    _fill(browser, "prompt", "digit 3")
    _fill(browser, "size", "9")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: "not a multiple of" in d.find_element(By.TAG_NAME, "body").text)
    browser.save_screenshot(str(OUT / "bad_size.png"))


def test_long_context_in_browser(server, browser):
    browser.get(server[0])
    wait = WebDriverWait(browser, 120)
    wait.until(EC.element_to_be_clickable((By.ID, "generate")))
    browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Long context')]").click()
    wait.until(EC.element_to_be_clickable((By.ID, "example"))).click()
    wait.until(lambda d: "expected answer" in d.find_element(By.ID, "llm-status").text)
    expected = browser.find_element(By.ID, "llm-status").text.split("answer is")[1].strip()
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda d: "done" in d.find_element(By.ID, "llm-status").text)
    answers = [browser.find_element(By.CSS_SELECTOR, f"#{k} textarea").get_attribute("value")
               for k in ("duo-answer", "full-answer")]
    browser.save_screenshot(str(OUT / "long_context_tab.png"))
    assert answers[1].startswith(expected.split(" .")[0]), (answers, expected)
    assert "KV cache" in browser.find_element(By.ID, "duo-metrics").text
