"""The embedded models: deterministic bytes, a tokenizer that round-trips, offline loading."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from labkit import models
from labkit.models import BOS_ID, ByteTokenizer, ensure_model, verify_model, write_model

# The digest of tiny's weights as written by WRITER_VERSION 1 (numpy PCG64 stream, fp32).
TINY_WEIGHTS_SHA256 = "8f46a2682e8c2497c088a5e73fc0ffe036f72075284dede8db40a7abcfb1a0fd"
TEXTS = ["hello", "héllo wörld — 日本語 🙂 ñ", "", "tabs\tand\nnewlines\r\n", "Ω≈ç√∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "a" * 300]


def test_writer_is_byte_identical_twice(tmp_path: Path) -> None:
    a = write_model("tiny", tmp_path / "a")
    b = write_model("tiny", tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_known_checksum_of_tiny_weights(tmp_path: Path) -> None:
    """Same bytes on every machine: pin the digest (bump WRITER_VERSION when it must change)."""
    d = write_model("tiny", tmp_path / "t")
    manifest = json.loads((d / models.MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"]["bytes"] == (d / "model.safetensors").stat().st_size
    n_params = models.parameter_count(models.PRESETS["tiny"])
    assert 2e6 < n_params < 6e6
    # fp32: 4 bytes a parameter plus a small safetensors header
    assert 4 * n_params < manifest["files"]["model.safetensors"]["bytes"] < 4 * n_params + 20_000
    assert manifest["files"]["model.safetensors"]["sha256"] == TINY_WEIGHTS_SHA256


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = ByteTokenizer(512)
    ids = tok.encode(text)
    assert ids[0] == BOS_ID
    assert all(0 <= i < 512 for i in ids)
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_agrees_with_byte_tokenizer(tiny_model_dir: Path, text: str) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = hf(text)["input_ids"]
    assert ids == ByteTokenizer().encode(text)
    assert hf.decode(ids, skip_special_tokens=True) == text
    assert hf.eos_token_id == models.EOS_ID and hf.bos_token_id == BOS_ID


def test_transformers_loads_tiny_offline_and_logits_are_finite(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    cfg = models.PRESETS["tiny"]
    ids = torch.tensor([ByteTokenizer().encode("the lab runs offline")])
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.05  # random weights, but not a constant output


def test_qwen2_preset_has_bias_and_tied_embeddings(tmp_path: Path) -> None:
    from safetensors import safe_open

    d = write_model("tiny-qwen2", tmp_path / "q")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.bias" in keys
    assert "lm_head.weight" not in keys


def test_corrupt_cache_is_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    d = ensure_model("tiny", quiet=True)
    good = (d / "model.safetensors").read_bytes()
    # Flip bytes in the middle (same size: only the checksum can tell).
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(len(good) // 2)
        f.write(b"\x00\x01\x02\x03")
    assert "checksum" in (verify_model(d) or "")
    d2 = ensure_model("tiny", quiet=True)
    assert d2 == d and (d / "model.safetensors").read_bytes() == good
    # A truncated file and a missing file are caught as well.
    (d / "model.safetensors").write_bytes(good[:1000])
    assert "bytes" in (verify_model(d, full=False) or "")
    assert ensure_model("tiny", quiet=True) == d and verify_model(d) is None
    (d / "tokenizer.json").unlink()
    assert ensure_model("tiny", quiet=True) == d and verify_model(d) is None


def test_real_shapes_are_configs_with_expected_sizes() -> None:
    n8 = models.parameter_count(models.PRESETS["llama-3.1-8b"])
    n1 = models.parameter_count(models.PRESETS["llama-3.2-1b"])
    nq = models.parameter_count(models.PRESETS["qwen2.5-7b"])
    assert 7.9e9 < n8 < 8.1e9
    assert 1.2e9 < n1 < 1.3e9
    assert 7.5e9 < nq < 7.7e9
    assert models.parameter_count(models.PRESETS["small"]) * 4 >= 400e6  # >= 400 MB of fp32 weights
    cfg = models.load_config("llama-3.1-8b")  # no weights written
    assert cfg["num_key_value_heads"] == 8 and cfg["rope_scaling"]["rope_type"] == "llama3"


def test_bad_names_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        ensure_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        ensure_model("some-org/some-model-that-is-not-cached")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ensure_model(tmp_path)
    with pytest.raises(KeyError, match="unknown model preset"):
        models.get_preset("nope")


def test_local_model_dir_is_accepted(tiny_model_dir: Path) -> None:
    assert ensure_model(str(tiny_model_dir)) == tiny_model_dir
    assert models.load_config(tiny_model_dir)["vocab_size"] == 512
