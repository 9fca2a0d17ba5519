"""`glm-image-serve`: one command line for every process of the system.

    glm-image-serve launch      --model /path/to/GLM-Image --num-ar 2 --num-dit 2   # everything, supervised
    glm-image-serve router      --stage-config stage_configs/glm_image.yaml --port 8000
    glm-image-serve ar-worker   --router tcp://ROUTER_HOST:5570 --model /path/to/GLM-Image
    glm-image-serve dit-worker  --router tcp://ROUTER_HOST:5570 --model /path/to/GLM-Image
    glm-image-serve make-tiny-model --out models/tiny-glm-image [--preset real-shape]
    glm-image-serve build-model --preset full-size --out models/full-size   # configs only: random weights on load
    glm-image-serve keygen --out keys/ [--worker ar --worker dit]   # CurveZMQ keys for the bus
    glm-image-serve generate --url http://127.0.0.1:8000 --prompt "a cat" --size 512x512 --out cat.png   # client
    glm-image-serve generate --model /path/to/GLM-Image --prompt "a cat" --out cat.png   # offline, no router
    glm-image-serve run-batch -i requests.jsonl -o results.jsonl --model /path/to/GLM-Image   # OpenAI batch files
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NoReturn

from common import defaults

DEFAULT_STAGE_CONFIG = Path(__file__).resolve().parent.parent / "stage_configs" / "glm_image.yaml"


class _Parser(argparse.ArgumentParser):
    """argparse, with its two commonest errors saying what to fix: `unknown option --xyz` (named by the
    subcommand it was given to) rather than `unrecognized arguments`, and `option --port needs a value`
    rather than `expected one argument`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.subcommands: dict[str, argparse.ArgumentParser] = {}

    def parse_args(self, args=None, namespace=None):
        """argparse's, with leftover arguments reported by the subcommand that did not know them."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # The subcommand's parser, so the usage shown is that subcommand's.
            parser = self.subcommands.get(getattr(parsed, "command", None), self)
            unknown = next((a for a in extras if a.startswith("-")), None)
            parser.error(f"unknown option {unknown.split('=', 1)[0]} (--help lists the options)" if unknown
                         else f"unexpected argument {extras[0]!r} (--help lists the options)")
        return parsed

    def error(self, message: str) -> NoReturn:
        missing = re.fullmatch(r"argument (-[^:\s]+): expected one argument", message)
        if missing:
            message = f"option {missing.group(1)} needs a value (--help lists the options)"
        super().error(message)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stage-config",
        default=str(DEFAULT_STAGE_CONFIG),
        help="stage config YAML (stages, devices, engine args, sampling defaults, limits, bus timing); default: %(default)s",
    )


def _project_version() -> str:
    """The installed package's version; from pyproject.toml when run from a checkout that was never
    installed (`python -m launch.cli` with the tree on PYTHONPATH, as bench/gpu_check.sh does)."""
    try:
        return version("glm-image-serve")
    except PackageNotFoundError:
        import tomllib

        with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["project"]["version"]


def _env_path(name: str) -> str | None:
    return os.environ.get(name) or None


def _add_worker(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument(
        "--router",
        action="append",
        required=True,
        metavar="ADDR",
        help="ZeroMQ address of a router's bus, e.g. tcp://10.0.0.5:5570; repeat (or comma-separate) to serve several "
             "router replicas. A DNS name (tcp://glm-router-bus:5570, a Kubernetes headless Service) means every "
             "address it resolves to, re-resolved every bus.router_resolve_interval_s",
    )
    p.add_argument("--curve-router-key", metavar="FILE", default=_env_path("GLM_CURVE_ROUTER_KEY"),
                   help="CurveZMQ: the router's public key file (router.key from `glm-image-serve keygen`; a .key_secret "
                        "file works too, only its public half is read) [env GLM_CURVE_ROUTER_KEY]; needs --curve-secret-key")
    p.add_argument("--curve-secret-key", metavar="FILE", default=_env_path("GLM_CURVE_SECRET_KEY"),
                   help="CurveZMQ: this worker's own key file (workers/NAME.key_secret; its public half must be in the "
                        "router's allow-list) [env GLM_CURVE_SECRET_KEY]; needs --curve-router-key")
    p.add_argument("--model", help="GLM-Image folder in the diffusers layout (default: the stage config's `model`)")
    p.add_argument(
        "--device",
        help="torch device for this worker, e.g. cuda:1 or cpu (default: from the stage's `devices`; a GPU index N means cuda:N)",
    )
    p.add_argument("--worker-id", help="unique id on the bus (default: STAGE-HOST-PID-RANDOM, new for every process: a restarted "
                                        "container has the same host name and PID)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics for this worker on this port")
    p.add_argument("--metrics-host", default=defaults.LOCAL_HOST,
                   help="address the metrics port binds (default: %(default)s, this machine only; 0.0.0.0 for a "
                        "Prometheus on another host)")
    p.add_argument("--metrics-advertise", metavar="HOST[:PORT]", default=os.environ.get("GLM_METRICS_ADVERTISE"),
                   help="where Prometheus can scrape this worker, announced to the routers (GET /metrics/targets); "
                        "PORT defaults to --metrics-port (env GLM_METRICS_ADVERTISE; default: --metrics-host when it is "
                        "a concrete address, else the local address the OS uses towards the first --router; "
                        "in Kubernetes $(POD_IP):9100)")
    p.add_argument("--drain-grace", type=float, default=defaults.SHUTDOWN_GRACE_S, help="seconds SIGTERM waits for in-flight jobs (default: %(default)s)")
    _add_random_init(p)


_RANDOM_INIT_HELP = ("initialise random weights on the device from the folder's configs instead of loading weights "
                     "(for timing only: the images are noise; logged as a WARNING). A folder written by "
                     "`glm-image-serve build-model` has no weights and is always served this way")


def _add_random_init(p: argparse.ArgumentParser) -> None:
    p.add_argument("--random-init", action="store_true", help=_RANDOM_INIT_HELP)


def _add_api_keys(p: argparse.ArgumentParser) -> None:
    """The HTTP API keys (router/edge/auth.py); the same flags on `router` and `launch`."""
    g = p.add_argument_group("API keys", "with any key, every /v1/* request needs 'Authorization: Bearer KEY' "
                             "(/health, /ready and the playground page stay open); keys from all sources are "
                             "accepted at once, which is how they rotate (docs/http_security.md)")
    g.add_argument("--api-key", action="append", metavar="KEY",
                   help="an accepted API key; repeat for several. Visible to every user in `ps`: prefer "
                        "--api-key-file or $GLM_API_KEY (comma separated keys)")
    g.add_argument("--api-key-file", metavar="FILE",
                   help="file of accepted keys, one per line ('#' comment lines and blank lines ignored), e.g. a "
                        "mounted Kubernetes Secret; re-read when it changes [env GLM_API_KEY_FILE]")
    g.add_argument("--protect-metrics", action="store_true",
                   help="/metrics and /metrics/targets need a key too (Prometheus: `authorization: "
                        "{type: Bearer, credentials_file: ...}`, type spelled out in http_sd_configs); default: open, "
                        "like /health")


def _api_key_config(args):
    """The API key sources of `args` and the environment, checked (exits with the reason when unusable)."""
    from router.edge.auth import ApiKeyConfig, ApiKeyError

    try:
        return ApiKeyConfig.from_sources(args.api_key, args.api_key_file, os.environ, args.protect_metrics)
    except ApiKeyError as exc:
        sys.exit(f"error: {exc}")


def _add_launch(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--model", required=True, help="GLM-Image folder in the diffusers layout, given to every worker")
    p.add_argument("--model-name", default=defaults.MODEL_NAME, help="model name reported by /v1/models (default: %(default)s)")
    p.add_argument("--host", default=defaults.LOCAL_HOST, help="HTTP listen address (default: %(default)s)")
    p.add_argument("--port", type=int, default=defaults.HTTP_PORT, help="HTTP port (default: %(default)s)")
    p.add_argument("--bus-port", type=int, default=defaults.BUS_PORT, help="ZeroMQ bus port the workers connect to (default: %(default)s)")
    p.add_argument("--bus-host", help="address the bus binds (default: the HTTP --host; 0.0.0.0 binds every interface)")
    p.add_argument("--curve-keys", metavar="DIR", default=_env_path("GLM_CURVE_KEYS"),
                   help="encrypt and authenticate the bus with CurveZMQ, using a `glm-image-serve keygen --out DIR` folder: "
                        "the router gets router.key_secret and allowed_workers/, AR workers workers/ar.key_secret, DiT "
                        "workers workers/dit.key_secret [env GLM_CURVE_KEYS] (default: no CURVE)")
    p.add_argument("--num-ar", type=int, default=defaults.NUM_AR, help="AR workers (default: %(default)s)")
    p.add_argument("--num-dit", type=int, default=defaults.NUM_DIT, help="DiT workers (default: %(default)s)")
    p.add_argument("--ar-devices", default="", help="comma list of devices, AR worker i takes item i mod len (default: the stage config's)")
    p.add_argument("--dit-devices", default="", help="the same for DiT workers")
    p.add_argument("--metrics-port", type=int, help="first worker Prometheus port: worker k (AR first, then DiT) gets N+k")
    p.add_argument("--supervisor-metrics-port", type=int,
                   help="serve the supervisor's own Prometheus metrics (restarts, running processes) on --host:N")
    p.add_argument("--log-dir", help="one log file per process in this folder, never removed (default: a new temporary folder, "
                                     "removed when the launch ends cleanly, kept and its path printed on stderr when it "
                                     "fails or a process crash-looped); every line is also relayed to stderr")
    p.add_argument("--max-restarts", type=int, default=defaults.MAX_RESTARTS,
                   help="restarts allowed per process within --restart-window; one more exit is a crash loop and the process is left down (default: %(default)s)")
    p.add_argument("--restart-window", type=float, default=defaults.RESTART_WINDOW_S, help="seconds over which exits are counted (default: %(default)s)")
    p.add_argument("--backoff-initial", type=float, default=defaults.BACKOFF_INITIAL_S, help="seconds before the first restart; doubles per recent exit (default: %(default)s)")
    p.add_argument("--backoff-max", type=float, default=defaults.BACKOFF_MAX_S, help="longest wait before a restart (default: %(default)s)")
    p.add_argument("--ready-timeout", type=float, default=defaults.READY_TIMEOUT_S,
                   help="seconds for every worker to load and register before the launch fails (default: %(default)s)")
    p.add_argument("--shutdown-grace", type=float, default=defaults.SHUTDOWN_GRACE_S,
                   help="on Ctrl-C/SIGTERM: seconds the router gets to finish in-flight requests, then the workers to drain (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command line of every process it would start (after checking the options and the "
                        "stage config), then exit without starting any")
    p.add_argument("--lora-dir", metavar="DIR", default=_env_path("GLM_LORA_DIR"),
                   help="LoRA adapter folder, given to the router and every DiT worker (docs/lora.md) [env GLM_LORA_DIR]")
    p.add_argument("--random-init", action="store_true",
                   help=_RANDOM_INIT_HELP + "; the served model name then ends in -random-init")
    _add_api_keys(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="glm-image-serve", description="Disaggregated GLM-Image serving.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_project_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    launch = sub.add_parser("launch", help="run a router and N AR + M DiT workers on this machine, supervised: "
                                           "restarted when they die, stopped gracefully on Ctrl-C/SIGTERM")
    _add_launch(launch)

    r = sub.add_parser("router", help="HTTP router (OpenAI-compatible API) that binds the worker bus")
    _add_common(r)
    r.add_argument("--host", default=defaults.ROUTER_HOST,
                   help="HTTP listen address (default: %(default)s, this machine only; 0.0.0.0 for clients elsewhere)")
    r.add_argument("--port", type=int, default=defaults.HTTP_PORT, help="HTTP port (default: %(default)s)")
    r.add_argument("--bus-bind", default=defaults.ROUTER_BUS_BIND,
                   help="ZeroMQ address the bus binds, where workers connect (default: %(default)s, this machine only; "
                        "tcp://0.0.0.0:PORT for workers on other machines, with CURVE: --curve-secret-key)")
    r.add_argument("--model-name", default=defaults.MODEL_NAME, help="model name reported by /v1/models (default: %(default)s)")
    r.add_argument("--shutdown-grace", type=float, default=defaults.SHUTDOWN_GRACE_S,
                   help="seconds SIGTERM waits for in-flight HTTP requests (default: %(default)s)")
    r.add_argument("--curve-secret-key", metavar="FILE", default=_env_path("GLM_CURVE_SECRET_KEY"),
                   help="CurveZMQ: the router's key file (router.key_secret from `glm-image-serve keygen`) "
                        "[env GLM_CURVE_SECRET_KEY]; needs --curve-allow-dir. Without both the bus is plaintext")
    r.add_argument("--curve-allow-dir", metavar="DIR", default=_env_path("GLM_CURVE_ALLOW_DIR"),
                   help="CurveZMQ: directory of the worker public keys (.key files) allowed on the bus, re-read when it "
                        "changes: adding or removing a key needs no restart [env GLM_CURVE_ALLOW_DIR]; needs --curve-secret-key")
    r.add_argument("--lora-dir", metavar="DIR", default=_env_path("GLM_LORA_DIR"), help="folder of LoRA adapters for the DiT (NAME.safetensors or NAME/adapter_model.safetensors; docs/lora.md) [env GLM_LORA_DIR]; default: the stage config's lora.dir")
    _add_api_keys(r)

    ar = sub.add_parser("ar-worker", help="AR stage worker (prompt + size -> prior token grid)")
    _add_worker(ar)
    dit = sub.add_parser("dit-worker", help="DiT stage worker (prior tokens -> image)")
    _add_worker(dit)
    dit.add_argument("--lora-dir", metavar="DIR", default=_env_path("GLM_LORA_DIR"), help="folder of LoRA adapters for the DiT (NAME.safetensors or NAME/adapter_model.safetensors; docs/lora.md) [env GLM_LORA_DIR]; default: the stage config's lora.dir")

    tiny = sub.add_parser("make-tiny-model", help="build the tiny random-weight GLM-Image (no network)")
    tiny.add_argument("--out", required=True, help="output folder")
    tiny.add_argument("--overwrite", action="store_true", help="rebuild even if the folder exists")
    tiny.add_argument("--preset", choices=["tiny", "real-shape"], default="tiny",
                      help="tiny widths (default), or the released configuration with 1 layer per stack in bfloat16 "
                           "(~3 GB; see docs/model_facts.md)")

    build = sub.add_parser("build-model", help="write a GLM-Image folder without weights (configs, tokenizers, processor): "
                                               "its workers initialise random weights on their device, for timing the "
                                               "released shapes without a checkpoint")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--preset", choices=["full-size", "real-shape", "tiny"], default="full-size",
                       help="full-size: the released configuration at full depth (10.1 B AR checkpoint, 6.93 B DiT; "
                            "default); real-shape: the same with 1 layer per stack; tiny: the test model's widths "
                            "(docs/model_facts.md)")
    build.add_argument("--overwrite", action="store_true", help="rebuild even if the folder exists")

    keygen = sub.add_parser("keygen", help="write CurveZMQ keys for the bus: the router's, one per worker name, and the "
                                           "router's allow-list of worker public keys")
    keygen.add_argument("--out", required=True, metavar="DIR", help="output folder (what `launch --curve-keys` takes)")
    keygen.add_argument("--worker", action="append", metavar="NAME",
                        help="a worker key name; repeat for several (default: ar and dit, one per stage, as the "
                             "launcher and one Kubernetes Deployment per stage use them)")
    keygen.add_argument("--workers", type=int, metavar="N",
                        help="instead: N worker keys per stage, named ar-0..ar-N-1 and dit-0..dit-N-1 (one per machine)")
    keygen.add_argument("--overwrite", action="store_true", help="replace existing key files (their workers then need the new keys)")

    from client import generate as client

    gen = sub.add_parser("generate", help="client: text- or image-to-image through a running router, with progress",
                         epilog=client.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    client.add_arguments(gen)

    from client import batch

    run_batch = sub.add_parser("run-batch", help="OpenAI batch files (JSONL) through GLM-Image: offline with --model, "
                                                 "or a running router with --url; resumable",
                               epilog=batch.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_arguments(run_batch)
    parser.subcommands = dict(sub.choices)
    return parser


def _resolve_model(arg: str | None, config, stages: tuple[str, ...] = ("ar", "dit")) -> str:
    model = arg or config.model
    if not model:
        sys.exit("error: no model given: pass --model /path/to/GLM-Image (or set `model` in the stage config)")
    if not (Path(model) / "model_index.json").exists():
        sys.exit(f"error: {model} is not a GLM-Image folder (no model_index.json); download the weights to a local folder")
    from model_presets.random_init import weights_problem

    problem = weights_problem(model, stages)
    if problem is not None:
        sys.exit(f"error: {problem}")
    return model


def _request_random_init(args) -> None:
    """`--random-init`: this process and every process it starts initialise random weights."""
    if getattr(args, "random_init", False):
        from model_presets.random_init import RANDOM_INIT_ENV

        os.environ[RANDOM_INIT_ENV] = "1"


def _resolve_device(arg: str | None, devices: str, engine: str) -> str:
    """The worker's device: GPU index N means cuda:N. A vLLM engine takes the whole list
    (cuda:0,1 for tensor parallelism); other engines run on the first device."""
    if arg:
        return arg
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not all(d.isdigit() for d in ids):
        return ids[0]
    return f"cuda:{','.join(ids)}" if engine == "vllm" else f"cuda:{ids[0]}"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "make-tiny-model":
        from model_presets.tiny_model import build_tiny_model

        print(build_tiny_model(args.out, overwrite=args.overwrite, preset=args.preset))
        return
    if args.command == "build-model":
        from model_presets.tiny_model import build_model_configs

        print(build_model_configs(args.out, preset=args.preset, overwrite=args.overwrite))
        return
    _request_random_init(args)
    if args.command == "keygen":
        sys.exit(_keygen(args))
    if args.command == "generate":
        from client.generate import run

        sys.exit(run(args))
    if args.command == "run-batch":
        from client.batch import run

        sys.exit(run(args))
    if args.command == "launch":
        sys.exit(_launch(args))

    from common.logs import configure_logging
    from common.stage_config import StageConfigError, load_stage_config

    die_with_supervisor()
    configure_logging(args.command)
    try:
        config = load_stage_config(args.stage_config).with_lora_dir(getattr(args, "lora_dir", None))
    except StageConfigError as exc:
        sys.exit(f"error: {exc}")
    # The AR stage never reads adapters: only the router and the DiT workers need the folder.
    if args.command in ("router", "dit-worker") and config.lora.dir is not None and not Path(config.lora.dir).is_dir():
        sys.exit(f"error: the LoRA adapter folder {config.lora.dir} (--lora-dir or lora.dir) is not a folder")
    import uvloop

    from common.bus_security import BusSecurityError, RouterCurve, WorkerCurve

    if args.command == "router":
        from router.server import serve_router

        try:
            curve = RouterCurve.from_files(args.curve_secret_key, args.curve_allow_dir)
        except BusSecurityError as exc:
            sys.exit(f"error: {exc}")
        api_keys = _api_key_config(args)
        uvloop.run(serve_router(config, args.model_name, args.host, args.port, args.bus_bind, args.shutdown_grace,
                                curve=curve, api_keys=api_keys))
        return
    from common.worker_runtime import parse_router_targets

    try:  # before loading any weights
        # One address per item: `--router A,B` is `--router A --router B` for everything downstream.
        routers = [target.spec for target in parse_router_targets(args.router)]
        worker_curve = WorkerCurve.from_files(args.curve_router_key, args.curve_secret_key)
    except (BusSecurityError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    model = _resolve_model(args.model, config, ("ar",) if args.command == "ar-worker" else ("dit",))
    stage = config.ar if args.command == "ar-worker" else config.dit
    device = _resolve_device(args.device, stage.devices, getattr(stage, "engine", "transformers"))
    from common.worker_main import WorkerOptions, parse_advertise

    advertise = None
    if args.metrics_advertise:
        if not args.metrics_port:
            sys.exit("error: --metrics-advertise (or GLM_METRICS_ADVERTISE) needs --metrics-port: there is nothing to scrape without it")
        try:
            advertise = parse_advertise(args.metrics_advertise, args.metrics_port)
        except ValueError as exc:
            sys.exit(f"error: {exc}")
    options = WorkerOptions(
        model_path=model,
        config=config,
        routers=routers,
        worker_id=args.worker_id,
        device=device,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        metrics_advertise=advertise,
        drain_grace_s=args.drain_grace,
        curve=worker_curve,
    )
    from common.worker_runtime import WorkerRefused

    if args.command == "ar-worker":
        from stage_ar.worker import serve_ar_worker as serve
    else:
        from stage_dit.worker import serve_dit_worker as serve
    try:
        uvloop.run(serve(options))
    except WorkerRefused as exc:
        _exit_now(1, f"error: the router refused this worker: {exc}")
    _exit_now(0)


def _exit_now(status: int, message: str | None = None) -> None:
    """End a worker process that has shut down: its sockets are closed, its engine is stopped and its
    jobs are answered. What is left is the interpreter tearing down torch, transformers and vLLM
    (thousands of modules): 1-5 s that release nothing and keep a SIGTERMed worker alive, so skip it."""
    import logging

    if message is not None:
        print(message, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _keygen(args) -> int:
    """`glm-image-serve keygen`: write the keys, say which file goes where."""
    from common.bus_security import DEFAULT_WORKER_NAMES, BusSecurityError, write_keys

    if args.worker and args.workers is not None:
        sys.exit("error: give either --worker NAME (repeatable) or --workers N, not both")
    if args.workers is not None:
        if args.workers < 1:
            sys.exit("error: --workers must be at least 1")
        names = [f"{stage}-{i}" for stage in ("ar", "dit") for i in range(args.workers)]
    else:
        names = args.worker or list(DEFAULT_WORKER_NAMES)
    try:
        written = write_keys(args.out, names, overwrite=args.overwrite)
    except (BusSecurityError, OSError) as exc:
        sys.exit(f"error: {exc}")
    print(written.describe())
    return 0


def die_with_supervisor() -> None:
    """Under `glm-image-serve launch` (or the test harness), have the kernel SIGTERM this process when
    the supervisor dies, so a launcher killed with SIGKILL does not leave workers holding GPUs and ports."""
    from common.parent_death import signal_on_parent_death
    from launch.supervisor import SUPERVISOR_PID_ENV

    supervisor_pid = os.environ.get(SUPERVISOR_PID_ENV)
    if supervisor_pid and not signal_on_parent_death(int(supervisor_pid)):
        sys.exit("error: the launcher that started this process has exited")


def _launch(args) -> int:
    """`glm-image-serve launch`: plan the processes, supervise them, return the exit status."""
    import asyncio
    import tempfile

    from common.logs import configure_logging
    from common.stage_config import StageConfigError, load_stage_config
    from launch.supervisor import LaunchOptions, RestartPolicy, RouterReadiness, Supervisor, SupervisorOptions, plan_deployment

    configure_logging("supervisor")
    model_name = _launch_model_name(args)
    try:
        config = load_stage_config(args.stage_config)
        policy = RestartPolicy(args.max_restarts, args.restart_window, args.backoff_initial, args.backoff_max)
        options = LaunchOptions(
            model=args.model,
            stage_config=args.stage_config,
            model_name=model_name,
            host=args.host,
            port=args.port,
            bus_port=args.bus_port,
            bus_host=args.bus_host,
            num_ar=args.num_ar,
            num_dit=args.num_dit,
            ar_devices=_split(args.ar_devices),
            dit_devices=_split(args.dit_devices),
            worker_metrics_port=args.metrics_port,
            shutdown_grace_s=args.shutdown_grace,
            curve_keys=args.curve_keys,
            lora_dir=args.lora_dir,
            **_launch_api_keys(args),
        )
        deployment = plan_deployment(options)
    except (StageConfigError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    if args.dry_run:
        _print_plan(deployment)
        return 0
    temporary_logs = not args.log_dir
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="glm-image-serve-logs-"))
    supervisor_options = SupervisorOptions(
        policy=policy,
        log_dir=log_dir,
        ready_timeout_s=args.ready_timeout,
        router_stop_grace_s=args.shutdown_grace + defaults.STOP_MARGIN_S,
        worker_stop_grace_s=args.shutdown_grace + defaults.STOP_MARGIN_S,
        metrics_host=args.host,
        metrics_port=args.supervisor_metrics_port,
    )
    banner = _ready_banner(args, options, deployment, config, log_dir, temporary_logs)
    left_down: list[str] = []

    async def supervise() -> int:
        readiness = RouterReadiness(deployment.url, deployment.expected_workers)
        supervisor = Supervisor(
            deployment.processes, readiness, supervisor_options,
            describe_not_ready=readiness.describe, on_ready=lambda: print(banner, flush=True))
        print(f"starting a router, {options.num_ar} AR and {options.num_dit} DiT worker(s); waiting until {deployment.url}/ready "
              f"shows them all; logs in {log_dir}", file=sys.stderr, flush=True)
        try:
            return await supervisor.run()
        finally:
            left_down.extend(supervisor.left_down)
            await readiness.aclose()

    status = 1
    try:
        status = asyncio.run(supervise())
    finally:
        if temporary_logs:
            _settle_temporary_logs(log_dir, clean=status == 0 and not left_down)
    return status


def _launch_model_name(args) -> str:
    """The served model name: a folder served with random weights says so (`...-random-init`), whatever
    --model-name asked. Also refuses a folder without weights unless random init is asked for."""
    import logging

    from model_presets.random_init import random_init_requested, served_model_name, weights_problem

    if (Path(args.model) / "model_index.json").exists():
        problem = weights_problem(args.model)
        if problem is not None:
            sys.exit(f"error: {problem}")
    if not random_init_requested(args.model):
        return args.model_name
    name = served_model_name(args.model_name, defaults.MODEL_NAME, args.model)
    logging.getLogger("supervisor").warning(
        "RANDOM WEIGHTS: every worker initialises random weights from the configs in %s (timing only: the images "
        "are noise); served as model %r", args.model, name)
    return name


def _settle_temporary_logs(log_dir: Path, clean: bool) -> None:
    """The default log folder, made for this launch: removed after a clean end, so launches do not
    pile folders up in /tmp; kept for the post-mortem after a failure or a crash loop, and said where.
    (An explicit --log-dir is the user's and is never removed.)"""
    import shutil

    if clean:
        shutil.rmtree(log_dir, ignore_errors=True)
        return
    print(f"logs kept in {log_dir} (a temporary folder: remove it when done; --log-dir DIR chooses the folder)",
          file=sys.stderr, flush=True)


def _print_plan(deployment) -> None:
    """`launch --dry-run`: each process's command line as the supervisor would start it, one per line."""
    import shlex

    for spec in deployment.processes:
        # Names only: these variables carry secrets (API keys), which is why they are not arguments.
        env = "".join(f"{name}=... " for name, _ in spec.env)
        print(f"{spec.name}: {env}{shlex.join(spec.argv)}")


def _launch_api_keys(args) -> dict:
    """The router's key options for LaunchOptions: keys travel in its environment, the file as a path."""
    config = _api_key_config(args)
    if config is None:
        return {}
    key_file = str(config.key_file) if config.key_file is not None else None
    return {"api_keys": config.keys, "api_key_file": key_file, "protect_metrics": config.protect_metrics}


def _split(devices: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in devices.split(",") if d.strip())


def _ready_banner(args, options, deployment, config, log_dir: Path, temporary_logs: bool = False) -> str:
    """What the launcher prints once everything is ready: how to use, watch, extend and stop it."""
    import socket
    from urllib.parse import urlsplit

    url = deployment.url
    bus_host = urlsplit(deployment.bus_bind).hostname
    if bus_host == "*":
        join_address, reach = f"tcp://{socket.gethostname()}:{options.bus_port}", ""
    else:
        join_address = deployment.bus_connect
        local_only = bus_host in ("127.0.0.1", "localhost", "::1")
        reach = "\n  (the bus listens on this machine only: relaunch with --host 0.0.0.0 or --bus-host ADDR to accept others)" if local_only else ""
    joins = []
    for stage, devices, count in (("ar", options.ar_devices, options.num_ar), ("dit", options.dit_devices, options.num_dit)):
        stage_config = config.ar if stage == "ar" else config.dit
        device = _resolve_device(devices[0] if devices else None, stage_config.devices, getattr(stage_config, "engine", "transformers"))
        curve = ""
        if options.curve_keys is not None:
            from launch.supervisor import curve_key_file

            keys = Path(options.curve_keys).absolute()
            try:  # the stage's shared key when keygen made one; else that worker's own, to be made
                secret = curve_key_file(options.curve_keys, stage)
            except ValueError:
                secret = keys / "workers" / f"{stage}-{count}.key_secret"
                key_hint = (f"\n  (make {secret.name} with `glm-image-serve keygen --out DIR --worker {stage}-{count}` "
                            f"and copy its .key into {keys / 'allowed_workers'}/)")
                reach = reach if key_hint in reach else reach + key_hint
            curve = f" \\\n      --curve-router-key {keys / 'router.key'} --curve-secret-key {secret}"
        from model_presets.random_init import RANDOM_INIT_ENV

        random = " --random-init" if os.environ.get(RANDOM_INIT_ENV) == "1" else ""
        joins.append(f"  glm-image-serve {stage}-worker --router {join_address} --stage-config {Path(options.stage_config).resolve()} \\\n"
                     f"      --model {Path(options.model).resolve()} --device {device} --worker-id {stage}-{count}{random}{curve}")
    metrics = f"{url}/metrics"
    if options.worker_metrics_port is not None:
        last = options.worker_metrics_port + options.num_ar + options.num_dit - 1
        metrics += f", workers on ports {options.worker_metrics_port}-{last}"
    if args.supervisor_metrics_port is not None:
        metrics += f", supervisor on http://{urlsplit(url).netloc.rsplit(':', 1)[0]}:{args.supervisor_metrics_port}/metrics"
    curl_body = '{"prompt": "a lighthouse at dawn, \\"HELLO\\" painted on it", "size": "512x512", "seed": 1}'
    return "\n".join([
        f"GLM-Image is serving at {url}  (model: {options.model_name}, from {options.model})",
        "Try:",
        f"  curl -s {url}/v1/images/generations -H 'Content-Type: application/json' \\",
        *(["    -H \"Authorization: Bearer $GLM_API_KEY\" \\"] if options.api_keys or options.api_key_file else []),
        f"    -d '{curl_body}' \\",
        "    | jq -r '.data[0].b64_json' | base64 -d > out.png",
        f"Metrics: {metrics}",
        f"Logs: {log_dir} (one file per process; every line is also shown here, prefixed with its process name"
        + ("; a temporary folder, removed when the launch ends cleanly)" if temporary_logs else ")"),
        "A worker on another machine joins with (the same stage config, or the router refuses it):",
        *joins,
    ]) + reach + "\nStop: Ctrl-C (requests in flight finish, workers drain); a process that dies is restarted"


if __name__ == "__main__":
    main()
