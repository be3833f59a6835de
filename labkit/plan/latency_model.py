"""A latency model of one serving instance, fitted by least squares from measured steps.

Two formulas, one per phase, each with a physical reading:

    prefill_s(T)         = a + b·T + c·T²        a: per-step overhead, b: weight FLOPs per token,
                                                 c: attention (every token attends to the ones before)
    decode_step_s(B, S)  = a + b·S + c·B         a: reading the weights once per step (memory-bound),
                                                 b: reading the KV cache (S = context tokens of the batch),
                                                 c: per-sequence work (sampling, bookkeeping, small matmuls)

The fit keeps every coefficient non-negative (a negative attention term would predict negative
time for long prompts), reports R² per phase, and saves the samples it came from. The decode fit
minimizes *relative* residuals: a real decode step bends (memory-bound at small batch,
compute-bound at large), which a straight line cannot follow everywhere, and a plain fit would
follow the 200 ms batch-32 steps and miss the 20 ms batch-1 steps by half, where serving at low
load lives. Relative residuals make a 10% miss cost the same at every batch size.

A server adds its own costs on top of the engine's steps: parsing and routing a request,
streaming every token through SSE and the router, and on a small CPU the server's threads taking
cores from the model's. `serve_request_s` (added to every TTFT), `serve_token_s` (added to every
decode step) and `serve_seq_s` (added to every decode step per running sequence: each one's token
is an SSE event for the worker, the router and the client) hold them;
`labkit.plan.calibrate.serving_overhead` measures them from a few requests sent through the real
server one at a time and a few sent together. They are 0 in a model of the engine alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class PrefillSample:
    """One measured prefill step: `num_tokens` prompt tokens (one sequence) in `elapsed_s` seconds."""

    num_tokens: int
    elapsed_s: float

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or not self.elapsed_s > 0:
            raise ValueError(f"PrefillSample needs num_tokens >= 1 and elapsed_s > 0, got {self}")


@dataclass(frozen=True, slots=True)
class DecodeSample:
    """One measured decode step: `batch_size` sequences holding `context_tokens` KV tokens in total."""

    batch_size: int
    context_tokens: int
    elapsed_s: float

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.context_tokens < self.batch_size or not self.elapsed_s > 0:
            raise ValueError(
                f"DecodeSample needs batch_size >= 1, context_tokens >= batch_size, elapsed_s > 0, got {self}"
            )


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Fitted step times of one instance (one device, or one tensor-parallel group)."""

    prefill_a_s: float
    prefill_b_s_per_token: float
    prefill_c_s_per_token2: float
    decode_a_s: float
    decode_b_s_per_ctx_token: float
    decode_c_s_per_seq: float
    kv_bytes_per_token: int
    r2_prefill: float = math.nan
    r2_decode: float = math.nan
    model: str = ""
    device: str = ""
    note: str = ""  # where the numbers came from ("measured", "scaled to H100 SXM: estimate", ...)
    serve_request_s: float = 0.0  # the server's cost per request, on top of the prefill (TTFT)
    serve_token_s: float = 0.0  # the server's cost per decode step, on top of the engine's step
    serve_seq_s: float = 0.0  # ... and per running sequence in that step (one streamed token each)

    def __post_init__(self) -> None:
        for name in (
            "prefill_a_s",
            "prefill_b_s_per_token",
            "prefill_c_s_per_token2",
            "decode_a_s",
            "decode_b_s_per_ctx_token",
            "decode_c_s_per_seq",
            "serve_request_s",
            "serve_token_s",
            "serve_seq_s",
        ):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"LatencyModel.{name} must be finite and >= 0, got {v!r}")
        if self.prefill_a_s + self.prefill_b_s_per_token + self.prefill_c_s_per_token2 <= 0:
            raise ValueError("LatencyModel: a prefill costs nothing (a, b and c all 0)")
        if self.decode_a_s + self.decode_b_s_per_ctx_token + self.decode_c_s_per_seq <= 0:
            raise ValueError("LatencyModel: a decode step costs nothing (a, b and c all 0)")
        if self.kv_bytes_per_token < 0:
            raise ValueError(f"kv_bytes_per_token must be >= 0, got {self.kv_bytes_per_token}")

    # --- predictions (numbers or numpy arrays) ---------------------------------------------
    def prefill_s(self, num_tokens: Any) -> Any:
        """Seconds to prefill one prompt of `num_tokens` tokens (no cached prefix)."""
        t = np.asarray(num_tokens, dtype=float) if not isinstance(num_tokens, (int, float)) else float(num_tokens)
        return self.prefill_a_s + self.prefill_b_s_per_token * t + self.prefill_c_s_per_token2 * t * t

    def chunk_work_s(self, offset_tokens: float, num_tokens: float) -> float:
        """Seconds of work (no step overhead) to prefill tokens [offset, offset+num) of a prompt.

        The tokens before `offset` are already in the KV cache (an earlier chunk or a prefix-cache
        hit); the new tokens still attend to them, which the quadratic term accounts for.
        """
        end = offset_tokens + num_tokens
        return self.prefill_b_s_per_token * num_tokens + self.prefill_c_s_per_token2 * (
            end * end - offset_tokens * offset_tokens
        )

    def decode_step_s(self, batch_size: Any, context_tokens: Any) -> Any:
        """Seconds for one decode step of `batch_size` sequences holding `context_tokens` in total
        (the server's per-step cost included)."""
        return (
            self.decode_a_s
            + self.serve_token_s
            + self.decode_b_s_per_ctx_token * context_tokens
            + (self.decode_c_s_per_seq + self.serve_seq_s) * batch_size
        )

    @property
    def step_overhead_s(self) -> float:
        """The fixed cost of any step (a mixed step pays it once)."""
        return max(self.prefill_a_s, self.decode_a_s + self.serve_token_s)

    def with_serving(self, request_s: float, token_s: float, seq_s: float = 0.0) -> LatencyModel:
        """This model plus a server's measured costs per request, per decode step and per running
        sequence in a step (see serving_overhead)."""
        from dataclasses import replace

        return replace(self, serve_request_s=float(request_s), serve_token_s=float(token_s), serve_seq_s=float(seq_s))

    @property
    def engine_only(self) -> LatencyModel:
        """This model without the server's costs."""
        return self.with_serving(0.0, 0.0, 0.0)

    def tpot_floor_s(self, context_tokens: float) -> float:
        """Fastest possible time per output token: batch 1 at this context (seconds)."""
        return float(self.decode_step_s(1, context_tokens))

    # --- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyModel:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"LatencyModel: unknown fields {sorted(unknown)}")
        return cls(**d)

    def describe(self) -> str:
        """Both formulas with their coefficients (ms, µs, ns) and R²."""
        return (
            f"prefill(T)        = {self.prefill_a_s * 1e3:.3g} ms + {self.prefill_b_s_per_token * 1e6:.3g} µs·T"
            f" + {self.prefill_c_s_per_token2 * 1e9:.3g} ns·T²   (R² {self.r2_prefill:.3f})\n"
            f"decode_step(B, S) = {self.decode_a_s * 1e3:.3g} ms + {self.decode_b_s_per_ctx_token * 1e9:.3g} ns·S"
            f" + {self.decode_c_s_per_seq * 1e6:.3g} µs·B   (R² {self.r2_decode:.3f})"
            + (
                f"\nserver            = +{self.serve_request_s * 1e3:.3g} ms per request (TTFT), "
                f"+{self.serve_token_s * 1e3:.3g} ms per decode step + {self.serve_seq_s * 1e3:.3g} ms·B"
                if self.serve_request_s or self.serve_token_s or self.serve_seq_s
                else ""
            )
        )


