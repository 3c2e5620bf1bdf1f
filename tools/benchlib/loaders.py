"""Training epochs as a benchmark runs them: a DataLoader over torchvision's ``ImageFolder``
(a mounted view, or a local copy of one) or over ``pcrfs.torch.ImageFolder`` (a store's URL,
no FUSE), drained and timed. ``loader`` is ``"decode"`` (PIL + ``RandomResizedCrop(224)`` +
flip + ``ToTensor``: a training pipeline) or ``"bytes"`` (the files' bytes only: what
reading costs, without the decode).

    imagefolder_epoch(MNT / "scan5", workers=2, batch=32, seed=1, sampler=s)   # -> {"seconds", "images"}
    run = epoch_runner({"kind": "dataset", "url": ..., "view": "scan5", ...})  # one process's loader
    run(1)                                                                     # -> epoch 1's figures

:func:`epoch_runner` builds what one training process holds (for ``benchlib.lockstep``'s
child processes): ``kind`` ``"mount"`` (torchvision over ``root``, a mounted view, with
``RecordShuffleSampler(root, rank=, world_size=)``) or ``"dataset"``
(``pcrfs.torch.ImageFolder(url, view=, storage_options=)`` + ``RecordShuffleSampler`` of
the same URL and options, each epoch inside ``with ds.fetch_ahead(sampler)``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable


def transform():
    from torchvision import transforms

    return transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor()])


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def bytes_size(data: bytes) -> int:
    return len(data)


def file_size(f: Any) -> int:
    """A ``pcrfs.torch.ImageFolder`` loader (it gets a file object): the file's length."""
    return len(f.read())


def collate_sizes(batch: list) -> "Any":
    import torch

    return torch.tensor([x for x, _ in batch]), torch.tensor([y for _, y in batch])


def drain(loader) -> dict:
    """Iterate ``loader`` to its end: ``{"seconds", "images"}``."""
    t0 = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    return {"seconds": round(time.perf_counter() - t0, 3), "images": n}


def imagefolder_epoch(root: Path, workers: int, batch: int, seed: int, sampler=None, loader: str = "decode") -> dict:
    """One epoch of torchvision's ImageFolder over ``root`` (``shuffle=True`` unless ``sampler``)."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets

    if loader == "bytes":
        ds = datasets.ImageFolder(str(root), bytes_size, loader=read_bytes)
        return drain(DataLoader(ds, batch_size=batch, shuffle=sampler is None, sampler=sampler,
                                num_workers=workers, generator=torch.Generator().manual_seed(seed),
                                collate_fn=collate_sizes))
    ds = datasets.ImageFolder(str(root), transform())
    return drain(DataLoader(ds, batch_size=batch, shuffle=sampler is None, sampler=sampler, num_workers=workers,
                            generator=torch.Generator().manual_seed(seed)))


def pcrfs_dataset(url: str, view: str, storage_options: dict, loader: str = "decode") -> Any:
    """``pcrfs.torch.ImageFolder(url, view=view, storage_options=...)`` with the benchmark's loader."""
    from pcrfs.access.torch import ImageFolder

    if loader == "bytes":
        return ImageFolder(url, view=view, loader=file_size, transform=None, storage_options=storage_options)
    return ImageFolder(url, view=view, transform=transform(), storage_options=storage_options)


def dataset_epoch(ds: Any, sampler: Any, workers: int, batch: int, loader: str = "decode") -> dict:
    """One epoch of ``ds`` in ``sampler``'s order, with ``ds.fetch_ahead(sampler)`` around it."""
    from torch.utils.data import DataLoader

    collate = collate_sizes if loader == "bytes" else None
    with ds.fetch_ahead(sampler) as ahead:
        r = drain(DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate))
    r["fetched_ahead"] = ahead.submitted
    if ahead.failed is not None:
        r["fetch_ahead_failed"] = repr(ahead.failed)
    return r


def epoch_runner(config: dict) -> tuple[Callable[[int], dict], dict]:
    """(``run(epoch) -> figures``, what the process built: window, images) for ``config``.
    Imports torch and torchvision first, so that no epoch pays for them."""
    import torch.utils.data  # noqa: F401
    import torchvision.datasets  # noqa: F401
    import torchvision.transforms  # noqa: F401

    from pcrfs.access.sampling import RecordShuffleSampler

    rank, world = int(config.get("rank", 0)), int(config.get("world_size", 1))
    workers, batch, loader = int(config["workers"]), int(config["batch"]), config.get("loader", "decode")
    if config["kind"] == "mount":
        root = Path(config["root"])
        sampler = RecordShuffleSampler(root, seed=0, rank=rank, world_size=world, window=config.get("window"),
                                       fetch_ahead=config.get("ahead", True))

        def run(epoch: int) -> dict:
            sampler.set_epoch(epoch)
            return imagefolder_epoch(root, workers, batch, epoch, sampler, loader)
    else:
        opts = dict(config["storage_options"])
        ds = pcrfs_dataset(config["url"], config["view"], opts, loader)
        sampler = RecordShuffleSampler(config["url"], view=config["view"], seed=0, rank=rank, world_size=world,
                                       window=config.get("window"), storage_options=opts)

        def run(epoch: int) -> dict:
            sampler.set_epoch(epoch)
            return dataset_epoch(ds, sampler, workers, batch, loader)
    return run, {"rank": rank, "world_size": world, "window": sampler.window, "share": len(sampler)}
