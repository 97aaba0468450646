"""`llmforge serve`: open a model, put the engine behind the HTTP API, run uvicorn.

On SIGTERM or Ctrl-C uvicorn stops accepting connections and gives requests in flight up to
`graceful_timeout` seconds to finish; then the app's lifespan drains and stops the engine.
"""

from __future__ import annotations

import uvicorn

from llmforge.model.quant import quantize_int4
from llmforge.serve.api import ServerSettings, create_app
from llmforge.serve.chat_model import open_chat_model
from llmforge.serve.engine import Engine
from llmforge.train.device import pick_device


def serve(spec: str, *, host: str = "127.0.0.1", port: int = 8000,
          settings: ServerSettings | None = None, max_num_seqs: int = 32,
          max_model_len: int | None = None, max_waiting: int = 256, device: str = "auto",
          graceful_timeout: float = 30.0, quantization: str = "none") -> None:
    """Serve the model `spec` (a model directory, an HF directory, hf://owner/name or
    gguf:PATH) until stopped; `quantization="int4"` stores the blocks' weights in 4 bits."""
    chat = open_chat_model(spec, device=pick_device(device))
    if quantization == "int4":
        quantize_int4(chat.model)
    engine = Engine(chat.model, chat.tokenizer, stop_ids=chat.stop_ids,
                    max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                    max_waiting=max_waiting)
    app = create_app(chat, engine, settings or ServerSettings())
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=graceful_timeout,
                log_level="info")
