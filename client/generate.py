"""`glm-image-serve generate`: a command-line client of the router's streamed images API.

    glm-image-serve generate -p 'a lighthouse, "HELLO" painted on it' --size 512x512 -o lighthouse.png
    glm-image-serve generate -p "make it snow" -i photo.jpg -o snowy.jpg --n 2 --partial-images 2
    glm-image-serve generate --model /models/GLM-Image -p "a cat" -o cat.png   # offline: no router

It always asks for a stream with progress events, shows one progress bar per image (AR tokens,
then DiT steps, with ETA; plain lines when not on a terminal), saves the images and their
previews as they arrive, prints one JSON line with the paths, seeds and timings, and exits with
a status that says what failed (`EPILOG`). The flags of vLLM-Omni's `openai_chat_client.py`
(`-p -o -s -i --height --width --steps --guidance-scale --seed --negative`) work as they are.

With `--model PATH` and no `--url` it runs offline, like vLLM-Omni's end2end.py: it starts its own
AR and DiT workers (client/offline.py), sends the same request to the same HTTP API in-process, and
stops them when done; flags, progress, output naming and exit statuses stay the same.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from common import defaults

EXIT_OK = 0
EXIT_LOCAL = 1  # something on this machine: an output file that cannot be written
EXIT_USAGE = 2  # argparse's own status for bad flags; also bad local inputs
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
EXIT_SERVER_FAILED = 5

EPILOG = """\
--out: a file (its extension picks the format: .png, .jpg/.jpeg or .webp; with --n 2 or more,
NAME-1.EXT, NAME-2.EXT, ...) or a folder (an existing one, one ending in '/', or a name without
extension): files glm-image-SEED.EXT there, never overwriting. Previews (--partial-images) are
saved next to their image as STEM.partial-K.EXT.

Progress goes to stderr: a bar per image on a terminal, plain lines otherwise. The last line
on stdout is JSON: {"images": [{"path", "seed", "timings", "previews"}, ...], ...}.

exit status:
  0  every image was saved
  1  an output file could not be written
  2  usage error (bad flags, an --image that cannot be read, an unknown --out extension)
  3  the router could not be reached or stopped answering (connection refused, timeout, lost);
     offline (--model): the workers did not start
  4  the router refused the request (HTTP 4xx: a bad size, a limit, ...); its message is shown
  5  the router failed (HTTP 5xx, or an error event after the stream started)
"""

# File extension -> the API's output_format.
FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
CONNECT_TIMEOUT_S = 15.0


class ClientError(Exception):
    """A failure to report as one `error: ...` line and exit with `exit_code`."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


# ---------------------------------------------------------------------------
# Flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `generate` flags, vLLM-Omni's example client's names and short forms included."""
    p.add_argument("--url", "--server", "-s", dest="url", metavar="URL", default=os.environ.get("GLM_URL", defaults.ROUTER_URL),
                   action=ExplicitUrl,
                   help=f"router URL (default: $GLM_URL, else {defaults.ROUTER_URL}; not with --model, which runs offline)")
    p.add_argument("--prompt", "-p", required=True, metavar="TEXT", help="text prompt; quoted text in it is rendered as glyphs")
    p.add_argument("--out", "--output", "-o", dest="out", default=".", metavar="PATH",
                   help="output file (.png, .jpg, .webp) or folder (default: the current folder); see below")
    p.add_argument("--image", "-i", action="append", default=[], metavar="PATH",
                   help="condition image for image-to-image (uses /v1/images/edits); repeat for several")
    p.add_argument("--size", metavar="WxH", help="WIDTHxHEIGHT, multiples of 32 (default: the router's; with --image: "
                                  "the first image's size, made valid)")
    p.add_argument("--width", type=int, help="image width in pixels; give --height too (instead of --size)")
    p.add_argument("--height", type=int, help="image height in pixels; give --width too (instead of --size)")
    p.add_argument("--n", "-n", type=int, default=1, help="number of images; image i uses seed + i (default: %(default)s)")
    p.add_argument("--seed", type=int, help="seed of the first image (default: the stage config's)")
    p.add_argument("--steps", "--num-inference-steps", dest="steps", type=int, help="DiT denoising steps, num_inference_steps (default: the stage config's)")
    p.add_argument("--guidance-scale", type=float, metavar="SCALE", help="DiT classifier-free guidance scale (default: the stage config's)")
    p.add_argument("--negative", "--negative-prompt", dest="negative", metavar="TEXT",
                   help="negative_prompt: accepted for compatibility; GLM-Image has no negative conditioning")
    p.add_argument("--partial-images", type=int, default=0, metavar="N",
                   help="0..3 previews per image while it is denoised, saved next to it (default: %(default)s)")
    p.add_argument("--format", choices=["png", "jpeg", "jpg", "webp"],
                   help="image format (default: from the --out extension; png for a folder)")
    p.add_argument("--api-key", metavar="KEY", help="sent as 'Authorization: Bearer KEY' (default: $GLM_API_KEY, else $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=1800, metavar="SECONDS",
                   help=f"seconds the router may stay silent before giving up (default: %(default)s; "
                        f"connecting waits at most {CONNECT_TIMEOUT_S:g})")
    from client.offline import add_offline_arguments

    add_offline_arguments(p)


