"""The kernel page cache around a benchmark: dropping it (root only) and asking which
fraction of a set of files it holds (util-linux ``fincore``)."""
from __future__ import annotations

import os
import shutil
import subprocess


def drop_caches() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``: the next reads come from disk."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def can_drop_caches() -> bool:
    """True if this process may write /proc/sys/vm/drop_caches (tried with 1: the page cache only)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def fincore(paths: list[str]) -> dict:
    """Page-cache residency of ``paths`` from util-linux fincore (resident pages / pages)."""
    exe = shutil.which("fincore")
    if not exe or not paths:
        return {"error": "fincore not found" if not exe else "no files"}
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = full_files = 0
    n = 0
    for i in range(0, len(paths), 200):
        chunk = paths[i:i + 200]
        r = subprocess.run([exe, "--bytes", "--noheadings", "--raw", "--output", "PAGES,SIZE,FILE", *chunk],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        for line in r.stdout.splitlines():
            parts = line.split(" ", 2)
            if len(parts) < 3:
                continue
            pages, size = int(parts[0]), int(parts[1])
            want = -(-size // page)
            resident += pages
            total += want
            full_files += pages >= want
            n += 1
    return {"files_sampled": len(paths), "files_reported": n, "resident_pages": resident, "pages": total,
            "fraction_resident": resident / total if total else 0.0,
            "files_fully_resident": full_files, "fraction_files_fully_resident": full_files / n if n else 0.0}
