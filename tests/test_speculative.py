"""Speculative decoding: a draft model changes how many forward passes the target makes, never
which tokens come out (greedy) nor how they are distributed (sampled)."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import shutil
from collections import Counter

import httpx
import pytest
import torch
from scipy.stats import chisquare
from tokenizers import Tokenizer

from llmforge.model.io import save_model
from llmforge.model.quant import quantize_int4, quantize_int8
from llmforge.model.transformer import Transformer
from llmforge.serve.chat_model import open_chat_model
from llmforge.serve.engine import Engine
from llmforge.serve.launch import launch_server
from llmforge.serve.sampling import SamplingParams
from llmforge.serve.server import open_draft

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
TEXTS = ["def add(a, b):", "Hello world", "The quick brown fox jumps over the lazy dog. " * 3,
         "é ü 🌍", "say hi again", "0123456789 " * 6, "def add(a, b):\n    return a"]


def lively(model: Transformer) -> Transformer:
    """Scale a random model's weights so that each token depends on the whole context: as
    initialised, the tied embedding dominates and greedy decoding repeats the prompt's last token,
    which a draft with broken bookkeeping would reproduce just as well. Larger final-norm weights
    make the next-token distributions less flat, as a trained model's are."""
    with torch.no_grad():
        for module in model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(20.0)
        model.norm.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def target_dir(tiny_chat_model, tmp_path_factory):
    """The tiny chat model made lively, saved with its tokenizer (servers open it)."""
    chat = open_chat_model(str(tiny_chat_model))
    out = tmp_path_factory.mktemp("speculative") / "target"
    save_model(lively(chat.model), out)
    shutil.copy(tiny_chat_model / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def chat(target_dir):
    return open_chat_model(str(target_dir))


@pytest.fixture(scope="module")
def prompts(chat):
    return [chat.tokenizer.encode(t).ids for t in TEXTS]


@pytest.fixture(scope="module")
def drafts(chat):
    """(a) the target itself, (b) another random model, (c) the target in int8 and in int4."""
    torch.manual_seed(1)
    other = lively(Transformer(chat.model.cfg))
    int8, int4 = copy.deepcopy(chat.model), copy.deepcopy(chat.model)
    quantize_int8(int8)
    quantize_int4(int4)
    return {"self": copy.deepcopy(chat.model), "other": other, "int8": int8, "int4": int4}


def engine(chat, draft=None, **options) -> Engine:
    return Engine(chat.model, chat.tokenizer, stop_ids=chat.stop_ids, draft=draft, **options)


def run(eng: Engine, prompts, params):
    outs = eng.generate(prompts, params)
    eng.shutdown()
    return outs


def assert_same(outs, expected):
    """Token for token the same choices; the target's logprobs."""
    for out, ref in zip(outs, expected, strict=True):
        for c, r in zip(out.choices, ref.choices, strict=True):
            assert (c.token_ids, c.text, c.finish_reason) == (r.token_ids, r.text,
                                                               r.finish_reason)
            if r.logprobs is not None:
                for a, b in zip(c.logprobs, r.logprobs, strict=True):
                    assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob,
                                                                                  abs=1e-4)
                    assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.fixture(scope="module")
def alone(chat, prompts):
    return run(engine(chat), prompts, GREEDY)


# ---- greedy: the target's tokens, whatever the draft ------------------------------------------

# (acceptance rate bounds per draft: the same model always agrees, another random one hardly
# ever, quantized copies mostly)
ACCEPTANCE = {"self": (1.0, 1.0), "other": (0.0, 0.1), "int8": (0.6, 0.99),
              "int4": (0.05, 0.9)}
# K with the engine options it runs under: one slot; churn with chunked prefill; all at once
BATCHING = {1: {"max_num_seqs": 1}, 2: {"max_num_seqs": 3, "max_prefill_tokens": 16},
            4: {}, 7: {"max_num_seqs": 2}}


@pytest.mark.parametrize("k", sorted(BATCHING))
@pytest.mark.parametrize("name", sorted(ACCEPTANCE))
def test_greedy_output_is_the_targets_alone(chat, prompts, drafts, alone, name, k):
    eng = engine(chat, drafts[name], num_speculative_tokens=k, **BATCHING[k])
    assert_same(run(eng, prompts, GREEDY), alone)
    stats = eng.spec_stats
    low, high = ACCEPTANCE[name]
    assert stats.proposed > 0 and low <= stats.acceptance_rate <= high
    assert stats.proposed <= k * stats.steps
    # a verification emits at least one token: at most one per token after the first
    assert stats.steps <= sum(len(o.choices[0].token_ids) - 1 for o in alone)
    assert stats.mean_accepted_length == pytest.approx(1 + stats.accepted / stats.steps)


def proposals(max_tokens: int, k: int) -> int:
    """Draft tokens a draft that is always right proposes for one sequence: K per step while at
    least K + 1 tokens remain, then fewer (the first token comes from the prefill)."""
    total, remaining = 0, max_tokens - 1
    while remaining > 0:
        n = min(k, remaining - 1)
        total, remaining = total + n, remaining - n - 1
    return total


