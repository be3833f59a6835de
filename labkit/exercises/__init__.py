"""The notebooks' exercises: checks that live in labkit, one module per notebook (`nb00`, `nb01`, ...).

A notebook shows the task, leaves the learner a cell, and calls a check from here:

    # TASK: write kv_bytes_per_token(config, dtype): KV-cache bytes of one token   <- cell tagged `solution`
    def kv_bytes_per_token(config, dtype):
        \"\"\"Bytes of K and V one token takes (int).\"\"\"
        ...

    nb01.check_kv_bytes_per_token(kv_bytes_per_token)                             <- the next cell

Each check prints one line per verdict (✅/❌ with a hint). In strict mode (the student edition,
or `LABKIT_STRICT=1`, which CI sets) a failed or missing answer raises `ExerciseIncomplete`
(an AssertionError) naming the exercise, "01 · Exercise 2 · predict a decode step: ...", so
"Run All" stops at the first unsolved exercise.

How to write an exercise
------------------------
1. In `labkit/exercises/nbNN.py`, decorate a check with `@exercise("NN", number, "short title",
   kind=..., hint=..., examples=...)`. Kinds: build-it, predict-then-measure, read-the-chart,
   multiple-choice, compute. The check takes the learner's answer plus keyword context (the
   measurements it needs) and returns a `CheckResult` from `labkit.check` (`check_close`,
   `check_ratio`, `check_choice`, `check_true`) or from `run_suite`.
2. Compute the expected value INDEPENDENTLY of the answer's formula: from a measurement, a
   datasheet, real tensors, or another code path of labkit; never the same expression. A check
   against a measurement needs a tolerance that survives a busy 2-core box: say in the check's
   docstring what noise you measured.
3. `examples` returns `Example(right=..., wrong=[...], context={...})`s: the reference answer it
   accepts and at least one wrong answer it must reject. `tests/test_exercises.py` runs them all.
4. Build-it tasks (the learner writes a function the lab then uses): the check is a suite,
   a generator of `Case(label, args, expected)` passed to `run_suite(fn_name, fn, cases)`,
   one printed line per case. A few lines per suite; see `nb01.check_kv_bytes_per_token`.
5. In the notebook: the solution cell (tagged `solution`) holds only the answer (assignments and
   function definitions) under a `# TASK: ...` line; the check cell follows; no cell between them
   uses the answer. Put a notebook's first exercise early, before anything slow: the student-
   edition test runs each notebook until it stops there. `make student` builds the edition.
"""

from __future__ import annotations

from labkit.check import CheckResult, ExerciseIncomplete
from labkit.exercises.core import (
    KINDS,
    Example,
    Exercise,
    all_exercises,
    exercise,
    student_edition,
)
from labkit.exercises.suite import Case, run_suite

__all__ = [
    "KINDS",
    "Case",
    "CheckResult",
    "Example",
    "Exercise",
    "ExerciseIncomplete",
    "all_exercises",
    "exercise",
    "run_suite",
    "student_edition",
]