@dataclass(frozen=True, slots=True)
class Calibration:
    """A fitted model plus the measurements it came from (what `save` writes as JSON)."""

    model: LatencyModel
    prefill_samples: tuple[PrefillSample, ...]
    decode_samples: tuple[DecodeSample, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Writes JSON (parent created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "model": self.model.to_dict(),
            "prefill_samples": [asdict(s) for s in self.prefill_samples],
            "decode_samples": [asdict(s) for s in self.decode_samples],
            "meta": self.meta,
        }
        path.write_text(json.dumps(doc, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        doc = json.loads(Path(path).read_text())
        try:
            return cls(
                LatencyModel.from_dict(doc["model"]),
                tuple(PrefillSample(**s) for s in doc["prefill_samples"]),
                tuple(DecodeSample(**s) for s in doc["decode_samples"]),
                dict(doc.get("meta", {})),
            )
        except KeyError as e:
            raise ValueError(f"{path}: not a calibration file (missing {e})") from None


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray, relative: bool = False) -> np.ndarray:
    """Least squares with coefficients >= 0: drop the most negative column and refit (tiny NNLS).
    relative: minimize (x·c - y) / y instead of x·c - y."""
    if relative:
        x, y = x / y[:, None], np.ones_like(y)
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)


def fit_latency_model(
    prefill: Sequence[PrefillSample],
    decode: Sequence[DecodeSample],
    *,
    kv_bytes_per_token: int,
    model: str = "",
    device: str = "",
    note: str = "measured",
) -> LatencyModel:
    """Fits both formulas by non-negative least squares (decode on relative residuals); returns
    the model with R² per phase.

    Needs at least 3 distinct prompt lengths and 3 distinct (batch, context) points.
    """
    if len({s.num_tokens for s in prefill}) < 3:
        raise ValueError(
            f"fit needs prefill samples at >= 3 distinct lengths, got {sorted({s.num_tokens for s in prefill})}"
        )
    if len({(s.batch_size, s.context_tokens) for s in decode}) < 3:
        raise ValueError("fit needs decode samples at >= 3 distinct (batch_size, context_tokens) points")
    t = np.array([s.num_tokens for s in prefill], dtype=float)
    yp = np.array([s.elapsed_s for s in prefill])
    xp = np.stack([np.ones_like(t), t, t * t], axis=1)
    cp = _nonneg_lstsq(xp, yp)
    cd, r2_decode = fit_decode_steps(decode)
    return LatencyModel(
        float(cp[0]),
        float(cp[1]),
        float(cp[2]),
        *cd,
        kv_bytes_per_token=int(kv_bytes_per_token),
        r2_prefill=_r2(yp, xp @ cp),
        r2_decode=r2_decode,
        model=model,
        device=device,
        note=note,
    )


def fit_decode_steps(decode: Sequence[DecodeSample]) -> tuple[tuple[float, float, float], float]:
    """The decode formula a + b·S + c·B fitted to `decode` by non-negative least squares on relative
    residuals: ((a in s, b in s per KV token, c in s per sequence), R²)."""
    b = np.array([s.batch_size for s in decode], dtype=float)
    ctx = np.array([s.context_tokens for s in decode], dtype=float)
    yd = np.array([s.elapsed_s for s in decode])
    xd = np.stack([np.ones_like(b), ctx, b], axis=1)
    cd = _nonneg_lstsq(xd, yd, relative=True)
    return (float(cd[0]), float(cd[1]), float(cd[2])), _r2(yd, xd @ cd)
