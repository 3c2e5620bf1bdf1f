"""Plots are optional: matplotlib on the Agg backend when installed, None otherwise."""
from __future__ import annotations

from pathlib import Path

from . import log


def pyplot():
    """matplotlib.pyplot (Agg backend), or None (logged) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot")
        return None
    return plt


def save(fig, png: str | Path, dpi: int = 120) -> None:
    """Save ``fig`` to ``png`` (parent directories made) and close it."""
    import matplotlib.pyplot as plt

    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    log(f"wrote {png}")
