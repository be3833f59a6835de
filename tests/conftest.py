"""Shared fixtures. Models are written once per machine under LABKIT_HOME (as the notebooks do)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from labkit.models import ensure_model

    return ensure_model("tiny", quiet=True)


@pytest.fixture(scope="session")
def small_model_dir() -> Path:
    from labkit.models import ensure_model

    return ensure_model("small", quiet=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips GPU tests without a GPU and vLLM tests without vLLM, saying why."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    try:
        import importlib.util

        has_vllm = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        has_vllm = False
    for item in items:
        # markers, not item.keywords: keywords also hold directory names (a checkout under .../gpu/)
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if item.get_closest_marker("vllm") and not has_vllm:
            item.add_marker(pytest.mark.skip(reason="vLLM not installed (make vllm)"))
