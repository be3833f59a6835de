"""How big a request's KV cache is, how long a link takes to move it, and when recomputing wins.

Pure arithmetic (no I/O), shared by the notebook, the benchmark and the CLI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from labkit.kv import DTYPE_BYTES, kv_bytes_per_token
from labkit.links import LINKS, How, Link


@dataclass(frozen=True, slots=True)
class KVShape:
    """The KV-relevant shape of a model: layers, kv heads, head_dim and the cache dtype."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        for f in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {self.dtype!r} not one of {sorted(DTYPE_BYTES)}")

    @property
    def kv_bytes_per_token(self) -> int:
        """2 (K and V) x layers x kv heads x head_dim x dtype bytes."""
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def kv_bytes(self, num_tokens: int) -> int:
        """Bytes of one request's KV cache for a `num_tokens` prompt."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return num_tokens * self.kv_bytes_per_token


# Llama-3.1-70B / Llama-3.3-70B: 80 layers, 8 kv heads (GQA), head_dim 128 -> 327,680 B/token in bf16.
LLAMA_70B = KVShape("llama-3.1-70b", 80, 8, 128, "bfloat16")


def kv_shapes(cache_dtype_for_presets: str | None = None) -> dict[str, KVShape]:
    """The lab's presets plus the 70B shape, by name.

    The presets' cache dtype is what they run in (tiny/small: float32 on a CPU; real shapes:
    bfloat16) unless `cache_dtype_for_presets` says otherwise.
    """
    from labkit.models import PRESETS

    out: dict[str, KVShape] = {}
    for name, p in PRESETS.items():
        head_dim = p.head_dim or p.hidden_size // p.num_attention_heads
        out[name] = KVShape(
            name, p.num_hidden_layers, p.num_key_value_heads, head_dim, cache_dtype_for_presets or p.writable_dtype
        )
    out[LLAMA_70B.name] = LLAMA_70B
    return out


def fit_link(nbytes: Sequence[int], seconds: Sequence[float], name: str = "", how: How = "measured") -> Link:
    """The Link that least-squares fits `seconds = fixed_s + nbytes / bytes_per_s` to timed transfers.

    The fixed part is clamped at >= 0 (per-request overhead cannot be negative).
    """
    if len(nbytes) != len(seconds) or len(nbytes) < 2:
        raise ValueError("need at least two (nbytes, seconds) points of equal count")
    n = len(nbytes)
    mx, my = sum(nbytes) / n, sum(seconds) / n
    sxx = sum((x - mx) ** 2 for x in nbytes)
    if sxx == 0:
        raise ValueError("need at least two different sizes")
    slope = sum((x - mx) * (y - my) for x, y in zip(nbytes, seconds)) / sxx
    if slope <= 0:
        raise ValueError("seconds do not grow with size: too noisy to fit")
    return Link(1.0 / slope, max(0.0, my - slope * mx), name, how)


def break_even_tokens(
    recompute_s: Callable[[int], float], transfer_s: Callable[[int], float], max_tokens: int = 1 << 17
) -> int | None:
    """Smallest prompt length (tokens) from which transferring the KV is faster than recomputing it.

    `recompute_s(n)` and `transfer_s(n)` give seconds for an n-token prompt. Returns 1 if the
    transfer always wins, None if it never wins up to `max_tokens`. Assumes a single crossing
    (prefill grows at least linearly in n, transfer linearly): found by bisection.
    """
    if transfer_s(1) <= recompute_s(1):
        return 1
    if transfer_s(max_tokens) > recompute_s(max_tokens):
        return None
    lo, hi = 1, max_tokens  # transfer loses at lo, wins at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if transfer_s(mid) <= recompute_s(mid):
            hi = mid
        else:
            lo = mid
    return hi


def datasheet_links() -> list[Link]:
    """10/25/100/400 Gbps and NVLink 4 (`labkit.links.LINKS`), computed from line rate and a round trip."""
    return list(LINKS.values())


def request_table(shapes: Sequence[KVShape], prompt_lens: Sequence[int], links: Sequence[Link]) -> list[dict]:
    """One row per (model, prompt length, link): KV bytes and transfer time (s)."""
    rows = []
    for shape in shapes:
        for n in prompt_lens:
            nbytes = shape.kv_bytes(n)
            for link in links:
                rows.append(
                    {
                        "model": shape.name,
                        "prompt_tokens": n,
                        "kv_bytes": nbytes,
                        "link": link.label,
                        "how": link.how,
                        "seconds": link.seconds(nbytes),
                    }
                )
    return rows


def layerwise_arrivals(
    layer_compute_s: Sequence[float], layer_transfer_s: Sequence[float]
) -> list[tuple[float, float]]:
    """Layer-wise streaming, event by event: layer i is computed after the layers before it, then
    crosses a link that carries one layer at a time. Returns (computed at, arrived at) per layer,
    in seconds from the prefill's start; the last arrival is when the decode side holds the whole KV."""
    if len(layer_compute_s) != len(layer_transfer_s) or not layer_compute_s:
        raise ValueError("need one compute time and one transfer time per layer (at least one layer)")
    if min(*layer_compute_s, *layer_transfer_s) < 0:
        raise ValueError("times must be >= 0")
    out: list[tuple[float, float]] = []
    computed = link_free = 0.0
    for c, t in zip(layer_compute_s, layer_transfer_s):
        computed += c
        link_free = max(computed, link_free) + t  # it leaves once computed and once the link is free
        out.append((computed, link_free))
    return out


def fit_prefill_seconds(prompt_lens: Sequence[int], seconds: Sequence[float]) -> Callable[[float], float]:
    """Prefill time as a function of prompt length, `a + b·n + c·n²` (the n² is attention) fitted by least
    squares to measured points, each coefficient >= 0 (a term that fits negative is dropped); returns
    n -> seconds. Two points fit `a + b·n` only."""
    import numpy as np

    if len(prompt_lens) != len(seconds) or len(set(prompt_lens)) < 2:
        raise ValueError("need at least two different prompt lengths, one time each")
    n = np.asarray(prompt_lens, dtype=float)
    y = np.asarray(seconds, dtype=float)
    terms = [0, 1, 2] if len(set(prompt_lens)) > 2 else [0, 1]
    while True:
        coef, *_ = np.linalg.lstsq(np.stack([n**k for k in terms], axis=1), y, rcond=None)
        if (coef >= 0).all() or len(terms) == 1:
            break
        terms.pop(int(np.argmin(coef)))
    fitted = {k: max(0.0, float(c)) for k, c in zip(terms, coef)}
    return lambda x: sum(c * float(x) ** k for k, c in fitted.items())
