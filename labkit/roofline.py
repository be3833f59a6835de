"""FLOPs and bytes of prefill and decode, from a model's Hugging Face config; MFU, MBU, critical batch.

Counting rules (stated once, used everywhere):
- A matmul of [m, k] @ [k, n] is 2·m·k·n FLOPs. Bias adds, norms, RoPE, softmax and the
  SiLU are left out: they are under 1% of the FLOPs of these models (and
  `torch.utils.flop_counter.FlopCounterMode` leaves them out too).
- Attention scores and the weighted sum are two matmuls per head: 4·heads·head_dim·q·k FLOPs.
  `attention="causal"` counts only the keys a query may see (the work a causal kernel needs);
  `attention="full"` counts the whole q×k square, which is what FlopCounterMode reports for
  `scaled_dot_product_attention`.
- The lm_head: serving computes logits only for the last token of each sequence in prefill
  (`logits="last"`, the default); a plain `model(input_ids)` computes them for every token
  (`logits="all"`).
- Bytes are the minimum a step must move: every weight read once per step (the embedding table
  only for the rows it looks up, unless it is tied to the lm_head), the KV cache read, the new
  KV written. Activations are left out (small next to weights at the batch sizes of decode).

    >>> s = ModelShape.from_config("small")
    >>> decode_cost(s, batch=1, context_len=512, dtype="float32").intensity_flop_per_byte  # ≈ 0.5
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from labkit.kv import DTYPE_BYTES, kv_bytes_per_token

Attention = Literal["causal", "full"]
Logits = Literal["last", "all"]


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the FLOP and byte counts need from a Llama / Qwen2 / Mistral config (GQA included)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        for f in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @classmethod
    def from_config(cls, config: dict[str, Any] | str | os.PathLike[str] | Any) -> ModelShape:
        """From an HF config dict, a transformers PretrainedConfig, a preset name or a model directory."""
        if isinstance(config, (str, os.PathLike)):
            from labkit.models import load_config

            name = str(config)
            config = load_config(config)
        else:
            name = ""
        if not isinstance(config, dict):  # a transformers PretrainedConfig
            config = config.to_dict()
        mt = config.get("model_type", "llama")
        if mt not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"model_type {mt!r} not supported; the lab counts llama, qwen2 and mistral")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=mt == "qwen2" or bool(config.get("attention_bias", False)),
            name=name or str(config.get("_name_or_path", "")),
        )

    # --- parameters ------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's matmuls: q, k, v, o projections and the gated MLP."""
        h = self.hidden_size
        return h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h + 3 * h * self.intermediate_size

    @property
    def layer_other_params(self) -> int:
        """Two RMSNorm weights, plus q/k/v biases where the family has them."""
        return 2 * self.hidden_size + (self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """The output projection's weights (the same tensor as the embedding when tied)."""
        return self.vocab_size * self.hidden_size

    @property
    def parameter_count(self) -> int:
        """Every parameter, counting a tied embedding/lm_head once."""
        lm = 0 if self.tie_word_embeddings else self.lm_head_params
        return (
            self.num_layers * (self.layer_matmul_params + self.layer_other_params)
            + self.embedding_params
            + lm
            + self.hidden_size
        )

    def parameter_bytes(self, dtype: str = "bfloat16") -> int:
        """Bytes of all parameters in `dtype`."""
        return self.parameter_count * _dtype_bytes(dtype)

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """KV-cache bytes per token: 2 · layers · kv_heads · head_dim · dtype bytes."""
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, dtype)

    def weight_bytes_per_step(self, dtype: str, tokens: int) -> int:
        """Weight bytes one forward step reads: every layer, the final norm and the lm_head once,
        plus the embedding rows of `tokens` tokens (none extra when tied: the lm_head read them all)."""
        layers = self.num_layers * (self.layer_matmul_params + self.layer_other_params) + self.hidden_size
        rows = 0 if self.tie_word_embeddings else min(tokens, self.vocab_size) * self.hidden_size
        return (layers + self.lm_head_params + rows) * _dtype_bytes(dtype)


@dataclass(frozen=True, slots=True)
class PhaseCost:
    """FLOPs and minimum bytes of one prefill or one decode step, and the tokens it yields."""

    phase: Literal["prefill", "decode"]
    flops: float
    bytes: float
    tokens: int  # tokens processed (prefill: batch·prompt_len; decode: batch)
    batch: int
    seq_len: int  # prefill: prompt length; decode: context length before the step
    matmul_flops: float  # the weight matmuls and lm_head
    attention_flops: float

    @property
    def intensity_flop_per_byte(self) -> float:
        """Arithmetic intensity: FLOPs per byte moved."""
        return self.flops / self.bytes

    def mfu(self, seconds: float, peak_flops: float) -> float:
        """Model FLOP utilization: FLOPs / seconds / peak FLOP/s (0..1)."""
        return self.flops / _positive(seconds, "seconds") / _positive(peak_flops, "peak_flops")

    def mbu(self, seconds: float, peak_bytes_per_s: float) -> float:
        """Model bandwidth utilization: minimum bytes / seconds / peak bytes/s (0..1)."""
        return self.bytes / _positive(seconds, "seconds") / _positive(peak_bytes_per_s, "peak_bytes_per_s")

    def roofline_time_s(self, peak_flops: float, peak_bytes_per_s: float) -> float:
        """The fastest this step can run: max(FLOPs / peak FLOP/s, bytes / bandwidth), in seconds."""
        return max(
            self.flops / _positive(peak_flops, "peak_flops"),
            self.bytes / _positive(peak_bytes_per_s, "peak_bytes_per_s"),
        )

    def bound(self, ridge_flop_per_byte: float) -> Literal["compute", "memory"]:
        """Which roof limits this step on a device with that ridge point."""
        return "compute" if self.intensity_flop_per_byte >= ridge_flop_per_byte else "memory"


