"""`glm-image-serve run-batch`: OpenAI batch files through GLM-Image, offline or against a router.

    glm-image-serve run-batch -i requests.jsonl -o results.jsonl --model /models/GLM-Image   # own workers
    glm-image-serve run-batch -i requests.jsonl -o results.jsonl --url http://127.0.0.1:8000  # a running fleet

The input is OpenAI's (and `vllm run-batch`'s) batch format, one request per line:

    {"custom_id": "cat-1", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "a cat", "seed": 1}}

`url` is /v1/images/generations, /v1/images/edits or /v1/chat/completions and `body` is what that
endpoint takes as JSON. An edit's condition images go in `image` (a path, relative to the input
file's folder, or a data: URL; or a list of them) or in `images` ([{"image_url": "data:..."}], OpenAI's
JSON shape); they are uploaded as the multipart form `glm-image-serve generate --image` sends.

The output is OpenAI's batch output format, one line per request in the order they finish:

    {"id": "batch_req_...", "custom_id": "cat-1", "response": {"status_code": 200, "request_id": "...",
     "body": {...the endpoint's response...}}, "error": null}

A failed request has the endpoint's error body and status, and `error` {"code", "message"} with the
same message the HTTP API gives. A line that cannot be read as a request (not JSON, no custom_id, an
unknown url) becomes an error line too, and the run goes on; a line without a usable custom_id is
named by its `line` number. Every request is sent through the HTTP API's own code (in-process with
--model, client/offline.py), so the bytes and the messages are those of the HTTP API.

Resumable: each result line is appended with one write, then flushed and fsynced, so a killed run
leaves complete lines and at most one partial last line, which the next run truncates; the next run
with the same output skips every request that has a line already (failed ones included).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import mimetypes
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from client.offline import OFFLINE_URL, add_offline_arguments, form_fields, retry_after_s

EXIT_OK = 0
EXIT_FAILED = 1  # some request failed (its error line is in the output)
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3  # the router could not be reached or was lost (rerun to resume); offline: workers did not start
EXIT_INTERRUPTED = 130

ENDPOINTS = ("/v1/images/generations", "/v1/images/edits", "/v1/chat/completions")
DEFAULT_URL_CONCURRENCY = 8
CONNECT_TIMEOUT_S = 15.0
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}

EPILOG = """\
Input: one JSON object per line, {"custom_id", "method": "POST", "url", "body"}; url is
/v1/images/generations, /v1/images/edits (condition images in body.image: paths relative to the
input file or data: URLs; or body.images: [{"image_url": "data:..."}]) or /v1/chat/completions.
Output: one line per request, {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}, appended as each finishes. Rerunning with the same --output skips the requests it holds.
With --image-dir, images are written there (CUSTOM_ID.png, CUSTOM_ID-2.png for n > 1) and the
result lines carry their "path" instead of base64.

exit status:
  0    every request succeeded (this run and the earlier runs on the same output)
  1    some request failed: its error line is in the output
  2    usage error (bad flags, an unreadable input file)
  3    the router could not be reached or was lost (rerun the same command to resume);
       offline (--model): the workers did not start
  130  interrupted (rerun the same command to resume)
