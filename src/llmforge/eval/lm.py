"""The three questions every benchmark asks a language model, answered in batches.

- `loglikelihood(context, continuation)`: log P(continuation | context) and whether the
  continuation is the greedy one (multiple choice, lm-evaluation-harness's `loglikelihood`);
- `loglikelihood_rolling(text)`: log P(text) over the whole text in windows of the model's
  context (perplexity, bits per byte);
- `generate_until(prompt, stop)`: greedy text up to a stop string (GSM8K, HumanEval).

Tokenisation follows lm-evaluation-harness so scores mean the same: a context's trailing
spaces move to the continuation, the pair is encoded whole and split where the context's own
encoding ends, and text with no context is scored after a prefix token (BOS, else EOS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from llmforge.model.transformer import Transformer


@dataclass
class Loglikelihood:
    logprob: float  # summed over the continuation's tokens
    is_greedy: bool  # every continuation token is the argmax at its position
    n_tokens: int


class LanguageModel:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, prefix_id: int,
                 stop_ids: tuple[int, ...] = (), batch_size: int = 16,
                 chat_prompt: Callable[[list[dict]], list[int]] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prefix_id = prefix_id
        self.stop_ids = stop_ids
        self.batch_size = batch_size
        # With a chat format, each context is one user turn and the model answers as the
        # assistant (lm-evaluation-harness's --apply_chat_template).
        self.chat_prompt = chat_prompt
        self.max_len = model.cfg.max_seq_len
        self.device = model.tok_emb.weight.device

    @classmethod
    def for_chat(cls, chat, batch_size: int = 16, chat_template: bool = False) -> LanguageModel:
        """An opened `serve.chat_model.ChatModel` wrapped for scoring (prefix: its prefix_id);
        with `chat_template`, prompts go through its chat format as a user turn."""
        return cls(chat.model, chat.tokenizer, prefix_id=chat.prefix_id,
                   stop_ids=tuple(chat.stop_ids), batch_size=batch_size,
                   chat_prompt=chat.format.prompt if chat_template else None)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a context: the text itself, or a user turn and the reply's opening."""
        if self.chat_prompt is None:
            return self.encode(text)
        return self.chat_prompt([{"role": "user", "content": text.strip()}])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids as lm-evaluation-harness splits them."""
        if self.chat_prompt is not None:  # the continuation opens the assistant's reply
            return self.encode_prompt(context), self.encode(continuation.lstrip())
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids):]

    @torch.inference_mode()
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[Loglikelihood]:
        pairs = []
        for context, continuation in requests:
            ctx, cont = self.encode_pair(context, continuation)
            if not cont:
                raise ValueError(f"empty continuation for context {context[-40:]!r}")
            pairs.append(([self.prefix_id] if not ctx else ctx, cont))
        return self._score(pairs)

    @torch.inference_mode()
    def loglikelihood_rolling(self, texts: list[str]) -> list[Loglikelihood]:
        """Each token of each text scored once, with up to max_seq_len - 1 tokens of history."""
        results = []
        for text in texts:
            ids = [self.prefix_id, *self.encode(text)]
            windows, start = [], 1
            while start < len(ids):
                end = min(start + self.max_len - 1, len(ids))
                history = ids[max(0, end - self.max_len) : start]
                windows.append((history, ids[start:end]))
                start = end
            parts = self._score(windows)
            results.append(Loglikelihood(sum(p.logprob for p in parts),
                                         all(p.is_greedy for p in parts),
                                         sum(p.n_tokens for p in parts)))
        return results

    def generate_until(self, prompts: list[str], stop: list[str],
                       max_new_tokens: int = 256) -> list[str]:
        """Greedy continuation of each prompt, cut at the first stop string (not included);
        all prompts decode together on the serving engine."""
        from llmforge.serve.engine import Engine
        from llmforge.serve.sampling import SamplingParams

        ids = [self.encode_prompt(p)[-(self.max_len - 1):] or [self.prefix_id] for p in prompts]
        longest = max(map(len, ids)) + max_new_tokens
        engine = Engine(self.model, self.tokenizer, stop_ids=self.stop_ids,
                        max_num_seqs=self.batch_size, max_model_len=min(longest, self.max_len),
                        max_waiting=len(ids), prefix_cache_slots=4)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop=tuple(stop))
        try:
            return [out.choices[0].text for out in engine.generate(ids, params)]
        finally:
            engine.shutdown()

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[Loglikelihood]:
        """Score continuation ids after context ids, batched by length, longest first."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[Loglikelihood | None] = [None] * len(pairs)
        for first in range(0, len(order), self.batch_size):
            batch = order[first : first + self.batch_size]
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_len + 1):][:-1] for i in batch]
            width = max(map(len, rows))
            x = torch.zeros(len(rows), width, dtype=torch.long)
            for r, row in enumerate(rows):
                x[r, : len(row)] = torch.tensor(row)
            logprobs = F.log_softmax(self.model(x.to(self.device)).float(), dim=-1)
            for r, i in enumerate(batch):
                cont = pairs[i][1]
                end = len(rows[r])
                positions = logprobs[r, end - len(cont) : end]
                target = torch.tensor(cont, device=positions.device)
                picked = positions.gather(1, target[:, None]).squeeze(1)
                greedy = bool((positions.argmax(-1) == target).all())
                results[i] = Loglikelihood(float(picked.sum()), greedy, len(cont))
        return results  # type: ignore[return-value]
