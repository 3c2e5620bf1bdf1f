"""The plot users look at: quality against the bytes each view reads (matplotlib, optional)."""
from __future__ import annotations

import itertools
from pathlib import Path

from .msssim import PSNR_CAP

NEEDS = "--plot needs matplotlib: pip install matplotlib"
ADAPTIVE_MARKERS = ("v", "*", "D", "P", "X")


def check_format(path: Path) -> str | None:
    """Why matplotlib cannot write ``path`` (missing, unknown extension), or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return NEEDS
    ext = path.suffix.lower().lstrip(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        return f"cannot tell the image format from {path.name!r}; use one of .{', .'.join(sorted(formats))}"
    return None


def plot_table(table, path: Path, choice=None, title: str | None = None) -> None:
    """MS-SSIM and PSNR (mean and 5th percentile) against the byte fraction of every view.

    Fixed-k views are lines with k marked at each point; adaptive views are single green markers.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = table.fixed_rows()
    adaptive = [r for r in table.rows if r.k is None]
    x = [100 * r.fraction_total for r in fixed]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    panels = (("MS-SSIM (luminance) vs full decode", "ms_ssim_mean", "ms_ssim_p5"),
              (f"PSNR vs full decode [dB] (identical = {PSNR_CAP:g})", "psnr_mean", "psnr_p5"))
    for ax, (label, mean_key, p5_key) in zip(axes, panels):
        ax.plot(x, [getattr(r, mean_key) for r in fixed], "o-", color="tab:blue", label="scanK, mean")
        ax.plot(x, [getattr(r, p5_key) for r in fixed], "s--", color="tab:orange", label="scanK, 5th percentile")
        for r, xi in zip(fixed, x):
            ax.annotate(str(r.k), (xi, getattr(r, p5_key)), textcoords="offset points", xytext=(4, -11), fontsize=8)
        for r, marker in zip(adaptive, itertools.cycle(ADAPTIVE_MARKERS)):
            ax.plot([100 * r.fraction_total], [getattr(r, p5_key)], marker, color="tab:green",
                    markersize=13 if marker == "*" else 9,
                    markeredgecolor="black", markeredgewidth=0.5, linestyle="none",
                    label=f"{r.view}, 5th percentile", zorder=5)
        if choice is not None and (choice.metric == "ms_ssim") == (mean_key == "ms_ssim_mean"):
            ax.axhline(choice.target, color="grey", linewidth=0.8, linestyle=":")
            ax.annotate(f"target {choice.target:g}: {choice.row.view}", (1, choice.target),
                        textcoords="offset points", xytext=(0, 4), fontsize=8, color="grey")
        ax.set_xlabel("bytes read, % of the full view")
        ax.set_title(label, fontsize=10)
        ax.set_xlim(0, 103)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if fixed and min(r.ms_ssim_p5 for r in fixed) > 0.5:
        axes[0].set_ylim(min(r.ms_ssim_p5 for r in fixed) - 0.02, 1.005)
    fig.suptitle(title or f"{Path(table.store).name}: {len(table.sample)} of {table.images} images", fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)
