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
Then `convert` against `convert --quality-index` on the same photos (one thread
each, rounds interleaved), and `quality --write-index` on a Dask LocalCluster of
1 and 2 worker processes (CPU of the workers from os.times, index compared with
the local one). Where the compiled SSIM filter (pcrfs.quality._ssimfilter) is built,
the search and `convert --quality-index` are also timed with the BLAS filter it
replaced (``fast_blas``, ``convert_quality_index_blas``), in the same rounds; the JSON
names the CPU, its AVX2, and OpenBLAS's kernel set. Run it again under
OPENBLAS_CORETYPE=Nehalem to see both filters under pre-AVX2 kernels:

    python tools/bench_quality.py --photos imagenet --no-table --cost-images 200 --cost-rounds 2 \
        --convert-rounds 2 --dask-rounds 1 -j 2 --out results/bench_quality_imagenet_s8_default
    OPENBLAS_CORETYPE=Nehalem python tools/bench_quality.py ... --out results/bench_quality_imagenet_s8_nehalem

    python tools/bench_quality.py --per-class 25 --cost-images 200 --convert-rounds 3 --dask-workers 1,2

    python tools/bench_quality.py                 # writes results/bench_quality.{json,png}
    python tools/bench_quality.py --per-class 20  # quicker

With --table-vs-index it measures instead what `pcrfs quality STORE` (the table, default
options: 200 images, decode timing on) costs against `pcrfs quality STORE --write-index` on
the same images, as commands (wall seconds and the CPU of the command and its workers),
rounds interleaved, on the demo photos (200) and on large photos (skimage's photographs
enlarged to 12-16 Mpx with LANCZOS and mild noise, baseline JPEG q85-95); the per-image CPU of
the old exhaustive table on a few images; and how far the table's estimates of large images
are from every window's score:

    python tools/bench_quality.py --table-vs-index -j 2 --rounds 2   # results/bench_quality_table.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import resource  # noqa: E402

import numpy as np  # noqa: E402

import pcrfs  # noqa: E402
from pcrfs.convert import convert  # noqa: E402
from pcrfs.demo import make_demo  # noqa: E402
from benchlib.machine import machine_facts, source_state  # noqa: E402
from pcrfs.quality import measure, search  # noqa: E402
from pcrfs.quality import scoring as adaptive  # noqa: E402
from pcrfs.store.format import adaptiveindex as index_format  # noqa: E402
from pcrfs.store.write import install  # noqa: E402
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


@contextmanager
def blas_filter(on: bool):
    """pcrfs.quality.search filtering with BLAS products (on) or its compiled filter."""
    before = search.USE_COMPILED
    search.USE_COMPILED = before and not on
    try:
        yield
    finally:
        search.USE_COMPILED = before


def filter_facts() -> dict:
    """Which filter the search runs by default, and the BLAS kernel set its fallback gets."""
    from threadpoolctl import threadpool_info

    return {"compiled_filter": search.USE_COMPILED,
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
            "blas_architecture": sorted({str(i.get("architecture")) for i in threadpool_info()
                                         if i.get("user_api") == "blas"})}