def _dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} not one of {sorted(DTYPE_BYTES)}") from None


def _positive(x: float, name: str) -> float:
    if not x > 0:
        raise ValueError(f"{name} must be > 0, got {x!r}")
    return x


def _check(batch: int, n: int, what: str) -> None:
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if n < (1 if what == "prompt_len" else 0):
        raise ValueError(f"{what} must be >= {1 if what == 'prompt_len' else 0}, got {n}")


def _attn_pairs(q_len: int, past_len: int, attention: Attention) -> int:
    """(query, key) pairs one sequence's attention computes, for q_len new tokens after past_len cached."""
    if attention == "full":
        return q_len * (past_len + q_len)
    if attention == "causal":
        return q_len * past_len + q_len * (q_len + 1) // 2
    raise ValueError(f"attention must be 'causal' or 'full', got {attention!r}")


def forward_flops(
    shape: ModelShape,
    batch: int,
    q_len: int,
    past_len: int = 0,
    *,
    attention: Attention = "causal",
    logits: Logits = "last",
) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one forward over q_len new tokens per sequence."""
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
    tokens = batch * q_len
    lm_tokens = batch if logits == "last" else tokens
    matmul = 2.0 * tokens * shape.num_layers * shape.layer_matmul_params + 2.0 * lm_tokens * shape.lm_head_params
    attn = 4.0 * batch * shape.num_layers * shape.num_heads * shape.head_dim * _attn_pairs(q_len, past_len, attention)
    return matmul, attn


def prefill_cost(
    shape: ModelShape,
    prompt_len: int,
    batch: int = 1,
    dtype: str = "bfloat16",
    *,
    attention: Attention = "causal",
    logits: Logits = "last",
) -> PhaseCost:
    """FLOPs and minimum bytes (weights read once, KV written) to prefill `batch` prompts of prompt_len tokens."""
    _check(batch, prompt_len, "prompt_len")
    mm, attn = forward_flops(shape, batch, prompt_len, 0, attention=attention, logits=logits)
    nbytes = shape.weight_bytes_per_step(dtype, batch * prompt_len) + batch * prompt_len * shape.kv_bytes_per_token(
        dtype
    )
    return PhaseCost("prefill", mm + attn, float(nbytes), batch * prompt_len, batch, prompt_len, mm, attn)


def decode_cost(
    shape: ModelShape, batch: int = 1, context_len: int = 0, dtype: str = "bfloat16", *, attention: Attention = "causal"
) -> PhaseCost:
    """FLOPs and minimum bytes of one decode step: `batch` sequences with context_len cached tokens each.

    Bytes: weights once, every cached KV read, one new KV row written per sequence.
    """
    _check(batch, context_len, "context_len")
    mm, attn = forward_flops(shape, batch, 1, context_len, attention=attention, logits="last")
    kvb = shape.kv_bytes_per_token(dtype)
    nbytes = shape.weight_bytes_per_step(dtype, batch) + batch * context_len * kvb + batch * kvb
    return PhaseCost("decode", mm + attn, float(nbytes), batch, batch, context_len, mm, attn)


def offline_bound_s(
    shape: ModelShape,
    requests: int,
    prompt_len: int,
    output_len: int,
    dtype: str,
    peak_flops: float,
    peak_bytes_per_s: float,
) -> dict[str, float]:
    """The fastest any engine can serve an offline batch on a device with these roofs: `requests` prompts of
    prompt_len tokens prefilled (one token each), then decoded together to output_len tokens, every step at
    its roofline time. Returns {"prefill_s", "decode_s", "total_s"}.

    A lower bound for every engine alike: an engine that takes wall seconds is at total_s / wall of it,
    and no engine can be more than wall_B / total_s times as fast as an engine B that was measured.
    """
    _check(requests, prompt_len, "prompt_len")
    if output_len < 1:
        raise ValueError(f"output_len must be >= 1, got {output_len}")
    pre = prefill_cost(shape, prompt_len, requests, dtype).roofline_time_s(peak_flops, peak_bytes_per_s)
    dec = sum(
        decode_cost(shape, requests, prompt_len + k, dtype).roofline_time_s(peak_flops, peak_bytes_per_s)
        for k in range(1, output_len)
    )
    return {"prefill_s": pre, "decode_s": dec, "total_s": pre + dec}


def critical_batch(
    shape: ModelShape,
    ridge_flop_per_byte: float,
    dtype: str = "bfloat16",
    context_len: int = 0,
    max_batch: int = 1 << 16,
) -> int | None:
    """Smallest decode batch whose intensity reaches the ridge (decode turns compute-bound), or None.

    With context_len = 0 this is ≈ ridge · dtype_bytes / 2 (H100 bf16: 989e12 / 3.35e12 ≈ 295).
    Long contexts add KV bytes that grow with the batch, so the ridge may never be reached: None.
    """
    _positive(ridge_flop_per_byte, "ridge_flop_per_byte")

    def reaches(b: int) -> bool:
        return decode_cost(shape, b, context_len, dtype).intensity_flop_per_byte >= ridge_flop_per_byte

    if not reaches(max_batch):
        return None
    lo, hi = 1, max_batch  # intensity grows with batch: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def summary(shape: ModelShape, dtype: str = "bfloat16") -> dict[str, Any]:
    """The headline numbers of a model shape: parameters, bytes, KV bytes per token."""
    return {
        "model": shape.name,
        "parameters": shape.parameter_count,
        "parameter_bytes": shape.parameter_bytes(dtype),
        "kv_bytes_per_token": shape.kv_bytes_per_token(dtype),
        "layers": shape.num_layers,
        "kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "dtype": dtype,
    }
