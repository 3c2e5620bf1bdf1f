"""Writing a store: group-major record files, resumable, finalized atomically.

A conversion is cut into batches of source files (``pcrfs.convert.plan_batches``);
batch r becomes record r. Each finished record is written to ``records/NNNNN.pcr``
and then described in ``.partial/NNNNN.json``; only a record with both is
considered done, in whatever order records finish (a Dask cluster finishes them out
of order), so ``kill -9`` at any point loses at most the records in progress.
``finalize`` writes the index, the report and, last of all, the manifest: a store
without ``pcr.yaml`` is never readable as complete.

Records reach the store through a :class:`~pcrfs.store.write.sink.RecordSink`, the
one way to write a record (a Dask task writes its own record through one too).
The writer's own files (``.partial/``, index, report, manifest) are made in its
working directory: the store itself, or for an object store a local staging
directory whose files the sink uploads as they are final, the manifest last.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import yaml

from ..._version import __version__
from ...fsutil import fsync_dir, write_atomic
from .. import format as fmt
from ..format.index import Index, StringTable, directories_of
from .sink import LocalSink, RecordSink


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


def build_record(record: int, entries: Sequence[ImageEntry], problems: Sequence[Problem] = (),
                 sources: tuple[int, int] | None = None) -> tuple[list, dict]:
    """Record ``record`` holding ``entries``: its bytes (as chunks, header first) and its description.

    Pure: the local writer and a Dask task (pcrfs.convert.dask) build records with it, so
    both give the same bytes. The description is what ``.partial/NNNNN.json`` holds and
    what ``finalize`` turns into index rows: per image its name, source size and mtime,
    flags, group lengths and CRCs; the record's size and group region offsets; the
    problems of its batch; and ``sources``, the listing positions [start, end) the record
    was made from (a resumed conversion checks them against its own batch plan).
    The record's first image number is not in it: that follows from the records before
    it, which a Dask task does not know; ``finalize`` derives it.
    """
    n_groups = max((len(e.groups) for e in entries), default=0)
    chunks: list = [fmt.record_header(record)]
    offset = fmt.RECORD_HEADER_SIZE
    group_offsets = []
    # group-major: group 1 of every image, then group 2 of every image, ...
    for g in range(n_groups):
        group_offsets.append(offset)
        for e in entries:
            if g < len(e.groups):
                chunks.append(e.groups[g])
                offset += len(e.groups[g])
    desc = {
        "record": record,
        "n_images": len(entries),
        "size": offset,
        "group_offsets": group_offsets,
        "sources": list(sources) if sources is not None else None,
        "images": [[e.path, e.src_size, e.src_mtime_ns, e.flags,
                    [len(g) for g in e.groups], e.crcs] for e in entries],
        "problems": [p.as_dict() for p in problems],
    }
    return chunks, desc


class RecordNotVisible(RuntimeError):
    """A record that a Dask worker reported written is not where the client looks for it."""


class StoreWriter:
    """Builds a store in ``root``: ``start``, then records (in any order), then ``finalize``.

    Records come from :meth:`write_record` (built here, written through ``sink``) or
    from :meth:`record_written` (built and written through a sink by a Dask worker).
    ``root`` is the working directory; ``sink`` the store (default: ``root`` itself).
    """

    def __init__(self, root: Path, sink: RecordSink | None = None) -> None:
        self.root = Path(root)  # the store itself, or the local staging directory of a remote one
        self.sink = sink if sink is not None else LocalSink(self.root)
        self.partial = self.root / fmt.PARTIAL_DIR
        self.records_dir = self.root / fmt.RECORDS_DIR
        self.plan: list[tuple[int, int]] | None = None
        self.done: dict[int, dict] = {}  # descriptions of finished records, by record id

    # ---- state ---------------------------------------------------------------

    @property
    def sources_done(self) -> int:
        """How many source files the finished records account for."""
        return sum(d["sources"][1] - d["sources"][0] for d in self.done.values() if d.get("sources"))

    def start(self, fingerprint: str, plan: Sequence[tuple[int, int]] | None = None) -> None:
        """Create the store directories or resume an unfinished conversion.

        ``fingerprint`` identifies the source listing and options; resuming with a
        different one would mix two conversions, so it is refused. ``plan`` gives the
        listing range [start, end) of every record; a finished record from an earlier
        run counts only if its description names the same range.
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
        self.plan = [tuple(b) for b in plan] if plan is not None else None
        self._load_done()

    def _load_done(self) -> None:
        """Every record whose description is valid and whose file is in place is done, in
        any order (Dask finishes records out of order); everything else is redone."""
        self.done = {}
        for desc in sorted(self.partial.glob("[0-9]*.json")):
            stem = desc.name[:-len(".json")]
            if not stem.isdigit():
                continue
            d = self._valid_description(int(stem), desc)
            if d is not None:
                self.done[int(stem)] = d
        self.remove_leftovers()

    def _valid_description(self, r: int, path: Path) -> dict | None:
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # torn description: redo this record
        if not isinstance(d, dict) or d.get("record") != r or "size" not in d:
            return None
        if self.plan is not None and (r >= len(self.plan) or d.get("sources") != list(self.plan[r])):
            return None  # made from other batch boundaries (an older pcrfs): redo
        if not self._record_in_place(r, d["size"]):
            return None
        return d

    def remove_leftovers(self) -> None:
        """Delete what no finished record accounts for: records without a description,
        temporary files of interrupted writes (ours, or of a Dask attempt on a worker that
        died) and torn descriptions. Called at start and again before finalizing."""
        keep = {fmt.record_name(r).rsplit("/", 1)[1] for r in self.done}
        for p in self.records_dir.iterdir():
            if p.name not in keep and not p.is_dir():
                p.unlink(missing_ok=True)
        keep_desc = {f"{r:05d}.json" for r in self.done} | {"state.json"}
        for p in self.partial.iterdir():
            if p.name not in keep_desc and not p.is_dir():
                p.unlink(missing_ok=True)

    def _record_in_place(self, r: int, size: int) -> bool:
        """True if record ``r`` is in the store (local, or uploaded) with ``size`` bytes."""
        return self.sink.size(fmt.record_name(r)) == size

    # ---- adding records ------------------------------------------------------

    def write_record(self, record: int, entries: Sequence[ImageEntry], problems: Sequence[Problem] = (),
                     sources: tuple[int, int] | None = None) -> dict:
        """Build record ``record``, put it into the store, then describe it."""
        chunks, desc = build_record(record, entries, problems, sources)
        self.sink.put(fmt.record_name(record), chunks)
        self._describe(desc)
        return desc

    def record_written(self, desc: dict, wait: float = 15.0) -> None:
        """Count a record that someone else (a Dask worker) built and wrote as done.

        The record must be visible here with the described size before its description
        is written; a shared filesystem may show another machine's new file a little
        late, so it is looked for during ``wait`` seconds before RecordNotVisible.
        """
        r, size = desc["record"], desc["size"]
        deadline = time.monotonic() + wait
        delay = 0.05
        while not self._record_in_place(r, size):
            if time.monotonic() >= deadline:
                where = self.sink.where(fmt.record_name(r))
                raise RecordNotVisible(
                    f"record {r} was written by a worker but {where} is missing or not {size} bytes here: "
                    "workers must write the store at the same path as this client (a shared filesystem) "
                    "or to an object store URL")
            time.sleep(delay)
            delay = min(1.0, delay * 2)
        self._describe(desc)

    def _describe(self, desc: dict) -> None:
        write_atomic(self.partial / f"{desc['record']:05d}.json", json.dumps(desc).encode())
        self.done[desc["record"]] = desc

    # ---- finalization ------------------------------------------------------

    def problems(self) -> list[dict]:
        return [p for r in sorted(self.done) for p in self.done[r]["problems"]]

    def finalize(self, manifest_extra: dict, extra_problems: Sequence[Problem] = ()) -> dict:
        """Write index, report and manifest (last); remove the partial state.

        Every record of the plan (without a plan: 0 .. the highest written) must be done.
        ``extra_problems`` (found while listing the source) join the report.
        """
        n_records = len(self.plan) if self.plan is not None else max(self.done, default=-1) + 1
        missing = [r for r in range(n_records) if r not in self.done]
        if missing or len(self.done) != n_records:
            raise RuntimeError(f"cannot finalize {self.root}: records {missing[:10]} are not finished")
        self.remove_leftovers()  # temporary files of attempts that died: never part of a store
        done = [self.done[r] for r in range(n_records)]
        rows = [row for d in done for row in d["images"]]  # in storage order (record by record)
        n = len(rows)
        # images are numbered in path order whatever order the records keep them in
        by_path = sorted(range(n), key=lambda p: fmt.path_sort_key(rows[p][0]))  # image i's storage position
        storage_order = np.empty(n, dtype=fmt.STORAGE_ORDER_DTYPE)
        storage_order[by_path] = np.arange(n, dtype=fmt.STORAGE_ORDER_DTYPE)
        if np.array_equal(storage_order, np.arange(n, dtype=fmt.STORAGE_ORDER_DTYPE)):
            storage_order = None  # the path order: a version-1 store, as every reader reads
        rows = [rows[p] for p in by_path]
        n_groups = max((len(row[4]) for row in rows), default=0)
        images = np.zeros(n, dtype=fmt.IMAGE_DTYPE)
        lengths = np.zeros((n, n_groups), dtype=fmt.GROUP_LENGTH_DTYPE)
        crcs = np.zeros((n, n_groups), dtype=fmt.GROUP_CRC_DTYPE)
        for i, (_, size, mtime, flags, lens, cs) in enumerate(rows):
            images[i] = (size, mtime, len(lens), flags)
            lengths[i, :len(lens)] = lens
            crcs[i, :len(cs)] = cs
        records = np.zeros(n_records, dtype=fmt.RECORD_DTYPE)
        rec_offsets = np.zeros((n_records, n_groups), dtype=fmt.OFFSET_DTYPE)
        first_image = 0
        for r, d in enumerate(done):
            records[r] = (first_image, d["n_images"], d["size"])
            first_image += d["n_images"]
            go = d["group_offsets"] + [d["size"]] * (n_groups - len(d["group_offsets"]))
            rec_offsets[r] = go
        paths = [row[0] for row in rows]
        dir_names, dir_ranges = directories_of(paths)
        index = Index(images, lengths, crcs, records, rec_offsets,
                      StringTable.from_strings(paths), StringTable.from_strings(dir_names), dir_ranges,
                      storage_order)

        problems = [p.as_dict() for p in extra_problems] + self.problems()
        for stale in self.sink.record_ids():  # left by an earlier, abandoned conversion of more records
            if stale >= n_records:
                self.sink.remove(fmt.record_name(stale))
        manifest = publish(self.root, index, problems, manifest_extra,
                           upload=lambda name: self.sink.publish(name, self.root / name))
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
        "format_version": 2 if index.shuffled else 1,
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
        for name in checks:  # every index file of its version
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