class ExplicitUrl(argparse.Action):
    """Stores --url and remembers that it was given (an offline --model run must not also have one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.url_given = True


def offline_mode(args: argparse.Namespace) -> bool:
    """True for `--model` without `--url`; a usage error for both."""
    if getattr(args, "model", None) is None:
        return False
    if getattr(args, "url_given", False):
        raise ClientError(EXIT_USAGE, "give --model (offline: workers started here) or --url (a running router), not both")
    return True


# ---------------------------------------------------------------------------
# What to send


@dataclass
class ImageCall:
    """One request to the images API: endpoint, body and headers."""

    url: str
    path: str
    fields: dict[str, Any]
    files: list[tuple[str, tuple[str, bytes, str]]]
    headers: dict[str, str]
    n: int
    timeout: float

    @property
    def endpoint(self) -> str:
        return f"{self.url}{self.path}"

    def request_kwargs(self) -> dict[str, Any]:
        """httpx arguments: JSON for generations; multipart (every field a string) for edits."""
        if not self.files:
            return {"json": self.fields, "headers": self.headers}
        form = {k: json.dumps(v) if isinstance(v, bool) else str(v) for k, v in self.fields.items()}
        return {"data": form, "files": self.files, "headers": self.headers}


def build_call(args: argparse.Namespace, output_format: str) -> ImageCall:
    """The request the flags ask for; a ClientError(EXIT_USAGE) for flags that cannot be sent."""
    url = args.url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ClientError(EXIT_USAGE, f"--url {args.url!r} is not an http:// or https:// URL")
    fields: dict[str, Any] = {"prompt": args.prompt, "n": args.n, "output_format": output_format,
                              "stream": True, "stream_progress": True, "partial_images": args.partial_images}
    size = _size(args)
    optional = {"size": size, "seed": args.seed, "num_inference_steps": args.steps,
                "guidance_scale": args.guidance_scale, "negative_prompt": args.negative}
    fields.update({k: v for k, v in optional.items() if v is not None})
    files = [("image[]", _read_image(path)) for path in args.image]
    api_key = args.api_key or os.environ.get("GLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    path = "/v1/images/edits" if files else "/v1/images/generations"
    return ImageCall(url, path, fields, files, headers, args.n, args.timeout)


def _size(args: argparse.Namespace) -> str | None:
    if (args.width is None) != (args.height is None):
        raise ClientError(EXIT_USAGE, "give both --width and --height, or --size WIDTHxHEIGHT")
    if args.width is None:
        return args.size
    size = f"{args.width}x{args.height}"
    if args.size is not None and args.size.strip().lower() != size:
        raise ClientError(EXIT_USAGE, f"--size {args.size} disagrees with --width {args.width} --height {args.height}")
    return size


def _read_image(path: str) -> tuple[str, bytes, str]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ClientError(EXIT_USAGE, f"cannot read --image {path}: {exc.strerror or exc}") from None
    media = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return Path(path).name, data, media


# ---------------------------------------------------------------------------
# Where files go


class OutputPlan:
    """Names the files: `--out` is one file (NAME-1.EXT ... for several images) or a folder.

    In a folder, an image is named after its seed, which the server reports when the image is
    done unless --seed was given; previews are written once their image's name is known."""

    def __init__(self, out: str, fmt: str | None, n: int, seed: int | None):
        target = Path(out).expanduser()
        self.n, self.seed = n, seed
        self.is_folder = target.is_dir() or out.endswith(("/", os.sep)) or not target.suffix
        if self.is_folder:
            self.folder, self.format = target, _api_format(fmt or "png")
            self.ext = EXTENSIONS[self.format]
        else:
            self.folder, self.ext = target.parent, target.suffix
            self.format = _format_for(target, fmt)
            self.file = target
        self._stems: dict[int, Path] = {}

    def stem(self, index: int, seed: int | None = None) -> Path | None:
        """The path of image `index` without extension, once it can be known (else None)."""
        if index not in self._stems:
            if not self.is_folder:
                name = self.file.stem if self.n == 1 else f"{self.file.stem}-{index + 1}"
                self._stems[index] = self.folder / name
            else:
                seed = seed if seed is not None else (None if self.seed is None else self.seed + index)
                if seed is None:
                    return None
                self._stems[index] = self._unused(f"glm-image-{seed}")
        return self._stems[index]

    def image_path(self, index: int, seed: int) -> Path:
        return _with_ext(self.stem(index, seed), self.ext)

    def preview_path(self, stem: Path, k: int) -> Path:
        return _with_ext(stem, f".partial-{k}{self.ext}")

    def _unused(self, name: str) -> Path:
        # A folder collects many runs: never overwrite an earlier image (same seed, other prompt).
        taken = {s.name for s in self._stems.values()}
        candidate, k = name, 1
        while candidate in taken or (self.folder / f"{candidate}{self.ext}").exists():
            k += 1
            candidate = f"{name}-{k}"
        return self.folder / candidate


