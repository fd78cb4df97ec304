"""Two guards in front of the HTTP handlers, as plain ASGI middleware: the API key, the body size.

`ApiKeyGuard`: with a key configured, `/v1/*` and `/generate` need `Authorization: Bearer
<key>` (what OpenAI clients send); `/health`, `/metrics` and the docs stay open. The key is
compared with `hmac.compare_digest`, whose time does not depend on where the strings
differ. It runs first, so an unauthenticated client cannot make the router read a body.

`BodyLimit`: a body over the cap is answered 413 without being read past the cap, whether
the client announced its length (Content-Length) or streams it in chunks. Within the cap
the body is buffered and handed to the app; after it, the app still sees the real
`receive`, which is how it notices a client that disconnects.
"""
from __future__ import annotations

import hmac
import json

from .errors import error_body

Scope, Receive, Send = dict, object, object


async def _reply(send, status: int, message: str, type_: str, code: str | None = None,
                 headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error_body(message, type_, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def _protected(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1" or path == "/generate" or path.startswith("/generate/")


class ApiKeyGuard:
    def __init__(self, app, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http" or not _protected(scope.get("path", "")):
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
            return await _reply(send, 401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                "authentication_error", "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit():
                    return await _reply(send, 400, "Invalid Content-Length header", "invalid_request_error")
                if int(value) > self.max_bytes:
                    return await self._too_large(send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._too_large(send)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        await _reply(send, 413, f"Request body is larger than {self.max_bytes} bytes", "request_too_large")
