"""The router process: HTTP (FastAPI on uvicorn/uvloop) in front, the ZeroMQ bus behind."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn
from prometheus_client import CollectorRegistry

from common.stage_config import StageConfig
from router.app import create_app
from router.bus import RouterBus
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator
from router.worker_pool import WorkerPool

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's Server without its own signal capture: `serve_router` handles SIGINT/SIGTERM on the
    event loop. uvicorn re-raises a captured signal once serve() returns, so a router that had
    stopped gracefully still died of that SIGTERM (exit -15); now it returns and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve_router(
    config: StageConfig,
    model_name: str,
    host: str,
    port: int,
    bus_bind: str,
    shutdown_grace_s: float = 30.0,
) -> None:
    """Bind the bus, serve HTTP until SIGINT/SIGTERM, then finish in-flight requests and exit."""
    registry = CollectorRegistry()
    pool = WorkerPool(config.bus.peer_timeout_s)
    metrics = RouterMetrics(registry)
    bus = RouterBus(bus_bind, config.bus, pool, metrics, config.fingerprint())
    orchestrator = Orchestrator(config, bus, pool, metrics, model_name)

    app = create_app(orchestrator, registry)
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
        )
    )
    logger.info("router listening on http://%s:%d (bus %s), serving %s", host, port, bus_bind, model_name)
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
