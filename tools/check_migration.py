#!/usr/bin/env python3
"""A copy of a store into a new layout serves every view byte-identical (issue 24).

The demo photos (``--per-class`` x 8 classes) are converted once ``--order source``
with ``--quality-index`` (a version-1 store with adaptive views), then copied without
their source -- ``pcrfs convert OLD.pcr NEW.pcr`` -- into ``--order shuffled`` (and that
copy back into ``--order source``), in records of ``--record-size``. Each store is
mounted and every file of every view (``scan1..scanN``, ``full`` and the adaptive
``ssim*`` views) is hashed; the copies must list the same files with the same SHA-256
as the original. ``pcrfs verify`` runs on each copy too.

    python tools/check_migration.py            # ~1 minute; writes results/check_migration.json
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO as ROOT  # noqa: E402  (puts the checkout first on sys.path)
from benchlib import log  # noqa: E402
from benchlib.mounts import CLEANUP, PcrfsMount  # noqa: E402
from benchlib.results import Run, write_json  # noqa: E402

PCRFS = [sys.executable, "-m", "pcrfs.cli"]


def hashes(mnt: Path) -> dict[str, dict[str, str]]:
    """view -> {relative path: sha256} for every file of every view of a mount."""
    out = {}
    for view in sorted(p.name for p in mnt.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = {}
        for dirpath, dirs, names in os.walk(mnt / view):
            dirs.sort()
            for name in sorted(names):
                path = Path(dirpath) / name
                files[str(path.relative_to(mnt / view))] = hashlib.sha256(path.read_bytes()).hexdigest()
        out[view] = files
    return out


def compare(a: dict, b: dict) -> dict:
    views = sorted(set(a) | set(b))
    diff = {}
    for v in views:
        fa, fb = a.get(v, {}), b.get(v, {})
        bad = sorted(p for p in set(fa) | set(fb) if fa.get(p) != fb.get(p))
        if bad or v not in a or v not in b:
            diff[v] = {"missing_in_copy": v not in b, "extra_in_copy": v not in a, "differing_files": bad[:10],
                       "differing": len(bad)}
    return {"views": views, "files_compared": sum(len(x) for x in a.values()), "identical": not diff,
            "differences": diff}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=50, help="demo photos per class (8 classes)")
    p.add_argument("--record-size", default="2M", help="record size of the original and the copies")
    p.add_argument("--seed", type=int, default=7, help="--seed of the shuffled copy")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "check_migration.json")
    a = p.parse_args()
    run = Run("tools/check_migration.py")
    rows, stores = [], {}
    with tempfile.TemporaryDirectory(prefix="pcrfs-migration-") as tmp:
        tmp = Path(tmp)
        try:
            subprocess.run(PCRFS + ["make-demo", "--per-class", str(a.per_class), str(tmp / "photos")], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            steps = [("original", [str(tmp / "photos"), str(tmp / "original.pcr"), "--order", "source",
                                   "--quality-index"]),
                     ("shuffled_copy", [str(tmp / "original.pcr"), str(tmp / "shuffled.pcr"), "--order", "shuffled",
                                        "--seed", str(a.seed)]),
                     ("source_copy_of_shuffled", [str(tmp / "shuffled.pcr"), str(tmp / "source.pcr"),
                                                  "--order", "source"])]
            for name, argv in steps:
                t0 = time.monotonic()
                r = subprocess.run(PCRFS + ["convert", "-q", "--record-size", a.record_size, *argv],
                                   capture_output=True, text=True)
                log(f"{name}: {r.stdout.strip() or r.stderr.strip()}")
                if r.returncode:
                    raise SystemExit(f"convert failed: {r.stderr}")
                store = Path(argv[1])
                v = subprocess.run(PCRFS + ["verify", str(store)], capture_output=True, text=True)
                info = subprocess.run(PCRFS + ["info", str(store)], capture_output=True, text=True).stdout
                stores[name] = {"store": store.name, "convert_seconds": round(time.monotonic() - t0, 1),
                                "convert_output": r.stdout.strip(), "verify_rc": v.returncode,
                                "verify": (v.stdout + v.stderr).strip().splitlines()[-1:],
                                "info_order_line": [ln for ln in info.splitlines() if ln.startswith("order")]}
            views = {}
            for name in stores:
                with PcrfsMount(tmp / stores[name]["store"], tmp / "mnt", tmp / "mount.log"):
                    views[name] = hashes(tmp / "mnt")
                log(f"{name}: {sum(len(x) for x in views[name].values())} files in views {sorted(views[name])}")
            for name in ("shuffled_copy", "source_copy_of_shuffled"):
                rows.append({"copy": name, **compare(views["original"], views[name])})
                log(f"{name} vs original: identical={rows[-1]['identical']}")
        finally:
            CLEANUP.all()
    doc = run.doc(benchmark="check_migration", per_class=a.per_class, record_size=a.record_size, stores=stores,
                  comparisons=rows, met=all(r["identical"] for r in rows)
                  and all(s["verify_rc"] == 0 for s in stores.values()))
    write_json(a.out, doc)
    return 0 if doc["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
