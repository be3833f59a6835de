"""The KV cache of one request, as it leaves a prefill worker and enters a decode worker.

`KVExport` is the contract between the engine (`Engine.export_kv` / `Engine.import_kv`)
and the transports (`labkit.transfer`): metadata that the receiver validates before it
adopts anything, plus two tensors, keys and values, each shaped
`[num_layers, num_tokens, num_kv_heads, head_dim]` (token-major, contiguous). The engine
copies them into its own blocks on import, so the sender's block size does not matter to
the receiver; it is still carried and checked for the lesson on block granularity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: str = "bfloat16") -> int:
    """Bytes of KV cache one token occupies: 2 (K and V) x layers x kv heads x head_dim x dtype bytes."""
    try:
        nbytes = DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} not one of {sorted(DTYPE_BYTES)}") from None
    return 2 * num_layers * num_kv_heads * head_dim * nbytes


class KVShape:
    """Shape arithmetic shared by everything that describes one request's KV (KVExport, wire headers)."""

    __slots__ = ()
    prompt_ids: Any
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(num_layers, num_tokens, num_kv_heads, head_dim) of K (and of V)."""
        return (self.num_layers, self.num_tokens, self.num_kv_heads, self.head_dim)


@dataclass
class KVExport(KVShape):
    """One request's prompt KV plus what the decode side needs to continue."""

    request_id: str
    model_fingerprint: str
    prompt_ids: list[int]
    first_token_id: int  # sampled by the prefill worker, as vLLM's prefill does
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    block_size: int
    k: Any  # torch.Tensor [num_layers, num_tokens, num_kv_heads, head_dim]
    v: Any  # same shape and dtype as k
    extra: dict[str, Any] = field(default_factory=dict)  # sampling params, timings, trace ids

    @property
    def nbytes(self) -> int:
        """Bytes of K and V together."""
        return self.num_tokens * kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def meta(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-ready (what a wire header carries)."""
        return {
            "request_id": self.request_id,
            "model_fingerprint": self.model_fingerprint,
            "prompt_ids": list(self.prompt_ids),
            "first_token_id": int(self.first_token_id),
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "block_size": self.block_size,
            "num_tokens": self.num_tokens,
            "extra": dict(self.extra),
        }

    def validate(self) -> None:
        """Raises ValueError naming the first field that does not fit the tensors."""
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {self.dtype!r} not one of {sorted(DTYPE_BYTES)}")
        for name in ("k", "v"):
            t = getattr(self, name)
            if tuple(t.shape) != self.shape:
                raise ValueError(
                    f"{name}.shape {tuple(t.shape)} does not match {self.shape} "
                    "(num_layers, num_tokens, num_kv_heads, head_dim)"
                )
            if str(t.dtype).removeprefix("torch.") != self.dtype:
                raise ValueError(f"{name}.dtype {t.dtype} does not match dtype {self.dtype!r}")
        if self.num_tokens < 1:
            raise ValueError("num_tokens must be >= 1")
