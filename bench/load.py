"""Load generator for a running router: closed-loop concurrency sweeps and open-loop Poisson arrivals.

    # closed loop: C clients, each sending its next request when the last one returns
    .venv/bin/python -m bench.load --url http://127.0.0.1:8000 --concurrency 1 2 4 8 --duration 20
    # open loop: Poisson arrivals at R requests/s, whatever the latency
    .venv/bin/python -m bench.load --url http://127.0.0.1:8000 --rate 0.5 1 --duration 60
    # a fixed number of requests, as vLLM-Omni's GLM-Image benchmark counts them
    .venv/bin/python -m bench.load --url http://127.0.0.1:8000 --api chat --num-requests 10 --warmup-requests 1

Works against any router (real workers or bench/sim_workers.py) on this machine: the URL must be
loopback. Reports per level: images/s, requests/s, errors and 429s, and p50/p95/p99 of the end
to end latency and of its parts, from the response's per-image `timings`:

- `ar` and `dit`: compute on the workers (what the AR and DiT workers measured for their job;
  for a batching AR worker this includes sharing the GPU with the rest of the batch);
- `queue`: `total_s - ar_s - dit_s`: waiting in the router for a free worker slot of either
  stage, plus bus transfers and retries;
- `edge`: client latency minus `total_s`: HTTP, admission, JSON and base64, on both sides.

Throughput counts the images of requests that *finish* inside the measurement window
(after `--warmup` seconds, for `--duration` seconds), so it is a steady-state figure; latency
figures are over the requests *started* inside the window (in-flight ones are waited for after
the window, up to `--timeout`). Every count and duration is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

# Hard bounds: a typo must not start an hour-long or million-request run by accident.
MAX_DURATION_S = 3600.0
MAX_CONCURRENCY = 4096
MAX_RATE = 10_000.0
MAX_REQUESTS = 100_000
PERCENTILES = (50, 95, 99)


def vllm_omni_random_prompt(index: int) -> str:
    """The prompt vLLM-Omni's GLM-Image benchmark sends for `--dataset random` (request `index`)."""
    return f"A beautiful scene with vivid colors and intricate details, prompt {index}"


def load_prompts(path: str | None) -> list[str] | None:
    """Prompts from a file: a JSON list of strings or of objects with `t2i_prompt` (vLLM-Omni's
    prompt.json) or `prompt`, or a text file with one prompt per line. None: built-in prompts."""
    if path is None:
        return None
    text = Path(path).read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        if not isinstance(raw, list):
            raise SystemExit(f"error: {path}: expected a JSON list")
        prompts = []
        for item in raw:
            prompt = item if isinstance(item, str) else (item.get("t2i_prompt") or item.get("prompt") or "")
            if prompt.strip():
                prompts.append(prompt.strip())
    if not prompts:
        raise SystemExit(f"error: {path} holds no prompts")
    return prompts


@dataclass(frozen=True)
class RequestSpec:
    """What every request asks for. `api`: "images" (`/v1/images/generations`) or "chat"
    (`/v1/chat/completions` with the options in `extra_body`, as vLLM-Omni's benchmark sends them)."""

    size: str = "1024x1024"
    steps: int | None = None  # None: the server's default
    api: str = "images"
    model: str | None = None
    seed: int | None = None  # request i gets seed + i; None: no seed (the server draws one)
    prompts: tuple[str, ...] | None = None  # None: vLLM-Omni's random-dataset prompts

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.api == "chat" else "/v1/images/generations"

    def body(self, index: int) -> dict[str, Any]:
        prompt = self.prompts[index % len(self.prompts)] if self.prompts else vllm_omni_random_prompt(index)
        options: dict[str, Any] = {}
        if self.steps is not None:
            options["num_inference_steps"] = self.steps
        if self.seed is not None:
            options["seed"] = self.seed + index
        if self.api == "chat":
            width, height = (int(v) for v in self.size.lower().split("x"))
            body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}],
                                    "extra_body": {"height": height, "width": width, **options}}
        else:
            body = {"prompt": prompt, "size": self.size, **options}
        if self.model is not None:
            body["model"] = self.model
        return body


@dataclass
class Record:
    """One request as the client saw it (times relative to the run's start)."""

    started: float
    ended: float = math.nan
    status: int = 0  # 0: no HTTP answer (connection error, timeout)
    images: int = 0
    timings: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


