"""`nanokimi serve`: OpenAI's API over the batched engine (engine.py), on FastAPI, and a chat page at `/`.

POST /v1/chat/completions (messages and tools in OpenAI's shape, rendered with Kimi-K2's chat template; replies parsed
back into content and tool_calls), POST /v1/completions (raw text, for base models), GET /v1/models, GET /health.
Streaming answers are server-sent events ending in `data: [DONE]`. Every refusal is OpenAI's error object with a 4xx
status; a client that goes away frees its row at the next step."""

import asyncio
import json
import logging
import time
import uuid
from importlib.resources import files

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from . import engine as engines
from .chat_template import CALLS_BEGIN, IM_END, chat_token_ids, check_conversation, encode, parse_reply
from .errors import UserError
from .sampling import MIN_TEMPERATURE

log = logging.getLogger("nanokimi.serve")
MAX_BODY_BYTES = 1 << 20  # a request body past this is refused (413) before it is read whole


class APIError(Exception):
    """A refusal, answered as OpenAI's {"error": {message, type, param, code}} with `status`."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self):
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


class Sampling(BaseModel):
    """What both completion endpoints take. Unknown fields are ignored (clients send many); known ones that
    nanoKimi does not implement are refused by name when they would change the answer."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    max_tokens: int | None = None
    temperature: float = Field(0.6, ge=0, le=2)  # Kimi-K2's recommended 0.6 (the chat command's default)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class ChatCompletion(Sampling):
    messages: list
    tools: list | None = None
    tool_choice: str | dict | None = None
    max_completion_tokens: int | None = None


class Completion(Sampling):
    prompt: str | list[str]


def check_unsupported(body):
    """What pydantic's types do not say: fields nanoKimi does not implement, and a temperature too low to sample at."""
    if 0 < body.temperature < MIN_TEMPERATURE:
        raise APIError(400, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}", "temperature")
    for name, default in (("n", 1), ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
        if getattr(body, name) != default:
            raise APIError(400, f"{name}={getattr(body, name)!r} is not supported by nanokimi serve", name)
    if body.logprobs:
        raise APIError(400, "logprobs are not supported by nanokimi serve", "logprobs")
    if isinstance(body.stop, list) and len(body.stop) > 4:
        raise APIError(400, "stop takes at most 4 strings", "stop")


class TextOut:
    """The text of sampled tokens, held back while it may still become one of the `stop` strings; `stopped` once one
    appeared (the text ends before it)."""

    def __init__(self, text_of, stop):
        self.text_of, self.stops = text_of, [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token):
        """The text that can be sent after `token`."""
        self.text += self.text_of(token)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self.flush()
        hold = max((len(s) - 1 for s in self.stops), default=0)
        return self.flush(len(self.text) - hold)

    def flush(self, end=None):
        end = len(self.text) if end is None else max(end, self.sent)
        piece, self.sent = self.text[self.sent : end], end
        return piece


class Served:
    """The engine (and its model), the tokenizer and the model's name in the API: what every request checks against."""

    def __init__(self, tokenizer, name, engine):
        self.tokenizer, self.name, self.engine = tokenizer, name, engine
        self.context = engine.context
        try:
            self.special = chat_token_ids(tokenizer)
        except UserError:
            self.special = None  # a base model: /v1/completions only

    def check_model(self, name):
        if name != self.name:
            raise APIError(
                404, f"The model {name!r} does not exist: this server serves {self.name!r}", "model", "model_not_found"
            )

    def budget(self, prompt, max_tokens, param):
        """max_tokens checked against the context (default: the rest of it)."""
        if not prompt:
            raise APIError(400, "the prompt is empty: it must have at least one token", param)
        if len(prompt) >= self.context:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens; the prompt has {len(prompt)}",
                param,
                "context_length_exceeded",
            )
        if max_tokens is None:
            return self.context - len(prompt)
        if max_tokens <= 0:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if len(prompt) + max_tokens > self.context:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens. However, you requested "
                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the completion): "
                f"reduce the prompt or max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        return max_tokens


