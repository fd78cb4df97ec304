"""What runs in front of the HTTP handlers, as plain ASGI middleware: the request id, the drain
guard, the API key, the body size.

`RequestId`: the client's `X-Request-Id` when it sent a usable one (up to 128 printable
ASCII characters, no spaces), else a new one; it is returned in the response's
`X-Request-Id`, set as `control.logs.current_request_id` while the request is served (every
log line names it), and becomes the request's id on the wire, so worker logs name it too.

`DrainGuard`: once the router drains (SIGTERM), `/v1/*` and `/generate` are answered 503
with `Retry-After`; it counts the API requests in flight, which the drain waits for.

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
import re
import uuid

from control.logs import current_request_id

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


_USABLE_ID = re.compile(r"[\x21-\x7e]{1,128}")


class RequestId:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for n, v in scope.get("headers", ()) if n == b"x-request-id"), b"")
        rid = given.decode("ascii", "replace") if _USABLE_ID.fullmatch(given.decode("latin-1")) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(msg):
            if msg["type"] == "http.response.start":
                msg = dict(msg, headers=[*msg.get("headers", ()), (b"x-request-id", rid.encode())])
            await send(msg)

        token = current_request_id.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)


class DrainGuard:
    def __init__(self, app, drain):
        self.app = app
        self.drain = drain  # has .draining (bool) and .in_flight (int)

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http" or not _protected(scope.get("path", "")):
            return await self.app(scope, receive, send)
        if self.drain.draining:
            return await _reply(send, 503, "the server is shutting down; retry on another replica",
                                "service_unavailable", None, [(b"retry-after", b"5")])
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
