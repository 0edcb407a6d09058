"""The chat page starts from the served model's default sampling values (its `generation_config.json`,
as `/v1/models` reports them), shows where they come from, and sends what its fields hold, min-p and
the repetition penalty included. Skipped like `test_web_page` without a browser."""

from __future__ import annotations

import httpx

from tests.clients import test_web_page as web
from tests.clients.test_web_page import WAIT_S, answers, browser, element, fill  # noqa: F401
from tests.server.test_generation_defaults_api import CONFIG, MODEL, server  # noqa: F401

FIELDS = {"temperature": "temperature", "top_p": "top-p", "min_p": "min-p",
          "repetition_penalty": "repetition-penalty"}  # fmt: skip


def test_page_shows_the_server_defaults_and_sends_its_fields(browser, server):  # noqa: F811
    browser.get(f"{server.url}/")
    web.WebDriverWait(browser, WAIT_S).until(lambda d: element(d, "temperature").get_attribute("value") != "")
    assert element(browser, "model").get_attribute("value") == MODEL
    shown = {key: float(element(browser, id_).get_attribute("value")) for key, id_ in FIELDS.items()}
    assert shown == {key: CONFIG[key] for key in FIELDS}
    assert element(browser, "defaults-source").text.endswith("generation_config.json")

    fill(browser, "seed", "4")
    fill(browser, "max-tokens", "12")
    fill(browser, "repetition-penalty", "1")
    fill(browser, "prompt", "Hello there")
    element(browser, "send").click()
    web.WebDriverWait(browser, WAIT_S).until(
        lambda d: "tokens/s" in element(d, "status").text and element(d, "send").is_enabled()
    )
    (answer,) = answers(browser)
    fields = {**{key: CONFIG[key] for key in FIELDS}, "repetition_penalty": 1.0}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12,
            "seed": 4, **fields}  # fmt: skip
    expected = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60).json()
    assert answer.strip() == expected["choices"][0]["message"]["content"].strip()
    assert browser.find_elements(web.By.CSS_SELECTOR, "#messages .message.user")
