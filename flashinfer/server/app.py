"""The OpenAI-compatible HTTP API over one Engine, as a Starlette app.

Threads: the event loop parses, queues and writes; every engine step runs on the engine's
own thread (`EngineThread`), so a slow token never stalls other connections, and a request
is tokenized in Starlette's thread pool. Queue: the engine runs one generation at a time
(one KV cache, see flashinfer/engine.py); `max_queue` more wait their turn in arrival order,
and past that the server answers 503 at once rather than let waits grow without bound.
Disconnects: a client that goes away cancels its generation between two tokens, which frees
the engine and its queue place for the next request.
Bodies: past `max_body_bytes` (default 1 MB, `--max-body`) a request gets 413 without being
read whole: a Content-Length over the limit is refused before a byte of the body is read, a
chunked body is counted as it arrives and refused at the limit. A declared length up to
DRAIN_LIMIT_BYTES is then read and dropped by uvicorn (none of it kept), so the client gets its
413 rather than a reset connection; a longer or chunked one is cut off (Connection: close).
Faults: when the engine raises mid-generation (a StorageError from a failing disk, say), a
whole response becomes a 500 in OpenAI's shape naming the error, a stream gets an error event
and `data: [DONE]`; either way the queue place is given back and the next request runs.
/health counts every request that passed its checks exactly once, as served, rejected (503),
disconnected or failed; one refused by them (400, 404, 413) never takes a queue place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flashinfer.engine import Engine
from flashinfer.engine import Response as Step
from flashinfer.errors import FlashinferError
from flashinfer.server.protocol import (
    APIError,
    GenerationRequest,
    chunk_object,
    model_object,
    parse_chat,
    parse_completion,
    response_object,
    usage_chunk,
    usage_object,
)

log = logging.getLogger("flashinfer.server")

# A request holds one prompt that fits the context: 4096 tokens are ~20 KB of text or ~30 KB
# of token ids, so 1 MB leaves room for long messages while no client makes us buffer more
DEFAULT_MAX_BODY_BYTES = 1_000_000
DRAIN_LIMIT_BYTES = 64 << 20  # a refused body up to this is read and dropped, so its client sees the 413


@dataclass
class Stats:
    """Counters /health reports."""

    served: int = 0  # generations that ran to their end
    rejected: int = 0  # 503: the queue was full
    disconnected: int = 0  # the client left before the end; generation stopped
    failed: int = 0  # the engine raised mid-generation: a 500, or an error event in the stream
    completion_tokens: int = 0  # tokens generated, for all of them


class EngineThread:
    """The one thread that calls into the engine. Being one thread, it also orders the work:
    a stream's close() queued after a cancelled request's last step runs after that step."""

    def __init__(self):
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="flashinfer-engine")

    async def next_step(self, steps: Iterator[Step]) -> Step | None:
        return await asyncio.get_running_loop().run_in_executor(self._executor, next, steps, None)

    def close_later(self, steps: Iterator[Step]) -> None:
        self._executor.submit(steps.close)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


class Ticket:
    """A request's place in the queue: the generation it runs, given back exactly once."""

    def __init__(self, queue: "EngineQueue"):
        self.queue = queue
        self.tokens = 0  # generated so far
        self.finish_reason: str | None = None  # set when generation reached its end
        self.error: Exception | None = None  # set when the engine raised
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.queue.admitted -= 1
        stats = self.queue.stats
        stats.completion_tokens += self.tokens
        if self.error is not None:
            stats.failed += 1
        elif self.finish_reason is None:
            stats.disconnected += 1
            log.info("client left after %d tokens: generation stopped", self.tokens)
        else:
            stats.served += 1


