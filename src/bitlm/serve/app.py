"""The OpenAI-compatible HTTP app (FastAPI): validate, render the chat template, hand requests
to the :class:`~bitlm.serve.scheduler.Scheduler`, stream, count.  It never runs the model.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health`` (503 while loading), ``GET /metrics`` (Prometheus text), ``POST /tokenize``,
``POST /detokenize``.  Errors are OpenAI error objects ``{"error": {"message", "type", "param",
"code"}}``: 400 for a bad body (naming the field) or a prompt that does not fit, 401 for a
missing or wrong API key, 404 for an unknown model or route, 503 while loading or shutting down.

Streaming follows the OpenAI chunk contract: one id in every chunk; the first chat chunk carries
only the assistant role; text arrives in later chunks (never a partial UTF-8 character, never
part of a stop string); the last choice chunk has ``finish_reason`` and no content; with
``stream_options.include_usage`` a chunk with empty ``choices`` and the usage precedes
``data: [DONE]``.  A client that disconnects cancels its sequence within one decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import memory
from ..generate import SamplingParams
from .scheduler import Event, Scheduler, SchedulerClosed, TokenLogprob
from .scheduler import Request as GenRequest

__all__ = ["ServerState", "create_app"]


# ---------------------------------------------------------------------------------------------
# Request bodies (strict types: "5" is not a number; unknown fields are ignored, as OpenAI does)
# ---------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = None  # extension (llama.cpp / vLLM); <= 0 disables it
    repetition_penalty: float = Field(1.0, gt=0.0)  # extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_Part] | None = None


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=0)


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    # union members show up in the location ("prompt.str", "messages.0.content.list[_Part]"): keep
    # only the names and indices the user wrote
    loc = [str(x) for x in err.get("loc", ()) if not (isinstance(x, str) and (x in _TYPE_NAMES or "[" in x
                                                                            or x.startswith("function")))]
    param = ".".join(loc)
    return ApiError(400, f"{param}: {err.get('msg', 'invalid value')}", param or None)


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "_Part", "_Message"}


# ---------------------------------------------------------------------------------------------
# Server state
# ---------------------------------------------------------------------------------------------


class ServerState:
    """What the routes share: the served model's name, the scheduler once loaded, the key."""

    def __init__(self, model_name: str, api_key: str | None = None,
                 loader: Callable[[ServerState], None] | None = None) -> None:
        self.model_name, self.api_key, self.loader = model_name, api_key, loader
        self.scheduler: Scheduler | None = None
        self.tokenizer = None
        self.template = None
        self.load_error: str | None = None
        self.load_exc: BaseException | None = None
        self.on_load_error: Callable[[BaseException], None] | None = None  # the CLI stops the server
        self.closing = False
        self.created = int(time.time())
        self.memory_bound: int | None = None
        self.http_requests: dict[tuple[str, int], int] = {}

    def ready(self) -> Scheduler:
        if self.closing:
            raise ApiError(503, "the server is shutting down", type_="unavailable_error")
        if self.scheduler is None:
            msg = f"model failed to load: {self.load_error}" if self.load_error else "Loading model"
            raise ApiError(503, msg, type_="unavailable_error")
        return self.scheduler