def scoring_cost(store, images: int, rounds: int) -> dict:
    """Exhaustive search against the fast one on the first ``images`` images, in this
    process, rounds interleaved; CPU and wall per image (medians over rounds). With the
    compiled filter built, the fast search also with the BLAS filter (``fast_blas``)."""
    n = min(images, store.num_images)
    thresholds = index_format.THRESHOLDS
    runs: dict[str, list] = {"exhaustive": [], "fast": []}
    if search.USE_COMPILED:
        runs["fast_blas"] = []
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
                with search.single_threaded_blas(), blas_filter(name == "fast_blas"):
                    ks = [search.search_ks(search.file_reader(store, i), store.n_groups(i), thresholds, stats)
                          for i in range(n)]
            runs[name].append(((_cpu() - c0) / n * 1000, (time.perf_counter() - t0) / n * 1000))
            answers[name] = np.array(ks)
    med = {name: {"cpu_ms_per_image": round(float(np.median([r[0] for r in v])), 2),
                  "wall_ms_per_image": round(float(np.median([r[1] for r in v])), 2),
                  "cpu_ms_each_round": [round(r[0], 2) for r in v]} for name, v in runs.items()}
    out = {
        "images": n, "rounds": rounds, "thresholds": list(thresholds), **filter_facts(), **med,
        "cpu_ratio": round(med["exhaustive"]["cpu_ms_per_image"] / med["fast"]["cpu_ms_per_image"], 2),
        "identical_ks": all(np.array_equal(answers["exhaustive"], a) for a in answers.values()),
        "fast_search_stats": {k: v for k, v in vars(stats).items()},
        "loadavg_after": os.getloadavg(),
    }
    if "fast_blas" in med:
        blas, compiled = med["fast_blas"]["cpu_ms_per_image"], med["fast"]["cpu_ms_per_image"]
        out["blas_over_compiled_cpu"] = round(blas / compiled, 2)
    return out


def convert_cost(src: Path, tmp: Path, rounds: int) -> dict:
    """Plain convert against convert --quality-index, one worker thread each, rounds interleaved
    (with the compiled filter built, --quality-index also with the BLAS filter)."""
    runs: dict[str, list] = {"convert": [], "convert_quality_index": []}
    if search.USE_COMPILED:
        runs["convert_quality_index_blas"] = []
    indexes = set()
    images = 0
    for r in range(rounds):
        for name in runs:
            out = tmp / f"{name}-{r}.pcr"
            with blas_filter(name.endswith("_blas")):
                c0, t0 = _cpu(), time.perf_counter()
                res = convert(src, out, workers=1, quality_index=name != "convert")
                runs[name].append((_cpu() - c0, time.perf_counter() - t0))
            images = res.images
            if res.adaptive is not None:
                indexes.add(next((out / "index").glob("adaptive_k-*.npy")).read_bytes())
            shutil.rmtree(out)
    med = {name: {"cpu_ms_per_image": round(1000 * float(np.median([c for c, _ in v])) / images, 2),
                  "wall_ms_per_image": round(1000 * float(np.median([w for _, w in v])) / images, 2)}
           for name, v in runs.items()}
    base = med["convert"]
    out = {"images": images, "rounds": rounds, "workers": 1, **filter_facts(), **med,
           "cpu_ratio": round(med["convert_quality_index"]["cpu_ms_per_image"] / base["cpu_ms_per_image"], 2),
           "wall_ratio": round(med["convert_quality_index"]["wall_ms_per_image"] / base["wall_ms_per_image"], 2),
           "same_index_every_round": len(indexes) == 1, "loadavg_after": os.getloadavg()}
    if "convert_quality_index_blas" in med:
        blas = med["convert_quality_index_blas"]
        out["cpu_ratio_blas"] = round(blas["cpu_ms_per_image"] / base["cpu_ms_per_image"], 2)
        out["wall_ratio_blas"] = round(blas["wall_ms_per_image"] / base["wall_ms_per_image"], 2)
    return out


def _worker_cpu(client) -> float:
    return sum(t[0] + t[1] for t in client.run(os.times).values())


