"""Greedy equality: the lab's engine and vLLM pick the same tokens on the same weights.

Both run the model in float32, but not with the same kernels (summation order, fused ops),
so their logits differ in the last bits. Greedy decoding can then legitimately flip where
the two best logits are nearly tied. The check: the token sequences agree up to the first
position where the lab's top-two logits differ by less than `rel_tol` (1e-4) relative; such
positions are reported, and a disagreement before any of them is a real bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

REL_TOL = 1e-4


@dataclass(frozen=True, slots=True)
class GreedyComparison:
    """One prompt's greedy tokens from both engines, and where the lab's logits were near a tie."""

    prompt_len: int
    lab_tokens: tuple[int, ...]
    vllm_tokens: tuple[int, ...]
    rel_gaps: tuple[float, ...]  # per output position: (top1 - top2) / |top1| of the lab's logits
    rel_tol: float = REL_TOL

    @property
    def first_mismatch(self) -> int | None:
        """Index of the first output position where the tokens differ (None: identical)."""
        for i, (a, b) in enumerate(zip(self.lab_tokens, self.vllm_tokens)):
            if a != b:
                return i
        if len(self.lab_tokens) != len(self.vllm_tokens):
            return min(len(self.lab_tokens), len(self.vllm_tokens))
        return None

    @property
    def near_ties(self) -> tuple[int, ...]:
        """Output positions where the top-two logits differ by less than `rel_tol` relative."""
        return tuple(i for i, g in enumerate(self.rel_gaps) if g < self.rel_tol)

    @property
    def equal(self) -> bool:
        """Same tokens up to the first near tie (or everywhere)."""
        m = self.first_mismatch
        if m is None:
            return True
        ties = self.near_ties
        return bool(ties) and ties[0] <= m

    @property
    def min_rel_gap(self) -> float:
        return min(self.rel_gaps) if self.rel_gaps else float("inf")

    def as_row(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_len,
            "output_tokens": len(self.lab_tokens),
            "first_mismatch": self.first_mismatch,
            "near_ties": list(self.near_ties),
            "min_rel_gap": self.min_rel_gap,
            "equal": self.equal,
        }


def rel_top2_gaps(logits: Any) -> list[float]:
    """Per row of `logits` [n, vocab]: (top1 - top2) / max(|top1|, tiny), a float per row."""
    import torch

    top = torch.topk(logits.float(), 2, dim=-1).values
    denom = top[:, 0].abs().clamp_min(1e-30)
    return [float(x) for x in (top[:, 0] - top[:, 1]) / denom]


def lab_greedy(
    prompts: Sequence[Sequence[int]], max_tokens: int, *, model: str = "tiny"
) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens from the lab's engine (float32, EOS ignored) and the relative top-2 gap
    of the logits that chose each of them; one (tokens, gaps) per prompt."""
    from labkit.engine import Engine, EngineConfig, SamplingParams

    eng = Engine(
        EngineConfig(model=model, dtype="float32", device="cpu", kv_cache_bytes=64 << 20, enable_prefix_caching=False)
    )
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = eng.generate([list(p) for p in prompts], sp)
    result = []
    for p, o in zip(prompts, outs):
        toks = list(o.output_token_ids)
        # The logits row at position len(p)-1+i chose output token i.
        logits = eng.prompt_logits(list(p) + toks[:-1])[len(p) - 1 :]
        result.append((toks, rel_top2_gaps(logits)))
    return result


def vllm_greedy(
    url: str, prompts: Sequence[Sequence[int]], max_tokens: int, *, model: str, timeout_s: float = 120.0
) -> list[list[int]]:
    """Greedy tokens from the vLLM OpenAI server at `url` (EOS ignored), one list per prompt."""
    out = []
    with httpx.Client(timeout=timeout_s) as client:
        for p in prompts:
            r = client.post(
                url.rstrip("/") + "/v1/completions",
                json={
                    "model": model,
                    "prompt": list(p),
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                },
            )
            r.raise_for_status()
            out.append([int(t) for t in r.json()["choices"][0]["token_ids"]])
    return out


def compare(
    prompts: Sequence[Sequence[int]],
    lab: Sequence[tuple[list[int], list[float]]],
    vllm: Sequence[Sequence[int]],
    rel_tol: float = REL_TOL,
) -> list[GreedyComparison]:
    """One GreedyComparison per prompt from `lab_greedy` and `vllm_greedy` results."""
    if not len(prompts) == len(lab) == len(vllm):
        raise ValueError(f"{len(prompts)} prompts but {len(lab)} lab and {len(vllm)} vLLM results")
    return [
        GreedyComparison(len(p), tuple(lt), tuple(vt), tuple(g), rel_tol) for p, (lt, g), vt in zip(prompts, lab, vllm)
    ]


def check_greedy(
    url: str,
    prompts: Sequence[Sequence[int]],
    max_tokens: int = 16,
    *,
    model: str = "tiny",
    served_model_name: str | None = None,
) -> list[GreedyComparison]:
    """Runs both engines on `prompts` and compares (vLLM at `url` must serve `model`)."""
    lab = lab_greedy(prompts, max_tokens, model=model)
    vl = vllm_greedy(url, prompts, max_tokens, model=served_model_name or model)
    return compare(prompts, lab, vl)
