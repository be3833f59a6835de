"""The engine's native CPU kernels: matmuls of few rows at the bandwidth roof, and paged decode attention.

A batch-1 decode step reads every weight once to do two FLOPs per weight: it can go no faster
than the memory reads it. PyTorch's CPU matmuls read far below that at M <= 4 (MKL's small-M
sgemm streams ~16 GB/s on an AMD EPYC; oneDNN's kernels are tuned for many rows), so the
engine's batch-1 decode sat at ~0.6 of the read roof. `csrc/cpu_kernels.cpp` streams each
weight once with AVX2 FMAs, straight from the layout oneDNN packs for prefill, so one copy of
the weights serves both paths; bf16 weights (half the bytes) use the same blocking. Decode
attention reads K and V once through the block table (no gathered copy). Decode-time calls run
on the kernels' own pinned threads (csrc/pool.h), whose caller waits for the work, not for every
thread: on a shared machine a descheduled thread then costs one block, not the whole call. A
decode step of up to SMALL_M rows runs all its layers in one call (`decode_layers`): the same
kernels in the same order, without a return to Python between them.

The source is compiled at first use with the system C++ compiler (g++ or clang++, OpenMP) into
LABKIT_HOME/kernels/, keyed by the source, the flags and the compiler, and loaded with ctypes
after torch, so its OpenMP (prefill-size calls) is torch's thread team. Where it cannot build or the CPU lacks
AVX2/FMA, `available()` is False, `unavailable_reason()` says why in one line, and the engine
uses its PyTorch paths: same results, slower decode.

    >>> from labkit.engine import kernels
    >>> kernels.available(), kernels.unavailable_reason()
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from labkit.config import labkit_home

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"  # includes csrc/pool.h
FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")
BLOCK = 64  # output columns per packed block (matches oneDNN's fp32 packing on AVX2)
SMALL_M = 4  # rows up to which fp32 matmuls take the native kernels (and run on the pool; more on OpenMP's team)
BUILD_TIMEOUT_S = 180

_reason = ""


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _build(cxx: str) -> Path:
    """The compiled library's path, compiled now unless the cache already has this exact build."""
    version = subprocess.run(
        [cxx, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.splitlines()[:1]
    sources = b"".join(f.read_bytes() for f in sorted(SOURCE.parent.glob("*.[ch]*")))
    key = hashlib.sha256(sources + repr((FLAGS, version)).encode()).hexdigest()[:16]
    out = labkit_home() / "kernels" / f"cpu_kernels-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.so")  # several processes may build at once
    r = subprocess.run(
        [cxx, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )  # the returncode is read below, with the error
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:200])
        raise RuntimeError(f"{Path(cxx).name} failed: {first}")
    os.replace(tmp, out)
    return out


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """The loaded library, or None (and `_reason` says why)."""
    global _reason
    _reason = ""
    if os.environ.get("LABKIT_NATIVE", "1") == "0":
        _reason = "LABKIT_NATIVE=0"
        return None
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        _reason = f"this CPU runs torch at {torch.backends.cpu.get_cpu_capability()}, the kernels need AVX2 and FMA"
        return None
    cxx = _compiler()
    if cxx is None:
        _reason = "no C++ compiler found (g++, c++ or clang++; or set CXX)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        _reason = f"native kernels did not build: {str(e).splitlines()[0][:200]}"
        return None
    if not lib.lk_cpu_supported():
        _reason = "this CPU lacks AVX2 or FMA"
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    c_int = ctypes.c_int
    lib.lk_gemm.argtypes = [i64, i64, i64, ptr, i64, c_int, ptr, c_int, ptr, ptr, i64, c_int, c_int, ptr, i64, c_int]
    lib.lk_decode_attention.argtypes = [
        i64,
        i64,
        i64,
        i64,
        ptr,
        i64,
        ptr,
        ptr,
        ptr,
        i64,
        ptr,
        i64,
        ctypes.c_float,
        ptr,
        c_int,
        c_int,
    ]
    lib.lk_rms_norm.argtypes = [i64, i64, ptr, i64, ptr, ctypes.c_float, ptr, ctypes.c_int]
    lib.lk_rope_write.argtypes = [i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.lk_decode_layers.argtypes = [i64, i64, ptr, i64, i64, i64, i64, i64, ctypes.c_float, ptr, ptr, ptr, ptr]
    lib.lk_decode_layers.argtypes += [ptr, ptr, i64, ptr, ptr, i64, ptr, i64, ctypes.c_float, c_int, c_int, c_int]
    lib.lk_stream_read.argtypes = [ptr, i64, c_int]
    lib.lk_pin_threads.argtypes = [c_int]
    lib.lk_stream_read.restype = ctypes.c_double
    lib.lk_set_pinning.argtypes = [ctypes.c_int]
    lib.lk_set_pinning(int(os.environ.get("LABKIT_PIN_THREADS", "1") != "0"))
    return lib


def available() -> bool:
    """True when the native kernels are built and this CPU runs them."""
    return _lib() is not None


def unavailable_reason() -> str:
    """One line: why the kernels are not available ("" when they are)."""
    _lib()
    return _reason


def _need() -> ctypes.CDLL:
    """The loaded library; RuntimeError saying why where it is unavailable."""
    lib = _lib()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {_reason}")
    return lib


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """True where this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without them torch's CPU bf16
    matmul is emulated: 0.1 GFLOP/s measured on an AVX2 EPYC, where a 2048² product takes minutes."""
    cpu = getattr(torch, "cpu", None)
    return bool(cpu and (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()))


def pin_threads() -> int:
    """Starts the kernels' worker threads for torch's thread count, each pinned to one CPU this process may
    use; returns how many are pinned. The calling thread stays free: processes it starts inherit its mask."""
    lib = _lib()
    return int(lib.lk_pin_threads(torch.get_num_threads())) if lib is not None else 0


# --- packed weights ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A weight [n, k] in the kernels' blocked layout (see csrc/cpu_kernels.cpp).

    fp32: `data` is oneDNN's packed tensor itself (the same bytes serve oneDNN for many rows and
    the native kernel for few). bf16: `data` is a plain bf16 tensor in the pair layout.
    """

    data: torch.Tensor
    n: int
    k: int
    bf16: bool
    ptr: int

    @property
    def onednn(self) -> torch.Tensor | None:
        """The oneDNN tensor behind an fp32 weight (None for bf16)."""
        return self.data if self.data.is_mkldnn else None


def pack_bf16(w: torch.Tensor) -> PackedWeight:
    """w [n, k] (any float dtype) as bf16 in the blocked pair layout: columns padded to a multiple of 64."""
    n, k = w.shape
    pad = -n % BLOCK
    wb = torch.cat([w, w.new_zeros(pad, k)]) if pad else w
    # [n/64, 64, k] -> [n/64, k, 64], then in each group of 16 columns (c, c+8) side by side.
    blocks = wb.to(torch.bfloat16).reshape(-1, BLOCK, k).transpose(1, 2).reshape(-1, k, BLOCK // 16, 2, 8)
    data = blocks.transpose(-1, -2).contiguous()
    return PackedWeight(data, n, k, True, data.data_ptr())


def adopt_onednn(packed: torch.Tensor, dense: torch.Tensor) -> PackedWeight | None:
    """The oneDNN-packed fp32 weight as a PackedWeight when its bytes are in the kernels' layout, else None.

    oneDNN picks its layout per CPU and shape; it is checked here, numerically, against `dense`
    (the same weight, [n, k]): the kernel must give F.linear's rows within fp32 rounding.
    """
    lib = _lib()
    if lib is None or not packed.is_mkldnn or dense.dtype != torch.float32:
        return None
    n, k = dense.shape
    if torch.ops.mkldnn._nbytes(packed) != -(-n // BLOCK) * BLOCK * k * 4:
        return None
    pw = PackedWeight(packed, n, k, False, int(torch.ops.mkldnn.data_ptr(packed)))
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(n * 31 + k))
    want = torch.nn.functional.linear(x, dense)
    got = torch.cat([gemm(x[:1], pw), gemm(x[1:], pw)])
    ok = bool(((got - want).abs().max() <= 1e-4 * want.abs().max() + 1e-6).item())
    return pw if ok else None


# --- the calls -----------------------------------------------------------------------------


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def gemm(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None = None,
    *,
    act: str = "none",
    mul: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(x @ w.T + bias), then `* mul` or `+ add`: a new [rows, n] tensor in x's dtype (fp32 or bf16)."""
    lib = _need()
    if x.dim() != 2 or x.shape[1] != w.k or x.stride(1) != 1:
        raise ValueError(f"x must be [rows, {w.k}] with unit column stride, got {tuple(x.shape)} {x.stride()}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"x dtype {x.dtype} not supported (float32, bfloat16)")
    if act not in ("none", "silu"):
        raise ValueError(f"activation {act!r} not supported (none, silu)")
    m = x.shape[0]
    y = torch.empty(m, w.n, dtype=x.dtype)
    other = mul if mul is not None else add
    if other is not None:
        other = other.to(x.dtype).contiguous()
        if other.shape != y.shape:
            raise ValueError(f"mul/add must be {tuple(y.shape)}, got {tuple(other.shape)}")
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    op = 1 if mul is not None else (2 if add is not None else 0)
    rc = lib.lk_gemm(
        m,
        w.n,
        w.k,
        x.data_ptr(),
        x.stride(0),
        int(x.dtype == torch.bfloat16),
        w.ptr,
        int(w.bf16),
        _ptr(bias),
        _ptr(other),
        w.n,
        op,
        int(act == "silu"),
        y.data_ptr(),
        w.n,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"lk_gemm failed ({rc}) for x {tuple(x.shape)} and w [{w.n}, {w.k}]")
    return y


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    ctx_lens: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Softmax attention of one-token queries over their paged context; returns [seqs, heads, head_dim].

    q: [seqs, heads, head_dim] (rows may be strided); k_cache, v_cache: one layer, [slots, kv_heads,
    head_dim]; blocks: [seqs, max_blocks] int64 block ids; ctx_lens: [seqs] int64 tokens each attends
    (its own new token included). Scale 1/sqrt(head_dim), as SDPA's default.
    """
    lib = _need()
    seqs, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    if q.stride(2) != 1 or q.stride(1) != dim:
        raise ValueError(f"q heads must be contiguous, got strides {q.stride()}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == q.dtype == v_cache.dtype):
        raise ValueError("the cache layers must be contiguous and in q's dtype")
    blocks, ctx_lens = blocks.contiguous(), ctx_lens.to(torch.int64).contiguous()
    out = torch.empty(seqs, heads, dim, dtype=q.dtype)
    rc = lib.lk_decode_attention(
        seqs,
        heads,
        kv_heads,
        dim,
        q.data_ptr(),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        blocks.data_ptr(),
        blocks.shape[1],
        ctx_lens.data_ptr(),
        block_size,
        dim**-0.5,
        out.data_ptr(),
        int(q.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"lk_decode_attention failed ({rc}): a context length outside its block table?")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, fp32 statistics, rounded as Hugging Face rounds; a new tensor."""
    lib = _need()
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],) or weight.dtype != x.dtype:
        raise ValueError(
            f"rms_norm takes x [rows, dim] (unit column stride) and weight [dim] of x's dtype, got "
            f"{tuple(x.shape)} {x.stride()} and {tuple(weight.shape)} {weight.dtype}"
        )
    out = torch.empty(x.shape, dtype=x.dtype)
    if (
        lib.lk_rms_norm(
            x.shape[0],
            x.shape[1],
            x.data_ptr(),
            x.stride(0),
            weight.contiguous().data_ptr(),
            eps,
            out.data_ptr(),
            int(x.dtype == torch.bfloat16),
        )
        != 0
    ):
        raise ValueError(f"rms_norm: dim {x.shape[1]} must be a multiple of 8")
    return out


