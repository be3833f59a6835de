"""Notebook 00's exercises: the bytes a decode step reads, and which roof limits it here."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from labkit.check import CheckResult, check_choice, check_close
from labkit.exercises.core import Example, exercise


def weight_file_bytes(model: str) -> int:
    """Bytes of every tensor in the model's safetensors files, read from their headers (no weights loaded)."""
    from labkit.models import ensure_model

    total = 0
    for path in sorted(Path(ensure_model(model, quiet=True)).glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        total += sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
    return total


def _decode_bytes_examples() -> list[Example]:
    from labkit.roofline import ModelShape

    n = ModelShape.from_config("tiny").parameter_count
    return [Example(right=n * 4, wrong=[n, n * 2, n * 4 * 8], context={"model": "tiny"}, label="tiny, fp32")]


@exercise(
    "00",
    1,
    "bytes of one decode step",
    kind="compute",
    hint="every fp32 parameter (4 bytes) is read once per step: parameters x 4",
    examples=_decode_bytes_examples,
)
def check_decode_bytes(answer: Any, *, model: str) -> CheckResult:
    """The learner's bytes for one batch-1 decode step of `model` in fp32 (every weight read once),
    against the bytes of the model's weight file on disk (a different path from the parameter
    count the notebook prints). 2% tolerance: the file also holds the embedding table, which a
    step reads only one row of (notebook 01 counts that exactly)."""
    return check_close(
        f"bytes read by one batch-1 decode step of {model}",
        answer,
        weight_file_bytes(model),
        rtol=0.02,
        unit="B",
        hint="every fp32 parameter (4 bytes) is read once per step",
    )


def _bound_examples() -> list[Example]:
    from labkit import reference

    ref = reference.roofline()
    ridge = ref.roofs.ridge_flop_per_byte if ref else 6.6  # the committed 2-core CPU, or its figure
    return [
        Example(
            right="memory",
            wrong=["compute", "both"],
            context={"ridge_flop_per_byte": ridge, "model": "tiny"},
            label="the committed 2-core CPU's ridge",
        )
    ]


@exercise(
    "00",
    2,
    "which roof limits decode here",
    kind="read-the-chart",
    hint="compare a batch-1 decode step's FLOP per byte (about 0.5 in fp32) with the ratio on the chart",
    examples=_bound_examples,
)
def check_decode_bound(answer: Any, *, ridge_flop_per_byte: float, model: str) -> CheckResult:
    """ "memory" or "compute": which roof limits a batch-1 fp32 decode step of `model` on a machine whose
    measured ridge is `ridge_flop_per_byte`. Expected from the step's FLOPs and bytes counted by
    `labkit.roofline` against the ridge the learner measured (every CPU and GPU has a ridge far
    above 0.5 FLOP/byte, so a busy machine cannot flip it)."""
    from labkit.roofline import ModelShape, decode_cost

    cost = decode_cost(ModelShape.from_config(model), 1, 0, "float32")
    return check_choice(
        "batch-1 decode on this machine is ...-bound",
        answer,
        cost.bound(ridge_flop_per_byte),
        hint=f"decode does {cost.intensity_flop_per_byte:.2f} FLOP per byte; this machine's ridge is "
        f"{ridge_flop_per_byte:.1f}",
    )