class EngineQueue:
    """One generation runs, up to `max_queue` wait in arrival order (asyncio.Lock is FIFO),
    more are refused. Lives on the event loop, so plain counters need no lock."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.admitted = 0  # running + waiting
        self.turn = asyncio.Lock()
        self.stats = Stats()

    def admit(self) -> Ticket:
        if self.admitted >= 1 + self.max_queue:
            self.stats.rejected += 1
            raise APIError(503, f"the server is busy: 1 request running and {self.max_queue} waiting (--max-queue); "
                                "retry shortly", code="queue_full", type="server_error")
        self.admitted += 1
        return Ticket(self)

    @property
    def running(self) -> int:
        return int(self.turn.locked())


class Server:
    """What the routes share: the engine, its thread, the queue, the model's name, the body limit."""

    def __init__(self, engine: Engine, model_name: str, max_queue: int, max_body_bytes: int):
        self.engine = engine
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.queue = EngineQueue(max_queue)
        self.thread = EngineThread()
        self.created = int(time.time())

    async def generate(self, ticket: Ticket, steps: Iterator[Step]) -> AsyncIterator[Step]:
        """Wait for the engine's turn, then run `steps` (an Engine.stream) one token per
        hop to the engine thread, so a cancel lands between two tokens."""
        try:
            async with self.queue.turn:
                while (step := await self.thread.next_step(steps)) is not None:
                    ticket.tokens += step.token_id is not None
                    ticket.finish_reason = step.finish_reason
                    yield step
        except Exception as e:  # from the engine thread: counted as failed, answered by the caller
            ticket.error = e
            raise
        finally:
            self.thread.close_later(steps)  # frees the engine; never awaits, so safe when cancelled