def dask_scaling(store_path: Path, worker_counts: list[int], reference: bytes, rounds: int) -> dict:
    """`quality --write-index` (pcrfs.quality.build) on LocalClusters of each size, all started
    first and their rounds interleaved (so the ratio sees the same load); startup not timed."""
    from contextlib import ExitStack

    from distributed import Client, LocalCluster

    from pcrfs.quality import build

    out = {}
    with ExitStack() as stack:
        clients = {}
        for n in worker_counts:
            cluster = stack.enter_context(LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                                       dashboard_address=":0"))
            clients[n] = stack.enter_context(Client(cluster))
            clients[n].run(lambda: None)
        times = {n: [] for n in worker_counts}
        cpus = {n: [] for n in worker_counts}
        same = {n: True for n in worker_counts}
        images = 0
        for _ in range(rounds):
            for n, client in clients.items():
                with pcrfs.open_store(store_path) as store:
                    build.Parts(build.resume_dir(str(store_path)), index_format.THRESHOLDS).remove()
                    w0, c0, t0 = _worker_cpu(client), _cpu(), time.perf_counter()
                    built = build.build(store, client=client)
                    times[n].append(time.perf_counter() - t0)
                    cpus[n].append(_worker_cpu(client) - w0 + _cpu() - c0)
                    same[n] &= index_format.npy_bytes(built.ks) == reference
                    built.parts.remove()
                    images = store.num_images
    for n in worker_counts:
        med = float(np.median(times[n]))
        out[f"dask{n}"] = {"seconds": round(med, 3), "rounds": rounds,
                           "seconds_each_round": [round(t, 3) for t in times[n]],
                           "images_per_s": round(images / med, 1),
                           "cpu_ms_per_image": round(1000 * float(np.median(cpus[n])) / images, 2),
                           "identical_to_local": same[n]}
    if "dask1" in out and "dask2" in out:
        out["speedup_2_over_1"] = round(out["dask1"]["seconds"] / out["dask2"]["seconds"], 2)
        out["speedup_2_over_1_each_round"] = [round(a / b, 2) for a, b in zip(times[1], times[2])]
    out["part_images"] = build.PART_IMAGES
    out["loadavg_after"] = os.getloadavg()
    return out


def make_imagenet_size(dest: Path, per_class: int, seed: int) -> dict:
    """ImageNet-size photos: the demo's crops of its source photographs, all 500x375 (a
    quarter of them 375x500), baseline 4:2:0 at quality 95: ~65 KB each, where ImageNet's
    500x375 JPEGs are (the demo's own photos vary in size and quality: ~45 KB)."""
    import io

    from PIL import Image

    from pcrfs import demo

    photos = demo._load_photos()
    sizes = []
    for ci, (cls, sources) in enumerate(demo._available_classes().items()):
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, ci, i])
            src = Image.fromarray(photos[sources[int(rng.integers(len(sources)))]])
            w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
            im = src.resize((w, h), Image.Resampling.LANCZOS, box=demo._crop_box(rng, src.width, src.height, w / h))
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=95, subsampling=2)
            (dest / cls / f"{cls}_{i:04d}.jpg").write_bytes(buf.getvalue())
            sizes.append(len(buf.getvalue()))
    return {"origin": "tools/bench_quality.py make_imagenet_size (500x375 or 375x500, quality 95, 4:2:0)",
            "images": len(sizes), "classes": ci + 1, "source_bytes": int(sum(sizes)),
            "mean_kb": round(sum(sizes) / len(sizes) / 1000, 1)}


