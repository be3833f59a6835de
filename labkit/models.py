"""Model presets and the embedded default models, written locally from a fixed seed.

No weights can be downloaded in a workshop room (or in CI), so the lab writes its own:
a Llama-architecture `config.json`, random but deterministic weights (`model.safetensors`,
the same bytes on every machine) and a byte-level tokenizer, in a directory that both
Hugging Face transformers and vLLM load. Performance does not depend on the weights'
values; correctness is checked against a reference implementation.

    >>> path = ensure_model("tiny")          # ~/.cache/labkit/models/tiny-v1
    >>> tok = ByteTokenizer(); tok.decode(tok.encode("héllo"))
    'héllo'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labkit.config import labkit_home

# Bump when the written bytes of any preset change, so old caches are not reused.
WRITER_VERSION = 1
SEED = 20240601
MANIFEST = "labkit_manifest.json"

# Byte-level tokenizer: ids 0..255 are the bytes, then the special tokens.
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
SPECIAL_TOKENS = {"<|begin_of_text|>": BOS_ID, "<|end_of_text|>": EOS_ID, "<|pad|>": PAD_ID}


@dataclass(frozen=True)
class Preset:
    """A model shape. `writable_dtype` is what `ensure_model` writes the weights in."""

    name: str
    architecture: str  # "llama" | "qwen2" | "mistral"
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    head_dim: int | None = None
    writable_dtype: str = "float32"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.name}: heads {self.num_attention_heads} not a multiple of kv heads {self.num_key_value_heads}"
            )
        if self.vocab_size <= PAD_ID:
            raise ValueError(f"{self.name}: vocab_size {self.vocab_size} must exceed {PAD_ID} (byte tokenizer)")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def hf_config(self) -> dict[str, Any]:
        """The `config.json` that transformers and vLLM read."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[
            self.architecture
        ]
        cfg: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.architecture,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            "torch_dtype": self.writable_dtype,
            "use_cache": True,
        }
        if self.architecture == "llama":
            cfg["attention_bias"] = self.attention_bias
            cfg["mlp_bias"] = False
        if self.architecture == "qwen2":
            cfg["use_sliding_window"] = False
            cfg["sliding_window"] = None
            cfg["max_window_layers"] = self.num_hidden_layers
        if self.architecture == "mistral":
            cfg["sliding_window"] = None
        cfg.update(self.extra)
        return cfg

    @property
    def has_qkv_bias(self) -> bool:
        return self.architecture == "qwen2" or self.attention_bias


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny",
            "llama",
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=704,
            vocab_size=512,
            max_position_embeddings=2048,
            note="~3.2M parameters; CI and quick checks",
        ),
        Preset(
            "small",
            "llama",
            hidden_size=1024,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=4,
            intermediate_size=2816,
            vocab_size=8192,
            max_position_embeddings=4096,
            note="~107M parameters, 428 MB fp32: larger than any CPU cache, so decode is memory-bound",
        ),
        Preset(
            "tiny-qwen2",
            "qwen2",
            hidden_size=256,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=512,
            vocab_size=512,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            note="Qwen2-style: qkv bias, tied embeddings (tests)",
        ),
        Preset(
            "llama-3.2-1b",
            "llama",
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=8192,
            vocab_size=128256,
            max_position_embeddings=131072,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=_LLAMA3_ROPE,
            writable_dtype="bfloat16",
            note="Llama-3.2-1B shape, random weights",
        ),
        Preset(
            "llama-3.1-8b",
            "llama",
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
            writable_dtype="bfloat16",
            note="Llama-3.1-8B shape, random weights",
        ),
        Preset(
            "qwen2.5-7b",
            "qwen2",
            hidden_size=3584,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            intermediate_size=18944,
            vocab_size=152064,
            max_position_embeddings=32768,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            writable_dtype="bfloat16",
            note="Qwen2.5-7B shape, random weights",
        ),
    ]
}
DEFAULT_MODEL = "small"
CI_MODEL = "tiny"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}") from None


# --- weights ---------------------------------------------------------------------------


