"""The boundary between the HTTP edge and the orchestrator: one validated image request in,
generated images out, and the interface the edge needs from the orchestrator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, Union

from common.image_formats import OutputFormat
from common.protocol import LoraSpec
from common.sizes import ImageSize
from common.stage_config import StageConfig
from router.core.service_discovery import ScrapeTargetGroup

# torch.manual_seed takes 64-bit seeds, so clients may send any seed up to this (seed + n - 1 too).
MAX_SEED = 2**63 - 1
# Seeds the router draws stay below 2^53: JavaScript, jq and every float64 JSON reader hold them exactly,
# so a seed shown to a user reproduces the image when sent back.
MAX_RANDOM_SEED = 2**53 - 1


# OpenAI's `service_tier` values, highest priority first; "auto" is the key's default tier (else "default").
ServiceTier = Literal["priority", "default", "flex"]
SERVICE_TIERS: tuple[ServiceTier, ...] = ("priority", "default", "flex")
ANONYMOUS_TENANT = "anonymous"


@dataclass(frozen=True)
class ImageRequest:
    """A validated request for `n` images. The size is already checked; condition images are
    normalised PNG bytes whose sides are valid sizes."""

    request_id: str  # the router's id for this HTTP request, unique
    prompt: str
    size: ImageSize
    client_request_id: str | None = None  # the client's X-Request-Id, when it sent a usable one
    n: int = 1
    seed: int | None = None  # None: the stage config's default seed
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    condition_images: list[bytes] = field(default_factory=list)
    output_format: OutputFormat = "png"
    output_compression: int | None = None
    quality: Literal["low", "medium", "high", "auto"] = "auto"
    # AR sampling overrides (the chat API's temperature / top_p); None: the stage config's.
    ar_temperature: float | None = None
    ar_top_p: float | None = None
    # Streaming: previews per image, and whether the client watches progress.
    partial_images: int = 0
    progress: bool = False
    # Who asks, for the scheduler: the priority class, the tenant (an API key's name, never the key)
    # and the tenant's cap on images admitted at once (None: no cap).
    service_tier: ServiceTier = "default"
    tenant: str = ANONYMOUS_TENANT
    tenant_max_images: int | None = None
    # LoRA adapters on the DiT, checked by the router's LoraRegistry; none: the base model.
    loras: tuple[LoraSpec, ...] = ()

    @property
    def log_tag(self) -> str:
        """How log lines name this request: the router's id, then the client's."""
        return self.request_id if self.client_request_id is None else f"{self.request_id} client={self.client_request_id}"


@dataclass(frozen=True)
class GeneratedImage:
    image: bytes
    output_format: OutputFormat
    seed: int
    size: ImageSize
    # Seconds per stage plus queueing: {"ar_s", "dit_s", "total_s"}.
    timings: dict[str, float]
    # The size each stage reported using: {"ar": ..., "dit": ...}.
    stage_sizes: dict[str, ImageSize]


# What happens while a request runs, for clients that stream.


@dataclass(frozen=True)
class StageProgress:
    """Image `image_index` moved on: admitted ("queued", with its `position` among the images
    ahead of it), generated `done` of `total` AR tokens ("ar") or DiT steps ("dit"; a finished
    stage also gives its `seconds`), or a stage attempt is retried ("retry", with the `reason`)."""

    image_index: int
    stage: Literal["queued", "ar", "dit", "retry"]
    done: int = 0
    total: int = 0
    position: int | None = None
    seconds: float | None = None
    reason: str | None = None


@dataclass(frozen=True)
class PartialImage:
    """A preview of image `image_index` while it is denoised."""

    image_index: int
    partial_image_index: int
    image: bytes


@dataclass(frozen=True)
class ImageFinished:
    image_index: int
    image: GeneratedImage


GenerationEvent = Union[StageProgress, PartialImage, ImageFinished]
EventListener = Callable[[GenerationEvent], None]


class ImageBackend(Protocol):
    """What the HTTP edge needs from the orchestrator."""

    config: StageConfig

    async def generate(self, request: ImageRequest, listener: EventListener | None = None) -> list[GeneratedImage]:
        """The n images of `request`; raises ServiceError subclasses. Cancelling cancels the work.

        `listener` gets a StageProgress("queued") for every image once the request is admitted,
        then, as they happen, progress (when `request.progress`), previews (when
        `request.partial_images`) and each image as it finishes."""
        ...

    def live_workers(self) -> dict[str, int]:
        """Live workers per stage: {"ar": n, "dit": m}."""
        ...

    def models(self) -> list[str]:
        """Names of the served models (the base model first; LoRA adapters are `loras.adapters()`)."""
        ...

    def metrics_targets(self) -> list[ScrapeTargetGroup]:
        """Prometheus HTTP service discovery groups: one per live worker that serves metrics."""
        ...
