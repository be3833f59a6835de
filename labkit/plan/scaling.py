"""Latency models for hardware (and models) you do not have: estimates, never measurements.

Two ways, both stated as estimates in the model's `note`:
- `scale_latency_model`: the same model on another device. Compute-bound terms (prefill per-token
  and attention, decode per-sequence work) scale by the peak FLOP/s ratio, memory-bound terms
  (decode weight and KV reads, per-step overhead) by the bandwidth ratio.
- `roofline_latency_model`: any model shape on any device, from FLOPs and bytes (labkit.models
  presets) and the efficiencies you measured (MFU in prefill, MBU in decode; `efficiencies_from`
  reads them off a fitted model).
Datasheets come from `labkit.hardware` (data/datasheets.json); measured peaks from `labkit.hardware.peaks()`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from labkit.kv import DTYPE_BYTES, kv_bytes_per_token
from labkit.plan.latency_model import LatencyModel


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    """Peak dense FLOP/s (for one dtype) and memory bandwidth of one device."""

    name: str
    flops_per_s: float
    bandwidth_bytes_per_s: float
    memory_bytes: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        if not (self.flops_per_s > 0 and self.bandwidth_bytes_per_s > 0):
            raise ValueError(f"{self.name}: flops_per_s and bandwidth_bytes_per_s must be > 0")

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity where the roofline bends (FLOP per byte)."""
        return self.flops_per_s / self.bandwidth_bytes_per_s


def datasheet_spec(name: str, dtype: str = "bfloat16") -> HardwareSpec:
    """A device's datasheet peaks (labkit.hardware, data/datasheets.json) by name or alias, for `dtype`."""
    from labkit.hardware import datasheets, lookup_datasheet

    sheet = lookup_datasheet(name)
    if sheet is None:
        raise KeyError(f"unknown device {name!r}; datasheets have {sorted(datasheets())}")
    return HardwareSpec(
        sheet.name, sheet.peak_flops(dtype), sheet.bandwidth_bytes_per_s, sheet.memory_bytes, sheet.source
    )


def measured_spec(peaks: Any, dtype: str = "float32") -> HardwareSpec:
    """This machine's measured roofs (`labkit.hardware.peaks()`): matmul FLOP/s and read bandwidth."""
    return HardwareSpec(
        f"{peaks.device_name} (measured)",
        peaks.peak_flops(dtype),
        peaks.read_bytes_per_s,
        source=f"measured {peaks.measured_at}",
    )