class KeepAliveClient:
    """A lean HTTP/1.1 client for JSON POSTs with a pool of keep-alive connections.

    Why not httpx: its connection pool is the bottleneck at high concurrency. Against the same
    router with instant stages, httpx 0.28 reached 362 requests/s at 16 clients but fell to 123 at
    64 (4.5 ms of client CPU per request), while this client sustained ~640 at 16..128 on ~0.05 of a core;
    a load generator must not be what it measures. `--client httpx` is still there to compare.
    """

    def __init__(self, url: str, timeout_s: float, connections: int, api_key: str | None = None):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout_s = timeout_s
        self.auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.max_idle = connections

    async def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        status, _headers, payload = await self.post_json_with_headers(path, body)
        return status, payload

    async def post_json_with_headers(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        """POST `body` as JSON; the status, the response headers (names lower-cased) and the body."""
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"{self.auth}Content-Length: {len(data)}\r\n\r\n").encode()
        return await asyncio.wait_for(self._exchange(head + data), self.timeout_s)

    async def _exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        while True:
            reused = bool(self.idle)
            reader, writer = self.idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(request)
                status, keep, headers, payload = await self._read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                writer.close()
                # The server closed an idle keep-alive connection before reading this request: resend
                # on a fresh one. A fresh connection failing is a real error.
                if reused and (not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial):
                    continue
                raise
            except BaseException:
                writer.close()  # cancelled or timed out mid-response: the connection is unusable
                raise
            if keep and len(self.idle) < self.max_idle:
                self.idle.append((reader, writer))
            else:
                writer.close()
            return status, headers, payload

    @staticmethod
    async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, dict[str, str], bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        keep = headers.get("connection", "").lower() != "close"
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(chunk[:-2])
            return status, keep, headers, b"".join(chunks)
        if "content-length" in headers:
            return status, keep, headers, await reader.readexactly(int(headers["content-length"]))
        return status, False, headers, await reader.read()  # body until close

    async def aclose(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class HttpxClient:
    """The same interface over httpx (slower at high concurrency; see KeepAliveClient)."""

    def __init__(self, url: str, timeout_s: float, connections: int):
        self.client = httpx.AsyncClient(
            base_url=url, timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))

    async def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        response = await self.client.post(path, json=body)
        return response.status_code, response.content

    async def aclose(self) -> None:
        await self.client.aclose()


async def send(client: KeepAliveClient | HttpxClient, spec: RequestSpec, index: int, t0: float) -> Record:
    """Send request `index`; never raises (failures are recorded)."""
    record = Record(started=time.perf_counter() - t0)
    try:
        status, payload = await client.post_json(spec.path, spec.body(index))
        record.status = status
        if status == 200:
            data = json.loads(payload)
            record.images = len(data.get("data") or data.get("choices") or [])
            record.timings = list(data.get("timings") or [])
            if record.images == 0:
                record.error = "200 without images"
        else:
            record.error = payload[:300].decode("utf-8", "replace")
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, httpx.HTTPError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    record.ended = time.perf_counter() - t0
    return record


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "max": None}
    arr = np.asarray(values, dtype=float)
    return {"mean": round(float(arr.mean()), 4), **{f"p{p}": round(float(np.percentile(arr, p)), 4) for p in PERCENTILES},
            "max": round(float(arr.max()), 4)}


def summarize(records: list[Record], window: tuple[float, float] | None, mode: str, level: float,
              skipped: int = 0) -> dict[str, Any]:
    """Throughput over `window` (finish times), latency over requests started in it; counts over all.

    `window` None: the whole run (first start to last end), as a fixed-count benchmark counts."""
    finished = [r for r in records if r.ok]
    if window is None:
        start = min((r.started for r in records), default=0.0)
        end = max((r.ended for r in records if not math.isnan(r.ended)), default=start)
        window = (start, end)
    w0, w1 = window
    span = max(w1 - w0, 1e-9)
    done_in_window = [r for r in finished if w0 <= r.ended <= w1]
    sampled = [r for r in finished if w0 <= r.started <= w1]
    e2e = [r.ended - r.started for r in sampled]
    parts: dict[str, list[float]] = {"ar": [], "dit": [], "queue": [], "edge": []}
    for r in sampled:
        for t in r.timings:
            ar, dit, total = t.get("ar_s", 0.0), t.get("dit_s", 0.0), t.get("total_s", 0.0)
            parts["ar"].append(ar)
            parts["dit"].append(dit)
            parts["queue"].append(max(total - ar - dit, 0.0))
            parts["edge"].append(max((r.ended - r.started) - total, 0.0))
    errors = [r for r in records if not r.ok and r.status != 429]
    return {
        "mode": mode,
        "level": level,
        "window_s": round(span, 3),
        "sent": len(records),
        "ok": len(finished),
        "images_per_s": round(sum(r.images for r in done_in_window) / span, 4),
        "requests_per_s": round(len(done_in_window) / span, 4),
        "errors": len(errors),
        "http_429": sum(1 for r in records if r.status == 429),
        "skipped_client_cap": skipped,
        "e2e_s": _percentiles(e2e),
        **{f"{name}_s": _percentiles(values) for name, values in parts.items()},
        "first_error": errors[0].error if errors else None,
    }