def tensor_shapes(p: Preset) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every weight, in Hugging Face's naming, in a fixed order."""
    h, hd = p.hidden_size, p.resolved_head_dim
    q, kv = p.num_attention_heads * hd, p.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (p.vocab_size, h)}
    for i in range(p.num_hidden_layers):
        pre = f"model.layers.{i}."
        shapes[pre + "input_layernorm.weight"] = (h,)
        shapes[pre + "self_attn.q_proj.weight"] = (q, h)
        shapes[pre + "self_attn.k_proj.weight"] = (kv, h)
        shapes[pre + "self_attn.v_proj.weight"] = (kv, h)
        if p.has_qkv_bias:
            shapes[pre + "self_attn.q_proj.bias"] = (q,)
            shapes[pre + "self_attn.k_proj.bias"] = (kv,)
            shapes[pre + "self_attn.v_proj.bias"] = (kv,)
        shapes[pre + "self_attn.o_proj.weight"] = (h, q)
        shapes[pre + "post_attention_layernorm.weight"] = (h,)
        shapes[pre + "mlp.gate_proj.weight"] = (p.intermediate_size, h)
        shapes[pre + "mlp.up_proj.weight"] = (p.intermediate_size, h)
        shapes[pre + "mlp.down_proj.weight"] = (h, p.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    if not p.tie_word_embeddings:
        shapes["lm_head.weight"] = (p.vocab_size, h)
    return shapes


def parameter_count(p: Preset) -> int:
    return int(sum(int(np.prod(s)) for s in tensor_shapes(p).values()))


def _init_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], embed_std: float = 1.0) -> np.ndarray:
    """Deterministic values: norms near 1, biases and matrices small Gaussians (std 0.02).

    Norm weights are 1 plus noise (not exactly 1) so a forward pass that forgets a norm
    weight is caught by the reference comparison.
    """
    x = rng.standard_normal(size=shape, dtype=np.float32)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * x
    if name.endswith(".bias"):
        return 0.02 * x
    if name == "model.embed_tokens.weight":
        # Unit-scale embeddings keep greedy continuations varied (not one token repeated),
        # which makes token-equality tests meaningful.
        return embed_std * x
    return 0.02 * x


def _write_weights(p: Preset, out: Path, shard_bytes: int = 2 << 30) -> list[str]:
    """Writes safetensors (sharded above `shard_bytes`); returns the file names."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, p.writable_dtype)
    rng = np.random.Generator(np.random.PCG64(SEED))
    shapes = tensor_shapes(p)
    # Tied embeddings are also the output layer: keep them small, or every logit row is
    # dominated by the input token itself.
    embed_std = 0.01 if p.tie_word_embeddings else 1.0
    init = lambda n, s: _init_tensor(rng, n, s, embed_std)
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(int(np.prod(s)) for s in shapes.values()) * itemsize
    meta = {"format": "pt"}
    if total <= shard_bytes:
        tensors = {n: torch.from_numpy(init(n, s)).to(dtype) for n, s in shapes.items()}
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    # Shards of about shard_bytes each, plus the index transformers and vLLM expect.
    groups: list[list[str]] = [[]]
    size = 0
    for n, s in shapes.items():
        nbytes = int(np.prod(s)) * itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nbytes
    files, weight_map = [], {}
    for k, names in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: torch.from_numpy(init(n, shapes[n])).to(dtype) for n in names}
        save_file(tensors, str(out / fname), metadata=meta)
        del tensors
        files.append(fname)
        weight_map.update({n: fname for n in names})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    return files + ["model.safetensors.index.json"]


# --- tokenizer -------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ByteTokenizer:
    """The lab's tokenizer in plain Python: one token per UTF-8 byte, BOS prepended.

    Agrees id for id with the `tokenizer.json` written beside the weights (tested), so the
    lab's engine and server need no tokenizer library on the hot path.
    """

    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    pad_token_id = PAD_ID

    def __init__(self, vocab_size: int = 512) -> None:
        if vocab_size <= PAD_ID:
            raise ValueError(f"vocab_size {vocab_size} must exceed {PAD_ID}")
        self.vocab_size = vocab_size

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return [BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Special and out-of-byte-range ids are dropped; broken UTF-8 becomes U+FFFD."""
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")


def _write_tokenizer(p: Preset, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", BOS_ID)],
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>",
                "pad_token": "<|pad|>",
                "add_bos_token": True,
                "clean_up_tokenization_spaces": False,
                "model_max_length": p.max_position_embeddings,
            },
            indent=1,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"}, indent=1)
    )


