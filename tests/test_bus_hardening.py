"""Bus hardening: hostile peers on the router's ZeroMQ socket cannot take it down.

A fake "worker" (a raw zmq DEALER, no code of ours) sends garbage, wrong
protocol versions, oversized frames, forged registrations and bogus results;
the router logs and drops each, keeps its real workers, and keeps serving.
The codec's limits are also checked directly on hand-made frames.
"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
import zmq

from common.protocol import (
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    ARResult,
    DiTResult,
    Goodbye,
    Heartbeat,
    JobError,
    JobResult,
    ProtocolError,
    RegistrationRefused,
    RouterPing,
    Stage,
    WorkerInfo,
    decode,
    encode,
)
from common.stage_config import load_stage_config
from harness.local_cluster import Cluster, generate, write_stage_config
from tests.helpers import BAD_VERSION, GARBAGE, cluster_with, header, metric, response_image

MAX_MESSAGE_BYTES = 1 << 20


def heartbeat(worker_id: str, stage: str = "ar", fingerprint: str = "unknown") -> Heartbeat:
    return Heartbeat(info=WorkerInfo(worker_id=worker_id, stage=Stage(stage), model="fake", capacity=1, pid=1, host="fake",
                                     config_fingerprint=fingerprint))


class TestCodecLimits:
    """decode() on hand-made frames: every bad input is a ProtocolError, never another exception.
    (The table of garbage frames, `tests.helpers.GARBAGE`, is decoded in test_protocol.py.)"""

    def test_oversized_header_is_refused_before_parsing(self):
        with pytest.raises(ProtocolError, match="exceeds"):
            decode([b"\xc0" * (MAX_HEADER_BYTES + 1)])

    def test_valid_messages_round_trip(self):
        result = JobResult(job_id="j", worker_id="w", payload=ARResult(
            prior_token_ids=np.arange(12, dtype=np.int64).reshape(3, 4), height=96, width=128))
        back = decode([bytes(f) for f in encode(result)])
        assert isinstance(back, JobResult) and back.payload.prior_token_ids.tolist() == np.arange(12).reshape(3, 4).tolist()
        assert isinstance(decode([bytes(f) for f in encode(heartbeat("w"))]), Heartbeat)


# ---------------------------------------------------------------------------
# Against a running router


@pytest.fixture(scope="module")
def hardened(tiny_model, tmp_path_factory):
    with cluster_with(tiny_model, tmp_path_factory, "bus", {"bus": {"max_message_bytes": MAX_MESSAGE_BYTES}}) as c:
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


def fingerprint(cluster: Cluster) -> str:
    """The stage-config fingerprint the cluster's router accepts."""
    return load_stage_config(cluster.stage_config).fingerprint()


def router_is_healthy(cluster: Cluster) -> None:
    assert cluster.procs["router"].alive(), cluster.logs_tail()
    log = cluster.procs["router"].log()
    assert "undecodable message" not in log and "error handling" not in log, log[-3000:]
    assert cluster.live_workers() == {"ar": 1, "dit": 1}


def test_garbage_from_a_fake_worker_is_dropped(hardened):
    start = len(hardened.procs["router"].log())
    sendable = [g.frames for g in GARBAGE if g.frames]  # ZeroMQ has no message of no frames
    fake = FakeWorker(hardened.bus_address, b"fake-1")
    try:
        for frames in sendable:
            fake.send(frames)
        # Forgeries: someone else's registration and deregistration, and replies to jobs nobody sent.
        fake.send(encode(heartbeat("ar-0", stage="dit", fingerprint=fingerprint(hardened))))
        fake.send(encode(Goodbye(worker_id="dit-0")))
        fake.send(encode(JobResult(job_id="no-such-job", worker_id="fake-1",
                                   payload=DiTResult(image=b"not a png", output_format="png", height=256, width=256))))
        fake.send(encode(JobError(job_id="no-such-job", worker_id="ar-0", code="internal", message="bogus")))
        fake.send(encode(RouterPing()))
        # A valid heartbeat afterwards still gets through: the receive loop is alive.
        fake.send(encode(heartbeat("fake-1", fingerprint=fingerprint(hardened))))
        fake.expect_ping()
        hardened.wait_for_workers(2, 1, timeout=10)
        fake.send(encode(Goodbye(worker_id="fake-1")))
        hardened.wait_for_log("router", r"worker fake-1 deregistered", timeout=10, start=start)
        hardened.wait_for_workers(1, 1, timeout=10, exact=True)
    finally:
        fake.close()
    log = hardened.procs["router"].log()[start:]
    assert log.count("dropping malformed message") >= len(sendable), log[-4000:]
    assert f"protocol version {BAD_VERSION} is not {PROTOCOL_VERSION}" in log
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
        probe.send(encode(heartbeat("fake-2", fingerprint=fingerprint(hardened))))
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
    client = threading.Thread(target=lambda: box.update(r=generate(hardened.url, seed=5, headers={"X-Request-Id": rid})))
    client.start()
    fake = FakeWorker(hardened.bus_address, b"fake-3")
    try:
        # The router logs its own request id next to the client's X-Request-Id.
        request_id = hardened.wait_for_log("router", rf"\[([0-9a-f]+) client={rid}\]", timeout=30, start=start).group(1)
        ar_job = f"{request_id}.0.ar.0"
        forged = ARResult(prior_token_ids=np.zeros((8, 8), dtype=np.int64), height=256, width=256)
        for worker_id in ("ar-0", "fake-3"):  # spoofing the real worker's id, and under its own
            fake.send(encode(JobResult(job_id=ar_job, worker_id=worker_id, payload=forged)))
            fake.send(encode(JobError(job_id=ar_job, worker_id=worker_id, code="bad_request", message="forged")))
        client.join(timeout=180)
    finally:
        fake.close()
    assert not client.is_alive(), "request hung"
    response = box["r"]
    assert response.status_code == 200, response.text
    assert response_image(response).size == (256, 256)
    log = hardened.procs["router"].log()[start:]
    assert log.count(f"dropping late or duplicate reply for job {ar_job}") == 4, log[-3000:]
    router_is_healthy(hardened)