class LoadRunner:
    """Runs levels against one router URL with one shared HTTP client."""

    def __init__(self, url: str, spec: RequestSpec, timeout_s: float = 600.0, connections: int = 256,
                 client: str = "raw"):
        check_loopback(url)
        self.spec = spec
        self.timeout_s = timeout_s
        make = HttpxClient if client == "httpx" else KeepAliveClient
        self.client = make(url, timeout_s, connections)
        self._index = 0

    async def aclose(self) -> None:
        await self.client.aclose()

    def _next(self) -> int:
        self._index += 1
        return self._index - 1

    async def closed_loop(self, concurrency: int, duration_s: float, warmup_s: float = 0.0,
                          max_requests: int = MAX_REQUESTS) -> dict[str, Any]:
        """`concurrency` clients send back to back for `warmup_s + duration_s` (at most `max_requests`)."""
        _check_bounds(duration=duration_s + warmup_s, concurrency=concurrency, requests=max_requests)
        records: list[Record] = []
        t0 = time.perf_counter()
        stop_at = warmup_s + duration_s

        sent = 0

        async def client_loop() -> None:
            nonlocal sent
            while time.perf_counter() - t0 < stop_at and sent < max_requests:
                sent += 1
                records.append(await send(self.client, self.spec, self._next(), t0))

        await self._bounded(asyncio.gather(*(client_loop() for _ in range(concurrency))), stop_at)
        return summarize(records, (warmup_s, stop_at), "closed", concurrency)

    async def fixed_count(self, concurrency: int, num_requests: int, warmup_requests: int = 0) -> dict[str, Any]:
        """`num_requests` requests, at most `concurrency` at once, after `warmup_requests` sent one
        by one; throughput = requests / total time (as vLLM-Omni's GLM-Image benchmark reports it)."""
        _check_bounds(concurrency=concurrency, requests=num_requests + warmup_requests)
        t0 = time.perf_counter()
        for _ in range(warmup_requests):
            warm = await send(self.client, self.spec, self._next(), t0)
            if not warm.ok:
                print(f"warm-up request failed: {warm.status} {warm.error}", file=sys.stderr)
        gate = asyncio.Semaphore(concurrency)
        t0 = time.perf_counter()

        async def one() -> Record:
            async with gate:
                return await send(self.client, self.spec, self._next(), t0)

        records = await asyncio.gather(*(one() for _ in range(num_requests)))
        return summarize(list(records), None, "count", concurrency)

    async def open_loop(self, rate: float, duration_s: float, warmup_s: float = 0.0, max_in_flight: int = 1024,
                        seed: int = 0) -> dict[str, Any]:
        """Poisson arrivals at `rate`/s for `warmup_s + duration_s`; arrivals beyond `max_in_flight`
        requests in flight are skipped and counted (the client, not the server, refused them)."""
        _check_bounds(duration=duration_s + warmup_s, rate=rate, concurrency=max_in_flight,
                      requests=int(rate * (duration_s + warmup_s) * 2) + 10)
        rng = random.Random(seed)
        records: list[Record] = []
        tasks: set[asyncio.Task] = set()
        skipped = 0
        t0 = time.perf_counter()
        stop_at = warmup_s + duration_s
        next_at = rng.expovariate(rate)

        async def one() -> None:
            records.append(await send(self.client, self.spec, self._next(), t0))

        while next_at < stop_at:
            delay = next_at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= max_in_flight:
                skipped += 1
            else:
                task = asyncio.create_task(one())
                task.add_done_callback(tasks.discard)
                tasks.add(task)
            next_at += rng.expovariate(rate)
        if tasks:
            await self._bounded(asyncio.gather(*tasks), 0.0)
        return summarize(records, (warmup_s, stop_at), "open", rate, skipped)

    async def _bounded(self, awaitable, started_budget: float) -> None:
        """Await the run, plus at most one request timeout for the last requests to come back."""
        try:
            await asyncio.wait_for(awaitable, timeout=started_budget + self.timeout_s + 30)
        except asyncio.TimeoutError:
            print("warning: requests still running after the timeout were abandoned", file=sys.stderr)


