"""The continuous-batching engine against unbatched decoding, and its bookkeeping under churn."""

import threading

import pytest
import torch
import torch.nn.functional as F

from llmforge.model.generate import generate
from llmforge.serve.chat_model import open_chat_model
from llmforge.serve.engine import Engine
from llmforge.serve.outputs import QueueFull
from llmforge.serve.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def chat(tiny_chat_model):
    return open_chat_model(str(tiny_chat_model))


@pytest.fixture(scope="module")
def prompts(chat):
    texts = ["def add(a, b):", "Hello world", "The quick brown fox jumps over the lazy dog. " * 3,
             "é ü 🌍", "say hi again", "0123456789 " * 6, "def add(a, b):\n    return a"]
    return [chat.tokenizer.encode(t).ids for t in texts]


def engine(chat, **options) -> Engine:
    return Engine(chat.model, chat.tokenizer, stop_ids=chat.stop_ids, **options)


def collect(eng, prompt, params):
    """Run one request and also gather its deltas, as a streaming client sees them."""
    deltas = []
    out = eng.add_request(prompt, params, on_delta=deltas.append).result(timeout=60)
    return out, deltas


def test_greedy_batched_equals_unbatched_decoding(chat, prompts):
    # Three slots for seven prompts and 16-token prefill chunks: requests join and leave the
    # batch mid-flight and long prompts are prefilled over several steps.
    eng = engine(chat, max_num_seqs=3, max_prefill_tokens=16)
    outs = eng.generate(prompts, GREEDY)
    eng.shutdown()
    for prompt, out in zip(prompts, outs, strict=True):
        expected = list(generate(chat.model, prompt, GREEDY.max_tokens))
        assert out.choices[0].token_ids == expected
        assert out.choices[0].text == chat.tokenizer.decode(expected)
        assert out.choices[0].finish_reason == "length"


def test_requests_arriving_while_others_decode_get_the_same_answers(chat, prompts):
    eng = engine(chat, max_num_seqs=4)
    eng.start()
    handles = []
    for p in prompts:  # staggered: each arrives while earlier ones are mid-decode
        handles.append(eng.add_request(p, GREEDY))
        threading.Event().wait(0.01)
    outs = [h.result(timeout=60) for h in handles]
    eng.shutdown()
    for p, out in zip(prompts, outs, strict=True):
        assert out.choices[0].token_ids == list(generate(chat.model, p, GREEDY.max_tokens))


def test_prefix_reuse_copies_cached_tokens_and_changes_nothing(chat, prompts):
    eng = engine(chat)
    base = prompts[2]
    first = eng.generate([base], GREEDY)[0]
    follow_up = base + first.choices[0].token_ids + prompts[1]  # the conversation goes on
    before = eng.prefix_tokens_reused
    out = eng.generate([follow_up], GREEDY)[0]
    eng.shutdown()
    assert eng.prefix_tokens_reused - before >= len(base)
    assert out.choices[0].token_ids == list(generate(chat.model, follow_up, GREEDY.max_tokens))


def test_deltas_add_up_to_the_result(chat, prompts):
    eng = engine(chat)
    eng.start()
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=1, n=2, logprobs=3)
    out, deltas = collect(eng, prompts[3], params)
    eng.shutdown()
    for choice in out.choices:
        mine = [d for d in deltas if d.index == choice.index]
        assert "".join(d.text for d in mine) == choice.text
        assert [t for d in mine for t in d.token_ids] == choice.token_ids
        assert [lp for d in mine for lp in d.logprobs] == choice.logprobs
        assert [d.finish_reason for d in mine][-1] == choice.finish_reason
        assert all(d.finish_reason is None for d in mine[:-1])


def test_seeded_choices_are_reproducible_and_distinct(chat, prompts):
    eng = engine(chat)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=7, n=3, ignore_eos=True)
    a, b = eng.generate([prompts[0], prompts[0]], params)
    # The same request among other traffic: per-sequence generators ignore the batch.
    c = eng.generate([prompts[4], prompts[0], prompts[5]], params)[1]
    eng.shutdown()
    ids = [ch.token_ids for ch in a.choices]
    assert ids == [ch.token_ids for ch in b.choices] == [ch.token_ids for ch in c.choices]
    assert len({tuple(i) for i in ids}) == 3


def test_stop_string_is_cut_even_when_split_across_tokens(chat, prompts):
    eng = engine(chat)
    free = eng.generate([prompts[1]], GREEDY)[0].choices[0].text
    stop = free[5:9]  # four characters in the middle of the greedy answer
    assert len(stop) == 4 and free.find(stop) == 5
    out, deltas = collect(eng, prompts[1], SamplingParams(max_tokens=24, temperature=0.0,
                                                          stop=("never", stop)))
    eng.shutdown()
    choice = out.choices[0]
    assert choice.text == free[:5] and choice.finish_reason == "stop"
    assert "".join(d.text for d in deltas) == free[:5]


