"""A plot of ``tools/bench_remote_epoch.py``'s epochs: per view, each mode's epochs 1 and 2
(bars) against issue 25's time targets: 1.3 x max(link time of the view's bytes, the cached
decode epoch) and 0.5x WebDataset's epoch 1 (lines); each bar labelled with its bytes over
the link per byte of the view."""
from __future__ import annotations

from pathlib import Path

from .plots import pyplot, save
from .training_targets import BYTES, TIME, WDS, cached_epoch


def _bars(ax, rows: list[dict], view: str, vb: int) -> list[str]:
    modes = list(dict.fromkeys(r["mode"] for r in rows if r["view"] == view))
    for e, (epoch, shade) in enumerate(((1, "tab:blue"), (2, "tab:cyan"))):
        for i, mode in enumerate(modes):
            r = next((r for r in rows if r["mode"] == mode and r["view"] == view and r["epoch"] == epoch), None)
            if r is None:
                continue
            ax.bar(i + 0.4 * e - 0.2, r["seconds"], 0.4, color=shade, label=f"epoch {epoch}" if i == 0 else None)
            ax.text(i + 0.4 * e - 0.2, r["seconds"], f"{r['link']['bytes'] / vb:.2f}x", ha="center",
                    va="bottom", fontsize=7)
    return modes


def plot_epochs(doc: dict, png: str | Path) -> None:
    """One panel per view of the sampler's store's modes (wds with them, in seconds)."""
    plt = pyplot()
    if plt is None:
        return
    rows, rate = doc["rows"], doc["setting"]["rate_bytes_s"]
    views = [v for v in dict.fromkeys(r["view"] for r in rows) if v in doc["sampler_view_bytes"] and v != "full"]
    views = views or ["full"]
    fig, axes = plt.subplots(1, len(views), figsize=(1.3 + 1.3 * 8, 4.2), squeeze=False)
    wds = next((r["seconds"] for r in rows if r["mode"] == "wds" and r["epoch"] == 1), None)
    for ax, view in zip(axes[0], views):
        vb = doc["sampler_view_bytes"][view]
        shown = [r for r in rows if r["view"] == view or r["mode"] == "wds"]
        modes = _bars(ax, [dict(r, view=view) if r["mode"] == "wds" else r for r in shown], view, vb)
        cached = cached_epoch(rows, view)
        if cached is not None:
            bound = TIME * max(vb / rate, cached)
            ax.axhline(bound, color="tab:red", ls="--", label=f"{TIME} x max(link, cached) = {bound:.1f} s")
        if wds is not None:
            ax.axhline(WDS * wds, color="tab:green", ls=":", label=f"{WDS}x WebDataset = {WDS * wds:.1f} s")
        ax.set_xticks(range(len(modes)), modes, rotation=30, fontsize=8)
        ax.set_ylabel("epoch (s)")
        ax.set_title(f"{view}: {doc['setting']['latency_s'] * 1e3:.0f} ms, {rate / 1e6:g} MB/s "
                     f"(labels: link bytes / view, target <= {BYTES}x)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, png)
