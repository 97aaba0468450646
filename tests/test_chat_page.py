"""The chat page at / of `llmforge serve`, driven in headless Chromium against a real server.

The tiny random-weight model answers gibberish, but deterministic gibberish at temperature 0 (or
with a seed), so what the page streams must equal the server's own non-streamed answer. Its
greedy answer is a run of special tokens, which decode to "", so the turns that check text use a
seed at temperature 1 instead, where the answer has real characters.
"""

from __future__ import annotations

import contextlib
import re
import shutil

import httpx
import pytest

from llmforge.serve.launch import launch_server

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium binary on PATH "
                                "(Debian's /usr/bin/chromium) for Playwright")

MAX_TOKENS = 20
SEED = 1234
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def server(tiny_chat_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("chat_page") / "serve.log"
    with launch_server(tiny_chat_model, log=log, threads=1) as server:
        yield server.url


@pytest.fixture
def open_page(browser):
    """open_page(url) -> a fresh page (its own local storage) at url, checked for JS errors."""
    contexts, errors = [], []

    def open_(url: str):
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        return page

    yield open_
    for c in contexts:
        c.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def model_name(url: str, key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def answer(url: str, messages: list[dict], *, temperature: float = 0, seed: int | None = None,
           max_tokens: int = MAX_TOKENS) -> tuple[str, str]:
    """The server's non-streamed answer: (text, finish_reason)."""
    body = {"model": model_name(url), "messages": messages, "temperature": temperature,
            "top_p": 1, "max_tokens": max_tokens}
    if seed is not None:
        body["seed"] = seed
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json=body)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def set_sampling(page, *, temperature: float = 0, seed: int | None = None,
                 max_tokens: int = MAX_TOKENS) -> None:
    page.fill("#temperature", str(temperature))
    page.fill("#top-p", "1")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#seed", "" if seed is None else str(seed))


def say(page, text: str, *, enter: bool = True):
    """Send `text`; the finished assistant message (data-finish-reason set)."""
    from playwright.sync_api import expect

    before = page.locator("#messages .message.assistant").count()
    page.fill("#prompt", text)
    if enter:
        page.press("#prompt", "Enter")
    else:
        page.click("#send")
    reply = page.locator("#messages .message.assistant").nth(before)
    expect(reply).to_have_attribute("data-finish-reason", re.compile(r"\w+"))
    return reply


def content(message) -> str:
    return message.locator(".content").text_content()


def captured_requests(page) -> list:
    """The page's chat completion requests, as Playwright requests, in order."""
    requests: list = []
    page.on("request", lambda r: requests.append(r)
            if r.url.endswith("/v1/chat/completions") and r.method == "POST" else None)
    return requests


def test_streamed_reply_equals_greedy_answer(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server)
    name = model_name(server)
    expect(page.locator("#model-name")).to_have_text(name)
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#stop")).to_be_hidden()
    set_sampling(page, temperature=0)
    requests = captured_requests(page)
    reply = say(page, "Hello world, say hi")
    expect(page.locator("#messages .message.user .content")).to_have_text(["Hello world, say hi"])
    messages = [{"role": "user", "content": "Hello world, say hi"}]
    text, finish = answer(server, messages)
    assert content(reply) == text
    expect(reply).to_have_attribute("data-finish-reason", finish)
    expect(reply.locator(".meta")).to_contain_text(f"{MAX_TOKENS} completion tokens")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#stop")).to_be_hidden()
    assert [r.post_data_json for r in requests] == [{
        "model": name, "messages": messages, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 0, "top_p": 1,
        "max_tokens": MAX_TOKENS}]
    assert "authorization" not in requests[0].headers


def test_seeded_reply_equals_server_answer(server, open_page):
    page = open_page(server)
    set_sampling(page, temperature=1, seed=SEED)
    reply = say(page, "Hello world, say hi")
    text, finish = answer(server, [{"role": "user", "content": "Hello world, say hi"}],
                          temperature=1, seed=SEED)
    assert text.strip(), "the seeded answer is empty, so the comparison would prove little"
    assert content(reply) == text
    assert reply.get_attribute("data-finish-reason") == finish


def test_second_turn_sends_history_and_new_chat_clears_it(server, open_page):
    from playwright.sync_api import expect

    page = open_page(server)
    expect(page.locator("#model-name")).to_have_text(model_name(server))
    set_sampling(page, temperature=1, seed=SEED)
    page.fill("#system", "Stop here.")
    requests = captured_requests(page)
    first = say(page, "The quick brown fox", enter=False)
    question = "<b>def</b> add(a, b) & 0123"  # shown as text, never as markup
    second = say(page, question)
    history = [{"role": "system", "content": "Stop here."},
               {"role": "user", "content": "The quick brown fox"},
               {"role": "assistant", "content": content(first)},
               {"role": "user", "content": question}]
    assert history[2]["content"].strip()
    assert requests[1].post_data_json["messages"] == history
    text, finish = answer(server, history, temperature=1, seed=SEED)
    assert content(second) == text
    expect(second).to_have_attribute("data-finish-reason", finish)
    expect(page.locator("#messages .message.user .content").nth(1)).to_have_text(question)
    assert page.locator("#messages b").count() == 0

    page.reload()  # the conversation and the settings survive a reload
    expect(page.locator("#messages .message")).to_have_count(4)
    expect(page.locator("#system")).to_have_value("Stop here.")
    expect(page.locator("#seed")).to_have_value(str(SEED))
    assert content(page.locator("#messages .message.assistant").nth(1)) == text

    page.click("#new-chat")
    expect(page.locator("#messages .message")).to_have_count(0)
    assert page.evaluate("localStorage.getItem('llmforge.chat.history')") == "[]"
    requests.clear()
    say(page, "Hello world")
    assert requests[0].post_data_json["messages"] == [
        history[0], {"role": "user", "content": "Hello world"}]


def test_server_errors_are_shown(server, open_page, tiny_chat_model, tmp_path):
    from playwright.sync_api import expect

    page = open_page(server)
    expect(page.locator("#model-name")).to_have_text(model_name(server))
    page.fill("#max-tokens", "100000")  # over the server's max_tokens limit: a 400
    page.fill("#prompt", "Hello")
    page.click("#send")
    r = httpx.post(f"{server}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 100000})
    assert r.status_code == 400
    expect(page.locator("#error")).to_contain_text(r.json()["error"]["message"])
    expect(page.locator("#messages .message")).to_have_count(0)  # the failed turn is dropped
    expect(page.locator("#prompt")).to_have_value("Hello")  # and its text given back

    with launch_server(tiny_chat_model, "--api-key", "secret",
                       log=tmp_path / "serve.log", threads=1) as keyed:
        url = keyed.url
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                       headers={"Authorization": "Bearer wrong"},
                       json={"messages": [{"role": "user", "content": "Hello"}]})
        assert r.status_code == 401
        refused = r.json()["error"]["message"]

        page = open_page(url)  # no key yet: even the model list is refused
        expect(page.locator("#model-name")).to_have_text("unavailable")
        expect(page.locator("#error")).to_contain_text(refused)

        page.fill("#api-key", "secret")
        page.locator("#api-key").dispatch_event("change")
        expect(page.locator("#model-name")).to_have_text(model_name(url, "secret"))
        expect(page.locator("#error")).to_be_hidden()
        set_sampling(page, temperature=0)
        requests = captured_requests(page)
        say(page, "Hello")
        assert requests[0].headers["authorization"] == "Bearer secret"
        expect(page.locator("#error")).to_be_hidden()

        page.fill("#api-key", "wrong")
        page.fill("#prompt", "Hello again")
        page.press("#prompt", "Enter")
        expect(page.locator("#error")).to_contain_text(refused)
        expect(page.locator("#error")).to_contain_text("401")
        expect(page.locator("#messages .message")).to_have_count(2)  # the refused turn dropped


def test_screenshot(server, open_page, tmp_path):
    page = open_page(server)
    set_sampling(page, temperature=1, seed=SEED)
    page.fill("#system", "You are terse.")
    say(page, "Hello world, say hi")
    say(page, "The quick brown fox jumps over the lazy dog.")
    path = tmp_path / "chat_page.png"
    page.screenshot(path=path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    with contextlib.suppress(OSError):  # a copy for people to look at
        shutil.copy(path, "/tmp/chat_page.png")
