"""labkit: the package behind disagg-lab's notebooks.

Notebooks import labkit, never the other way round. Heavy modules (torch, transformers)
are imported by the submodules that need them, so `import labkit` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

from labkit.config import data_dir, labkit_home, profile, repo_root

__all__ = ["__version__", "data_dir", "labkit_home", "profile", "repo_root"]
