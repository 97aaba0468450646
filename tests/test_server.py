"""`llmforge serve` as a real process, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from llmforge.serve.launch import launch_server

openai = pytest.importorskip("openai")

KEY = "sk-test"
NAME = "tiny"
BODY_LIMIT = 64 * 1024
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
GREEDY = {"temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def url(tiny_chat_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with launch_server(tiny_chat_model, "--api-key", KEY, "--served-model-name", NAME,
                       "--max-body-bytes", str(BODY_LIMIT), "--max-tokens-limit", "512",
                       log=log, threads=1) as server:
        yield server.url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def small_url(tiny_chat_model, tmp_path_factory):
    """One decode slot and one queue place: easy to overflow."""
    log = tmp_path_factory.mktemp("serve_small") / "server.log"
    with launch_server(tiny_chat_model, "--max-num-seqs", "1", "--max-waiting", "1",
                       log=log, threads=1) as server:
        yield server.url


def error_of(resp: httpx.Response, status: int) -> dict:
    """The OpenAI error JSON of a failed response."""
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? (\S+)$" if want else \
        rf"^{re.escape(name)} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def sse_events(resp: httpx.Response) -> list[str]:
    """The data of each server-sent event; every line of the stream must belong to one."""
    body = resp.read().decode()
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), body[:500]
    return [e.removeprefix("data: ") for e in events]


# ---------- the API through the openai client ----------

def test_models_lists_the_served_name(client):
    [model] = client.models.list().data
    assert model.id == NAME and model.object == "model"


def test_completion(client):
    out = client.completions.create(model=NAME, prompt="Hello world", **GREEDY)
    [choice] = out.choices
    assert out.object == "text_completion" and out.model == NAME
    assert choice.index == 0 and choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 24 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    again = client.completions.create(model=NAME, prompt="Hello world", **GREEDY)
    assert again.choices[0].text == choice.text  # greedy is deterministic


def test_list_prompt_and_n_with_seed(client, http):
    args = {"model": NAME, "prompt": ["Hello", "def add(a, b):"], "n": 2, "seed": 7,
            "temperature": 1.0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
    out = client.completions.create(**args)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in out.choices)
    lengths = [http.post("/tokenize", json={"prompt": p}).json()["count"] for p in args["prompt"]]
    assert out.usage.prompt_tokens == sum(lengths) and out.usage.completion_tokens == 4 * 8
    again = client.completions.create(**args)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded


def test_echo_with_logprobs(client, http):
    ids = http.post("/tokenize", json={"prompt": "Hello world, say"}).json()["tokens"]
    out = client.completions.create(model=NAME, prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                    temperature=0)
    [choice] = out.choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])  # top-1 plus the chosen one
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # greedy: the best one
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert choice.text.startswith("Hello world, say")
    assert choice.text.startswith("".join(lp.tokens[:-1]))


def test_chat_stream_equals_non_stream(client):
    full = client.chat.completions.create(model=NAME, messages=MESSAGES, **GREEDY)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True},
                                                 **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert {c.id for c in chunks} == {chunks[0].id} and len({c.created for c in chunks}) == 1


def test_raw_sse_format(http):
    body = {"model": NAME, "messages": MESSAGES, "stream": True, **GREEDY}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_nulls_and_an_empty_model_mean_the_defaults(http):
    body = {"model": "", "messages": MESSAGES, "temperature": None, "seed": None, "stop": None,
            "max_tokens": 2, "stream_options": None, "some_other_servers_field": 1}
    out = http.post("/v1/chat/completions", json=body)
    assert out.status_code == 200 and out.json()["model"] == NAME


def test_completion_stream_and_chat_logprobs(client):
    full = client.completions.create(model=NAME, prompt="The quick", **GREEDY)
    stream = client.completions.create(model=NAME, prompt="The quick", stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in stream) == full.choices[0].text
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, logprobs=True,
                                         top_logprobs=3, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob == t.top_logprobs[0].logprob
               for t in content)  # greedy picks the best


def test_stop_string_and_length(client):
    args = {"model": NAME, "prompt": "Stop here", "temperature": 0, "max_tokens": 30,
            "extra_body": {"ignore_eos": True}}
    free = client.completions.create(**args).choices[0]
    assert free.finish_reason == "length" and len(free.text) > 4
    stop = free.text[len(free.text) // 2:][:2]
    cut = client.completions.create(**args, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    short = client.completions.create(**{**args, "max_tokens": 3})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_tokenize_round_trip(http):
    text = "def add(a, b):\n    return a + b  é 🌍"
    tok = http.post("/tokenize", json={"prompt": text}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 256
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": text}
    chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    rendered = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert "Say hi." in rendered and rendered.endswith("<|assistant|>")


def test_chat_page_and_open_endpoints(url):
    assert httpx.get(f"{url}/health").status_code == 200  # no key needed
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


# ---------- errors: OpenAI's JSON and status ----------

def test_api_key_is_required(url):
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    error_of(httpx.post(f"{url}/v1/completions", json={"prompt": "x"}), 401)
    error_of(httpx.post(f"{url}/tokenize", json={"prompt": "x"}), 401)


@pytest.mark.parametrize("bad", [{"max_tokens": "5"}, {"max_tokens": -1}, {"temperature": 5},
                                 {"n": 0}, {"stop": 3}, {"max_tokens": 100000},
                                 {"messages": [{"role": "robot", "content": "hi"}]},
                                 {"logprobs": True, "top_logprobs": 99}])
def test_bad_parameters_are_400(client, bad):
    args = {"model": NAME, "messages": MESSAGES, "max_tokens": 4}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**args, **bad})
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error"


def test_request_errors(client, http):
    too_long = http.post("/v1/completions", json={"model": NAME, "prompt": [5] * 300})
    assert "maximum context length is 256 tokens" in error_of(too_long, 400)["message"]
    unknown = http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert error_of(unknown, 404)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi")
    big = http.post("/v1/completions", json={"model": NAME, "prompt": "x" * (2 * BODY_LIMIT)})
    error_of(big, 413)
    malformed = http.post("/v1/completions", content=b'{"prompt": "hi",',
                          headers={"Content-Type": "application/json"})
    assert "JSON" in error_of(malformed, 400)["message"]
    form = http.post("/v1/completions", content=b"prompt=hi",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    error_of(form, 415)
    error_of(http.post("/v1/completions", json={"model": NAME, "prompt": [99999]}), 400)
    error_of(http.post("/v1/completions", json={"model": NAME, "prompt": []}), 400)
    error_of(http.get("/v1/nothing"), 404)
    assert error_of(http.get("/v1/completions"), 405)["type"] == "invalid_request_error"
    wrong = http.post("/v1/completions", json={"model": NAME, "prompt": 5})
    assert error_of(wrong, 400)["param"] == "prompt"


def test_chunked_oversized_body_is_413(http):
    def chunks():
        for _ in range(4):
            yield b" " * BODY_LIMIT

    error_of(http.post("/v1/completions", content=chunks(),
                       headers={"Content-Type": "application/json"}), 413)


def test_metrics(client, http):
    client.chat.completions.create(model=NAME, messages=MESSAGES, **GREEDY)
    error_of(http.post("/v1/completions", json={"model": NAME, "prompt": 1}), 400)
    text = http.get("/metrics").text
    assert metric(text, "llmforge_requests_total", endpoint="/v1/chat/completions",
                  outcome="success") >= 1
    assert metric(text, "llmforge_requests_total", endpoint="/v1/completions",
                  outcome="error") >= 1
    for name in ("llmforge_time_to_first_token_seconds_count",
                 "llmforge_inter_token_latency_seconds_count",
                 "llmforge_e2e_request_latency_seconds_count",
                 "llmforge_prompt_tokens_total", "llmforge_generation_tokens_total"):
        assert metric(text, name) > 0, name
    assert metric(text, "llmforge_num_requests_running") == 0
    assert "llmforge_num_requests_waiting" in text


# ---------- load, cancellation, shutdown ----------

@pytest.mark.slow
def test_32_concurrent_streams_get_their_own_greedy_answer(url, client):
    prompts = [f"Tell me about {i} foxes." for i in range(32)]
    want = [client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": p}], **GREEDY).choices[0].message.content
        for p in prompts]

    async def stream(aclient, prompt: str) -> str:
        chunks = await aclient.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": prompt}], stream=True, **GREEDY)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def all_streams() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as a:
            return await asyncio.gather(*(stream(a, p) for p in prompts))

    assert asyncio.run(all_streams()) == want


@pytest.mark.slow
def test_queue_overflow_is_429_never_5xx(small_url):
    body = {"prompt": "Hello", "max_tokens": 64, "ignore_eos": True, "temperature": 0}

    def post(_) -> httpx.Response:
        return httpx.post(f"{small_url}/v1/completions", json=body, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, range(12)))
    statuses = [r.status_code for r in responses]
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses
    assert error_of(next(r for r in responses if r.status_code == 429), 429)["message"]
    assert httpx.get(f"{small_url}/health").status_code == 200
    assert post(0).status_code == 200
    text = httpx.get(f"{small_url}/metrics").text
    assert metric(text, "llmforge_requests_total", endpoint="/v1/completions",
                  outcome="rejected") == statuses.count(429)


def test_more_choices_than_decode_slots_is_400(small_url):
    out = httpx.post(f"{small_url}/v1/completions", json={"prompt": "Hi", "n": 2}, timeout=60)
    assert error_of(out, 400)["message"].startswith("n=2 is more than the 1 sequences")


@pytest.mark.slow
def test_client_leaving_a_stream_frees_its_slot(small_url):
    before = httpx.get(f"{small_url}/metrics").text
    body = {"prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{small_url}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while True:
        after = httpx.get(f"{small_url}/metrics").text
        aborted = metric(after, "llmforge_requests_total", endpoint="/v1/completions",
                         outcome="abort")
        if aborted >= 1 and metric(after, "llmforge_num_requests_running") == 0:
            break
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.1)
    generated = (metric(after, "llmforge_generation_tokens_total")
                 - metric(before, "llmforge_generation_tokens_total"))
    assert generated < 240  # cancelled, not run to the end
    out = httpx.post(f"{small_url}/v1/completions", timeout=60,
                     json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 4


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish(tiny_chat_model):
    with launch_server(tiny_chat_model, threads=1) as server:
        base, proc = server.url, server.process
        body = {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as resp:
            events = resp.iter_lines()
            assert next(events).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [e.removeprefix("data: ") for e in events if e]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["usage"]["completion_tokens"] == 200
        # uvicorn re-raises the signal once it has shut down cleanly
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health")


def test_served_model_name_defaults_to_the_spec(small_url, tiny_chat_model):
    [model] = httpx.get(f"{small_url}/v1/models").json()["data"]
    assert model["id"] == str(tiny_chat_model)
