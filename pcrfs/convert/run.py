""":func:`convert`: plan (:mod:`.plan`), take the store (:mod:`.target`), convert the
batches still to do here (:mod:`.local`) or on a Dask cluster (:mod:`.dask`), then
finalize the store and, with ``quality_index``, its adaptive index."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..jpeg.transcode import TranscodeOptions
from ..remote.fs import RemoteOptions
from ..store import format as fmt
from .dask import convert_batches
from .local import convert_locally
from .plan import (ProgressFn, SourceListing, fingerprint, list_sources, plan_batches, storage_order,
                   without_bad_names)
from .target import FinishedButNotCleaned, StoreTarget

if TYPE_CHECKING:
    import distributed


@dataclass
class ConvertResult:
    images: int
    bad: list[dict]
    skipped: list[dict]
    reencoded: int
    bytes_in: int
    bytes_out: int
    seconds: float
    resumed_from: int  # source files already done by an earlier, interrupted run
    manifest: dict
    source_bytes: int = 0  # every listed source file, this run's and earlier runs' alike
    adaptive: tuple | None = None  # with quality_index: (quality.build.Built, the index's manifest entry)

    @property
    def ratio(self) -> float:
        """Stored bytes per source byte. Against the whole source, not ``bytes_in``: a
        resumed run reads only what is left but the store holds everything."""
        return self.bytes_out / self.source_bytes if self.source_bytes else 0.0


@dataclass(frozen=True)
class _Settings:
    """:func:`convert`'s keyword arguments, once the store is taken."""
    opts: TranscodeOptions
    workers: int | None
    record_bytes: int
    overwrite: bool
    on_start: Callable[[int, int], None] | None
    on_progress: ProgressFn | None
    remote: RemoteOptions
    client: "distributed.Client | None"
    quality_index: bool
    order: str = fmt.ORDER_SHUFFLED
    seed: int = 0


