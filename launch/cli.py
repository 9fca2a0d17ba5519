"""`glm-image-serve`: one command line for every process of the system.

    glm-image-serve router      --stage-config stage_configs/glm_image.yaml --port 8000
    glm-image-serve ar-worker   --router tcp://ROUTER_HOST:5570 --model /path/to/GLM-Image
    glm-image-serve dit-worker  --router tcp://ROUTER_HOST:5570 --model /path/to/GLM-Image
    glm-image-serve make-tiny-model --out models/tiny-glm-image
    glm-image-serve generate --url http://127.0.0.1:8000 --prompt "a cat" --size 512x512 --out cat.png
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path

DEFAULT_STAGE_CONFIG = Path(__file__).resolve().parent.parent / "stage_configs" / "glm_image.yaml"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stage-config",
        default=str(DEFAULT_STAGE_CONFIG),
        help="stage config YAML (stages, devices, engine args, sampling defaults, limits, bus timing); default: %(default)s",
    )


def _add_worker(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument(
        "--router",
        action="append",
        required=True,
        metavar="ADDR",
        help="ZeroMQ address of a router's bus, e.g. tcp://10.0.0.5:5570; repeat to serve several router replicas",
    )
    p.add_argument("--model", help="GLM-Image folder in the diffusers layout (default: the stage config's `model`)")
    p.add_argument(
        "--device",
        help="torch device for this worker, e.g. cuda:1 or cpu (default: from the stage's `devices`; a GPU index N means cuda:N)",
    )
    p.add_argument("--worker-id", help="unique id on the bus (default: STAGE-HOST-PID)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics for this worker on this port")
    p.add_argument("--drain-grace", type=float, default=30.0, help="seconds SIGTERM waits for in-flight jobs (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-image-serve", description="Disaggregated GLM-Image serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("router", help="HTTP router (OpenAI-compatible API) that binds the worker bus")
    _add_common(r)
    r.add_argument("--host", default="0.0.0.0", help="HTTP listen address (default: %(default)s)")
    r.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    r.add_argument("--bus-bind", default="tcp://*:5570", help="ZeroMQ address workers connect to (default: %(default)s)")
    r.add_argument("--model-name", default="zai-org/GLM-Image", help="model name reported by /v1/models (default: %(default)s)")
    r.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds SIGTERM waits for in-flight HTTP requests")

    ar = sub.add_parser("ar-worker", help="AR stage worker (prompt + size -> prior token grid)")
    _add_worker(ar)
    dit = sub.add_parser("dit-worker", help="DiT stage worker (prior tokens -> image)")
    _add_worker(dit)

    tiny = sub.add_parser("make-tiny-model", help="build the tiny random-weight GLM-Image (no network)")
    tiny.add_argument("--out", required=True, help="output folder")
    tiny.add_argument("--overwrite", action="store_true", help="rebuild even if the folder exists")

    gen = sub.add_parser("generate", help="client: text-to-image through a running router, saved to a file")
    gen.add_argument("--url", default="http://127.0.0.1:8000", help="router URL (default: %(default)s)")
    gen.add_argument("--prompt", required=True, help="text prompt; quoted text in it is rendered as glyphs")
    gen.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT, multiples of 32 (default: %(default)s)")
    gen.add_argument("--seed", type=int, help="random seed (default: the stage config's)")
    gen.add_argument("--steps", type=int, help="num_inference_steps")
    gen.add_argument("--out", required=True, help="output image path")
    return parser


def _resolve_model(arg: str | None, config) -> str:
    model = arg or config.model
    if not model:
        sys.exit("error: no model given: pass --model /path/to/GLM-Image (or set `model` in the stage config)")
    if not (Path(model) / "model_index.json").exists():
        sys.exit(f"error: {model} is not a GLM-Image folder (no model_index.json); download the weights to a local folder")
    return model


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
        from launch.tiny_model import build_tiny_model

        print(build_tiny_model(args.out, overwrite=args.overwrite))
        return
    if args.command == "generate":
        _generate(args)
        return

    from common.logs import configure_logging
    from common.stage_config import StageConfigError, load_stage_config

    configure_logging(args.command)
    try:
        config = load_stage_config(args.stage_config)
    except StageConfigError as exc:
        sys.exit(f"error: {exc}")
    import uvloop

    if args.command == "router":
        from router.server import serve_router

        uvloop.run(serve_router(config, args.model_name, args.host, args.port, args.bus_bind, args.shutdown_grace))
        return
    model = _resolve_model(args.model, config)
    stage = config.ar if args.command == "ar-worker" else config.dit
    device = _resolve_device(args.device, stage.devices, getattr(stage, "engine", "transformers"))
    from common.worker_main import WorkerOptions

    options = WorkerOptions(
        model_path=model,
        config=config,
        routers=args.router,
        worker_id=args.worker_id,
        device=device,
        metrics_port=args.metrics_port,
        drain_grace_s=args.drain_grace,
    )
    if args.command == "ar-worker":
        from stage_ar.worker import serve_ar_worker

        uvloop.run(serve_ar_worker(options))
    else:
        from stage_dit.worker import serve_dit_worker

        uvloop.run(serve_dit_worker(options))


def _generate(args) -> None:
    import httpx

    body = {"prompt": args.prompt, "size": args.size, "response_format": "b64_json"}
    if args.seed is not None:
        body["seed"] = args.seed
    if args.steps is not None:
        body["num_inference_steps"] = args.steps
    response = httpx.post(f"{args.url}/v1/images/generations", json=body, timeout=None)
    if response.status_code != 200:
        sys.exit(f"error {response.status_code}: {response.text}")
    data = response.json()
    Path(args.out).write_bytes(base64.b64decode(data["data"][0]["b64_json"]))
    print(json.dumps({"out": os.path.abspath(args.out), "timings": data.get("timings")}))


if __name__ == "__main__":
    main()
