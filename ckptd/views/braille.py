"""Braille charts for the terminal views (``watch``, ``plot`` without ``-o``): plotille.

One thing here besides plotille's defaults: every ``plotille.Figure()``
tries ``import numpy`` (to format numpy datetimes, which the views never
pass it). numpy takes 0.2-0.4 s to import on a loaded 2-core box, more
than the rest of ``watch``'s first frame after Textual has started; so the
first figure is made with numpy marked as absent, which plotille handles
as it does a machine without numpy.
"""

from __future__ import annotations

import sys
from typing import Any


def figure(width: int, height: int, *, color: bool) -> Any:
    """A plotille figure of ``width`` x ``height`` characters, no origin lines."""
    import plotille

    if "numpy" in sys.modules:
        fig = plotille.Figure()
    else:
        # ``import numpy`` raises ImportError while this is None; the terminal
        # views run no other thread that could import numpy meanwhile
        sys.modules["numpy"] = None  # type: ignore[assignment]
        try:
            fig = plotille.Figure()
        finally:
            del sys.modules["numpy"]
    fig.width, fig.height = width, height
    fig.with_colors, fig.color_mode = color, "names"
    fig.origin = False
    return fig
