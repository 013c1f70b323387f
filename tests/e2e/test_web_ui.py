"""The playground and the dashboard in a real browser: headless Debian Chromium driven by
Playwright against real `ember serve` processes.

Skips (with the reason printed) when Playwright or /usr/bin/chromium is missing; `.ci/run`
installs chromium with apt-get when it can.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import httpx
import openai
import pytest

CHROMIUM = Path("/usr/bin/chromium")
WEB_KEY = "sk-web-e2e"
PHONE = {"width": 390, "height": 844}


def _skip(request: pytest.FixtureRequest, reason: str) -> NoReturn:
    # NOTE: also written to the terminal (past -q and capture): never a silent skip.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\nSKIP browser tests: {reason}", file=sys.stderr, flush=True)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def key_server(server_process, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """An API-key server, started when the module starts so its load overlaps the other tests
    (they use the shared `server`); `wait_ready` is called by the test that needs it."""
    proc = server_process(["--api-key", WEB_KEY, "--seed", "0"],
                         tmp_path_factory.mktemp("web") / "key.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser(request: pytest.FixtureRequest):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip(request, "playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        _skip(request, f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as pw:
        try:
            chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        except Exception as exc:  # noqa: BLE001 - reported as the skip reason
            _skip(request, f"chromium does not start: {exc}")
        request.getfixturevalue("key_server")  # starts loading now, used by the last test
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh tab; `page.errors` collects console errors and uncaught exceptions."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.errors = errors
    yield tab
    context.close()


def _last_answer(tab) -> dict:
    return tab.evaluate("""() => {
        const all = document.querySelectorAll('.msg.assistant, .msg.completion');
        const m = all[all.length - 1];
        if (!m) return {text: '', tokens: 0, figures: '', streaming: false};
        return {text: m.querySelector('.body').textContent,
                tokens: m.querySelectorAll('.tok').length,
                figures: m.querySelector('.figures').textContent,
                streaming: m.classList.contains('streaming')};
    }""")


def _wait_answer_done(tab, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = _last_answer(tab)
        if answer["figures"]:
            return answer
        time.sleep(0.05)
    pytest.fail(f"no finished answer after {timeout_s} s: {_last_answer(tab)}")


def _stats(url: str) -> dict:
    return httpx.get(f"{url}/stats", timeout=10).json()


def _tile(tab, metric: str) -> float | None:
    raw = tab.get_attribute(f'.tile[data-metric="{metric}"]', "data-value")
    return float(raw) if raw else None


def test_pages_load_without_console_errors_and_fit_a_phone(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    assert page.title() == "Ember playground"
    assert page.evaluate("document.activeElement.id") == "prompt"
    assert page.is_hidden("#error")
    page.goto(server.url + "/dashboard")
    page.wait_for_function("() => !!document.querySelector('.tile[data-metric=\"gen_tps\"]')"
                           ".dataset.value")
    assert page.inner_text("#status").startswith("ready")
    page.set_viewport_size(PHONE)
    for path in ("/dashboard", "/"):
        page.goto(server.url + path)
        page.wait_for_timeout(300)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} scrolls sideways at phone width by {overflow}px"
    assert page.errors == []


def test_chat_streams_tokens_incrementally_with_probabilities(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    page.fill("#max_tokens", "240")
    page.fill("#seed", "0")
    page.check("#ignore_eos")
    page.fill("#system", "You are a storyteller.")
    page.click("#prompt")
    page.keyboard.type("Tell me a long story")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    page.keyboard.type("about the sea.")
    assert page.input_value("#prompt") == "Tell me a long story\nabout the sea."
    assert page.locator(".msg").count() == 0
    page.keyboard.press("Enter")

    lengths: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = _last_answer(page)
        if answer["figures"]:
            break
        if answer["tokens"] and (not lengths or answer["tokens"] != lengths[-1]):
            lengths.append(answer["tokens"])
        time.sleep(0.02)
    assert len(lengths) >= 3, f"tokens did not arrive incrementally: {lengths}"
    assert lengths == sorted(lengths)
    answer = _last_answer(page)
    assert answer["tokens"] == 240  # one coloured span per token (logprobs on by default)
    assert "TTFT" in answer["figures"] and "tokens/s" in answer["figures"]
    assert "240 completion tokens" in answer["figures"] and "finish: length" in answer["figures"]

    page.hover(".msg.assistant .tok >> nth=3")
    page.wait_for_selector("#tooltip:not([hidden])")
    assert page.locator("#tooltip tr").count() == 5  # top alternatives (5 by default)

    # multi-turn and regenerate: the history is sent again, the last answer is replaced
    page.fill("#max_tokens", "8")
    page.fill("#prompt", "And then?")
    page.click("#send")
    _wait_answer_done(page)
    assert page.locator(".msg.user").count() == 2
    assert page.locator(".msg.assistant").count() == 2
    page.click("#regenerate")
    page.wait_for_timeout(100)
    answer = _wait_answer_done(page)
    assert page.locator(".msg.assistant").count() == 2
    assert "8 completion tokens" in answer["figures"]
    assert page.errors == []


def test_completion_mode_and_clear_errors(server, page):
    page.goto(server.url + "/")
    page.check('input[name="mode"][value="completion"]')
    assert page.is_hidden("#system-block")
    page.fill("#max_tokens", "12")
    page.fill("#prompt", "The capital of France is")
    page.click("#send")
    answer = _wait_answer_done(page)
    assert answer["tokens"] == 12 or "finish: stop" in answer["figures"]
    assert page.inner_text(".msg.prompt .body") == "The capital of France is"
    # a bad value is answered with the server's OpenAI error message, not a blank
    page.fill("#temperature", "5")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "HTTP 400" in page.inner_text("#error") and "temperature" in page.inner_text("#error")


def test_stop_aborts_the_request_and_frees_the_kv_cache(server, page, metric):
    aborted = metric(server.url, "ember:num_aborted_requests_total")
    page.goto(server.url + "/")
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    page.fill("#max_tokens", "2000")
    page.check("#ignore_eos")
    page.fill("#prompt", "Count from one to a thousand.")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant .tok').length >= 5")
    assert _stats(server.url)["kv_cache_usage"] > 0
    page.keyboard.press("Escape")
    answer = _wait_answer_done(page, timeout_s=10)
    assert "stopped" in answer["figures"] and 5 <= answer["tokens"] < 2000
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stats = _stats(server.url)
        if (metric(server.url, "ember:num_aborted_requests_total") > aborted
                and stats["running"] == 0 and stats["kv_cache_usage"] == 0):
            break
        time.sleep(0.1)
    assert metric(server.url, "ember:num_aborted_requests_total") > aborted
    assert stats["aborted"] > aborted
    assert stats["running"] == 0 and stats["kv_cache_usage"] == 0, stats
    assert page.errors == []


def test_dashboard_moves_under_load(server, page):
    page.goto(server.url + "/dashboard")
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('ready')")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    stop = threading.Event()
    finished = [0, 0, 0]

    def load(slot: int) -> None:
        # Requests run back to back until the dashboard has shown enough polls, so a fast
        # machine cannot finish the whole load between two polls (the test measures the page,
        # not the engine's speed).
        while not stop.is_set():
            client.completions.create(model="", prompt="Once upon a time", max_tokens=120,
                                      extra_body={"ignore_eos": True})
            finished[slot] += 1

    threads = [threading.Thread(target=load, args=(slot,)) for slot in range(3)]
    for thread in threads:
        thread.start()
    seen: dict[str, list[float]] = {"generation_tokens": [], "gen_tps": [], "running": []}
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and (len(seen["generation_tokens"]) < 4
                                               or max(seen["running"], default=0) < 1):
            for name, values in seen.items():
                value = _tile(page, name)
                if value is not None and (not values or value != values[-1]):
                    values.append(value)
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    page.wait_for_timeout(1500)  # one more poll after the load
    generated = seen["generation_tokens"]
    assert len(generated) >= 3 and generated == sorted(generated), generated
    assert max(seen["gen_tps"]) > 0 and max(seen["running"]) >= 1, seen
    # After the load the tile shows the server's own counter: every finished request counted.
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    counter = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("ember:generation_tokens_total"))
    assert sum(finished) >= 3 and counter >= generated[-1]
    assert _tile(page, "generation_tokens") == counter
    assert _tile(page, "ttft") is not None and _tile(page, "itl") is not None
    assert page.errors == []


def test_api_key_server_rejects_the_page_without_the_key(key_server, browser):
    key_server.wait_ready()
    context = browser.new_context()
    page = context.new_page()
    page.goto(key_server.url + "/")  # the page itself is open without --auth-all-endpoints
    page.wait_for_selector("#error:not([hidden])")
    assert "HTTP 401" in page.inner_text("#error")
    page.fill("#prompt", "Hello")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('401')")
    assert page.locator(".msg.assistant").count() == 0

    page.fill("#api-key", "wrong-key")
    page.keyboard.press("Tab")  # commits the field (change event)
    page.wait_for_function(
        "() => document.querySelector('#error').textContent.includes('incorrect API key')")
    page.fill("#api-key", WEB_KEY)
    page.keyboard.press("Tab")
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    assert page.is_hidden("#error")
    page.fill("#max_tokens", "8")
    page.fill("#prompt", "Hello")
    page.click("#send")
    answer = _wait_answer_done(page)
    assert answer["tokens"] >= 1 and "failed" not in answer["figures"]

    page.goto(key_server.url + "/dashboard")  # the key follows the tab, not the browser
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('ready')")
    assert page.input_value("#api-key") == WEB_KEY
    assert page.evaluate("localStorage.length") == 0
    fresh = context.new_page()
    fresh.goto(key_server.url + "/dashboard")
    fresh.wait_for_selector("#error:not([hidden])")
    assert "HTTP 401" in fresh.inner_text("#error")
    context.close()
