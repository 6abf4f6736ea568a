"""Shared fixtures: tiny SD3.5 checkpoints generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd35trt.export.tiny_model import write_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {v: write_tiny_model(root / v, variant=v, seed=0) for v in ("medium", "large", "turbo")}


@pytest.fixture(scope="session")
def tiny_medium(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["medium"]
