"""Shared fixtures: tiny models built from a config, offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from tests.tiny_models import make_tiny_bert, make_tiny_gpt2  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 64), briefly pretrained on notes from outside any federation."""
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert", pretrain=True)


@pytest.fixture(scope="session")
def tiny_random_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-random-bert",
                          pretrain=False)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")
