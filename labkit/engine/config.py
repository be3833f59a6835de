"""The engine's two configs: how the engine is built (`EngineConfig`) and how one request samples (`SamplingParams`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from labkit.config import doc

Policy = Literal["prefill_first", "chunked", "prefill_only", "decode_only"]
POLICIES: tuple[str, ...] = ("prefill_first", "chunked", "prefill_only", "decode_only")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to build an Engine. Each field's doc is also its flag's help (`labkit.config.add_flags`).

    policy: "prefill_first" runs waiting prompts before any decode step (vLLM v0's default);
      "chunked" fills each step's token budget with every running decode first, then prompt chunks;
      "prefill_only" finishes a request after its prefill (finish_reason "prefilled", unless the first
      token already ends it), holding its KV for `export_kv`; "decode_only" accepts requests only
      through `import_kv`.
    cuda_graphs: on a CPU the same padded inputs run without capture: no speed-up there, but the
      tests check the padding with it.
    """

    model: str = field(
        default="tiny", metadata=doc("a preset name or a Hugging Face model directory (labkit.models.ensure_model)")
    )
    dtype: str = field(default="float32", metadata=doc(f"weights and KV cache dtype, one of {DTYPES}"))
    device: str = field(default="cpu", metadata=doc("'cpu' or 'cuda[:N]'"))
    block_size: int = field(default=16, metadata=doc("tokens per KV block"))
    num_blocks: int | None = field(
        default=None, metadata=doc("KV blocks in the pool; unset: sized from kv_cache_bytes")
    )
    kv_cache_bytes: int = field(default=256 << 20, metadata=doc("bytes of KV cache, when num_blocks is unset"))
    max_num_seqs: int = field(default=64, metadata=doc("requests in one step, at most"))
    max_num_batched_tokens: int = field(
        default=2048, metadata=doc("token budget of one step (a prompt chunk costs its length)")
    )
    policy: Policy = field(default="prefill_first", metadata=doc(f"scheduling, one of {POLICIES} (see the class doc)"))
    enable_prefix_caching: bool = field(
        default=True, metadata=doc("reuse the KV blocks of a prompt prefix computed before")
    )
    max_model_len: int | None = field(
        default=None, metadata=doc("context length, prompt + output; unset: the model's positions")
    )
    compile_decode: bool = field(
        default=False, metadata=doc("on a GPU, run the forward through torch.compile (ignored on a CPU)")
    )
    cuda_graphs: bool = field(
        default=False,
        metadata=doc(
            "on a GPU, replay decode-only steps as CUDA graphs, one per (batch, context) bucket (labkit.engine.cuda_graphs)"
        ),
    )
    random_weights: bool = field(
        default=False,
        metadata=doc(
            "build the preset's shape with random weights directly on the device, no files (tokens are meaningless)"
        ),
    )
    native_kernels: bool = field(
        default=True,
        metadata=doc(
            "on a CPU, run small-batch matmuls and decode attention in the lab's AVX2 kernels (labkit.engine.kernels); "
            "where they cannot build or run, the engine says why once and uses its PyTorch paths"
        ),
    )

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


class RequestError(ValueError):
    """A request the engine refuses. `param` names the request field at fault and `code` says why, so
    a server answers with the same words as an OpenAI API error."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def check_context(num_prompt: int, max_tokens: int, max_model_len: int) -> None:
    """Raises RequestError unless a `num_prompt`-token prompt plus `max_tokens` fits `max_model_len`.

    The one context-length rule: the router applies it at the edge, the engine as the last guard.
    """
    if num_prompt + max_tokens > max_model_len:
        raise RequestError(
            f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = {num_prompt + max_tokens} "
            f"exceeds the model's context length (max_model_len {max_model_len}); shorten the prompt "
            "or lower max_tokens",
            "max_tokens",
            "context_length_exceeded",
        )


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
