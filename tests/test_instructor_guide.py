"""The notebook timing runner and the instructor guide's generated sections."""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from labkit import instructor_guide as ig
from labkit.notebook_times import Machine, NotebookTime, cell_label, first_line, time_notebook, time_notebooks


def _notebook(path: Path, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 99 · A throwaway notebook")] + [nbformat.v4.new_code_cell(c)
                                                                                for c in cells]
    nbformat.write(nb, path)
    return path


def test_runner_times_each_slow_cell_and_sets_the_profile(tmp_path):
    nb = _notebook(tmp_path / "99_tiny.ipynb", [
        "import os\nassert os.environ['LABKIT_PROFILE'] == 'ci' and os.environ['MPLBACKEND'] == 'Agg'",
        "# sleep past the threshold\nimport time\ntime.sleep(0.25)",
        "x = 1"])
    t = time_notebook(nb, "ci", slow_s=0.15, cell_timeout_s=60)
    assert t.ok, t.error
    assert t.cells == 3
    assert [(c.index, c.first_line) for c in t.slow_cells] == [(2, "time.sleep(0.25)")]   # labelled by what it does
    assert 0.25 <= t.slow_cells[0].seconds < 5
    assert t.seconds >= t.slow_cells[0].seconds      # wall time covers the cells and the kernel start


def test_runner_records_a_failing_cell_and_writes_mergeable_json(tmp_path):
    ok = _notebook(tmp_path / "01_ok.ipynb", ["y = 2"])
    bad = _notebook(tmp_path / "02_bad.ipynb", ["a = 1", "raise ValueError('boom')", "b = 2"])
    machine = Machine(cores=2, cpu_count=2, cpu_model="test CPU")
    out = tmp_path / "notebook_times-2026-01-01-cpu-2core-ci.json"
    doc = time_notebooks([bad], "ci", out, machine=machine, progress=False, cell_timeout_s=60)
    failed = NotebookTime.from_dict(doc["notebooks"][0])
    assert not failed.ok and failed.failed_cell == 2 and "boom" in failed.error
    time_notebooks([ok], "ci", out, machine=machine, progress=False, cell_timeout_s=60)
    saved = json.loads(out.read_text())
    assert saved["machine"] == "cpu-2core" and saved["profile"] == "ci" and saved["cpu_model"] == "test CPU"
    assert [n["notebook"] for n in saved["notebooks"]] == ["01_ok.ipynb", "02_bad.ipynb"]   # merged, not replaced
    assert len(saved["notebooks"][0]["loadavg_before"]) == 3


def test_a_run_stopped_part_way_keeps_what_it_timed(tmp_path, monkeypatch):
    """A full profile takes an hour: the JSON is written after every notebook, not only at the end."""
    import labkit.notebook_times as nt

    first = _notebook(tmp_path / "01_first.ipynb", ["y = 2"])
    second = _notebook(tmp_path / "02_second.ipynb", ["z = 3"])
    real = nt.time_notebook

    def stop_at_the_second(path, *a, **kw):
        if path == second:
            raise KeyboardInterrupt           # the instructor's Ctrl-C, or a timeout's signal
        return real(path, *a, **kw)

    monkeypatch.setattr(nt, "time_notebook", stop_at_the_second)
    out = tmp_path / "notebook_times-2026-01-01-cpu-2core-full.json"
    with pytest.raises(KeyboardInterrupt):
        time_notebooks([first, second], "full", out, machine=Machine(2, 2, "cpu"), progress=False, cell_timeout_s=60)
    saved = json.loads(out.read_text())
    assert saved["profile"] == "full" and [n["notebook"] for n in saved["notebooks"]] == ["01_first.ipynb"]