@pytest.mark.parametrize("max_tokens", [0, 1, 2, 3, 5, 6, 7, 11])
def test_max_tokens_near_k(chat, prompts, drafts, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    expected = run(engine(chat), prompts[:3], params)
    eng = engine(chat, drafts["self"], num_speculative_tokens=4)
    outs = run(eng, prompts[:3], params)
    assert_same(outs, expected)
    assert all(len(o.choices[0].token_ids) == max_tokens for o in outs)
    assert eng.spec_stats.proposed == eng.spec_stats.accepted == 3 * proposals(max_tokens, 4)


def test_near_max_model_len_proposes_fewer_and_stops_at_the_end(chat, drafts):
    # prompts ending 1..9 tokens before the context's end: each step has less room than K
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True, logprobs=0)
    prompts = [list(range(5, 5 + n)) for n in range(31, 40)]
    expected = run(engine(chat, max_model_len=40), prompts, params)
    for name in ("self", "int4"):
        assert_same(run(engine(chat, drafts[name], num_speculative_tokens=7, max_model_len=40),
                        prompts, params), expected)
    for p, out in zip(prompts, expected, strict=True):
        assert len(p) + len(out.choices[0].token_ids) == 40
        assert out.choices[0].finish_reason == "length"


def test_stops_inside_the_accepted_drafts(chat, prompts, drafts, alone):
    """A stop id or stop string among the drafts that stood ends the output there; what the
    caches hold after it is still right (a follow-up reuses the finished sequence's prefix)."""
    ids = alone[2].choices[0].token_ids
    stop_id = ids[9]
    text = chat.tokenizer.decode(ids)
    stop = text[len(chat.tokenizer.decode(ids[:12])):][:3]
    assert stop.strip() and text.index(stop) > 0
    cases = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                            stop_token_ids=(stop_id,)),
             SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,))]
    for params in cases:
        expected = run(engine(chat), [prompts[2]], params)[0]
        eng = engine(chat, drafts["self"], num_speculative_tokens=7)
        eng.start()
        deltas = []
        out = eng.add_request(prompts[2], params, on_delta=deltas.append).result(timeout=60)
        assert_same([out], [expected])
        assert out.choices[0].finish_reason == "stop" and len(out.choices[0].token_ids) < 24
        assert "".join(d.text for d in deltas) == out.choices[0].text
        assert [t for d in deltas for t in d.token_ids] == out.choices[0].token_ids
        follow_up = prompts[2] + out.choices[0].token_ids + prompts[1]
        before = eng.prefix_tokens_reused
        again = eng.generate([follow_up], GREEDY)[0]
        eng.shutdown()
        assert eng.prefix_tokens_reused - before >= len(prompts[2])
        assert_same([again], run(engine(chat), [follow_up], GREEDY))


def test_n_choices_fork_with_their_draft_cache(chat, prompts, drafts):
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, n=3)
    expected = run(engine(chat), prompts[:4], greedy)
    outs = run(engine(chat, drafts["int8"], num_speculative_tokens=4), prompts[:4], greedy)
    assert_same(outs, expected)
    assert all(len({tuple(c.token_ids) for c in o.choices}) == 1 for o in outs)


# ---- sampled: the target's distribution, per-request seeds ------------------------------------

def test_seeded_requests_repeat_whatever_else_runs(chat, prompts, drafts):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=40, seed=7, n=2,
                            ignore_eos=True)
    noisy = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    single = run(engine(chat, drafts["int8"], num_speculative_tokens=3), [prompts[1]], params)
    eng = engine(chat, drafts["int8"], num_speculative_tokens=3, max_num_seqs=4)
    eng.start()
    handles = [eng.add_request(p, noisy) for p in prompts[2:5]]
    handles.insert(1, eng.add_request(prompts[1], params))
    crowded = [h.result(timeout=60) for h in handles][1]
    eng.shutdown()
    assert eng.spec_stats.accepted > 0
    for a, b in zip(single[0].choices, crowded.choices, strict=True):
        assert a.token_ids == b.token_ids
    assert single[0].choices[0].token_ids != single[0].choices[1].token_ids  # seed + index
    other = dataclasses.replace(params, seed=8)
    assert run(engine(chat, drafts["int8"]), [prompts[1]], other)[0].choices[0].token_ids != \
        crowded.choices[0].token_ids


def test_penalties_sample_as_without_a_draft(chat, prompts, drafts):
    params = SamplingParams(max_tokens=16, temperature=0.8, repetition_penalty=1.3,
                            presence_penalty=0.5, seed=3, ignore_eos=True)
    expected = run(engine(chat), prompts[:3], params)
    eng = engine(chat, drafts["self"])
    assert_same(run(eng, prompts[:3], params), expected)
    assert eng.spec_stats.proposed == 0


