"""Every error leaves the API as ``{"error": {"code", "message"}}``. Requests are counted (status included) by
the :mod:`.guard` middleware under their route template, not here."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.errors import LorakitError

from .registry import ApiError

__all__ = ["error_response", "install_error_handlers"]


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}")
    return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, "http_error", str(exc.detail))


async def _lorakit(request: Request, exc: LorakitError) -> JSONResponse:
    # A LoRA that parses but does not fit the model (MatchError, ShapeMismatchError) is the client's input.
    return error_response(400, type(exc).__name__, str(exc))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(LorakitError, _lorakit)  # type: ignore[arg-type]
