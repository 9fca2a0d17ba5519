"""Stage configuration: one YAML file describes the pipeline's stages, limits and bus timing.

The shape follows vLLM-Omni's stage configs (a list of stages with an id,
devices, engine arguments and default sampling parameters) so users coming
from there recognise it. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.sizes import ImageSize, SizeLimits

if TYPE_CHECKING:
    import torch


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    min_side: int = Field(256, ge=32)
    max_side: int = Field(2048, ge=32)
    max_aspect_ratio: float = Field(4.0, ge=1.0)
    default_size: str = "1024x1024"
    max_n: int = Field(10, ge=1)
    max_prompt_chars: int = Field(8192, ge=1)
    max_condition_images: int = Field(4, ge=0)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=1024)
    max_inference_steps: int = Field(200, ge=1)
    max_guidance_scale: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _sides_ordered(self) -> "Limits":
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} exceeds max_side {self.max_side}")
        return self

    @property
    def default_image_size(self) -> ImageSize:
        return ImageSize.parse(self.default_size)

    @property
    def size_limits(self) -> SizeLimits:
        return SizeLimits(self.min_side, self.max_side, self.max_aspect_ratio)


class _ModelDtype(_Strict):
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch  # only the stage workers need torch; the router never asks

        return getattr(torch, self.dtype)


class AREngineArgs(_ModelDtype):
    # Jobs one worker runs at once; the router never sends it more.
    max_num_seqs: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    # vLLM only: the KV cache's size in bytes, instead of a share of the device's memory (on CPU
    # also the only way below vLLM's 1 GiB steps; a model of known size needs no more).
    kv_cache_memory_bytes: int | None = Field(None, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    enforce_eager: bool = False


class BlockCacheSettings(_Strict):
    """cache-dit's DBCache ("dual block cache") on the DiT's transformer blocks.

    Every denoising step runs the first `fn_compute_blocks` blocks; when their output moved less
    than `residual_diff_threshold` (relative L1) since the previous step, the middle blocks are
    skipped and their cached residual is added instead, and the last `bn_compute_blocks` blocks
    run again. The defaults are cache-dit's own settings for GLM-Image (its `glm_image` example:
    F1B0, threshold 0.12, 8 warm-up steps, at most 3 cached steps in a row). Measured effect and
    trade-offs: docs/dit_speed.md.
    """

    fn_compute_blocks: int = Field(1, ge=1)
    bn_compute_blocks: int = Field(0, ge=0)
    # Higher skips more steps at more quality cost.
    residual_diff_threshold: float = Field(0.12, gt=0)
    # The first steps lay out the image and are never skipped. Also what keeps the condition-image
    # KV passes of an edit whole: the runner widens it per job to cover them (see stage_dit/speedups.py).
    max_warmup_steps: int = Field(8, ge=1)
    # -1: no limit. Caps on skipped steps, in total and in a row, bound the drift.
    max_cached_steps: int = Field(-1, ge=-1)
    max_continuous_cached_steps: int = Field(3, ge=-1)


class CompileSettings(_Strict):
    """Regional `torch.compile` of the DiT's repeated transformer blocks (all blocks share one
    compiled graph). `compile: true` in YAML means these defaults."""

    # inductor generates fused kernels (the speed-up); aot_eager only traces (no speed-up, no
    # C/Triton compiler needed): it checks the capture itself, which the fast tests use.
    backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    # inductor's mode; "max-autotune-no-cudagraphs" tunes longer for a little more speed.
    # CUDA-graph modes are not offered: prompt lengths and sizes vary per job.
    mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"


class DiTEngineArgs(_ModelDtype):
    """The DiT worker runs one job at a time (the diffusers pipeline keeps per-call state, and
    batching two jobs costs about twice as much per step: docs/dit_speed.md); a deployment
    scales it with more workers, so there is no batch size to set.

    The speed-ups are off unless set: `cache` (cache-dit block caching: fewer transformer blocks
    per step, a slightly different image) and `compile` (torch.compile of the repeated
    transformer blocks: the same image within float tolerance, a one-off compile per shape)."""

    cache: BlockCacheSettings | None = None
    compile: CompileSettings | None = None

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_shorthand(cls, value: Any) -> Any:
        # `compile: true` / `false` read as the default settings / off.
        if value is True:
            return CompileSettings()
        if value is False:
            return None
        return value


class ARSamplingDefaults(_Strict):
    temperature: float = Field(0.9, ge=0)
    top_p: float = Field(0.75, gt=0, le=1)
    top_k: int = Field(16512, ge=0)
    # The seed of image 0 of a request that sends none; None: a fresh random seed per request
    # (returned in the response's `seeds`), so two identical calls give two different images.
    seed: int | None = Field(None, ge=0)


class QualitySteps(_Strict):
    """Denoising steps behind OpenAI's `quality` presets (`auto` is `num_inference_steps`)."""

    low: int = Field(20, ge=1)
    medium: int = Field(35, ge=1)
    high: int = Field(50, ge=1)


