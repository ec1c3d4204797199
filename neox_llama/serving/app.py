"""The OpenAI-compatible HTTP API (FastAPI) over a :class:`~neox_llama.serving.engine.Engine`.

``GET /v1/models`` lists the base and every adapter; ``POST /v1/completions`` and ``POST /v1/chat/completions``
answer whole or as server-sent events in OpenAI's chunk format ending with ``data: [DONE]``, with log-probabilities
when asked (:mod:`neox_llama.serving.logprobs`); ``POST /tokenize``, ``POST /detokenize`` and
``GET /tokenizer_info`` answer as vLLM's do (lm-eval's ``tokenizer_backend=remote`` uses them); ``GET /health``.
Every choice of every request is one job in the engine's running batch, whatever adapter it uses. Errors are
OpenAI's body ``{"error": {"message", "type", "param", "code"}}`` with 400/404 (never FastAPI's 422).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from neox_llama.errors import NeoxLlamaError
from neox_llama.generation.settings import GenerationError, GenerationSettings
from neox_llama.serving.engine import Engine, Event, Job
from neox_llama.serving.limits import BodySizeLimit, default_max_request_bytes
from neox_llama.serving.logprobs import ChoiceLogprobs
from neox_llama.serving.protocol import (
    MAX_CHOICES,
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from neox_llama.serving.text import TextStream
from neox_llama.serving.tokenizer_info import tokenizer_info
from neox_llama.tokenizers.prompts import Message, encode_dialog, stop_ids

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A name clients use: the base (adapter 0) or one adapter of the bank, with its chat prompt style."""

    name: str
    adapter: int
    prompt_style: str


@dataclass
class _Choice:
    job: Job
    stream: TextStream
    logprobs: ChoiceLogprobs | None = None
    prefix: str = ""
    """With ``echo``: the prompt's text, which the choice's text starts with."""
    finish_reason: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.stream.ids)


