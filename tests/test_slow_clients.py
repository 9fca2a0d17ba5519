"""Slow and idle clients against a real router process: of 800 connections, those that trickle a
body or their headers are answered 408 and closed, those that send nothing are closed, all within
the deadlines plus a margin, while `/health` and a real request are served promptly during the
flood; connections beyond the cap get a clear 503 without hurting the established ones; and a
client that is merely slow, but within the deadlines, is served.

The router runs without workers (its request is refused by validation, a 400, in milliseconds).
Deadlines are short here (headers 2 s, body 3 s); production defaults are 10 s and 60 s.
"""

from __future__ import annotations

import resource
import selectors
import socket
import time
from dataclasses import dataclass, field

import httpx
import pytest

from harness.local_cluster import Cluster, write_stage_config
from tests.raw_http import connect, exchange, read_response, request_head

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
LINGER_S = 2.0  # router/edge/http_limits.py: how long a refused connection is drained before it closes
MARGIN_S = 2.5  # scheduling slack on a loaded 2-core machine
BODY_TRICKLERS, HEADER_TRICKLERS, SILENT = 500, 200, 100
GEN = "/v1/images/generations"
INVALID = b'{"prompt": "a cat", "size": "1000x1000"}'  # refused by validation: a real request, no worker needed


def start_router(tmp_path_factory, name: str, **router: object) -> Cluster:
    workdir = tmp_path_factory.mktemp(name)
    settings = {"no_worker_grace_s": 0, "http_header_timeout_s": HEADER_TIMEOUT_S,
                "http_body_timeout_s": BODY_TIMEOUT_S, **router}
    config = write_stage_config(workdir, {"router": settings})
    return Cluster(model=workdir / "no-model", workdir=workdir, stage_config=config, num_ar=0, num_dit=0).start()


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    cluster = start_router(tmp_path_factory, "slow")
    yield cluster
    cluster.stop()