class DiTSamplingDefaults(_Strict):
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(1.5, ge=0)
    quality_steps: QualitySteps = QualitySteps()


class StageTimeouts(_Strict):
    job_deadline_s: float = Field(600.0, gt=0)


class ARStageConfig(_Strict):
    stage_id: Literal[0] = 0
    stage_type: Literal["ar"] = "ar"
    devices: str = "0"
    engine: Literal["transformers", "vllm"] = "transformers"
    engine_args: AREngineArgs = AREngineArgs()
    default_sampling_params: ARSamplingDefaults = ARSamplingDefaults()
    timeouts: StageTimeouts = StageTimeouts()


class DiTStageConfig(_Strict):
    stage_id: Literal[1] = 1
    stage_type: Literal["dit"] = "dit"
    devices: str = "1"
    engine_args: DiTEngineArgs = DiTEngineArgs()
    default_sampling_params: DiTSamplingDefaults = DiTSamplingDefaults()
    timeouts: StageTimeouts = StageTimeouts()


class BusConfig(_Strict):
    heartbeat_interval_s: float = Field(1.0, gt=0)
    # A worker silent this long is dead; a router silent this long makes workers reconnect.
    peer_timeout_s: float = Field(5.0, gt=0)
    max_message_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    # How often a worker re-resolves a router given by DNS name (a Kubernetes headless Service:
    # one address per router replica). Per worker, so not in the fingerprint.
    router_resolve_interval_s: float = Field(5.0, gt=0)


class RouterSettings(_Strict):
    request_deadline_s: float = Field(1200.0, gt=0)
    max_retries: int = Field(2, ge=0)
    # Jobs that may wait per stage for a free worker slot before new requests get 429.
    queue_limit_per_stage: int = Field(64, ge=0)
    # How long a job may wait for a live worker of its stage to appear before a 503.
    no_worker_grace_s: float = Field(5.0, ge=0)
    # A request whose estimated wait for worker slots (from each stage's live capacity and recent job
    # times) exceeds this gets 429 with Retry-After at once; None: only the request deadline bounds it.
    max_queue_wait_s: float | None = Field(None, gt=0)
    # A waiting job moves up one service tier (flex -> default -> priority) per this many seconds
    # waited, so lower tiers are served slower but never starve (docs/scheduling.md).
    priority_aging_s: float = Field(60.0, gt=0)
    # Bytes of finished images kept to answer exact repeats of requests with an explicit seed
    # (least recently used first out); 0 turns the cache off.
    result_cache_bytes: int = Field(0, ge=0)
    # The HTTP edge against slow and hostile clients (router/edge/http_limits.py, docs/http_security.md).
    # Request headers must be complete within this of the connection opening (or the previous
    # response): a browser or SDK sends them in one packet, so 10 s only ever cuts off tricklers.
    http_header_timeout_s: float = Field(10.0, gt=0)
    # The whole body within this of the headers, else 408: the largest body (4 images at
    # max_upload_bytes, ~100 MB) still passes at ~1.7 MB/s; raise it for slow links and big uploads.
    http_body_timeout_s: float = Field(60.0, gt=0)
    # Open connections beyond this answer 503. Each costs a descriptor and a little memory while
    # the real work is bounded by queue_limit_per_stage, so more never does useful work; the
    # router raises its open-files limit to fit them.
    http_max_connections: int = Field(1024, ge=1)
    # Request line plus headers; more is a 431 (nginx's default buffers hold 32 KiB too).
    http_max_header_bytes: int = Field(32 * 1024, ge=1024)