def chunk_id(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt, completion):
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload):
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def build_app(served):
    """The FastAPI app serving `served`; the engine's thread runs while the app does."""

    async def lifespan(app):
        served.engine.start()
        yield
        served.engine.stop()

    app = FastAPI(title="nanoKimi", lifespan=lifespan, docs_url=None, redoc_url=None)
    page = files("nanokimi").joinpath("static/chat.html").read_text()

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        first = e.errors()[0] if e.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "the body is not valid JSON", None, "invalid_json").response()
        if "json" not in request.headers.get("content-type", "json"):  # curl -d sends a form's type
            return APIError(400, "send the body as JSON, with `Content-Type: application/json`", None).response()
        return APIError(
            400, f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}", ".".join(where) or None, "invalid_value"
        ).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), None, None, kind).response()

    @app.exception_handler(Exception)
    async def unexpected(request, e):  # logged once, answered in OpenAI's shape
        log.exception("unexpected error")
        return APIError(500, "internal error (the server log says why)", None, None, "server_error").response()

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return page

    @app.get("/health")
    async def health():
        engine = served.engine
        return {
            "status": "ok",
            "model": served.name,
            "active": len(engine.active),
            "waiting": len(engine.waiting),
            "slots": engine.slots,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(served)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        served.check_model(name)
        return model_card(served)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletion):
        served.check_model(body.model)
        check_unsupported(body)
        if served.special is None:
            raise APIError(
                400,
                f"{served.name} is a base model (no chat template): use /v1/completions, or finetune "
                f"it on conversations (docs/chat.md)",
                "messages",
                "no_chat_template",
            )
        tools = None if body.tool_choice == "none" else body.tools
        if body.tool_choice not in (None, "auto", "none"):
            raise APIError(400, "tool_choice must be auto or none: nanoKimi does not force tool calls", "tool_choice")
        try:
            messages = check_conversation(body.messages, "messages", tools)
            prompt = encode(served.tokenizer, messages, tools, add_generation_prompt=True)[0]
        except UserError as e:
            raise APIError(400, str(e), "messages") from None
        max_tokens = served.budget(prompt, body.max_completion_tokens or body.max_tokens, "messages")
        return await ChatReply(served, prompt, body, max_tokens).answer()

    @app.post("/v1/completions")
    async def completions(body: Completion):
        served.check_model(body.model)
        check_unsupported(body)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(texts) != 1:
            raise APIError(400, "prompt must be one string (batches of prompts: one request each)", "prompt")
        try:
            prompt = served.tokenizer.encode(texts[0])
        except UserError as e:
            raise APIError(400, str(e), "prompt") from None
        max_tokens = served.budget(prompt, 16 if body.max_tokens is None else body.max_tokens, "prompt")
        return await TextReply(served, prompt, body, max_tokens).answer()

    return app


def model_card(served):
    return {
        "id": served.name,
        "object": "model",
        "created": 0,
        "owned_by": "nanokimi",
        "context_length": served.context,
    }


class Reply:
    """One completion on the engine: chunks() yields its server-sent events, whole() its one response; cancel()
    (called whatever happens: done, failed, or the client gone) frees its row at the engine's next step."""

    prefix = ""

    def __init__(self, served, prompt, body, max_tokens, stop_ids=()):
        self.served, self.prompt, self.body, self.max_tokens = served, prompt, body, max_tokens
        self.stop_ids = list(stop_ids)
        self.id, self.created = chunk_id(self.prefix), int(time.time())
        self.text = TextOut(served.tokenizer.stream(prompt), body.stop)
        self.tokens, self.finish, self.request = [], None, None

    async def sampled(self):
        """Submit to the engine; yields each sampled token id as it comes, then sets `finish`."""
        loop, tokens = asyncio.get_running_loop(), asyncio.Queue()
        body = self.body
        self.request = engines.Request(
            self.prompt,
            self.max_tokens,
            temperature=body.temperature,
            top_p=None if body.top_p >= 1 else body.top_p,
            seed=body.seed,
            stop_ids=self.stop_ids,
            on_token=lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t),
            on_finish=lambda reason: loop.call_soon_threadsafe(tokens.put_nowait, None),
        )
        try:
            self.served.engine.submit(self.request)
        except engines.QueueFull as e:
            raise APIError(
                429, f"the server is busy ({e}): try again shortly", None, "rate_limit_exceeded", "rate_limit_error"
            ) from None
        while (token := await tokens.get()) is not None:
            self.tokens.append(token)
            yield token
            if self.text.stopped:  # a stop string: nothing more is needed
                self.cancel()
                self.finish = "stop"
                return
        if self.request.finish_reason == "cancelled":
            raise APIError(503, "the server is shutting down", None, "server_shutdown", "server_error")
        if self.request.finish_reason == "error":
            raise APIError(
                500, "the model failed on this request (the server log says why)", None, None, "server_error"
            )
        self.finish = self.request.finish_reason

    def cancel(self):
        if self.request is not None:
            self.request.cancel()

    def envelope(self, choice, object_name):
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.served.name,
            "choices": [] if choice is None else [choice],
        }

    def usage(self):
        return usage(len(self.prompt), len(self.tokens))

    def usage_chunk(self, object_name):
        """The last chunk when the client asked for stream_options.include_usage."""
        if (self.body.stream_options or {}).get("include_usage"):
            yield sse({**self.envelope(None, object_name), "usage": self.usage()})

    async def streamed(self):
        """A streaming response once the request is in (a refusal before that is a plain error response)."""
        chunks = self.chunks()
        try:
            first = await anext(chunks)
        except BaseException:
            self.cancel()
            raise

        async def events():
            try:
                yield first
                async for event in chunks:
                    yield event
            except APIError as e:  # after the stream began: an error event (OpenAI's clients raise it)
                yield sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
            finally:
                self.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def answer(self):
        if self.body.stream:
            return await self.streamed()
        try:
            return await self.whole()
        finally:
            self.cancel()


