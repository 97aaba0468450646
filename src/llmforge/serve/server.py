"""`llmforge serve`: open a model, put the engine behind the HTTP API, run uvicorn.

On SIGTERM or Ctrl-C uvicorn stops accepting connections and gives requests in flight up to
`graceful_timeout` seconds to finish; then the app's lifespan drains and stops the engine.
"""

from __future__ import annotations

import uvicorn

from llmforge.model.quant import quantize_int4
from llmforge.model.transformer import Transformer
from llmforge.serve.api import ServerSettings, create_app
from llmforge.serve.chat_model import ChatModel, open_chat_model
from llmforge.serve.engine import Engine
from llmforge.serve.speculative import check_same_vocab
from llmforge.train.device import pick_device


def serve(spec: str, *, host: str = "127.0.0.1", port: int = 8000,
          settings: ServerSettings | None = None, max_num_seqs: int = 32,
          max_model_len: int | None = None, max_waiting: int = 256, device: str = "auto",
          graceful_timeout: float = 30.0, quantization: str = "none",
          draft_model: str | None = None, num_speculative_tokens: int = 4,
          draft_quantization: str = "none") -> None:
    """Serve the model `spec` (a model directory, an HF directory, hf://owner/name or
    gguf:PATH) until stopped; `quantization="int4"` stores the blocks' weights in 4 bits.
    `draft_model` (any such source, with the same tokenizer) proposes `num_speculative_tokens`
    tokens per step for speculative decoding."""
    chat = open_chat_model(spec, device=pick_device(device))
    if quantization == "int4":
        quantize_int4(chat.model)
    draft = None
    if draft_model is not None:
        draft = open_draft(draft_model, chat, quantization=draft_quantization)
    engine = Engine(chat.model, chat.tokenizer, stop_ids=chat.stop_ids,
                    max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                    max_waiting=max_waiting, draft=draft,
                    num_speculative_tokens=num_speculative_tokens)
    app = create_app(chat, engine, settings or ServerSettings())
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=graceful_timeout,
                log_level="info")


def open_draft(spec: str, target: ChatModel, *, quantization: str = "none") -> Transformer:
    """The draft model `spec` on the target's device, refused unless its tokenizer is the
    target's; `quantization="int4"` as for the target."""
    draft = open_chat_model(spec, device=target.model.tok_emb.weight.device)
    check_same_vocab(target.tokenizer, draft.tokenizer)
    if quantization == "int4":
        quantize_int4(draft.model)
    return draft.model
