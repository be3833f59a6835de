"""The Llama-family forward pass (Llama, Mistral, Qwen2) over a paged KV cache, in plain PyTorch.

One `forward` serves every step: the tokens of all scheduled sequences are flattened into one
row-per-token batch, so every weight is read once per step (one matmul per weight). Only
attention looks at sequences one by one: decode rows go through the native kernel on a CPU (one
pass through the block tables, any batch, `labkit.engine.kernels`), else one batched SDPA call over
their gathered blocks; prompt chunks go through SDPA one sequence each (causal).

Where the weights live on a CPU: fp32 weights are packed once in oneDNN's layout, and the same
bytes serve oneDNN (many rows: prefill, big decode batches) and the native kernel (up to
`kernels.SMALL_M` rows: small decode batches, at the bandwidth roof). bf16 weights are packed
once for the native kernel, which serves every row count.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from labkit.engine import kernels
from labkit.engine.kernels import PackedWeight
from labkit.engine.kv_cache import KVCache

SUPPORTED = ("llama", "mistral", "qwen2")
CPU_GATHER_BYTES = 2 << 20  # decode K+V gathered per SDPA call on a CPU: fits the last-level cache


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape of a Llama-family model, read from a Hugging Face `config.json`."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED:
            raise ValueError(f"model_type {self.model_type!r} not supported; the engine runs {SUPPORTED}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        # transformers 5 writes `rope_parameters`; older configs have rope_theta / rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        heads = int(cfg["num_attention_heads"])
        return cls(
            model_type=str(cfg.get("model_type", "llama")),
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=dict(scaling) if scaling else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)),
            eos_token_ids=eos_ids,
        )


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, with linear or llama3 scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(s["factor"])
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")


@dataclass(slots=True)
class AttentionMeta:
    """Where each row of a step's flattened batch reads and writes the KV cache.

    Rows [0, num_decode) are single-token rows attending through `decode_blocks` (padded with
    block 0 and masked by `decode_mask`); then come prompt chunks, one `(row_start, num_rows,
    context_len, blocks)` each, whose queries sit at the last `num_rows` of `context_len` positions.
    """

    slot_mapping: torch.Tensor  # [rows] int64: the cache slot each new K/V goes to
    num_decode: int
    decode_blocks: torch.Tensor | None  # [num_decode, max_blocks] int64
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_blocks * block_size] bool
    chunks: list[tuple[int, int, int, torch.Tensor | None]]
    decode_ctx: torch.Tensor | None = None  # [num_decode] int64: tokens each decode row attends


Weight = torch.Tensor | PackedWeight  # dense, oneDNN-packed, or packed for the native kernels


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Weight  # q, k, v projections stacked: one matmul instead of three
    qkv_bias: torch.Tensor | None
    o: Weight
    post_norm: torch.Tensor
    gate_up: torch.Tensor | None  # gate and up stacked (None when packed: see `mlp`)
    down: Weight
    gate: Weight | None = None
    up: Weight | None = None


def _dense(w: Weight | None) -> torch.Tensor:
    """`w`, which must still be the dense tensor it was loaded as (weights are packed once)."""
    assert isinstance(w, torch.Tensor), f"expected a dense weight, got {type(w).__name__}"
    return w


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, with the statistics in fp32 (as Hugging Face does)."""
    if x.dtype == torch.float32:  # one fused op instead of six small ones
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def onednn_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """True where weights are kept in oneDNN's layout: fp32 on a CPU (LABKIT_ONEDNN=0 turns it off).

    Why: PyTorch's CPU build sends F.linear to MKL, whose fp32 GEMMs are slow on non-Intel CPUs
    at small M, and a decode step is all small-M GEMMs. oneDNN's kernels, on weights packed once
    in their layout, read the weights at close to the memory bandwidth (measured on an AMD EPYC:
    1.7x MKL at M=1, 2.3x at M=4) and reach the compute roof at M=64 and up. They also fuse the
    SiLU, the gate*up product and the residual add into the matmul that produces them.
    """
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and os.environ.get("LABKIT_ONEDNN", "1") != "0"
    )


