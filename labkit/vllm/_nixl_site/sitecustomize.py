"""Loaded by every Python process of a vLLM server the lab starts (it is on their PYTHONPATH).

With `LABKIT_NIXL_PROGRESS_THREAD=0` it turns off NIXL's progress thread. That thread polls
UCX with no pause (nixl sets `pthrDelay = 0`), so each idle P/D server burns a whole core:
on a 2-core machine the pair's two spinners take the cores the model needs. Without it,
UCX still progresses whenever vLLM asks for transfer state or notifications (every engine
step), which is all a CPU transfer over shared memory needs. vLLM builds the agent config
itself, with no option for this, hence the patch at import time of nixl's `_api` module.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_TARGETS = {"nixl_cu12._api", "nixl_cu13._api", "nixl_rocm._api"}


def _patch(module: ModuleType) -> None:
    cls = getattr(module, "nixl_agent_config", None)
    if cls is None or getattr(cls, "_labkit_patched", False):
        return
    original = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.enable_pthread = False

    cls.__init__ = __init__
    cls._labkit_patched = True


class _NixlFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname not in _TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]  # patching this one loader, on purpose
        return spec


if os.environ.get("LABKIT_NIXL_PROGRESS_THREAD", "1") == "0":
    sys.meta_path.insert(0, _NixlFinder())
