"""Large files through the mount (issue 27): a sequential read of a 2-20 MB file takes about
its own bytes from the store, not its groups again for every kernel-sized piece."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mountutil import fuse_unavailable
from pcrfs.convert import convert
from pcrfs.fuse.fastpath import DISABLE_ENV
from pcrfs.store.read.reader import open_store

needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))


@pytest.fixture(scope="module")
def large_store(tmp_path_factory) -> Path:
    """Two real photographs enlarged (with sensor-like noise) into 2.5 MB and 6.7 MB JPEGs."""
    from skimage import data

    src = tmp_path_factory.mktemp("large") / "src" / "cls"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, img, side in (("a", data.astronaut(), 2600), ("b", data.coffee(), 5200)):
        im = Image.fromarray(img).resize((side, side * img.shape[0] // img.shape[1]), Image.LANCZOS)
        noisy = np.asarray(im).astype(np.int16) + rng.normal(0, 6, (im.height, im.width, 3)).astype(np.int16)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(src / f"{name}.jpg", quality=95)
    store = src.parent.parent / "large.pcr"
    convert(src.parent, store, workers=2)
    return store


def _store_bytes(mnt: Path) -> int:
    return json.loads((mnt / ".pcrfs" / "stats").read_bytes())["store_reads"]["bytes"]


@needs_fuse
@pytest.mark.parametrize("path", ["compiled", "python"])
@pytest.mark.parametrize("cache_size", ["256M", "0"])
def test_a_sequential_read_of_a_large_file_takes_its_bytes_once(large_store, mounts, monkeypatch, path, cache_size):
    if path == "python":
        monkeypatch.setenv(DISABLE_ENV, "1")
    with open_store(large_store) as s:
        files = [(s.path(i), k, s.size(i, k)) for i in range(s.num_images) for k in (1, 5, s.num_groups)]
        assert max(size for _, _, size in files) > 2 << 20
        want = {(p, k): s.read(s.find(p), k) for p, k, _ in files}
    for rel, k, size in files:  # a fresh mount per file: nothing read before can serve it
        mnt = Path(mounts.mount(large_store, f"m{k}-{rel.replace('/', '_')}", cache_size=cache_size).mountpoint)
        view = "full" if k == 10 else f"scan{k}"
        before = _store_bytes(mnt)
        with open(mnt / view / rel, "rb") as f:  # like cat: 128 KiB reads, the kernel's readahead ahead
            got = b"".join(iter(lambda: f.read(128 << 10), b""))
        assert got == want[(rel, k)]
        taken = _store_bytes(mnt) - before
        assert taken <= 1.1 * size, (view, rel, size, taken)
        mounts.cleanup()