def _with_ext(stem: Path, ext: str) -> Path:
    return stem.with_name(stem.name + ext)


def _api_format(fmt: str) -> str:
    return "jpeg" if fmt == "jpg" else fmt


def _format_for(file: Path, fmt: str | None) -> str:
    from_ext = FORMATS.get(file.suffix.lower())
    if from_ext is None:
        raise ClientError(EXIT_USAGE, f"cannot tell the image format from {str(file)!r}: end --out with "
                                      f"{', '.join(FORMATS)}, or give a folder")
    if fmt is not None and _api_format(fmt) != from_ext:
        raise ClientError(EXIT_USAGE, f"--format {fmt} does not match the extension of --out {file}")
    return from_ext


def _write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise ClientError(EXIT_LOCAL, f"cannot write {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------
# Reading the stream


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str | None, dict]]:
    """(event name, parsed data) of each server-sent event in `lines`."""
    name, data = None, []
    for line in lines:
        if not line:  # a blank line ends an event
            if data:
                yield name, json.loads("\n".join(data))
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield name, json.loads("\n".join(data))


@dataclass
class SavedImage:
    """An image written to disk, with what the router said about it."""

    path: Path
    seed: int
    timings: dict[str, float]
    previews: list[Path] = field(default_factory=list)


class StreamHandler:
    """Acts on each event of the stream: progress to the display, images and previews to files."""

    def __init__(self, plan: OutputPlan, progress: "Progress"):
        self.plan, self.progress = plan, progress
        self.images: dict[int, SavedImage] = {}
        self.previews: dict[int, list[Path]] = {}
        self._pending: dict[int, list[tuple[int, bytes]]] = {}  # previews whose image has no name yet

    def handle(self, name: str | None, data: dict) -> None:
        kind = (name or data.get("type") or "").rsplit(".", 1)[-1]
        if kind == "error":
            error = data.get("error") or {}
            raise ClientError(EXIT_SERVER_FAILED, f"the router failed: {error.get('message', data)}")
        if kind == "progress":
            self.progress.update(data)
        elif kind == "partial_image":
            self._preview(data["image_index"], data["partial_image_index"], _b64(data["b64_json"]))
        elif kind == "completed":
            self._completed(data)

    def _preview(self, index: int, k: int, image: bytes) -> None:
        stem = self.plan.stem(index)
        if stem is None:
            self._pending.setdefault(index, []).append((k, image))
            return
        path = self.plan.preview_path(stem, k)
        _write(path, image)
        self.previews.setdefault(index, []).append(path)
        self.progress.preview(index, k, path)

    def _completed(self, data: dict) -> None:
        index, seed = data["image_index"], data["seed"]
        path = self.plan.image_path(index, seed)
        for k, image in self._pending.pop(index, []):
            self._preview(index, k, image)
        _write(path, _b64(data["b64_json"]))
        self.images[index] = SavedImage(path, seed, data.get("timings") or {}, self.previews.get(index, []))
        self.progress.completed(index, path, seed, data.get("timings") or {})


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


# ---------------------------------------------------------------------------
# Progress display

STAGE_LABELS = {"ar": "AR tokens", "dit": "DiT steps"}


class Progress:
    """What the user sees while the images are made; subclasses draw it."""

    def update(self, event: dict) -> None: ...

    def preview(self, index: int, k: int, path: Path) -> None: ...

    def completed(self, index: int, path: Path, seed: int, timings: dict) -> None: ...

    def close(self) -> None: ...


