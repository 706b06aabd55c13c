"""Runs the front-end: uvicorn (uvloop + httptools) around the raw ASGI app, with our own signals.

SIGTERM (and the first SIGINT) drains: readiness turns false at once; for the drain delay the
server keeps answering but closes each connection after its answer (so a Service stops routing
here first); then new requests get 503, queued and in-flight requests get up to the grace
period, workers stop and the process exits 0. A second SIGINT stops at once. A model that
cannot load exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Generator
from contextlib import contextmanager
from types import FrameType

import uvicorn

from ..settings import Settings
from ..termination import load_failure_reason, report_termination
from .app import App
from .grpc_server import GrpcServer
from .models import served_settings

log = logging.getLogger("forkless.frontend")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: App, delay_s: float, grace_s: float) -> None:
        super().__init__(config)
        self.forkless_app = app
        self.delay_s = delay_s
        self.grace_s = grace_s
        self._drain_task: asyncio.Task | None = None

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Our own handlers: uvicorn's re-raise the signal after shutdown, which would exit non-zero."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is None:
            log.info("received %s: serving %gs more while unready, then draining for up to %gs",
                     signal.Signals(sig).name, self.delay_s, self.grace_s)
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
        elif sig == signal.SIGINT:
            log.warning("second SIGINT: stopping now")
            self.should_exit = True
            self.force_exit = True

    async def _drain(self) -> None:
        await self.forkless_app.drain(self.delay_s, self.grace_s)
        self.should_exit = True


def serve(settings: Settings) -> int:
    """Serve until drained (exit 0) or a model proves unloadable (exit 1)."""
    try:
        models = served_settings(settings)
    except ValueError as error:
        log.error("%s", error)
        report_termination(load_failure_reason(str(error)), str(error))
        return 1
    app = App(settings, models)
    if settings.grpc_port:
        grpc = GrpcServer(app, settings.host, settings.grpc_port, app.max_body)
        app.on_started = grpc.start
        app.on_stopping = grpc.stop
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=settings.access_log,
        # X-Forwarded-For only matters for the access log's client address; off, it costs nothing per request.
        proxy_headers=settings.access_log,
        log_config=None,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
    )
    server = _Server(config, app, settings.drain_delay_s, settings.grace_period_s)

    def stop_now() -> None:
        server.should_exit = True

    app.on_fatal = stop_now
    with contextlib.suppress(SystemExit):  # uvicorn exits 3 when the startup fails: say why below, exit 1
        server.run()
    if app.fatal_error is not None:
        report_termination(load_failure_reason(app.fatal_error), app.fatal_error)
        return 1
    if not server.started:
        return 1
    log.info("stopped")
    return 0
