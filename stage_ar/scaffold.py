"""The AR prompt scaffold, built by the checkpoint's own GLM-Image processor for the target size.

Both AR engines call this, exactly as diffusers' pipeline does: one batch of one
conversation (for an unbatched conversation the processor leaves the condition
images' grids out of `image_grid_thw`), the condition images before the text,
and the target size as `target_h`/`target_w` processor kwargs (without them the
processor emits no grid scaffold and the AR collapses to a few repeated codes).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from common.sizes import ImageSize


def build_scaffold(processor: Any, prompt: str, size: ImageSize, condition_images: list[Image.Image]) -> Any:
    """`input_ids`, `image_grid_thw` (condition grids first, then the target grid) and, for
    image-to-image, `pixel_values`, as PyTorch tensors."""
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in condition_images]
    content.append({"type": "text", "text": prompt})
    return processor.apply_chat_template(
        [[{"role": "user", "content": content}]],
        tokenize=True,
        processor_kwargs={"target_h": size.height, "target_w": size.width},
        return_dict=True,
        return_tensors="pt",
    )