class LoraSettings(_Strict):
    """LoRA adapters on the DiT (docs/lora.md). The router and the DiT workers read the same folder
    (`--lora-dir` overrides `dir` per process: a mount point may differ between machines, so none of
    this is in the fingerprint; an adapter's bytes travel as its sha256 with every job)."""

    # The adapter folder: `NAME.safetensors`, or `NAME/adapter_model.safetensors` (PEFT) or
    # `NAME/pytorch_lora_weights.safetensors` (diffusers). None: LoRA is off.
    dir: str | None = None
    # Adapters a DiT worker keeps loaded (least recently used out); also the most one request may use.
    max_loras: int = Field(4, ge=1, le=64)
    # Refused before any worker reads them: rank above this, files above this size.
    max_rank: int = Field(128, ge=1)
    max_file_bytes: int = Field(1 << 30, ge=1024)
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING);
    # off, they answer 403 and only the folder's own files are served.
    runtime_updates: bool = False


class StageConfig(_Strict):
    """The whole deployment description loaded from `stage_configs/*.yaml`."""

    model: str | None = None
    limits: Limits = Limits()
    bus: BusConfig = BusConfig()
    router: RouterSettings = RouterSettings()
    lora: LoraSettings = LoraSettings()
    stage_args: tuple[ARStageConfig, DiTStageConfig]

    @property
    def ar(self) -> ARStageConfig:
        return self.stage_args[0]

    @property
    def dit(self) -> DiTStageConfig:
        return self.stage_args[1]

    def stage(self, stage: str) -> ARStageConfig | DiTStageConfig:
        """The section of `stage` ("ar" or "dit", or a protocol Stage)."""
        return self.ar if stage == "ar" else self.dit

    def with_lora_dir(self, lora_dir: str | None) -> "StageConfig":
        """This config with `lora.dir` replaced by `lora_dir` (the `--lora-dir` flag), when given."""
        if lora_dir is None:
            return self
        return self.model_copy(update={"lora": self.lora.model_copy(update={"dir": lora_dir})})

    def fingerprint(self) -> str:
        """A hash of what the router and every worker must agree on: the bus timing and what
        decides an image's bytes: per stage the dtype, sampling defaults and deadlines, and the
        DiT's speed-ups (block caching changes the image, compiled kernels round differently).

        Left out is what a deployment may vary per worker: where it runs (`devices`), where its
        weights lie (`model`), and the AR's engine and capacity (`engine`, batch size, memory share,
        parallelism): a vLLM worker may join transformers workers (their greedy tokens are
        identical; sampled tokens come from different samplers); and how often a worker
        re-resolves its routers' DNS name (`bus.router_resolve_interval_s`)."""
        stages = []
        for stage in self.stage_args:
            stages.append({
                "engine_args": (stage.engine_args.model_dump(mode="json") if stage.stage_type == "dit"
                                else {"dtype": stage.engine_args.dtype}),
                "sampling": stage.default_sampling_params.model_dump(mode="json"),
                "timeouts": stage.timeouts.model_dump(mode="json")})
        # The resolve interval is the worker's own business (and leaving it out keeps older fingerprints).
        shared = {"bus": self.bus.model_dump(mode="json", exclude={"router_resolve_interval_s"}), "stages": stages}
        return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]


class StageConfigError(ValueError):
    """The stage config file is unreadable or invalid; the message names the offending key."""


def load_stage_config(path: str | Path) -> StageConfig:
    """Load and validate a stage config YAML file."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise StageConfigError(f"cannot read stage config {path}: {exc}") from exc
    try:
        return StageConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{where}: {msg}")
        raise StageConfigError(f"invalid stage config {path}:\n  " + "\n  ".join(lines)) from exc
