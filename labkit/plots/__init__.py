"""Every chart the notebooks and the tour show, one module per lesson.

All charts use `style.apply()`: large fonts for a projector, titles, units on axes.
"""

from __future__ import annotations

from labkit.plots.style import PHASE_COLORS, apply, new_figure, save

__all__ = ["PHASE_COLORS", "apply", "new_figure", "save"]
