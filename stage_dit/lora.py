"""LoRA adapters on the DiT: a bounded LRU of adapters loaded through diffusers' PEFT integration.

Adapters are kept by the sha256 of their file (the job's `LoraSpec.digest`), so a file replaced
under the same name is a new adapter, never the old one's weights. Before each job the runner
calls `activate` under its lock: the job's adapters are loaded if missing (the least recently used
ones deleted beyond `max_loras`) and set active at the job's scales; a job without adapters turns
the LoRA layers off, so the transformer computes exactly what it computed before any was loaded.

A compiled DiT (`compile` set) would recompile on every change of adapters, scales or on/off (and
fall back to eager past dynamo's recompile limit), so there the manager keeps `max_loras` fixed
slots instead: blank adapters (zero weights) of rank `max_rank` on every linear layer, all active,
made before the blocks are compiled. Loading an adapter hot-swaps its weights into a slot (PEFT's
hotswap: zero-padded to the slot's rank, layers it does not adapt zeroed) and a job sets each
slot's scale in place (0 for slots it does not use, all 0 for a base job): the compiled graphs see
the same modules and tensors every time and never recompile. The cost: every linear layer also runs
`max_loras` rank-`max_rank` products per pass, adapters or not.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.lora import LoraError, LoraFile, PeftScaling, check_targets, inspect_file, target_table
from common.protocol import LoraSpec, LoraTarget
from common.stage_config import LoraSettings

logger = logging.getLogger(__name__)

# Seconds to read and inject one adapter: milliseconds on the tiny model, seconds for large ranks.
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class LoraMetrics:
    """The DiT worker's adapter metrics, on the worker's registry."""

    def __init__(self, registry: CollectorRegistry, worker_id: str):
        labels = {"stage": "dit", "worker_id": worker_id}
        names = ["stage", "worker_id"]
        self.loads = Counter("glm_worker_lora_loads", "LoRA adapters loaded, by outcome (ok, failed)",
                             [*names, "outcome"], registry=registry)
        self.evictions = Counter("glm_worker_lora_evictions", "LoRA adapters deleted to make room (least recently "
                                 "used first)", names, registry=registry).labels(**labels)
        self.load_seconds = Histogram("glm_worker_lora_load_duration_seconds", "Time to read and inject one LoRA "
                                      "adapter", names, buckets=LOAD_BUCKETS, registry=registry).labels(**labels)
        self.loaded = Gauge("glm_worker_loras_loaded", "LoRA adapters loaded now", names,
                            registry=registry).labels(**labels)
        self._labels = labels
        for outcome in ("ok", "failed"):
            self.loads.labels(outcome=outcome, **labels)

    def load_finished(self, outcome: str) -> None:
        self.loads.labels(outcome=outcome, **self._labels).inc()


@contextmanager
def _several_adapters_expected() -> Iterator[None]:
    """PEFT warns on every adapter after the first that the model holds several: that is the design here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        yield


def module_scaling(scaling: PeftScaling, module: str, rank: int) -> float:
    """PEFT's scaling of one adapted module: alpha (its `alpha_pattern` entry, else `lora_alpha`)
    over the rank, or over its square root with rsLoRA."""
    from peft.utils.other import get_pattern_key

    alpha = scaling.alpha_pattern.get(get_pattern_key(list(scaling.alpha_pattern), module), scaling.lora_alpha)
    return alpha / (math.sqrt(rank) if scaling.use_rslora else rank)


