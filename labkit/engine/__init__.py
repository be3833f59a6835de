"""The lab's inference engine: paged KV cache, continuous batching, prefix caching, KV export/import.

from labkit.engine import Engine, EngineConfig, SamplingParams
eng = Engine(EngineConfig(model="tiny"))
print(eng.generate([[256, 72, 105]], SamplingParams(max_tokens=8))[0].output_token_ids)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labkit.engine.config import EngineConfig, RequestError, SamplingParams

if TYPE_CHECKING:
    from labkit.engine.engine import Engine
    from labkit.engine.sequence import RequestOutput, StepOutput

__all__ = ["Engine", "EngineConfig", "RequestError", "RequestOutput", "SamplingParams", "StepOutput"]


def __getattr__(name: str) -> Any:
    """Engine and its outputs load torch: imported on first use, so the configs stay light (the
    router and the launcher build them without torch)."""
    if name == "Engine":
        from labkit.engine.engine import Engine

        return Engine
    if name in ("RequestOutput", "StepOutput"):
        from labkit.engine import sequence

        return getattr(sequence, name)
    raise AttributeError(f"module 'labkit.engine' has no attribute {name!r}")