def scale_latency_model(model: LatencyModel, src: HardwareSpec, dst: HardwareSpec) -> LatencyModel:
    """The fitted model moved from `src` to `dst` by datasheet ratios (an estimate, says its note)."""
    compute = src.flops_per_s / dst.flops_per_s
    memory = src.bandwidth_bytes_per_s / dst.bandwidth_bytes_per_s
    return replace(
        model,
        prefill_a_s=model.prefill_a_s * memory,
        prefill_b_s_per_token=model.prefill_b_s_per_token * compute,
        prefill_c_s_per_token2=model.prefill_c_s_per_token2 * compute,
        decode_a_s=model.decode_a_s * memory,
        decode_b_s_per_ctx_token=model.decode_b_s_per_ctx_token * memory,
        decode_c_s_per_seq=model.decode_c_s_per_seq * compute,
        # the lab server's own costs are this host's CPU time, not the device's: dropped
        serve_request_s=0.0,
        serve_token_s=0.0,
        serve_seq_s=0.0,
        device=dst.name,
        note=(
            f"estimate: fitted on {src.name}, scaled to {dst.name} by datasheet ratios "
            f"(compute x{1 / compute:.3g}, bandwidth x{1 / memory:.3g})"
        ),
    )


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the roofline needs of a model: parameters, attention width, KV bytes per token."""

    name: str
    num_params: int
    num_layers: int
    attn_width: int  # num_attention_heads x head_dim
    kv_bytes_per_token: int
    dtype: str = "bfloat16"

    @property
    def param_bytes(self) -> int:
        return self.num_params * DTYPE_BYTES[self.dtype]

    @classmethod
    def from_preset(cls, name: str, dtype: str = "bfloat16") -> ModelShape:
        from labkit.models import get_preset, parameter_count

        p = get_preset(name)
        hd = p.resolved_head_dim
        return cls(
            name,
            int(parameter_count(p)),
            p.num_hidden_layers,
            p.num_attention_heads * hd,
            kv_bytes_per_token(p.num_hidden_layers, p.num_key_value_heads, hd, dtype),
            dtype,
        )


@dataclass(frozen=True, slots=True)
class Efficiency:
    """Fractions of peak reached: MFU in prefill, MBU in decode; plus a fixed per-step overhead."""

    mfu_prefill: float = 0.5
    mbu_decode: float = 0.7
    step_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if not (0 < self.mfu_prefill <= 1 and 0 < self.mbu_decode <= 1):
            raise ValueError(f"efficiencies must be in (0, 1], got {self}")
        if self.step_overhead_s < 0:
            raise ValueError("step_overhead_s must be >= 0")


def roofline_latency_model(
    shape: ModelShape, hw: HardwareSpec, eff: Efficiency | None = None, note: str = ""
) -> LatencyModel:
    """Step times from FLOPs and bytes: prefill at MFU of peak FLOP/s, decode at MBU of bandwidth.

    prefill: 2·params FLOPs per token (b) and 2·layers·attn_width FLOPs per token pair (c, causal);
    decode: weights read once per step (a), KV read per context token (b), 2·params FLOPs per
    sequence (c: what makes a large batch compute-bound).
    """
    e = eff or Efficiency()
    flops = hw.flops_per_s * e.mfu_prefill
    bw = hw.bandwidth_bytes_per_s * e.mbu_decode
    return LatencyModel(
        prefill_a_s=e.step_overhead_s,
        prefill_b_s_per_token=2 * shape.num_params / flops,
        prefill_c_s_per_token2=2 * shape.num_layers * shape.attn_width / flops,
        decode_a_s=e.step_overhead_s + shape.param_bytes / bw,
        decode_b_s_per_ctx_token=shape.kv_bytes_per_token / bw,
        decode_c_s_per_seq=2 * shape.num_params / (hw.flops_per_s * e.mfu_prefill),
        kv_bytes_per_token=shape.kv_bytes_per_token,
        model=shape.name,
        device=hw.name,
        note=note
        or (
            f"estimate: roofline of {shape.name} on {hw.name} datasheet peaks at "
            f"MFU {e.mfu_prefill:.0%} (prefill), MBU {e.mbu_decode:.0%} (decode)"
        ),
    )


def efficiencies_from(model: LatencyModel, shape: ModelShape, hw: HardwareSpec) -> Efficiency:
    """The MFU and MBU a fitted model implies on the hardware it was measured on (capped at 1)."""
    mfu = 2 * shape.num_params / (model.prefill_b_s_per_token * hw.flops_per_s) if model.prefill_b_s_per_token else 1.0
    mbu = shape.param_bytes / (model.decode_a_s * hw.bandwidth_bytes_per_s) if model.decode_a_s else 1.0
    return Efficiency(min(max(mfu, 1e-4), 1.0), min(max(mbu, 1e-4), 1.0), 0.0)


def efficiency_of_steps(prefill: Any, decode: Any, read_bytes_per_s: float, hw: HardwareSpec) -> Efficiency:
    """The MFU and MBU of two measured steps as fractions of `hw`'s peaks (its datasheet, say).

    `prefill` and `decode` are measured points with `achieved_flops_per_s` and `mbu` (as
    `labkit.reference` loads them): prefill's FLOP/s over hw.flops_per_s; decode's bytes/s (its
    MBU times `read_bytes_per_s`, the read roof it was measured against) over hw's bandwidth.
    """
    mfu = float(prefill.achieved_flops_per_s) / hw.flops_per_s
    mbu = float(decode.mbu) * read_bytes_per_s / hw.bandwidth_bytes_per_s
    return Efficiency(min(mfu, 1.0), min(mbu, 1.0), 0.0)


def reference_efficiency(
    run: Any, hw: HardwareSpec, *, model: str = "llama-3.1-8b", runner: str = "engine graphs"
) -> Efficiency:
    """The efficiencies a committed GPU run (`labkit.reference.gpu_check()`) measured for `model`
    with `runner` (the lab engine with CUDA graphs: 2,048-token prefill, batch-1 decode at context
    2,048), as fractions of `hw`'s peaks. Raises KeyError naming what the run lacks."""
    pre, dec = run.point(model, runner, "prefill"), run.point(model, runner, "decode")
    if pre is None or dec is None:
        raise KeyError(f"{run.machine} run has no {model} prefill and decode measured by {runner!r}")
    return efficiency_of_steps(pre, dec, run.roofs.read_bytes_per_s, hw)


def is_estimate(model: LatencyModel) -> bool:
    return model.note.startswith("estimate")