"""


class BatchError(Exception):
    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code, self.message = exit_code, message


# ---------------------------------------------------------------------------
# Flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", "--input-file", dest="input", required=True, metavar="FILE",
                   help="batch file: one request per line in OpenAI's batch format (see below)")
    p.add_argument("-o", "--output", "--output-file", dest="output", required=True, metavar="FILE",
                   help="results file, OpenAI's batch output format; appended to, and the requests it already "
                        "holds are skipped (resume)")
    p.add_argument("--url", metavar="URL", help="a running router (e.g. http://127.0.0.1:8000): send the requests "
                                                "there instead of starting workers (--model)")
    p.add_argument("--image-dir", metavar="DIR",
                   help="write the images to DIR and put their paths in the result lines (default: inline base64)")
    p.add_argument("--concurrency", type=int, metavar="N",
                   help="images in flight at once (default: offline, every worker slot busy plus one AR batch "
                        f"waiting; with --url, {DEFAULT_URL_CONCURRENCY})")
    p.add_argument("--api-key", metavar="KEY",
                   help="with --url: sent as 'Authorization: Bearer KEY' (default: $GLM_API_KEY, else $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=1800, metavar="SECONDS",
                   help="with --url: seconds a request may wait for its answer (default: %(default)s)")
    add_offline_arguments(p)


# ---------------------------------------------------------------------------
# Reading the input


@dataclass
class Failure:
    """A line that is answered without reaching an endpoint (or refused before it)."""

    status: int
    message: str
    error_type: str = "invalid_request_error"


@dataclass
class Request:
    """One request line, ready to send."""

    line: int
    key: tuple  # ("id", custom_id) or ("line", N): what the output records it as
    custom_id: str | None
    path: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    images: int = 1  # what it asks for, to bound the images in flight
    failure: Failure | None = None


_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of every non-blank line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw.rstrip(b"\r\n")


def _custom_id_of(raw: bytes) -> str | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    custom_id = data.get("custom_id") if isinstance(data, dict) else None
    return custom_id if isinstance(custom_id, str) and custom_id else None


@dataclass
class Plan:
    """The input's lines: each one's key (its custom_id the first time it is seen, else its line
    number) and the line where each custom_id first appears."""

    keys: dict[int, tuple] = field(default_factory=dict)
    first_line: dict[str, int] = field(default_factory=dict)


def plan_input(path: Path) -> Plan:
    plan = Plan()
    for number, raw in _raw_lines(path):
        custom_id = _custom_id_of(raw)
        if custom_id is not None and custom_id not in plan.first_line:
            plan.first_line[custom_id] = number
            plan.keys[number] = ("id", custom_id)
        else:
            plan.keys[number] = ("line", number)
    return plan


def read_requests(path: Path, plan: Plan, skip: set[tuple]) -> Iterator[Request]:
    """The requests of the input file not in `skip`, each ready to send or with its Failure."""
    from router.edge.safe_json import parse_json_body

    keys, first_line = plan.keys, plan.first_line
    for number, raw in _raw_lines(path):
        key = keys[number]
        if key in skip:
            continue
        request = Request(number, key, key[1] if key[0] == "id" else None)
        try:
            data = parse_json_body(raw)  # the HTTP API's JSON reader: the same messages for broken JSON
            _prepare(request, data, path.parent, first_line)
        except _Refused as exc:
            request.failure = exc.failure
        except Exception as exc:  # noqa: BLE001 - InvalidRequest from the JSON reader or the image decoder
            request.failure = Failure(getattr(exc, "status_code", 400), getattr(exc, "message", str(exc)),
                                      getattr(exc, "error_type", "invalid_request_error"))
        yield request


class _Refused(Exception):
    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.failure = Failure(status, message, error_type)


def _prepare(request: Request, data: Any, base: Path, first_line: dict[str, int]) -> None:
    if not isinstance(data, dict):
        raise _Refused(400, f"a batch line must be a JSON object, not {type(data).__name__}")
    unknown = sorted(set(data) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise _Refused(400, f"unknown field {unknown[0]!r} in the batch line (expected custom_id, method, url, body)")
    custom_id = data.get("custom_id")
    if custom_id is None:
        raise _Refused(400, "field 'custom_id' is required")
    if not isinstance(custom_id, str) or not custom_id:
        raise _Refused(400, "custom_id must be a non-empty string")
    request.custom_id = custom_id
    if first_line.get(custom_id, request.line) != request.line:
        raise _Refused(400, f"custom_id {custom_id!r} is used by line {first_line[custom_id]} already; "
                            "every custom_id must be unique")
    url = data.get("url")
    if not isinstance(url, str):
        raise _Refused(400, "field 'url' is required: /v1/images/generations, /v1/images/edits or /v1/chat/completions")
    method = data.get("method", "POST")
    if url not in ENDPOINTS:
        # The HTTP API's own answer for an unknown path.
        raise _Refused(404, f"no such endpoint: {method if isinstance(method, str) else 'POST'} {url}", "not_found_error")
    if method != "POST":
        raise _Refused(405, f"method {method} is not allowed on {url}")
    if "body" not in data:
        raise _Refused(400, "field 'body' is required")
    body = data["body"]
    if isinstance(body, dict):
        if body.get("stream"):
            raise _Refused(400, "stream: a batch file cannot stream; leave stream out (each result is written when "
                                "its request is done)")
        n = body.get("n", 1)
        request.images = n if isinstance(n, int) and n > 0 else 1
    request.path = url
    if url != "/v1/images/edits":
        request.kwargs = {"json": body}
        return
    if not isinstance(body, dict):
        raise _Refused(400, f"request body must be a JSON object, not {type(body).__name__}")
    fields = dict(body)
    if "image" in fields and "images" in fields:
        raise _Refused(400, "give the condition images in 'image' or in 'images', not both")
    refs = fields.pop("image", None)
    if refs is None:
        refs = fields.pop("images", None)
    if refs is None or refs == []:
        raise _Refused(400, "field 'image' is required: upload one or more images as image or image[]")
    if not isinstance(refs, list):
        refs = [refs]
    files = [("image[]", _condition_image(ref, i, base)) for i, ref in enumerate(refs)]
    request.kwargs = {"data": form_fields(fields), "files": files}


def _condition_image(ref: Any, index: int, base: Path) -> tuple[str, bytes, str]:
    """(file name, bytes, media type) of an edit's condition image: a path, a data: URL, or OpenAI's
    {"image_url": "..."} / {"image_url": {"url": "..."}}."""
    from common.stage_config import Limits
    from router.edge.images import decode_data_url

    what = f"image[{index}]"
    if isinstance(ref, dict):
        ref = ref.get("image_url", ref.get("url"))
        if isinstance(ref, dict):
            ref = ref.get("url")
    if not isinstance(ref, str) or not ref.strip():
        raise _Refused(400, f"{what} must be a file path or a data: URL (or {{\"image_url\": \"data:...\"}})")
    if ref.startswith("data:") or "://" in ref:
        media = ref[5:].split(";", 1)[0].split(",", 1)[0].strip().lower() if ref.startswith("data:") else ""
        data = decode_data_url(ref, Limits(), what)  # refuses remote URLs with the API's message
        ext = (mimetypes.guess_extension(media) if media.startswith("image/") else None) or ".png"
        return f"image-{index}{ext}", data, media or "image/png"
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _Refused(400, f"{what}: cannot read {ref}: {exc.strerror or exc}") from None
    return path.name, data, mimetypes.guess_type(path.name)[0] or "application/octet-stream"


# ---------------------------------------------------------------------------
# The output file


@dataclass
class Done:
    """What an output file already holds."""

    keys: set[tuple] = field(default_factory=set)
    failed: set[tuple] = field(default_factory=set)
    truncated_bytes: int = 0


def scan_output(path: Path) -> Done:
    """The requests `path` holds results for. A partial last line (a run killed while writing) is cut off."""
    done = Done()
    if not path.exists():
        return done
    with open(path, "r+b") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
            done.truncated_bytes = len(data) - end
    for raw in data[:end].splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(line, dict):
            continue
        key = ("line", line["line"]) if isinstance(line.get("line"), int) else ("id", line.get("custom_id"))
        done.keys.add(key)
        if line.get("error") is not None or (line.get("response") or {}).get("status_code") != 200:
            done.failed.add(key)
    return done


class ResultFile:
    """Appends result lines, each with one write, then flush and fsync: a kill leaves whole lines."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:  # one write() in practice; a short write is finished rather than left half
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _record(request: Request, status: int | None, body: Any, request_id: str | None) -> dict:
    record: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request.custom_id}
    if request.key[0] == "line":
        record["line"] = request.line
    error = None
    if status is not None:
        record["response"] = {"status_code": status, "request_id": request_id, "body": body}
        if status != 200:
            detail = body.get("error") if isinstance(body, dict) else None
            detail = detail if isinstance(detail, dict) else {}
            code = detail.get("code") if isinstance(detail.get("code"), str) else detail.get("type")
            error = {"code": str(code or status),
                     "message": str(detail.get("message") or body)}
    else:
        record["response"] = None
    record["error"] = error
    return record