def check_loopback(url: str) -> None:
    """Refuse anything but a router on this machine."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"error: {url} is not a loopback address; run bench.load on the router's machine")


def _check_bounds(duration: float = 0.0, concurrency: int = 1, rate: float = 1.0, requests: int = 1) -> None:
    if not 0 <= duration <= MAX_DURATION_S:
        raise SystemExit(f"error: a run must last 0..{MAX_DURATION_S:.0f} s")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise SystemExit(f"error: concurrency must be 1..{MAX_CONCURRENCY}")
    if not 0 < rate <= MAX_RATE:
        raise SystemExit(f"error: the rate must be in (0, {MAX_RATE:.0f}] requests/s")
    if not 1 <= requests <= MAX_REQUESTS:
        raise SystemExit(f"error: at most {MAX_REQUESTS} requests per level")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


TABLE_HEADER = ("| mode | level | images/s | req/s | ok | errors | 429 | e2e p50 | p95 | p99 | ar p50 | dit p50 "
                "| queue p50 | queue p95 | edge p50 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(s: dict[str, Any]) -> str:
    """One markdown table row of a summary (seconds)."""
    e2e = s["e2e_s"]
    return (f"| {s['mode']} | {s['level']:g} | {s['images_per_s']:.3f} | {s['requests_per_s']:.3f} | {s['ok']} | "
            f"{s['errors']} | {s['http_429']} | {_fmt(e2e['p50'], 3)} | {_fmt(e2e['p95'], 3)} | {_fmt(e2e['p99'], 3)} | "
            f"{_fmt(s['ar_s']['p50'], 3)} | {_fmt(s['dit_s']['p50'], 3)} | {_fmt(s['queue_s']['p50'], 3)} | "
            f"{_fmt(s['queue_s']['p95'], 3)} | {_fmt(s['edge_s']['p50'], 4)} |")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="router base URL, loopback only (default: %(default)s)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--concurrency", type=int, nargs="+", help="closed loop: clients per level (default: 1)")
    how.add_argument("--rate", type=float, nargs="+", help="open loop: Poisson arrivals per second, per level")
    parser.add_argument("--num-requests", type=int,
                        help="with --concurrency: send exactly this many requests per level instead of running for --duration")
    parser.add_argument("--warmup-requests", type=int, default=0, help="with --num-requests: sequential warm-up requests first")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per level (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds per level before measuring (default: %(default)s)")
    parser.add_argument("--max-in-flight", type=int, default=1024, help="open loop: the most requests in flight (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    parser.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="num_inference_steps (default: the server's)")
    parser.add_argument("--api", choices=["images", "chat"], default="images",
                        help="images: /v1/images/generations; chat: /v1/chat/completions with extra_body, "
                             "vLLM-Omni's GLM-Image benchmark format (default: %(default)s)")
    parser.add_argument("--model", help="model field to send (default: none, the server's model)")
    parser.add_argument("--seed", type=int, help="request i gets seed+i (default: no seed)")
    parser.add_argument("--prompts-file", help="JSON list (strings, or vLLM-Omni prompt.json objects) or one prompt per line; "
                                               "default: vLLM-Omni's random-dataset prompts")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw",
                        help="raw: the built-in keep-alive HTTP/1.1 client; httpx: httpx.AsyncClient, whose pool "
                             "limits the rate above ~16 clients (default: %(default)s)")
    parser.add_argument("--json", help="also write the summaries to this JSON file")
    return parser


async def run_levels(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every level of `args` in order; print a row per level as it finishes."""
    prompts = load_prompts(args.prompts_file)
    spec = RequestSpec(size=args.size, steps=args.steps, api=args.api, model=args.model, seed=args.seed,
                       prompts=tuple(prompts) if prompts else None)
    levels = args.rate or args.concurrency or [1]
    connections = int(max(levels)) if args.concurrency or not args.rate else args.max_in_flight
    runner = LoadRunner(args.url, spec, args.timeout, connections=max(connections, 1), client=args.client)
    summaries = []
    print(TABLE_HEADER, flush=True)
    try:
        for level in levels:
            if args.rate:
                summary = await runner.open_loop(level, args.duration, args.warmup, args.max_in_flight)
            elif args.num_requests:
                summary = await runner.fixed_count(int(level), args.num_requests, args.warmup_requests)
            else:
                summary = await runner.closed_loop(int(level), args.duration, args.warmup)
            summaries.append(summary)
            print(table_row(summary), flush=True)
            if summary["first_error"]:
                print(f"  first error: {summary['first_error']}", file=sys.stderr)
    finally:
        await runner.aclose()
    return summaries


def main(argv: list[str] | None = None) -> int:
    """Entry point; exits 1 when any request failed (other than 429s)."""
    args = build_parser().parse_args(argv)
    summaries = asyncio.run(run_levels(args))
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2))
    return 1 if any(s["errors"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
