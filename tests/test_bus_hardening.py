"""Bus hardening: hostile peers on the router's ZeroMQ socket cannot take it down.

A fake "worker" (a raw zmq DEALER, no code of ours) sends garbage, wrong
protocol versions, oversized frames, forged registrations and bogus results;
the router logs and drops each, keeps its real workers, and keeps serving.
The codec's limits are also checked directly on hand-made frames.
"""

from __future__ import annotations

import io
import threading
import time
import uuid

import msgpack
import numpy as np
import pytest
import zmq
from PIL import Image

from common.protocol import (
    PROTOCOL_VERSION,
    ARResult,
    DiTResult,
    Goodbye,
    Heartbeat,
    JobError,
    JobResult,
    ProtocolError,
    RouterPing,
    Stage,
    WorkerInfo,
    decode,
    encode,
)
from tests.cluster import Cluster, image_bytes, write_stage_config

MAX_MESSAGE_BYTES = 1 << 20


def header(body, version=PROTOCOL_VERSION) -> bytes:
    return msgpack.packb({"v": version, "body": body}, use_bin_type=True)


def heartbeat(worker_id: str, stage: str = "ar", **info) -> Heartbeat:
    return Heartbeat(info=WorkerInfo(worker_id=worker_id, stage=Stage(stage), model="fake", capacity=1, pid=1, host="fake", **info))


# Each entry: (what it is, frames). None of them is a valid message.
GARBAGE: list[tuple[str, list[bytes]]] = [
    ("random bytes", [b"\x93\xff\x00garbage\xc1\xc1"]),
    ("empty frame", [b""]),
    ("msgpack list, not a map", [msgpack.packb([1, 2, 3])]),
    ("map without version", [msgpack.packb({"body": {}})]),
    ("wrong protocol version", [header(heartbeat("fake-v").model_dump(mode="json"), version=PROTOCOL_VERSION + 41)]),
    ("version of the wrong type", [header({}, version=[1])]),
    ("unknown message type", [header({"type": "launch_missiles", "target": "router"})]),
    ("msgpack extension type", [msgpack.packb({"v": 1, "body": msgpack.ExtType(42, b"boom")})]),
    ("bytes inside the header", [msgpack.packb({"v": 1, "body": {"type": "goodbye", "worker_id": b"x" * 10}}, use_bin_type=True)]),
    ("pickle-looking payload", [b"\x80\x04\x95cos\nsystem\n(S'echo pwned'\ntR."]),
    ("unhashable dtype", [header({"type": "result", "x": {"__frame__": 1, "dtype": [1]}}), b"x"]),
    ("dtype object", [header({"type": "result", "x": {"__frame__": 1, "dtype": "object", "shape": [1]}}), b"x" * 8]),
    ("frame index out of range", [header({"type": "goodbye", "worker_id": {"__frame__": 7}})]),
    ("array frame of the wrong size", [header({"type": "result", "x": {"__frame__": 1, "dtype": "int64", "shape": [1000, 1000]}}), b"x" * 8]),
    ("absurd array shape", [header({"type": "result", "x": {"__frame__": 1, "dtype": "int64", "shape": [2**62, 2**62]}}), b"x"]),
    ("too many frames", [header({"type": "goodbye", "worker_id": "x"})] + [b"f"] * 100),
    ("deeply nested lists", [b"\x82\xa1v\x01\xa4body" + b"\x91" * 5000 + b"\xc0"]),
    ("deeply nested maps", [b"\x82\xa1v\x01\xa4body" + b"\x81\xa1a" * 3000 + b"\xc0"]),
    ("heartbeat missing fields", [header({"type": "heartbeat", "info": {"worker_id": "fake"}})]),
    ("heartbeat with capacity 0", [header({"type": "heartbeat", "info": {"worker_id": "fake-1", "stage": "ar", "model": "m",
                                                                         "capacity": 0, "pid": 1, "host": "h"}})]),
    ("heartbeat with an unknown stage", [header({"type": "heartbeat", "info": {"worker_id": "fake-1", "stage": "vae", "model": "m",
                                                                               "capacity": 1, "pid": 1, "host": "h"}})]),
    ("extra field", [header({"type": "goodbye", "worker_id": "fake-1", "rm_rf": True})]),
]


class TestCodecLimits:
    """decode() on hand-made frames: every bad input is a ProtocolError, never another exception."""

    @pytest.mark.parametrize("what,frames", GARBAGE, ids=[g[0] for g in GARBAGE])
    def test_garbage_is_a_protocol_error(self, what, frames):
        with pytest.raises(ProtocolError):
            decode(frames)

    def test_oversized_header_is_refused_before_parsing(self):
        with pytest.raises(ProtocolError, match="exceeds"):
            decode([b"\xc0" * ((1 << 20) + 1)])

    def test_valid_messages_round_trip(self):
        result = JobResult(job_id="j", worker_id="w", payload=ARResult(
            prior_token_ids=np.arange(12, dtype=np.int64).reshape(3, 4), target_h=96, target_w=128, num_generated_tokens=13))
        back = decode([bytes(f) for f in encode(result)])
        assert isinstance(back, JobResult) and back.payload.prior_token_ids.tolist() == np.arange(12).reshape(3, 4).tolist()
        assert isinstance(decode([bytes(f) for f in encode(heartbeat("w"))]), Heartbeat)


# ---------------------------------------------------------------------------
# Against a running router