def make_large_photos(dest: Path, count: int, seed: int) -> dict:
    """``count`` photos of 12-16 Mpx: skimage's colour photographs enlarged with LANCZOS (a
    random aspect, 4:3 to 3:2 either way), plus mild noise (sigma 3, a tile of it shifted per
    image), baseline JPEG at quality 85-95, 4:2:0."""
    import io

    from PIL import Image

    from pcrfs import demo

    photos = [a for a in demo._load_photos().values() if a.ndim == 3]
    rng0 = np.random.default_rng(seed)
    tile = np.clip(rng0.normal(0, 3, (1024, 1024, 3)), -12, 12).astype(np.int16)
    (dest / "large").mkdir(parents=True, exist_ok=True)
    sizes, pixels = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        mp = rng.uniform(12e6, 16e6)
        aspect = float(rng.choice([4 / 3, 3 / 2, 3 / 4, 2 / 3]))
        w = int((mp * aspect) ** 0.5)
        h = int(mp / w) + 1
        im = Image.fromarray(photos[i % len(photos)]).resize((w, h), Image.Resampling.LANCZOS)
        noise = np.roll(tile, (int(rng.integers(1024)), int(rng.integers(1024))), axis=(0, 1))
        reps = (-(-h // 1024), -(-w // 1024), 1)
        a = np.asarray(im, dtype=np.int16) + np.tile(noise, reps)[:h, :w]
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(
            buf, format="JPEG", quality=int(rng.integers(85, 96)), subsampling=2)
        (dest / "large" / f"large_{i:04d}.jpg").write_bytes(buf.getvalue())
        sizes.append(len(buf.getvalue()))
        pixels.append(w * h)
    return {"origin": "tools/bench_quality.py make_large_photos (skimage photos, LANCZOS to 12-16 Mpx, "
                      "noise sigma 3, q85-95, 4:2:0)",
            "images": count, "mpx_min": round(min(pixels) / 1e6, 1), "mpx_max": round(max(pixels) / 1e6, 1),
            "mpx_mean": round(sum(pixels) / count / 1e6, 1), "mean_mb": round(sum(sizes) / count / 1e6, 2)}


def _run_pcrfs(*args: str) -> tuple[float, float, str]:
    """(wall s, CPU s of the command and its worker processes, stdout) of ``pcrfs ARGS``."""
    import subprocess

    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pcrfs.cli", *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        raise RuntimeError(f"pcrfs {' '.join(args)}: {res.stderr[-2000:]}")
    cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    return wall, cpu, res.stdout


def table_vs_index(store_path: Path, rounds: int, workers: int) -> dict:
    """`quality --write-index` and `quality` (the table, default options) on the same store,
    rounds interleaved; medians, and each round's ratio."""
    from pcrfs.quality import build

    runs: dict[str, list] = {"write_index": [], "table": []}
    table_doc = None
    for _ in range(rounds):
        build.Parts(build.resume_dir(str(store_path)), index_format.THRESHOLDS).remove()
        runs["write_index"].append(_run_pcrfs("quality", str(store_path), "--write-index", "-q", "-j", str(workers))[:2])
        wall, cpu, out = _run_pcrfs("quality", str(store_path), "-q", "--json", "-j", str(workers))
        runs["table"].append((wall, cpu))
        table_doc = json.loads(out)
    med = {name: {"wall_s": round(float(np.median([w for w, _ in v])), 2),
                  "cpu_s": round(float(np.median([c for _, c in v])), 2),
                  "wall_s_each_round": [round(w, 2) for w, _ in v], "cpu_s_each_round": [round(c, 2) for _, c in v]}
           for name, v in runs.items()}
    n = len(table_doc["sample"])
    for v in med.values():
        v["cpu_ms_per_image"] = round(1000 * v["cpu_s"] / n, 1)
    return {"images": n, "rounds": rounds, "workers": workers, **med,
            "wall_ratio": round(med["table"]["wall_s"] / med["write_index"]["wall_s"], 2),
            "cpu_ratio": round(med["table"]["cpu_s"] / med["write_index"]["cpu_s"], 2),
            "wall_ratio_each_round": [round(a[0] / b[0], 2) for a, b in zip(runs["table"], runs["write_index"])],
            "table_timed_images": len(table_doc["timed"]), "table_estimated_images": len(table_doc["estimated"]),
            "loadavg_after": os.getloadavg()}


def old_table_cost(store, images: int) -> dict:
    """CPU per image of the table as it was (every k decoded and scored in float64, every
    decode timed: measure_image) against the table now (score_image; this image's decodes
    all timed, as the 32 timed images of a sample are), one process, the same images."""
    from pcrfs.quality import measure as m

    n = min(images, store.num_images)
    out = {}
    with search.single_threaded_blas():
        for name, fn in (("old_exhaustive", lambda i: m.measure_image(store, i, timing=True)),
                         ("new_timed", lambda i: m.score_image(store, i, timing=True,
                                                               max_windows=m.SAMPLE_WINDOWS)),
                         ("new_untimed", lambda i: m.score_image(store, i, max_windows=m.SAMPLE_WINDOWS))):
            c0 = _cpu()
            for i in range(n):
                fn(i)
            out[name + "_cpu_ms_per_image"] = round(1000 * (_cpu() - c0) / n, 1)
    out["images"] = n
    return out


def estimate_error(store, images: int) -> dict:
    """The table's MS-SSIM of large images (sampled windows) against every window's, per k."""
    from pcrfs.quality import measure as m

    n = min(images, store.num_images)
    worst, worst_high = 0.0, 0.0
    with search.single_threaded_blas():
        for i in range(n):
            est = m.score_image(store, i, max_windows=m.SAMPLE_WINDOWS).ms_ssim
            exact = m.score_image(store, i).ms_ssim
            d = np.abs(est - exact)
            worst = max(worst, float(np.nanmax(d)))
            worst_high = max(worst_high, float(np.nanmax(np.where(exact >= 0.9, d, 0))))
    return {"images": n, "sample_windows": m.SAMPLE_WINDOWS, "max_abs_error": worst,
            "max_abs_error_where_exact_ge_0.9": worst_high}


def cpu_facts() -> dict:
    """What the scoring's speed leans on, per host: the CPU (as lscpu names it), its vector
    extensions, the kernels OpenBLAS picked for it (numpy's and scipy's own copies) and the
    SIMD paths numpy dispatches to."""
    facts: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        flags = set(info.get("flags", "").split())
        facts.update({"model_name": info.get("model name"), "family": info.get("cpu family"),
                      "model": info.get("model"), "stepping": info.get("stepping"),
                      "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
                      "hypervisor": "hypervisor" in flags})
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info

        facts["blas"] = [{k: i.get(k) for k in ("prefix", "version", "architecture", "num_threads")}
                         for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__
        facts["numpy_simd"] = sorted(k for k, on in __cpu_features__.items()
                                     if on and k.startswith(("X86_V", "AVX512_", "AVX2", "FMA3")))
    except ImportError:
        pass
    return facts


KERNELS = {"native": {}, "Haswell (AVX2)": {"OPENBLAS_CORETYPE": "Haswell"},
           "Nehalem (SSE only)": {"OPENBLAS_CORETYPE": "Nehalem"}}


def index_cost_by_kernel(tmp: Path, images: int, rounds: int, seed: int) -> dict:
    """The index's scoring cost (fast search and the exhaustive oracle, one process) on
    ImageNet-size photos under OpenBLAS's native kernels and two forced older ones
    (OPENBLAS_CORETYPE): what a host whose OpenBLAS runs other kernels pays."""
    import subprocess

    src, store_path = tmp / "imagenet", tmp / "imagenet.pcr"
    dataset = make_imagenet_size(src, -(-images // 8), seed)
    convert(src, store_path, workers=1)
    out = {"dataset": dataset, "kernels": {}}
    for name, env in KERNELS.items():
        res = subprocess.run([sys.executable, __file__, "--cost-store", str(store_path), "--cost-images", str(images),
                              "--cost-rounds", str(rounds)], env={**os.environ, **env}, capture_output=True,
                             text=True, cwd=ROOT)
        if res.returncode:
            raise RuntimeError(res.stderr[-2000:])
        out["kernels"][name] = json.loads(res.stdout)
        print(f"index cost, OpenBLAS {name}: {json.dumps(out['kernels'][name])}", flush=True)
    out["convert_cost"] = convert_cost(src, tmp, rounds)
    print(f"convert: {json.dumps(out['convert_cost'])}", flush=True)
    shutil.rmtree(src)
    shutil.rmtree(store_path)
    return out


def main_cost_store(args) -> None:
    """--cost-store STORE: the scoring cost on STORE as JSON on stdout (with the BLAS kernels in use)."""
    from threadpoolctl import threadpool_info

    with pcrfs.open_store(args.cost_store) as store:
        cost = scoring_cost(store, args.cost_images, args.cost_rounds)
    cost["blas_architecture"] = sorted({i.get("architecture") for i in threadpool_info() if i.get("user_api") == "blas"})
    print(json.dumps(cost))


def main_table_vs_index(args) -> None:
    """--table-vs-index: results/bench_quality_table.json."""
    out = {"benchmark": "pcrfs quality (the table) against pcrfs quality --write-index, same images",
           "command": "python tools/bench_quality.py " + " ".join(sys.argv[1:]),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": {**machine_facts(packages=("numpy", "scipy", "pillow", "threadpoolctl")),
                       **cpu_facts()},
           "source": source_state(),
           "loadavg_before": os.getloadavg(), "sets": {}}
    with tempfile.TemporaryDirectory(prefix="pcrfs-bench-table-") as tmp:
        for name in args.sets.split(","):
            src, store_path = (args.photos_dir or Path(tmp)) / name, Path(tmp) / f"{name}.pcr"
            made = src.with_name(name + ".made.json")  # with --photos-dir: photos made once, reused
            if made.is_file():
                dataset = json.loads(made.read_text())
            elif name == "demo":
                demo = make_demo(src, per_class=25, seed=args.seed)
                dataset = {"images": demo.count, "mean_kb": round(demo.total_bytes / demo.count / 1000, 1)}
            elif name == "large":
                dataset = make_large_photos(src, args.large_images, args.seed)
            else:
                raise SystemExit(f"unknown set {name!r} (demo, large)")
            made.write_text(json.dumps(dataset))
            convert(src, store_path, workers=args.workers)
            entry = {"dataset": dataset, "commands": table_vs_index(store_path, args.rounds, args.workers)}
            with pcrfs.open_store(store_path) as store:
                entry["per_image_one_process"] = old_table_cost(store, args.old_table_images)
                if name == "large":
                    entry["estimate_error"] = estimate_error(store, args.error_images)
            c = entry["commands"]
            print(f"{name}: table {c['table']['wall_s']} s ({c['table']['cpu_ms_per_image']} ms CPU/img), "
                  f"--write-index {c['write_index']['wall_s']} s ({c['write_index']['cpu_ms_per_image']} ms): "
                  f"{c['wall_ratio']}x wall, {c['cpu_ratio']}x CPU; {json.dumps(entry['per_image_one_process'])}"
                  + (f"; estimates: {json.dumps(entry['estimate_error'])}" if "estimate_error" in entry else ""),
                  flush=True)
            out["sets"][name] = entry
            if args.photos_dir is None:
                shutil.rmtree(src)
            shutil.rmtree(store_path)
        if args.index_cost_images:
            out["index_cost_by_kernel"] = index_cost_by_kernel(Path(tmp), args.index_cost_images, args.cost_rounds,
                                                               args.seed)
    out["loadavg_after"] = os.getloadavg()
    path = args.out.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=50, help="demo images per class (8 classes)")
    ap.add_argument("--seed", type=int, default=0, help="demo dataset seed")
    ap.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_quality")
    ap.add_argument("--cost-images", type=int, default=150, help="images timed for the scoring cost")
    ap.add_argument("--cost-rounds", type=int, default=3)
    ap.add_argument("--convert-rounds", type=int, default=3, help="0 skips convert vs convert --quality-index")
    ap.add_argument("--dask-workers", default="1,2", help="LocalCluster sizes for --write-index on Dask ('' skips)")
    ap.add_argument("--dask-rounds", type=int, default=2)
    ap.add_argument("--photos", choices=("demo", "imagenet"), default="demo",
                    help="demo: pcrfs.demo's photos (~45 KB, sizes and qualities vary); imagenet: "
                         "the same crops at 500x375, quality 95 (~65 KB, ImageNet's typical photo)")
    ap.add_argument("--no-table", action="store_true", help="costs only: skip the quality table and plot")
    ap.add_argument("--table-vs-index", action="store_true",
                    help="measure `quality` (the table) against `quality --write-index` instead (below)")
    ap.add_argument("--sets", default="demo,large", help="with --table-vs-index: demo, large or both")
    ap.add_argument("--photos-dir", type=Path, default=None,
                    help="with --table-vs-index: make the photos here once and reuse them (else a temporary directory)")
    ap.add_argument("--rounds", type=int, default=2, help="with --table-vs-index: interleaved rounds")
    ap.add_argument("--large-images", type=int, default=200, help="with --table-vs-index: large photos made")
    ap.add_argument("--old-table-images", type=int, default=4,
                    help="with --table-vs-index: images the old exhaustive table is timed on (per image)")
    ap.add_argument("--error-images", type=int, default=8,
                    help="with --table-vs-index: large images whose estimates are checked against every window")
    ap.add_argument("--index-cost-images", type=int, default=200,
                    help="with --table-vs-index: ImageNet-size photos the index's cost is measured on, under "
                         "OpenBLAS's native, Haswell and Nehalem kernels (0 skips)")
    ap.add_argument("--cost-store", type=Path, default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def make_photos(src: Path, args: argparse.Namespace) -> dict:
    """The photos of --photos under ``src``: what the JSON says of them."""
    if args.photos == "demo":
        demo = make_demo(src, per_class=args.per_class, seed=args.seed)
        return {"images": demo.count, "classes": len(demo.classes), "source_bytes": demo.total_bytes,
                "mean_kb": round(demo.total_bytes / demo.count / 1000, 1)}
    return make_imagenet_size(src, args.per_class, args.seed)


def index_costs(args: argparse.Namespace, tmp: Path, src: Path, store, store_path: Path) -> dict:
    """The scoring cost, --write-index in this process (the index written into the store),
    convert against convert --quality-index and --write-index on Dask, each printed: the
    JSON's fields from ``loadavg_before`` to ``not_scored``."""
    load_before = os.getloadavg()
    cost = scoring_cost(store, args.cost_images, args.cost_rounds)
    print(f"scoring cost per image, {cost['images']} images x {cost['rounds']} rounds, one process: "
          f"exhaustive {cost['exhaustive']['cpu_ms_per_image']} ms CPU / "
          f"{cost['exhaustive']['wall_ms_per_image']} ms wall; fast {cost['fast']['cpu_ms_per_image']} ms CPU / "
          f"{cost['fast']['wall_ms_per_image']} ms wall ({cost['cpu_ratio']}x less CPU); "
          + (f"fast with the BLAS filter {cost['fast_blas']['cpu_ms_per_image']} ms CPU "
             f"({cost['blas_over_compiled_cpu']}x the compiled filter's); " if "fast_blas" in cost else "")
          + f"filter {'compiled' if cost['compiled_filter'] else 'BLAS'}, BLAS kernels "
          f"{'/'.join(cost['blas_architecture'])}; identical ks: {cost['identical_ks']}; "
          f"load average {load_before[0]:.2f}")

    t0 = time.perf_counter()
    ks, failures = adaptive.compute(store, workers=args.workers)
    index_s = time.perf_counter() - t0
    install.adaptive_index(store_path, ks)
    conv_cost = convert_cost(src, tmp, args.convert_rounds) if args.convert_rounds else None
    if conv_cost:
        print(f"convert: {conv_cost['convert']['cpu_ms_per_image']} ms CPU per image; with --quality-index "
              f"{conv_cost['convert_quality_index']['cpu_ms_per_image']} ms ({conv_cost['cpu_ratio']}x CPU, "
              f"{conv_cost['wall_ratio']}x wall)"
              + (f"; with the BLAS filter {conv_cost['convert_quality_index_blas']['cpu_ms_per_image']} ms "
                 f"({conv_cost['cpu_ratio_blas']}x CPU)" if "cpu_ratio_blas" in conv_cost else ""))
    dask = None
    if args.dask_workers and args.dask_rounds > 0:
        dask = dask_scaling(store_path, [int(n) for n in args.dask_workers.split(",")],
                            index_format.npy_bytes(ks), args.dask_rounds)
        print("Dask --write-index:", json.dumps(dask))
    return {"loadavg_before": load_before, "scoring_cost": cost, "convert_cost": conv_cost,
            "dask_write_index": dask, "write_index_s": round(index_s, 2),
            "write_index_ms_per_image": round(1000 * index_s / store.num_images, 1),
            "not_scored": len(failures)}


def measure_table(args: argparse.Namespace, store_path: Path, doc: dict) -> None:
    """The quality table of every view (the adaptive ones from the index), each adaptive view
    against the fixed ones, printed and plotted; ``doc`` with them written to --out."""
    store = pcrfs.open_store(store_path)
    index = index_format.load(store)
    views = {v: (t, index.column(v, store.num_groups)) for v, t in zip(index.views, index.thresholds)}

    table = measure.quality_table(store, sample=None, timing=True, workers=args.workers, adaptive=views)
    comparison = compare(table)

    from pcrfs.cli.quality import format_table

    print(format_table(table))
    for c in comparison:
        s = c["same_target"]
        print(f"{c['view']}: {c['fraction']:.1%} of the full bytes, p5 MS-SSIM {c['ms_ssim_p5']:.4f}; "
              f"{s['view']} (smallest fixed k with p5 >= {c['threshold']:g}): {s['fraction']:.1%}, "
              f"p5 {s['ms_ssim_p5']:.4f} -> {c['view']} reads {s['saving']:.1%} fewer bytes; "
              f"every image >= {c['threshold']:g} needs {c['same_min']['view']} "
              f"({c['same_min']['saving']:.1%} saved)")

    plot_table(table, args.out.with_suffix(".png"),
               title=f"demo dataset: {len(table.sample)} photos, quality of every view against its full decode")
    doc.update({"quality_table_s": round(table.seconds, 2), "adaptive_vs_fixed": comparison,
                "table": table.as_dict()})
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}", file=sys.stderr)


def main_costs_and_table(args: argparse.Namespace) -> None:
    """The default mode: the costs, then (unless --no-table) the quality table; results/bench_quality.{json,png}."""
    with tempfile.TemporaryDirectory(prefix="pcrfs-bench-quality-") as tmp:
        src, store_path = Path(tmp) / "photos", Path(tmp) / "demo.pcr"
        dataset = make_photos(src, args)
        conv = convert(src, store_path, workers=args.workers)
        store = pcrfs.open_store(store_path)
        costs = index_costs(args, Path(tmp), src, store, store_path)
        doc = {
            "benchmark": "choosing the fidelity: quality per scan group and adaptive views",
            "command": "python tools/bench_quality.py " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {**machine_facts(packages=("numpy", "pillow", "dask", "distributed")), **cpu_facts()},
            "source": source_state(),
            "dataset": {**dataset, "photos": args.photos, "stored_bytes": conv.bytes_out,
                        "per_class": args.per_class, "seed": args.seed},
            "workers": args.workers,
            **costs,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.no_table:
            args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
            print(f"wrote {args.out.with_suffix('.json')}", file=sys.stderr)
            return
        measure_table(args, store_path, doc)


def main() -> None:
    args = parse_args()
    if args.cost_store is not None:
        main_cost_store(args)
        return
    if args.table_vs_index:
        if args.out == ROOT / "results" / "bench_quality":
            args.out = ROOT / "results" / "bench_quality_table"
        main_table_vs_index(args)
        return
    main_costs_and_table(args)


if __name__ == "__main__":
    main()
