"""Any model llmforge can open, evaluated by EleutherAI's lm-evaluation-harness (lm-eval).

The model is registered with lm-eval as ``llmforge`` and takes these model_args:

- ``path``: anything `open_chat_model` opens: a model directory trained here, a Hugging Face
  model directory, ``hf://owner/name[@revision]`` or ``gguf:PATH``;
- ``batch_size`` (default 16), ``device`` (default cpu), ``max_gen_toks`` (default 256).

lm-eval always passes its own ``--batch_size`` (default 1) and ``--device`` (default cuda:0)
too: values in model_args win over them, and cuda without CUDA falls back to the CPU.

lm-eval 0.4.13 has no plugin mechanism for external models (no entry-point group; only the
models in its own ``MODEL_MAPPING`` are known), so the class must be registered by importing
this module before lm-eval looks the name up. From the command line, run lm-eval through
this module, which takes exactly lm-eval's own arguments::

    python -m llmforge.eval.lm_eval_adapter --model llmforge \\
        --model_args path=runs/demo/sft/model,batch_size=16 \\
        --tasks arc_easy --limit 100

    python -m llmforge.eval.lm_eval_adapter run --model llmforge \\
        --model_args path=gguf:/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --tasks my_task --include_path my_tasks/

From Python, import this module and call ``lm_eval.simple_evaluate(model="llmforge",
model_args="path=...", tasks=[...])``.

Scoring is `LanguageModel`'s, which tokenises as lm-eval's own HF model does (a context's
trailing spaces move to the continuation, text without context is scored after a prefix
token: BOS when the model has one, else its first stop id). Generation is greedy only.
"""

from __future__ import annotations

import logging
import sys

import lm_eval.models  # noqa: F401  (lm-eval fills its registry lazily only while it is empty)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string

from llmforge.eval.lm import LanguageModel
from llmforge.serve.chat_model import ChatModel, open_chat_model

log = logging.getLogger(__name__)

MODEL_NAME = "llmforge"


class LlmforgeLM(LM):
    """lm-eval's three request types answered by `LanguageModel` over `open_chat_model(path)`."""

    def __init__(self, path: str, batch_size: int | str | None = 16, device: str | None = "cpu",
                 max_gen_toks: int = 256, max_batch_size: int | None = None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            log.warning("llmforge: ignoring unknown model_args %s", sorted(kwargs))
        self.path = str(path)
        self._device = _device(device)
        self.chat: ChatModel = open_chat_model(self.path, self._device)
        self.max_gen_toks = int(max_gen_toks)
        self.prefix_id = self.chat.prefix_id
        self.lm: LanguageModel = LanguageModel.for_chat(self.chat, _batch_size(batch_size))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """model_args win over the harness's own --batch_size/--device (which it always sends)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.chat.name.replace("/", "__")

    # ---- requests ----------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if not requests:
            return []
        results = self.lm.loglikelihood([tuple(r.args) for r in requests])
        out = [(r.logprob, r.is_greedy) for r in results]
        for request, answer in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if not requests:
            return []
        results = self.lm.loglikelihood_rolling([r.args[0] for r in requests])
        out = [r.logprob for r in results]
        for request, answer in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, answer)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy text for each context, cut at its first `until` string; grouped by settings."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            groups.setdefault(self._generation_settings(gen_kwargs or {}), []).append(i)
        out: list[str] = [""] * len(requests)
        for (until, max_new), indices in groups.items():
            texts = self.lm.generate_until([requests[i].args[0] for i in indices], list(until),
                                           max_new_tokens=max_new)
            for i, text in zip(indices, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generation_settings(self, gen_kwargs: dict) -> tuple[tuple[str, ...], int]:
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_new = int(gen_kwargs.pop("max_gen_toks", None) or self.max_gen_toks)
        if gen_kwargs.pop("do_sample", False) or float(gen_kwargs.pop("temperature", 0) or 0) > 0:
            log.warning("llmforge: sampling requested (%s); generating greedily instead",
                        gen_kwargs)
        for key in sorted(gen_kwargs):
            log.debug("llmforge: ignoring generation setting %s=%r", key, gen_kwargs[key])
        return tuple(until), max_new

    # ---- chat --------------------------------------------------------------------------------

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The model's own chat format as text (its special tokens re-encode as themselves)."""
        if not add_generation_prompt:
            raise NotImplementedError("llmforge: prefilling an assistant turn is not supported")
        ids = self.chat.format.prompt(chat_history)
        return self.chat.tokenizer.decode(ids, skip_special_tokens=False)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer_name if chat_template else ""


def _device(device: str | None) -> str:
    """lm-eval's command line defaults to cuda:0; without CUDA that means the CPU."""
    if not device:
        return "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("llmforge: %s requested but CUDA is not available; using the CPU", device)
        return "cpu"
    return str(device)


def _batch_size(value: int | str | None) -> int:
    if value is None or str(value).startswith("auto"):
        return 16
    return int(value)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``llmforge`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    # Run through the module's real name, so that the class lm-eval knows is the importable one.
    from llmforge.eval.lm_eval_adapter import main as _main

    _main()
else:
    register_model(MODEL_NAME)(LlmforgeLM)