def ensure_open_files(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.fail(f"this test needs {wanted} open files; the hard limit is {hard} (raise `ulimit -Hn`)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@dataclass
class Slow:
    """One hostile connection and what the server did to it."""

    kind: str  # body, headers or silent
    sock: socket.socket
    received: bytes = b""
    answered_at: float | None = None  # a whole response head arrived
    closed_at: float | None = None  # EOF or reset from the server
    trickle: list[bytes] = field(default_factory=list)


def timed(call) -> tuple[float, httpx.Response]:
    start = time.monotonic()
    response = call()
    return time.monotonic() - start, response


def test_800_slow_connections_are_cut_off_while_others_are_served(router):
    ensure_open_files(BODY_TRICKLERS + HEADER_TRICKLERS + SILENT + 512)
    body_head = request_head("POST", GEN, {"Content-Type": "application/json", "Content-Length": "10000000"})
    slow: list[Slow] = []
    for kind, count in (("body", BODY_TRICKLERS), ("headers", HEADER_TRICKLERS), ("silent", SILENT)):
        for _ in range(count):
            sock = connect(router.http_port)
            if kind == "body":
                sock.sendall(body_head + b"{")
            elif kind == "headers":
                sock.sendall(b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sock.setblocking(False)
            slow.append(Slow(kind, sock))
    started = time.monotonic()  # every connection is open and has sent what it sends at once
    selector = selectors.DefaultSelector()
    for conn in slow:
        selector.register(conn.sock, selectors.EVENT_READ, conn)

    probes: list[tuple[str, float, int]] = []
    next_trickle = started
    deadline = started + BODY_TIMEOUT_S + LINGER_S + MARGIN_S + 2
    while time.monotonic() < deadline and any(c.closed_at is None for c in slow):
        now = time.monotonic()
        if now >= next_trickle:  # a byte every 0.5 s on every trickling connection still open
            next_trickle = now + 0.5
            for conn in slow:
                if conn.kind != "silent" and conn.closed_at is None and conn.answered_at is None:
                    try:
                        conn.sock.send(b"a" if conn.kind == "headers" else b" ")
                    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                        pass
        # During the flood, before and after the header deadline: others are served promptly.
        if (not probes and now - started > 1.0) or (len(probes) == 2 and now - started > HEADER_TIMEOUT_S + 0.5):
            seconds, health = timed(lambda: httpx.get(f"{router.url}/health", timeout=10))
            probes.append(("health", seconds, health.status_code))
            seconds, refused = timed(lambda: httpx.post(f"{router.url}{GEN}", content=INVALID,
                                                        headers={"content-type": "application/json"}, timeout=10))
            assert "multiples of 32" in refused.text
            probes.append(("request", seconds, refused.status_code))
        for key, _ in selector.select(timeout=0.05):
            conn = key.data
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if data:
                conn.received += data
                if conn.answered_at is None and b"\r\n\r\n" in conn.received:
                    conn.answered_at = time.monotonic() - started
            else:
                conn.closed_at = time.monotonic() - started
                selector.unregister(conn.sock)
    for conn in slow:
        conn.sock.close()

    assert [(name, status) for name, _, status in probes] == [("health", 200), ("request", 400)] * 2, probes
    assert max(seconds for _, seconds, _ in probes) < 1.0, f"served slowly during the flood: {probes}"
    still_open = [c.kind for c in slow if c.closed_at is None]
    assert not still_open, f"{len(still_open)} connections still open after {deadline - started:.0f}s: {still_open[:5]}"
    silent = [c for c in slow if c.kind == "silent"]
    # Nothing of a request came: closed quietly at the header deadline (a 408 could be mistaken
    # for the answer to a request sent next).
    assert all(c.received == b"" for c in silent)
    assert HEADER_TIMEOUT_S - 1.0 < min(c.closed_at for c in silent) < max(c.closed_at for c in silent) < HEADER_TIMEOUT_S + MARGIN_S
    for kind, limit, message in (("body", BODY_TIMEOUT_S, b"request body not received in time"),
                                 ("headers", HEADER_TIMEOUT_S, b"request headers not received in time")):
        group = [c for c in slow if c.kind == kind]
        assert all(c.received.startswith(b"HTTP/1.1 408 ") and message in c.received for c in group), \
            next(c.received[:300] for c in group if message not in c.received)
        answered = sorted(c.answered_at for c in group)
        # Not before the deadline (the clock started when the connection was made, a little before
        # `started`), and the whole group within the deadline plus the margin.
        assert answered[0] > limit - 1.0, (kind, answered[0])
        assert answered[-1] < limit + MARGIN_S, (kind, answered[-1])
        assert max(c.closed_at for c in group) < limit + LINGER_S + MARGIN_S, kind

    metrics = httpx.get(f"{router.url}/metrics", timeout=10).text
    assert metric(metrics, 'glm_router_http_connections_closed_total{reason="body_timeout"}') >= BODY_TRICKLERS
    assert metric(metrics, 'glm_router_http_connections_closed_total{reason="header_timeout"}') >= HEADER_TRICKLERS + SILENT
    assert metric(metrics, "glm_router_http_connections_open") <= 3  # all released: this scrape, maybe a probe


def metric(text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_slow_client_within_the_deadlines_is_served(router):
    """Headers in pieces over 1 s, the body in pieces over 1.5 s: within both deadlines, so served."""
    head = request_head("POST", GEN, {"Content-Type": "application/json", "Content-Length": str(len(INVALID))})
    with connect(router.http_port) as sock:
        for piece in (head[:20], head[20:], INVALID[:10], INVALID[10:25], INVALID[25:]):
            sock.sendall(piece)
            time.sleep(0.5)  # the client's pace, not synchronisation: the server must wait for it
        response = read_response(sock)
    assert response.status == 400 and "multiples of 32" in response.error()["message"]


def test_keep_alive_connection_trickling_its_next_request_gets_408(router):
    with connect(router.http_port) as sock:
        sock.sendall(request_head("GET", "/health"))
        assert read_response(sock).status == 200
        sock.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")  # then nothing: the next request never completes
        started = time.monotonic()
        response = read_response(sock)
        assert response.status == 408 and "request headers not received in time" in response.error()["message"]
        assert HEADER_TIMEOUT_S - 0.5 < time.monotonic() - started < HEADER_TIMEOUT_S + MARGIN_S


def test_connections_beyond_the_cap_get_503_and_established_ones_are_served(tmp_path_factory):
    cap = 40
    capped = start_router(tmp_path_factory, "capped", http_max_connections=cap, http_header_timeout_s=20)
    try:
        held = [connect(capped.http_port) for _ in range(cap)]
        # The last one answered means the server has accepted (and counted) all of them.
        held[-1].sendall(request_head("GET", "/health"))
        assert read_response(held[-1]).status == 200

        refused = exchange(capped.http_port, request_head("GET", "/v1/models"), check_closed=5)
        assert refused.status == 503 and refused.headers["retry-after"] == "1"
        assert f"too many open connections (at most {cap})" in refused.error()["message"]
        assert refused.closed
        # A liveness probe is answered even over the cap.
        assert exchange(capped.http_port, request_head("GET", "/health")).status == 200
        # Connections opened before the flood are not affected.
        held[0].sendall(request_head("GET", "/v1/models"))
        assert read_response(held[0]).status == 200
        held[1].sendall(request_head("GET", "/metrics"))
        metrics = read_response(held[1]).body.decode()
        assert metric(metrics, 'glm_router_http_connections_closed_total{reason="over_capacity"}') == 1

        for sock in held:
            sock.close()
        deadline = time.monotonic() + 10
        while exchange(capped.http_port, request_head("GET", "/v1/models")).status != 200:
            assert time.monotonic() < deadline, "still refused after the held connections closed"
            time.sleep(0.1)  # polling the server until it has seen the closes
    finally:
        capped.stop()
