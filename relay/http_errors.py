# Invariant: every error a handler raises reaches the client as ``{"error", "message"}`` JSON
# with its status (and Retry-After for 429 and 503); an unexpected one is logged and answered
# with a 500 whose body reveals nothing.
"""Rendering relay errors as HTTP responses."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from relay.errors import RelayError
from relay.guard import request_started, response_finished
from relay.state import STATE_KEY

__all__ = ["Handler", "json_error", "json_errors"]

log = logging.getLogger("relay.app")  # the handlers' logger, as before the split


def json_error(err: RelayError) -> web.Response:
    """Render a RelayError as its JSON response (with Retry-After for 429 and 503)."""
    headers = {}
    retry = err.extra.get("retry_after")
    if err.status in (429, 503) and isinstance(retry, int):
        headers["Retry-After"] = str(retry)
    return web.json_response(err.to_json(), status=err.status, headers=headers)


_HTTP_ERRORS = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    416: "range_not_satisfiable",
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_errors(handler: Handler) -> Handler:
    """Wrap a handler so every error becomes a JSON error response (and is counted).

    A decorator rather than a middleware: a middleware's frames stay alive for the whole life of
    every WebSocket, and idle sockets must stay small. The WebSocket handler renders its own
    pre-upgrade errors.
    """

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        request_started(request)  # the slowloris guard's clock stops: headers are complete
        try:
            resp = await handler(request)
        except RelayError as err:
            resp = json_error(err)
            if getattr(err, "close_connection", False):
                await _send_and_close(request, resp)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _HTTP_ERRORS.get(exc.status, "http_error")
            keep = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            resp = web.json_response(
                {"error": code, "message": exc.reason}, status=exc.status, headers=keep
            )
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            resp = web.json_response(
                {"error": "internal_error", "message": "internal error"}, status=500
            )
        finally:
            response_finished(request)  # the next byte on this connection starts its clock
        request.app[STATE_KEY].metrics.http_responses[resp.status] += 1
        return resp

    return wrapped


async def _send_and_close(request: web.Request, resp: web.StreamResponse) -> None:
    """Write ``resp`` now, then close the connection without reading the rest of the body."""
    resp.force_close()
    with contextlib.suppress(ConnectionError, RuntimeError):
        await resp.prepare(request)
        await resp.write_eof()
    force_close = getattr(request.protocol, "force_close", None)
    if force_close is not None:
        force_close()
