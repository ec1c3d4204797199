"""The OpenAI request bodies the server accepts (validated by pydantic) and its error body.

Fields follow OpenAI's completions and chat-completions APIs. Parameters the server does not implement
(``logprobs``, ``echo``, ``best_of`` > 1, ``suffix``, ``tools``, ``response_format``, ``logit_bias``, non-zero
presence/frequency penalties) are refused with a 400 naming them rather than silently ignored; ``top_k`` is
accepted as vLLM accepts it. Any problem is an :class:`ApiError`, answered as
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from neox_llama.errors import NeoxLlamaError

MAX_N = 16
"""At most this many choices per request."""
MAX_CHOICES = 64
"""At most this many sequences (prompts x n) per request."""
MAX_STOP_LENGTH = 256
"""The longest stop string accepted (each is searched for at every token)."""


class ApiError(NeoxLlamaError):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Sampling(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    """A name from /v1/models; none: the base model."""
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1 - MAX_N)] | None = None
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    logprobs: bool | int | None = None
    ignore_eos: bool = False
    """Keep generating past end-of-sequence ids (as vLLM's ``ignore_eos``; for benchmarks)."""

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must not be empty", "stop")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ApiError(400, f"stop strings may be at most {MAX_STOP_LENGTH} characters long", "stop")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def refuse_unsupported(self, extra: dict[str, object]) -> None:
        """400 for a parameter set to something this server does not implement."""
        unsupported = {"presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                       "logit_bias": self.logit_bias or None, "logprobs": self.logprobs or None, **extra}
        for name, value in unsupported.items():
            if value not in (None, 0, 0.0, False):
                raise ApiError(400, f"{name} is not supported by this server", name, "unsupported_parameter")


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as texts or token-id lists (a list of ints is one prompt of ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "prompt is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def check(self) -> None:
        self.refuse_unsupported({"echo": self.echo, "best_of": None if self.best_of in (None, 1) else self.best_of,
                                 "suffix": self.suffix})


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list | None = None
    response_format: dict | None = None
    top_logprobs: int | None = None

    def limit(self) -> int | None:
        """The answer's length limit (max_completion_tokens, or the older max_tokens; None: the context's rest)."""
        return self.max_completion_tokens or self.max_tokens

    def check(self) -> None:
        text_format = (self.response_format or {}).get("type") in (None, "text")
        self.refuse_unsupported({"tools": self.tools or None, "top_logprobs": self.top_logprobs,
                                 "response_format": None if text_format else self.response_format})
