"""The engine's two configs: how the engine is built (`EngineConfig`) and how one request samples (`SamplingParams`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Policy = Literal["prefill_first", "chunked", "prefill_only", "decode_only"]
POLICIES: tuple[str, ...] = ("prefill_first", "chunked", "prefill_only", "decode_only")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to build an Engine.

    model: a preset name or a Hugging Face model directory (resolved by `labkit.models.ensure_model`).
    num_blocks: KV blocks in the pool; None sizes the pool from `kv_cache_bytes`.
    policy: "prefill_first" runs waiting prompts before any decode step (vLLM v0's default);
      "chunked" fills each step's token budget with every running decode first, then prompt chunks;
      "prefill_only" finishes a request after its prefill (finish_reason "prefilled"), holding its KV
      for `export_kv`; "decode_only" accepts requests only through `import_kv`.
    compile_decode: on a GPU, run the forward through `torch.compile` (ignored on a CPU).
    cuda_graphs: on a GPU, replay decode-only steps as CUDA graphs, one per (batch, context) bucket
      (`labkit.engine.cuda_graphs`). On a CPU the same padded inputs run without capture: no
      speed-up there, but the tests check the padding with it.
    random_weights: build the preset's shape with random weights directly on `device`, no files
      (the 8B shape on a GPU without writing 16 GB to disk first). Tokens are meaningless.
    native_kernels: on a CPU, run small-batch matmuls and decode attention in the lab's AVX2
      kernels (`labkit.engine.kernels`: batch-1 decode at the bandwidth roof, and bf16 on a CPU).
      Where they cannot build or run, the engine says why once and uses its PyTorch paths.
    """

    model: str = "tiny"
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int = 256 << 20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    policy: Policy = "prefill_first"
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    compile_decode: bool = False
    cuda_graphs: bool = False
    random_weights: bool = False
    native_kernels: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not one of {DTYPES}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r} not one of {POLICIES}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device {self.device!r}: use 'cpu' or 'cuda[:N]'")
        for name in ("block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 or None, got {self.num_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 or None, got {self.max_model_len}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 is greedy. With a seed, the token at position p is drawn from a generator
    seeded by (seed, p), so a request gives the same tokens in one engine or split between a
    prefill engine and a decode engine, whatever it was batched with.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        # Accept a list from JSON callers; store a tuple so the dataclass stays hashable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
