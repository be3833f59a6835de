"""Every registered exercise: accepts its reference answer, rejects each declared wrong answer
(and raises ExerciseIncomplete for it in strict mode), and names itself when it stops."""
from __future__ import annotations

import pytest

from labkit import check
from labkit.config import set_strict, strict
from labkit.exercises import Case, Example, ExerciseIncomplete, all_exercises, run_suite
from labkit.exercises.core import Exercise

EXERCISES = all_exercises()
CASES = [(ex, i, e) for ex in EXERCISES for i, e in enumerate(ex.examples())]


@pytest.fixture()
def strict_mode():
    set_strict(True)
    yield
    set_strict(None)


def test_registry_covers_notebooks_00_and_01_with_varied_kinds() -> None:
    names = {ex.name for ex in EXERCISES}
    assert "01 · Exercise 2 · predict a decode step" in names
    nb01 = all_exercises("01")
    assert len(nb01) >= 3 and any(ex.kind == "build-it" for ex in nb01)
    assert len({ex.kind for ex in nb01}) >= 3
    assert all_exercises("00"), "notebook 00 has an exercise in the new format"


@pytest.mark.parametrize("ex,i,example", CASES, ids=[f"{ex.notebook}-{ex.number}-{i}" for ex, i, _ in CASES])
def test_check_accepts_reference_and_rejects_wrong_answers(ex: Exercise, i: int, example: Example, strict_mode) -> None:
    assert example.wrong, f"{ex.name} declares no wrong answer"
    assert ex(example.right, **example.context), f"{ex.name} rejects its reference answer ({example.label})"
    for wrong in example.wrong:
        assert not ex.evaluate(wrong, **example.context), f"{ex.name} accepts the wrong answer {wrong!r}"
        with pytest.raises(ExerciseIncomplete) as info:
            ex(wrong, **example.context)
        assert str(info.value).startswith(ex.name + ":")
        assert "Hint:" in str(info.value)


@pytest.mark.parametrize("ex", EXERCISES, ids=[f"{ex.notebook}-{ex.number}" for ex in EXERCISES])
def test_missing_answers_stop_in_strict_mode_only(ex: Exercise, strict_mode) -> None:
    context = ex.examples()[0].context
    with pytest.raises(ExerciseIncomplete, match="no answer yet"):
        ex(..., **context)
    set_strict(False)
    result = ex(None, **context)
    assert not result and result.missing


def test_a_stub_function_counts_as_missing(strict_mode) -> None:
    def stub(*args, **kwargs):
        raise NotImplementedError("write it")

    for ex in (e for e in EXERCISES if e.kind == "build-it"):
        context = ex.examples()[0].context
        assert ex.evaluate(stub, **context).missing
        with pytest.raises(ExerciseIncomplete, match=ex.name):
            ex(stub, **context)


def test_strict_reads_labkit_strict(monkeypatch) -> None:
    monkeypatch.setenv("LABKIT_STRICT", "1")
    assert strict()
    monkeypatch.setenv("LABKIT_STRICT", "0")
    assert not strict()
    set_strict(True)
    try:
        assert strict(), "the student edition's override wins over the environment"
    finally:
        set_strict(None)
    monkeypatch.setenv("LABKIT_STRICT", "maybe")
    with pytest.raises(ValueError, match="LABKIT_STRICT"):
        strict()


def test_exercise_incomplete_is_an_assertion_error() -> None:
    assert issubclass(ExerciseIncomplete, AssertionError)


def test_suite_prints_one_line_per_case_and_reports_failures(capsys) -> None:
    cases = [Case("two", (2,), 4), Case("three", (3,), 9), Case("half", (0.5,), 0.25, rtol=0.01)]
    assert run_suite("square", lambda x: x * x, cases)
    assert not run_suite("square", lambda x: x + x, cases)
    out = capsys.readouterr().out
    assert "✅ two: 4" in out and "❌ three: 6, expected 9 (0.667x)" in out
    assert "❌ square: 2 of 3 cases fail (first: three" in out


def test_suite_counts_an_exception_as_a_failed_case_and_a_stub_as_missing(capsys) -> None:
    def boom(x):
        raise KeyError("head_dim")

    result = run_suite("f", boom, [Case("one", (1,), 1)])
    assert not result and not result.missing
    assert "raised KeyError: 'head_dim'" in capsys.readouterr().out

    def stub(x):
        raise NotImplementedError

    result = run_suite("f", stub, iter([Case("one", (1,), 1)]))
    assert not result and result.missing
    assert not run_suite("f", 42, [Case("one", (1,), 1)])
    assert not run_suite("f", lambda x: "4", [Case("one", (1,), 4)]), "a string is not a number"
    assert not run_suite("f", lambda x: True, [Case("one", (1,), 1)]), "a bool is not a number"


def test_check_primitives_say_what_is_wrong(capsys) -> None:
    assert check.check_close("x", 100, 100.5, rtol=0.01)
    assert not check.check_close("x", 200, 100)
    assert check.check_close("x", ..., 1).missing
    assert not check.check_close("x", "abc", 1)
    assert check.check_ratio("p", 5, 10, lo=0.1, hi=1.0, what="MBU")
    assert not check.check_ratio("p", 50, 10, lo=0.1, hi=1.0)
    assert not check.check_ratio("p", 0.5, 10, lo=0.1, hi=1.0)
    assert check.check_choice("c", " Memory ", "memory")
    assert not check.check_choice("c", "compute", "memory")
    assert not check.check_true("t", False, why="because", hint="h")
    out = capsys.readouterr().out
    assert "too high (2x the expected value)" in out and "is too low (sane: 0.1..1)" in out
    assert "no answer yet" in out and "Hint: h" in out
