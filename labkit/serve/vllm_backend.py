"""The router's `--backend vllm`: vLLM's mono or prefill + decode servers (NixlConnector).

The implementation lives with the rest of the vLLM tier, in labkit/vllm/pd_backend.py.
"""
from __future__ import annotations

from labkit.vllm.pd_backend import VllmDisaggBackend

__all__ = ["VllmDisaggBackend"]
