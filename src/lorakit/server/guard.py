"""A pure ASGI middleware in front of every route, so that nothing is parsed, buffered or spooled before the
request is allowed in:

1. the API key is checked first (every path but the open ones below), answering 401 before one body byte is read;
2. uploads that the server does not accept (no ``--allow-upload``) get their 403 before the body is read;
3. the body is capped while it streams: a ``Content-Length`` over the cap is a 413 at once; a chunked body is
   counted as it arrives and the app sees a disconnect as soon as it passes the cap (the client gets the 413);
4. every answer is counted in ``lorakit_requests_total`` under its route *template* (``/v1/loras/{name}``), never
   the raw path, so clients cannot grow the metrics; paths that match no route count as ``other``.

Caps: ``--max-upload-mb`` (plus room for the multipart envelope) for ``POST /v1/loras``, ``max_body_kb`` for every
other request.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.routing import Match

from lorakit.errors import ApiError

from .handlers import error_response
from .metrics import Metrics
from .settings import Settings

__all__ = ["OPEN_PATHS", "Guard", "body_cap", "key_matches", "unauthorized"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Open without an API key: the browser page, health for load balancers, Prometheus, and the API docs.
OPEN_PATHS = frozenset({"/", "/healthz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# Room for the multipart boundary and part headers around an upload of exactly --max-upload-mb.
UPLOAD_ENVELOPE = 64 << 10


def key_matches(header: bytes, key: str) -> bool:
    """Whether a raw ``Authorization`` header value is ``Bearer <key>``. The header is compared as the bytes the
    client sent and the key as UTF-8, so a non-ASCII key works when the client sends it UTF-8 encoded."""
    scheme, _, token = header.partition(b" ")
    # Constant-time compare so the key cannot be guessed byte by byte from timings.
    return scheme.lower() == b"bearer" and bool(token) and hmac.compare_digest(token, key.encode("utf-8"))


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                    headers={"WWW-Authenticate": "Bearer"})


def body_cap(settings: Settings, method: str, path: str) -> int:
    """The most body bytes a request may send: an upload's limit for ``POST /v1/loras``, else ``max_body_kb``."""
    if method == "POST" and path == "/v1/loras":
        return int(settings.max_upload_mb * (1 << 20)) + UPLOAD_ENVELOPE
    if method == "POST" and path == "/v1/generate":
        return generate_cap(settings)
    return int(settings.max_body_kb * 1024)


def generate_cap(settings: Settings) -> int:
    """A generate request may carry one conditioning input of ``--max-input-mb``, base64-encoded (4/3) in JSON or
    raw in a multipart part, plus the JSON fields around it."""
    return max(int(settings.max_body_kb * 1024), int(settings.max_input_mb * (1 << 20) * 4 / 3) + (64 << 10))


def _leaf_routes(routes: Any) -> Any:
    """The app's routes with included routers flattened (FastAPI wraps each ``include_router`` in a node that
    keeps the original router; our routers are included without a prefix, so their paths are the templates)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaf_routes(inner.routes)
        else:
            yield route


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class Guard:
    """See the module docstring; ``app`` is the FastAPI app whose routes name the metrics labels."""

    def __init__(self, app: Any, *, settings: Settings, metrics: Metrics, routes_of: Any) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.routes_of = routes_of
        self._leaves: list[Any] | None = None

    def label(self, scope: Scope) -> str:
        """The route template the request matches (also on a wrong method), or ``other``."""
        if self._leaves is None:
            self._leaves = list(_leaf_routes(self.routes_of.routes))
        for route in self._leaves:
            match, _ = route.matches(scope)
            if match in (Match.FULL, Match.PARTIAL):
                return str(getattr(route, "path", "other"))
        return "other"

    def refusal(self, scope: Scope) -> ApiError | None:
        """The error to answer without reading the body, if any: auth, uploads disabled, declared size."""
        method, path, settings = scope["method"], scope["path"], self.settings
        if settings.api_key is not None and path not in OPEN_PATHS:
            if not key_matches(_header(scope, b"authorization") or b"", settings.api_key):
                return unauthorized()
        if not settings.allow_upload and (
            (method == "POST" and path == "/v1/loras") or (method == "DELETE" and path.startswith("/v1/loras/"))
        ):
            return ApiError(403, "uploads_disabled", "Uploads are disabled; start the server with --allow-upload.")
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                return ApiError(400, "invalid_request", "Content-Length must be a decimal number.")
            if int(length) > body_cap(settings, method, path):
                return self.too_large(method, path)
        return None

    def too_large(self, method: str, path: str) -> ApiError:
        if method == "POST" and path == "/v1/loras":
            limit = f"{self.settings.max_upload_mb:g} MB upload"
        elif method == "POST" and path == "/v1/generate":
            limit = f"generate body (an input of at most --max-input-mb {self.settings.max_input_mb:g} MB)"
        else:
            limit = f"{self.settings.max_body_kb:g} KiB body"
        return ApiError(413, "too_large", f"Request body exceeds the {limit} limit.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            refused = self.refusal(scope)
            if refused is not None:
                await _answer(refused, scope, receive, counted)
            else:
                await self._capped(scope, receive, counted)
        except BaseException:
            if not status:
                status.append(500)
            raise
        finally:
            self.metrics.observe_request(self.label(scope), status[0] if status else 500, None)

    async def _capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        cap = body_cap(self.settings, scope["method"], scope["path"])
        seen = 0
        over = False
        started = False

        async def limited() -> Message:
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    over = True  # the app sees the client go away and stops reading
                    return {"type": "http.disconnect"}
            return message

        async def gated(message: Message) -> None:
            nonlocal started
            if over:
                return  # the app's answer to the "disconnect" is replaced by the 413 below
            started = True
            await send(message)

        try:
            await self.app(scope, limited, gated)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _answer(self.too_large(scope["method"], scope["path"]), scope, receive, send)


async def _answer(err: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(err.status, err.code, err.message, err.headers or None)(scope, receive, send)
