"""The chat page at `/` in a real headless browser (the system's chromium, driven by selenium through
chromedriver): it loads and lists the model with no API key field, a prompt streams an answer in with
its tokens/s, Stop ends the answer (and the request on the server), and a server error is shown.

Without chromium, chromedriver or selenium the module is skipped, unless `GPTSERVE_REQUIRE_BROWSER` is
set (as `.ci/run` does once it has installed both): then every test fails with the reason."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.clients.conftest import MAX_LEN, MODEL
from tests.server.conftest import ServerProcess

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

CHROMIUM = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
CHROMEDRIVER = shutil.which("chromedriver")
REQUIRE_BROWSER = os.environ.get("GPTSERVE_REQUIRE_BROWSER", "") not in ("", "0")


def missing() -> str | None:
    """Why this module cannot drive a browser here, or None."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
    if webdriver is None:
        return "needs selenium (pip install selenium)"
    return None


if missing() and not REQUIRE_BROWSER:
    pytest.skip(missing(), allow_module_level=True)

WAIT_S = 60


@pytest.fixture(scope="module")
def browser() -> Iterator:
    reason = missing()
    if reason:
        pytest.fail(f"GPTSERVE_REQUIRE_BROWSER is set, but the browser test {reason}", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,800"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, tiny_server: ServerProcess):
    browser.get(f"{tiny_server.url}/")
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.find_element(By.ID, "model").get_attribute("value") == MODEL
    )
    return browser


def element(driver, id_: str):
    return driver.find_element(By.ID, id_)


def fill(driver, id_: str, value: str) -> None:
    field = element(driver, id_)
    field.clear()
    field.send_keys(value)


def answers(driver) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")]


def running_requests(server: ServerProcess) -> float:
    metrics = httpx.get(f"{server.url}/metrics").text
    line = next(m for m in metrics.splitlines() if m.startswith("vllm:num_requests_running"))
    return float(line.rsplit(" ", 1)[1])


def test_page_loads_without_a_key_field(page):
    assert page.title == "gptserve chat"
    assert not element(page, "api-key-field").is_displayed()  # the server has no API key
    assert not element(page, "error").is_displayed()
    assert element(page, "send").is_enabled() and not element(page, "stop").is_enabled()


def test_prompt_streams_an_answer(page, tiny_server):
    fill(page, "temperature", "0")
    fill(page, "max-tokens", "24")
    fill(page, "prompt", "Hello there")
    element(page, "send").click()
    WebDriverWait(page, WAIT_S).until(
        lambda d: "tokens/s" in element(d, "status").text and element(d, "send").is_enabled()
    )
    assert element(page, "status").text.startswith("24 tokens · ")
    (answer,) = answers(page)
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 24,
        "temperature": 0,
    }
    expected = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=chat, timeout=60).json()
    assert answer.strip() == expected["choices"][0]["message"]["content"].strip()
    user = page.find_elements(By.CSS_SELECTOR, "#messages .message.user")
    assert [u.text for u in user] == ["Hello there"]


def test_stop_ends_the_answer(page, tiny_server):
    fill(page, "max-tokens", "3000")
    fill(page, "prompt", "Tell me everything")
    element(page, "send").click()
    WebDriverWait(page, WAIT_S).until(lambda d: len((answers(d) or [""])[-1]) > 20)
    element(page, "stop").click()
    WebDriverWait(page, WAIT_S).until(lambda d: element(d, "status").text.startswith("stopped"))
    stopped = answers(page)[-1]
    time.sleep(1.0)
    assert answers(page)[-1] == stopped, "the answer grew after Stop"
    assert "stopped" in page.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1].get_attribute("class")
    assert element(page, "send").is_enabled() and not element(page, "stop").is_enabled()
    deadline = time.monotonic() + 10
    while running_requests(tiny_server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_requests(tiny_server) == 0, "Stop should cancel the request on the server"


def test_server_error_is_shown(page):
    fill(page, "max-tokens", str(MAX_LEN + 1))
    fill(page, "prompt", "Hi")
    element(page, "send").click()
    WebDriverWait(page, WAIT_S).until(lambda d: element(d, "error").is_displayed())
    message = element(page, "error").text
    assert "maximum context length" in message
    failed = page.find_elements(By.CSS_SELECTOR, ".message.assistant.failed")
    assert failed and "maximum context length" in failed[-1].text
    assert element(page, "status").text == "error" and element(page, "send").is_enabled()