def test_sampled_tokens_follow_the_targets_distribution(chat, drafts):
    """2048 seeded samples of four tokens under top_k=2 (16 possible outputs), drafted by a
    different model: their frequencies fit the target's own probabilities (chi-square) and
    not the draft's. The first token comes from the prefill; the next three from speculation
    (two drafts, then whatever remains), so accepted drafts, replacements and bonus tokens
    all count."""
    torch.manual_seed(5)
    draft = copy.deepcopy(chat.model)  # ranks tokens somewhat differently, more evenly
    draft.norm.weight.data.mul_(0.5 + 0.5 * torch.rand_like(draft.norm.weight))
    prompt = chat.tokenizer.encode("Hello world").ids
    params = dict(max_tokens=4, temperature=1.0, top_k=2, ignore_eos=True, n=16)
    eng = engine(chat, draft, num_speculative_tokens=3, max_num_seqs=128)
    eng.start()
    handles = [eng.add_request(prompt, SamplingParams(seed=seed, **params))
               for seed in range(0, 2048, 16)]  # choice i of a request is seeded seed + i
    outs = [h.result(timeout=120) for h in handles]
    eng.shutdown()
    counts = Counter(tuple(c.token_ids) for o in outs for c in o.choices)
    p, q = top2_joint(chat.model, prompt, 4), top2_joint(draft, prompt, 4)
    assert set(counts) <= set(p)
    n = sum(counts.values())
    observed = [counts[s] for s in sorted(p)]
    total = sum(p.values())  # 1, to rounding
    assert chisquare(observed, [n * p[s] / total for s in sorted(p)]).pvalue > 1e-3
    tv_draft = sum(abs(counts[s] / n - q.get(s, 0.0)) for s in set(p) | set(q)) / 2
    assert tv_draft > 0.3  # the test tells the two apart
    assert 0.2 < eng.spec_stats.acceptance_rate < 0.8  # drafts both stand and fall


def top2_joint(model: Transformer, prompt: list[int], length: int) -> dict[tuple, float]:
    """Probabilities of every `length`-token continuation under temperature 1, top_k=2."""
    joint = {(): 1.0}
    for _ in range(length):
        grown = {}
        for seq, prob in joint.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(seq)]))[0, -1]
            values, ids = logits.topk(2)
            for v, i in zip(values.softmax(-1).tolist(), ids.tolist(), strict=True):
                grown[seq + (i,)] = prob * v
        joint = grown
    return joint


# ---- refusals ---------------------------------------------------------------------------------

def test_a_draft_must_fit_the_target(chat, tiny_chat_model, tmp_path):
    cfg = chat.model.cfg
    with pytest.raises(ValueError, match="vocabulary has 512 entries"):
        engine(chat, Transformer(dataclasses.replace(cfg, vocab_size=512)))
    with pytest.raises(ValueError, match="context"):
        engine(chat, Transformer(dataclasses.replace(cfg, max_seq_len=64)))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        engine(chat, num_speculative_tokens=0)
    # the same shapes, another tokenizer: refused by the server before any token is checked
    other = tmp_path / "other"
    shutil.copytree(tiny_chat_model, other)
    tok = Tokenizer.from_file(str(other / "tokenizer.json"))
    tok.add_tokens(["<|not-in-the-target|>"])
    tok.save(str(other / "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer differs from the target's"):
        open_draft(str(other), chat)


# ---- the server -------------------------------------------------------------------------------

def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_server_with_a_draft_answers_as_without_and_counts_acceptance(target_dir, tmp_path):
    openai = pytest.importorskip("openai")
    prompts = ["def add(a, b):", "Hello world, say", "The quick brown fox"]
    answers, metrics = [], []
    for args in [(), ("--draft-model", str(target_dir), "--draft-quantization", "int4",
                      "--num-speculative-tokens", "3")]:
        with launch_server(target_dir, *args, threads=1, log=tmp_path / "server.log") as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
            model = client.models.list().data[0].id
            completions = client.completions.create(model=model, prompt=prompts, max_tokens=20,
                                                     temperature=0.0, logprobs=1)
            chat_reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=16,
                temperature=0.0)
            streamed = "".join(c.choices[0].delta.content or "" for c in
                               client.chat.completions.create(
                                   model=model, messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=16, temperature=0.0, stream=True))
            answers.append(([c.text for c in completions.choices],
                            [c.logprobs.tokens for c in completions.choices],
                            chat_reply.choices[0].message.content, streamed))
            metrics.append(httpx.get(f"{server.url}/metrics", timeout=30).text)
    assert answers[0] == answers[1]
    without, with_draft = metrics
    assert metric(without, "llmforge_spec_decode_num_draft_tokens_total") == 0
    assert math.isnan(metric(without, "llmforge_spec_decode_draft_acceptance_rate"))
    proposed = metric(with_draft, "llmforge_spec_decode_num_draft_tokens_total")
    accepted = metric(with_draft, "llmforge_spec_decode_num_accepted_tokens_total")
    assert 0 < accepted < proposed
    assert metric(with_draft, "llmforge_spec_decode_draft_acceptance_rate") == pytest.approx(
        accepted / proposed)