def _failure_record(request: Request) -> dict:
    from router.core.errors import error_body

    failure = request.failure
    body = error_body(failure.status, failure.message, failure.error_type)
    record = _record(request, failure.status, body, None)
    if request.custom_id is None:
        record["response"] = None  # nothing was sent anywhere
    return record


# ---------------------------------------------------------------------------
# Images to files (--image-dir)


def _stem(custom_id: str) -> str:
    if _SANE_ID.match(custom_id) and not custom_id.startswith("."):
        return custom_id
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", custom_id)[:80].lstrip(".") or "request"
    return f"{safe}-{hashlib.sha1(custom_id.encode()).hexdigest()[:8]}"


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def images_to_files(body: dict, folder: Path, custom_id: str) -> None:
    """Replace the base64 images of a 200 body with files in `folder` (their "path")."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = EXTENSIONS.get(body.get("output_format"), ".png")
    stem = _stem(custom_id)
    if "data" in body:  # images API
        items = body["data"]
        for i, item in enumerate(items):
            path = folder / (f"{stem}{ext}" if len(items) == 1 else f"{stem}-{i + 1}{ext}")
            _write_file(path, base64.b64decode(item.pop("b64_json")))
            item["path"] = str(path)
    for i, choice in enumerate(body.get("choices", [])):  # chat API
        choices = body["choices"]
        for part in choice.get("message", {}).get("content", []):
            image_url = part.get("image_url") or {}
            url = image_url.get("url", "")
            if url.startswith("data:"):
                path = folder / (f"{stem}{ext}" if len(choices) == 1 else f"{stem}-{i + 1}{ext}")
                _write_file(path, base64.b64decode(url.split(",", 1)[1]))
                part["image_url"] = {"path": str(path)}


def count_images(body: Any) -> int:
    if not isinstance(body, dict):
        return 0
    return len(body.get("data") or body.get("choices") or [])


# ---------------------------------------------------------------------------
# Progress


class Progress:
    """A bar over the requests to run (done, failed, images/s, ETA) on a terminal, else lines."""

    def __init__(self, total: int, out: TextIO):
        from client.generate import _is_terminal

        self.total, self.out = total, out
        self.done = self.failed = self.images = 0
        self.started = time.monotonic()
        self._last_line = 0.0
        self.bar = None
        if total and _is_terminal(sys.stdout) and _is_terminal(out):
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=out, unit="req", dynamic_ncols=True, desc="run-batch")

    def begin(self) -> None:
        """The clock starts when the first request goes out (not while workers load)."""
        self.started = time.monotonic()
        if self.bar is not None:
            self.bar.reset(total=self.total)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.images / elapsed if elapsed > 0 else 0.0

    def update(self, ok: bool, images: int) -> None:
        self.done += 1
        self.failed += not ok
        self.images += images
        if self.bar is not None:
            self.bar.set_postfix_str(f"failed {self.failed}, {self.rate():.2f} images/s", refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if self.done == self.total or now - self._last_line >= 10 or self.done % max(1, self.total // 20) == 0:
            self._last_line = now
            elapsed = now - self.started
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0
            print(f"run-batch: {self.done}/{self.total} done, {self.failed} failed, {self.rate():.2f} images/s, "
                  f"ETA {eta:.0f}s", file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------
# Running it


class _Lost(Exception):
    """The router stopped answering: stop, so the unfinished requests are redone on the next run."""


async def _send(client: httpx.AsyncClient, request: Request) -> httpx.Response:
    while True:
        try:
            response = await client.post(request.path, **request.kwargs)
        except httpx.TransportError as exc:
            raise _Lost(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
        if response.status_code != 429:  # the line is full: wait as told, then again
            return response
        await asyncio.sleep(retry_after_s(response))


async def run_requests(client: httpx.AsyncClient, requests: Iterator[Request], window: int, results: ResultFile,
                       progress: Progress, image_dir: Path | None) -> None:
    """Send the requests with at most `window` images in flight; append each result as it comes."""
    in_flight: dict[asyncio.Task, Request] = {}
    load = 0
    progress.begin()

    def finish(task: asyncio.Task, request: Request) -> None:
        response: httpx.Response = task.result()  # raises _Lost
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text[:500], "type": "server_error", "param": None,
                              "code": response.status_code}}
        if response.status_code == 200 and image_dir is not None:
            images_to_files(body, image_dir, request.custom_id)
        results.append(_record(request, response.status_code, body, response.headers.get("x-request-id")))
        progress.update(response.status_code == 200, count_images(body) if response.status_code == 200 else 0)

    async def settle() -> None:
        nonlocal load
        done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            request = in_flight.pop(task)
            load -= request.images
            finish(task, request)

    try:
        for request in requests:
            if request.failure is not None:
                results.append(_failure_record(request))
                progress.update(False, 0)
                continue
            while in_flight and load + request.images > window:
                await settle()
            task = asyncio.create_task(_send(client, request))
            in_flight[task] = request
            load += request.images
        while in_flight:
            await settle()
    finally:
        for task in in_flight:
            task.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)


def run(args: argparse.Namespace) -> int:
    """`glm-image-serve run-batch`: the exit status."""
    try:
        return _run(args)
    except BatchError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: the finished requests are in the output; rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    if (args.model is None) == (args.url is None):
        raise BatchError(EXIT_USAGE, "give --model PATH (offline: workers started here) or --url URL (a running router)")
    if args.concurrency is not None and args.concurrency < 1:
        raise BatchError(EXIT_USAGE, "--concurrency must be at least 1")
    source, output = Path(args.input), Path(args.output)
    if args.url is not None and not args.url.startswith(("http://", "https://")):
        raise BatchError(EXIT_USAGE, f"--url {args.url!r} is not an http:// or https:// URL")
    try:
        plan = plan_input(source)
    except OSError as exc:
        raise BatchError(EXIT_USAGE, f"cannot read --input {source}: {exc.strerror or exc}") from None
    try:
        done = scan_output(output)
    except OSError as exc:
        raise BatchError(EXIT_USAGE, f"cannot read --output {output}: {exc.strerror or exc}") from None
    if done.truncated_bytes:
        print(f"run-batch: cut a partial last line ({done.truncated_bytes} bytes) off {output}: its request runs again",
              file=sys.stderr)
    in_input = set(plan.keys.values())
    skipped = len(in_input & done.keys)
    earlier_failed = len(in_input & done.failed)
    to_do = len(in_input) - skipped
    if skipped:
        print(f"run-batch: {skipped} of {len(in_input)} requests already have results in {output}; running the "
              f"other {to_do}", file=sys.stderr)
    image_dir = Path(args.image_dir) if args.image_dir else None
    started = time.monotonic()
    progress = Progress(to_do, sys.stderr)
    results = ResultFile(output)
    lost: str | None = None
    try:
        if to_do == 0:
            pass
        elif args.model is not None:
            lost = _run_offline(args, source, plan, done, results, progress, image_dir)
        else:
            lost = _run_remote(args, source, plan, done, results, progress, image_dir)
    finally:
        progress.close()
        results.close()
    seconds = time.monotonic() - started
    busy = progress.seconds if progress.done else 0.0
    failed = progress.failed + earlier_failed
    summary = {"requests": len(in_input), "succeeded": len(in_input) - failed - (to_do - progress.done),
               "failed": failed, "skipped": skipped, "not_run": to_do - progress.done, "images": progress.images,
               "seconds": round(seconds, 3), "generation_seconds": round(busy, 3),
               "images_per_s": round(progress.images / busy, 4) if busy else 0.0, "output": str(output)}
    earlier = f" ({earlier_failed} in earlier runs)" if earlier_failed else ""
    not_run = f", {summary['not_run']} not run" if summary["not_run"] else ""
    print(f"run-batch: {summary['requests']} requests: {summary['succeeded']} succeeded, {failed} failed{earlier}, "
          f"{skipped} skipped as already done{not_run}; {progress.images} images in {busy:.1f}s "
          f"({summary['images_per_s']:.2f} images/s; {seconds:.1f}s in all); results in {output}", file=sys.stderr)
    print(json.dumps(summary))
    if lost is not None:
        raise BatchError(EXIT_UNREACHABLE, f"{lost}; rerun the same command to resume")
    return EXIT_FAILED if failed else EXIT_OK


def _run_offline(args, source, plan, done, results, progress, image_dir) -> str | None:
    from client.offline import EngineStartError, engine_from_args

    try:
        engine = engine_from_args(args, say=lambda text: print(f"run-batch: {text}", file=sys.stderr, flush=True))
    except EngineStartError as exc:
        raise BatchError(EXIT_UNREACHABLE, str(exc)) from None
    except (ValueError, OSError) as exc:
        raise BatchError(EXIT_USAGE, str(exc)) from None
    with engine:
        window = args.concurrency or engine.max_in_flight

        async def main() -> None:
            async with httpx.AsyncClient(transport=engine.async_transport(), base_url=OFFLINE_URL, timeout=None) as client:
                await run_requests(client, read_requests(source, plan, done.keys), window, results, progress, image_dir)

        try:
            asyncio.run(main())
        except _Lost as exc:
            return f"the offline engine stopped answering: {exc}"
    return None


def _run_remote(args, source, plan, done, results, progress, image_dir) -> str | None:
    api_key = args.api_key or os.environ.get("GLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(args.timeout, connect=min(args.timeout, CONNECT_TIMEOUT_S))
    window = args.concurrency or DEFAULT_URL_CONCURRENCY

    async def main() -> None:
        limits = httpx.Limits(max_connections=window + 4)
        async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, timeout=timeout,
                                     limits=limits) as client:
            await run_requests(client, read_requests(source, plan, done.keys), window, results, progress, image_dir)

    try:
        asyncio.run(main())
    except _Lost as exc:
        return f"lost the router at {args.url}: {exc}"
    return None
