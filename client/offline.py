"""Offline GLM-Image: generate images from Python without a server (`GlmImage`).

    from client.offline import GlmImage

    with GlmImage(model="/models/GLM-Image", stage_config="stage_configs/glm_image.yaml") as glm:
        [image] = glm.generate('a lighthouse at dawn, "HELLO" painted on it', size="1024x1024", seed=1)
        image.save("lighthouse.png")            # the encoded bytes, exactly as the HTTP API returns them
        print(image.seed, image.timings)        # image.image is a PIL.Image
        for done in glm.generate_many({"prompt": p, "seed": i} for i, p in enumerate(prompts)):
            ...                                 # in completion order, the AR batch kept full

What runs: the router's own core (the bus, the Scheduler, the Orchestrator: `router.server.build_core`)
and its HTTP edge (`router.edge.app.create_app`) on an event loop in a background thread this object
owns, and the AR and DiT workers as processes started and supervised exactly as `glm-image-serve
launch` starts them (`launch.supervisor`: the same command lines, restarted if they crash). The
bus listens on a loopback port the kernel picks; no HTTP port is opened unless `http_port` is given.
Every request goes through the edge application in-process (an ASGI call, no socket), so it is
validated by the same code, fails with the same messages and gives the same bytes as the HTTP API
for the same request and seed.

Stopping: `close()` (the end of the `with` block, also on an exception or Ctrl-C, and at interpreter
exit) cancels what is in flight, stops the workers (SIGTERM, then SIGKILL after the grace period)
and closes the bus. If this process dies without that (SIGKILL), the kernel SIGTERMs the workers
(they ask for it at start: `launch.cli.die_with_supervisor`), so nothing is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import io
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

from common import defaults

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STAGE_CONFIG = ROOT / "stage_configs" / "glm_image.yaml"
# The name in-process requests are addressed to (never resolved: the transport calls the app directly).
OFFLINE_URL = "http://glm-image.offline"
TINY_MODEL_NAME = "glm-image-tiny-random"  # what the launcher calls the embedded tiny model
# Seconds a worker gets to drain after SIGTERM when the engine stops: nothing is in flight by then.
DRAIN_GRACE_S = 10.0


class GlmImageError(Exception):
    """A request the engine answered with an error: the HTTP status, OpenAI's error type and the
    message the HTTP API gives for the same request."""

    def __init__(self, status_code: int, message: str, error_type: str = "server_error"):
        super().__init__(f"{message} (HTTP {status_code}, {error_type})")
        self.status_code = status_code
        self.message = message
        self.error_type = error_type

    @classmethod
    def from_response(cls, response: httpx.Response) -> "GlmImageError":
        try:
            error = response.json()["error"]
            message, error_type = str(error["message"]), str(error.get("type") or "server_error")
        except (ValueError, KeyError, TypeError):
            message, error_type = response.text.strip()[:500] or response.reason_phrase, "server_error"
        kind = InvalidRequestError if 400 <= response.status_code < 500 else GlmImageError
        return kind(response.status_code, message, error_type)


class InvalidRequestError(GlmImageError, ValueError):
    """The request was refused (4xx): a bad size, a limit, an unreadable condition image, ..."""


class EngineStartError(RuntimeError):
    """The workers did not start or register; the message has the reason and the log tail."""


@dataclass(frozen=True)
class ImageResult:
    """One generated image: the encoded bytes (identical to the HTTP API's), decoded on demand."""

    data: bytes  # PNG, JPEG or WebP bytes, as the DiT worker encoded them
    seed: int
    size: str  # WIDTHxHEIGHT
    output_format: str  # png, jpeg or webp
    timings: dict[str, float]  # seconds: ar_s, dit_s, total_s

    @property
    def image(self):
        """The image as a PIL.Image (decoded from `data` on each access)."""
        from PIL import Image

        return Image.open(io.BytesIO(self.data))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the encoded bytes to `path` (pick an extension matching `output_format`)."""
        target = Path(path)
        target.write_bytes(self.data)
        return target


@dataclass(frozen=True)
class Completed:
    """One request of `GlmImage.generate_many`, finished: its images, or the error it failed with."""

    index: int  # its position in the input
    request: Mapping[str, Any]
    images: list[ImageResult] | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ---------------------------------------------------------------------------
# Requests: generate()'s arguments as the HTTP API's bodies.


def image_call(prompt: str, *, size: str | None = None, seed: int | None = None, steps: int | None = None,
               guidance_scale: float | None = None, images: Iterable[Any] | None = None, n: int = 1,
               negative_prompt: str | None = None, output_format: str | None = None,
               **extra: Any) -> tuple[str, dict[str, Any]]:
    """The (path, httpx arguments) of the images API call for these arguments: JSON to
    /v1/images/generations, or multipart to /v1/images/edits when there are condition `images`
    (paths, bytes or PIL images). `extra` are further body fields (quality, output_compression, ...)."""
    body: dict[str, Any] = {"prompt": prompt, "n": n}
    optional = {"size": size, "seed": seed, "num_inference_steps": steps, "guidance_scale": guidance_scale,
                "negative_prompt": negative_prompt, "output_format": output_format}
    body.update({k: v for k, v in {**optional, **extra}.items() if v is not None})
    uploads = [_upload(image, i) for i, image in enumerate(images or [])]
    if not uploads:
        return "/v1/images/generations", {"json": body}
    return "/v1/images/edits", {"data": form_fields(body), "files": [("image[]", u) for u in uploads]}


def form_fields(body: Mapping[str, Any]) -> dict[str, str]:
    """A JSON body's fields as multipart form values (what `glm-image-serve generate` sends)."""
    out = {}
    for key, value in body.items():
        if value is None:
            continue
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def _upload(image: Any, index: int) -> tuple[str, bytes, str]:
    """(file name, bytes, media type) of a condition image given as a path, bytes or a PIL image."""
    import mimetypes

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image-{index}", bytes(image), "application/octet-stream"
    if hasattr(image, "save"):  # a PIL image: sent losslessly
        out = io.BytesIO()
        image.save(out, format="PNG")
        return f"image-{index}.png", out.getvalue(), "image/png"
    raise TypeError(f"images[{index}] is a {type(image).__name__}: give a path, bytes or a PIL image")


def images_from_response(response: httpx.Response) -> list[ImageResult]:
    """The images of a 200 images response; GlmImageError for any other answer."""
    if response.status_code != 200:
        raise GlmImageError.from_response(response)
    import base64

    body = response.json()
    return [ImageResult(base64.b64decode(item["b64_json"]), item["seed"], body["size"], body["output_format"],
                        body["timings"][i]) for i, item in enumerate(body["data"])]


def retry_after_s(response: httpx.Response, default: float = 1.0) -> float:
    """The Retry-After of a 429, in seconds."""
    try:
        return max(0.05, float(response.headers.get("retry-after", default)))
    except ValueError:
        return default


# ---------------------------------------------------------------------------
# The in-process HTTP exchange: an ASGI call of the edge app on the engine's loop.


class _Sink:
    """Where an exchange's response goes (called on the engine loop)."""

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    def body(self, chunk: bytes) -> None: ...


class _Collected(_Sink):
    def __init__(self) -> None:
        self.status, self.headers, self.chunks = 500, [], []

    def start(self, status, headers):
        self.status, self.headers = status, headers

    def body(self, chunk):
        self.chunks.append(chunk)


class _Streamed(_Sink, httpx.SyncByteStream):
    """A response handed to another thread as it is produced (for progress events)."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()
        self.future = None

    def start(self, status, headers):
        self.items.put(("start", status, headers))

    def body(self, chunk):
        if chunk:
            self.items.put(("body", chunk))

    def finished(self, error: BaseException | None) -> None:
        self.items.put(("end", error))

    def next_item(self) -> tuple:
        try:
            return self.items.get()
        except BaseException:  # Ctrl-C while waiting: the request is cancelled like a closed connection
            self.close()
            raise

    def __iter__(self) -> Iterator[bytes]:
        while True:
            item = self.next_item()
            if item[0] == "body":
                yield item[1]
            elif item[0] == "end":
                if item[1] is not None:
                    raise httpx.ReadError(f"the offline engine stopped answering: {item[1]}")
                return

    def close(self) -> None:
        if self.future is not None:
            self.future.cancel()  # a client that stops reading cancels the work, as a closed connection does


class InProcessTransport(httpx.BaseTransport):
    """An httpx transport that answers from a GlmImage's edge app in-process (streams included):
    `httpx.Client(transport=glm.transport())`."""

    def __init__(self, engine: "GlmImage"):
        self.engine = engine

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        stream = _Streamed()
        stream.future = self.engine._submit(self.engine._exchange(request, body, stream))
        # Whichever way the work ends (even cancelled before it began), the reader is told.
        stream.future.add_done_callback(lambda future: stream.finished(
            None if not future.cancelled() and future.exception() is None else
            (future.exception() if not future.cancelled() else asyncio.CancelledError())))
        item = stream.next_item()
        if item[0] != "start":
            raise httpx.ConnectError(f"the offline engine did not answer: {item[1] or 'no response'}", request=request)
        return httpx.Response(item[1], headers=item[2], stream=stream, request=request)


class AsyncInProcessTransport(httpx.AsyncBaseTransport):
    """The async transport (responses are buffered), usable from any event loop, the engine's included."""

    def __init__(self, engine: "GlmImage"):
        self.engine = engine

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        sink = _Collected()
        # Cancelling the caller cancels the concurrent future, which cancels the work on the engine loop.
        await asyncio.wrap_future(self.engine._submit(self.engine._exchange(request, body, sink)))
        return httpx.Response(sink.status, headers=sink.headers, content=b"".join(sink.chunks), request=request)


# ---------------------------------------------------------------------------
# The engine


class GlmImage:
    """GLM-Image without a server: the router core in this process, AR and DiT workers as child processes.

    Args:
        model: GLM-Image folder in the diffusers layout (model_index.json, ...), given to every worker.
        stage_config: stage config YAML (default: stage_configs/glm_image.yaml, one GPU per stage);
            stage_configs/glm_image_single_gpu.yaml puts both stages on GPU 0,
            stage_configs/glm_image_tiny_cpu.yaml runs the tiny model on CPU.
        num_ar, num_dit: worker processes per stage.
        ar_devices, dit_devices: devices ("cuda:0", "cpu", ...); AR worker i takes item i mod len
            (default: the stage config's `devices`).
        model_name: the name requests may give as `model` (default: zai-org/GLM-Image, or
            glm-image-tiny-random for the tiny model, as the launcher names them).
        log_dir: one log file per worker (default: a temporary folder, removed after a clean close).
        verbose: also copy every worker log line to stderr, prefixed with the worker's name.
        ready_timeout: seconds for every worker to load and register.
        http_port: also serve the OpenAI-compatible HTTP API on http_host:http_port (default: no port).
        env: extra environment variables for the worker processes.

    The workers start in the constructor (a `with` block or `close()` stops them). Methods may be
    called from any thread. A failing request raises GlmImageError (InvalidRequestError, also a
    ValueError, for a refused one) with the HTTP API's message.
    """

    def __init__(self, model: str | os.PathLike, stage_config: str | os.PathLike | None = None, *,
                 num_ar: int = defaults.NUM_AR, num_dit: int = defaults.NUM_DIT,
                 ar_devices: Iterable[str] = (), dit_devices: Iterable[str] = (), model_name: str | None = None,
                 log_dir: str | os.PathLike | None = None, verbose: bool = False,
                 ready_timeout: float = defaults.READY_TIMEOUT_S, http_port: int | None = None,
                 http_host: str = defaults.LOCAL_HOST, env: Mapping[str, str] | None = None):
        from common.stage_config import load_stage_config

        self.model = Path(model).expanduser().absolute()
        if not (self.model / "model_index.json").exists():
            raise ValueError(f"{model} is not a GLM-Image folder (no model_index.json); download the weights to a local folder")
        self.stage_config_path = Path(stage_config or DEFAULT_STAGE_CONFIG).expanduser().absolute()
        self.config = load_stage_config(self.stage_config_path)  # StageConfigError (a ValueError) names the problem
        if num_ar < 1 or num_dit < 1:
            raise ValueError("at least one AR and one DiT worker are needed")
        self.num_ar, self.num_dit = num_ar, num_dit
        self.ar_devices, self.dit_devices = tuple(ar_devices), tuple(dit_devices)
        from model_presets.random_init import random_init_requested, served_model_name, weights_problem
        from model_presets.tiny_model import read_stamp

        problem = weights_problem(self.model)  # the launcher's check: weights, or random init asked for
        if problem is not None:
            raise ValueError(problem)
        if model_name is None:
            tiny = (read_stamp(self.model) or {}).get("preset") == "tiny"  # make-tiny-model's folder
            model_name = TINY_MODEL_NAME if tiny and not random_init_requested(self.model) else defaults.MODEL_NAME
        # As the launcher names it: a folder served with random weights says so (...-random-init).
        self.model_name = served_model_name(model_name, defaults.MODEL_NAME, self.model)
        self._own_log_dir = log_dir is None
        self.log_dir = Path(tempfile.mkdtemp(prefix="glm-image-offline-")) if log_dir is None else Path(log_dir)
        self.verbose, self.ready_timeout = verbose, ready_timeout
        self.http_host, self.http_port = http_host, http_port
        self.env = dict(env or {})
        self.max_in_flight = 1  # images generate_many keeps in flight; set from the workers' slots at start
        self.started_in_s: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._clean = True
        self._supervisor = None
        self._supervisor_task: asyncio.Task | None = None
        self._bus = None
        self._orchestrator = None
        self._http_server = None
        self._http_task: asyncio.Task | None = None
        self._echo = None
        self._client: httpx.Client | None = None
        self._start()

    # -- life cycle -------------------------------------------------------------

    def _start(self) -> None:
        started = time.monotonic()
        self._loop = asyncio.new_event_loop()
        # The workers are spawned from this thread: the kernel signals them when it ends (PR_SET_PDEATHSIG
        # follows the spawning thread), and it lives exactly as long as this engine.
        self._thread = threading.Thread(target=self._loop.run_forever, name="glm-image-offline", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        try:
            self._submit(self._start_core()).result()
        except BaseException:
            self._clean = False
            self.close()
            raise
        self._client = httpx.Client(transport=InProcessTransport(self), base_url=OFFLINE_URL, timeout=None)
        self.started_in_s = time.monotonic() - started

    async def _start_core(self) -> None:
        import zmq
        from prometheus_client import CollectorRegistry

        from launch.supervisor import LaunchOptions, Supervisor, SupervisorOptions, plan_deployment
        from router.edge.app import create_app
        from router.server import build_core

        registry = CollectorRegistry()
        # Port 0 ("*"): the kernel picks a free loopback port when the socket binds, so there is no race.
        bus, orchestrator = build_core(self.config, self.model_name, f"tcp://{defaults.LOCAL_HOST}:*", registry)
        self._bus, self._orchestrator = bus, orchestrator
        await bus.start()
        bus_port = int(bus.socket.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self._app = create_app(orchestrator, registry)
        # The launcher's own plan (the same worker command lines), less its router: the core is here.
        deployment = plan_deployment(LaunchOptions(
            model=str(self.model), stage_config=str(self.stage_config_path), model_name=self.model_name,
            host=defaults.LOCAL_HOST, bus_port=bus_port, num_ar=self.num_ar, num_dit=self.num_dit,
            ar_devices=self.ar_devices, dit_devices=self.dit_devices, shutdown_grace_s=DRAIN_GRACE_S))
        extra_env = tuple(self.env.items())
        workers = tuple(dataclasses.replace(p, env=p.env + extra_env) for p in deployment.processes if p.role != "router")
        expected = dict(deployment.expected_workers)
        ready = asyncio.Event()

        async def all_registered() -> bool:
            live = orchestrator.live_workers()
            return all(live.get(stage, 0) >= n for stage, n in expected.items())

        def describe() -> str:
            return f"wanted {expected} live workers, registered: {orchestrator.live_workers()}"

        self._echo = None if self.verbose else open(os.devnull, "w")
        self._supervisor = Supervisor(
            workers, all_registered,
            SupervisorOptions(log_dir=self.log_dir, ready_timeout_s=self.ready_timeout,
                              worker_stop_grace_s=DRAIN_GRACE_S + defaults.STOP_MARGIN_S),
            describe_not_ready=describe, on_ready=ready.set, echo=self._echo, handle_signals=False)
        self._supervisor_task = asyncio.create_task(self._supervisor.run(), name="glm-image-supervisor")
        ready_wait = asyncio.create_task(ready.wait())
        try:
            await asyncio.wait({ready_wait, self._supervisor_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready_wait.cancel()
        if not ready.is_set():
            failure = getattr(self._supervisor, "_failure", None) or "the supervisor stopped"
            raise EngineStartError(f"the GLM-Image workers did not start: {failure}\n(logs in {self.log_dir})")
        scheduler = orchestrator.scheduler
        from common.protocol import Stage

        ar, dit = scheduler.pool.capacity(Stage.AR), scheduler.pool.capacity(Stage.DIT)
        # Every slot busy and one more AR batch waiting in line, within the admission bound.
        self.max_in_flight = max(1, min(2 * ar + dit, ar + self.config.router.queue_limit_per_stage))
        if self.http_port is not None:
            await self._serve_http()

    async def _serve_http(self) -> None:
        import uvicorn

        from router.server import _Server

        self._http_server = _Server(uvicorn.Config(self._app, host=self.http_host, port=self.http_port, loop="none",
                                                   log_level="warning", access_log=False))
        self._http_task = asyncio.create_task(self._http_server.serve(), name="glm-image-http")
        while not self._http_server.started:
            if self._http_task.done():
                self._http_task.result()
                raise EngineStartError(f"could not serve HTTP on {self.http_host}:{self.http_port}")
            await asyncio.sleep(0.02)

    def close(self) -> None:
        """Cancel what is in flight, stop the workers and the core. Idempotent; also run at interpreter exit."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._client is not None:
            self._client.close()
        loop = self._loop
        if loop is None:
            return
        if self._thread is not None and self._thread.is_alive():
            stopping = asyncio.run_coroutine_threadsafe(self._stop_core(), loop)
            try:
                stopping.result()
            except KeyboardInterrupt:  # a second Ctrl-C: no grace, kill every worker now
                if self._supervisor is not None:
                    loop.call_soon_threadsafe(self._supervisor.request_stop, "interrupted again")
                stopping.result()
                raise
            finally:
                loop.call_soon_threadsafe(loop.stop)
                self._thread.join()
        loop.close()
        if self._echo is not None:
            self._echo.close()
        if self._own_log_dir and self._clean:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    async def _stop_core(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._orchestrator is not None:
            # Requests the edge runs in tasks of its own (streams) too: their jobs are cancelled on the
            # workers now, rather than drained by the workers' shutdown below.
            await self._orchestrator.cancel_all()
        if self._http_server is not None and self._http_task is not None:
            self._http_server.should_exit = True
            await asyncio.gather(self._http_task, return_exceptions=True)
        if self._supervisor is not None:
            if self._supervisor_task is not None and not self._supervisor_task.done():
                self._supervisor.request_stop("closing the offline engine")
            if self._supervisor_task is not None:
                status = (await asyncio.gather(self._supervisor_task, return_exceptions=True))[0]
                if status != 0 or self._supervisor.left_down:
                    self._clean = False
        if self._bus is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._bus.close()

    def __enter__(self) -> "GlmImage":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- running coroutines on the engine loop ----------------------------------

    def _submit(self, coro):
        """Run `coro` on the engine loop; a concurrent future (cancelling it cancels the work)."""
        if self._closed:
            coro.close()
            raise RuntimeError("this GlmImage is closed")
        return asyncio.run_coroutine_threadsafe(self._tracked(coro), self._loop)

    async def _tracked(self, coro):
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            return await coro
        finally:
            self._tasks.discard(task)

    async def _exchange(self, request: httpx.Request, body: bytes, sink: _Sink) -> None:
        """One HTTP request through the edge app, as an ASGI call: no socket, same validation and bytes."""
        path, _, query = request.url.raw_path.partition(b"?")
        headers = [(k.lower(), v) for k, v in request.headers.raw]
        if body and not any(k == b"content-length" for k, _ in headers):
            headers.append((b"content-length", str(len(body)).encode()))
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request.method, "scheme": "http", "path": path.decode("latin-1"), "raw_path": path,
            "query_string": query, "root_path": "", "headers": headers, "client": ("127.0.0.1", 0),
            "server": ("glm-image.offline", 80), "state": {},
        }
        complete = asyncio.Event()
        body_sent = False

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await complete.wait()  # the client stays until the response is complete
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                sink.start(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                sink.body(message.get("body", b""))
                if not message.get("more_body", False):
                    complete.set()

        try:
            await self._app(scope, receive, send)
        finally:
            complete.set()

    # -- the API ------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        """The HTTP API's base URL when `http_port` was given, else None."""
        return None if self.http_port is None else f"http://{self.http_host}:{self.http_port}"

    def transport(self) -> httpx.BaseTransport:
        """An httpx transport to this engine's HTTP API without a port: `httpx.Client(transport=glm.transport(),
        base_url="http://glm-image.offline")` then works like a client of a running router."""
        return InProcessTransport(self)

    def async_transport(self) -> httpx.AsyncBaseTransport:
        """The same for httpx.AsyncClient (responses buffered), from any event loop."""
        return AsyncInProcessTransport(self)

    def live_workers(self) -> dict[str, int]:
        """Registered workers per stage, {"ar": n, "dit": m}."""
        async def counts() -> dict[str, int]:
            return self._orchestrator.live_workers()

        return self._submit(counts()).result()

    def worker_pids(self) -> list[int]:
        """Process ids of the running worker processes."""
        return [p.pid for p in (self._supervisor.processes if self._supervisor else []) if p.running and p.pid]

    def generate(self, prompt: str, *, size: str | None = None, seed: int | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, images: Iterable[Any] | None = None, n: int = 1,
                 negative_prompt: str | None = None, output_format: str | None = None,
                 **extra: Any) -> list[ImageResult]:
        """Generate `n` images (seeds seed, seed+1, ...) and return them when all are done.

        size: "WIDTHxHEIGHT" (multiples of 32) or "auto"; default: the stage config's, or with `images` the
        first image's size made valid. seed: default the stage config's, else a random one (returned).
        steps: DiT denoising steps (num_inference_steps). guidance_scale: the DiT's CFG scale.
        images: condition images for image-to-image (paths, bytes or PIL images).
        output_format: png (default), jpeg or webp. `extra`: other fields of the images API
        (quality, output_compression, ...). Validated exactly as the HTTP API validates them."""
        path, kwargs = image_call(prompt, size=size, seed=seed, steps=steps, guidance_scale=guidance_scale,
                                  images=images, n=n, negative_prompt=negative_prompt, output_format=output_format,
                                  **extra)
        return images_from_response(self._client.post(path, **kwargs))

    def generate_many(self, requests: Iterable[Mapping[str, Any]], *,
                      max_in_flight: int | None = None) -> Iterator[Completed]:
        """Run many requests at once and yield each as it finishes (a `Completed`, in completion order).

        Each request is a dict of `generate`'s arguments ({"prompt": ..., "seed": ..., "images": [...]}).
        The input is read lazily; `max_in_flight` images (default: every worker slot busy plus one more
        AR batch waiting, so the AR batch stays full) run at once. A request the engine is too busy for
        (429) waits for its Retry-After and is sent again; a failing one is yielded with its `error`.
        Leaving the loop early cancels what is still in flight."""
        limit = max_in_flight or self.max_in_flight
        finished: queue.Queue = queue.Queue()
        in_flight: dict[Any, tuple[int, Mapping[str, Any], int]] = {}
        load = 0
        source = enumerate(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and (load < limit or not in_flight):
                    try:
                        index, request = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    try:
                        path, kwargs = image_call(**request)
                    except (TypeError, OSError) as exc:
                        yield Completed(index, request, error=exc)
                        continue
                    n = request.get("n", 1)
                    cost = n if isinstance(n, int) and n > 0 else 1
                    future = self._submit(self._post_retrying(path, kwargs))
                    in_flight[future] = (index, request, cost)
                    load += cost
                    future.add_done_callback(finished.put)
                if not in_flight:
                    return
                future = finished.get()
                index, request, cost = in_flight.pop(future)
                load -= cost
                try:
                    yield Completed(index, request, images=images_from_response(future.result()))
                except (GlmImageError, httpx.HTTPError) as exc:
                    yield Completed(index, request, error=exc)
        finally:
            for future in in_flight:
                future.cancel()

    async def _post_retrying(self, path: str, kwargs: dict) -> httpx.Response:
        async with httpx.AsyncClient(transport=AsyncInProcessTransport(self), base_url=OFFLINE_URL,
                                     timeout=None) as client:
            return await post_until_admitted(client, path, **kwargs)


async def post_until_admitted(client: httpx.AsyncClient, path: str, **kwargs: Any) -> httpx.Response:
    """POST, and while the answer is 429 (the line is full), wait its Retry-After and POST again."""
    while True:
        response = await client.post(path, **kwargs)
        if response.status_code != 429:
            return response
        await asyncio.sleep(retry_after_s(response))


# ---------------------------------------------------------------------------
# Command-line pieces shared by `generate --model` and `run-batch --model`.


def add_offline_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that start an offline engine (`--model` selects offline mode)."""
    g = p.add_argument_group("offline (no router: workers started by this command, stopped when it ends)")
    g.add_argument("--model", "--model-path", dest="model", metavar="PATH",
                   help="GLM-Image folder (diffusers layout): run offline, starting AR and DiT workers here instead "
                        "of calling a router")
    g.add_argument("--stage-config", "--config-path", dest="stage_config", metavar="FILE", default=str(DEFAULT_STAGE_CONFIG),
                   help="with --model: stage config YAML (default: %(default)s)")
    g.add_argument("--num-ar", type=int, default=defaults.NUM_AR, help="with --model: AR workers (default: %(default)s)")
    g.add_argument("--num-dit", type=int, default=defaults.NUM_DIT, help="with --model: DiT workers (default: %(default)s)")
    g.add_argument("--ar-devices", default="", metavar="LIST",
                   help="with --model: comma list of devices, AR worker i takes item i mod len (default: the stage config's)")
    g.add_argument("--dit-devices", default="", metavar="LIST", help="with --model: the same for DiT workers")
    g.add_argument("--log-dir", metavar="DIR",
                   help="with --model: one log file per worker, kept (default: a temporary folder, removed after a clean run)")
    g.add_argument("--worker-logs", action="store_true", help="with --model: also copy the workers' log lines to stderr")


def _split(devices: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in devices.split(",") if d.strip())


def engine_from_args(args: argparse.Namespace, say: Callable[[str], None] | None = None) -> GlmImage:
    """Start a GlmImage from `add_offline_arguments`' flags, telling `say` what it does."""
    if say is not None:
        where = f"logs in {args.log_dir}" if args.log_dir else "logs in a temporary folder; --log-dir DIR keeps them"
        say(f"starting {args.num_ar} AR and {args.num_dit} DiT worker(s) for {args.model} ({where})")
    engine = GlmImage(args.model, args.stage_config, num_ar=args.num_ar, num_dit=args.num_dit,
                      ar_devices=_split(args.ar_devices), dit_devices=_split(args.dit_devices), log_dir=args.log_dir,
                      verbose=args.worker_logs)
    if say is not None:
        say(f"workers ready in {engine.started_in_s:.1f}s")
    return engine