# --- the model directory ---------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_model(name: str, out_dir: str | os.PathLike[str]) -> Path:
    """Writes preset `name` into `out_dir` (created); returns it. Deterministic bytes."""
    p = get_preset(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(p.hf_config(), indent=1, sort_keys=True))
    (out / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False}, indent=1
        )
    )
    _write_tokenizer(p, out)
    _write_weights(p, out)
    files = sorted(f.name for f in out.iterdir() if f.is_file() and f.name != MANIFEST)
    manifest = {
        "preset": name,
        "writer_version": WRITER_VERSION,
        "seed": SEED,
        "files": {f: {"bytes": (out / f).stat().st_size, "sha256": _sha256(out / f)} for f in files},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return out


def model_dir(name: str) -> Path:
    """Where `ensure_model(name)` keeps preset `name`."""
    return labkit_home() / "models" / f"{name}-v{WRITER_VERSION}"


def verify_model(path: str | os.PathLike[str], full: bool = True) -> str | None:
    """None when the directory matches its manifest; otherwise what is wrong, in words."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"manifest unreadable ({e.__class__.__name__})"
    for fname, rec in manifest.get("files", {}).items():
        f = path / fname
        if not f.is_file():
            return f"{fname} missing"
        if f.stat().st_size != rec["bytes"]:
            return f"{fname} has {f.stat().st_size} bytes, expected {rec['bytes']}"
        if full and _sha256(f) != rec["sha256"]:
            return f"{fname} checksum mismatch"
    return None


def ensure_model(name_or_path: str | os.PathLike[str], *, verify: bool = True, quiet: bool = False) -> Path:
    """A loadable model directory for a preset name, a local directory, or a hub id.

    Presets are written under `LABKIT_HOME` on first use and rewritten when missing or
    corrupt (checked against the sha256 manifest). A local directory is returned as is.
    A hub id is resolved only from the local Hugging Face cache: the lab never downloads.
    """
    s = str(name_or_path)
    if s in PRESETS:
        target = model_dir(s)
        problem = verify_model(target, full=verify) if target.exists() else "not written yet"
        if problem is None:
            return target
        p = PRESETS[s]
        size_mb = parameter_count(p) * (2 if p.writable_dtype == "bfloat16" else 4) / 1e6
        if not quiet:
            print(f"labkit: writing model {s!r} ({size_mb:,.0f} MB) to {target} ({problem})")
        if size_mb > 4000:
            warnings.warn(
                f"{s} writes {size_mb / 1e3:.1f} GB of random weights; for GPU runs "
                "labkit.models.random_hf_model builds it in device memory instead",
                stacklevel=2,
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{s}-", dir=target.parent))
        try:
            write_model(s, tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target
    path = Path(s).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        return path
    if "/" in s and not s.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(s, local_files_only=True))
        except Exception as e:  # noqa: BLE001 - any failure means "not cached here"
            raise FileNotFoundError(
                f"{s!r} is not in the local Hugging Face cache ({e.__class__.__name__}); the lab does not "
                "download weights. Download it yourself where you have access, or use a preset: "
                f"{sorted(PRESETS)}"
            ) from None
    raise FileNotFoundError(f"{s!r} is neither a preset ({sorted(PRESETS)}) nor a model directory")


def load_config(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The Hugging Face config of a preset (no weights written) or of a model directory."""
    s = str(name_or_path)
    if s in PRESETS:
        return PRESETS[s].hf_config()
    return json.loads((ensure_model(s) / "config.json").read_text())


def load_tokenizer(name_or_path: str | os.PathLike[str]):
    """A tokenizer for a model: the lab's ByteTokenizer for presets, else transformers'."""
    s = str(name_or_path)
    path = ensure_model(s)
    cfg = json.loads((path / "config.json").read_text())
    manifest = path / MANIFEST
    if s in PRESETS or manifest.is_file():
        return ByteTokenizer(cfg["vocab_size"])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def random_hf_model(name: str, dtype: str = "bfloat16", device: str = "cuda"):
    """A transformers model of a preset's shape with random weights, built on `device`.

    For the real shapes on an accelerator: no 16 GB file written to disk first.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in get_preset(name).hf_config().items() if k != "architectures"})
    torch_dtype = getattr(torch, dtype)
    # Seeded, so a prefill and a decode process on one kind of device build the same weights (their
    # KV then means the same thing to both), without touching the caller's random state.
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), dev:
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch_dtype)
    return model.eval()