class Service:
    """Turns requests into engine jobs and their events into OpenAI responses."""

    def __init__(self, engine: Engine, models: list[ServedModel]):
        self.engine, self.tokenizer = engine, engine.lm.tokenizer
        self.models = {m.name: m for m in models}
        self.base = models[0]
        self.created = int(time.time())

    # ------------------------------------------------------------------ requests to jobs
    def model(self, name: str | None) -> ServedModel:
        if name is None or name == "":
            return self.base
        if name not in self.models:
            raise ApiError(404, f"the model {name!r} does not exist; served models: {', '.join(self.models)}",
                           "model", "model_not_found")
        return self.models[name]

    def _check_prompt(self, ids: list[int], param: str, generate: bool = True) -> list[int]:
        self.check_ids(ids, param)
        try:
            self.engine.check(ids, generate=generate)
        except GenerationError as err:
            raise ApiError(400, str(err), param, "context_length_exceeded") from None
        return ids

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.lm.run.true_vocab
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(400, f"token ids must be in [0, {vocab})", param)

    def _settings(self, kind: str, req, max_tokens: int | None, prompt: list[int], seed: int) -> GenerationSettings:
        room = self.engine.batch.capacity - len(prompt)
        if max_tokens is not None and _asked_for_max_tokens(req):
            req.check_room(max_tokens, len(prompt), self.engine.batch.capacity)
        if kind == "chat":
            logprobs, prompt_logprobs = ((req.top_logprobs or 0) if req.logprobs else None), None
        else:
            logprobs, prompt_logprobs = req.logprobs, (req.logprobs if req.echo else None)
        return GenerationSettings(room if max_tokens is None else min(max_tokens, room), req.temperature, req.top_k,
                                  None if req.top_p >= 1.0 else req.top_p, seed, stop_strings=req.stop_strings(),
                                  logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def _choice(self, kind: str, req, job: Job) -> _Choice:
        tok, prompt = self.tokenizer, job.prompt
        if kind == "chat":
            logprobs = ChoiceLogprobs(tok, prompt, "chat") if req.logprobs else None
            return _Choice(job, TextStream(tok, req.stop_strings()), logprobs)
        choice = _Choice(job, TextStream(tok, req.stop_strings(), context=prompt))
        if req.logprobs is not None:
            choice.logprobs = ChoiceLogprobs(tok, prompt, "completion", echo=req.echo)
        elif req.echo:
            choice.prefix = tok.decode(prompt)
        return choice

    def _choices(self, kind: str, req, prompts: list[list[int]], max_tokens: int | None, stops: set[int],
                 adapter: int, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> list[_Choice]:
        seed = req.seed if req.seed is not None else random.SystemRandom().randrange(2**31)
        if len(prompts) * req.n > MAX_CHOICES:
            raise ApiError(400, f"{len(prompts)} prompts x n {req.n} = {len(prompts) * req.n} sequences; at most "
                                f"{MAX_CHOICES} per request", "n")
        choices = []
        for p, prompt in enumerate(prompts):
            for i in range(req.n):
                index = p * req.n + i
                job = Job(prompt, self._settings(kind, req, max_tokens, prompt, seed + i), stops, adapter, index,
                          loop, queue)
                choices.append(self._choice(kind, req, job))
        return choices

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompts = []
        for k, p in enumerate(req.prompts()):
            if isinstance(p, str):
                if not p:
                    raise ApiError(400, "prompt is empty", "prompt")
                ids = self.tokenizer.encode_document(p)
            elif isinstance(p, list) and all(isinstance(x, int) for x in p):
                ids = list(p)
            else:
                raise ApiError(400, "prompt must be a string, a list of strings, or token ids", "prompt")
            prompts.append(self._check_prompt(ids, "prompt" if len(req.prompts()) == 1 else f"prompt.{k}",
                                              generate=not req.scores_prompt_only()))
        return prompts

    def chat_prompt(self, req: ChatRequest, model: ServedModel) -> list[int]:
        messages = [Message(m.role, m.text()) for m in req.messages]
        try:
            ids, _ = encode_dialog(self.tokenizer, model.prompt_style, messages, open_turn=True)
        except NeoxLlamaError as err:
            raise ApiError(400, f"messages: {err}", "messages") from None
        return self._check_prompt(ids, "messages")

    # ------------------------------------------------------------------ jobs to responses
    async def respond(self, request: Request, kind: str, req, model: ServedModel, prompts: list[list[int]],
                      max_tokens: int | None, stops: set[int]) -> Response:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        choices = self._choices(kind, req, prompts, max_tokens, set() if req.ignore_eos else stops, model.adapter,
                                loop, queue)
        head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model.name}
        usage_prompt = sum(len(p) for p in prompts)
        if req.stream:  # the jobs start with the stream, so a client gone before it starts costs nothing
            return StreamingResponse(self._stream(kind, req, head, choices, queue, usage_prompt),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.engine.submit([c.job for c in choices])
        watcher = asyncio.create_task(_watch_disconnect(request, queue))
        try:
            while any(c.finish_reason is None for c in choices):
                event = await queue.get()
                if event is _GONE:
                    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
                self._apply(choices, event)
        finally:
            watcher.cancel()
            self.engine.cancel([c.job for c in choices if c.finish_reason is None])
        body = {**head, "object": "chat.completion" if kind == "chat" else "text_completion",
                "choices": [self._final(kind, i, c) for i, c in enumerate(choices)],
                "usage": self._usage(usage_prompt, choices)}
        return JSONResponse(body)

    @staticmethod
    def _apply(choices: list[_Choice], event: Event) -> str:
        """Feed ``event`` to its choice; the text that may be sent now."""
        choice = choices[event.choice]
        if event.error is not None:
            raise ApiError(500, event.error, None, None, "server_error")
        delta = ""
        if event.prompt_scores is not None and choice.logprobs is not None:  # echo: the prompt comes first
            choice.prefix = delta = choice.logprobs.echo(event.prompt_scores)
        if event.score is not None and choice.logprobs is not None:
            choice.logprobs.token(event.score, in_text=event.token is not None)
        if event.token is not None:
            delta += choice.stream.push(event.token)
        if event.finish_reason is not None:
            choice.finish_reason = "stop" if event.finish_reason == "stop" else "length"
            delta += choice.stream.finish()
            if choice.logprobs is not None:
                choice.logprobs.finish()
        return delta

    @staticmethod
    def _final(kind: str, index: int, c: _Choice) -> dict:
        logprobs = c.logprobs.whole() if c.logprobs is not None else None
        if kind == "chat":
            return {"index": index, "message": {"role": "assistant", "content": c.stream.text},
                    "logprobs": logprobs, "finish_reason": c.finish_reason}
        return {"index": index, "text": c.prefix + c.stream.text, "logprobs": logprobs,
                "finish_reason": c.finish_reason}

    @staticmethod
    def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict:
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def _stream(self, kind: str, req, head: dict, choices: list[_Choice], queue: asyncio.Queue,
                      usage_prompt: int) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
            c = choices[index]
            logprobs = c.logprobs.take() if c.logprobs is not None and not role else None
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                part = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                part = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            return _sse({**head, "object": obj, "choices": [part]})

        self.engine.submit([c.job for c in choices])
        try:
            for i, c in enumerate(choices):
                if kind == "chat":
                    yield chunk(i, None, None, role=True)
                elif c.prefix:  # echo without log-probabilities: the prompt's text first
                    yield chunk(i, c.prefix, None)
            while any(c.finish_reason is None for c in choices):
                event = await queue.get()
                try:
                    delta = self._apply(choices, event)
                except ApiError as err:
                    yield _sse(err.body())
                    return
                if delta:  # carries the log-probabilities of the tokens since the last chunk
                    yield chunk(event.choice, delta, None)
                if choices[event.choice].finish_reason is not None:
                    yield chunk(event.choice, None, choices[event.choice].finish_reason)
            if req.include_usage():
                yield _sse({**head, "object": obj, "choices": [], "usage": self._usage(usage_prompt, choices)})
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: the task is cancelled at the await above
            self.engine.cancel([c.job for c in choices if c.finish_reason is None])


_GONE = Event(-1, error="the client disconnected")
"""Put into a request's event queue when its client has gone away."""


async def _watch_disconnect(request: Request, queue: asyncio.Queue) -> None:
    """Tell a non-streaming handler, through its queue, as soon as its client disconnects."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)
    queue.put_nowait(_GONE)


def _asked_for_max_tokens(req) -> bool:
    return bool({"max_tokens", "max_completion_tokens"} & req.model_fields_set)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _validation_error(exc: RequestValidationError) -> ApiError:
    problem = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if problem.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", None, "invalid_json")
    loc = [str(x) for x in problem.get("loc", ()) if x != "body"]
    # pydantic reports one failure per member of a union; its first location names the field.
    loc = [x for x in loc if not (x.startswith(("str", "list[", "int", "function-")) or x == "constrained-int")]
    param = ".".join(loc) or None
    message = f"{param}: {problem.get('msg')}" if param else str(problem.get("msg"))
    given = problem.get("input")
    if isinstance(given, bool | int | float | str) and len(shown := json.dumps(given)) <= 40:
        message += f", got {shown}"  # e.g. "max_tokens: Input should be a valid integer, got true"
    return ApiError(400, message, param, problem.get("type"))


def build_app(service: Service, max_request_bytes: int | None = None) -> FastAPI:
    """The FastAPI application; its lifespan starts and stops the engine thread. A request body over
    ``max_request_bytes`` (default: :func:`default_max_request_bytes` of the engine's context) is answered 413
    before it is parsed or tokenized."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.engine.start()
        yield
        service.engine.stop()

    app = FastAPI(title="neox_llama", lifespan=lifespan, docs_url=None, redoc_url=None)
    limit = max_request_bytes or default_max_request_bytes(service.engine.batch.capacity)
    app.add_middleware(BodySizeLimit, limit=limit)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        return _error(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception):
        logger.exception("request failed")
        return _error(ApiError(500, f"internal error: {exc}", None, None, "server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(service.models), **service.engine.load}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": service.created, "owned_by": "neox_llama",
             "root": service.base.name, "parent": None if m.adapter == 0 else service.base.name}
            for m in service.models.values()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        m = service.model(name)
        return {"id": m.name, "object": "model", "created": service.created, "owned_by": "neox_llama"}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.check()
        served = service.model(body.model)
        prompts = service.completion_prompts(body)
        return await service.respond(request, "completion", body, served, prompts, body.max_tokens,
                                     service.engine.lm.default_stops())

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        body.check()
        served = service.model(body.model)
        tok = service.tokenizer
        if body.messages is not None:
            try:
                ids, _ = encode_dialog(tok, served.prompt_style, [Message(m.role, m.text()) for m in body.messages],
                                       open_turn=body.add_generation_prompt)
            except NeoxLlamaError as err:
                raise ApiError(400, f"messages: {err}", "messages") from None
        else:  # special-token names read as those tokens, as Hugging Face tokenizers and vLLM read them
            ids = tok.encode_document(body.prompt, bos=None if body.add_special_tokens else False, allow_special=True)
        strs = [tok.decode([i]) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": service.engine.batch.capacity, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        service.model(body.model)
        service.check_ids(body.tokens, "tokens")
        return {"prompt": service.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_information():
        return tokenizer_info(service.tokenizer, service.base.prompt_style, service.engine.batch.capacity)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        body.check()
        served = service.model(body.model)
        prompt = service.chat_prompt(body, served)
        return await service.respond(request, "chat", body, served, [prompt], body.limit(),
                                     stop_ids(service.tokenizer, served.prompt_style))

    return app
