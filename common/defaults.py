"""The default of every option that more than one entry point offers, defined once.

The command line (launch/cli.py), the supervisor's option types (launch/supervisor.py), the worker
entry (common/worker_main.py), the router (router/server.py) and the HTTP client read them from
here; launch/disagg_glm_image.sh restates none (it passes options through to `glm-image-serve
launch`, whose --help shows these values). Module attributes, read when a parser is built, so the
tests can tell a parser that reads them from one that repeats them.
"""

from __future__ import annotations

from typing import Final

MODEL_NAME: Final[str] = "zai-org/GLM-Image"  # the model id /v1/models reports for real weights

# Addresses. Everything binds this machine only unless asked: the launcher, a standalone router (HTTP
# and bus), worker metrics and the supervisor's metrics. Serving other machines is a choice made on
# the command line (--host 0.0.0.0, --bus-bind tcp://0.0.0.0:5570; deploy/k8s passes both).
LOCAL_HOST: Final[str] = "127.0.0.1"
ROUTER_HOST: Final[str] = LOCAL_HOST
HTTP_PORT: Final[int] = 8000  # the router's HTTP API
BUS_PORT: Final[int] = 5570  # the router's ZeroMQ bus, which the workers connect to
ROUTER_BUS_BIND: Final[str] = f"tcp://{LOCAL_HOST}:{BUS_PORT}"  # a standalone router's bus
ROUTER_URL: Final[str] = f"http://{LOCAL_HOST}:{HTTP_PORT}"  # where the client looks for a router

# Stopping: the router finishes in-flight requests, a worker drains its jobs, each for this long
# after SIGTERM; the supervisor allows STOP_MARGIN_S more before it SIGKILLs either.
SHUTDOWN_GRACE_S: Final[float] = 30.0
STOP_MARGIN_S: Final[float] = 5.0

# `glm-image-serve launch`: what it starts and how it keeps it running.
NUM_AR: Final[int] = 1
NUM_DIT: Final[int] = 1
READY_TIMEOUT_S: Final[float] = 600.0  # every worker loaded and registered, or the launch fails
MAX_RESTARTS: Final[int] = 5  # restarts per process within RESTART_WINDOW_S; one more exit is a crash loop
RESTART_WINDOW_S: Final[float] = 60.0
BACKOFF_INITIAL_S: Final[float] = 1.0  # the wait before the first restart; doubles per recent exit
BACKOFF_MAX_S: Final[float] = 30.0
