from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from labkit.hardware import lookup_datasheet
from labkit.models import PRESETS, parameter_count, random_hf_model
from labkit.roofline import ModelShape, critical_batch, decode_cost, forward_flops, offline_bound_s, prefill_cost


def _counted(model, *args, **kw) -> tuple[int, object]:
    # CPU's fused SDPA kernel is invisible to FlopCounterMode; the math backend runs the same
    # attention as two bmm's it does count.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        out = model(*args, **kw)
    return fc.get_total_flops(), out


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2", "small"])
def test_parameter_count_matches_presets(name):
    assert ModelShape.from_config(name).parameter_count == parameter_count(PRESETS[name])


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2"])
def test_flops_agree_with_flop_counter_on_real_forward(name):
    """Prefill (logits for every token and for the last only) and one decode step, full-square attention."""
    model = random_hf_model(name, "float32", "cpu")
    shape = ModelShape.from_config(name)
    batch, prompt_len = 2, 45
    ids = torch.randint(0, 256, (batch, prompt_len))
    got, out = _counted(model, ids, use_cache=True)
    mm, attn = forward_flops(shape, batch, prompt_len, attention="full", logits="all")
    assert got == pytest.approx(mm + attn, rel=0.02)
    assert attn > 0.01 * mm  # the attention term is really in the comparison
    got_last, _ = _counted(model, ids, logits_to_keep=1)
    assert got_last == pytest.approx(prefill_cost(shape, prompt_len, batch, "float32", attention="full").flops, rel=0.02)
    got_dec, _ = _counted(model, torch.randint(0, 256, (batch, 1)), past_key_values=out.past_key_values, use_cache=True)
    assert got_dec == pytest.approx(decode_cost(shape, batch, prompt_len, "float32", attention="full").flops, rel=0.02)


def test_flops_agree_on_small_prefill():
    model = random_hf_model("small", "float32", "cpu")
    got, _ = _counted(model, torch.randint(0, 256, (1, 64)), logits_to_keep=1)
    want = prefill_cost(ModelShape.from_config("small"), 64, 1, "float32", attention="full").flops
    assert got == pytest.approx(want, rel=0.02)


def test_causal_attention_counts_lower_triangle():
    s = ModelShape.from_config("tiny")
    _, full = forward_flops(s, 1, 100, attention="full")
    _, causal = forward_flops(s, 1, 100, attention="causal")
    assert causal / full == pytest.approx(101 / 200)
    # a decode step sees every cached key plus itself: causal and full agree
    assert decode_cost(s, 1, 99, attention="causal").flops == decode_cost(s, 1, 99, attention="full").flops


def test_decode_bytes_are_weights_plus_kv():
    s = ModelShape.from_config("llama-3.1-8b")
    c0 = decode_cost(s, 1, 0, "bfloat16")
    c = decode_cost(s, 4, 1000, "bfloat16")
    assert s.kv_bytes_per_token("bfloat16") == 2 * 32 * 8 * 128 * 2 == 131072
    assert c.bytes - c0.bytes == pytest.approx((4 * 1000 + 3) * 131072 + 3 * 4096 * 2)
    # about 16 GB of weights (the embedding table is not read in decode, only one row)
    assert c0.bytes == s.parameter_bytes("bfloat16") - (128256 - 1) * 4096 * 2 + 131072  # + the new KV row


def test_intensity_prefill_vs_decode_and_bound():
    s = ModelShape.from_config("llama-3.1-8b")
    h100 = lookup_datasheet("H100 SXM")
    ridge = h100.ridge_flop_per_byte("bfloat16")
    assert ridge == pytest.approx(295.3, rel=0.01)
    p = prefill_cost(s, 2048, 1, "bfloat16")
    d = decode_cost(s, 1, 2048, "bfloat16")
    assert p.bound(ridge) == "compute" and d.bound(ridge) == "memory"
    assert d.intensity_flop_per_byte == pytest.approx(1.0, rel=0.1)  # ~2 FLOPs per 2-byte weight
    assert p.intensity_flop_per_byte > 1000


def test_critical_batch_h100_about_295():
    s = ModelShape.from_config("llama-3.1-8b")
    ridge = lookup_datasheet("H100 SXM").ridge_flop_per_byte("bfloat16")
    b = critical_batch(s, ridge, "bfloat16", context_len=0)
    assert 280 <= b <= 310
    assert decode_cost(s, b, 0).intensity_flop_per_byte >= ridge > decode_cost(s, b - 1, 0).intensity_flop_per_byte
    # long contexts add per-sequence KV bytes: the ridge moves away or is never reached
    long = critical_batch(s, ridge, "bfloat16", context_len=4096)
    assert long is None or long > b


def test_mfu_mbu_and_roofline_time():
    s = ModelShape.from_config("small")
    d = decode_cost(s, 1, 128, "float32")
    t = d.bytes / 10e9  # a step that moved its bytes at exactly 10 GB/s
    assert d.mbu(t, 10e9) == pytest.approx(1.0)
    assert d.mbu(2 * t, 10e9) == pytest.approx(0.5)
    assert d.roofline_time_s(1e12, 10e9) == pytest.approx(t)
    assert d.mfu(t, 1e12) == pytest.approx(d.flops / t / 1e12)


def test_bad_input_names_the_value():
    s = ModelShape.from_config("tiny")
    with pytest.raises(ValueError, match="batch"):
        decode_cost(s, 0, 10)
    with pytest.raises(ValueError, match="prompt_len"):
        prefill_cost(s, 0)
    with pytest.raises(ValueError, match="float64"):
        decode_cost(s, 1, 1, "float64")
    with pytest.raises(ValueError, match="seconds"):
        decode_cost(s, 1, 1).mbu(0.0, 1e9)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelShape(2, 64, 6, 4, 16, 128, 300)
    with pytest.raises(ValueError, match="gpt2"):
        ModelShape.from_config({"model_type": "gpt2"})


def test_offline_bound_adds_the_roofline_time_of_every_step():
    """The prefill of all prompts, then output_len - 1 decode steps of the whole batch, each at its roof."""
    shape = ModelShape.from_config("small")
    peak, bw = 100e9, 20e9
    got = offline_bound_s(shape, 64, 256, 64, "float32", peak, bw)
    pre = prefill_cost(shape, 256, 64, "float32")
    assert got["prefill_s"] == pytest.approx(pre.flops / peak)  # 16k tokens of prefill: compute-bound
    steps = [decode_cost(shape, 64, 256 + k, "float32") for k in range(1, 64)]
    assert got["decode_s"] == pytest.approx(sum(max(d.flops / peak, d.bytes / bw) for d in steps))
    assert got["total_s"] == pytest.approx(got["prefill_s"] + got["decode_s"])
    one = offline_bound_s(shape, 1, 64, 2, "float32", peak, bw)  # batch 1: the one decode step reads the weights
    assert one["decode_s"] == pytest.approx(decode_cost(shape, 1, 65, "float32").bytes / bw)
    with pytest.raises(ValueError, match="output_len"):
        offline_bound_s(shape, 1, 64, 0, "float32", peak, bw)

