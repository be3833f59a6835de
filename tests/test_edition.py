"""The student edition: solution cells become stubs, anything else in them fails the build, and
each notebook with exercises, run as a learner would (nbclient, ci profile), stops at its first one."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from labkit.config import repo_root
from labkit.exercises import all_exercises
from labkit.exercises.edition import (
    EDITION_TAG,
    HIDDEN_TEXT,
    STUB_TAG,
    EditionError,
    build_student_edition,
    has_solutions,
    stub_source,
    student_notebook,
)

NOTEBOOKS = repo_root() / "notebooks"


def _nb(*cells: dict) -> dict:
    return {"cells": list(cells), "metadata": {"kernelspec": {"name": "python3"}}, "nbformat": 4, "nbformat_minor": 5}


def _code(src: str, tags: tuple[str, ...] = (), outputs: list | None = None) -> dict:
    return {"cell_type": "code", "execution_count": 3, "metadata": {"tags": list(tags)}, "outputs": outputs or [],
            "source": src}


def test_assignments_become_ellipses_and_keep_their_unit_comment() -> None:
    src = "# TASK: predict the step time\npredicted_ms = 2 * 80 * 8 / 3.0   # ms\nanswer: str = 'memory'\n"
    assert stub_source(src) == "# TASK: predict the step time\npredicted_ms = ...   # ms\nanswer: str = ..."


def test_functions_keep_signature_and_docstring_and_raise() -> None:
    src = '''# TASK: write f
def f(config,
      dtype: str = "bfloat16") -> int:
    """Bytes per token.

    More words.
    """
    import math  # a comment in the body goes with it
    return math.prod([2, config])
'''
    stub = stub_source(src)
    assert stub.splitlines() == ["# TASK: write f", "def f(config,", '      dtype: str = "bfloat16") -> int:',
                                 '    """Bytes per token.', "", "    More words.", '    """',
                                 '    raise NotImplementedError("write f: see its docstring")']
    ns: dict = {}
    exec(stub, ns)  # noqa: S102 - the stub the builder wrote must run and raise
    with pytest.raises(NotImplementedError, match="write f"):
        ns["f"](1)


@pytest.mark.parametrize("src,match", [
    ("x = 1", "TASK"),
    ("# TASK:\nx = 1", "TASK"),
    ("# TASK: t\nimport math\nx = 1", "only assignments and function definitions"),
    ("# TASK: t\nprint(3)", "move `print\\(3\\)`"),
    ("# TASK: t\nfor i in range(3):\n    x = i", "only assignments"),
    ("# TASK: t\na, b = 1, 2", "one name per statement"),
    ("# TASK: t\na = b = 1", "one name per statement"),
    ("# TASK: t\ndef f():\n    return 1", "needs a docstring"),
    ("# TASK: t\n@staticmethod\ndef f():\n    '''d'''\n    return 1", "decorated"),
    ("# TASK: t\ndef f(): '''d'''; return 1", "lines of its own"),
    ("# TASK: t\n%time x = 1", "not plain Python"),
    ("# TASK: t\n", "no answer"),
])
def test_anything_but_answers_is_a_build_error(src: str, match: str) -> None:
    with pytest.raises(EditionError, match=match):
        stub_source(src, "nb, cell 3")


def test_student_notebook_strips_outputs_turns_strict_on_and_hides_explanations() -> None:
    nb = _nb({"cell_type": "markdown", "metadata": {}, "source": "# Title"},
             _code("import os", ("parameters",), outputs=[{"output_type": "stream", "name": "stdout", "text": "x"}]),
             _code("# TASK: t\nx = 41 + 1", ("solution",)),
             {"cell_type": "markdown", "metadata": {"tags": ["solution"]}, "source": "Because 42."})
    before = json.dumps(nb)
    out = student_notebook(nb, "demo.ipynb")
    assert json.dumps(nb) == before, "the instructor notebook is left as it is"
    cells = out["cells"]
    assert cells[1]["metadata"]["tags"] == [EDITION_TAG] and "student_edition()" in cells[1]["source"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in cells if c["cell_type"] == "code")
    assert cells[3]["source"] == "# TASK: t\nx = ..." and cells[3]["metadata"]["tags"] == [STUB_TAG]
    assert cells[4]["source"] == HIDDEN_TEXT and "solution" not in cells[4]["metadata"]["tags"]
    assert has_solutions(nb) and not has_solutions(out)


def test_build_errors_name_the_notebook_and_cell(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "09_bad.ipynb").write_text(json.dumps(_nb(_code("# TASK: t\nprint(1)", ("solution",)))))
    with pytest.raises(EditionError, match="09_bad.ipynb, cell 0"):
        build_student_edition(tmp_path / "out", tmp_path / "src")
    assert not (tmp_path / "out").exists(), "nothing is written when one notebook fails"


def test_every_committed_notebook_builds_and_the_cli_writes_them(tmp_path: Path) -> None:
    from labkit.cli import main

    assert main(["notebooks", "student", str(tmp_path)]) == 0
    built = sorted(p.name for p in tmp_path.glob("*.ipynb"))
    assert built == sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    for p in tmp_path.glob("*.ipynb"):
        nb = json.loads(p.read_text())
        assert not has_solutions(nb)
        assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    assert main(["notebooks", "student", str(tmp_path / "one"), "01"]) == 0
    assert [p.name for p in (tmp_path / "one").glob("*.ipynb")] == ["01_prefill_vs_decode.ipynb"]


def _with_exercises() -> list[Path]:
    return [p for p in sorted(NOTEBOOKS.glob("*.ipynb")) if has_solutions(json.loads(p.read_text()))]


@pytest.mark.parametrize("path", _with_exercises(), ids=lambda p: p.stem)
def test_a_notebook_calls_each_of_its_exercises_in_order(path: Path) -> None:
    """Every exercise registered for the notebook is checked in it, first calls in number order."""
    nb = json.loads(path.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    exercises = all_exercises(path.stem[:2])
    assert exercises, f"{path.name} has solution cells but no exercises registered in labkit.exercises.nb{path.stem[:2]}"
    assert [e.number for e in exercises] == list(range(1, len(exercises) + 1))
    where = [code.find(f"nb{path.stem[:2]}.{e.__name__}(") for e in exercises]
    assert all(w >= 0 for w in where), f"unchecked: {[e.name for e, w in zip(exercises, where) if w < 0]}"
    assert where == sorted(where), "a notebook checks its exercises in number order"


@pytest.mark.parametrize("path", _with_exercises(), ids=lambda p: p.stem)
def test_student_edition_stops_at_the_first_exercise(path: Path, tmp_path: Path, monkeypatch) -> None:
    """Run as a learner runs it: the edition must fail at its first exercise, naming it."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("LABKIT_PROFILE", "ci")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("LABKIT_STRICT", raising=False)  # the edition turns strict checks on by itself
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(repo_root()), os.environ.get("PYTHONPATH", "")]))
    (built,) = build_student_edition(tmp_path, names=[path.stem])
    nb = nbformat.read(built, as_version=4)
    first = all_exercises(path.stem[:2])[0]
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(CellExecutionError) as info:
        client.execute()
    assert info.value.ename == "ExerciseIncomplete", info.value.evalue
    assert info.value.evalue.startswith(first.name + ":"), info.value.evalue
    assert "no answer yet" in info.value.evalue