def create_app(engine: Engine, model_name: str, max_queue: int = 8,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Starlette:
    """The ASGI app serving `engine` as `model_name`. It does not close the engine."""
    if max_queue < 0:
        raise FlashinferError(f"max_queue must be >= 0, got {max_queue}")
    if max_body_bytes < 1:
        raise FlashinferError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    server = Server(engine, model_name, max_queue, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.thread.shutdown()

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/models/{model_id:path}", model),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.server = server
    return app


# ---- routes -----------------------------------------------------------------------
async def health(request: Request) -> JSONResponse:
    server: Server = request.app.state.server
    queue = server.queue
    return JSONResponse({"status": "ok", "model": server.model_name, "running": queue.running,
                         "waiting": queue.admitted - queue.running, "max_queue": queue.max_queue,
                         **asdict(queue.stats)})


async def models(request: Request) -> JSONResponse:
    server: Server = request.app.state.server
    return JSONResponse({"object": "list", "data": [model_object(server.model_name, server.created)]})


async def model(request: Request) -> JSONResponse:
    server: Server = request.app.state.server
    model_id = request.path_params["model_id"]
    if model_id != server.model_name:
        raise APIError(404, f"the model {model_id!r} does not exist; this server serves {server.model_name!r}",
                       "model", "model_not_found")
    return JSONResponse(model_object(server.model_name, server.created))


async def completions(request: Request) -> Response:
    return await _generation(request, parse_completion)


async def chat_completions(request: Request) -> Response:
    return await _generation(request, parse_chat)


async def _generation(request: Request, parse: Callable) -> Response:
    server: Server = request.app.state.server
    try:
        body = await _json_body(request, server.max_body_bytes)
    except ClientDisconnect:  # gone while sending the body: an ordinary hang-up, not a server error
        return Response(status_code=499)
    req: GenerationRequest = await run_in_threadpool(parse, body, server.engine, server.model_name)
    try:  # checks the sampling values; nothing runs until the first step
        steps = server.engine.stream(req.prompt_ids, req.max_tokens, req.temperature, req.top_k, req.top_p,
                                     req.seed, req.stop)
    except FlashinferError as e:
        raise APIError(400, str(e)) from None
    ticket = server.queue.admit()
    if req.stream:
        return EventStream(_events(server, req, server.generate(ticket, steps)), on_close=ticket.release)
    try:
        return await _whole(request, server, req, server.generate(ticket, steps))
    except Exception as e:  # the engine failed (a read fault, ...): this request ends, the server goes on
        ticket.error = e
        log.exception("generation failed")
        raise _generation_failed(e) from None
    finally:
        ticket.release()


async def _whole(request: Request, server: Server, req: GenerationRequest, steps: AsyncIterator[Step]) -> Response:
    pieces: list[str] = []
    last: Step | None = None

    async def consume() -> None:
        nonlocal last
        async with aclosing(steps):
            async for last in steps:
                pieces.append(last.text)

    if not await _unless_disconnected(request.receive, consume):
        return Response(status_code=499)  # nobody is listening; the status is for the access log
    usage = usage_object(last.usage.prompt_tokens, last.usage.completion_tokens)
    return JSONResponse(response_object(req, server.model_name, "".join(pieces), last.finish_reason, usage))


async def _events(server: Server, req: GenerationRequest, steps: AsyncIterator[Step]) -> AsyncIterator[str]:
    """Server-sent events: OpenAI's chunk objects, then `data: [DONE]`."""
    model_name = server.model_name
    async with aclosing(steps):
        if req.chat:
            yield _sse(chunk_object(req, model_name, None, role=True))
        try:
            async for step in steps:
                if step.text:
                    yield _sse(chunk_object(req, model_name, step.text))
                if step.finish_reason is not None:
                    yield _sse(chunk_object(req, model_name, None, step.finish_reason))
                    if req.include_usage:
                        usage = usage_object(step.usage.prompt_tokens, step.usage.completion_tokens)
                        yield _sse(usage_chunk(req, model_name, usage))
        except Exception as e:  # the status line is long gone: report in the stream, as OpenAI does
            log.exception("generation failed mid-stream")
            yield _sse(_generation_failed(e).body())
        yield "data: [DONE]\n\n"


def _generation_failed(e: Exception) -> APIError:
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """A text/event-stream response that stops when the client leaves and, however it ends,
    closes its events and calls `on_close`: after a disconnect the events may sit at a
    yield, or never have started, and only this knows."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        # We watch for the disconnect ourselves: Starlette does so only for servers of ASGI
        # spec < 2.4, and uvicorn drops (does not fail) sends to a client that has gone.
        try:
            await _unless_disconnected(receive, partial(self.stream_response, send))
        except OSError:  # a server that does fail such sends
            pass
        finally:
            await self.body_iterator.aclose()
            self.on_close()


async def _unless_disconnected(receive: Callable, work: Callable[[], Awaitable[None]]) -> bool:
    """Run `work` unless the client disconnects first (then cancel it). True if it finished."""
    finished = False

    async def run(scope: anyio.CancelScope) -> None:
        nonlocal finished
        await work()
        finished = True
        scope.cancel()

    async def watch(scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(run, group.cancel_scope)
            group.start_soon(watch, group.cancel_scope)
    except BaseExceptionGroup as group:  # anyio wraps even one error; callers catch it by its own type
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    return finished


async def _json_body(request: Request, max_bytes: int) -> object:
    raw = await _body(request, max_bytes)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None


async def _body(request: Request, max_bytes: int) -> bytes:
    """The request body, or 413 as soon as it is known to be over `max_bytes`: from its
    Content-Length before reading any of it, or while counting a chunked one."""
    length = _declared_length(request)
    if length is not None and length > max_bytes:
        raise _body_too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async with aclosing(request.stream()) as stream:
        async for chunk in stream:
            size += len(chunk)
            if size > max_bytes:
                raise _body_too_large(max_bytes)
            chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is over the server's limit of {max_bytes} bytes (--max-body)",
                    code="request_too_large")


# ---- errors, in OpenAI's shape ------------------------------------------------------
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    if exc.status == 413 and not _drained_by_the_server(request):
        headers = {"Connection": "close"}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _drained_by_the_server(request: Request) -> bool:
    """Whether a refused body is left for uvicorn to read and discard after the 413 (it drops the
    data of a request it has answered, holding none of it): a declared length up to
    DRAIN_LIMIT_BYTES. Closing instead, on bytes still unread, makes the kernel reset the
    connection, and the client often loses the 413 with it (seen in 1-2% of tries). A body of
    unknown (chunked) or larger length gets Connection: close: its drain has no bound."""
    length = _declared_length(request)
    return length is not None and length <= DRAIN_LIMIT_BYTES


def _declared_length(request: Request) -> int | None:
    """The body's Content-Length, None for a chunked body (or a header that is not a number)."""
    length = request.headers.get("content-length", "")
    return int(length) if length.isdigit() else None


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = {404: f"no such endpoint {request.url.path}; the API is under /v1 (see /v1/models)",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    message = f"internal error: {type(exc).__name__}: {exc}"
    return JSONResponse(APIError(500, message, type="server_error").body(), status_code=500)
