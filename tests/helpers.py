"""Helpers shared by the tests: images to upload and to check, hostile bus frames, HTTP probes.

The local cluster itself (and the `generate`/`image_bytes` client helpers) lives in
`harness.local_cluster`; this module holds what only tests need.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import msgpack
import pytest
from PIL import Image

from common.protocol import PROTOCOL_VERSION
from harness.local_cluster import Cluster, image_bytes, write_stage_config

# ---------------------------------------------------------------------------
# Running clusters


@contextmanager
def cluster_with(model: Path, tmp_path_factory: pytest.TempPathFactory, name: str, overrides: dict | None = None,
                 **kwargs) -> Iterator[Cluster]:
    """A started cluster on the tiny stage config with `overrides`, in a fresh temp folder `name`."""
    workdir = tmp_path_factory.mktemp(name)
    config = write_stage_config(workdir, overrides)
    with Cluster(model=model, workdir=workdir, stage_config=config, **kwargs) as cluster:
        yield cluster


def metrics_text(cluster: Cluster) -> str:
    return httpx.get(f"{cluster.url}/metrics", timeout=5).text


def metric(cluster: Cluster, name: str) -> float:
    """The sum of the samples of the router's metric lines that start with `name`."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text(cluster).splitlines() if line.startswith(name))


def assert_router_unhurt(cluster: Cluster) -> None:
    """The router still runs and answers /health, and never answered 500 or logged an unhandled error."""
    assert cluster.procs["router"].alive(), cluster.logs_tail()
    assert httpx.get(f"{cluster.url}/health", timeout=5).status_code == 200
    assert 'status="500"' not in metrics_text(cluster)
    assert "unhandled error" not in cluster.procs["router"].log()


# ---------------------------------------------------------------------------
# Images to send


def png(width: int = 64, height: int = 64, mode: str = "RGB", color: object = (200, 30, 30)) -> bytes:
    """A PNG of one colour."""
    out = io.BytesIO()
    Image.new(mode, (width, height), color).save(out, format="PNG")
    return out.getvalue()


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of random pixels: every pixel matters, it does not compress (~3 bytes per pixel),
    and truncating the file cuts pixel data."""
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3)).save(out, format="PNG")
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height: a decompression bomb's header, cheaply."""
    data = png(1, 1)
    ihdr_start = 8 + 8  # after the signature, the IHDR chunk's length and type; its 13 bytes of data, then a CRC
    ihdr = bytearray(data[ihdr_start:ihdr_start + 13])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return data[:ihdr_start] + bytes(ihdr) + crc + data[ihdr_start + 13 + 4:]


def data_url(raw: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(raw).decode()}"


def chat(content: object, **extra: object) -> dict:
    """A /v1/chat/completions body with one user message."""
    return {"messages": [{"role": "user", "content": content}], **extra}


def image_part(url: str) -> dict:
    """An image_url content part of a chat message."""
    return {"type": "image_url", "image_url": {"url": url}}


# ---------------------------------------------------------------------------
# Images received


def open_image(raw: bytes) -> Image.Image:
    """Decode image bytes fully (a truncated or corrupt file fails here, not later)."""
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def b64_image(text: str) -> Image.Image:
    """Decode a base64 image, as in `b64_json` or after the comma of a data URL."""
    return open_image(base64.b64decode(text))


def response_image(response: httpx.Response, index: int = 0) -> Image.Image:
    """Image `index` of a 200 images response, decoded."""
    return open_image(image_bytes(response)[index])


# ---------------------------------------------------------------------------
# Hostile bus frames

BAD_VERSION = PROTOCOL_VERSION + 41


def header(body, version: object = PROTOCOL_VERSION) -> bytes:
    """A message header frame around `body`, as the codec writes it."""
    return msgpack.packb({"v": version, "body": body}, use_bin_type=True)


# The start of a {v, body} map, up to where the body's value goes.
_V_AND_BODY = b"\x82\xa1v" + msgpack.packb(PROTOCOL_VERSION) + b"\xa4body"


@dataclass(frozen=True)
class Garbage:
    """Frames that are no valid message, and a regex of the ProtocolError decoding them must raise."""

    what: str
    frames: list[bytes]
    why: str


