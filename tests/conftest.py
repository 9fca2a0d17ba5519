"""Shared fixtures: the tiny model (built once per session) and a running cluster per module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.local_cluster import Cluster
from model_presets.tiny_model import build_tiny_model

# The shared assert helpers get pytest's detailed failure messages too (before any test imports them).
pytest.register_assert_rewrite("tests.helpers")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny random-weight GLM-Image; cached under models/ (gitignored), rebuilt if absent."""
    path = Path(os.environ.get("GLM_TINY_MODEL", ROOT / "models" / "tiny-glm-image"))
    return build_tiny_model(path)


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    """Router + 1 AR + 1 DiT worker on the tiny model, shared by a test module."""
    with Cluster(model=tiny_model, workdir=tmp_path_factory.mktemp("cluster")) as c:
        yield c
