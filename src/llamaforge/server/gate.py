"""What every request passes before a route sees it: the API key first (nothing about a request is
answered to a client without the key, not even that its JSON is malformed), then the body size
(413 past the limit, without reading the rest). A plain ASGI middleware, so streamed responses
pass through untouched."""
from __future__ import annotations

import hmac

from .schemas import APIError
from .service import Server

MAX_BODY = 8 * 1024 * 1024       # bytes; `serve --max-body`
_BODY_METHODS = (b"POST", b"PUT", b"PATCH")


def _protected(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


class Gate:
    """ASGI middleware: API key, then body limit; the body read here is handed on as it came."""

    def __init__(self, app, server: Server, max_body: int = MAX_BODY):
        self.app, self.srv, self.max_body = app, server, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._auth(scope)
        if error is None and scope["method"].encode() in _BODY_METHODS:
            body, error = await self._read(scope, receive)
            if error is None:
                receive = _replay(body, receive)
        if error is not None:
            self.srv.count_error(error.status)
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _auth(self, scope) -> APIError | None:
        key = self.srv.api_key
        if key is None or not _protected(scope["path"]):
            return None
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), key.encode()):
            return None
        return APIError(401, "the API key is not valid" if header else
                        "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                        code="invalid_api_key")

    async def _read(self, scope, receive) -> tuple[bytes, APIError | None]:
        too_big = APIError(413, f"the request body is larger than {self.max_body} bytes (serve --max-body)",
                           code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return b"", APIError(400, "the Content-Length header is not a number")
            if int(declared) > self.max_body:
                return b"", too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":     # the client left: nothing to answer
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), None


def _replay(body: bytes, receive):
    """A receive() that gives the body already read, then the connection's own messages."""
    pending = True

    async def replay():
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay
