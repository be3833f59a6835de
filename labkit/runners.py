"""Runners: one prefill or one decode step of a model, ready to be timed by `labkit.measure`.

A runner prepares the inputs (and, for decode, a KV cache already holding `context_len`
tokens) and returns a closure that does exactly one step, so the timing loop sees nothing
but the model's work:

    >>> r = TransformersRunner("small", dtype="float32")
    >>> step = r.decode_fn(batch=1, context_len=512)
    >>> step()          # one decode step; the cache is cut back, so every call sees 512 tokens

Two runners: `TransformersRunner` (Hugging Face transformers, eager PyTorch with SDPA) and
`EngineRunner` (the lab's own engine, `labkit.engine`: on a CPU its native kernels stream
every weight once per decode step). Measurements say which produced them (`name`, `detail`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from labkit.roofline import ModelShape

StepFn = Callable[[], None]


class Runner(Protocol):
    name: str  # "transformers" | "labkit-engine"
    detail: str  # how it ran, in a few words ("" when there is nothing to add)
    model: str
    dtype: str
    device: str
    shape: ModelShape

    def prefill_fn(self, batch: int, prompt_len: int) -> StepFn: ...
    def decode_fn(self, batch: int, context_len: int) -> StepFn: ...
    def close(self) -> None: ...


def _check_sizes(batch: int, n: int, what: str, max_len: int | None) -> None:
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    if max_len is not None and n + 1 > max_len:
        raise ValueError(f"{what}={n} does not fit the model's max length {max_len}")


def _prompt_ids(batch: int, n: int, seed: int = 0) -> list[list[int]]:
    """Byte-token prompts (ids 0..255), different per sequence so no prefix is shared."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(n)] for _ in range(batch)]


