"""The router process: HTTP (FastAPI on uvicorn/uvloop) in front, the ZeroMQ bus behind."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal

import uvicorn
from prometheus_client import CollectorRegistry

from common import defaults
from common.bus_security import RouterCurve
from common.stage_config import StageConfig
from router.edge.app import create_app
from router.edge.auth import ApiKeyConfig
from router.core.bus import RouterBus
from router.edge.http_limits import ConnectionLimits, HttpLimitMetrics, ensure_open_files, protocol_factory
from router.core.metrics import RouterMetrics
from router.core.orchestrator import Orchestrator
from router.core.scheduler import Scheduler
from router.core.worker_pool import WorkerPool

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's Server without its own signal capture: `serve_router` handles SIGINT/SIGTERM on the
    event loop. uvicorn re-raises a captured signal once serve() returns, so a router that had
    stopped gracefully still died of that SIGTERM (exit -15); now it returns and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def build_core(config: StageConfig, model_name: str, bus_bind: str, registry: CollectorRegistry,
               curve: RouterCurve | None = None) -> tuple[RouterBus, Orchestrator]:
    """The router's core, wired: the worker table, the bus (a transport), the Scheduler that owns
    every slot and hears the bus, and the Orchestrator (the edge's ImageBackend) that runs on it."""
    pool = WorkerPool(config.bus.peer_timeout_s)
    metrics = RouterMetrics(registry)
    bus = RouterBus(bus_bind, config.bus, pool, metrics, config.fingerprint(), curve=curve)
    scheduler = Scheduler(config, pool, bus, metrics)
    bus.attach(scheduler)
    return bus, Orchestrator(config, scheduler, metrics, model_name)


async def serve_router(
    config: StageConfig,
    model_name: str,
    host: str,
    port: int,
    bus_bind: str,
    shutdown_grace_s: float = defaults.SHUTDOWN_GRACE_S,
    curve: RouterCurve | None = None,
    api_keys: ApiKeyConfig | None = None,
) -> None:
    """Bind the bus (with CURVE when `curve` is given), serve HTTP until SIGINT/SIGTERM, then
    finish in-flight requests and exit. With `api_keys`, /v1/* needs one (router/edge/auth.py); the
    HTTP connection limits come from `config.router` (router/edge/http_limits.py)."""
    registry = CollectorRegistry()
    bus, orchestrator = build_core(config, model_name, bus_bind, registry, curve)

    limit_metrics = HttpLimitMetrics(registry)
    app = create_app(orchestrator, registry, api_keys=api_keys, limit_metrics=limit_metrics)
    settings = config.router
    # The connection limits live in our protocol (router/edge/http_limits.py); uvicorn's own
    # limit_concurrency stays off: it counts tasks too and decides per request.
    limits = ConnectionLimits.from_settings(settings)
    limits = dataclasses.replace(limits, max_connections=ensure_open_files(limits.max_connections))
    await bus.start()
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="none",  # we already run on uvloop
            log_level="warning",
            timeout_graceful_shutdown=int(shutdown_grace_s),
            access_log=False,
            http=protocol_factory(limits, limit_metrics),  # type: ignore[arg-type]
        )
    )
    logger.info("router listening on http://%s:%d (bus %s), serving %s", host, port, bus_bind, model_name)
    logger.info("HTTP limits: headers within %gs, body within %gs, %d connections, %d header bytes; API keys: %s",
                limits.header_timeout_s, settings.http_body_timeout_s, limits.max_connections, limits.max_header_bytes,
                "off (the API is open)" if api_keys is None else
                f"on{', /metrics too' if api_keys.protect_metrics else ' (/metrics open)'}")
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if server.should_exit:
            server.force_exit = True  # a second signal skips the grace period
            return
        logger.info("%s received: finishing in-flight requests (grace %.0fs)", signal.Signals(signum).name, shutdown_grace_s)
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await server.serve()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        with contextlib.suppress(asyncio.CancelledError):
            await bus.close()