class LineProgress(Progress):
    """Plain lines for logs and pipes: a stage's start, each quarter of it, and its end."""

    def __init__(self, out: TextIO, n: int):
        self.out, self.n = out, n
        self._stage: dict[int, str] = {}
        self._quarter: dict[int, int] = {}
        self._first: dict[int, tuple[float, int]] = {}  # per image: when this stage's first event came, at what count

    def _say(self, index: int, text: str) -> None:
        print(f"image {index + 1}/{self.n}: {text}", file=self.out, flush=True)

    def update(self, event: dict) -> None:
        index, stage = event["image_index"], event["stage"]
        if stage == "queued":
            self._say(index, f"queued ({event.get('position', 0)} ahead)")
        elif stage == "retry":
            self._say(index, f"retrying: {event.get('reason')}")
        elif stage in STAGE_LABELS:
            self._stage_progress(index, stage, event["done"], event["total"], event.get("seconds"))

    def _stage_progress(self, index: int, stage: str, done: int, total: int, seconds: float | None) -> None:
        label = STAGE_LABELS[stage]
        quarter = 4 * done // max(total, 1)
        if self._stage.get(index) != stage:
            # The ETA is measured from this first event: the rate before it is unknown.
            self._stage[index], self._quarter[index] = stage, quarter
            self._first[index] = (time.monotonic(), done)
            self._say(index, f"{label} {done}/{total}")
        if seconds is not None:
            self._say(index, f"{label} {done}/{total} done in {seconds:.1f}s")
        elif self._quarter[index] < quarter < 4:
            self._quarter[index] = quarter
            self._say(index, f"{label} {done}/{total} ({25 * quarter}%){self._eta(index, done, total)}")

    def _eta(self, index: int, done: int, total: int) -> str:
        started, done_then = self._first[index]
        if done <= done_then:
            return ""
        rate = (done - done_then) / (time.monotonic() - started)
        return f", ETA {(total - done) / rate:.1f}s"

    def preview(self, index: int, k: int, path: Path) -> None:
        self._say(index, f"preview {k + 1} saved to {path}")

    def completed(self, index: int, path: Path, seed: int, timings: dict) -> None:
        total = timings.get("total_s")
        took = f", {total:.1f}s" if total is not None else ""
        self._say(index, f"saved {path} (seed {seed}{took})")


class BarProgress(Progress):
    """One tqdm bar per image; its label switches from AR tokens to DiT steps."""

    def __init__(self, out: TextIO, n: int):
        from tqdm import tqdm

        self.n = n
        self._stage: dict[int, str] = {}
        self.bars = [tqdm(total=None, position=i, desc=self._desc(i, "waiting"), file=out, leave=True,
                          dynamic_ncols=True, unit="") for i in range(n)]

    def _desc(self, index: int, what: str) -> str:
        return f"image {index + 1}/{self.n} {what:<9}"

    def update(self, event: dict) -> None:
        index, stage = event["image_index"], event["stage"]
        bar = self.bars[index]
        if stage == "queued":
            bar.set_description(self._desc(index, "queued"))
            bar.set_postfix_str(f"{event.get('position', 0)} ahead")
        elif stage == "retry":
            bar.set_postfix_str(f"retrying: {event.get('reason')}")
        elif stage in STAGE_LABELS:
            if self._stage.get(index) != stage:
                self._stage[index] = stage
                bar.unit = "tok" if stage == "ar" else "step"
                bar.set_description(self._desc(index, STAGE_LABELS[stage]), refresh=False)
                bar.set_postfix_str("", refresh=False)
                bar.reset(total=event["total"])  # restarts the clock too, so the ETA is this stage's
            bar.update(event["done"] - bar.n)

    def preview(self, index: int, k: int, path: Path) -> None:
        self.bars[index].set_postfix_str(f"preview {k + 1}: {path.name}")

    def completed(self, index: int, path: Path, seed: int, timings: dict) -> None:
        bar = self.bars[index]
        bar.set_description(self._desc(index, "done"))
        bar.set_postfix_str(f"{path} (seed {seed})")
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def make_progress(n: int, out: TextIO | None = None) -> Progress:
    """Bars when stdout and `out` (stderr) are both terminals, else plain lines: a redirected
    stream gets lines, never a bar's carriage returns."""
    out = out or sys.stderr
    return BarProgress(out, n) if _is_terminal(sys.stdout) and _is_terminal(out) else LineProgress(out, n)


def _is_terminal(stream: TextIO) -> bool:
    try:  # a terminal without a width (`script` with no tty of its own) cannot draw a bar
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------------------
# Running it