def rope_write(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Rotates q and k of qkv [rows, (heads + 2 kv_heads) * head_dim] in place (tables cos, sin [positions,
    head_dim]), then writes each row's k and v at `slots` of one layer's k_cache, v_cache [slots, kv_heads, head_dim]."""
    lib = _need()
    rows, dim = qkv.shape[0], k_cache.shape[-1]
    if (
        qkv.stride(1) != 1
        or qkv.shape[1] != (heads + 2 * kv_heads) * dim
        or not (cos.dtype == sin.dtype == k_cache.dtype == v_cache.dtype == qkv.dtype)
    ):
        raise ValueError(
            f"rope_write: qkv {tuple(qkv.shape)} does not hold {heads} + 2 x {kv_heads} heads of {dim}, "
            "or the dtypes differ"
        )
    if not (cos.is_contiguous() and sin.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rope_write: the tables and the cache layers must be contiguous")
    positions, slots = positions.to(torch.int64).contiguous(), slots.to(torch.int64).contiguous()
    if positions.shape != (rows,) or slots.shape != (rows,):
        raise ValueError(f"rope_write: positions and slots must be [{rows}]")
    if (
        lib.lk_rope_write(
            rows,
            heads,
            kv_heads,
            dim,
            qkv.data_ptr(),
            qkv.stride(0),
            cos.data_ptr(),
            sin.data_ptr(),
            positions.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            slots.data_ptr(),
            int(qkv.dtype == torch.bfloat16),
        )
        != 0
    ):
        raise ValueError(f"rope_write: head_dim {dim} must be a multiple of 16 (at most 512)")


class _LkLayer(ctypes.Structure):
    """csrc's LkLayer: one layer's weight pointers, in the order lk_decode_layers reads them."""

    _fields_ = [
        (name, ctypes.c_void_p) for name in ("in_norm", "qkv", "qkv_bias", "o", "post_norm", "gate", "up", "down")
    ]


@dataclass(frozen=True, slots=True)
class DecodeLayers:
    """A model's layers as lk_decode_layers reads them: built once, with the tensors it points into kept alive."""

    table: ctypes.Array  # of _LkLayer, one per layer
    keep: tuple[torch.Tensor, ...]  # norms and biases in the activation dtype (pointed to by `table`)
    hidden: int
    heads: int
    kv_heads: int
    dim: int
    inter: int
    eps: float
    bf16: bool  # activations (and norms, biases, cache) in bf16
    w_bf16: bool  # weights packed as bf16


def decode_layers_table(layers: list[Any], *, heads: int, kv_heads: int, dim: int, eps: float) -> DecodeLayers:
    """The table of `layers` (LayerWeights whose matmul weights are all PackedWeight) for `decode_layers`."""
    first = layers[0]
    act = first.input_norm.dtype
    keep: list[torch.Tensor] = []

    def ptr(t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.to(act).contiguous()
        keep.append(t)
        return t.data_ptr()

    rows = []
    for lw in layers:
        ws = (lw.qkv, lw.o, lw.gate, lw.up, lw.down)
        if not all(isinstance(w, PackedWeight) for w in ws):
            raise ValueError("decode_layers takes layers whose matmul weights are packed for the native kernels")
        rows.append(
            _LkLayer(
                ptr(lw.input_norm),
                lw.qkv.ptr,
                ptr(lw.qkv_bias),
                lw.o.ptr,
                ptr(lw.post_norm),
                lw.gate.ptr,
                lw.up.ptr,
                lw.down.ptr,
            )
        )
    table = (_LkLayer * len(rows))(*rows)
    return DecodeLayers(
        table, tuple(keep), first.o.n, heads, kv_heads, dim, first.gate.n, eps, act == torch.bfloat16, first.qkv.bf16
    )


def decode_layers(
    x: torch.Tensor,
    model: DecodeLayers,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    blocks: torch.Tensor,
    ctx_lens: torch.Tensor,
    block_size: int,
) -> None:
    """Runs every layer of a decode step of up to SMALL_M rows on x [rows, hidden] in place: one native call,
    the same kernels in the same order as the per-op path (same result), without a return to Python between them.

    k_cache, v_cache: every layer's, [layers, slots, kv_heads, head_dim]; the rest as in `rope_write` and
    `decode_attention`.
    """
    lib = _need()
    rows = x.shape[0]
    act = torch.bfloat16 if model.bf16 else torch.float32
    if not (1 <= rows <= SMALL_M) or x.shape[1] != model.hidden or not x.is_contiguous() or x.dtype != act:
        raise ValueError(f"decode_layers takes x [1..{SMALL_M}, {model.hidden}] contiguous {act}, got {tuple(x.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype == act):
        raise ValueError("decode_layers: the caches must be contiguous and in the activation dtype")
    if not (cos.is_contiguous() and sin.is_contiguous() and cos.dtype == sin.dtype == act):
        raise ValueError("decode_layers: the rope tables must be contiguous and in the activation dtype")
    if k_cache.shape[0] != len(model.table) or k_cache.shape[2:] != (model.kv_heads, model.dim):
        raise ValueError(f"decode_layers: cache {tuple(k_cache.shape)} does not fit the model's layers and heads")
    positions, slots = positions.to(torch.int64).contiguous(), slots.to(torch.int64).contiguous()
    blocks, ctx_lens = blocks.to(torch.int64).contiguous(), ctx_lens.to(torch.int64).contiguous()
    if positions.shape != (rows,) or slots.shape != (rows,) or ctx_lens.shape != (rows,) or blocks.shape[0] != rows:
        raise ValueError(f"decode_layers: positions, slots, blocks and ctx_lens must have {rows} rows")
    rc = lib.lk_decode_layers(
        rows, len(model.table), ctypes.addressof(model.table), model.hidden, model.heads, model.kv_heads, model.dim,
        model.inter, model.eps, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], slots.data_ptr(), blocks.data_ptr(),
        blocks.shape[1], ctx_lens.data_ptr(), block_size, model.dim**-0.5, int(model.bf16), int(model.w_bf16),
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"lk_decode_layers failed ({rc}): a context length outside its block table, or bad shapes")


def stream_read(buf: torch.Tensor) -> float:
    """The sum of a contiguous fp32 CPU tensor, read by every thread of the team (for timing reads)."""
    lib = _need()
    if buf.dtype != torch.float32 or not buf.is_contiguous() or buf.device.type != "cpu":
        raise ValueError("stream_read takes a contiguous fp32 CPU tensor")
    return float(lib.lk_stream_read(buf.data_ptr(), buf.numel(), torch.get_num_threads()))
