"""What a conversion will do, decided before any image is read: the source listing,
the names a store cannot hold, the batches that become records, the fingerprint that
ties a resumed run to its first run, and the refusal of overlapping trees.

Pure planning with no writes: the local converter (:mod:`.local`) and the Dask one
(:mod:`.dask`) take the same plan, so both give the same store.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..imagenames import image_by_name, looks_like_image_tree
import numpy as np

from ..jpeg.transcode import TranscodeOptions
from ..store import format as fmt
from ..store.write.writer import Problem

NAME_MAX = 255  # bytes per path component (Linux's limit, which the mount must meet)

ProgressFn = Callable[[int, int], None]  # (images done, bytes read) increments


@dataclass(frozen=True)
class SourceFile:
    rel: str        # '/'-separated path relative to the source root
    abs: str
    size: int
    mtime_ns: int
    dev: int = 0    # identity of the file the listing checked: the file read later must be it
    ino: int = 0


@dataclass
class SourceListing:
    """The source tree's files in store order, and what the walk could not take."""
    files: list[SourceFile] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # found while walking (unreadable dirs, ...)


def _inside(path: str, root_real: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


def list_sources(src: Path) -> SourceListing:
    """Every regular file under ``src`` in store order.

    Hidden entries (dot-names) are ignored. Symlinks to files are followed only if
    their target lies inside ``src``; symlinked directories are never followed (no
    loops, no escapes). Both are reported, never silently dropped. Files that are not
    images by their name (see :func:`image_by_name`) are skipped and reported as skipped.
    """
    listing = SourceListing()
    root_real = os.path.realpath(src)

    def entries_of(directory: str, rel_parts: tuple[str, ...]) -> list[os.DirEntry]:
        try:
            with os.scandir(directory) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as e:
            listing.problems.append(Problem("/".join(rel_parts) or ".", f"cannot list directory: {e.strerror}"))
            return []

    # depth-first with an explicit stack, not recursion: a source tree may be nested
    # deeper than Python's recursion limit (~1,000 levels)
    stack: list[tuple[Iterator[os.DirEntry], tuple[str, ...]]] = [(iter(entries_of(str(src), ())), ())]
    while stack:
        it, rel_parts = stack[-1]
        entry = next(it, None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            continue
        rel = "/".join(rel_parts + (entry.name,))
        st = _vetted_stat(entry, rel, root_real, listing.problems)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            parts = rel_parts + (entry.name,)
            stack.append((iter(entries_of(entry.path, parts)), parts))
        elif stat.S_ISREG(st.st_mode):
            why_not = image_by_name(entry.name, entry.path)
            if why_not:
                listing.problems.append(Problem(rel, why_not, "skipped"))
                continue
            listing.files.append(SourceFile(rel, entry.path, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino))
        else:
            listing.problems.append(Problem(rel, "not a regular file", "skipped"))
    listing.files.sort(key=lambda f: fmt.path_sort_key(f.rel))
    return listing


def refuse_swapped(src: Path, store: Path | str | None) -> None:
    """ValueError if ``src`` is a store or a mount (not an image tree), or if the local
    ``store`` looks like an image tree: the arguments were most likely swapped."""
    usage = "`pcrfs convert IMAGE_TREE STORE` reads IMAGE_TREE and writes STORE"
    if os.path.exists(os.path.join(src, fmt.MANIFEST)) or os.path.isdir(os.path.join(src, fmt.PARTIAL_DIR)):
        raise ValueError(f"the source {src} is a PCR store (it has {fmt.MANIFEST}), not an image tree; "
                         f"are the arguments swapped? {usage}")
    if os.path.exists(os.path.join(src, ".pcrfs", "stats")):
        raise ValueError(f"the source {src} is the root of a pcrfs mount (its directories are views of "
                         f"one store); convert a view such as {os.path.join(src, 'full')}, or use the store itself")
    if store is None or not os.path.isdir(store) or os.path.exists(os.path.join(store, fmt.MANIFEST)) \
            or os.path.isdir(os.path.join(store, fmt.PARTIAL_DIR)):
        return
    example = looks_like_image_tree(store)
    if example is not None:
        raise ValueError(f"the store {store} looks like an image tree (it holds {example}), not a PCR store; "
                         f"are the arguments swapped? {usage}")


def _vetted_stat(entry: os.DirEntry, rel: str, root_real: str, problems: list[Problem]) -> os.stat_result | None:
    """The stat of the entry a listing may take, or None with the reason in ``problems``."""
    try:
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if os.path.isdir(target):
                problems.append(Problem(rel, "symlinked directory not followed", "skipped"))
                return None
            if not _inside(target, root_real):
                problems.append(Problem(rel, "symlink points outside the source tree"))
                return None
        return os.stat(entry.path)
    except OSError as e:
        problems.append(Problem(rel, f"cannot stat: {e.strerror}"))
        return None


def bad_name(rel: str) -> str | None:
    """Why the source path ``rel`` cannot be stored, or None. Each component must be one
    a filesystem can serve: the mount lists it under its own name, and Linux limits
    names to 255 bytes (sources on exFAT/NTFS/SMB may hold longer ones in UTF-8)."""
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            return f"path component {part!r} is not a name"
        n = len(fmt.encode_path(part))
        if n > NAME_MAX:
            return f"a path component is {n} bytes long; names over {NAME_MAX} bytes cannot be served"
    return None


def without_bad_names(listing: SourceListing) -> SourceListing:
    """``listing`` less the files :func:`bad_name` refuses, which become bad-file problems."""
    bad = [(f, why) for f in listing.files if (why := bad_name(f.rel)) is not None]
    if not bad:
        return listing
    refused = {id(f) for f, _ in bad}
    return SourceListing([f for f in listing.files if id(f) not in refused],
                         listing.problems + [Problem(f.rel, why) for f, why in bad])


def storage_order(listing: SourceListing, order: str, seed: int) -> SourceListing:
    """The listing in the order its files will be stored (``docs/format.md``, storage order):
    the path order for ``"source"``; for ``"shuffled"`` a permutation drawn from ``seed``
    alone, so a resumed run, a Dask client and a rerun all cut the same records."""
    if order == fmt.ORDER_SOURCE or len(listing.files) < 2:
        return listing
    perm = np.random.default_rng([int(seed), 0x9C5]).permutation(len(listing.files))
    return SourceListing([listing.files[j] for j in perm.tolist()], listing.problems)


def fingerprint(listing: SourceListing, opts: TranscodeOptions, record_bytes: int,
                order: str = fmt.ORDER_SOURCE, seed: int = 0) -> str:
    """What a resumed run must share with the run it resumes: files (in storage order),
    sizes, mtimes, options."""
    h = hashlib.sha256()
    fields = {"opts": asdict(opts), "record_bytes": record_bytes, "format": 1}
    if order != fmt.ORDER_SOURCE:
        fields.update(format=2, order=order, seed=int(seed))
    h.update(json.dumps(fields, sort_keys=True).encode())
    for f in listing.files:
        h.update(fmt.encode_path(f.rel) + b"\0" + f"{f.size}:{f.mtime_ns}".encode() + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class Batch:
    """Listing positions [start, end) that become record ``record``; ``nbytes`` of source."""
    record: int
    start: int
    end: int
    nbytes: int

    @property
    def count(self) -> int:
        return self.end - self.start


def plan_batches(files: Sequence[SourceFile], record_bytes: int) -> list[Batch]:
    """Cut the listing into consecutive batches, one per record.

    A batch closes as soon as its *source* bytes reach ``record_bytes`` (at least one
    file each). Source sizes are known before any work, so a Dask client can hand
    whole batches to workers, and a local conversion cuts at the same places: both
    give the same records. Lossless transcoding keeps a JPEG's size within a few
    percent, so records still come out close to ``record_bytes``.
    """
    batches: list[Batch] = []
    start, acc = 0, 0
    for i, f in enumerate(files):
        acc += f.size
        if acc >= record_bytes:
            batches.append(Batch(len(batches), start, i + 1, acc))
            start, acc = i + 1, 0
    if start < len(files):
        batches.append(Batch(len(batches), start, len(files), acc))
    return batches


def _ancestors(path: str) -> set[tuple[int, int]]:
    """(device, inode) of ``path`` and of every existing directory above it: identities,
    so a bind mount or a second path to the same directory is still recognised."""
    ids = set()
    path = os.path.realpath(path)
    while True:
        try:
            st = os.stat(path)
            ids.add((st.st_dev, st.st_ino))
        except OSError:
            pass
        parent = os.path.dirname(path)
        if parent == path:
            return ids
        path = parent


def refuse_overlap(src: Path, store: Path) -> None:
    """ValueError unless ``src`` and ``store`` are disjoint trees. The source is never
    modified, and ``--overwrite`` empties the store: a source inside the store (or the
    same directory) would be deleted, a store inside the source would be read as input."""
    src_st = os.stat(src)
    if (src_st.st_dev, src_st.st_ino) in _ancestors(os.fspath(store)) or \
            _inside(os.path.realpath(store), os.path.realpath(src)):
        raise ValueError(f"the store {store} is inside the source tree {src} (or is that tree); "
                         "choose a store outside the source (the source is never modified)")
    try:
        store_st = os.stat(store)
    except OSError:
        return  # a store that does not exist yet contains nothing
    if (store_st.st_dev, store_st.st_ino) in _ancestors(os.fspath(src)):
        raise ValueError(f"the source {src} is inside the store {store}; refusing to write there "
                         "(the source is never modified); choose a store outside the source")