class TransformersRunner:
    """A Hugging Face transformers causal LM: prefill with logits for the last token only, as serving does."""

    name = "transformers"
    detail = ""

    def __init__(
        self,
        model: str = "small",
        dtype: str = "float32",
        device: str = "cpu",
        *,
        random_weights: bool = False,
        hf_model: Any | None = None,
    ) -> None:
        """random_weights: build the preset's shape directly on `device` (no disk; for GPUs)."""
        import torch

        self.model, self.dtype, self.device = str(model), dtype, device
        if not hasattr(torch, dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        if hf_model is not None:
            self.hf = hf_model
        elif random_weights:
            from labkit.models import random_hf_model

            self.hf = random_hf_model(self.model, dtype, device)
        else:
            from transformers import AutoModelForCausalLM

            from labkit.models import ensure_model

            path = ensure_model(self.model)
            hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
            self.hf = hf_model.to(device).eval()  # type: ignore[arg-type]  # transformers wraps .to(): mypy misreads it
        self.shape = ModelShape.from_config(self.hf.config.to_dict())
        self.max_len: int | None = getattr(self.hf.config, "max_position_embeddings", None)

    def _ids(self, batch: int, n: int):
        import torch

        return torch.tensor(_prompt_ids(batch, n), device=self.device)

    def prefill_fn(self, batch: int, prompt_len: int) -> StepFn:
        """One prefill of `batch` prompts of prompt_len tokens (KV cache written, last-token logits)."""
        import torch

        _check_sizes(batch, prompt_len, "prompt_len", self.max_len)
        ids = self._ids(batch, prompt_len)

        def step() -> None:
            with torch.inference_mode():
                self.hf(ids, use_cache=True, logits_to_keep=1)

        return step

    def decode_fn(self, batch: int, context_len: int) -> StepFn:
        """One decode step of `batch` sequences over context_len cached tokens each.

        The cache is cut back to context_len after every step, so repeats measure the same step.
        """
        import torch

        _check_sizes(batch, context_len, "context_len", self.max_len)
        with torch.inference_mode():
            cache = self.hf(self._ids(batch, context_len), use_cache=True, logits_to_keep=1).past_key_values
        nxt = self._ids(batch, 1)

        def step() -> None:
            with torch.inference_mode():
                self.hf(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            # A negative crop removes that many tokens (the form transformers 4.4x and 5.x both accept).
            extra = cache.get_seq_length() - context_len
            if extra > 0:
                cache.crop(-extra)

        return step

    def close(self) -> None:
        self.hf = None


class EngineRunner:
    """The lab's engine (`labkit.engine`): timed through `Engine.step()`, scheduler included."""

    name = "labkit-engine"

    def __init__(
        self,
        model: str = "small",
        dtype: str = "float32",
        device: str = "cpu",
        kv_cache_bytes: int | None = None,
        max_num_batched_tokens: int = 8192,
        **engine_kw: Any,
    ) -> None:
        """kv_cache_bytes: None keeps EngineConfig's default; engine_kw: more EngineConfig fields (e.g.
        compile_decode=True on a GPU)."""
        from labkit.engine import Engine, EngineConfig

        self.model, self.dtype, self.device = str(model), dtype, device
        kv = {} if kv_cache_bytes is None else {"kv_cache_bytes": kv_cache_bytes}
        self.engine = Engine(
            EngineConfig(
                model=self.model,
                dtype=dtype,
                device=device,
                max_num_batched_tokens=max_num_batched_tokens,
                max_num_seqs=256,
                policy="prefill_first",
                **{"enable_prefix_caching": False, **kv, **engine_kw},
            )
        )
        from labkit.engine import kernels
        from labkit.models import load_config

        m = self.engine.model
        pinned = ", threads pinned" if m.native and kernels.pin_threads() else ""
        self.detail = (
            ""
            if device != "cpu"
            else f"native CPU kernels{pinned}"
            if m.native
            else f"PyTorch paths ({m.native_note or 'native_kernels=False'})"
        )
        self.shape = ModelShape.from_config(load_config(self.model))
        self.max_len: int | None = self.engine.max_model_len
        self._live: list[str] = []
        self._seed = 1

    def _sp(self, max_tokens: int):
        from labkit.engine import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def _drain(self) -> None:
        for rid in self._live:
            self.engine.abort(rid)
        self._live.clear()
        while self.engine.has_unfinished():  # aborted requests leave nothing; bounded anyway
            if self.engine.step().phase == "idle":
                break

    def prefill_fn(self, batch: int, prompt_len: int) -> StepFn:
        """Adds `batch` fresh prompts (max_tokens=1) and steps until their prefill is done."""
        _check_sizes(batch, prompt_len, "prompt_len", self.max_len)
        self._drain()

        def step() -> None:
            self._seed += 1
            for ids in _prompt_ids(batch, prompt_len, self._seed):
                self.engine.add_request(ids, self._sp(1))
            for _ in range(batch * prompt_len + 2):  # every step makes progress: bounded loop
                if not self.engine.has_unfinished():
                    return
                self.engine.step()
            raise RuntimeError("engine did not finish the prefill batch")

        return step

    def decode_fn(self, batch: int, context_len: int) -> StepFn:
        """Prefills `batch` prompts of context_len tokens, then each call is one decode step.

        The engine's cache grows by one token per step (it cannot be cut back): over a handful of
        timed steps the context stays within a few tokens of context_len.
        """
        _check_sizes(batch, context_len, "context_len", self.max_len)
        self._drain()
        self._seed += 1
        for ids in _prompt_ids(batch, context_len, self._seed):
            room = max(1, (self.max_len or 1 << 20) - context_len)  # never past the model's length
            self._live.append(self.engine.add_request(ids, self._sp(room)))
        for _ in range(batch * context_len + 2):
            if self.engine.step().phase == "decode":
                break
        else:
            raise RuntimeError("engine never reached the decode phase")

        def step() -> None:
            out = self.engine.step()
            if out.phase != "decode" or out.num_decode_seqs != batch:
                raise RuntimeError(
                    f"expected a decode step of {batch} sequences, got {out.phase} with {out.num_decode_seqs}"
                )

        return step

    def close(self) -> None:
        """Ends what is running and lets the engine go (its weights and KV cache are freed with it)."""
        self._drain()
        self.engine = None  # type: ignore[assignment]  # closed: a later use fails loudly instead of running


def make_runner(
    kind: str = "transformers", model: str = "small", dtype: str = "float32", device: str = "cpu", **kw: Any
) -> Runner:
    """A runner by name: "transformers" or "engine" (the lab's engine)."""
    if kind == "transformers":
        return TransformersRunner(model, dtype, device, **kw)
    if kind in ("engine", "labkit-engine"):
        return EngineRunner(model, dtype, device, **kw)
    raise ValueError(f"runner {kind!r} unknown; use 'transformers' or 'engine'")
