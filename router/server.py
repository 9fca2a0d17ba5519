"""The router process: HTTP (FastAPI on uvicorn/uvloop) in front, the ZeroMQ bus behind."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn
from prometheus_client import CollectorRegistry

from common.stage_config import StageConfig
from router.app import create_app
from router.bus import RouterBus
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator
from router.worker_pool import WorkerPool

logger = logging.getLogger(__name__)


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
    bus = RouterBus(bus_bind, config.bus, pool)
    orchestrator = Orchestrator(config, bus, pool, RouterMetrics(registry), model_name)

    app = create_app(orchestrator, registry)
    await bus.start()
    server = uvicorn.Server(
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
    try:
        await server.serve()
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await bus.close()
