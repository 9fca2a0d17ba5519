"""Log format shared by every process: process role first, request ids go in messages as [rid]."""

from __future__ import annotations

import logging
import os


def configure_logging(role: str) -> None:
    level = os.environ.get("GLM_SERVE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s",
        force=True,
    )
    # Model loading is chatty at INFO.
    for noisy in ("httpx", "transformers", "diffusers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
