#!/usr/bin/env python3
"""GLM-Image through the OpenAI chat completions API: text-to-image, or image-to-image with --image.

    python examples/openai_chat_client.py -p 'a lighthouse, "HELLO" painted on it' -o out.png --height 512 --width 512
    python examples/openai_chat_client.py -p "make it snow" -i photo.png -o snowy.png

The flags are those of vLLM-Omni's GLM-Image example client, so scripts written for it carry
over; only the server default differs ($GLM_URL, else http://127.0.0.1:8000). Options left out
use the server's defaults. Needs only httpx (installed with glm-image-serve).
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import sys
from pathlib import Path

import httpx

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def image_part(path: Path) -> dict:
    """A chat content part carrying the image file as a data URL."""
    media = mimetypes.guess_type(path.name)[0] or "image/png"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}


def chat_body(args: argparse.Namespace) -> dict:
    """The /v1/chat/completions body; GLM-Image options go in extra_body, as vLLM-Omni sends them."""
    content = [{"type": "text", "text": args.prompt}] + [image_part(Path(p)) for p in args.image or []]
    options = {"height": args.height, "width": args.width, "num_inference_steps": args.steps,
               "guidance_scale": args.guidance_scale, "seed": args.seed, "negative_prompt": args.negative}
    extra_body = {k: v for k, v in options.items() if v is not None}
    output_format = FORMATS.get(Path(args.output).suffix.lower())
    if output_format:  # so that out.jpg holds JPEG bytes
        extra_body["output_format"] = output_format
    return {"messages": [{"role": "user", "content": content}], "extra_body": extra_body}


def generate(args: argparse.Namespace) -> bytes:
    """The image's bytes; raises SystemExit with the server's message on failure."""
    headers = {}
    if os.environ.get("GLM_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['GLM_API_KEY']}"
    try:
        response = httpx.post(f"{args.server.rstrip('/')}/v1/chat/completions", json=chat_body(args),
                              headers=headers, timeout=args.timeout)
    except httpx.HTTPError as exc:
        raise SystemExit(f"error: cannot reach {args.server}: {exc}") from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise SystemExit(f"error {response.status_code}: {message}")
    url = response.json()["choices"][0]["message"]["content"][0]["image_url"]["url"]
    return base64.b64decode(url.split(",", 1)[1])  # after "data:image/png;base64,"


def main() -> None:
    parser = argparse.ArgumentParser(description="GLM-Image chat completions client")
    parser.add_argument("--prompt", "-p", default="A beautiful sunset over the ocean with sailing boats",
                        help="text prompt (default: %(default)s)")
    parser.add_argument("--output", "-o", default="glm_image_output.png", help="output file (default: %(default)s)")
    parser.add_argument("--server", "-s", default=os.environ.get("GLM_URL", "http://127.0.0.1:8000"),
                        help="server URL (default: $GLM_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--image", "-i", action="append", help="input image for image-to-image; repeat for several")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the server's)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the server's)")
    parser.add_argument("--steps", type=int, help="inference steps (default: the server's)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default: the server's)")
    parser.add_argument("--seed", type=int, help="random seed (default: the server's)")
    parser.add_argument("--negative", help="negative prompt (accepted; GLM-Image has no negative conditioning)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the image (default: %(default)s)")
    args = parser.parse_args()

    mode = "image-to-image" if args.image else "text-to-image"
    print(f"{mode} request to {args.server}: {args.prompt!r}", file=sys.stderr)
    image = generate(args)
    Path(args.output).write_bytes(image)
    print(f"Image saved to: {args.output} ({len(image) / 1024:.1f} KB)")


if __name__ == "__main__":
    main()