class ChatReply(Reply):
    """A chat completion: the reply's text streams as content until a tool-call section begins; at the end the
    whole reply is parsed into content and tool_calls (finish_reason tool_calls)."""

    prefix = "chatcmpl"

    def __init__(self, served, prompt, body, max_tokens):
        super().__init__(served, prompt, body, max_tokens, stop_ids=[served.special[IM_END]])

    async def pieces(self):
        """("start",) at the first token, ("content", text) as it comes, then ("end", message, finish_reason)."""
        special, in_calls = self.served.special, False
        async for token in self.sampled():
            if len(self.tokens) == 1:
                yield ("start",)
            in_calls = in_calls or token == special[CALLS_BEGIN]
            if not in_calls and token != special[IM_END] and (piece := self.text.add(token)):
                yield "content", piece
        if piece := self.text.flush():
            yield "content", piece
        message = parse_reply(self.served.tokenizer.decode([t for t in self.tokens if t != special[IM_END]]))
        message["content"] = self.text.text if self.text.text or not in_calls else None  # as streamed
        yield "end", message, "tool_calls" if message.get("tool_calls") else self.finish

    async def chunks(self):
        def chunk(delta, finish=None):
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return sse(self.envelope(choice, "chat.completion.chunk"))

        async for kind, *rest in self.pieces():
            if kind == "start":  # the first token is in (a tool call's too): the role, as OpenAI's first chunk
                yield chunk({"role": "assistant", "content": ""})
            elif kind == "content":
                yield chunk({"content": rest[0]})
            else:
                message, finish = rest
                for index, call in enumerate(message.get("tool_calls", [])):
                    yield chunk({"tool_calls": [{"index": index, **call}]})
                yield chunk({}, finish)
        for event in self.usage_chunk("chat.completion.chunk"):
            yield event

    async def whole(self):
        async for kind, *rest in self.pieces():
            if kind == "end":
                message, finish = rest
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {**self.envelope(choice, "chat.completion"), "usage": self.usage()}


class TextReply(Reply):
    """A text completion (base models): the continuation of the prompt; a model with a document boundary token
    stops at it."""

    prefix = "cmpl"

    def __init__(self, served, prompt, body, max_tokens):
        boundary = getattr(served.tokenizer, "boundary_token_id", None)
        super().__init__(served, prompt, body, max_tokens, stop_ids=[] if boundary is None else [boundary])

    async def pieces(self):
        async for token in self.sampled():
            if token not in self.stop_ids and (piece := self.text.add(token)):
                yield piece
        if piece := self.text.flush():
            yield piece

    def choice(self, text, finish=None):
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    async def chunks(self):
        started = False
        async for piece in self.pieces():
            started = True
            yield sse(self.envelope(self.choice(piece), "text_completion"))
        if not started:  # nothing to show (a stop at once): the stream still opens with a chunk
            yield sse(self.envelope(self.choice(""), "text_completion"))
        yield sse(self.envelope(self.choice("", self.finish), "text_completion"))
        for event in self.usage_chunk("text_completion"):
            yield event

    async def whole(self):
        async for _ in self.pieces():
            pass
        return {**self.envelope(self.choice(self.text.text, self.finish), "text_completion"), "usage": self.usage()}


class BodyLimit:
    """ASGI middleware: a request body past `limit` bytes is refused with 413 as it arrives (not read whole)."""

    def __init__(self, app, limit=MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(self.limit, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise APIError(413, too_large_message(self.limit), None, "request_too_large")
            return message

        try:
            await self.app(scope, counted, send)
        except APIError as e:
            await e.response()(scope, receive, send)


def too_large_message(limit):
    return f"the request body is over {limit // 1024} KiB"


async def too_large(limit, send):
    body = json.dumps(
        {
            "error": {
                "message": too_large_message(limit),
                "type": "invalid_request_error",
                "param": None,
                "code": "request_too_large",
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class APIKey:
    """ASGI middleware: /v1/ requests need `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app, key):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            if dict(scope["headers"]).get(b"authorization") != self.expected:
                error = APIError(
                    401,
                    "Incorrect API key provided: pass it as `Authorization: Bearer KEY`",
                    None,
                    "invalid_api_key",
                    "authentication_error",
                )
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)
