"""Running a service's aiohttp app: until SIGTERM/SIGINT, with a bounded shutdown, every answer problem+json.

Owns: :func:`serve` (the loop a service's ``__main__`` runs) and :class:`ProblemRunner`. aiohttp answers a request
it cannot parse — a negative or overflowing ``Content-Length``, ``Content-Length`` together with chunked encoding,
a malformed request line — before any middleware runs, in plain text, logging an ERROR with a traceback. The
runner's connection handler answers those with RFC 9457 problem+json instead and logs one WARNING line: a client's
malformed framing is the client's error, not an incident.

Does not own: errors raised by handlers (``services.shared.http.problem_middleware``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import threading
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from services.shared.http import problem

log = logging.getLogger(__name__)


class _ProblemRequestHandler(RequestHandler):
    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            detail = "the service failed; the incident is logged"
        else:
            detail = f"malformed HTTP request: {getattr(exc, 'message', None) or message or HTTPStatus(status).phrase}"
            log.warning("%s from %s: %s", status, request.remote, detail)
        if request.writer.output_size > 0:  # a response has begun: the connection is all that is left to close
            raise ConnectionError("response already started")
        response = problem(status, HTTPStatus(status).phrase, detail, type_slug=f"http-{status}", instance="(unparsed)")
        response.force_close()
        return response


class _ProblemServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connections answer unparseable requests with problem+json."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds the low-level server itself and offers no hook for its error responses; the subclass only
        # changes which connection handler it creates.
        server.__class__ = _ProblemServer
        return server


async def serve(
    app: web.Application, *, host: str, port: int, ssl_context: ssl.SSLContext | None, shutdown_timeout: float,
    started: Callable[[int], None] | None = None, stop: asyncio.Event | None = None,
    exit_within_s: float | None = None,
) -> None:  # fmt: skip
    """Serve ``app`` until SIGTERM or SIGINT (or ``stop`` is set by the app itself), then shut down: in-flight
    requests get ``shutdown_timeout`` seconds, then the app's cleanup contexts run. ``started(port)`` is called
    once listening. ``exit_within_s``: from the stop, the process ends within that time even if some part of the
    shutdown hangs (a watchdog thread exits it with code 1; whatever was durable stays durable).

    Raises: whatever the app's start-up (cleanup contexts) raises.
    """
    runner = ProblemRunner(app, shutdown_timeout=shutdown_timeout, access_log=None)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def stopping(why: str) -> None:
        log.info("stopping (%s)", why)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping, sig.name)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        if started is not None:
            started(runner.addresses[0][1])
        await stop.wait()
        if exit_within_s is not None:  # however the stop came (a signal, the app itself)
            watchdog = threading.Timer(exit_within_s, _exit_now, (exit_within_s,))
            watchdog.daemon = True
            watchdog.start()
        log.info("shutting down: closing connections (up to %.1fs), then the service's resources", shutdown_timeout)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(RuntimeError):
                loop.remove_signal_handler(sig)
        await runner.cleanup()


def _exit_now(after_s: float) -> None:  # pragma: no cover - runs only when a shutdown hangs
    log.critical("the shutdown did not finish within %.1fs of the stop; exiting now", after_s)
    logging.shutdown()
    os._exit(1)


def run(main: Coroutine[Any, Any, None], *, linger_s: float = 1.0) -> None:
    """``asyncio.run(main)``, except that tasks still running when ``main`` returns (a client library's background
    work against a server that no longer answers) get ``linger_s`` after cancellation, not as long as they like:
    a service told to stop exits within its grace period.

    Raises: whatever ``main`` raises.
    """
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main)
    finally:
        try:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=linger_s))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
