"""Large scan groups a read cuts: served from a copy whose CRC was checked, never re-read raw.

A read must check a group's CRC-32 before serving any byte of it, so a read that takes a
piece of a group reads the whole group. For ordinary groups the tiers keep the checked
group in the memory cache; a large one would flush that cache, so it is handled here,
by every read path alike (local pread and the fetching tiers).
"""
from __future__ import annotations

import threading
import zlib
from collections import OrderedDict

from ..sources.backends import RecordSource, Span
from ..sources.cache import ByteLRU
from ..format.groups import GroupTable

# A group larger than this (or than an eighth of the group cache, if that is more) that a
# read cuts is not kept in the group cache (it would flush it). Its first read streams it
# whole through its CRC in GROUP_PIECE pieces; what later reads are served from depends
# on its size, and in neither case can bytes changed in the record afterwards (an edit in
# place, an object replaced) reach a reader:
# - up to KEEP_GROUP_BYTES: the checked bytes themselves, kept in a private buffer (the
#   buffers of recently cut groups share LARGE_GROUP_BUFFER bytes): read once in all;
# - larger: only the CRC-32 of each CHECK_BLOCK of it, taken during the checked pass (so
#   they are as trustworthy as the group's own CRC); a later read fetches the blocks it
#   overlaps and checks each against its CRC before serving a byte. Memory stays bounded
#   (4 bytes per 64 KiB) and a file read in kernel pieces costs about twice its bytes.
RANGE_GROUP_BYTES = 1 << 20
GROUP_PIECE = 1 << 20
GROUP_PIECES_AT_ONCE = 4      # pieces requested together (a remote store fetches them concurrently)
LARGE_GROUP_BUFFER = 64 << 20
KEEP_GROUP_BYTES = 24 << 20
CHECK_BLOCK = 64 << 10        # divides GROUP_PIECE
BLOCK_TABLES = 4096           # groups whose block CRCs are remembered


class LargeGroups:
    """Checked private copies (or block CRCs) of the large groups that reads cut; thread-safe."""

    def __init__(self, records: RecordSource, groups: GroupTable) -> None:
        self.records = records
        self.groups = groups
        self._large = ByteLRU(LARGE_GROUP_BUFFER)  # checked private copies of large groups reads cut
        self._blocks: OrderedDict[tuple[int, int], list[int]] = OrderedDict()  # CRC per CHECK_BLOCK of huge groups
        self._large_lock = threading.Lock()
        self._loading: dict[tuple[int, int], threading.Lock] = {}

    def read(self, i: int, r: int, g: int, offset: int, length: int, crc: int, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of a large group (0-based ``g`` of image ``i``), from a copy whose CRC
        was checked and that cannot change under the reader.

        The first read of the group streams all of it through the CRC in pieces of
        GROUP_PIECE into a private buffer; later reads are served from that buffer, so
        reading a large file in kernel-sized pieces reads it from the store once. Concurrent
        first reads of one group wait for a single pass."""
        if hi <= lo:
            return b""
        key = (i, g + 1)
        keep = length <= min(KEEP_GROUP_BYTES, self._large.capacity)
        with self._large_lock:
            data = self._large.get(key) if keep else None
            blocks = self._blocks.get(key) if not keep else None
            if data is None and blocks is None:  # concurrent first reads of one group wait for one pass
                busy = self._loading.setdefault(key, threading.Lock())
        if data is None and blocks is None:
            try:
                with busy:
                    with self._large_lock:
                        data, blocks = self._large.peek(key), self._blocks.get(key)
                    if data is None and blocks is None:
                        data, blocks = self._check_streaming(i, r, g, offset, length, crc, keep)
                        with self._large_lock:
                            if keep:
                                self._large.put(key, data)
                            else:
                                self._blocks[key] = blocks
                                while len(self._blocks) > BLOCK_TABLES:
                                    self._blocks.popitem(last=False)
            finally:
                with self._large_lock:
                    self._loading.pop(key, None)
        if data is not None:
            return data[lo:hi]
        return self._checked_blocks(i, r, g, offset, length, blocks, lo, hi)

    def cut_groups(self, image: int, n_groups: int) -> list[tuple[int, bytearray]]:
        """(1-based group, checked bytes) of the image's groups (of ``n_groups``) that reads cut
        and whose private copies are kept: for the mount's compiled path, which then serves
        the rest of the file without reading them again."""
        return [(g, data) for g in range(1, n_groups + 1) if (data := self._large.peek((image, g))) is not None]

    def _check_streaming(self, i: int, r: int, g: int, offset: int, length: int, crc: int,
                               keep: bool) -> tuple[bytearray | None, list[int] | None]:
        """One pass over the whole group that checks its CRC: its bytes (``keep``) in a private
        buffer no one else holds, or else the CRC-32 of each CHECK_BLOCK of it."""
        spans = [Span(r, offset + p, min(GROUP_PIECE, length - p)) for p in range(0, length, GROUP_PIECE)]
        c, pos = 0, 0
        out = bytearray() if keep else None
        blocks: list[int] = []
        for b in range(0, len(spans), GROUP_PIECES_AT_ONCE):
            for piece in self.records.read_spans(spans[b:b + GROUP_PIECES_AT_ONCE]):
                c = zlib.crc32(piece, c)
                pos += len(piece)
                if out is not None:
                    out += piece
                else:
                    with memoryview(piece) as view:
                        blocks += [zlib.crc32(view[q:q + CHECK_BLOCK]) for q in range(0, len(view), CHECK_BLOCK)]
        if c != crc or pos != length:
            raise self.groups.corrupt(i, g + 1, r, offset)
        return (out, None) if keep else (None, blocks)

    def _checked_blocks(self, i: int, r: int, g: int, offset: int, length: int, blocks: list[int],
                        lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of a huge group: the blocks they overlap, each checked against the
        CRC the group's checked pass recorded for it."""
        b0, b1 = lo // CHECK_BLOCK, (hi - 1) // CHECK_BLOCK + 1
        start = b0 * CHECK_BLOCK
        data = self.records.read(r, offset + start, min(length, b1 * CHECK_BLOCK) - start)
        with memoryview(data) as view:
            for b in range(b0, b1):
                q = (b - b0) * CHECK_BLOCK
                if zlib.crc32(view[q:q + CHECK_BLOCK]) != blocks[b]:
                    raise self.groups.corrupt(i, g + 1, r, offset)
            return bytes(view[lo - start:hi - start])
