"""Typed, versioned messages between the router and the stage workers.

On the wire a message is a multipart ZeroMQ message: frame 0 is a msgpack map
(the header), the following frames are raw buffers. Every numpy array and every
`bytes` value in a message travels as its own frame (zero-copy on send), and the
header holds a small marker `{"__frame__": i, "dtype": ..., "shape": ...}` in
its place. Decoding is bounded and constructs nothing but plain containers,
whitelisted numpy dtypes and the pydantic models below, which validate every
field: a peer that sends garbage gets a `ProtocolError`, never a crash.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Annotated, Any, Literal, Union

import msgpack
import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from common.image_formats import OutputFormat
from common.sizes import ImageSize

# 2: sizes named height/width everywhere, worker config fingerprints, RegistrationRefused.
# 3: WorkerInfo.metrics_address. Models forbid unknown fields, so a v2 router would reject every
#    v3 heartbeat as "invalid message"; the bump makes the mismatch a clear version error instead.
# 4: Heartbeat.running_elsewhere/free_slots/job_seconds, SlotOffer and OfferDeclined (slots shared by several routers).
# 5: DiTJob.loras (LoRA adapters and scales), Heartbeat.loaded_loras, WorkerInfo.lora_targets.
PROTOCOL_VERSION = 5
# Limits on what a decoder accepts from a peer.
MAX_FRAMES = 64
MAX_HEADER_BYTES = 1 << 20
_ALLOWED_DTYPES = {"int64", "int32", "int16", "uint8", "float32", "float16", "bool"}


class ProtocolError(ValueError):
    """A message that is malformed, of an unknown type or of another protocol version."""


def _as_ndarray(value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ValueError(f"expected an array frame, got {type(value).__name__}")
    return value


NDArray = Annotated[np.ndarray, BeforeValidator(_as_ndarray), PlainSerializer(lambda a: a)]


class Stage(str, Enum):
    AR = "ar"
    DIT = "dit"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)


# ---------------------------------------------------------------------------
# What a request is: the original prompt the router builds, and what each stage gets.
# Sizes are pixels everywhere on the wire; each carrier has a `size` (an ImageSize).


class MMProcessorKwargs(_Model):
    """The size the AR processor must build its scaffold for (GLM-Image's processor kwargs), in pixels."""

    target_h: int
    target_w: int

    @classmethod
    def of(cls, size: ImageSize) -> "MMProcessorKwargs":
        return cls(target_h=size.height, target_w=size.width)

    @property
    def size(self) -> ImageSize:
        return ImageSize(width=self.target_w, height=self.target_h)


class OriginalPrompt(_Model):
    """Everything the user asked for, as every stage sees it.

    The size is on the wire twice on purpose: top-level `height`/`width` (what a
    DiT pipeline reads) and `mm_processor_kwargs.target_h/target_w` (what the AR
    processor reads); peers that set only one produced noise at non-default
    sizes. Build it with `height`/`width` only: `mm_processor_kwargs` is derived
    from them, and a message whose two copies disagree fails validation when it
    is decoded, so no stage ever sees a self-contradicting size.
    """

    prompt: str
    height: int
    width: int
    mm_processor_kwargs: MMProcessorKwargs
    seed: int
    num_inference_steps: int
    guidance_scale: float
    negative_prompt: str | None = None
    # PNG bytes of the condition images, already normalised to valid sizes by the router.
    condition_images: list[bytes] = Field(default_factory=list)
    output_format: OutputFormat = "png"
    output_compression: int | None = None  # jpeg/webp encoder quality 0..100; None: the default

    @model_validator(mode="before")
    @classmethod
    def _derive_processor_kwargs(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mm_processor_kwargs" not in data:
            data = {**data, "mm_processor_kwargs": {"target_h": data.get("height"), "target_w": data.get("width")}}
        return data

    @model_validator(mode="after")
    def _one_size(self) -> "OriginalPrompt":
        if self.mm_processor_kwargs.size != self.size:
            raise ValueError(
                f"original_prompt carries two sizes: height/width {self.size} "
                f"but mm_processor_kwargs {self.mm_processor_kwargs.size}")
        return self

    @property
    def size(self) -> ImageSize:
        return ImageSize(width=self.width, height=self.height)


class ARSampling(_Model):
    temperature: float
    top_p: float
    top_k: int
    seed: int


class ARPrompt(_Model):
    """Stage-0 prompt, shaped like a vLLM multimodal prompt."""

    prompt: str
    mm_processor_kwargs: MMProcessorKwargs
    images: list[bytes] = Field(default_factory=list)


class ARJob(_Model):
    stage: Literal["ar"] = "ar"
    prompt: ARPrompt
    sampling: ARSampling


class _StageResult(_Model):
    # The size the stage actually used, in pixels; the router checks it against the request.
    height: int
    width: int

    @property
    def size(self) -> ImageSize:
        return ImageSize(width=self.width, height=self.height)


class ARResult(_StageResult):
    stage: Literal["ar"] = "ar"
    # Target grid at d32 resolution, shape (rows, cols); the DiT upsamples it.
    prior_token_ids: NDArray
    # One d32 grid per condition image (image-to-image), shape (rows, cols).
    prior_token_image_ids: list[NDArray] = Field(default_factory=list)


class LoraSpec(_Model):
    """One LoRA adapter of a DiT job: its file in the adapter folder (relative to it), the sha256
    of that file as the router checked it (a worker serves exactly those bytes, and keeps loaded
    adapters by it), and the scale it is applied at."""

    name: str = Field(max_length=64)
    path: str = Field(max_length=4096)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    scale: float = Field(allow_inf_nan=False, ge=-100, le=100)


class LoraTarget(_Model):
    """A linear layer of the DiT that an adapter may target: `module` is its name, or with `#` for
    a block index, the same layer in `count` blocks (indices 0..count-1)."""

    module: str = Field(max_length=300)
    in_features: int = Field(ge=1)
    out_features: int = Field(ge=1)
    count: int = Field(1, ge=1)


class DiTJob(_Model):
    stage: Literal["dit"] = "dit"
    original_prompt: OriginalPrompt
    prior_token_ids: NDArray
    prior_token_image_ids: list[NDArray] = Field(default_factory=list)
    # Denoising steps (0-based) after which to send a preview of the predicted clean image.
    preview_steps: list[int] = Field(default_factory=list)
    # LoRA adapters to apply, in order; none: the base model, exactly.
    loras: list[LoraSpec] = Field(default_factory=list, max_length=64)


class DiTResult(_StageResult):
    stage: Literal["dit"] = "dit"
    image: bytes
    output_format: OutputFormat


JobPayload = Annotated[Union[ARJob, DiTJob], Field(discriminator="stage")]
ResultPayload = Annotated[Union[ARResult, DiTResult], Field(discriminator="stage")]


# ---------------------------------------------------------------------------
# Bus messages.


class WorkerInfo(_Model):
    worker_id: str
    stage: Stage
    model: str
    capacity: int = Field(ge=1)
    pid: int
    host: str
    # StageConfig.fingerprint() of the worker's stage config: a router refuses a worker whose
    # config differs from its own (another dtype or sampling default would change the images).
    config_fingerprint: str
    # "host:port" where Prometheus can scrape this worker, as the worker announces it (behind NAT or
    # in a pod the bind address is not the reachable one); None when it serves no metrics.
    metrics_address: str | None = Field(default=None, max_length=300)
    # A DiT worker serving LoRA adapters: the layers they may target (routers check adapters against
    # them before any worker reads a file); None for AR workers and DiT workers without an adapter folder.
    lora_targets: list[LoraTarget] | None = Field(default=None, max_length=4096)


class Heartbeat(_Model):
    """Worker -> router, periodically. Carries the full registration, so a router
    that restarts (or a second replica) rebuilds its worker table from heartbeats alone."""

    type: Literal["heartbeat"] = "heartbeat"
    info: WorkerInfo
    draining: bool = False
    # Jobs running now for *other* routers (the receiver knows its own), and slots the receiving
    # router may fill now (slots held for another router's offer are not free to it).
    running_elsewhere: int = Field(0, ge=0)
    free_slots: int = Field(0, ge=0)
    # Running average of the worker's recent successful job times, in seconds (None before its first):
    # a router that has not run a job yet estimates waits from it.
    job_seconds: float | None = Field(None, ge=0)
    # sha256 digests of the LoRA adapters a DiT worker has loaded now (routers send adapter jobs where
    # their adapters are warm).
    loaded_loras: list[str] = Field(default_factory=list, max_length=256)


class Goodbye(_Model):
    """Worker -> router: deregister (after a drain)."""

    type: Literal["goodbye"] = "goodbye"
    worker_id: str


class RouterPing(_Model):
    """Router -> worker, periodically, so workers notice a lost router and reconnect."""

    type: Literal["router_ping"] = "router_ping"


class SlotOffer(_Model):
    """Worker -> router: a slot freed up and is held for you, because you were refused for capacity
    before (routers are offered freed slots in the order they were refused). Answer with a job for
    this worker, or OfferDeclined; an offer not taken within a heartbeat interval lapses."""

    type: Literal["slot_offer"] = "slot_offer"
    worker_id: str


class OfferDeclined(_Model):
    """Router -> worker: no job waits for the offered slot; give it to the next router."""

    type: Literal["offer_declined"] = "offer_declined"


class RegistrationRefused(_Model):
    """Router -> worker: this router will not send you jobs; `reason` says why."""

    type: Literal["refused"] = "refused"
    reason: str


class JobRequest(_Model):
    """Router -> worker: run one stage of one image."""

    type: Literal["job"] = "job"
    job_id: str  # unique per attempt: "<request_id>.<image>.<stage>.<attempt>"
    request_id: str  # the router's id of the HTTP request
    client_request_id: str | None = None  # the client's X-Request-Id, for logs
    deadline_s: float  # seconds the worker has for this job
    payload: JobPayload
    # Send JobProgress (tokens or steps done) while running: only when a client watches.
    progress: bool = False

    @property
    def log_tag(self) -> str:
        """How log lines name the request of this job: the router's id, then the client's."""
        return self.request_id if self.client_request_id is None else f"{self.request_id} client={self.client_request_id}"


class JobProgress(_Model):
    """Worker -> router while a job runs: units done of total (AR tokens, DiT steps), throttled
    by the worker; or a preview image (`preview`, the `preview_index`-th of the job)."""

    type: Literal["progress"] = "progress"
    job_id: str
    worker_id: str
    done: int
    total: int
    preview: bytes | None = None
    preview_index: int | None = None


class JobCancel(_Model):
    type: Literal["cancel"] = "cancel"
    job_id: str


class JobResult(_Model):
    type: Literal["result"] = "result"
    job_id: str
    worker_id: str
    payload: ResultPayload
    timings: dict[str, float] = Field(default_factory=dict)


class ErrorCode(str, Enum):
    BAD_REQUEST = "bad_request"  # the input cannot be served; retrying will not help
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    # The worker is at capacity (it queues the router for a SlotOffer) or draining: back-pressure,
    # never an error for the client.
    OVERLOADED = "overloaded"
    INTERNAL = "internal"


class JobError(_Model):
    type: Literal["error"] = "error"
    job_id: str
    worker_id: str
    code: ErrorCode
    message: str


Message = Annotated[
    Union[Heartbeat, Goodbye, RouterPing, RegistrationRefused, SlotOffer, OfferDeclined, JobRequest, JobProgress,
          JobCancel, JobResult, JobError],
    Field(discriminator="type"),
]
_MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)


# ---------------------------------------------------------------------------
# Codec.


def encode(message: BaseModel) -> list[bytes | memoryview]:
    """Serialise a message into ZeroMQ frames: [header, *buffers]."""
    frames: list[bytes | memoryview] = []
    body = _extract_frames(message.model_dump(mode="python"), frames)
    header = msgpack.packb({"v": PROTOCOL_VERSION, "body": body}, use_bin_type=True)
    return [header, *frames]


def _extract_frames(value: Any, frames: list) -> Any:
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        frames.append(memoryview(arr).cast("B") if arr.size else b"")
        return {"__frame__": len(frames), "dtype": arr.dtype.name, "shape": list(arr.shape)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        frames.append(value)
        return {"__frame__": len(frames)}
    if isinstance(value, dict):
        return {k: _extract_frames(v, frames) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_extract_frames(v, frames) for v in value]
    if isinstance(value, Enum):
        return value.value
    return value


def decode(frames: list[bytes | memoryview]) -> Any:
    """Parse and validate frames from a peer; raise ProtocolError on anything wrong."""
    if not frames or len(frames) > MAX_FRAMES:
        raise ProtocolError(f"expected 1..{MAX_FRAMES} frames, got {len(frames)}")
    header_bytes = bytes(frames[0])
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            header_bytes,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_HEADER_BYTES,
            max_bin_len=0,  # buffers travel as frames, never inside the header
            max_array_len=100_000,
            max_map_len=1_000,
            ext_hook=_reject_ext,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable header: {exc}") from exc
    if not isinstance(header, dict) or "v" not in header or "body" not in header:
        raise ProtocolError("header is not a {v, body} map")
    if header["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header['v']!r} is not {PROTOCOL_VERSION}")
    try:
        body = _restore_frames(header["body"], frames)
        return _MESSAGE_ADAPTER.validate_python(body)
    except ProtocolError:
        raise
    except ValidationError as exc:
        raise ProtocolError(f"invalid message: {exc.error_count()} error(s): {exc.errors()[0]['msg']}") from exc
    except Exception as exc:  # a hostile header (unhashable dtype, odd nesting) must never escape as a crash
        raise ProtocolError(f"malformed message body: {type(exc).__name__}: {exc}") from exc


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def _restore_frames(value: Any, frames: list) -> Any:
    if isinstance(value, dict):
        if "__frame__" in value:
            return _frame_value(value, frames)
        return {k: _restore_frames(v, frames) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_frames(v, frames) for v in value]
    return value


def _frame_value(marker: dict, frames: list) -> Any:
    index = marker["__frame__"]
    if not isinstance(index, int) or not 1 <= index < len(frames):
        raise ProtocolError(f"frame index {index!r} out of range")
    buf = frames[index]
    if "dtype" not in marker:
        return bytes(buf)
    dtype, shape = marker["dtype"], marker.get("shape")
    if not isinstance(dtype, str) or dtype not in _ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {dtype!r} is not allowed")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) > 4:
        raise ProtocolError(f"bad array shape {shape!r}")
    expected = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: a huge shape cannot overflow
    if len(buf) != expected:
        raise ProtocolError(f"array frame has {len(buf)} bytes, shape {shape} of {dtype} needs {expected}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)
