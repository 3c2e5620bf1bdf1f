"""Splitting a JPEG at its scan boundaries into scan groups.

Group 1 is everything from SOI through the entropy-coded data of the first scan
(tables, SOF, first SOS). Group j > 1 is every marker segment after scan j-1 (for
a progressive file typically the DHT for scan j) plus scan j itself. So the
concatenation of groups 1..k followed by EOI is a well-formed JPEG for every k.
Marker syntax follows ITU-T T.81 Annex B.
"""
from __future__ import annotations

# T.81 Table B.1 marker codes (the byte after 0xFF)
MARKER_PREFIX = 0xFF
SOI = 0xD8  # start of image
EOI = 0xD9  # end of image
SOS = 0xDA  # start of scan: header segment followed by entropy-coded data
RST0, RST7 = 0xD0, 0xD7  # restart markers, standalone, only inside entropy-coded data
TEM = 0x01  # standalone, no length
STUFFED_ZERO = 0x00  # FF 00 inside entropy-coded data is a data byte 0xFF (B.1.1.5)
SOF_PROGRESSIVE = (0xC2, 0xC6, 0xCA, 0xCE)  # B.1.1.3: progressive DCT frames (Huffman, arithmetic)
SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})

EOI_BYTES = bytes((MARKER_PREFIX, EOI))
SOI_BYTES = bytes((MARKER_PREFIX, SOI))

# A sane upper bound: libjpeg's standard scripts use 6 (grey), 10 (YCbCr) or up to
# 2 + 4*ncomps scans; libjpeg-turbo itself refuses > 500 with TJFLAG_LIMITSCANS.
MAX_SCANS = 64


class ScanError(ValueError):
    """The bytes are not a JPEG this splitter can cut into scan groups."""


def _entropy_end(data: bytes, pos: int) -> int:
    """Offset of the marker that ends the entropy-coded data starting at ``pos``."""
    n = len(data)
    while True:
        i = data.find(b"\xff", pos)
        if i < 0 or i + 1 >= n:
            raise ScanError("truncated: entropy-coded data runs to the end of the file")
        nxt = data[i + 1]
        if nxt == STUFFED_ZERO or RST0 <= nxt <= RST7:
            pos = i + 2
            continue
        return i


def scan_ends(data: bytes) -> list[int]:
    """End offset (exclusive) of every scan's entropy-coded data, in file order.

    Raises ScanError for anything that is not a complete JPEG ending in EOI.
    """
    return [end for _sos, end in _scans(data)]


def scan_components(data: bytes) -> list[tuple[int, ...]]:
    """The component identifiers each scan codes, in file order (one tuple per scan).

    From each SOS header (B.2.3: marker, Ls, Ns, then Ns pairs of Cs and Td/Ta); the
    identifiers are those of the frame header's components (SOF, B.2.2).
    Raises ScanError as :func:`scan_ends` does.
    """
    out = []
    for sos, end in _scans(data):
        ns = data[sos + 4] if sos + 4 < end else 0
        if ns == 0 or sos + 5 + 2 * ns > end:
            raise ScanError(f"SOS header at offset {sos} is too short for its components")
        out.append(tuple(data[sos + 5 + 2 * j] for j in range(ns)))
    return out


def _scans(data: bytes) -> list[tuple[int, int]]:
    """(offset of the SOS marker, end of the entropy-coded data) of every scan."""
    n = len(data)
    if data[:2] != SOI_BYTES:
        raise ScanError("not a JPEG: missing SOI marker")
    pos = 2
    ends: list[tuple[int, int]] = []
    while True:
        if pos + 1 >= n:
            raise ScanError("truncated: no EOI marker")
        if data[pos] != MARKER_PREFIX:
            raise ScanError(f"expected a marker at offset {pos}")
        # B.1.1.2: any marker may be preceded by fill bytes 0xFF
        while pos + 1 < n and data[pos + 1] == MARKER_PREFIX:
            pos += 1
        if pos + 1 >= n:
            raise ScanError("truncated inside a run of fill bytes")
        marker = data[pos + 1]
        if marker == EOI:
            break
        if marker == TEM or RST0 <= marker <= RST7:
            pos += 2
            continue
        if pos + 4 > n:
            raise ScanError("truncated marker segment")
        length = int.from_bytes(data[pos + 2:pos + 4], "big")  # includes the 2 length bytes
        seg_end = pos + 2 + length
        if length < 2 or seg_end > n:
            raise ScanError(f"bad segment length {length} for marker 0x{marker:02X} at offset {pos}")
        if marker == SOS:
            end = _entropy_end(data, seg_end)
            ends.append((pos, end))
            pos = end
            if len(ends) > MAX_SCANS:
                raise ScanError(f"more than {MAX_SCANS} scans")
        else:
            pos = seg_end
    if not ends:
        raise ScanError("no scan (SOS) in the file")
    return ends


def split_groups(data: bytes) -> list[memoryview]:
    """The scan groups of ``data`` (views into it, no copies). EOI is not included."""
    view = memoryview(data)
    groups = []
    start = 0
    for end in scan_ends(data):
        groups.append(view[start:end])
        start = end
    return groups


def is_progressive(data: bytes) -> bool:
    """True if the frame header (SOF) declares progressive DCT coding."""
    n = len(data)
    pos = 2
    while pos + 4 <= n and data[pos] == MARKER_PREFIX:
        marker = data[pos + 1]
        if marker in SOF_MARKERS:
            return marker in SOF_PROGRESSIVE
        if marker == SOS or marker == EOI:
            return False
        if marker == MARKER_PREFIX:
            pos += 1
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return False
