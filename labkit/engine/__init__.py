"""The lab's inference engine: paged KV cache, continuous batching, prefix caching, KV export/import.

    from labkit.engine import Engine, EngineConfig, SamplingParams
    eng = Engine(EngineConfig(model="tiny"))
    print(eng.generate([[256, 72, 105]], SamplingParams(max_tokens=8))[0].output_token_ids)
"""
from __future__ import annotations

from labkit.engine.config import EngineConfig, SamplingParams
from labkit.engine.engine import Engine
from labkit.engine.sequence import RequestOutput, StepOutput

__all__ = ["Engine", "EngineConfig", "SamplingParams", "StepOutput", "RequestOutput"]
