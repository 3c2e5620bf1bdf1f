#!/usr/bin/env python3
"""Choosing the fidelity on the demo dataset: the quality table, and what adaptive views save.

Builds the demo dataset (pcrfs.demo.make_demo: real photographs, 8 classes),
converts it (pcrfs.convert.convert), writes the adaptive index
(`pcrfs quality --write-index`) and measures every image at every k. For each
adaptive view ssimNN it then finds the fixed-k views with the same guarantee:

* ``same target``: the smallest k whose 5th-percentile MS-SSIM also reaches NN
  (what `pcrfs quality --target-ssim 0.NN` recommends);
* ``same p5``: the smallest k whose 5th-percentile MS-SSIM is at least the
  adaptive view's own 5th percentile (never lower quality in the bad tail);

and reports the bytes the adaptive view saves against each.

It also measures what the index costs per image: the exhaustive search (every k
scored with msssim.Reference until the top threshold; the oracle) against
pcrfs.quality.search (the same ks), one process each, side by side on the same
images: CPU seconds (getrusage) and wall seconds, and checks the ks are equal.

    python tools/bench_quality.py                 # writes results/bench_quality.{json,png}
    python tools/bench_quality.py --per-class 20  # quicker
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import resource  # noqa: E402

import numpy as np  # noqa: E402

import pcrfs  # noqa: E402
from pcrfs.convert import convert  # noqa: E402
from pcrfs.demo import make_demo  # noqa: E402
from pcrfs.quality import adaptive, measure, search  # noqa: E402
from pcrfs.quality.plot import plot_table  # noqa: E402


def compare(table: measure.QualityTable) -> list[dict]:
    """Each adaptive view against the fixed-k views with the same 5th-percentile guarantee."""
    out = []
    fixed = table.fixed_rows()
    for view, threshold in table.adaptive.items():
        row = table.row(view)
        entry = {"view": view, "threshold": threshold, "fraction": row.fraction_total, "ms_ssim_min": row.ms_ssim_min,
                 "bytes_per_image": row.bytes_mean, "ms_ssim_p5": row.ms_ssim_p5, "ms_ssim_mean": row.ms_ssim_mean,
                 "psnr_p5": row.psnr_p5, "psnr_mean": row.psnr_mean}
        for label, bar in (("same_target", threshold), ("same_p5", row.ms_ssim_p5)):
            choice = measure.choose_k(fixed, "ms_ssim", bar)
            k_row = choice.row
            entry[label] = {
                "k": k_row.k, "ms_ssim_min": k_row.ms_ssim_min, "view": k_row.view, "ms_ssim_p5": k_row.ms_ssim_p5, "ms_ssim_mean": k_row.ms_ssim_mean,
                "fraction": k_row.fraction_total, "bytes_per_image": k_row.bytes_mean,
                "saving": 1.0 - row.fraction_total / k_row.fraction_total,
            }
        # every image at or above the threshold, as the adaptive view guarantees by construction
        same_min = next(r for r in fixed if r.ms_ssim_min >= threshold or r.k == fixed[-1].k)
        entry["same_min"] = {"k": same_min.k, "view": same_min.view, "ms_ssim_min": same_min.ms_ssim_min,
                             "fraction": same_min.fraction_total,
                             "saving": 1.0 - row.fraction_total / same_min.fraction_total}
        out.append(entry)
    return out


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def scoring_cost(store, images: int, rounds: int) -> dict:
    """Exhaustive search against the fast one on the first ``images`` images, in this
    process, rounds interleaved; CPU and wall per image (medians over rounds)."""
    n = min(images, store.num_images)
    thresholds = adaptive.THRESHOLDS
    runs: dict[str, list] = {"exhaustive": [], "fast": []}
    answers = {}
    stats = search.SearchStats()
    for _ in range(rounds):
        for name in runs:
            c0, t0 = _cpu(), time.perf_counter()
            if name == "exhaustive":
                ks = [adaptive.smallest_k(measure.measure_image(store, i, stop_at=max(thresholds)).ms_ssim,
                                          store.n_groups(i), thresholds) for i in range(n)]
            else:
                stats = search.SearchStats()
                with search.single_threaded_blas():
                    ks = [search.search_ks(search.file_reader(store, i), store.n_groups(i), thresholds, stats)
                          for i in range(n)]
            runs[name].append(((_cpu() - c0) / n * 1000, (time.perf_counter() - t0) / n * 1000))
            answers[name] = np.array(ks)
    med = {name: {"cpu_ms_per_image": round(float(np.median([r[0] for r in v])), 2),
                  "wall_ms_per_image": round(float(np.median([r[1] for r in v])), 2)} for name, v in runs.items()}
    return {
        "images": n, "rounds": rounds, "thresholds": list(thresholds), **med,
        "cpu_ratio": round(med["exhaustive"]["cpu_ms_per_image"] / med["fast"]["cpu_ms_per_image"], 2),
        "identical_ks": bool(np.array_equal(answers["exhaustive"], answers["fast"])),
        "fast_search_stats": {k: v for k, v in vars(stats).items()},
        "loadavg_after": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=50, help="demo images per class (8 classes)")
    ap.add_argument("--seed", type=int, default=0, help="demo dataset seed")
    ap.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_quality")
    ap.add_argument("--cost-images", type=int, default=150, help="images timed for the scoring cost")
    ap.add_argument("--cost-rounds", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="pcrfs-bench-quality-") as tmp:
        src, store_path = Path(tmp) / "photos", Path(tmp) / "demo.pcr"
        demo = make_demo(src, per_class=args.per_class, seed=args.seed)
        conv = convert(src, store_path, workers=args.workers)
        store = pcrfs.open_store(store_path)

        load_before = os.getloadavg()
        cost = scoring_cost(store, args.cost_images, args.cost_rounds)
        print(f"scoring cost per image, {cost['images']} images x {cost['rounds']} rounds, one process: "
              f"exhaustive {cost['exhaustive']['cpu_ms_per_image']} ms CPU / "
              f"{cost['exhaustive']['wall_ms_per_image']} ms wall; fast {cost['fast']['cpu_ms_per_image']} ms CPU / "
              f"{cost['fast']['wall_ms_per_image']} ms wall ({cost['cpu_ratio']}x less CPU); "
              f"identical ks: {cost['identical_ks']}; load average {load_before[0]:.2f}")

        t0 = time.perf_counter()
        ks, failures = adaptive.compute(store, workers=args.workers)
        index_s = time.perf_counter() - t0
        adaptive.write(store_path, ks)
        store = pcrfs.open_store(store_path)
        index = adaptive.load(store)
        views = {v: (t, index.column(v, store.num_groups)) for v, t in zip(index.views, index.thresholds)}

        table = measure.quality_table(store, sample=None, timing=True, workers=args.workers, adaptive=views)
        comparison = compare(table)

        from pcrfs.quality_cli import format_table

        print(format_table(table))
        for c in comparison:
            s = c["same_target"]
            print(f"{c['view']}: {c['fraction']:.1%} of the full bytes, p5 MS-SSIM {c['ms_ssim_p5']:.4f}; "
                  f"{s['view']} (smallest fixed k with p5 >= {c['threshold']:g}): {s['fraction']:.1%}, "
                  f"p5 {s['ms_ssim_p5']:.4f} -> {c['view']} reads {s['saving']:.1%} fewer bytes; "
                  f"every image >= {c['threshold']:g} needs {c['same_min']['view']} "
                  f"({c['same_min']['saving']:.1%} saved)")

        args.out.parent.mkdir(parents=True, exist_ok=True)
        plot_table(table, args.out.with_suffix(".png"),
                   title=f"demo dataset: {len(table.sample)} photos, quality of every view against its full decode")
        doc = {
            "benchmark": "choosing the fidelity: quality per scan group and adaptive views",
            "command": "python tools/bench_quality.py " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"nproc": os.cpu_count(), "platform": platform.platform()},
            "dataset": {"images": demo.count, "classes": len(demo.classes), "source_bytes": demo.total_bytes,
                        "stored_bytes": conv.bytes_out, "per_class": args.per_class, "seed": args.seed},
            "workers": args.workers,
            "loadavg_before": load_before,
            "scoring_cost": cost,
            "write_index_s": round(index_s, 2),
            "write_index_ms_per_image": round(1000 * index_s / store.num_images, 1),
            "quality_table_s": round(table.seconds, 2),
            "not_scored": len(failures),
            "adaptive_vs_fixed": comparison,
            "table": table.as_dict(),
        }
        args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