def test_runner_rejects_an_unknown_profile(tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        time_notebook(_notebook(tmp_path / "x.ipynb", ["1"]), "bogus")


def test_first_line_and_machine_tags():
    assert first_line(["\n", "  for x in range(3):\n", "    pass"]) == "for x in range(3):"
    assert len(first_line("x" * 200)) == 80
    # a long cell is labelled by what it does, not by its imports
    assert cell_label("import inspect\nfrom labkit.serve import (\n    launch,\n)\n# start it\nsrv = launch('disagg')") \
        == "srv = launch('disagg')"
    assert cell_label("import matplotlib.pyplot as plt\nimport numpy as np") == "import matplotlib.pyplot as plt"
    assert cell_label("%time x = 1\ny = 2") == "%time x = 1"
    assert Machine(2, 2, "cpu").tag == "cpu-2core" and Machine(16, 64, "cpu").tag == "cpu-16core"
    assert Machine(16, 16, "cpu", gpu="NVIDIA H100 80GB HBM3").tag == "h100-sxm"
    assert [ig.machine_class(t) for t in ("cpu-2core", "cpu-7core", "cpu-8core", "h100-sxm")] == [
        "cpu-small", "cpu-small", "cpu-8plus", "gpu"]


def _times_file(d: Path, machine: str, profile: str, date: str, notebooks: list[dict]) -> None:
    (d / f"notebook_times-{date}-{machine}-{profile}.json").write_text(json.dumps(
        {"machine": machine, "profile": profile, "date": date, "notebooks": notebooks}))


def test_renderer_reads_fake_results_and_never_invents_a_number(tmp_path):
    nb = {"notebook": "03_x.ipynb", "seconds": 754.0, "ok": True, "cells": 9, "loadavg_before": [1.5, 1, 1],
          "slow_cells": [{"index": 4, "first_line": "run_sweep(`a`|b)", "seconds": 612.0},
                         {"index": 7, "first_line": "plot()", "seconds": 11.0}]}
    _times_file(tmp_path, "cpu-2core", "full", "2026-01-01", [dict(nb, seconds=900.0)])
    _times_file(tmp_path, "cpu-2core", "full", "2026-01-02", [nb])          # newer: this one is shown
    _times_file(tmp_path, "cpu-2core", "ci", "2026-01-02", [dict(nb, seconds=42.0, slow_cells=[])])
    _times_file(tmp_path, "h100-sxm", "gpu", "2026-01-02", [dict(nb, ok=False, failed_cell=5, seconds=65.0,
                                                                 slow_cells=[dict(nb["slow_cells"][0], seconds=30.0)])])
    (tmp_path / "serve_interference-2026-01-01-cpu-2core.json").write_text(json.dumps(
        {"model": "small", "long_prompt_tokens": 2048, "num_decodes": 4, "chunk_tokens": 256,
         "median": {"mono": {"decode_stall_max_ms": 34000.0}, "1p1d": {"decode_stall_max_ms": 450.0}}}))
    runs = ig.timing_runs(tmp_path)
    figs = ig.key_figures(tmp_path)
    assert [f.notebook for f in figs] == ["03"] and "mono 34 s, 1p1d 0.5 s" in figs[0].text
    text = ig.render_timing([("03_x.ipynb", "Interference"), ("04_y.ipynb", "Server")], runs, figs)
    row03 = next(ln for ln in text.splitlines() if ln.startswith("| 03"))
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row03.strip("|"))]
    assert len(cells) == 5
    assert cells[1].startswith("full: **12 min 34 s** (cpu-2core, 2026-01-02, load 1.5)")
    assert "ci: **42 s**" in cells[1]
    assert cells[2].startswith("full: not measured yet: `taskset -c 0-7 labkit notebooks time 03 --profile full`")
    assert cells[3].startswith("gpu: **failed at cell 5 after 1 min 05 s**")
    assert cells[4] == "cell 4 `run_sweep('a'\\|b)`: 10 min 12 s (cpu-2core full)<br>cell 7 `plot()`: 11 s (cpu-2core full)"
    row04 = next(ln for ln in text.splitlines() if ln.startswith("| 04"))
    assert row04.count("not measured yet") == 4 and "**" not in row04
    assert "(`serve_interference-2026-01-01-cpu-2core.json`)" in text


def test_long_cells_name_the_heading_they_sit_under(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 03 · Title"), nbformat.v4.new_code_cell("a = 1"),
                nbformat.v4.new_markdown_cell("Some text.\n\n## 2. The sweep | all of it"),
                nbformat.v4.new_code_cell("run_sweep()"), nbformat.v4.new_markdown_cell("No heading here."),
                nbformat.v4.new_code_cell("plot()")]
    nbformat.write(nb, tmp_path / "03_x.ipynb")
    sections = ig.cell_sections(tmp_path)["03_x.ipynb"]
    assert sections == ["", "03 · Title", "03 · Title", "2. The sweep | all of it", "2. The sweep | all of it",
                        "2. The sweep | all of it"]
    slow = [{"index": 5, "first_line": "plot()", "seconds": 20.0}, {"index": 3, "first_line": "run_sweep()",
                                                                    "seconds": 90.0}]
    _times_file(tmp_path, "cpu-2core", "full", "2026-01-02",
                [{"notebook": "03_x.ipynb", "seconds": 120.0, "ok": True, "cells": 6, "slow_cells": slow,
                  "error": "", "failed_cell": None, "loadavg_before": [1.0, 1.0, 1.0]}])
    text = ig.long_cells("03_x.ipynb", ig.timing_runs(tmp_path), sections=sections)
    assert text.split("<br>") == ['cell 3 in "2. The sweep / all of it" `run_sweep()`: 1 min 30 s (cpu-2core full)',
                                  'cell 5 in "2. The sweep / all of it" `plot()`: 20 s (cpu-2core full)']


def test_replace_section_keeps_the_rest_and_needs_markers():
    doc = f"a\n{ig.begin_marker('t')}\nold\n{ig.end_marker('t')}\nb\n"
    assert ig.replace_section(doc, "t", "new\n") == f"a\n{ig.begin_marker('t')}\nnew\n{ig.end_marker('t')}\nb\n"
    with pytest.raises(ValueError, match="markers"):
        ig.replace_section("no markers here", "t", "x")


def test_committed_guide_matches_the_generator():
    """The guide's numbers cannot drift: regenerate with `python scripts/instructor_table.py`."""
    text = ig.guide_path().read_text()
    assert ig.begin_marker(ig.TIMING) in text and ig.begin_marker(ig.COUNTER) in text
    assert ig.rendered_guide(text) == text, "docs/instructor-guide.md is stale: run python scripts/instructor_table.py"
    assert "(>16)" not in text.split(ig.begin_marker(ig.COUNTER))[0].split("## Facts worth citing")[1]
