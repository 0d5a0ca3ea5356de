"""The outermost layer of `vidrt serve`: what is refused before the application reads anything.

    app = Guard(fastapi_app, token="...", allowed_hosts={"localhost", "127.0.0.1"}, max_body=1 << 20)

A plain ASGI middleware (https://asgi.readthedocs.io/en/latest/specs/www.html), in this order:

1. Host allow-list: a request whose Host header names no allowed host gets 400. This is what stops
   DNS rebinding (a web page on evil.example whose name is re-pointed at 127.0.0.1 then talks to a
   loopback server as a "same-origin" page); None turns the check off (--allow-host '*').
2. The bearer token, for every path under /v1, checked from the headers alone: 401 before a byte
   of the body is read (hmac.compare_digest, constant time).
3. The body cap: a Content-Length over `max_body` gets 413 at once, unread; a body without one
   (chunked) is counted as it arrives and cut off with 413 when it passes the cap. The app then
   sees a disconnect, and whatever it still sends is dropped.

Errors use the OpenAI error shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": " ".join(message.split()), "type": kind, "param": param, "code": code}}


async def send_error(send: Send, status: int, message: str, code: str, extra: Iterable[tuple[bytes, bytes]] = ()
                     ) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def host_of(header: str) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class BodyTooLarge(Exception):
    pass


class Guard:
    def __init__(self, app: Callable[..., Awaitable[None]], *, token: str | None, allowed_hosts: set[str] | None,
                 max_body: int, protected: str = "/v1") -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.max_body = max_body
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None:
            host = host_of(headers.get("host", ""))
            if host not in self.allowed_hosts:
                await send_error(send, 400, f"Host {host or '(none)'!r} is not one this server answers to; start "
                                 f"vidrt serve with --allow-host {host or 'NAME'} to allow it", "host_not_allowed")
                return
        path = scope.get("path", "")
        if self.token is not None and (path == self.protected or path.startswith(self.protected + "/")):
            auth = headers.get("authorization", "")
            given = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(given, self.token):
                await send_error(send, 401, "missing or wrong bearer token: send Authorization: Bearer <token>",
                                 "invalid_token", [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await send_error(send, 400, "Content-Length is not a number", "bad_content_length")
                return
            if int(length) > self.max_body:
                await send_error(send, 413, f"the request body is {int(length)} bytes, over this server's "
                                 f"--max-body {self.max_body}", "body_too_large")
                return
        await self._with_cap(scope, receive, send)

    async def _with_cap(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = 0
        refused = False
        started = False

        async def counted() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    refused = True
                    if not started:
                        await send_error(send, 413, f"the request body is over this server's --max-body "
                                         f"{self.max_body} bytes", "body_too_large")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = True
            await send(message)

        await self.app(scope, counted, guarded_send)