def run(args: argparse.Namespace) -> int:
    """`glm-image-serve generate`: make the images, save them, return the exit status."""
    try:
        offline = offline_mode(args)
        if offline:
            from client.offline import OFFLINE_URL

            args.url = OFFLINE_URL
        plan = OutputPlan(args.out, args.format, args.n, args.seed)
        call = build_call(args, plan.format)
        if not offline:
            return _generate(call, plan)
        return _generate_offline(args, call, plan)
    except ClientError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # closing the stream cancels the work on the router
        print("interrupted", file=sys.stderr)
        return 130


def _generate_offline(args: argparse.Namespace, call: ImageCall, plan: OutputPlan) -> int:
    """The same request, answered by workers this command starts (and stops when done)."""
    from client.offline import EngineStartError, engine_from_args

    try:
        engine = engine_from_args(args, say=lambda text: print(text, file=sys.stderr, flush=True))
    except EngineStartError as exc:
        raise ClientError(EXIT_UNREACHABLE, str(exc)) from None
    except (ValueError, OSError) as exc:  # not a model folder, a bad stage config
        raise ClientError(EXIT_USAGE, str(exc)) from None
    with engine, httpx.Client(transport=engine.transport()) as client:
        return _generate(call, plan, client)


def _generate(call: ImageCall, plan: OutputPlan, client: httpx.Client | None = None) -> int:
    started = time.monotonic()
    progress = make_progress(call.n)
    handler = StreamHandler(plan, progress)
    try:
        request_id = _stream(call, handler, client)
    finally:
        progress.close()
    missing = call.n - len(handler.images)
    if missing:
        raise ClientError(EXIT_SERVER_FAILED, f"the stream ended with {missing} of {call.n} image(s) missing")
    images = [handler.images[i] for i in range(call.n)]
    print(json.dumps({
        "images": [{"path": str(im.path), "seed": im.seed, "timings": im.timings,
                    "previews": [str(p) for p in im.previews]} for im in images],
        "output_format": plan.format, "request_id": request_id,
        "seconds": round(time.monotonic() - started, 3)}))
    return EXIT_OK


def _stream(call: ImageCall, handler: StreamHandler, client: httpx.Client | None = None) -> str | None:
    """Send the request (through `client` when given) and feed its events to `handler`; return the
    router's request id.

    Transport failures become EXIT_UNREACHABLE, HTTP refusals EXIT_REFUSED or EXIT_SERVER_FAILED."""
    timeout = httpx.Timeout(call.timeout, connect=min(call.timeout, CONNECT_TIMEOUT_S))
    opened = False
    send = httpx.stream if client is None else client.stream
    try:
        with send("POST", call.endpoint, timeout=timeout, **call.request_kwargs()) as response:
            if response.status_code != 200:
                response.read()
                raise _refusal(response)
            opened = True
            try:
                for name, data in sse_events(response.iter_lines()):
                    handler.handle(name, data)
            except (ValueError, KeyError, IndexError) as exc:  # not the event shapes of router/edge/streaming.py
                raise ClientError(EXIT_SERVER_FAILED, f"the router sent an event this client cannot read: "
                                                      f"{type(exc).__name__}: {exc}") from None
            return response.headers.get("x-request-id")
    except httpx.ConnectTimeout:
        raise ClientError(EXIT_UNREACHABLE, f"cannot reach the router at {call.url}: no connection within "
                                            f"{min(call.timeout, CONNECT_TIMEOUT_S):g}s") from None
    except httpx.TimeoutException:
        raise ClientError(EXIT_UNREACHABLE, f"the router at {call.url} did not answer within "
                                            f"{call.timeout:g}s") from None
    except httpx.TransportError as exc:
        what = "lost the connection to" if opened else "cannot reach"
        raise ClientError(EXIT_UNREACHABLE, f"{what} the router at {call.url}: {str(exc) or type(exc).__name__}") from None


def _refusal(response: httpx.Response) -> ClientError:
    """The router's answer other than 200 as a ClientError carrying its message."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:500] or response.reason_phrase
    retry_after = response.headers.get("retry-after")
    if retry_after:
        message += f" (retry after {retry_after}s)"
    if response.status_code == 401:
        message += " (pass the key with --api-key, or set $GLM_API_KEY)"
    if response.status_code < 500:
        return ClientError(EXIT_REFUSED, f"the router refused the request ({response.status_code}): {message}")
    return ClientError(EXIT_SERVER_FAILED, f"the router failed ({response.status_code}): {message}")
