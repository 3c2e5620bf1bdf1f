"""The benchmarks' photographs and store: the demo photos (real photographs, ImageNet shapes)
written once under a work directory and converted once, reused by later runs."""
from __future__ import annotations

from pathlib import Path

from . import log


def demo_store(work: Path, per_class: int, store_name: str = "store.pcr", **convert_options) -> tuple[Path, Path]:
    """``(photos, store)`` under ``work``: the demo photos (``per_class`` per class, seed 0) and
    their conversion with ``convert_options`` (``record_bytes``, ``workers``, ...), each made
    only if it is not there yet."""
    from pcrfs.convert import convert
    from pcrfs.demo import make_demo

    src, store = work / "photos", work / store_name
    if not (src.is_dir() and any(src.iterdir())):
        log(f"writing the demo photos ({per_class} per class) to {src}")
        make_demo(src, per_class=per_class, seed=0)
    if not (store / "pcr.yaml").exists():
        log(f"converting to {store}")
        convert(src, store, overwrite=True, **convert_options)
    return src, store
