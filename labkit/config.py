"""Where things live and which profile runs (one place for environment variables), and how a settings
dataclass becomes command-line flags (`doc`, `add_flags`), so a default is written once."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import MISSING, Field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args, get_origin, get_type_hints

Profile = Literal["ci", "full", "gpu"]
_PROFILES = ("ci", "full", "gpu")


def labkit_home() -> Path:
    """Cache directory for written models and measurements (`LABKIT_HOME`, default ~/.cache/labkit)."""
    home = os.environ.get("LABKIT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "labkit")
    return Path(home)


def profile() -> Profile:
    """`LABKIT_PROFILE`: "ci" (small and fast, what CI runs), "full" (the real lesson on a CPU) or
    "gpu" (the real shapes on a CUDA GPU). Unset: "gpu" where CUDA works, else "full"."""
    value = os.environ.get("LABKIT_PROFILE", "").strip().lower()
    if not value:
        return "gpu" if cuda_available() else "full"
    if value not in _PROFILES:
        raise ValueError(f"LABKIT_PROFILE={value!r} is not one of {_PROFILES}")
    return cast(Profile, value)  # checked against _PROFILES just above


def cuda_available() -> bool:
    """True when torch is installed with CUDA and sees a GPU (False without torch: nothing imported twice)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


_strict_override: bool | None = None


def strict() -> bool:
    """Whether a failed or missing exercise answer stops the notebook (raises `ExerciseIncomplete`).

    On in the student edition (its first cell calls `set_strict(True)`) and wherever
    `LABKIT_STRICT=1` (CI runs the instructor edition so, to catch a wrong solution or a drifted
    expectation). Off otherwise: a check prints its verdict and the notebook goes on.
    """
    if _strict_override is not None:
        return _strict_override
    value = os.environ.get("LABKIT_STRICT", "0").strip().lower()
    if value not in ("0", "1", "true", "false", ""):
        raise ValueError(f"LABKIT_STRICT={value!r}: use 1 (checks stop the notebook) or 0")
    return value in ("1", "true")


def set_strict(on: bool | None) -> None:
    """Overrides `LABKIT_STRICT` in this process (None: back to the environment variable)."""
    global _strict_override
    _strict_override = on


def repo_root() -> Path:
    """The checkout that holds this package (the lab always installs editable)."""
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The project's shipped data files (datasheets, workload presets)."""
    return repo_root() / "data"


def shared_data_dir() -> Path | None:
    """Public traces beside the checkout (../shared/data), when present; never committed."""
    for cand in (os.environ.get("LABKIT_SHARED_DATA"), repo_root().parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


# --- settings as dataclasses: one default, its doc and its command-line flag, written once -----------


def doc(help: str, flag: str | None = None) -> dict[str, str]:
    """A settings field's metadata: its help text (and its flag's name, when the field's would not do).

        block_size: int = field(default=16, metadata=doc("tokens per KV block"))

    `add_flags` turns every field into a `--flag` with this help, so a setting's default and doc
    live in the dataclass only.
    """
    return {"help": help, **({"flag": flag} if flag else {})}


def _flat_fields(cls: type, skip: Iterable[str] = ()) -> Iterator[tuple[tuple[str, ...], Field[Any], Any]]:
    """(path, field, resolved type) of every leaf field of dataclass `cls`; nested dataclasses are flattened."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        if isinstance(tp, type) and is_dataclass(tp):
            for path, sub, sub_tp in _flat_fields(tp, skip):
                yield (f.name, *path), sub, sub_tp
        else:
            yield (f.name,), f, tp


def _key(f: Field[Any]) -> str:
    """A leaf setting's flat name: its flag's, in snake case (unique across a composed config)."""
    return str(f.metadata.get("flag") or f.name).replace("-", "_")


def add_flags(
    parser: argparse._ActionsContainer,
    cls: type,
    *,
    skip: Iterable[str] = (),
    only: Iterable[str] | None = None,
    keep_defaults: bool = False,
) -> None:
    """Adds one flag per leaf field of dataclass `cls` (or the `only` ones; help from the field's `doc`,
    the default shown from the dataclass). Flags left out are absent from the parsed namespace, so
    `flag_values` returns only what was given; `keep_defaults`: they take the dataclass's default."""
    wanted = None if only is None else set(only)
    for _, f, tp in _flat_fields(cls, skip):
        if wanted is not None and f.name not in wanted:
            continue
        default = f.default_factory() if f.default is MISSING and callable(f.default_factory) else f.default
        shown = "" if default is None else f" (default: {default})"
        kw: dict[str, Any] = {
            "dest": _key(f),
            "default": default if keep_defaults else argparse.SUPPRESS,
            "help": f"{f.metadata.get('help', '')}{shown}".strip(),
        }
        args = get_args(tp)
        if tp is bool:
            parser.add_argument("--" + _key(f).replace("_", "-"), action=argparse.BooleanOptionalAction, **kw)
            continue
        if get_origin(tp) is Literal:
            parser.add_argument("--" + _key(f).replace("_", "-"), choices=list(args), **kw)
            continue
        if get_origin(tp) is tuple:
            kw.update(nargs="+", type=args[0])
        else:
            kw["type"] = next((a for a in args if a is not type(None)), tp)  # X | None -> X
        parser.add_argument("--" + _key(f).replace("_", "-"), metavar=f.name.upper(), **kw)


def flag_values(ns: argparse.Namespace, cls: type, *, nested: bool = True, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The flags of `cls` given on a command line (added by `add_flags`, with the same `skip`): a nested
    dict of field values, or flat (by setting name) with `nested=False`."""
    keys = {_key(f) for _, f, _ in _flat_fields(cls, skip)}
    flat = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(ns).items() if k in keys}
    return nest(cls, flat) if nested else flat


def nest(cls: type, flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat setting values (leaf fields of `cls` by their flag's name: `--transfer-timeout-s` is
    `transfer_timeout_s`) as a nested dict. Raises ValueError naming a key that is no setting of `cls`.
    """
    paths = {_key(f): path for path, f, _ in _flat_fields(cls)}
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key not in paths:
            raise ValueError(f"{key!r} is not a setting of {cls.__name__}; choose from {sorted(paths)}")
        node = out
        for p in paths[key][:-1]:
            node = node.setdefault(p, {})
        node[paths[key][-1]] = value
    return out


def check_keys(cls: type, data: Mapping[str, Any], where: str = "") -> None:
    """Raises ValueError naming the first key of nested `data` that is no field of dataclass `cls`."""
    hints = get_type_hints(cls)
    for key, value in data.items():
        if key not in hints:
            raise ValueError(f"unknown setting {where}{key!r} ({cls.__name__} has {sorted(hints)})")
        if is_dataclass(hints[key]) and isinstance(value, Mapping):
            check_keys(hints[key], value, f"{where}{key}.")


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `over` laid on top, nested dicts merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out