def test_a_second_connection_under_a_live_workers_id_is_refused(hardened):
    """Someone with an allowed key claims the live ar-0's id: the router keeps the live worker
    (no restart, no flapping) and requests still go through it."""
    start = len(hardened.procs["router"].log())
    thief = FakeWorker(hardened.bus_address, b"ar-0")
    try:
        for _ in range(3):
            thief.send(encode(heartbeat("ar-0", fingerprint=fingerprint(hardened))))
        with pytest.raises(TimeoutError):
            thief.expect_ping(timeout=3)  # the router never took the connection
        response = generate(hardened.url, seed=11)
        assert response.status_code == 200, response.text
    finally:
        thief.close()
    log = hardened.procs["router"].log()[start:]
    assert "worker ar-0 restarted" not in log and "worker ar-0 registered" not in log, log[-3000:]
    router_is_healthy(hardened)


def test_a_worker_with_another_stage_config_is_refused(hardened):
    """Config drift: a worker whose stage config differs is told why, never registered, and counted."""
    start = len(hardened.procs["router"].log())
    fake = FakeWorker(hardened.bus_address, b"fake-drift")
    try:
        fake.send(encode(heartbeat("fake-drift", fingerprint="0123456789abcdef")))
        deadline = time.monotonic() + 10
        refusal = None
        while refusal is None and time.monotonic() < deadline:
            if fake.sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
                message = decode(fake.sock.recv_multipart())
                assert not isinstance(message, RouterPing), "a refused worker must not be pinged as registered"
                if isinstance(message, RegistrationRefused):
                    refusal = message
        assert refusal is not None, "no RegistrationRefused"
        assert "0123456789abcdef" in refusal.reason and fingerprint(hardened) in refusal.reason
        hardened.wait_for_log("router", r"refusing ar worker fake-drift", timeout=10, start=start)
        assert hardened.live_workers() == {"ar": 1, "dit": 1}
    finally:
        fake.close()
    assert metric(hardened, 'glm_router_workers_refused_total{reason="config_mismatch"}') == 1
    router_is_healthy(hardened)


def test_a_real_worker_started_with_another_stage_config_exits_with_the_reason(hardened, tmp_path):
    drifted = write_stage_config(tmp_path, {"stage_args": [{"default_sampling_params": {"top_k": 16}}]})
    proc = hardened.start_worker("ar", "ar-drifted", extra=["--stage-config", str(drifted)])
    assert proc.popen.wait(timeout=120) != 0
    assert "the router refused this worker" in proc.log() and "--stage-config" in proc.log()
    assert hardened.live_workers() == {"ar": 1, "dit": 1}


@pytest.mark.parametrize("address,local", [
    ("tcp://127.0.0.1:5570", True), ("tcp://[::1]:5570", True), ("tcp://localhost:5570", True),
    ("ipc:///tmp/bus", True), ("tcp://*:5570", False), ("tcp://0.0.0.0:5570", False), ("tcp://198.18.0.2:5570", False),
])
def test_a_bus_reachable_from_other_machines_is_flagged(address, local):
    """The router warns at start when its unauthenticated bus listens beyond this machine."""
    from router.core.bus import is_local_bind

    assert is_local_bind(address) is local
