"""The OpenAI request bodies the server accepts (validated by pydantic) and its error body.

Fields follow OpenAI's completions and chat-completions APIs: completions take ``echo`` and ``logprobs`` (0 to
5, OpenAI's legacy limit; ``max_tokens: 0`` with ``echo`` scores the prompt alone), chat completions take
``logprobs: true`` with ``top_logprobs`` (0 to 20). Parameters the server does not implement (``best_of`` > 1,
``suffix``, ``tools``, ``response_format``, ``logit_bias``, non-zero presence/frequency penalties) are refused
with a 400 naming them rather than silently ignored; ``top_k`` is accepted as vLLM accepts it. ``/tokenize`` and
``/detokenize`` take vLLM's bodies. Integers are strict (``true`` or ``1.0`` is not 1) and numbers are not booleans;
the sampling settings follow :func:`neox_llama.generation.settings.check_sampling`, the rules and words
``tools/generate.py`` uses too (NaN and Infinity are named as not numbers). :meth:`check` runs every rule that
needs no tokenizer, so a bad request costs nothing to refuse. Any problem is an :class:`ApiError`, answered as
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from neox_llama.errors import NeoxLlamaError
from neox_llama.generation.settings import SettingError, check_new_tokens, check_sampling

MAX_N = 16
"""At most this many choices per request."""
MAX_CHOICES = 64
"""At most this many sequences (prompts x n) per request."""
MAX_STOPS = 4
"""At most this many stop strings per request (OpenAI's limit)."""
MAX_STOP_LENGTH = 256
"""The longest stop string accepted (each is searched for at every token)."""
MAX_LOGPROBS = 5
"""The most alternatives per token a completion's ``logprobs`` asks for (OpenAI's legacy limit)."""
MAX_TOP_LOGPROBS = 20
"""The most alternatives per token a chat completion's ``top_logprobs`` asks for (OpenAI's limit)."""


class ApiError(NeoxLlamaError):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    @classmethod
    def bad_setting(cls, err: SettingError) -> ApiError:
        """The 400 for a setting the shared rules refuse: their message, the field as ``param``."""
        return cls(400, str(err), err.name, err.code)


class _Sampling(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    """A name from /v1/models; none: the base model."""
    temperature: StrictFloat = 1.0
    """Checked by :func:`check_sampling` (in [0, 2]), as top_p and top_k."""
    top_p: StrictFloat = 1.0
    top_k: StrictInt | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stop: str | list[str] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1 - MAX_N)] | None = None
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    presence_penalty: StrictFloat = 0.0
    frequency_penalty: StrictFloat = 0.0
    logit_bias: dict | None = None
    ignore_eos: bool = False
    """Keep generating past end-of-sequence ids (as vLLM's ``ignore_eos``; for benchmarks)."""

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_settings(self, limits: dict[str, int | None]) -> None:
        """400 for a sampling setting, a length limit (``limits``: field -> value) or a stop list out of its rule."""
        try:
            check_sampling(self.temperature, self.top_p, self.top_k)
            for name, value in limits.items():
                if value is not None:
                    check_sampling(max_new_tokens=value, names={"max_new_tokens": name})
        except SettingError as err:
            raise ApiError.bad_setting(err) from None
        stops = self.stop_strings()
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"stop may hold at most {MAX_STOPS} strings, got {len(stops)}", "stop")
        if any(not s for s in stops):
            raise ApiError(400, "stop strings must not be empty", "stop")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ApiError(400, f"stop strings may be at most {MAX_STOP_LENGTH} characters long", "stop")

    def check_room(self, max_tokens: int, prompt_length: int, context: int) -> None:
        """400 (``context_length_exceeded``) when the asked-for answer length does not fit after the prompt."""
        try:
            check_new_tokens(max_tokens, prompt_length, context, self.limit_field())
        except SettingError as err:
            raise ApiError.bad_setting(err) from None

    def limit_field(self) -> str:
        """The field that set the answer's length limit."""
        return "max_tokens"

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def refuse_unsupported(self, extra: dict[str, object]) -> None:
        """400 for a parameter set to something this server does not implement."""
        unsupported = {"presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                       "logit_bias": self.logit_bias or None, **extra}
        for name, value in unsupported.items():
            if value not in (None, 0, 0.0, False):
                raise ApiError(400, f"{name} is not supported by this server", name, "unsupported_parameter")


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    echo: StrictBool = False
    """The answer's text (and its ``logprobs``) starts with the prompt's."""
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """Log-probabilities of every token and of its ``logprobs`` most likely alternatives (None: none)."""
    best_of: StrictInt | None = None
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

    def scores_prompt_only(self) -> bool:
        """``max_tokens: 0`` with ``echo``: the prompt is scored, nothing is generated."""
        return self.echo and self.max_tokens == 0

    def check(self) -> None:
        """Every rule that needs no tokenizer (the handler calls it first)."""
        self.refuse_unsupported({"best_of": None if self.best_of in (None, 1) else self.best_of,
                                 "suffix": self.suffix})
        self.check_settings({"max_tokens": None if self.scores_prompt_only() else self.max_tokens})


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
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    tools: list | None = None
    response_format: dict | None = None
    logprobs: StrictBool | None = None
    """The answer's tokens' log-probabilities (and ``top_logprobs`` alternatives each)."""
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def limit(self) -> int | None:
        """The answer's length limit (max_completion_tokens, or the older max_tokens; None: the context's rest)."""
        return self.max_completion_tokens or self.max_tokens

    def limit_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def check(self) -> None:
        """Every rule that needs no tokenizer (the handler calls it first)."""
        text_format = (self.response_format or {}).get("type") in (None, "text")
        self.refuse_unsupported({"tools": self.tools or None,
                                 "response_format": None if text_format else self.response_format})
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        self.check_settings({"max_tokens": self.max_tokens, "max_completion_tokens": self.max_completion_tokens})


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's body): a ``prompt``, or chat ``messages`` rendered in the model's prompt style."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    """A prompt starts with the start token (where the tokenizer's policy adds one)."""
    add_generation_prompt: StrictBool = True
    """Messages end with an open assistant turn."""
    return_token_strs: StrictBool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "give either prompt (a string) or messages (a chat)", "prompt")


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's body)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[StrictInt]
