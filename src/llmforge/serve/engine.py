"""Continuous-batching inference engine: many requests share every forward pass.

One background thread runs steps. A step
1. drops cancelled sequences and admits waiting requests while slots are free;
2. prefills admitted prompts together, at most `max_prefill_tokens` prompt tokens per step, so a
   long prompt is cut into chunks and never stalls the decoding batch for long;
3. decodes one token for every running sequence in one batched forward pass, or, with a draft
   model, lets the draft propose up to K tokens per sequence and verifies them all in one
   target pass (speculative decoding, below).

Requests join and leave the batch at every step. Decoding sequences live in cache slots
[0, D), so a decode step reads a view of the cache; a finished sequence's hole is filled by
moving the last one in. A prompt that starts with tokens some running or recently finished
sequence already holds copies their keys and values instead of recomputing them (prefix reuse;
n > 1 choices fork from one prefill the same way).

Speculative decoding. The draft keeps its own cache, slot for slot the target's: every prefill
chunk, copy and move happens in both, so one `n_cached` counts the tokens held in both. A step
feeds the draft each sequence's tokens not yet cached and then its own proposals until it has
K; the target reads the uncached tokens and all K proposals in one pass over the batch. The
accepted drafts and the target's next token are appended (cut at the first that ends the
sequence) and `n_cached` moves to what both caches hold of them: what lies past it is masked
out and overwritten later. When all K stand, the draft never saw the last, so the next step
feeds it to both again: the target recomputes one position rather than the engine keeping two
lengths. Fewer drafts are proposed near max_tokens or the context's end; requests with
repetition, presence or frequency penalties (whose logits depend on each new token) get none
and are sampled as without a draft.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from torch import Tensor

from llmforge.model.transformer import Transformer
from llmforge.serve.kv_slots import SlotCache
from llmforge.serve.outputs import Choice, Delta, QueueFull, RequestOutput, TokenLogprob
from llmforge.serve.sampling import SamplingParams, sample, token_logprobs
from llmforge.serve.speculative import Noise, SpecStats, accept, draw_noise, sampling_probs

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    on_delta: Callable[[Delta], None] | None
    on_finish: Callable[[RequestOutput], None] | None
    arrival: float = field(default_factory=time.monotonic)
    seqs: list[_Sequence] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    first_token_time: float | None = None
    cancelled: bool = False
    error: str | None = None
    output: RequestOutput | None = None
    finished: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Sequence:
    request: _Request
    index: int  # choice number
    tokens: list[int]  # prompt + output
    generator: torch.Generator | None
    slot: int = -1
    n_cached: int = 0  # leading tokens whose keys/values are in the slot
    out_ids: list[int] = field(default_factory=list)
    text: str = ""  # the whole decoded output
    emitted: int = 0  # characters of text already delivered
    sent_tokens: int = 0  # output tokens already delivered
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    @property
    def n_prompt(self) -> int:
        return len(self.request.prompt)


class RequestHandle:
    def __init__(self, request: _Request, engine: Engine) -> None:
        self._request, self._engine = request, engine
        self.request_id = request.id

    @property
    def done(self) -> bool:
        return self._request.finished.is_set()

    def cancel(self) -> None:
        """Abort the request; its slot is freed at the next step."""
        self._request.cancelled = True
        self._engine._wake()

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._request.finished.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        return self._request.output  # type: ignore[return-value]


class Engine:
    # A prompt reuses another sequence's keys/values only when at least this many tokens match:
    # shorter copies cost about what recomputing them does.
    min_prefix_reuse = 8
    # Prompts being prefilled at once (their own cache slots, outside the decoding ones).
    max_prefill_seqs = 8

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, stop_ids: Sequence[int] = (),
                 max_num_seqs: int = 32, max_model_len: int | None = None,
                 max_prefill_tokens: int = 512, prefix_cache_slots: int = 8,
                 max_waiting: int = 256, draft: Transformer | None = None,
                 num_speculative_tokens: int = 4) -> None:
        """`draft`: a model with the target's vocabulary (smaller, quantized...) that proposes
        `num_speculative_tokens` tokens per sequence and step for the target to verify; the
        output is the target's alone either way. `spec_stats` counts its proposals."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        cfg = model.cfg
        for name, value in (("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len),
                            ("max_prefill_tokens", max_prefill_tokens),
                            ("max_waiting", max_waiting),
                            ("num_speculative_tokens", num_speculative_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if prefix_cache_slots < 0:
            raise ValueError(f"prefix_cache_slots must be >= 0, got {prefix_cache_slots}")
        self.max_model_len = min(max_model_len or min(cfg.max_seq_len, 2048), cfg.max_seq_len)
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.max_waiting = max_waiting
        self.vocab_size = cfg.vocab_size
        self.device = model.tok_emb.weight.device
        n_slots = max_num_seqs + self.max_prefill_seqs + prefix_cache_slots
        if draft is not None:
            self._check_draft(draft)
        self.cache = _slot_cache(model, n_slots, self.max_model_len)
        self.draft = None if draft is None else draft.eval()
        self.draft_cache = None if draft is None else _slot_cache(draft, n_slots,
                                                                  self.max_model_len)
        self.num_speculative_tokens = num_speculative_tokens
        self.spec_stats = SpecStats()
        self._free_prefill = list(range(max_num_seqs, max_num_seqs + self.max_prefill_seqs))
        # Prefix pool: slot -> the tokens whose keys/values it holds, least recently used first.
        self._pool: OrderedDict[int, list[int]] = OrderedDict(
            (s, []) for s in range(max_num_seqs + self.max_prefill_seqs, n_slots))
        self._waiting: deque[_Request] = deque()
        self._prefilling: list[_Sequence] = []
        self._decoding: list[_Sequence] = []  # _decoding[i].slot == i
        self._active: dict[str, _Request] = {}  # admitted and not finished
        self.prefix_tokens_reused = 0  # prompt tokens copied from the cache instead of computed
        self._generator = torch.Generator(device=self.device)
        self._generator.seed()
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self._drain = True

    # ---- the caller's side ----------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llmforge-engine", daemon=True)
            self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting; finish (drain) or abort what is queued and running, then stop."""
        with self._cv:
            self._accepting = False
            self._stop, self._drain = True, drain
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, *,
                    request_id: str | None = None,
                    on_delta: Callable[[Delta], None] | None = None,
                    on_finish: Callable[[RequestOutput], None] | None = None) -> RequestHandle:
        """Queue a request. Callbacks run on the engine thread and must not block."""
        params.validate()
        if params.n > self.max_num_seqs:
            raise ValueError(f"n={params.n} is more than the {self.max_num_seqs} sequences "
                             f"this engine decodes at once")
        self._check_prompt(prompt_ids)
        request = _Request(request_id or f"req-{uuid.uuid4().hex[:16]}", list(prompt_ids),
                           params, on_delta, on_finish)
        with self._cv:
            if not self._accepting:
                raise RuntimeError("the engine is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._cv.notify()
        return RequestHandle(request, self)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        """Run prompts to completion together (blocking)."""
        self.start()
        handles = [self.add_request(p, params) for p in prompts]
        return [h.result() for h in handles]

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds "
                             f"{self.max_model_len}, including at least one generated token")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    def _check_draft(self, draft: Transformer) -> None:
        if draft.cfg.vocab_size != self.vocab_size:
            raise ValueError(f"the draft model's vocabulary has {draft.cfg.vocab_size} entries, "
                             f"the target's {self.vocab_size}: a draft must share the target's "
                             f"tokenizer")
        if draft.cfg.max_seq_len < self.max_model_len:
            raise ValueError(f"the draft model's context ({draft.cfg.max_seq_len}) is shorter "
                             f"than max_model_len={self.max_model_len}")
        if draft.tok_emb.weight.device != self.device:
            raise ValueError(f"the draft model is on {draft.tok_emb.weight.device}, the target "
                             f"on {self.device}")

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ---- the engine thread ----------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._has_work() and not self._stop:
                    self._cv.wait()
                if self._stop and not (self._drain and self._has_work()):
                    break
            try:
                self.step()
            except Exception as err:  # a bad batch fails its requests, never the engine
                log.exception("engine step failed")
                self._fail_all(f"{type(err).__name__}: {err}")
        self._fail_all("the engine shut down")

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling round: cancellations, admissions, a prefill chunk, a decode step."""
        self._drop_cancelled()
        self._admit()
        if self._prefilling:
            self._prefill()
        if self._decoding:
            self._decode() if self.draft is None else self._speculate()

    def _drop_cancelled(self) -> None:
        with self._cv:
            cancelled = [r for r in self._waiting if r.cancelled]
            for r in cancelled:
                self._waiting.remove(r)
        for r in cancelled:
            self._finish_request(r)
        for seq in [s for s in self._prefilling if s.request.cancelled]:
            self._prefilling.remove(seq)
            self._free_prefill.append(seq.slot)
            self._finish(seq, "abort")
        self._finish_decoding([s for s in self._decoding if s.request.cancelled], "abort")

    def _admit(self) -> None:
        """Take waiting requests FIFO while a prefill slot and decode slots for all n are free."""
        reserved = len(self._decoding) + sum(s.request.params.n for s in self._prefilling)
        while self._free_prefill:
            with self._cv:
                if not self._waiting:
                    return
                request = self._waiting[0]
                if reserved + request.params.n > self.max_num_seqs:
                    return
                self._waiting.popleft()
            reserved += request.params.n
            self._active[request.id] = request
            seq = self._new_sequence(request, 0)
            seq.slot = self._free_prefill.pop()
            if request.params.prompt_logprobs is not None:
                request.prompt_logprobs = [None]
            else:  # scoring the prompt needs every position computed, so no reuse then
                seq.n_cached = self._reuse_prefix(request.prompt, seq.slot)
            self._prefilling.append(seq)

    def _new_sequence(self, request: _Request, index: int) -> _Sequence:
        seed = request.params.seed
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed + index)
        seq = _Sequence(request, index, list(request.prompt), gen)
        if request.params.logprobs is not None:
            seq.logprobs = []
        request.seqs.append(seq)
        return seq

    def _reuse_prefix(self, prompt: list[int], slot: int) -> int:
        """Copy the longest cached match of the prompt's start into `slot`; tokens reused."""
        best_slot, best = -1, 0
        candidates = [(s.slot, s.tokens[: s.n_cached]) for s in self._decoding + self._prefilling]
        candidates += list(self._pool.items())
        for cand_slot, tokens in candidates:
            n = _common_prefix(prompt, tokens)
            if n > best:
                best_slot, best = cand_slot, n
        best = min(best, len(prompt) - 1)  # the last prompt token is fed to get the next logits
        if best < self.min_prefix_reuse:
            return 0
        if best_slot in self._pool:
            self._pool.move_to_end(best_slot)
        self._copy(best_slot, slot, best)
        self.prefix_tokens_reused += best
        return best

    def _prefill(self) -> None:
        """Feed the next chunk of each admitted prompt, within the step's token budget."""
        budget, rows = self.max_prefill_tokens, []
        for seq in self._prefilling:
            take = min(seq.n_prompt - seq.n_cached, budget)
            if take <= 0:
                break
            rows.append((seq, take))
            budget -= take
        chunks = [seq.tokens[seq.n_cached : seq.n_cached + take] for seq, take in rows]
        starts = [seq.n_cached for seq, _ in rows]
        slots = torch.tensor([seq.slot for seq, _ in rows])
        hidden = self._run(chunks, starts, slots)
        if self.draft is not None:
            self._run(chunks, starts, slots, draft=True)
        done = []
        for r, (seq, take) in enumerate(rows):
            start = seq.n_cached
            seq.n_cached += take
            if seq.request.prompt_logprobs is not None:
                self._score_prompt(seq, hidden[r, :take], start)
            if seq.n_cached == seq.n_prompt:
                done.append((seq, hidden[r, take - 1]))
        for seq, last in done:
            self._prefilling.remove(seq)
            self._free_prefill.append(seq.slot)
            self._start_decoding(seq, self.model.logits(last))

    def _score_prompt(self, seq: _Sequence, hidden: Tensor, start: int) -> None:
        """Log-probs of the prompt tokens that positions start.. of this chunk predict."""
        targets = seq.request.prompt[start + 1 : start + 1 + hidden.size(0)]
        if not targets:
            return
        logits = self.model.logits(hidden[: len(targets)])
        k = seq.request.params.prompt_logprobs
        chosen, tops = token_logprobs(logits, torch.tensor(targets, device=logits.device),
                                      [k] * len(targets))
        seq.request.prompt_logprobs.extend(  # type: ignore[union-attr]
            TokenLogprob(t, lp, top) for t, lp, top in zip(targets, chosen.tolist(), tops,
                                                           strict=True))

    def _start_decoding(self, first: _Sequence, logits: Tensor) -> None:
        """A fully prefilled prompt: fork its n choices into decoding slots and sample each."""
        request = first.request
        if request.params.max_tokens == 0:
            self._finish(first, "length")
            return
        seqs = [first] + [self._new_sequence(request, i) for i in range(1, request.params.n)]
        for seq in seqs:
            seq.n_cached = first.n_cached
            self._copy(first.slot, len(self._decoding), first.n_cached)
            seq.slot = len(self._decoding)
            self._decoding.append(seq)
        self._sample_and_append(seqs, logits.expand(len(seqs), -1))

    def _decode(self) -> None:
        seqs = self._decoding
        hidden = self._run([[s.tokens[-1]] for s in seqs], [s.n_cached for s in seqs],
                           slice(0, len(seqs)))
        for s in seqs:
            s.n_cached += 1
        self._sample_and_append(list(seqs), self.model.logits(hidden[:, -1]))

    def _speculate(self) -> None:
        """A decode step with the draft: propose, verify in one target pass, keep what stands."""
        seqs = list(self._decoding)
        params = [s.request.params for s in seqs]
        ks = [self._num_drafts(s) for s in seqs]
        k = max(ks)
        noise = None
        if k:
            noise = draw_noise(params, [s.generator for s in seqs], ks, self.vocab_size,
                               self._generator, self.device)
        drafts, q = self._propose(seqs, params, ks, noise)
        logits = self._verify(seqs, drafts, k)
        tokens: list[list[int]] = [[] for _ in seqs]
        if k:
            p = sampling_probs(logits.flatten(0, 1), [x for x in params for _ in range(k + 1)])
            padded = torch.tensor([d + [0] * (k - len(d)) for d in drafts], device=self.device)
            stood, last = accept(p.view_as(logits), q, padded,
                                 torch.tensor(ks, device=self.device), noise)
            tokens = [d[:n] + [t] for d, n, t in zip(drafts, stood.tolist(), last.tolist(),
                                                     strict=True)]
            self.spec_stats = self.spec_stats.plus(sum(ks), int(stood.sum()),
                                                   sum(map(bool, ks)))
        plain = [i for i, n in enumerate(ks) if not n]
        if plain:  # the sampler as without a draft, penalties and all
            picked, _, _ = sample(logits[plain, 0], [params[i] for i in plain],
                                  [seqs[i].tokens for i in plain],
                                  [seqs[i].n_prompt for i in plain],
                                  [seqs[i].generator for i in plain], self._generator)
            for i, t in zip(plain, picked.tolist(), strict=True):
                tokens[i] = [t]
        for seq, n, new in zip(seqs, ks, tokens, strict=True):
            # The target holds the accepted drafts, the draft all but its last proposal.
            seq.n_cached = len(seq.tokens) + min(len(new) - 1, max(n - 1, 0))
        self._deliver(seqs, tokens, self._target_logprobs(seqs, logits, tokens))

    def _num_drafts(self, seq: _Sequence) -> int:
        """K, or fewer where max_tokens or the context leaves less room; none with penalties."""
        params = seq.request.params
        if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            return 0
        room = min(params.max_tokens - len(seq.out_ids), self.max_model_len - len(seq.tokens))
        return min(self.num_speculative_tokens, room - 1)

    def _propose(self, seqs: list[_Sequence], params: list[SamplingParams], ks: list[int],
                 noise: Noise | None) -> tuple[list[list[int]], Tensor | None]:
        """The draft's ks[i] tokens for each sequence and the distributions [B, K, V] they were
        drawn from. Its first pass also feeds the tokens its cache lacks, for every sequence,
        drafting or not, so that both caches stay level."""
        batch = slice(0, len(seqs))
        unseen = [s.tokens[s.n_cached :] for s in seqs]
        hidden = self._run(unseen, [s.n_cached for s in seqs], batch, draft=True)
        rows = torch.arange(len(seqs), device=self.device)
        last = torch.tensor([len(p) - 1 for p in unseen], device=self.device)
        drafts: list[list[int]] = [[] for _ in seqs]
        dists = []
        for j in range(max(ks)):
            q = sampling_probs(self.draft.logits(hidden[rows, last]), params)
            dists.append(q)
            picked = (q / noise.draft[:, j]).argmax(-1).tolist()
            for d, x, n in zip(drafts, picked, ks, strict=True):
                if j < n:
                    d.append(x)
            if j + 1 < max(ks):  # feed the new drafts of the rows that want more
                pieces = [d[-1:] if j + 1 < n else [] for d, n in zip(drafts, ks, strict=True)]
                hidden = self._run(pieces, [len(s.tokens) + j for s in seqs], batch,
                                   draft=True)
                last = torch.zeros_like(last)
        return drafts, torch.stack(dists, 1) if dists else None

    def _verify(self, seqs: list[_Sequence], drafts: list[list[int]], k: int) -> Tensor:
        """The target's logits [B, k+1, V] after each sequence's last token and after each of
        its drafts, from one pass over the batch."""
        pieces = [s.tokens[s.n_cached :] + d for s, d in zip(seqs, drafts, strict=True)]
        hidden = self._run(pieces, [s.n_cached for s in seqs], slice(0, len(seqs)))
        first = torch.tensor([len(s.tokens) - 1 - s.n_cached for s in seqs])
        cols = (first[:, None] + torch.arange(k + 1)).clamp(max=hidden.size(1) - 1)
        rows = torch.arange(len(seqs))[:, None]
        return self.model.logits(hidden[rows.to(self.device), cols.to(self.device)])

    def _target_logprobs(self, seqs: list[_Sequence], logits: Tensor,
                         tokens: list[list[int]]) -> list[list[TokenLogprob]]:
        """TokenLogprobs of each sequence's new tokens under the target's logits [B, k+1, V]."""
        where = [(r, j) for r, new in enumerate(tokens) for j in range(len(new))]
        rows, cols = (torch.tensor(x, device=self.device) for x in zip(*where, strict=True))
        ids = [t for new in tokens for t in new]
        chosen, tops = token_logprobs(logits[rows, cols], torch.tensor(ids, device=self.device),
                                      [seqs[r].request.params.logprobs for r, _ in where])
        flat = iter(zip(ids, chosen.tolist(), tops, strict=True))
        return [[TokenLogprob(*next(flat)) for _ in new] for new in tokens]

    def _run(self, pieces: list[list[int]], starts: list[int], slots: slice | Tensor, *,
             draft: bool = False) -> Tensor:
        """Final hidden states [B, W, D] of each row's tokens, placed from its start position in
        its slot of the target's (or the draft's) cache; shorter rows are padded."""
        kv_len = max(start + len(piece)
                     for start, piece in zip(starts, pieces, strict=True) if piece)
        self._reserve(kv_len)
        width = max(map(len, pieces))
        idx = torch.zeros(len(pieces), width, dtype=torch.long)
        write = torch.full((len(pieces), width), self.cache.scratch, dtype=torch.long)
        for r, (start, piece) in enumerate(zip(starts, pieces, strict=True)):
            idx[r, : len(piece)] = torch.tensor(piece)
            write[r, : len(piece)] = torch.arange(start, start + len(piece))
        return self._forward(idx, write, slots, kv_len, _mask(write, kv_len), draft)

    def _forward(self, idx: Tensor, positions: Tensor, slots: slice | Tensor, kv_len: int,
                 mask: dict, draft: bool = False) -> Tensor:
        """Final hidden states of idx [B, T], each token at its own position in its slot."""
        model, cache = (self.draft, self.draft_cache) if draft else (self.model, self.cache)
        dev = self.device
        positions, idx = positions.to(dev), idx.to(dev)
        mask = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in mask.items()}
        if isinstance(slots, Tensor):
            slots = slots.to(dev)
        cache.select(slots, positions, kv_len)
        rope = positions.clamp(max=self.max_model_len - 1)  # padding's column is past the end
        cos = model.rope_cos[rope][:, None]
        sin = model.rope_sin[rope][:, None]
        hidden, _ = model.hidden_states(idx, cos, sin, cache, mask)
        return hidden

    def _reserve(self, length: int) -> None:
        """Grow both caches together, so they share the scratch column."""
        self.cache.reserve(length)
        if self.draft_cache is not None:
            self.draft_cache.reserve(length)

    def _copy(self, src: int, dst: int, length: int) -> None:
        self.cache.copy(src, dst, length)
        if self.draft_cache is not None:
            self.draft_cache.copy(src, dst, length)

    def _sample_and_append(self, seqs: list[_Sequence], logits: Tensor) -> None:
        params = [s.request.params for s in seqs]
        tokens, chosen, tops = sample(
            logits, params, [s.tokens for s in seqs], [s.n_prompt for s in seqs],
            [s.generator for s in seqs], self._generator)
        self._deliver(seqs, [[t] for t in tokens.tolist()],
                      [[TokenLogprob(t, lp, top)] for t, lp, top in
                       zip(tokens.tolist(), chosen.tolist(), tops, strict=True)])

    def _deliver(self, seqs: list[_Sequence], tokens: list[list[int]],
                 logprobs: list[list[TokenLogprob]]) -> None:
        """Append each sequence's new tokens up to the first that ends it, send one delta per
        sequence, and finish those that ended."""
        now = time.monotonic()
        finished = []
        for seq, new, lps in zip(seqs, tokens, logprobs, strict=True):
            if seq.request.first_token_time is None:
                seq.request.first_token_time = now
            reason = next((r for t, lp in zip(new, lps, strict=True)
                           if (r := self._append(seq, t, lp))), None)
            # A sequence cut short mid-step holds no more cached tokens than it kept.
            seq.n_cached = min(seq.n_cached, len(seq.tokens))
            if reason:
                finished.append((seq, reason))
            else:
                self._send(seq, _safe_length(seq.text, seq.request.params.stop), None)
        for reason in ("stop", "length"):
            self._finish_decoding([s for s, r in finished if r == reason], reason)

    def _append(self, seq: _Sequence, token: int, logprob: TokenLogprob) -> str | None:
        """Add a sampled token; say why, when it ends the sequence.

        A stop token stays in the output's ids and logprobs but adds no text (as in vLLM):
        echo-scoring clients such as lm-evaluation-harness count on one more token than the
        prompt's, whatever it is.
        """
        params = seq.request.params
        seq.out_ids.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(logprob)
        if token in params.stop_token_ids or (token in self.stop_ids and not params.ignore_eos):
            return "stop"
        seq.tokens.append(token)
        seq.text = self.tokenizer.decode(seq.out_ids)
        cut = _find_stop(seq.text, params.stop, seq.emitted)
        if cut is not None:
            seq.text = seq.text[:cut]
            return "stop"
        if len(seq.out_ids) >= params.max_tokens or len(seq.tokens) >= self.max_model_len:
            return "length"
        return None

    def _send(self, seq: _Sequence, text_end: int, reason: str | None) -> None:
        """Deliver the tokens not yet sent and the text up to text_end."""
        first, seq.sent_tokens = seq.sent_tokens, len(seq.out_ids)
        text = seq.text[seq.emitted : text_end]
        seq.emitted = max(seq.emitted, text_end)
        if seq.request.on_delta is None:
            return
        logprobs = None if seq.logprobs is None else seq.logprobs[first:]
        try:
            seq.request.on_delta(Delta(seq.index, seq.out_ids[first:], text, logprobs, reason))
        except Exception:  # a caller's bug must not take the engine down
            log.exception("on_delta callback failed")

    def _finish_decoding(self, seqs: list[_Sequence], reason: str) -> None:
        """End decoding sequences; fill each hole with the last slot's sequence."""
        for seq in sorted(seqs, key=lambda s: -s.slot):
            self._remember_prefix(seq)
            last = self._decoding.pop()
            if last is not seq:
                self._copy(last.slot, seq.slot, last.n_cached)
                last.slot = seq.slot
                self._decoding[seq.slot] = last
            self._finish(seq, reason)

    def _remember_prefix(self, seq: _Sequence) -> None:
        """Keep a finished sequence's keys/values in the pool for later prompts that extend it."""
        if not self._pool or seq.n_cached < self.min_prefix_reuse:
            return
        tokens = seq.tokens[: seq.n_cached]
        # Replace an entry this sequence extends (the same conversation), else the oldest.
        slot = next((s for s, held in self._pool.items()
                     if _common_prefix(held, tokens) == len(held)), next(iter(self._pool)))
        self._copy(seq.slot, slot, seq.n_cached)
        self._pool[slot] = tokens
        self._pool.move_to_end(slot)

    def _finish(self, seq: _Sequence, reason: str) -> None:
        """Deliver the held-back text with the finish reason; finish the request with its last."""
        seq.finish_reason = reason
        self._send(seq, len(seq.text), reason)
        request = seq.request
        if len(request.seqs) == request.params.n and all(s.finish_reason for s in request.seqs):
            self._finish_request(request)

    def _finish_request(self, request: _Request, error: str | None = None) -> None:
        if request.finished.is_set():
            return
        self._active.pop(request.id, None)
        if not request.seqs:  # never admitted
            request.seqs = [_Sequence(request, i, [], None) for i in range(request.params.n)]
            for seq in request.seqs:
                seq.finish_reason = "abort"
        choices = [Choice(s.index, s.text, s.out_ids, s.logprobs, s.finish_reason or "abort")
                   for s in request.seqs]
        request.output = RequestOutput(
            request.id, request.prompt, request.prompt_logprobs, choices, request.arrival,
            request.first_token_time, time.monotonic(), error)
        request.finished.set()
        if request.on_finish is not None:
            try:
                request.on_finish(request.output)
            except Exception:
                log.exception("on_finish callback failed")

    def _fail_all(self, error: str) -> None:
        """End every request in flight (an engine error, or shutdown without draining)."""
        with self._cv:
            waiting = list(self._waiting)
            self._waiting.clear()
        requests = list(self._active.values()) + waiting
        self._free_prefill = list(range(self.max_num_seqs,
                                        self.max_num_seqs + self.max_prefill_seqs))
        self._prefilling.clear()
        self._decoding.clear()
        for request in requests:
            for seq in request.seqs:
                if seq.finish_reason is None:
                    seq.finish_reason = "abort"
                    self._send(seq, seq.emitted, "abort")
            self._finish_request(request, error)


def _slot_cache(model: Transformer, n_slots: int, max_len: int) -> SlotCache:
    cfg, weight = model.cfg, model.tok_emb.weight
    return SlotCache(cfg.n_layers, n_slots, cfg.n_kv_heads, max_len, cfg.head_dim,
                     device=weight.device, dtype=weight.dtype)


def _mask(write: Tensor, kv_len: int) -> dict:
    """SDPA masking for rows writing at their own positions [B, T]: a token sees its row's
    positions up to its own (padding, in the scratch column past kv_len, sees all; ignored)."""
    if write.size(0) == 1 and write[0, 0] == 0:
        return {"is_causal": write.size(1) > 1}  # nothing cached: the call unbatched decoding makes
    if write.size(1) == 1 and bool((write == kv_len - 1).all()):
        return {}  # one token per row, every row sees all kv_len positions
    return {"attn_mask": (torch.arange(kv_len)[None, None] <= write[:, :, None])[:, None]}


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix, by binary search over C-speed slice compares."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Where the first stop string begins in text (searching from `start`), or None."""
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of text can be sent: not a split character, nor what may begin a stop string."""
    end = len(text.rstrip("\ufffd"))
    held = max((k for stop in stops for k in range(min(len(stop) - 1, end), 0, -1)
                if text[end - k : end] == stop[:k]), default=0)
    return end - held