def linear_layers(transformer: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(name, in, out) of every plain linear layer of the transformer (what an adapter may target)."""
    return [(name, module.in_features, module.out_features) for name, module in transformer.named_modules()
            if type(module) is torch.nn.Linear]


class LoraManager:
    """The adapters loaded on one DiT transformer (call it from the runner's job thread, under its lock)."""

    def __init__(self, transformer: torch.nn.Module, lora_dir: str | Path, settings: LoraSettings,
                 metrics: LoraMetrics | None = None, compiled: bool = False):
        """`compiled`: the transformer's blocks are compiled after this (the slots of the module
        docstring); call before compiling."""
        self.transformer = transformer
        self.lora_dir = Path(lora_dir)
        self.settings = settings
        self.metrics = metrics
        # Taken before any adapter wraps a layer: afterwards the layers' names change (`.base_layer`).
        linears = linear_layers(transformer)
        self.targets: list[LoraTarget] = target_table(linears)
        self._loaded: OrderedDict[str, str] = OrderedDict()  # digest -> PEFT adapter name, least recent first
        self._active = False  # whether the LoRA layers are on
        # Read by the event loop for heartbeats: replaced, never mutated.
        self.loaded_digests: tuple[str, ...] = ()
        self._slots: list[str] = []
        if compiled:
            self._make_slots(linears)

    @property
    def hotswap(self) -> bool:
        return bool(self._slots)

    def _make_slots(self, linears: list[tuple[str, int, int]]) -> None:
        from peft.tuners.lora.layer import LoraLayer
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        rank = self.settings.max_rank
        weight = next(self.transformer.parameters())
        blank = {}
        for name, fan_in, fan_out in linears:
            blank[f"{name}.lora_A.weight"] = torch.zeros(rank, fan_in, dtype=weight.dtype, device=weight.device)
            blank[f"{name}.lora_B.weight"] = torch.zeros(fan_out, rank, dtype=weight.dtype, device=weight.device)
        for i in range(self.settings.max_loras):
            slot = f"lora_slot{i}"
            with _several_adapters_expected():
                self.transformer.load_lora_adapter(dict(blank), prefix=None, adapter_name=slot)
            self._slots.append(slot)
        named = [(name, module) for name, module in self.transformer.named_modules() if isinstance(module, LoraLayer)]
        self._layer_names = [name for name, _ in named]
        self._layers = [module for _, module in named]
        for layer in self._layers:
            layer.set_adapter(self._slots)  # all slots active, always: a job changes only their scales
        # Scalings become tensors, changed in place from now on (a new float would be a new guard).
        prepare_model_for_compiled_hotswap(self.transformer, target_rank=rank, check_compiled="error")
        self._unit_scaling = {slot: self._scalings(slot) for slot in self._slots}
        self._set_scales({})
        logger.info("LoRA hot swap for the compiled DiT: %d slots of rank %d on %d linear layers",
                    len(self._slots), rank, len(self._layers))

    def _scalings(self, slot: str) -> list[float]:
        return [float(layer.scaling[slot]) for layer in self._layers]

    def _set_scales(self, scales: dict[str, float]) -> None:
        with torch.no_grad():
            for slot in self._slots:
                scale = scales.get(slot, 0.0)
                for layer, unit in zip(self._layers, self._unit_scaling[slot]):
                    layer.scaling[slot].fill_(unit * scale)

    def activate(self, loras: list[LoraSpec], log_tag: str) -> None:
        """Make exactly `loras` (at their scales) active; none: the base model. Raises LoraError for
        an adapter that cannot be served (the job's 400)."""
        if not loras:
            if self.hotswap:
                self._set_scales({})
            elif self._active:
                self.transformer.disable_lora()
                self._active = False
            return
        digests = [spec.digest for spec in loras]
        if len(set(digests)) != len(digests):
            raise LoraError("the same adapter file is named twice: give it once, with the sum of the scales")
        if len(loras) > self.settings.max_loras:
            raise LoraError(f"{len(loras)} adapters in one request; this worker holds at most "
                            f"{self.settings.max_loras} (lora.max_loras)")
        names = [self._ensure_loaded(spec, set(digests), log_tag) for spec in loras]
        if self.hotswap:
            self._set_scales({name: spec.scale for name, spec in zip(names, loras)})
            return
        self.transformer.enable_lora()
        self.transformer.set_adapters(names, [spec.scale for spec in loras])
        self._active = True

    def _ensure_loaded(self, spec: LoraSpec, keep: set[str], log_tag: str) -> str:
        name = self._loaded.get(spec.digest)
        if name is not None:
            self._loaded.move_to_end(spec.digest)
            return name
        settings = self.settings
        started = time.monotonic()
        try:
            try:
                lora = inspect_file(self.lora_dir, spec.path, settings.max_rank, settings.max_file_bytes)
            except OSError as exc:  # removed or unreadable since the router checked it: the client's 400
                raise LoraError(f"adapter {spec.name!r}: cannot read {spec.path}: {exc.strerror or exc}") from None
            if lora.digest != spec.digest:
                raise LoraError(f"adapter {spec.name!r}: {lora.relative} changed since the router checked it "
                                "(another sha256); send the request again")
            check_targets(lora, self.targets, spec.name)
            while len(self._loaded) >= settings.max_loras:
                self._evict(keep, log_tag)
            if self.hotswap:
                name = next(slot for slot in self._slots if slot not in self._loaded.values())
                # The slot's weights are replaced in place; activate() then sets every slot's scale.
                self._inject(lora, name)
                if lora.peft_scaling is None:
                    self._unit_scaling[name] = self._scalings(name)
                else:
                    self._unit_scaling[name] = [
                        module_scaling(lora.peft_scaling, layer, lora.modules[layer].rank) if layer in lora.modules
                        else 0.0 for layer in self._layer_names]
            else:
                name = f"lora_{spec.digest[:16]}"
                with _several_adapters_expected():
                    self._inject(lora, name)
        except Exception:
            if self.metrics is not None:
                self.metrics.load_finished("failed")
            raise
        took = time.monotonic() - started
        self._loaded[spec.digest] = name
        self.loaded_digests = tuple(self._loaded)
        if self.metrics is not None:
            self.metrics.load_finished("ok")
            self.metrics.load_seconds.observe(took)
            self.metrics.loaded.set(len(self._loaded))
        logger.info("[%s] loaded LoRA adapter %r (%s, rank %d, %d modules, sha256 %s) in %.3fs; %d loaded",
                    log_tag, spec.name, lora.relative, lora.rank, len(lora.modules), spec.digest[:12], took,
                    len(self._loaded))
        return name

    def _inject(self, lora: LoraFile, name: str) -> None:
        """Load `lora` as PEFT adapter `name` (into that slot when hot-swapping).

        A PEFT folder keeps alpha in adapter_config.json, which diffusers does not read: its weights
        go in as a state dict with the LoRA config diffusers would infer from them (alpha = rank)
        amended by the folder's alpha settings. A slot's config cannot change (PEFT's hot-swap
        refuses another rsLoRA or alpha pattern), so there the folder's scalings are the slot's unit
        scalings instead (see `_ensure_loaded`)."""
        if lora.peft_scaling is None:
            self.transformer.load_lora_adapter(str(lora.path.parent), weight_name=lora.path.name, prefix=lora.prefix,
                                               adapter_name=name, hotswap=self.hotswap)
            return
        from diffusers.utils.peft_utils import get_peft_kwargs
        from safetensors.torch import load_file

        cut = len(lora.prefix) + 1 if lora.prefix else 0
        state = {key[cut:]: value for key, value in load_file(str(lora.path)).items()}
        ranks = {f"^{key}": value.shape[1] for key, value in state.items() if ".lora_B." in key}
        config = get_peft_kwargs(ranks, None, state, is_unet=False)
        if self.hotswap:
            config["alpha_pattern"] = {}
        else:
            scaling = lora.peft_scaling
            config.update(lora_alpha=scaling.lora_alpha, alpha_pattern=dict(scaling.alpha_pattern),
                          use_rslora=scaling.use_rslora)
        self.transformer.load_lora_adapter(state, prefix=None, metadata=config, adapter_name=name, hotswap=self.hotswap)

    def _evict(self, keep: set[str], log_tag: str) -> None:
        digest = next((d for d in self._loaded if d not in keep), None)
        if digest is None:  # cannot happen: activate() bounds the job's adapters by max_loras
            raise LoraError("no adapter can be unloaded to make room")
        name = self._loaded.pop(digest)
        if not self.hotswap:  # a slot is overwritten by the next swap instead
            self.transformer.delete_adapters(name)
        self.loaded_digests = tuple(self._loaded)
        if self.metrics is not None:
            self.metrics.evictions.inc()
            self.metrics.loaded.set(len(self._loaded))
        logger.info("[%s] unloaded LoRA adapter %s (sha256 %s, least recently used) to make room", log_tag, name,
                    digest[:12])
