"""Prose that cannot drift from the data: in the converted notebooks, a measured number is printed by
a cell, never typed into markdown; the options a multiple-choice check grades are the ones shown."""
from __future__ import annotations

import json
import re

import pytest

from labkit.config import repo_root

# Notebooks whose prose follows the rule (the others join as they are converted).
CONVERTED = ("00_welcome", "01_prefill_vs_decode", "02_kv_cache", "03_monolithic_and_interference",
             "04_disaggregated_server", "05_charting_the_gains", "06_should_you_disaggregate",
             "07_vllm_native_disaggregation")
# A number followed by a unit of measurement (model sizes such as "8B" are names, not measurements).
MEASUREMENT = re.compile(r"(?<![\w.-])\d[\d,.]*\s?(?:%|ms\b|s\b|[GMT]B\b|[GMK]iB\b|[GT]B/s|[GT]FLOP|FLOP|x\b|×|"
                         r"bytes?\b|tokens?\b|parameters\b)")
DEFINITIONS = {"2 FLOP", "4 bytes"}  # counting rules: a multiply-add is 2 FLOPs, a float32 is 4 bytes


def _markdown(name: str) -> list[str]:
    nb = json.loads((repo_root() / "notebooks" / f"{name}.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]


@pytest.mark.parametrize("name", CONVERTED)
def test_no_measured_number_is_typed_into_prose(name: str) -> None:
    found = [(m.group(), text[max(0, m.start() - 50): m.end() + 10].replace("\n", " "))
             for text in _markdown(name) for m in MEASUREMENT.finditer(text) if m.group() not in DEFINITIONS]
    assert not found, f"{name}: numbers typed into markdown (print them from a cell instead): {found}"


def test_the_regex_catches_typed_measurements() -> None:
    for text in ("reads 16 GB of weights", "near 100% in both", "≈ 4.8 ms", "295 FLOP/byte", "1.34 GB", "989 TFLOP/s"):
        assert MEASUREMENT.search(text), text
    for text in ("Llama-3.1-8B", "notebook 01", "exercise 5", "batch-1 decode"):
        assert not MEASUREMENT.search(text), text


def test_notebook_01_shows_the_options_its_mfu_check_grades() -> None:
    from labkit.exercises.nb01 import MFU_OPTIONS

    text = "\n".join(_markdown("01_prefill_vs_decode"))
    for key, option in MFU_OPTIONS.items():
        assert f"({key}) {option}" in text


def test_notebooks_04_and_05_show_the_options_their_checks_grade() -> None:
    from labkit.exercises.nb04 import STALL_OPTIONS
    from labkit.exercises.nb05 import FLIP_OPTIONS

    for name, options in (("04_disaggregated_server", STALL_OPTIONS), ("05_charting_the_gains", FLIP_OPTIONS)):
        text = "\n".join(_markdown(name))
        for key, option in options.items():
            assert f"({key}) {option}" in text, (name, key)


def test_instructor_guide_critical_batch_facts() -> None:
    """docs/instructor-guide.md: ≈ 295 at short contexts only; an 8B model never reaches the ridge from context 512."""
    from labkit.hardware import datasheets
    from labkit.roofline import ModelShape, critical_batch

    guide = (repo_root() / "docs" / "instructor-guide.md").read_text()
    assert "≈ 295" in guide and "context 512 or more decode never reaches the ridge" in guide
    shape, ridge = ModelShape.from_config("llama-3.1-8b"), datasheets()["H100 SXM"].ridge_flop_per_byte("bfloat16")
    assert round(ridge) == 295
    assert abs(critical_batch(shape, ridge, "bfloat16", 0) - 295) <= 5
    assert critical_batch(shape, ridge, "bfloat16", 512) is None