def _rss() -> int | None:
    return memory.proc_bytes("/proc/self/status", "VmRSS")


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.loader is not None and state.scheduler is None:
            def load() -> None:
                try:
                    state.loader(state)
                except Exception as e:  # noqa: BLE001 - reported by /health and every route, and to on_load_error
                    state.load_exc, state.load_error = e, f"{type(e).__name__}: {e}"
                    if state.on_load_error is not None:
                        state.on_load_error(e)
            threading.Thread(target=load, name="bitlm-load", daemon=True).start()
        yield
        state.closing = True
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.close, 30.0)

    app = FastAPI(title="bitlm", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type_=kind).response()

    class _Count:
        """Counts responses by route and status, from the status the app really sends (a plain ASGI
        wrapper: it neither buffers nor wraps streams, and a client leaving mid-stream is no error)."""

        def __init__(self, inner) -> None:
            self.inner = inner

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            path = scope.get("path", "")

            async def counted(message) -> None:
                if message["type"] == "http.response.start":
                    key = (path if path in _ROUTES else "other", message["status"])
                    state.http_requests[key] = state.http_requests.get(key, 0) + 1
                await send(message)

            await self.inner(scope, receive, counted)

    app.add_middleware(_Count)

    def auth(request: Request) -> None:
        if state.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not got.lower().startswith("bearer ") or got[7:].strip() != state.api_key:
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           type_="invalid_request_error", code="invalid_api_key")

    async def body_of(request: Request, cls: type[BaseModel]):
        raw = await request.body()
        try:
            data = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None

    def check_model(body: _Body) -> None:
        if body.model is not None and body.model != state.model_name:
            raise ApiError(404, f"the model '{body.model}' does not exist; this server serves '{state.model_name}'",
                           "model", code="model_not_found")

    def sampling(body: _Body) -> SamplingParams:
        top_k = body.top_k if body.top_k is not None and body.top_k > 0 else None
        seed = body.seed if body.seed is not None else random.getrandbits(31)
        if not 0 <= seed < 2**63:
            raise ApiError(400, f"seed: must be in [0, 2^63), got {seed}", "seed")
        return SamplingParams(body.temperature, top_k, body.top_p, body.repetition_penalty, seed)

    def stops(body: _Body, extra: list[str] = ()) -> list[str]:
        s = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(s) > 16:
            raise ApiError(400, "stop: at most 16 stop strings", "stop")
        return [x for x in s if x] + list(extra)

    def budget(sched: Scheduler, n_prompt: int, asked: int | None, default: int | None, param: str) -> int:
        if n_prompt >= sched.ctx:
            raise ApiError(400, f"the prompt has {n_prompt} tokens, the context holds {sched.ctx}: "
                                "shorten it", "messages" if param == "max_tokens" and default is None else "prompt",
                           code="context_length_exceeded")
        room = sched.ctx - n_prompt
        if asked is None:
            return room if default is None else min(default, room)
        if asked > room:
            raise ApiError(400, f"max_tokens: the prompt ({n_prompt} tokens) + max_tokens ({asked}) exceed the "
                                f"context of {sched.ctx} tokens", "max_tokens", code="context_length_exceeded")
        return asked

    def submit(sched: Scheduler, req: GenRequest) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def emit(e: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                loop.call_soon_threadsafe(q.put_nowait, e)

        req.emit = emit
        try:
            sched.submit(req)
        except SchedulerClosed as e:
            raise ApiError(503, str(e), type_="unavailable_error") from None
        except ValueError as e:
            raise ApiError(400, str(e), "prompt") from None
        return q

    async def events(request: Request, req: GenRequest, q: asyncio.Queue) -> AsyncIterator[Event]:
        """The request's events until it finishes; a disconnected client cancels it."""
        try:
            while True:
                try:
                    e = await asyncio.wait_for(q.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield e
                if e.finish_reason is not None:
                    return
        finally:
            if req.finished is None:
                req.cancel()

    tok_text = lambda i: state.tokenizer.decode([i])  # noqa: E731

    def chat_lp(entries: list[TokenLogprob]) -> list[dict]:
        def one(t: int, lp: float) -> dict:
            s = tok_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return [{**one(x.token, x.logprob), "top_logprobs": [one(t, lp) for t, lp in x.top]} for x in entries]

    def usage(p: int, c: int) -> dict:
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    # -- chat ----------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        auth(request)
        body: ChatBody = await body_of(request, ChatBody)
        check_model(body)
        sched = state.ready()
        messages = []
        for i, m in enumerate(body.messages):
            c = m.content
            if isinstance(c, list):
                if any(p.type != "text" or p.text is None for p in c):
                    raise ApiError(400, f"messages.{i}.content: only text parts are supported", f"messages.{i}.content")
                c = "".join(p.text for p in c)
            messages.append({"role": m.role, "content": c or ""})
        try:
            ids = state.template.render_ids(messages)
        except Exception as e:  # noqa: BLE001 - a template's raise_exception, or a Jinja error
            raise ApiError(400, f"messages: the chat template rejected them: {e}", "messages") from None
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = budget(sched, len(ids), asked, None, "max_tokens")
        if max_tokens < 1:
            raise ApiError(400, "max_tokens: must be >= 1", "max_tokens")
        n_lp = (body.top_logprobs or 0) if body.logprobs else None
        req = GenRequest(ids, max_tokens, sampling(body), stops(body, state.template.stop), n_lp)
        q = submit(sched, req)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": created, "model": state.model_name, "system_fingerprint": None}
        if not body.stream:
            text, lps, fin = [], [], None
            async for e in events(request, req, q):
                text.append(e.text)
                lps += e.logprobs
                fin = e
            if fin is None or fin.finish_reason == "cancelled":
                return JSONResponse({}, status_code=499)
            if fin.finish_reason == "error":
                raise ApiError(500, f"generation failed: {fin.error}", type_="server_error")
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "logprobs": {"content": chat_lp(lps)} if n_lp is not None else None,
                                 "finish_reason": fin.finish_reason}],
                    "usage": usage(fin.prompt_tokens, fin.completion_tokens)}
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict, finish: str | None = None, lp: list | None = None) -> str:
            return sse({**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": {"content": lp} if lp else None,
                                     "finish_reason": finish}], **extra})

        async def gen() -> AsyncIterator[str]:
            yield chunk({"role": "assistant"})
            async for e in events(request, req, q):
                if e.text or e.logprobs:
                    yield chunk({"content": e.text} if e.text else {}, lp=chat_lp(e.logprobs) if e.logprobs else None)
                if e.finish_reason == "error":
                    yield sse({"error": {"message": f"generation failed: {e.error}", "type": "server_error",
                                         "param": None, "code": None}})
                elif e.finish_reason is not None and e.finish_reason != "cancelled":
                    yield chunk({}, e.finish_reason)
                    if include_usage:
                        yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                                   "usage": usage(e.prompt_tokens, e.completion_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- completions -------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        auth(request)
        body: CompletionBody = await body_of(request, CompletionBody)
        check_model(body)
        sched = state.ready()
        p = body.prompt
        if isinstance(p, str):
            prompts = [p]
        elif not p:
            raise ApiError(400, "prompt: must not be empty", "prompt")
        elif isinstance(p[0], int):
            prompts = [p]
        else:
            prompts = list(p)
        from ..tasks import encode_text

        id_lists = []
        for i, x in enumerate(prompts):
            ids = encode_text(state.tokenizer, x) if isinstance(x, str) else list(x)
            if not ids:
                raise ApiError(400, f"prompt: prompt {i} is empty", "prompt")
            id_lists.append(ids)
        if body.stream and len(id_lists) > 1:
            raise ApiError(400, "prompt: streaming takes one prompt per request", "prompt")
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens: 0 is allowed only with echo", "max_tokens")
        sp = sampling(body)
        reqs = []
        for ids in id_lists:
            mt = budget(sched, len(ids), body.max_tokens, 16, "max_tokens")
            reqs.append(GenRequest(ids, mt, sp, stops(body), body.logprobs,
                                   prompt_logprobs=body.echo and body.logprobs is not None))
        queues = []
        try:
            for r in reqs:
                queues.append(submit(sched, r))
        except ApiError:
            for r in reqs:
                r.cancel()
            raise
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                "system_fingerprint": None}

        def lp_block(entries: list[TokenLogprob | None], ids: list[int], offset0: int) -> dict:
            toks, tlp, top, off = [], [], [], []
            pos = offset0
            for t, x in zip(ids, entries):
                s = tok_text(t)
                toks.append(s)
                off.append(pos)
                pos += len(s)
                tlp.append(None if x is None else x.logprob)
                top.append(None if x is None else {tok_text(i): lp for i, lp in x.top})
            return {"tokens": toks, "token_logprobs": tlp, "top_logprobs": top, "text_offset": off}

        async def collect(i: int, r: GenRequest, q: asyncio.Queue) -> tuple[dict, Event | None]:
            text, lps, prompt_lp, fin = [], [], None, None
            async for e in events(request, r, q):
                text.append(e.text)
                lps += e.logprobs
                if e.prompt_logprobs is not None:
                    prompt_lp = e.prompt_logprobs
                fin = e
            prefix = state.tokenizer.decode(r.prompt_ids) if body.echo else ""
            choice = {"index": i, "text": prefix + "".join(text), "logprobs": None,
                      "finish_reason": fin.finish_reason if fin else None}
            if body.logprobs is not None:
                gen_ids = [x.token for x in lps]
                block = lp_block(lps, gen_ids, len(prefix))
                if body.echo:
                    pre = lp_block(prompt_lp or [None] * len(r.prompt_ids), r.prompt_ids, 0)
                    block = {k: pre[k] + block[k] for k in block}
                choice["logprobs"] = block
            return choice, fin

        if not body.stream:
            results = await asyncio.gather(*(collect(i, r, q) for i, (r, q) in enumerate(zip(reqs, queues))))
            fins = [f for _, f in results]
            if any(f is None or f.finish_reason == "cancelled" for f in fins):
                return JSONResponse({}, status_code=499)
            bad = next((f for f in fins if f.finish_reason == "error"), None)
            if bad is not None:
                raise ApiError(500, f"generation failed: {bad.error}", type_="server_error")
            return {**head, "choices": [c for c, _ in results],
                    "usage": usage(sum(f.prompt_tokens for f in fins), sum(f.completion_tokens for f in fins))}
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}
        r, q = reqs[0], queues[0]

        def chunk(text: str, finish: str | None = None, lp: dict | None = None) -> str:
            return sse({**head, "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}],
                        **extra})

        async def gen() -> AsyncIterator[str]:
            offset = 0
            if body.echo:
                prefix = state.tokenizer.decode(r.prompt_ids)
                yield chunk(prefix)
                offset = len(prefix)
            async for e in events(request, r, q):
                if e.text or e.logprobs:
                    lp = lp_block(e.logprobs, [x.token for x in e.logprobs], offset) if body.logprobs is not None else None
                    yield chunk(e.text, lp=lp)
                    offset += len(e.text)
                if e.finish_reason == "error":
                    yield sse({"error": {"message": f"generation failed: {e.error}", "type": "server_error",
                                         "param": None, "code": None}})
                elif e.finish_reason is not None and e.finish_reason != "cancelled":
                    yield chunk("", e.finish_reason)
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": usage(e.prompt_tokens, e.completion_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- models, health, metrics, tokenizer --------------------------------------------------------
    def model_card() -> dict:
        ctx = state.scheduler.ctx if state.scheduler is not None else None
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "bitlm",
                "max_model_len": ctx}

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        auth(request)
        if model_id != state.model_name:
            raise ApiError(404, f"the model '{model_id}' does not exist", "model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        state.ready()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        s = state.scheduler
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, value: float | None, labels: str = "") -> None:
            if f"# TYPE bitlm_{name} " not in "".join(lines[-3:]):
                lines.extend([f"# HELP bitlm_{name} {help_}\n", f"# TYPE bitlm_{name} {kind}\n"])
            if value is not None:
                lines.append(f"bitlm_{name}{labels} {value}\n")

        metric("model_loaded", "gauge", "1 once the model is loaded and serving", int(s is not None))
        if s is not None:
            m = s.metrics
            cap = s.parallel * s.ctx
            used = s.pool.tokens_used()
            metric("requests_running", "gauge", "sequences decoding now", s.running())
            metric("requests_waiting", "gauge", "requests queued for a free slot", s.waiting())
            metric("prompt_tokens_total", "counter", "prompt tokens prefilled", m.prompt_tokens)
            metric("generation_tokens_total", "counter", "tokens generated", m.generation_tokens)
            metric("prompt_seconds_total", "counter", "seconds spent in separate prefills (prompts folded into a "
                   "decode step count there)", round(m.prompt_seconds, 6))
            metric("decode_seconds_total", "counter", "seconds spent in batched decode steps (with any prompts folded "
                   "in)", round(m.decode_seconds, 6))
            metric("decode_steps_total", "counter", "batched decode steps", m.decode_steps)
            metric("prompts_folded_total", "counter", "prefills run inside a decode step", m.prompts_folded)
            metric("decode_sequences_total", "counter", "sequences summed over decode steps (mean batch = this / steps)",
                   m.decode_rows)
            metric("kv_cache_tokens", "gauge", "KV-cache positions in use", used)
            metric("kv_cache_usage_ratio", "gauge", "KV-cache positions in use / (parallel x ctx)", round(used / cap, 6))
            metric("kv_cache_slots", "gauge", "KV-cache slots (--parallel)", s.parallel)
            metric("kv_cache_bytes", "gauge", "bytes of the preallocated KV-cache pool", s.pool.nbytes)
            for reason, n in sorted(m.requests_total.items()):
                metric("requests_finished_total", "counter", "requests finished, by reason", n,
                       f'{{finish_reason="{reason}"}}')
        for (path, code), n in sorted(state.http_requests.items()):
            metric("http_requests_total", "counter", "HTTP requests by route and status", n,
                   f'{{route="{path}",status="{code}"}}')
        if state.memory_bound is not None:
            metric("memory_bound_bytes", "gauge", "the memory bound printed at start-up", state.memory_bound)
        rss = _rss()
        if rss is not None:
            metric("process_resident_memory_bytes", "gauge", "resident memory of the server process", rss)
        return PlainTextResponse("".join(lines), media_type="text/plain; version=0.0.4")

    async def plain_json(request: Request):
        """/tokenize and /detokenize: the key checked, the model ready, the body parsed as JSON."""
        auth(request)
        state.ready()
        raw = await request.body()
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    @app.post("/tokenize")
    async def tokenize(request: Request):
        data = await plain_json(request)
        text = data.get("content", data.get("prompt")) if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise ApiError(400, "content: a string to tokenize is required", "content")
        add = data.get("add_special", False)
        if not isinstance(add, bool):
            raise ApiError(400, "add_special: must be a boolean", "add_special")
        from ..tasks import encode_text

        ids = encode_text(state.tokenizer, text) if add else list(state.tokenizer.encode(text))
        return {"tokens": ids, "count": len(ids), "max_model_len": state.scheduler.ctx}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        data = await plain_json(request)
        ids = data.get("tokens") if isinstance(data, dict) else None
        vocab = state.scheduler.model.config.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise ApiError(400, f"tokens: a list of token ids in [0, {vocab}) is required", "tokens")
        text = state.tokenizer.decode(ids)
        return {"content": text, "prompt": text}

    return app


_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize"}
