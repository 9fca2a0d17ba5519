"""The LoRA adapters this router serves, by name (docs/lora.md).

An adapter is a file in the adapter folder (`lora.dir`): the folder's own files are served under
their names (`NAME.safetensors`, `NAME/adapter_model.safetensors`), so adding a file is enough, and
`POST /v1/load_lora_adapter` registers another name for any file inside the folder (vLLM's
endpoint). Every file is checked here before a job names it, from its safetensors header only:
inside the folder, .safetensors, size, rank, and target layers against the ones the DiT workers
announce. A checked file is remembered by its size and modification time, with its sha256, which
is what jobs carry: a file replaced under the same name is a new adapter for the workers and the
result cache.

Registrations are this router's own (each router replica has its own); the folder is shared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from common.lora import LoraError, LoraFile, check_name, check_targets, find_adapters, inspect_file
from common.protocol import LoraSpec, LoraTarget
from common.stage_config import LoraSettings
from router.core.errors import InvalidRequest, NotFound, ServiceError

logger = logging.getLogger(__name__)


class LoraUpdatesDisabled(ServiceError):
    """Runtime adapter loading is switched off by the config."""

    status_code = 403
    error_type = "permission_error"


@dataclass(frozen=True)
class LoraChoice:
    """One adapter a request asked for, before it is checked."""

    name: str
    scale: float = 1.0


class LoraRegistry:
    def __init__(self, settings: LoraSettings, base_model: str,
                 targets: Callable[[], list[LoraTarget] | None] = lambda: None):
        """`targets()` gives the linear layers of the DiT (from a live DiT worker), None while unknown."""
        self.settings = settings
        self.base_model = base_model
        self.targets = targets
        self._registered: dict[str, str] = {}  # name -> path relative to the folder (load_lora_adapter)
        self._unloaded: set[str] = set()  # folder adapters hidden by unload_lora_adapter
        self._checked: dict[str, LoraFile] = {}  # relative path -> the file as last checked

    @property
    def enabled(self) -> bool:
        return self.settings.dir is not None

    def adapters(self) -> dict[str, str]:
        """The adapters served now: name -> file relative to the folder."""
        if not self.enabled:
            return {}
        found = {name: path for name, path in find_adapters(self.settings.dir).items()
                 if name not in self._unloaded and name != self.base_model}
        return {**found, **self._registered}

    def resolve(self, choices: list[LoraChoice]) -> tuple[LoraSpec, ...]:
        """The adapters of a request, checked, as jobs carry them; 404 for an unknown name, 400 for
        an adapter that cannot be served."""
        if not choices:
            return ()
        if not self.enabled:
            raise InvalidRequest("this server serves no LoRA adapters (no lora.dir is configured)")
        if len(choices) > self.settings.max_loras:
            raise InvalidRequest(f"{len(choices)} LoRA adapters were asked for; at most {self.settings.max_loras} "
                                 "per request (lora.max_loras)")
        names = [choice.name for choice in choices]
        if len(set(names)) != len(names):
            raise InvalidRequest("an adapter is named twice in loras: give each once")
        served = self.adapters()
        specs = []
        for choice in choices:
            path = served.get(choice.name)
            if path is None:
                raise NotFound(f"LoRA adapter {choice.name!r} is not served here; served adapters: "
                               f"{', '.join(sorted(served)) or 'none'}")
            lora = self._check(choice.name, path)
            specs.append(LoraSpec(name=choice.name, path=lora.relative, digest=lora.digest, scale=choice.scale))
        if len({spec.digest for spec in specs}) != len(specs):
            raise InvalidRequest("two of the adapters asked for are the same file: give it once, with the sum of "
                                 "the scales")
        return tuple(specs)

    def load(self, name: str, path: str, log_tag: str, replace: bool = False) -> LoraFile:
        """POST /v1/load_lora_adapter: serve the file at `path` (inside the folder) as `name`
        (`replace`: even if `name` is served already)."""
        self._check_updates()
        try:
            check_name(name)
        except LoraError as exc:
            raise InvalidRequest(str(exc)) from None
        if name == self.base_model:
            raise InvalidRequest(f"{name!r} is the base model's name; choose another adapter name")
        if name in self.adapters() and not replace:
            raise InvalidRequest(f"LoRA adapter {name!r} is already loaded; unload it first, or send load_inplace: true")
        lora = self._check(name, path)
        self._registered[name] = lora.relative
        self._unloaded.discard(name)
        logger.info("[%s] LoRA adapter %r registered: %s (rank %d, %d modules, sha256 %s)", log_tag, name,
                    lora.relative, lora.rank, len(lora.modules), lora.digest[:12])
        return lora

    def unload(self, name: str, log_tag: str) -> None:
        """POST /v1/unload_lora_adapter: stop serving `name` (workers drop it as they need room)."""
        self._check_updates()
        if name not in self.adapters():
            raise NotFound(f"LoRA adapter {name!r} is not loaded; loaded adapters: "
                           f"{', '.join(sorted(self.adapters())) or 'none'}")
        self._registered.pop(name, None)
        if name in find_adapters(self.settings.dir):
            self._unloaded.add(name)  # the folder's own file: hidden until loaded again
        logger.info("[%s] LoRA adapter %r unregistered", log_tag, name)

    def _check_updates(self) -> None:
        if not self.enabled:
            raise InvalidRequest("this server serves no LoRA adapters (no lora.dir is configured)")
        if not self.settings.runtime_updates:
            raise LoraUpdatesDisabled("loading and unloading LoRA adapters at runtime is disabled on this server "
                                      "(lora.runtime_updates: false); adapters are the files in its adapter folder")

    def _check(self, name: str, path: str) -> LoraFile:
        """The file at `path`, checked (cached while its size and modification time stay the same)."""
        s = self.settings
        try:
            lora = inspect_file(s.dir, path, s.max_rank, s.max_file_bytes, digest=False)
            cached = self._checked.get(lora.relative)
            if cached is not None and (cached.size, cached.mtime_ns) == (lora.size, lora.mtime_ns):
                lora = cached
            else:
                lora = inspect_file(s.dir, path, s.max_rank, s.max_file_bytes)
                self._checked[lora.relative] = lora
            targets = self.targets()
            if targets is not None:
                check_targets(lora, targets, name)
        except LoraError as exc:
            raise InvalidRequest(str(exc)) from None
        except OSError as exc:
            raise InvalidRequest(f"LoRA adapter {name!r}: cannot read {path!r}: {exc.strerror}") from None
        return lora