# Each entry is invalid for one reason, named by `why`; everything else is right (the current
# protocol version, real message types) so that the entry fails where it means to.
GARBAGE: list[Garbage] = [
    Garbage("no frames", [], "frames, got 0"),
    Garbage("random bytes", [b"\x93\xff\x00garbage\xc1\xc1"], "undecodable header"),
    Garbage("reserved msgpack byte", [b"\xc1garbage"], "undecodable header"),
    Garbage("empty frame", [b""], "undecodable header"),
    Garbage("msgpack list, not a map", [msgpack.packb([1, 2, 3])], "not a {v, body} map"),
    Garbage("map without version", [msgpack.packb({"body": {}})], "not a {v, body} map"),
    Garbage("wrong protocol version", [header({"type": "heartbeat"}, version=BAD_VERSION)], "protocol version"),
    Garbage("version of the wrong type", [header({}, version=[PROTOCOL_VERSION])], "protocol version"),
    Garbage("unknown message type", [header({"type": "launch_missiles", "target": "router"})], "invalid message"),
    Garbage("msgpack extension type", [msgpack.packb({"v": PROTOCOL_VERSION, "body": msgpack.ExtType(42, b"boom")})],
            "extension type 42 is not allowed"),
    Garbage("bytes inside the header",
            [msgpack.packb({"v": PROTOCOL_VERSION, "body": {"type": "goodbye", "worker_id": b"x" * 10}}, use_bin_type=True)],
            "undecodable header"),
    Garbage("pickle-looking payload", [b"\x80\x04\x95cos\nsystem\n(S'echo pwned'\ntR."], "undecodable header"),
    Garbage("unhashable dtype", [header({"type": "result", "x": {"__frame__": 1, "dtype": [1]}}), b"x"], "not allowed"),
    Garbage("dtype object", [header({"type": "result", "x": {"__frame__": 1, "dtype": "object", "shape": [1]}}), b"x" * 8],
            "not allowed"),
    Garbage("frame index out of range", [header({"type": "goodbye", "worker_id": {"__frame__": 7}})], "out of range"),
    Garbage("frame index out of range in a job",
            [header({"type": "job", "job_id": "j", "request_id": "r", "deadline_s": 1,
                     "payload": {"stage": "dit", "prior_token_ids": {"__frame__": 5, "dtype": "int64", "shape": [1]}}})],
            "out of range"),
    Garbage("array frame of the wrong size",
            [header({"type": "result", "x": {"__frame__": 1, "dtype": "int64", "shape": [1000, 1000]}}), b"x" * 8],
            "needs 8000000"),
    Garbage("absurd array shape",
            [header({"type": "result", "x": {"__frame__": 1, "dtype": "int64", "shape": [2**62, 2**62]}}), b"x"], "array"),
    Garbage("too many frames", [header({"type": "goodbye", "worker_id": "x"})] + [b"f"] * 100, "frames, got 101"),
    Garbage("deeply nested lists", [_V_AND_BODY + b"\x91" * 5000 + b"\xc0"],
            "undecodable header"),
    Garbage("deeply nested maps", [_V_AND_BODY + b"\x81\xa1a" * 3000 + b"\xc0"],
            "undecodable header"),
    Garbage("heartbeat missing fields", [header({"type": "heartbeat", "info": {"worker_id": "fake"}})], "invalid message"),
    Garbage("heartbeat with capacity 0",
            [header({"type": "heartbeat", "info": {"worker_id": "fake-1", "stage": "ar", "model": "m", "capacity": 0, "pid": 1, "host": "h"}})],
            "invalid message"),
    Garbage("heartbeat with an unknown stage",
            [header({"type": "heartbeat", "info": {"worker_id": "fake-1", "stage": "vae", "model": "m", "capacity": 1, "pid": 1, "host": "h"}})],
            "invalid message"),
    Garbage("extra field", [header({"type": "goodbye", "worker_id": "fake-1", "rm_rf": True})], "invalid message"),
]


def write_peft_folder(folder: Path, weights: dict, **config) -> None:
    """`weights` (diffusers' keys) as PEFT's save_pretrained writes them, with PEFT's own config file."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({k.replace("transformer.", "base_model.model.", 1): v for k, v in weights.items()},
              str(folder / "adapter_model.safetensors"))
    modules = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in weights})
    LoraConfig(target_modules=modules, **config).save_pretrained(str(folder))