@pytest.fixture(scope="module")
def hardened(tiny_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bus")
    config = write_stage_config(workdir, {"bus": {"max_message_bytes": MAX_MESSAGE_BYTES}})
    with Cluster(model=tiny_model, workdir=workdir, stage_config=config) as c:
        yield c


class FakeWorker:
    """A raw DEALER on the router's bus: whatever it sends is up to the test."""

    def __init__(self, address: str, identity: bytes):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, frames) -> None:
        self.sock.send_multipart([bytes(f) for f in frames])

    def expect_ping(self, timeout: float = 10.0) -> RouterPing:
        """The next RouterPing the router sends us (proof that it read our heartbeat)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
                message = decode(self.sock.recv_multipart())
                if isinstance(message, RouterPing):
                    return message
        raise TimeoutError("the router never pinged the fake worker")

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def router_is_healthy(cluster: Cluster) -> None:
    assert cluster.procs["router"].alive(), cluster.logs_tail()
    log = cluster.procs["router"].log()
    assert "undecodable message" not in log and "error handling" not in log, log[-3000:]
    assert cluster.live_workers() == {"ar": 1, "dit": 1}


def test_garbage_from_a_fake_worker_is_dropped(hardened):
    start = len(hardened.procs["router"].log())
    fake = FakeWorker(hardened.bus_address, b"fake-1")
    try:
        for _, frames in GARBAGE:
            fake.send(frames)
        # Forgeries: someone else's registration and deregistration, and replies to jobs nobody sent.
        fake.send(encode(heartbeat("ar-0", stage="dit")))
        fake.send(encode(Goodbye(worker_id="dit-0")))
        fake.send(encode(JobResult(job_id="no-such-job", worker_id="fake-1",
                                   payload=DiTResult(image=b"not a png", output_format="png", height=256, width=256))))
        fake.send(encode(JobError(job_id="no-such-job", worker_id="ar-0", code="internal", message="bogus")))
        fake.send(encode(RouterPing(router_id="i am a router")))
        # A valid heartbeat afterwards still gets through: the receive loop is alive.
        fake.send(encode(heartbeat("fake-1")))
        fake.expect_ping()
        hardened.wait_for_workers(2, 1, timeout=10)
        fake.send(encode(Goodbye(worker_id="fake-1")))
        hardened.wait_for_log("router", r"worker fake-1 deregistered", timeout=10, start=start)
        hardened.wait_for_workers(1, 1, timeout=10, exact=True)
    finally:
        fake.close()
    log = hardened.procs["router"].log()[start:]
    assert log.count("dropping malformed message") >= len(GARBAGE), log[-4000:]
    assert "protocol version 42 is not 1" in log
    assert "heartbeat for ar-0 from identity b'fake-1' dropped" in log
    assert "dropping late or duplicate reply for job no-such-job" in log
    assert "dropping unexpected RouterPing" in log
    router_is_healthy(hardened)


def test_oversized_frame_disconnects_only_that_peer(hardened):
    fake = FakeWorker(hardened.bus_address, b"fake-huge")
    try:
        fake.send([b"\x00" * (2 * MAX_MESSAGE_BYTES)])
        fake.send([header({"type": "goodbye", "worker_id": "x" * (MAX_MESSAGE_BYTES + 10)})])
    finally:
        fake.close()
    # A fresh peer is still served, and the real workers were not touched.
    probe = FakeWorker(hardened.bus_address, b"fake-2")
    try:
        probe.send(encode(heartbeat("fake-2")))
        probe.expect_ping()
        probe.send(encode(Goodbye(worker_id="fake-2")))
        hardened.wait_for_workers(1, 1, timeout=10, exact=True)
    finally:
        probe.close()
    router_is_healthy(hardened)


def test_forged_results_for_an_in_flight_job_are_dropped(hardened):
    """Bogus replies for a real job, sent while it runs, from an impostor: the real result wins."""
    rid = f"forge-{uuid.uuid4().hex[:6]}"
    start = len(hardened.procs["router"].log())
    box: dict = {}
    client = threading.Thread(target=lambda: box.update(r=_generate_with_id(hardened.url, rid)))
    client.start()
    fake = FakeWorker(hardened.bus_address, b"fake-3")
    try:
        job = hardened.wait_for_log("router", rf"job=({rid}-[0-9a-f]+)", timeout=30, start=start).group(1)
        ar_job = f"{job}.0.ar.0"
        forged = ARResult(prior_token_ids=np.zeros((8, 8), dtype=np.int64), target_h=256, target_w=256, num_generated_tokens=1)
        for worker_id in ("ar-0", "fake-3"):  # spoofing the real worker's id, and under its own
            fake.send(encode(JobResult(job_id=ar_job, worker_id=worker_id, payload=forged)))
            fake.send(encode(JobError(job_id=ar_job, worker_id=worker_id, code="bad_request", message="forged")))
        client.join(timeout=180)
    finally:
        fake.close()
    assert not client.is_alive(), "request hung"
    response = box["r"]
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(image_bytes(response)[0]))
    assert image.size == (256, 256)
    log = hardened.procs["router"].log()[start:]
    assert log.count(f"dropping late or duplicate reply for job {ar_job}") == 4, log[-3000:]
    router_is_healthy(hardened)


def _generate_with_id(url: str, request_id: str):
    import httpx

    body = {"prompt": "a red cube", "size": "256x256", "num_inference_steps": 1, "seed": 5}
    return httpx.post(f"{url}/v1/images/generations", json=body, headers={"X-Request-Id": request_id}, timeout=180)
