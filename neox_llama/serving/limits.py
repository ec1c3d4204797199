"""The request-size cap: a body over the limit is answered 413 before anything parses or tokenizes it.

A declared ``Content-Length`` over the limit is refused before one byte of the body is read; a body without one
(chunked) is read only up to the limit. Bodies within it are handed on unchanged (FastAPI buffers a body anyway).
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MIN_REQUEST_BYTES = 1 << 20
"""The default cap is never below 1 MiB."""
BYTES_PER_POSITION = 16
"""The default cap per position of the context: room for a prompt of JSON-escaped text or token ids as long as
the context (an id is at most 8 bytes as ``123456, ``; a character escaped as ``\\uXXXX`` is 6)."""


def default_max_request_bytes(context: int) -> int:
    """The cap when ``tools/serve.py --max-request-bytes`` is not given: 16 bytes per context position, at least
    1 MiB (1 MiB up to a context of 65,536; 2 MiB at 131,072)."""
    return max(MIN_REQUEST_BYTES, BYTES_PER_POSITION * context)


def too_large(size: str, limit: int) -> JSONResponse:
    """The 413 in OpenAI's error body; ``size`` says how large the body is (or that it is larger than the cap)."""
    message = (f"the request body is {size} bytes; this server accepts at most {limit} "
               "(tools/serve.py --max-request-bytes)")
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                   "code": "request_too_large"}}, status_code=413)


class BodySizeLimit:
    """ASGI middleware: refuse an HTTP request whose body exceeds ``limit`` bytes with a 413."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large(declared.decode(), self.limit)(scope, receive, send)
            return
        buffered: list[Message] = []
        size, more = 0, True
        while more:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":  # the client went away: let the app hear it
                break
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.limit:
                await too_large(f"more than {self.limit}", self.limit)(scope, receive, send)
                return

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)