def convert(src: Path, store: Path | str, *, opts: TranscodeOptions = TranscodeOptions(),
            workers: int | None = None, record_bytes: int = fmt.DEFAULT_RECORD_BYTES, overwrite: bool = False,
            listing: SourceListing | None = None, on_start: Callable[[int, int], None] | None = None,
            on_progress: ProgressFn | None = None, remote: RemoteOptions = RemoteOptions(),
            staging_dir: Path | None = None, client: "distributed.Client | None" = None,
            quality_index: bool = False, order: str = fmt.ORDER_SHUFFLED, seed: int = 0) -> ConvertResult:
    """Convert the image tree ``src`` into a store at ``store`` (a directory or a URL).

    ``on_start(total, already_done)`` and ``on_progress(n, bytes)`` drive a progress bar.
    For a URL, ``remote`` says how to reach it and ``staging_dir`` where the local
    work happens (default: under ``~/.cache/pcrfs``); it is removed when done.
    RemoteError is raised if the object store cannot be used.

    With a Dask ``client`` the batches are converted by the cluster's workers, which
    must read ``src`` and write ``store`` at the same paths (or the same URL) as this
    process (see docs/distributed.md); ``workers`` is then unused. The store is the
    same as a local conversion's.

    ``order`` is the storage order (``docs/format.md``): ``"shuffled"`` (the default) puts
    a pseudo-random sample of the images, drawn from ``seed``, in each record, so that a
    cache holding a few records holds a sample of the whole dataset (shuffled training
    with bounded memory); ``"source"`` keeps the path order (a version-1 store). The same
    source, options and seed give the same store, locally and on Dask.

    ValueError if ``src`` and ``store`` overlap; StoreBusy if another conversion is
    writing ``store``. Source paths a mount could not serve are reported as bad files.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source {src} is not a directory")
    target = StoreTarget.open(src, store, remote, staging_dir)
    if order not in fmt.ORDERS:
        raise ValueError(f"unknown storage order {order!r} (one of: {', '.join(fmt.ORDERS)})")
    settings = _Settings(opts, workers, record_bytes, overwrite, on_start, on_progress, remote, client,
                         quality_index, order, int(seed))
    with target.locked():
        if client is not None:  # workers open these paths themselves, from their own working directories
            src, target = Path(os.path.abspath(src)), target.absolute()
        return _convert(src, target, listing, settings)


def _convert(src: Path, target: StoreTarget, listing: SourceListing | None, s: _Settings) -> ConvertResult:
    """:func:`convert`, with the checks done and the store's lock held."""
    t0 = time.monotonic()
    listing = storage_order(without_bad_names(listing or list_sources(src)), s.order, s.seed)
    if s.client is not None and listing.files and not os.path.isabs(listing.files[0].abs):
        raise ValueError("a conversion on Dask needs a listing of an absolute source path")
    fp = fingerprint(listing, s.opts, s.record_bytes, s.order, s.seed)
    source_bytes = sum(f.size for f in listing.files)
    try:
        writer = target.open_writer(s.overwrite)
    except FinishedButNotCleaned:
        return _finish_interrupted(target, fp, t0, len(listing.files), source_bytes, s)
    plan = plan_batches(listing.files, s.record_bytes)
    writer.start(fp, [(b.start, b.end) for b in plan])
    todo = [b for b in plan if b.record not in writer.done]
    resumed = writer.sources_done
    scoring = _quality_scoring(target.location) if s.quality_index else None
    if s.on_start:
        s.on_start(len(listing.files), resumed)
    if s.client is None:
        bytes_in = convert_locally(listing.files, todo, writer, s.opts, s.workers, s.on_progress, scoring)
    else:
        bytes_in = convert_batches(s.client, listing.files, todo, writer, s.opts, str(src), target.location,
                                   s.remote, fp, s.on_progress, scoring=scoring)
    manifest = writer.finalize({
        "record_target_bytes": s.record_bytes,
        "order": s.order,
        "seed": s.seed,
        "options": {"keep_metadata": s.opts.keep_metadata, "quality": s.opts.quality,
                    "non_jpeg": s.opts.non_jpeg, "max_pixels": s.opts.max_pixels},
    }, extra_problems=listing.problems)
    report = json.loads((writer.root / fmt.REPORT).read_text())
    target.clean_up()
    index = None
    if scoring is not None:
        index = scoring.finish(target.location, workers=s.workers or os.cpu_count() or 1, client=s.client,
                               remote=s.remote)
    return _result(manifest, report, bytes_in, t0, resumed, source_bytes, index)


def _finish_interrupted(target: StoreTarget, fp: str, t0: float, n_sources: int, source_bytes: int,
                        s: _Settings) -> ConvertResult:
    """A conversion killed after its manifest: clean up, and finish the adaptive index too
    (it may have been killed between the manifest and the index)."""
    manifest, report = target.finish_interrupted(fp)
    result = _result(manifest, report, 0, t0, n_sources, source_bytes, None)
    if s.quality_index:
        result.adaptive = _quality_scoring(target.location).finish(target.location, workers=s.workers or 1,
                                                                   client=s.client, remote=s.remote)
    return result


def _result(manifest: dict, report: dict, bytes_in: int, t0: float, resumed: int, source_bytes: int,
            index: tuple | None) -> ConvertResult:
    return ConvertResult(images=manifest["num_images"], bad=report["bad"], skipped=report["skipped"],
                         reencoded=report["reencoded"], bytes_in=bytes_in, bytes_out=manifest["total_bytes"],
                         seconds=time.monotonic() - t0, resumed_from=resumed, manifest=manifest,
                         source_bytes=source_bytes, adaptive=index)


def _quality_scoring(location: str):
    """The adaptive index's scorer for this conversion (pcrfs.quality.build), its kept parts opened."""
    from ..quality.build import ConvertScoring

    scoring = ConvertScoring(location)
    scoring.start()
    return scoring
