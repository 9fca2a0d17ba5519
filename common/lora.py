"""LoRA adapter files: where they may live, what they may hold, and what the DiT can take.

Shared by the router, which checks a file before any worker reads it, and the DiT worker, which
checks it again (its own copy of the folder) before diffusers' PEFT integration loads it. Only the
safetensors header is read here (a bounded JSON object), never a tensor and never a pickle, and
no torch: the router does not import it.

A file holds, per adapted module, `<prefix><module>.lora_A.weight` (rank x in) and
`<prefix><module>.lora_B.weight` (out x rank), the layout diffusers and PEFT save; the prefix is
`transformer.` (diffusers), `base_model.model.` (PEFT) or none. The modules must be linear layers of
the DiT with those shapes: the DiT workers announce theirs (`LoraTarget` in their registration).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from common.protocol import LoraTarget

# What a folder NAME/ may hold: PEFT's save_pretrained, diffusers' save_lora_weights.
ADAPTER_FILE_NAMES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
SUFFIX = ".safetensors"
# Pickle formats: never loaded (a pickle runs code when it is read).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
KEY_PREFIXES = ("transformer.", "base_model.model.")
_A, _B = ".lora_A.weight", ".lora_B.weight"
_DTYPES = {"F32", "F16", "BF16"}
# A LoRA header lists two small entries per module: even the largest adapters stay far below this.
_MAX_HEADER_BYTES = 16 << 20


class LoraError(ValueError):
    """An adapter that cannot be served; the message says why (the client's 400)."""


@dataclass(frozen=True)
class LoraModule:
    in_features: int
    out_features: int
    rank: int


@dataclass(frozen=True)
class PeftScaling:
    """What a PEFT folder's adapter_config.json says about scaling, applied when the adapter loads:
    a module's delta B @ A is scaled by alpha / r (alpha / sqrt(r) with rsLoRA), alpha taken from
    `alpha_pattern` where a pattern matches the module (PEFT's rule), else `lora_alpha`."""

    lora_alpha: float
    use_rslora: bool
    alpha_pattern: dict[str, float]


@dataclass(frozen=True)
class LoraFile:
    """A checked adapter file."""

    path: Path  # resolved, inside the adapter folder
    relative: str  # the same, relative to the adapter folder (what jobs carry)
    size: int
    mtime_ns: int
    digest: str  # sha256 of the file (and its PEFT config): what identifies the adapter everywhere
    prefix: str | None  # the key prefix before the module names ("transformer"), None for bare keys
    modules: dict[str, LoraModule]
    peft_scaling: PeftScaling | None = None  # a PEFT folder's alpha settings; None: alpha = rank

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise LoraError(f"adapter name {name!r} is not valid: use 1..64 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return name


def find_adapters(lora_dir: str | Path) -> dict[str, str]:
    """The adapters the folder holds, by name: `NAME.safetensors` and `NAME/<adapter file>`, as
    paths relative to the folder. Names that are not valid adapter names are skipped."""
    root = Path(lora_dir)
    found: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return found
    for entry in entries:
        try:
            _add_adapter(root, entry, found)
        except OSError:  # a broken entry (a symlink loop) is no adapter; resolve_path says why if named
            continue
    return found


def _add_adapter(root: Path, entry: os.DirEntry, found: dict[str, str]) -> None:
    if entry.name.endswith(SUFFIX) and entry.is_file():
        name = entry.name[: -len(SUFFIX)]
        if _NAME_RE.match(name):
            found[name] = entry.name
    elif entry.is_dir() and _NAME_RE.match(entry.name):
        for file_name in ADAPTER_FILE_NAMES:
            if (root / entry.name / file_name).is_file():
                found.setdefault(entry.name, f"{entry.name}/{file_name}")
                break


def resolve_path(lora_dir: str | Path, path: str) -> tuple[Path, str]:
    """`path` (relative to the folder, or absolute inside it; a folder holding an adapter file) as
    a resolved file inside the adapter folder and that file relative to the folder. Symlinks are
    followed before the check, so none leads out."""
    if not isinstance(path, str) or not path or "\x00" in path or len(path) > 4096:
        raise LoraError("lora_path must be a non-empty path inside the adapter folder")
    try:
        return _resolve_path(Path(lora_dir).resolve(), path)
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop, no permission
        raise LoraError(f"lora_path {path[:200]!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None


def _resolve_path(root: Path, path: str) -> tuple[Path, str]:
    candidate = Path(path)
    target = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if target != root and root not in target.parents:
        raise LoraError(f"lora_path {path!r} is outside the adapter folder: only files under it are served")
    if target.is_dir():
        for file_name in ADAPTER_FILE_NAMES:
            if (target / file_name).is_file():
                target = target / file_name
                break
        else:
            raise LoraError(f"lora_path {path!r} is a folder without {' or '.join(ADAPTER_FILE_NAMES)}")
    if target.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"lora_path {path!r} is a pickle file ({target.suffix}): only .safetensors adapters are "
                        "loaded, pickles can run code")
    if not target.name.endswith(SUFFIX):
        raise LoraError(f"lora_path {path!r} is not a .safetensors file")
    if not target.is_file():
        raise LoraError(f"lora_path {path!r} does not exist in the adapter folder")
    return target, target.relative_to(root).as_posix()


def read_header(path: Path, size: int) -> dict:
    """The safetensors header (the tensors' names, dtypes, shapes, offsets); LoraError if malformed."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraError(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise LoraError(f"{path.name} is not a safetensors file (header length {length})")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"{path.name} is not a safetensors file (header: {exc})") from None
    if not isinstance(header, dict):
        raise LoraError(f"{path.name} is not a safetensors file (header is not an object)")
    data_bytes = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if (not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES or not isinstance(entry.get("shape"), list)
                or not isinstance(entry.get("data_offsets"), list) or len(entry["data_offsets"]) != 2
                or not all(isinstance(v, int) and v >= 0 for v in [*entry["shape"], *entry["data_offsets"]])
                or entry["data_offsets"][1] > data_bytes):
            raise LoraError(f"{path.name}: tensor {key[:120]!r} is malformed or not float32/float16/bfloat16")
    return header


def file_digest(path: Path, config: bytes = b"") -> str:
    """sha256 of the adapter file, and of its PEFT config when it has one (a new alpha is a new adapter)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if config:
        digest.update(b"\0" + _PEFT_CONFIG.encode() + b"\0" + config)
    return digest.hexdigest()


def parse_modules(name: str, header: dict, max_rank: int) -> tuple[str | None, dict[str, LoraModule]]:
    """The key prefix and the adapted modules of a header; LoraError names the first problem."""
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        raise LoraError(f"{name} holds no tensors")
    prefix = next((p for p in KEY_PREFIXES if all(k.startswith(p) for k in keys)), "")
    pairs: dict[str, dict[str, list[int]]] = {}
    for key in keys:
        bare = key[len(prefix):]
        for suffix in (_A, _B):
            if bare.endswith(suffix):
                pairs.setdefault(bare[: -len(suffix)], {})[suffix] = header[key]["shape"]
                break
        else:
            raise LoraError(f"{name}: tensor {key[:120]!r} is not a LoRA weight (expected <module>.lora_A.weight and "
                            "<module>.lora_B.weight, with a 'transformer.' prefix or none)")
    modules = {}
    for module, shapes in pairs.items():
        a, b = shapes.get(_A), shapes.get(_B)
        if a is None or b is None:
            raise LoraError(f"{name}: module {module[:120]!r} has only one of lora_A and lora_B")
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] < 1:
            raise LoraError(f"{name}: module {module[:120]!r} has lora_A {a} and lora_B {b}; expected rank x in "
                            "and out x rank")
        if a[0] > max_rank:
            raise LoraError(f"{name}: rank {a[0]} (module {module[:120]!r}) exceeds the limit of {max_rank} "
                            "(lora.max_rank)")
        modules[module] = LoraModule(in_features=a[1], out_features=b[0], rank=a[0])
    return (prefix[:-1] or None), modules


_PEFT_CONFIG = "adapter_config.json"
_MAX_CONFIG_BYTES = 1 << 20


def read_peft_config(adapter_file: Path) -> tuple[PeftScaling | None, bytes]:
    """The scaling of a PEFT folder's adapter (None for a plain file) and the config's bytes (part
    of the adapter's identity); LoraError for what this server cannot apply (DoRA, LoRA biases,
    other PEFT methods) or a malformed config."""
    config_path = adapter_file.parent / _PEFT_CONFIG
    if adapter_file.name != "adapter_model.safetensors" or not config_path.is_file():
        return None, b""
    folder = adapter_file.parent.name
    if config_path.stat().st_size > _MAX_CONFIG_BYTES:
        raise LoraError(f"{_PEFT_CONFIG} of {folder} is larger than 1 MiB")
    raw = config_path.read_bytes()
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"{_PEFT_CONFIG} of {folder} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LoraError(f"{_PEFT_CONFIG} of {folder} is not a JSON object")
    unsupported = [key for key in ("use_dora", "lora_bias") if config.get(key)]
    if config.get("peft_type", "LORA") != "LORA":
        unsupported.append(f"peft_type {config['peft_type']}")
    if unsupported:
        raise LoraError(f"adapter {folder}: its {_PEFT_CONFIG} sets {', '.join(map(str, unsupported))}, which this "
                        "server does not serve (plain LoRA only, with any alpha, rsLoRA and rank or alpha patterns)")

    def number(value, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
            raise LoraError(f"adapter {folder}: {what} in its {_PEFT_CONFIG} must be a positive number, not {value!r}")
        return float(value)

    rank = config.get("r", 8)
    alpha = number(config.get("lora_alpha", rank), "lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict) or not all(isinstance(k, str) for k in patterns):
        raise LoraError(f"adapter {folder}: alpha_pattern in its {_PEFT_CONFIG} must map module names to numbers")
    scaling = PeftScaling(lora_alpha=alpha, use_rslora=bool(config.get("use_rslora")),
                          alpha_pattern={key: number(value, f"alpha_pattern[{key!r}]") for key, value in patterns.items()})
    return scaling, raw


def inspect_file(lora_dir: str | Path, path: str, max_rank: int, max_file_bytes: int,
                 digest: bool = True) -> LoraFile:
    """Check the adapter at `path` (see `resolve_path`): location, format, size, keys and rank."""
    target, relative = resolve_path(lora_dir, path)
    scaling, config = read_peft_config(target)
    stat = target.stat()
    if stat.st_size > max_file_bytes:
        raise LoraError(f"{relative} is {stat.st_size} bytes; at most {max_file_bytes} are accepted "
                        "(lora.max_file_bytes)")
    header = read_header(target, stat.st_size)
    prefix, modules = parse_modules(relative, header, max_rank)
    return LoraFile(path=target, relative=relative, size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                    digest=file_digest(target, config) if digest else "", prefix=prefix, modules=modules,
                    peft_scaling=scaling)


# ---------------------------------------------------------------------------
# What the DiT can take: its linear layers, announced compactly.

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def _block_pattern(name: str) -> tuple[str, int] | None:
    """`blocks.3.ff.net.0` -> ("blocks.#.ff.net.0", 3): the first index in the name is the block's."""
    found = _NUMBER.search(name)
    if found is None:
        return None
    return f"{name[:found.start()]}#{name[found.end():]}", int(found.group())


def target_table(linears: Iterable[tuple[str, int, int]]) -> list[LoraTarget]:
    """The DiT's linear layers (name, in, out) as LoraTargets: a layer repeated in blocks 0..n-1
    with one shape becomes one entry `blocks.#.attn.to_q` with count n; anything else is listed by
    name. (The workers announce this in every heartbeat: a few dozen entries for the released DiT.)"""
    groups: dict[str, list[tuple[str, int, int, int]]] = {}
    for name, fan_in, fan_out in linears:
        pattern, index = _block_pattern(name) or (name, -1)
        groups.setdefault(pattern, []).append((name, index, fan_in, fan_out))
    table = []
    for pattern, members in groups.items():
        shapes = {(m[2], m[3]) for m in members}
        indices = sorted(m[1] for m in members)
        if "#" in pattern and len(shapes) == 1 and indices == list(range(len(members))):
            fan_in, fan_out = shapes.pop()
            table.append(LoraTarget(module=pattern, in_features=fan_in, out_features=fan_out, count=len(members)))
        else:
            table.extend(LoraTarget(module=m[0], in_features=m[2], out_features=m[3]) for m in members)
    return sorted(table, key=lambda t: t.module)


def check_targets(lora: LoraFile, table: list[LoraTarget], name: str) -> None:
    """LoraError unless every module of `lora` is a linear layer of the DiT with the adapter's shapes."""
    by_pattern = {t.module: t for t in table}
    problems = []
    for module, shape in lora.modules.items():
        entry = by_pattern.get(module)
        block = _block_pattern(module)
        if entry is None and block is not None:
            pattern_entry = by_pattern.get(block[0])
            if pattern_entry is not None and block[1] < pattern_entry.count:
                entry = pattern_entry
        if entry is None:
            problems.append(f"{module[:120]!r} is not a linear layer of the DiT")
        elif (entry.in_features, entry.out_features) != (shape.in_features, shape.out_features):
            problems.append(f"{module[:120]!r} is {shape.in_features}->{shape.out_features} in the adapter but "
                            f"{entry.in_features}->{entry.out_features} in the DiT")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LoraError(f"adapter {name!r} does not fit this DiT: {'; '.join(problems[:3])}{more}")
