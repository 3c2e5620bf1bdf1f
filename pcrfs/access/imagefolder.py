"""torchvision's ImageFolder order over a store, computed from the index (no torch here).

``torchvision.datasets.ImageFolder(MNT/view)`` takes the sorted top-level
directories as classes and, per class, walks ``sorted(os.walk(class_dir))``: its
directories in the order of their path strings, each directory's files sorted by
name, keeping files with an image extension. The store orders paths by
component tuples instead (so every directory is one index range), which differs
as soon as a class has subdirectories ("c/a.jpg", "c/b/x.jpg", "c/c.jpg" is the
store's order; ImageFolder's is "c/a.jpg", "c/c.jpg", "c/b/x.jpg"). This module
rebuilds ImageFolder's order as two integer arrays, with no object per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..store import format as fmt
from ..store.read.reader import Store
from .views import ViewTree

# torchvision.datasets.folder.IMG_EXTENSIONS (matched case-insensitively, as there)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class FolderOrder:
    classes: list[str]
    images: np.ndarray   # int64[n]: store image index of sample j
    targets: np.ndarray  # int64[n]: class index of sample j


def imagefolder_order(store: Store, extensions: tuple[str, ...] = IMG_EXTENSIONS,
                      tree: ViewTree | None = None) -> FolderOrder:
    """The samples ``ImageFolder(MNT/<any view>)`` would list, in its order.

    Raises FileNotFoundError as torchvision does for a store with no class
    directory, or with a class that holds no file with an image extension.
    """
    tree = tree or ViewTree(store)
    index = store.index
    dirs = [index.dirs[d] for d in range(len(index.dirs))]
    classes = sorted(name for name in dirs if name and "/" not in name)
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {store.url}.")
    under: dict[str, list[tuple[str, int]]] = {c: [] for c in classes}
    for d, name in enumerate(dirs):
        if name:
            under[name.split("/", 1)[0]].append((name, d))
    exts = tuple(e.lower() for e in extensions)
    images, targets, empty = [], [], []
    for target, cls in enumerate(classes):
        count = 0
        for _, d in sorted(under[cls]):  # os.walk roots sorted as strings
            listing = tree.listing(d)    # the directory's own files, sorted by name
            keep = [j for j, raw in enumerate(listing.raw_names) if fmt.decode_path(raw).lower().endswith(exts)]
            if len(keep) == len(listing.raw_names):
                chosen = listing.images
            else:
                chosen = listing.images[np.asarray(keep, dtype=np.intp)]
            images.append(np.asarray(chosen, dtype=np.int64))
            count += len(chosen)
        targets.append(np.full(count, target, dtype=np.int64))
        if count == 0:
            empty.append(cls)
    if empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}. "
                                f"Supported extensions are: {', '.join(extensions)}")
    return FolderOrder(classes, np.concatenate(images), np.concatenate(targets))
