"""What an eavesdropper on the network between the router and its workers sees.

Router and workers run on two hosts (network namespaces on a bridge); tcpdump on the workers' host
records the bus. One request with a known prompt goes through, once with the plaintext bus and once
with CURVE: the prompt and the PNG signature of the result must show up on the wire in the first run
and in neither direction of the second, while the images come out identical.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.local_cluster import ROOT, write_stage_config
from tests.netns_lab import NetworkLab, wait_until
from tests.pcap_streams import all_connections_closed, tcp_streams

PROMPT = "a quilted teapot, canary 7f3a1c9e"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BUS_PORT = 5570
HTTP_PORT = 8000


def _serve(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "launch.cli", *argv]


def _one_request_on_the_wire(tmp: Path, model: Path, keys: Path | None) -> tuple[bytes, bytes]:
    """(every bus byte both ways, the image) for one request across two hosts."""
    tmp.mkdir()
    config = write_stage_config(tmp)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "GLM_SERVE_LOG_LEVEL": "INFO"}
    router_keys = worker_keys = []
    if keys is not None:
        router_keys = ["--curve-secret-key", str(keys / "router.key_secret"), "--curve-allow-dir", str(keys / "allowed_workers")]
    pcap = tmp / "bus.pcap"
    with NetworkLab(tag=f"enc{os.getpid() % 10000}{'c' if keys else 'p'}") as lab:
        router_host, worker_host = lab.add_host("router-0"), lab.add_host("workers-0")
        lab.set_name("glm-router-bus", [router_host.ip])
        tcpdump_log = tmp / "tcpdump.log"
        # -Z root: tcpdump would otherwise drop to its own user and fail to write into our temp folder.
        # --immediate-mode and a large buffer: a loaded machine must not leave packets unread in the kernel.
        tcpdump = worker_host.popen(["tcpdump", "-i", "eth0", "-U", "--immediate-mode", "-B", "16384", "-Z", "root",
                                     "-w", str(pcap), f"tcp port {BUS_PORT}"],
                                    env=env, log_path=tcpdump_log)
        wait_until(lambda: "listening on" in tcpdump_log.read_text(errors="replace") or tcpdump.poll() is not None,
                   30, "tcpdump to start")
        assert tcpdump.poll() is None, tcpdump_log.read_text()
        router_host.popen(_serve(["router", "--stage-config", str(config), "--host", "0.0.0.0", "--port", str(HTTP_PORT),
                                  "--bus-bind", f"tcp://0.0.0.0:{BUS_PORT}", *router_keys]),
                          env=env, log_path=tmp / "router.log")
        for stage in ("ar", "dit"):
            if keys is not None:
                worker_keys = ["--curve-router-key", str(keys / "router.key"),
                               "--curve-secret-key", str(keys / "workers" / f"{stage}.key_secret")]
            worker_host.popen(_serve([f"{stage}-worker", "--stage-config", str(config), "--model", str(model),
                                      "--device", "cpu", "--router", f"tcp://glm-router-bus:{BUS_PORT}",
                                      "--worker-id", f"{stage}-0", *worker_keys]),
                              env=env, log_path=tmp / f"{stage}.log")
        router = f"http://127.0.0.1:{HTTP_PORT}"
        wait_until(lambda: router_host.http("GET", f"{router}/ready").status == 200, 180,
                   f"both stages to register ({tmp})")
        reply = router_host.http("POST", f"{router}/v1/images/generations",
                                 json_body={"prompt": PROMPT, "size": "256x256", "seed": 11, "num_inference_steps": 1})
        assert reply.status == 200, reply.body[:500]
        image = base64.b64decode(reply.json()["data"][0]["b64_json"])
        for proc in reversed(worker_host.processes[1:] + router_host.processes):
            proc.send_signal(signal.SIGTERM)
        for proc in worker_host.processes[1:] + router_host.processes:
            proc.wait(timeout=60)
        # tcpdump may lag behind the wire on a busy machine, and stops reading when signalled: wait until
        # it has written the last packets that crossed (every connection's close) before stopping it.
        wait_until(lambda: pcap.exists() and all_connections_closed(pcap), 60, f"tcpdump to write every connection's close ({tcpdump_log})")
        tcpdump.send_signal(signal.SIGINT)  # flushes and closes the capture
        tcpdump.wait(timeout=30)
    streams = tcp_streams(pcap)
    assert streams, "tcpdump captured no bus traffic"
    return b"".join(streams.values()), image


@pytest.fixture(scope="module")
def wire(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("wire")
    keys = root / "keys"
    subprocess.run(_serve(["keygen", "--out", str(keys)]), check=True, capture_output=True, cwd=ROOT)
    return {
        "plain": _one_request_on_the_wire(root / "plain", tiny_model, None),
        "curve": _one_request_on_the_wire(root / "curve", tiny_model, keys),
    }


def test_plaintext_bus_shows_prompt_and_image(wire):
    captured, image = wire["plain"]
    assert image.startswith(PNG_SIGNATURE)
    assert PROMPT.encode() in captured
    assert PNG_SIGNATURE in captured
    assert image in captured  # the whole result, readable by anyone on the path


def test_curve_bus_hides_prompt_and_image(wire):
    captured, image = wire["curve"]
    # Enough was captured to have held them: the encrypted job and result crossed this link.
    assert len(captured) > len(image)
    assert PROMPT.encode() not in captured
    assert PNG_SIGNATURE not in captured
    assert PROMPT.encode()[:12] not in captured


def test_curve_changes_nothing_but_the_wire(wire):
    assert wire["curve"][1] == wire["plain"][1]
