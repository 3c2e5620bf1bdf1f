"""Writing a store: group-major record files, resumable, finalized atomically.

A conversion appends images in index order. Each finished record is written to
``records/NNNNN.pcr`` and then described in ``.partial/NNNNN.json``; only a record
with both is considered done, so ``kill -9`` at any point loses at most the record
in progress. ``finalize`` writes the index, the report and, last of all, the
manifest: a store without ``pcr.yaml`` is never readable as complete.

With a :class:`~pcrfs.store.location.RemoteTarget` the writer works in a local
staging directory and uploads as it goes: each record right after it is
written (then its local copy is dropped; its description records that it is
uploaded), the index and report at the end, and the manifest last of all.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import yaml

from .. import __version__
from ..fsutil import fsync_dir, write_atomic
from . import format as fmt
from .index import Index, StringTable, directories_of

if TYPE_CHECKING:
    from .location import RemoteTarget


@dataclass
class ImageEntry:
    path: str                 # relative, '/'-separated
    src_size: int
    src_mtime_ns: int
    flags: int
    groups: list              # list[bytes | memoryview], scan groups in order
    crcs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.crcs:
            self.crcs = [zlib.crc32(g) for g in self.groups]

    @property
    def nbytes(self) -> int:
        return sum(len(g) for g in self.groups)


@dataclass
class Problem:
    path: str
    reason: str
    kind: str = "bad"  # bad | skipped

    def as_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason, "kind": self.kind}




class StoreWriter:
    """Builds a store in ``root``; call ``add`` in index order, then ``finalize``."""

    def __init__(self, root: Path, record_bytes: int = fmt.DEFAULT_RECORD_BYTES,
                 target: "RemoteTarget | None" = None) -> None:
        self.root = Path(root)  # the store itself, or the local staging directory of a remote one
        self.target = target
        self.record_bytes = record_bytes
        self.partial = self.root / fmt.PARTIAL_DIR
        self.records_dir = self.root / fmt.RECORDS_DIR
        self._pending: list[ImageEntry] = []
        self._pending_bytes = 0
        self._pending_problems: list[Problem] = []
        self.done: list[dict] = []  # descriptions of finished records, in order

    # ---- state ---------------------------------------------------------------

    @property
    def next_record(self) -> int:
        return len(self.done)

    @property
    def sources_consumed(self) -> int:
        """How many source files (in listing order) finished records account for."""
        return self.done[-1]["source_end"] if self.done else 0

    def start(self, fingerprint: str) -> None:
        """Create the store directories or resume an unfinished conversion.

        ``fingerprint`` identifies the source listing and options; resuming with a
        different one would mix two conversions, so it is refused.
        """
        self.partial.mkdir(parents=True, exist_ok=True)
        self.records_dir.mkdir(parents=True, exist_ok=True)
        state = self.partial / "state.json"
        if state.exists():
            previous = json.loads(state.read_text())
            if previous.get("fingerprint") != fingerprint:
                raise ResumeMismatch(
                    f"{self.root} holds an unfinished conversion of a different source or with "
                    "different options; use --overwrite to start over"
                )
        else:
            write_atomic(state, json.dumps({"fingerprint": fingerprint}).encode())
        self._load_done()

    def _load_done(self) -> None:
        self.done = []
        while True:
            r = len(self.done)
            desc = self.partial / f"{r:05d}.json"
            if not desc.exists():
                break
            try:
                d = json.loads(desc.read_text())
            except ValueError:
                break  # torn description: redo this record
            if not self._record_in_place(r, d["size"]):
                break
            self.done.append(d)
        # Anything past the last complete record is a leftover of the interrupted run.
        for p in self.records_dir.iterdir():
            stem = p.name.split(".")[0]
            if not stem.isdigit() or int(stem) >= len(self.done) or p.name.endswith(".tmp"):
                p.unlink()
        for p in self.partial.glob("[0-9]*.json*"):
            stem = p.name.split(".")[0]
            if int(stem) >= len(self.done) or p.name.endswith(".tmp"):
                p.unlink()

    def _record_in_place(self, r: int, size: int) -> bool:
        """True if record ``r`` is where it belongs (local store, or uploaded) with ``size`` bytes."""
        if self.target is not None:
            return self.target.size(fmt.record_name(r)) == size
        rec = self.root / fmt.record_name(r)
        return rec.exists() and rec.stat().st_size == size

    # ---- adding images -----------------------------------------------------

    def add(self, entry: ImageEntry, source_end: int) -> None:
        """Append an image; ``source_end`` is the listing position after it."""
        self._pending.append(entry)
        self._pending_bytes += entry.nbytes
        if self._pending_bytes >= self.record_bytes:
            self._flush(source_end)

    def add_problem(self, problem: Problem) -> None:
        self._pending_problems.append(problem)

    def finish_sources(self, source_end: int) -> None:
        """No more images: flush the last, partly filled record."""
        if self._pending or self._pending_problems:
            self._flush(source_end)

    def _flush(self, source_end: int) -> None:
        r = self.next_record
        first_image = sum(d["n_images"] for d in self.done)
        entries = self._pending
        n_groups = max((len(e.groups) for e in entries), default=0)
        chunks: list = [fmt.record_header(r)]
        offset = fmt.RECORD_HEADER_SIZE
        group_offsets = []
        # group-major: group 1 of every image, then group 2 of every image, ...
        for g in range(n_groups):
            group_offsets.append(offset)
            for e in entries:
                if g < len(e.groups):
                    chunks.append(e.groups[g])
                    offset += len(e.groups[g])
        rec_path = self.root / fmt.record_name(r)
        write_atomic(rec_path, chunks)
        if self.target is not None:
            self.target.upload(fmt.record_name(r), rec_path)
        desc = {
            "record": r,
            "first_image": first_image,
            "n_images": len(entries),
            "size": offset,
            "group_offsets": group_offsets,
            "source_end": source_end,
            "images": [[e.path, e.src_size, e.src_mtime_ns, e.flags,
                        [len(g) for g in e.groups], e.crcs] for e in entries],
            "problems": [p.as_dict() for p in self._pending_problems],
        }
        write_atomic(self.partial / f"{r:05d}.json", json.dumps(desc).encode())
        if self.target is not None:
            rec_path.unlink()  # uploaded and described: the staging copy is no longer needed
        self.done.append(desc)
        self._pending, self._pending_bytes, self._pending_problems = [], 0, []

    # ---- finalization ------------------------------------------------------

    def problems(self) -> list[dict]:
        return [p for d in self.done for p in d["problems"]]

    def finalize(self, manifest_extra: dict, extra_problems: list[Problem] = ()) -> dict:
        """Write index, report and manifest (last); remove the partial state.

        ``extra_problems`` (found while listing the source) join the report.
        """
        rows = [row for d in self.done for row in d["images"]]
        n = len(rows)
        n_groups = max((len(row[4]) for row in rows), default=0)
        images = np.zeros(n, dtype=fmt.IMAGE_DTYPE)
        lengths = np.zeros((n, n_groups), dtype=fmt.GROUP_LENGTH_DTYPE)
        crcs = np.zeros((n, n_groups), dtype=fmt.GROUP_CRC_DTYPE)
        for i, (_, size, mtime, flags, lens, cs) in enumerate(rows):
            images[i] = (size, mtime, len(lens), flags)
            lengths[i, :len(lens)] = lens
            crcs[i, :len(cs)] = cs
        records = np.zeros(len(self.done), dtype=fmt.RECORD_DTYPE)
        rec_offsets = np.zeros((len(self.done), n_groups), dtype=fmt.OFFSET_DTYPE)
        for r, d in enumerate(self.done):
            records[r] = (d["first_image"], d["n_images"], d["size"])
            go = d["group_offsets"] + [d["size"]] * (n_groups - len(d["group_offsets"]))
            rec_offsets[r] = go
        paths = [row[0] for row in rows]
        dir_names, dir_ranges = directories_of(paths)
        index = Index(images, lengths, crcs, records, rec_offsets,
                      StringTable.from_strings(paths), StringTable.from_strings(dir_names), dir_ranges)

        problems = [p.as_dict() for p in extra_problems] + self.problems()
        upload = None
        if self.target is not None:
            for stale in self.target.record_ids():  # left by an earlier, abandoned conversion
                if stale >= len(self.done):
                    self.target.remove(fmt.record_name(stale))
            upload = lambda name: self.target.upload(name, self.root / name)  # noqa: E731
        manifest = publish(self.root, index, problems, manifest_extra, upload=upload)
        shutil.rmtree(self.partial, ignore_errors=True)
        return manifest


def publish(root: Path, index: Index, problems: list[dict], manifest_extra: dict,
            upload: Callable[[str], None] | None = None) -> dict:
    """Write the index, the report and, last, the manifest that marks the store complete.

    The record files must already be in place. ``upload(name)``, if given, is
    called for each of those files (relative names) once it is final locally,
    the manifest last.
    """
    root = Path(root)
    images = index.images
    n = len(images)
    n_groups = index.num_groups
    lengths = index.group_lengths
    tmp_index = root / (fmt.INDEX_DIR + ".tmp")
    if tmp_index.exists():
        shutil.rmtree(tmp_index)
    checks = index.save(tmp_index)
    final_index = root / fmt.INDEX_DIR
    if final_index.exists():
        shutil.rmtree(final_index)
    os.replace(tmp_index, final_index)

    report = {
        "images": n,
        "reencoded": int(np.count_nonzero(images["flags"] & fmt.FLAG_REENCODED)),
        "bad": [p for p in problems if p["kind"] == "bad"],
        "skipped": [p for p in problems if p["kind"] == "skipped"],
    }
    write_atomic(root / fmt.REPORT, json.dumps(report, indent=1, ensure_ascii=False).encode("utf-8", "backslashreplace"))

    classes = [name for d in range(len(index.dirs)) if (name := index.dirs[d]) and "/" not in name]
    manifest = {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "pcrfs_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "num_images": n,
        "num_groups": n_groups,
        "num_records": len(index.records),
        "total_bytes": int(lengths.sum(dtype=np.uint64)),
        "classes": classes,
        **manifest_extra,
        "index_files": checks,
    }
    fsync_dir(root / fmt.RECORDS_DIR)
    if upload is not None:
        for name in fmt.INDEX_FILES:
            upload(f"{fmt.INDEX_DIR}/{name}")
        upload(fmt.REPORT)
    write_atomic(root / fmt.MANIFEST,
                  yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True).encode())
    fsync_dir(root)
    if upload is not None:
        upload(fmt.MANIFEST)  # last: its presence marks the remote store complete
    return manifest


class ResumeMismatch(RuntimeError):
    """An unfinished conversion in the target came from other inputs or options."""
