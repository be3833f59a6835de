"""Exercises: a check with a name, a kind, a hint, and the answers it must reject; the registry.

An `Exercise` wraps a check function `check(answer, **context) -> CheckResult`. Calling the
exercise runs the check, and in strict mode (`labkit.config.strict()`: the student edition, or
`LABKIT_STRICT=1`) turns a failed or missing answer into `ExerciseIncomplete`, whose message
names the exercise, so "Run All" stops there. Every exercise declares `examples`: contexts with
the reference answer and wrong answers the check must reject; `tests/test_exercises.py` walks
the registry and holds every check to them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from labkit.check import CheckResult, ExerciseIncomplete, is_missing, missing
from labkit.config import set_strict, strict

Kind = Literal["build-it", "predict-then-measure", "read-the-chart", "multiple-choice", "compute"]
KINDS: tuple[str, ...] = ("build-it", "predict-then-measure", "read-the-chart", "multiple-choice", "compute")
CheckFn = Callable[..., CheckResult]


@dataclass(frozen=True)
class Example:
    """What the tests feed a check: its context, the reference answer, and answers it must reject.

    For a build-it exercise the answers are functions (the reference one, and broken ones).
    """

    right: Any
    wrong: Sequence[Any]
    context: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.wrong:
            raise ValueError(f"example {self.label!r}: a check must declare at least one wrong answer it rejects")


class Exercise:
    """One exercise of one notebook: `exercise(answer, **context)` checks, prints, and stops in strict mode."""

    def __init__(
        self,
        notebook: str,
        number: int,
        title: str,
        kind: Kind,
        hint: str,
        check: CheckFn,
        examples: Callable[[], Sequence[Example]],
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} not one of {KINDS}")
        if not (len(notebook) == 2 and notebook.isdigit()):
            raise ValueError(f"notebook must be two digits like '01', got {notebook!r}")
        if number < 1 or not title or not hint:
            raise ValueError("an exercise needs a number >= 1, a title and a hint")
        self.notebook, self.number, self.title, self.kind, self.hint = notebook, number, title, kind, hint
        self.check, self.examples = check, examples
        self.__doc__ = check.__doc__
        self.__name__ = check.__name__

    @property
    def name(self) -> str:
        """ "01 · Exercise 2 · predict a decode step": how messages and the notebook name it."""
        return f"{self.notebook} · Exercise {self.number} · {self.title}"

    def evaluate(self, answer: Any, **context: Any) -> CheckResult:
        """Runs the check and returns its verdict; never raises for a wrong answer (tests use this)."""
        if is_missing(answer):
            return missing(self.title, self.hint)
        try:
            result = self.check(answer, **context)
        except NotImplementedError:  # a stub the check called, outside a suite
            return missing(
                self.title, self.hint, todo="write the function's body (it still raises NotImplementedError)"
            )
        if not isinstance(result, CheckResult):
            raise TypeError(f"{self.name}: its check returned {type(result).__name__}, not a CheckResult")
        return result

    def __call__(self, answer: Any, **context: Any) -> CheckResult:
        """Checks `answer`; in strict mode a failed or missing one raises ExerciseIncomplete."""
        result = self.evaluate(answer, **context)
        if not result and strict():
            raise ExerciseIncomplete(self.failure_message(result))
        return result

    def failure_message(self, result: CheckResult) -> str:
        """The exception text: the exercise's name, the verdict, and the hint."""
        text = result.message.removeprefix("❌").strip()
        if "Hint:" not in text:
            text += f" Hint: {self.hint}"
        return f"{self.name}: {text}"

    def __repr__(self) -> str:
        return f"<Exercise {self.name} ({self.kind})>"


_REGISTRY: dict[tuple[str, int], Exercise] = {}


def exercise(
    notebook: str, number: int, title: str, *, kind: Kind, hint: str, examples: Callable[[], Sequence[Example]]
) -> Callable[[CheckFn], Exercise]:
    """Decorator: registers `check` as exercise `number` of `notebook`; returns the Exercise."""

    def wrap(check: CheckFn) -> Exercise:
        ex = Exercise(notebook, number, title, kind, hint, check, examples)
        key = (notebook, number)
        if key in _REGISTRY and _REGISTRY[key].check.__qualname__ != check.__qualname__:
            raise ValueError(f"{ex.name} is registered twice ({_REGISTRY[key].__name__} and {check.__name__})")
        _REGISTRY[key] = ex
        return ex

    return wrap


def all_exercises(notebook: str | None = None) -> list[Exercise]:
    """Every registered exercise (each notebook's module imported), in notebook and number order."""
    import labkit.exercises as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("nb") and mod.name[2:].isdigit():
            importlib.import_module(f"labkit.exercises.{mod.name}")
    return [_REGISTRY[k] for k in sorted(_REGISTRY) if notebook is None or k[0] == notebook]


def student_edition() -> None:
    """Called by the student edition's first code cell: checks stop "Run All" at the first unsolved exercise."""
    set_strict(True)
    print("Student edition: each exercise's check stops Run All until it is solved.")
