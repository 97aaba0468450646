"""The OpenAI-compatible HTTP API over the inference engine.

Endpoints: /v1/completions, /v1/chat/completions (both also as server-sent event streams),
/v1/models, /tokenize, /detokenize, /health, /metrics and the chat page at /. With a request
store, every generation request is recorded and /v1/feedback takes users' judgements of them;
every request's safety flags (PII, toxicity, jailbreak attempts) are counted in /metrics.

The service keeps itself safe: an optional bearer key, limits on body size, prompt length and
max_tokens, a 429 when the engine's queue is full, OpenAI's error JSON for every failure
(never FastAPI's 422 or an HTML page), and engine requests cancelled as soon as their client
goes away, so an abandoned request never holds a decode slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from llmforge.monitor.safety import SafetyChecker
from llmforge.monitor.store import Feedback, RequestStore
from llmforge.serve.chat_model import ChatModel
from llmforge.serve.engine import Engine
from llmforge.serve.metrics import CountRequests, Metrics
from llmforge.serve.outputs import Delta, QueueFull, RequestOutput
from llmforge.serve.protocol import (
    APIError,
    ChatRequest,
    ChatShape,
    CompletionRequest,
    CompletionShape,
    DetokenizeRequest,
    FeedbackRequest,
    Message,
    TokenizeRequest,
    usage,
)
from llmforge.serve.request_log import request_record
from llmforge.serve.sampling import SamplingParams

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"
API_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize",
                 "/detokenize"}  # behind the API key, counted in llmforge_requests_total
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there
DRAIN_TIMEOUT_S = 30.0  # at shutdown, requests still in the engine are cancelled ones: quick

Shape = CompletionShape | ChatShape


@dataclass
class ServerSettings:
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on the API endpoints
    served_model_name: str | None = None  # default: the model spec it was opened from
    max_prompt_tokens: int | None = None  # default: engine.max_model_len - 1
    max_tokens_limit: int = 4096  # a larger max_tokens is a 400
    max_body_bytes: int = 1 << 20  # a larger request body is a 413
    default_max_tokens: int | None = None  # default: as many as fit, up to max_tokens_limit
    store: RequestStore | None = None  # where every request and its feedback are recorded
    model_version: str | None = None  # recorded with each request; default: the model's name
    safety: SafetyChecker = SafetyChecker()  # flags every request's prompt and output


def create_app(chat: ChatModel, engine: Engine, settings: ServerSettings) -> FastAPI:
    """The app; its lifespan starts the engine and, at shutdown, drains it."""
    server = _Server(chat, engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, drain=True, timeout=DRAIN_TIMEOUT_S)
        if settings.store is not None:
            await asyncio.to_thread(settings.store.close)

    app = FastAPI(title="llmforge", lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(CountRequests, metrics=server.metrics, endpoints=API_ENDPOINTS)
    _install_error_handlers(app)
    app.get("/health")(server.health)
    app.get("/metrics")(server.prometheus)
    app.get("/", include_in_schema=False)(server.chat_page)
    api = APIRouter(dependencies=[Depends(_require_key(settings.api_key))])
    api.get("/v1/models")(server.models)
    api.post("/v1/completions")(server.completions)
    api.post("/v1/chat/completions")(server.chat_completions)
    api.post("/tokenize")(server.tokenize)
    api.post("/detokenize")(server.detokenize)
    api.post("/v1/feedback")(server.feedback)
    app.include_router(api)
    return app


class _Server:
    """The endpoints, sharing the model, the engine, the settings and the metrics."""

    def __init__(self, chat: ChatModel, engine: Engine, settings: ServerSettings):
        self.chat, self.engine, self.settings = chat, engine, settings
        self.name = settings.served_model_name or chat.name
        self.max_prompt = settings.max_prompt_tokens or engine.max_model_len - 1
        store = settings.store
        self.metrics = Metrics(lambda: engine.num_running, lambda: engine.num_waiting,
                               store.failure_counts if store else dict,
                               lambda: engine.spec_stats)
        self.created = int(time.time())
        decode = chat.tokenizer.decode
        self.token_text = lru_cache(maxsize=1 << 16)(
            lambda i: decode([i], skip_special_tokens=False))

    # ---------- plain endpoints ----------

    async def health(self) -> dict:
        return {"status": "ok"}

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def chat_page(self) -> FileResponse:
        if not CHAT_PAGE.is_file():
            raise APIError(404, "no chat page in this installation")
        return FileResponse(CHAT_PAGE, media_type="text/html")

    async def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.name, "object": "model", "created": self.created, "owned_by": "llmforge",
            "max_model_len": self.engine.max_model_len}]}

    async def tokenize(self, body: TokenizeRequest) -> dict:
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'")
        if body.messages is not None:
            ids = self._render(body.messages)
        else:
            ids = self.chat.tokenizer.encode(body.prompt,
                                             add_special_tokens=body.add_special_tokens).ids
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        vocab = self.chat.tokenizer.get_vocab_size(with_added_tokens=True)
        if bad := [t for t in body.tokens if not 0 <= t < vocab]:
            raise APIError(400, f"token ids must be in [0, {vocab}), got {bad[:5]}",
                           param="tokens")
        return {"prompt": self.chat.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    async def feedback(self, body: FeedbackRequest) -> dict:
        """A user's thumb, rating, preferred answer or note on a response this server gave."""
        store = self.settings.store
        if store is None:
            raise APIError(404, "this server keeps no request store (start it with --store)")
        feedback = Feedback(thumb=body.thumb, rating=body.rating, preferred=body.preferred,
                            note=body.note)
        try:
            feedback.validate()
        except ValueError as e:
            raise APIError(400, str(e)) from e
        try:
            feedback_id = await asyncio.to_thread(store.add_feedback, body.id, feedback)
        except KeyError:
            raise APIError(404, f"no stored response with id {body.id!r}", param="id") from None
        for kind in feedback.kinds():
            self.metrics.feedback.labels(kind).inc()
        return {"id": feedback_id, "object": "feedback", "response_id": body.id}

    # ---------- generation ----------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        prompts = body.prompts()
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if body.stream and body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported when streaming",
                           param="echo")
        ids = [self._encode(p) for p in prompts]
        texts = [p if isinstance(p, str) else self.chat.tokenizer.decode(
            p, skip_special_tokens=False) for p in prompts] if body.echo else []
        shape = CompletionShape(self.token_text, texts, body.echo, body.logprobs is not None)
        return await self._generate(request, body, ids, shape)

    async def chat_completions(self, body: ChatRequest, request: Request) -> Response:
        self._check_model(body.model)
        if not body.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        shape = ChatShape(self.token_text, body.logprobs)
        return await self._generate(request, body, [self._render(body.messages)], shape)

    async def _generate(self, request: Request, body: CompletionRequest | ChatRequest,
                        prompts: list[list[int]], shape: Shape) -> Response:
        """Submit one engine request per prompt; answer at the end, or stream as they run."""
        params = [body.sampling_params(self._max_tokens(len(p), body)) for p in prompts]
        run = _Run(self.engine, self.metrics, prompts, params)
        meta = {"id": shape.id_prefix + run.id, "object": shape.object,
                "created": int(time.time()), "model": self.name}
        if body.stream:
            meta["object"] = shape.chunk_object
            return _EventStream(self._stream(request, run, shape, meta, body))
        outputs = await run.wait(request)
        if run.abandoned:
            request.state.outcome = "abort"
        error = next((o.error for o in outputs if o.error), None)
        self._record(request, meta["id"], body, outputs, error)
        if error:
            raise APIError(500, f"generation failed: {error}")
        choices = [shape.choice(i * body.n + c.index, out, c, i)
                   for i, out in enumerate(outputs) for c in out.choices]
        return JSONResponse({**meta, "choices": choices, "usage": usage(outputs)})

    async def _stream(self, request: Request, run: _Run, shape: Shape, meta: dict,
                      body: CompletionRequest | ChatRequest) -> AsyncIterator[str]:
        """OpenAI's chunks: an opening per choice (chat: the role), text pieces, a finish per
        choice, the usage when asked, then [DONE]."""
        extra = {"usage": None} if body.include_usage else {}

        def event(choices: list[dict], **fields) -> str:
            chunk = {**meta, "choices": choices, **extra, **fields}
            return f"data: {json.dumps(chunk)}\n\n"

        try:
            for index in range(len(run.outputs) * body.n):
                if (opening := shape.opening(index, index // body.n)) is not None:
                    yield event([opening])
            async for prompt, delta in run.deltas():
                index = prompt * body.n + delta.index
                if delta.text or delta.logprobs:
                    yield event([shape.piece(index, delta)])
                if delta.finish_reason:
                    yield event([shape.finish(index, delta.finish_reason)])
            if error := next((o.error for o in run.outputs if o.error), None):
                request.state.outcome = "error"
                yield f"data: {json.dumps(APIError(500, f'generation failed: {error}').body())}\n\n"
            elif body.include_usage:
                yield event([], usage=usage(run.outputs))
            yield "data: [DONE]\n\n"
        finally:
            if run.cancel():
                request.state.outcome = "abort"
            self._record(request, meta["id"], body, run.outputs,
                         next((o.error for o in run.outputs if o and o.error), None))

    def _record(self, request: Request, response_id: str, body: CompletionRequest | ChatRequest,
                outputs: list[RequestOutput | None], error: str | None) -> None:
        """Flag the finished request, count its flags and hand it to the store (never blocks,
        never raises)."""
        endpoint = "chat.completions" if isinstance(body, ChatRequest) else "completions"
        client = body.user or request.headers.get("x-client-id") or (
            request.client.host if request.client else None)
        version = self.settings.model_version or self.name
        record = request_record(response_id, body, outputs, model=self.name,
                                model_version=version, endpoint=endpoint, client_id=client,
                                safety=self.settings.safety, error=error)
        for flag in record.safety_flags:
            self.metrics.safety_flags.labels(version, flag).inc()
        if self.settings.store is not None:
            self.settings.store.log(record)

    # ---------- checks ----------

    def _check_model(self, model: str | None) -> None:
        if model and model != self.name:  # none or "": the served model
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                           f"'{self.name}'.", param="model", code="model_not_found")

    def _encode(self, prompt: str | list[int]) -> list[int]:
        """Text through the tokenizer (as /tokenize does); ids as they are (the engine checks
        them)."""
        return self.chat.tokenizer.encode(prompt).ids if isinstance(prompt, str) else prompt

    def _render(self, messages: list[Message]) -> list[int]:
        try:
            return self.chat.format.prompt([m.plain() for m in messages])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e

    def _max_tokens(self, prompt_len: int, body: CompletionRequest | ChatRequest) -> int:
        """The request's max_tokens, or the default: as many as fit in the context."""
        limit, requested = self.engine.max_model_len, body.requested_max_tokens
        if requested is not None and requested > self.settings.max_tokens_limit:
            raise APIError(400, f"max_tokens is {requested}; this server allows at most "
                           f"{self.settings.max_tokens_limit}", param="max_tokens")
        wanted = self.settings.default_max_tokens or self.settings.max_tokens_limit
        tokens = requested if requested is not None else min(wanted, limit - prompt_len)
        if prompt_len > self.max_prompt or prompt_len + tokens > limit:
            where = "messages" if isinstance(body, ChatRequest) else "prompt"
            cap = (f" A prompt may be at most {self.max_prompt} tokens."
                   if self.max_prompt < limit - 1 else "")
            raise APIError(400, f"This model's maximum context length is {limit} tokens. "
                           f"However, you requested {prompt_len + max(tokens, 0)} tokens "
                           f"({prompt_len} in the {where}, {max(tokens, 0)} in the completion)."
                           f"{cap} Please reduce the length of the {where} or completion.",
                           param=where, code="context_length_exceeded")
        return tokens


class _Run:
    """The engine requests (one per prompt) of one HTTP request.

    Engine callbacks arrive on the engine thread; they only hand their item to the event loop
    (`call_soon_threadsafe`), where one queue holds them in order.
    """

    def __init__(self, engine: Engine, metrics: Metrics, prompts: list[list[int]],
                 params: list[SamplingParams]):
        self.id = uuid.uuid4().hex
        self.outputs: list[RequestOutput | None] = [None] * len(prompts)
        self.abandoned = False  # the client went away before the end
        self._events: asyncio.Queue[tuple[int, Delta | RequestOutput]] = asyncio.Queue()
        self._handles = []
        loop = asyncio.get_running_loop()
        try:
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
                self._handles.append(engine.add_request(
                    ids, p, request_id=f"{self.id}-{i}", **self._callbacks(loop, metrics, i)))
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e)) from e
        except QueueFull:
            self.cancel()
            raise APIError(429, "The server is busy (its request queue is full); retry later.",
                           code="rate_limit_exceeded") from None
        except RuntimeError as e:  # the engine is shutting down
            self.cancel()
            raise APIError(503, f"The server is shutting down: {e}") from e

    def _callbacks(self, loop: asyncio.AbstractEventLoop, metrics: Metrics, i: int) -> dict:
        timer = metrics.timer()

        def post(item: Delta | RequestOutput) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(self._events.put_nowait, (i, item))

        def on_delta(delta: Delta) -> None:
            timer.delta(delta)
            post(delta)

        def on_finish(out: RequestOutput) -> None:
            timer.finish(out)
            post(out)

        return {"on_delta": on_delta, "on_finish": on_finish}

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """(prompt index, delta) as they come, until every request has finished."""
        while None in self.outputs:
            i, item = await self._events.get()
            if isinstance(item, RequestOutput):
                self.outputs[i] = item
            else:
                yield i, item

    async def wait(self, request: Request) -> list[RequestOutput]:
        """Every output; if the client disconnects first, the requests are cancelled (they end
        with finish_reason "abort")."""
        watcher = asyncio.create_task(self._cancel_on_disconnect(request))
        try:
            async for _ in self.deltas():
                pass
        finally:
            watcher.cancel()
            self.cancel()
        return self.outputs

    async def _cancel_on_disconnect(self, request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        self.abandoned = True
        self.cancel()

    def cancel(self) -> bool:
        """Cancel the requests still running; True if there were any."""
        running = [h for h, out in zip(self._handles, self.outputs, strict=False) if out is None]
        for handle in running:
            handle.cancel()
        return bool(running)


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed, whatever ends the response, so a
    client that leaves mid-stream cancels its engine requests at once."""

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass  # the generator's `finally` has recorded the abort
        finally:
            await self.body_iterator.aclose()


class _BodyLimit:
    """413 for a request body over `limit` bytes: at once when Content-Length says so, else as
    soon as a streamed body passes it."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"The request body is larger than this server's limit of {self.limit} bytes."
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse(APIError(413, message).body(), 413)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            received = await receive()
            seen += len(received.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, message)  # FastAPI passes it on while reading the body
            return received

        await self.app(scope, limited, send)


def _require_key(key: str | None):
    """A dependency checking "Authorization: Bearer KEY" (nothing to check without a key)."""
    async def check(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if key is not None and not (scheme.lower() == "bearer" and secrets.compare_digest(
                given.strip().encode(), key.encode())):
            raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    return check


def _install_error_handlers(app: FastAPI) -> None:
    """Every failure as OpenAI's error JSON: ours, validation (400, not 422), HTTP, crashes."""

    def reply(error: APIError, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error.body(), error.status, headers=headers)

    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return reply(exc)

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return reply(_validation_error(request, exc))

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return reply(APIError(exc.status_code, str(exc.detail)), exc.headers)

    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return reply(APIError(500, f"internal server error ({type(exc).__name__})"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crash)


def _validation_error(request: Request, exc: RequestValidationError) -> APIError:
    if "json" not in request.headers.get("content-type", ""):
        return APIError(415, "The request body must be JSON (Content-Type: application/json).")
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        return APIError(400, f"Malformed JSON body: {errors[0].get('ctx', {}).get('error', '')}")
    # Each member of a union (prompt: str | list[int] | ...) reports its own error: name the
    # field they share and all their reasons.
    same = [e for e in errors if e["loc"][:2] == errors[0]["loc"][:2]]
    common = itertools.takewhile(lambda parts: len(set(parts)) == 1,
                                 zip(*(e["loc"] for e in same), strict=False))
    field = ".".join(str(parts[0]) for parts in common if parts[0] != "body")
    reasons = " or ".join(dict.fromkeys(e["msg"] for e in same))
    return APIError(400, f"{field or 'request body'}: {reasons}", param=field or None)
