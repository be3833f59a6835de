"""One request inside the engine: its tokens, how far they are computed, and its blocks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

import torch

from labkit.engine.config import SamplingParams

TokenCallback = Callable[[str, int, bool], None]
LayerKVCallback = Callable[[str, int, torch.Tensor, torch.Tensor], None]
FinishReason = Literal["stop", "length", "abort", "prefilled"]


class Status(Enum):
    WAITING = "waiting"  # has tokens to prefill (new, partly prefilled, or preempted)
    RUNNING = "running"  # decoding one token per step
    PREFILLED = "prefilled"  # prefill_only: done, KV held until export_kv / release
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sp: SamplingParams
    on_token: TokenCallback | None = None
    on_layer_kv: LayerKVCallback | None = None
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    arrival_s: float = field(default_factory=time.perf_counter)
    prefill_start_s: float | None = None  # perf_counter at the start of the step that ran its first chunk
    first_token_s: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """A finished request. finish_reason: "stop" (EOS or a stop id), "length", "abort", or "prefilled"."""

    request_id: str
    prompt_ids: list[int]
    output_token_ids: list[int]
    finish_reason: FinishReason
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    ttft_s: float | None = None  # from add_request to the first token


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one `Engine.step()` did."""

    phase: Literal["prefill", "decode", "mixed", "idle"]
    num_prefill_tokens: int
    num_decode_seqs: int
    new_tokens: dict[str, int]
    finished: list[RequestOutput]
    elapsed_s: float
    context_tokens: int = 0  # summed context of the step's decode sequences (what their attention reads)
    prefill_started: dict[str, int] = field(default_factory=dict)  # request id -> prompt tokens the prefix
    # cache served, for prompts first run this step