def pack(w: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """`w` [out, in] reordered into oneDNN's blocked layout, tuned for about `rows_hint` input rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)


def linear(
    x: torch.Tensor,
    w: Weight,
    b: torch.Tensor | None = None,
    *,
    act: str = "none",
    mul: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(x @ w.T + b), then `* mul` or `+ add` if given: one native call for a packed `w` and few rows."""
    if isinstance(w, PackedWeight):
        if w.onednn is None or x.shape[0] <= kernels.SMALL_M:
            return kernels.gemm(x, w, b, act=act, mul=mul, add=add)
        w = w.onednn
    if w.is_mkldnn:
        # The elementwise work runs in place after the matmul, not as oneDNN post-ops: on AVX2 the fused
        # swish made the gate projection ~13% slower and the fused mul and add ~4% (measured in pairs,
        # 512 rows of `small` on a 2-core EPYC; a 512-token prefill 7% faster).
        y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")
    elif w.dtype == torch.bfloat16 and w.device.type == "cpu" and not kernels.cpu_has_bf16_matmul():
        # torch's bf16 matmul is emulated on such CPUs (~0.1 GFLOP/s): fp32 math on the bf16 values,
        # as the native kernel does, when the native kernels cannot run.
        y = F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    else:
        y = F.linear(x, w, b)
    if act == "silu":
        F.silu(y, inplace=True)
    elif act != "none":
        raise ValueError(f"activation {act!r} not supported (none, silu)")
    return y.mul_(mul) if mul is not None else (y.add_(add) if add is not None else y)


def mlp(x: torch.Tensor, h: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
    """x + down(silu(gate(h)) * up(h)): the SwiGLU MLP and its residual."""
    if lw.gate_up is None:  # packed: three matmuls, the elementwise work after each
        assert lw.gate is not None and lw.up is not None, "packed layers hold gate and up separately"
        g = linear(h, lw.gate, act="silu")
        return linear(linear(h, lw.up, mul=g), lw.down, add=x)
    gate, up = linear(h, lw.gate_up).chunk(2, dim=-1)
    return x + linear(F.silu(gate) * up, lw.down)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [rows, heads, head_dim] rotated in the Hugging Face (half-split) layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def load_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (single file or sharded with an index)."""
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(model_dir / f)))
    return out


class CausalLM:
    """Weights plus the forward pass. Holds no per-request state: the KV cache is passed in."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        rows_hint: int = 2048,
        native: bool = False,
    ) -> None:
        """native: on a CPU, use `labkit.engine.kernels` where they can run (see `native_note`)."""
        self.cfg = cfg
        put = lambda name: weights[name].to(device=device, dtype=dtype).contiguous()
        self.embed = put("model.embed_tokens.weight")
        self.lm_head: Weight = (
            self.embed if cfg.tie_word_embeddings or "lm_head.weight" not in weights else put("lm_head.weight")
        )
        self.norm = put("model.norm.weight")
        self.layers: list[LayerWeights] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            bias = torch.cat([put(a + f"{n}_proj.bias") for n in "qkv"]) if cfg.qkv_bias else None
            self.layers.append(
                LayerWeights(
                    input_norm=put(p + "input_layernorm.weight"),
                    qkv=torch.cat([put(a + f"{n}_proj.weight") for n in "qkv"]),
                    qkv_bias=bias,
                    o=put(a + "o_proj.weight"),
                    post_norm=put(p + "post_attention_layernorm.weight"),
                    gate_up=torch.cat([put(m + "gate_proj.weight"), put(m + "up_proj.weight")]),
                    down=put(m + "down_proj.weight"),
                )
            )
        self.native_note = self._pack(device, dtype, rows_hint, native)
        # True where the native kernels run: small matmuls, decode attention (any batch), norms, RoPE + KV writes.
        self.native = native and not self.native_note and device.type == "cpu"
        freqs = torch.outer(torch.arange(max_model_len, dtype=torch.float32), rope_inv_freq(cfg))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)
        # Small decode steps run every layer in one native call (see `forward`).
        self.decode_table = (
            kernels.decode_layers_table(
                self.layers, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, dim=cfg.head_dim, eps=cfg.rms_norm_eps
            )
            if self.native
            else None
        )

    def _pack(self, device: torch.device, dtype: torch.dtype, rows_hint: int, native: bool) -> str:
        """Packs the matmul weights once for this device; returns why the native kernels are not used ("": used)."""
        want = native and device.type == "cpu"
        why = "" if not want else kernels.unavailable_reason()
        use = want and not why
        if onednn_enabled(device, dtype):

            def p(w: torch.Tensor) -> Weight:
                packed = pack(w, rows_hint)
                return (kernels.adopt_onednn(packed, w) or packed) if use else packed
        elif use and dtype == torch.bfloat16:
            p = kernels.pack_bf16
        else:
            return why or (
                ""
                if not want
                else f"the native kernels take oneDNN-packed fp32 or bf16 weights, not {dtype}"
                + (" (LABKIT_ONEDNN=0)" if dtype == torch.float32 else "")
            )
        self.lm_head = p(_dense(self.lm_head))  # a packed copy: the embedding lookup keeps the dense one
        for lw in self.layers:
            gate, up = _dense(lw.gate_up).chunk(2)
            lw.qkv, lw.o, lw.down, lw.gate, lw.up, lw.gate_up = (
                p(_dense(lw.qkv)),
                p(_dense(lw.o)),
                p(_dense(lw.down)),
                p(gate),
                p(up),
                None,
            )
        weights = [self.lm_head] + [w for lw in self.layers for w in (lw.qkv, lw.o, lw.down, lw.gate, lw.up)]
        if use and not all(isinstance(w, PackedWeight) for w in weights):
            return "oneDNN packed some weights in a layout the native kernel does not read"
        return why

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMeta,
        cache: KVCache,
        layer_hook: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Final hidden states [rows, hidden] after writing every row's K/V into `cache`."""
        c = self.cfg
        rows = input_ids.shape[0]
        q_dim = c.num_heads * c.head_dim
        x = F.embedding(input_ids, self.embed)
        if (
            self.decode_table is not None
            and layer_hook is None
            and not meta.chunks
            and rows <= kernels.SMALL_M
            and meta.decode_blocks is not None
            and meta.decode_ctx is not None
        ):  # a small decode step: the same kernels as the loop below, all layers in one call
            kernels.decode_layers(
                x, self.decode_table, self.cos, self.sin, positions, cache.k, cache.v, meta.slot_mapping,
                meta.decode_blocks, meta.decode_ctx, cache.block_size,
            )  # fmt: skip
            return kernels.rms_norm(x, self.norm, c.rms_norm_eps)
        # The native path rotates and stores q/k/v in one call per layer and norms in one call:
        # at batch 1 every small op left costs a visible share of a step at the bandwidth roof.
        norm = kernels.rms_norm if self.native else rms_norm
        rope = None if self.native else (self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        for i, lw in enumerate(self.layers):
            h = norm(x, lw.input_norm, c.rms_norm_eps)
            q, k, v = self._rotate_and_store(i, linear(h, lw.qkv, lw.qkv_bias), positions, rope, meta, cache)
            attn = self._attention(i, q, k, v, meta, cache)
            x = linear(attn.reshape(rows, q_dim), lw.o, add=x)
            x = mlp(x, norm(x, lw.post_norm, c.rms_norm_eps), lw)
            if layer_hook is not None:
                layer_hook(i)
        return norm(x, self.norm, c.rms_norm_eps)

    def _rotate_and_store(
        self,
        layer: int,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        meta: AttentionMeta,
        cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q and k rotated, and v, each [rows, heads, head_dim], from one layer's projections; k and v written
        into the cache."""
        c = self.cfg
        heads = qkv.unflatten(-1, (-1, c.head_dim))  # [rows, heads + 2 kv_heads, head_dim]
        if rope is None:  # native: rotated in place, stored in the same call
            kernels.rope_write(
                qkv,
                c.num_heads,
                c.num_kv_heads,
                self.cos,
                self.sin,
                positions,
                cache.k[layer],
                cache.v[layer],
                meta.slot_mapping,
            )
            q, k, v = heads.split([c.num_heads, c.num_kv_heads, c.num_kv_heads], dim=1)
            return q, k, v
        qk, v = heads.split([c.num_heads + c.num_kv_heads, c.num_kv_heads], dim=1)
        q, k = apply_rope(qk, *rope).split([c.num_heads, c.num_kv_heads], dim=1)  # q and k side by side: one rotation
        cache.write(layer, meta.slot_mapping, k, v)
        return q, k, v

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [rows, vocab] of the given final hidden rows."""
        return linear(hidden, self.lm_head).float()

    def _attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta, cache: KVCache
    ) -> torch.Tensor:
        c = self.cfg
        group = c.num_heads // c.num_kv_heads
        nd = meta.num_decode
        if nd:
            o = self._decode_attention(layer, q[:nd], meta, cache)
            if not meta.chunks:
                return o
        out = torch.empty_like(q)
        if nd:
            out[:nd] = o
        for start, n, ctx, blocks in meta.chunks:
            qs = q[start : start + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, dim]
            if ctx == n:  # the whole context is in this chunk: causal attention over fresh K/V
                ks = k[start : start + n].transpose(0, 1).unsqueeze(0)
                vs = v[start : start + n].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=group > 1)
            else:  # earlier tokens are in the cache (prefix hit, earlier chunk, recompute)
                assert blocks is not None
                ks, vs = cache.gather(layer, blocks.unsqueeze(0))
                ks, vs = ks[:, :, :ctx], vs[:, :, :ctx]
                mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=group > 1)
            out[start : start + n] = o[0].transpose(0, 1)
        return out

    def _decode_attention(self, layer: int, q: torch.Tensor, meta: AttentionMeta, cache: KVCache) -> torch.Tensor:
        """Decode rows [nd, heads, dim] attending their paged contexts; returns [nd, heads, dim]."""
        c = self.cfg
        nd, group = q.shape[0], c.num_heads // c.num_kv_heads
        assert meta.decode_blocks is not None
        # Native: one pass over K and V, no gathered copy. Paired on `small`'s attention shapes (batch 16 to 64,
        # contexts 128 to 1024) the gather + SDPA path took 1.2-3.6x as long, and whole batch-16 to 64 decode
        # steps 1.12-1.33x as long (fp32 and bf16, 2-core EPYC).
        if self.native and meta.decode_ctx is not None:
            return kernels.decode_attention(
                q, cache.k[layer], cache.v[layer], meta.decode_blocks, meta.decode_ctx, cache.block_size
            )
        # Each kv head serves `group` query heads, so queries are laid out [seq, kv_head, group, dim]
        # and attend without repeating K/V. On a CPU the blocks are gathered a few sequences at a
        # time, so the copy is still in cache when SDPA reads it (one DRAM pass over the KV instead
        # of three); a GPU takes all at once.
        qd = q.reshape(nd, c.num_kv_heads, group, c.head_dim)
        per_seq = cache.block_bytes * meta.decode_blocks.shape[1] * 2
        step = nd if q.device.type != "cpu" else max(1, min(nd, CPU_GATHER_BYTES // per_seq))
        parts = []
        for s in range(0, nd, step):
            kb, vb = cache.gather(layer, meta.decode_blocks[s : s + step])  # [n, kv_heads, ctx, dim]
            mask = meta.decode_mask[s : s + step] if meta.decode_mask is not None else None
            parts.append(F.scaled_dot_product_attention(qd[s : s + step], kb, vb, attn_mask=mask))
        o = parts[0] if len(parts) == 1 else torch.cat(parts)
        return o.reshape(nd, c.num_heads, c.head_dim)
