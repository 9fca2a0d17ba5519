"""Exact-repeat cache of finished images, in the router.

A request that names its seed is deterministic: the same prompt, size, seed,
steps, guidance, condition images, output encoding, model, LoRA adapters (their
files' sha256 and scales) and stage config give
the same bytes. Such an image is kept (bounded by bytes, least recently used
out) and a repeat is answered from here without touching a worker. Images made
from a random seed are never looked up: nobody can ask for them again by value.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import replace

from common.protocol import LoraSpec, OriginalPrompt
from router.core.image_request import GeneratedImage
from router.core.metrics import RouterMetrics


def result_key(original: OriginalPrompt, ar_temperature: float, ar_top_p: float, ar_top_k: int,
               model: str, config_fingerprint: str, loras: tuple[LoraSpec, ...] = ()) -> str:
    """Everything that decides an image's bytes, hashed. Adapters count by their bytes (digest) and
    scale, in order; their names do not."""
    digest = hashlib.sha256()
    fields = original.model_dump(mode="python", exclude={"condition_images", "mm_processor_kwargs"})
    digest.update(repr(sorted(fields.items())).encode())
    for image in original.condition_images:
        digest.update(hashlib.sha256(image).digest())
    digest.update(repr((ar_temperature, ar_top_p, ar_top_k, model, config_fingerprint)).encode())
    if loras:  # a request without adapters keeps the key it always had
        digest.update(repr([(spec.digest, spec.scale) for spec in loras]).encode())
    return digest.hexdigest()


class ResultCache:
    """LRU of GeneratedImages by key, at most `max_bytes` of image bytes; `max_bytes` 0 is off."""

    def __init__(self, max_bytes: int, metrics: RouterMetrics):
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._images: OrderedDict[str, GeneratedImage] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: str) -> GeneratedImage | None:
        image = self._images.get(key)
        if image is None:
            self.metrics.result_cache.labels(outcome="miss").inc()
            return None
        self._images.move_to_end(key)
        self.metrics.result_cache.labels(outcome="hit").inc()
        # The stored image as it was made; the timings say it cost nothing now.
        return replace(image, timings={"ar_s": 0.0, "dit_s": 0.0, "total_s": 0.0, "cached": 1.0})

    def put(self, key: str, image: GeneratedImage) -> None:
        if len(image.image) > self.max_bytes or key in self._images:
            return
        self._images[key] = image
        self._bytes += len(image.image)
        while self._bytes > self.max_bytes:
            _, evicted = self._images.popitem(last=False)
            self._bytes -= len(evicted.image)
        self.metrics.result_cache_bytes.set(self._bytes)