def test_stop_at_end_of_turn_token_and_at_max_model_len(chat, prompts):
    eng = engine(chat, max_model_len=40)
    free = eng.generate([prompts[0]], GREEDY)[0].choices[0].token_ids
    out = eng.generate([prompts[0]], SamplingParams(max_tokens=24, temperature=0.0,
                                                    stop_token_ids=(free[3],)))[0]
    stop_at = free.index(free[3])
    # The stop token ends the ids (as vLLM reports it) but adds no text.
    assert out.choices[0].token_ids == free[: stop_at + 1]
    assert out.choices[0].text == chat.tokenizer.decode(free[:stop_at])
    assert out.choices[0].finish_reason == "stop"
    long = eng.generate([prompts[2][:30]], SamplingParams(max_tokens=100, temperature=0.0))[0]
    eng.shutdown()
    assert len(prompts[2][:30]) + len(long.choices[0].token_ids) == 40
    assert long.choices[0].finish_reason == "length"


def test_logprobs_are_the_models_raw_distribution(chat, prompts):
    eng = engine(chat)
    prompt = prompts[4]
    out = eng.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2,
                                                prompt_logprobs=1))[0]
    eng.shutdown()
    ids = prompt + out.choices[0].token_ids
    with torch.inference_mode():
        logp = F.log_softmax(chat.model(torch.tensor([ids]))[0], -1)
    assert out.prompt_logprobs[0] is None
    for pos, entry in enumerate(out.prompt_logprobs[1:]):
        assert entry.token_id == prompt[pos + 1]
        assert entry.logprob == pytest.approx(float(logp[pos, prompt[pos + 1]]), abs=1e-4)
    for i, entry in enumerate(out.choices[0].logprobs):
        row = logp[len(prompt) - 1 + i]
        assert entry.logprob == pytest.approx(float(row.max()), abs=1e-4)  # greedy: the best
        assert [t for t, _ in entry.top] == row.topk(2).indices.tolist()


def test_cancel_frees_the_slot_and_others_finish(chat, prompts):
    eng = engine(chat, max_num_seqs=1)
    eng.start()
    long = eng.add_request(prompts[0], SamplingParams(max_tokens=200, temperature=0.0,
                                                      ignore_eos=True))
    queued = eng.add_request(prompts[1], GREEDY)
    long.cancel()
    assert long.result(timeout=60).choices[0].finish_reason == "abort"
    assert queued.result(timeout=60).choices[0].finish_reason == "length"
    eng.shutdown()
    assert eng.num_running == 0 and eng.num_waiting == 0


def test_bad_requests_are_refused_at_the_door(chat, prompts):
    eng = engine(chat, max_model_len=32, max_waiting=2)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], GREEDY)
    with pytest.raises(ValueError, match="context"):
        eng.add_request(list(range(32)), GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add_request([10**6], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        eng.add_request(prompts[0], SamplingParams(temperature=-1))
    eng.add_request(prompts[0], GREEDY)  # not started: these wait
    eng.add_request(prompts[0], GREEDY)
    with pytest.raises(QueueFull):
        eng.add_request(prompts[0], GREEDY)
    eng.shutdown(drain=False)
    with pytest.raises(RuntimeError, match="shutting down"):
        eng.add_request(prompts[0], GREEDY)


def test_shutdown_drains_in_flight_requests(chat, prompts):
    eng = engine(chat)
    eng.start()
    handles = [eng.add_request(p, GREEDY) for p in prompts]
    eng.shutdown(drain=True, timeout=60)
    assert all(h.done and h.result().choices[0].finish_reason == "length" for h in handles)


def test_a_failing_callback_does_not_stop_the_engine(chat, prompts):
    eng = engine(chat)
    eng.start()

    def broken(_delta):
        raise RuntimeError("client bug")

    out = eng.add_request(prompts[0], GREEDY, on_delta=broken).result(timeout=60)
    assert len(out.choices[0].token_ids) == GREEDY.max_tokens
    assert eng.generate([prompts[1]], GREEDY)[0].choices[0].finish_reason == "length"
    eng.shutdown()


def test_cache_grows_with_the_longest_sequence_and_keeps_what_it_holds():
    from tokenizers import Tokenizer, models

    from llmforge.model.config import ModelConfig
    from llmforge.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=1024)).eval()
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    eng = Engine(model, tok, max_num_seqs=2, max_prefill_tokens=128)
    assert eng.cache.capacity == 256 < eng.max_model_len
    short, long = [1, 2, 3], [i % 60 + 1 for i in range(300)]
    eng.start()
    first = eng.add_request(short, SamplingParams(max_tokens=40, temperature=0.0))
    second = eng.add_request(long, SamplingParams(max_tokens=20, temperature=0.0))
    outs = [first.result(timeout=60), second.result(timeout=60)]
    eng.shutdown()
    assert eng.cache.capacity == 512
    for prompt, out in zip([short, long], outs, strict=True):
        n = len(out.choices[0].token_ids)
        assert out.choices[0].token_ids == list(generate(model, prompt, n))


def test_echo_scoring_gets_one_token_past_the_prompt_even_when_it_is_a_stop(chat, prompts):
    # lm-evaluation-harness's local-completions reads prompt logprobs up to the one generated
    # token; an end-of-turn token must still be that token, or its last scored token is lost.
    prompt = prompts[4]
    greedy = list(generate(chat.model, prompt, 1))[0]
    eng = Engine(chat.model, chat.tokenizer, stop_ids=[greedy])
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=1, prompt_logprobs=1)
    out = eng.generate([prompt], params)[0]
    eng.shutdown()
    choice = out.choices[0]
    assert choice.token_ids == [greedy] and choice.text == ""
    assert choice.finish_reason == "stop" and len(choice.logprobs) == 1
    assert len(out.prompt_logprobs) == len(prompt)
