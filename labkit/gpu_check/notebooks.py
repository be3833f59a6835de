"""The notebooks in the gpu profile, under nbmake, each with a share of the time left.

On a GPU every chosen notebook runs with LABKIT_PROFILE=gpu (its GPU branches: real shapes on the
lab engine with CUDA graphs, cuda-ipc, servers on the GPU, vLLM on one GPU); `--smoke` runs them in
the ci profile on the CPU. nbmake, nbclient and ipykernel are not in every GPU image: carry them as
wheels (`make gpu-wheels`, see scripts/gpu_wheels.py). Strict checks are on, as in CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any

from labkit.config import repo_root
from labkit.gpu_check.core import Ctx

DEFAULT_NOTEBOOKS = ("01", "02", "04")  # the cheapest set that covers the engine, cuda-ipc and serving on a GPU


def check_notebooks(ctx: Ctx) -> None:
    import importlib.util

    if importlib.util.find_spec("nbmake") is None:
        raise RuntimeError("nbmake is not installed here: carry it as wheels (make gpu-wheels; scripts/gpu_wheels.py)")
    root = repo_root()
    chosen = ctx.notebooks or (["00"] if ctx.smoke else list(DEFAULT_NOTEBOOKS))
    paths = [p for n in chosen for p in sorted((root / "notebooks").glob(f"{n}_*.ipynb"))]
    if not paths:
        raise ValueError(f"no notebook matches {chosen}")
    env = {
        **os.environ,
        "LABKIT_PROFILE": "ci" if ctx.smoke else "gpu",
        "LABKIT_STRICT": "1",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    results: dict[str, Any] = {}
    ctx.results["notebooks"] = results
    failed = []
    for k, path in enumerate(paths):
        share = max(30.0, (ctx.left_s() - 10) / (len(paths) - k))
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--nbmake",
            f"--nbmake-timeout={int(share)}",
            str(path),
        ]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, cwd=root, env=env, capture_output=True, text=True, timeout=share + 30, check=False
            )  # a failed notebook is recorded, not raised
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired:
            text, rc = f"(killed after {share + 30:.0f} s)", -9
        seconds = time.monotonic() - t0
        passed = rc == 0 and bool(re.search(r"\b1 passed", text))
        results[path.stem] = {"passed": passed, "seconds": seconds, "returncode": rc, "tail": text[-2500:]}
        ctx.log(
            f"notebooks: {path.stem} ({env['LABKIT_PROFILE']} profile) {'passed' if passed else 'FAILED'} "
            f"in {seconds:.0f} s (budget {share:.0f} s)" + ("" if passed else f"\n{text[-2500:]}")
        )
        if not passed:
            failed.append(path.stem)
    if failed:
        raise RuntimeError(f"notebooks failed: {failed}")
