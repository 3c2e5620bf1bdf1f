"""The scan splitter (pcrfs.jpeg.scans) and robustness of transcode() on hostile input.

Unit tests pin the group structure of libjpeg's standard progressive scripts and
the marker syntax of T.81 Annex B (fill bytes, RSTn, stuffed zeros, truncation).
The hypothesis tests feed mutated and truncated JPEGs to ``scan_ends`` /
``split_groups`` and to ``transcode``: every case must end in success or in the
module's own error type (ScanError / BadImage), within a deadline.
"""
from __future__ import annotations

import io
import shutil
import struct
import subprocess
from datetime import timedelta
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pcrfs.demo import demo_photos
from pcrfs.jpeg import scans, turbojpeg
from pcrfs.jpeg.scans import EOI_BYTES, MAX_SCANS, ScanError, is_progressive, scan_ends, split_groups
from pcrfs.jpeg.transcode import BadImage, TranscodeOptions, transcode



def _fresh_handle() -> None:
    local = getattr(turbojpeg, "_local", None)
    if local is not None:
        local.__dict__.pop("handle", None)


@pytest.fixture(autouse=True)
def fresh_turbojpeg_handle():
    """A fresh per-thread TurboJPEG handle per test: a handle left broken by one test's
    hostile input must not make another test fail (that bug has its own test below)."""
    _fresh_handle()
    yield

# ----------------------------------------------------------------- inputs


@lru_cache(maxsize=None)
def _photo(mode: str, w: int, h: int) -> Image.Image:
    src = Image.fromarray(np.asarray(demo_photos()["chelsea"]))
    return src.resize((w, h), Image.Resampling.LANCZOS).convert(mode)


def _baseline(mode: str = "RGB", w: int = 96, h: int = 72, **kw) -> bytes:
    buf = io.BytesIO()
    kw.setdefault("quality", 90)
    _photo(mode, w, h).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _progressive(data: bytes) -> bytes:
    """The full-fidelity progressive file transcode() produces (groups + EOI)."""
    out = transcode(data, TranscodeOptions())
    return b"".join(out.groups) + EOI_BYTES


@lru_cache(maxsize=None)
def colour_prog() -> bytes:
    return _progressive(_baseline("RGB"))


@lru_cache(maxsize=None)
def grey_prog() -> bytes:
    return _progressive(_baseline("L"))


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


def _markers(data: bytes) -> list[tuple[int, int]]:
    """(offset, marker byte) of every real marker (not FF00, not fill bytes)."""
    out = []
    i = data.find(b"\xff")
    while 0 <= i < len(data) - 1:
        nxt = data[i + 1]
        if nxt not in (0x00, 0xFF):
            out.append((i, nxt))
        i = data.find(b"\xff", i + 1)
    return out


def _collapse_ff(b: bytes) -> bytes:
    while b"\xff\xff" in b:
        b = b.replace(b"\xff\xff", b"\xff")
    return b


def _header_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset, length field) of the marker segments before the first SOS (inclusive)."""
    out, pos = [], 2
    while pos + 4 <= len(data):
        marker = data[pos + 1]
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        out.append((marker, pos, length))
        if marker == scans.SOS:
            break
        pos += 2 + length
    return out


def _sof_offset(data: bytes) -> int:
    for marker, off, _ in _header_segments(data):
        if marker in scans.SOF_MARKERS:
            return off
    raise AssertionError("no SOF")


# ----------------------------------------------------------------- structure


@pytest.mark.parametrize("which, n", [("colour", 10), ("grey", 6)])
def test_group_count_of_standard_progression(which, n):
    data = colour_prog() if which == "colour" else grey_prog()
    assert is_progressive(data)
    groups = split_groups(data)
    assert len(groups) == n
    assert len(scan_ends(data)) == n
    # every group after the first starts with a marker (DHT or SOS), the first with SOI
    assert bytes(groups[0][:2]) == scans.SOI_BYTES
    for g in groups[1:]:
        assert g[0] == 0xFF and g[1] in (0xC4, scans.SOS)


@pytest.mark.parametrize("which", ["colour", "grey"])
def test_groups_concatenate_to_input(which):
    data = colour_prog() if which == "colour" else grey_prog()
    groups = split_groups(data)
    assert all(isinstance(g, memoryview) for g in groups)
    assert all(len(g) > 0 for g in groups)
    assert b"".join(groups) + EOI_BYTES == data
    ends = scan_ends(data)
    assert ends == sorted(ends) and len(set(ends)) == len(ends)
    assert ends[-1] == len(data) - 2


@pytest.mark.parametrize("which", ["colour", "grey"])
def test_every_prefix_plus_eoi_decodes(which):
    data = colour_prog() if which == "colour" else grey_prog()
    groups = split_groups(data)
    full = _decode(data)
    errors = []
    for k in range(1, len(groups) + 1):
        img = _decode(b"".join(groups[:k]) + EOI_BYTES)
        assert img.shape == full.shape and img.dtype == full.dtype
        errors.append(np.abs(img.astype(int) - full.astype(int)).mean())
    assert errors[0] > 1  # DC only: visibly coarser
    assert errors[-1] == 0  # all groups: the full image


def test_baseline_is_one_group():
    data = _baseline("RGB")
    assert not is_progressive(data)
    groups = split_groups(data)
    assert len(groups) == 1
    assert bytes(groups[0]) + EOI_BYTES == data


def test_stuffed_zero_bytes_stay_inside_a_group():
    data = colour_prog()
    groups = split_groups(data)
    # any real photo's entropy data contains stuffed FF00 pairs: make sure this one does
    assert any(b"\xff\x00" in bytes(g) for g in groups)
    for g in groups:
        b = bytes(g)
        assert not b.endswith(b"\xff")


# ----------------------------------------------------------------- fill bytes and RSTn


def test_fill_bytes_before_markers():
    data = colour_prog()
    ends = scan_ends(data)
    # insert 0xFF fill bytes before every header marker and before every marker that ends a scan
    insert_at = sorted({off for _, off, _ in _header_segments(data)} | set(ends))
    out = bytearray()
    prev = 0
    for i, pos in enumerate(insert_at):
        out += data[prev:pos] + b"\xff" * (1 + i % 4)
        prev = pos
    out += data[prev:]
    filled = bytes(out)
    assert len(filled) > len(data)
    groups = split_groups(filled)
    assert len(groups) == len(ends)
    end = scan_ends(filled)[-1]
    assert b"".join(groups) == filled[:end]
    assert filled[end:].lstrip(b"\xff") == b"\xd9"  # fill bytes before EOI belong to no group
    # each group is the old one plus its fill bytes, nothing lost or moved between groups
    for g_new, g_old in zip(groups, split_groups(data)):
        assert _collapse_ff(bytes(g_new)) == _collapse_ff(bytes(g_old))
    for k in range(1, len(groups) + 1):
        assert _decode(b"".join(groups[:k]) + EOI_BYTES).shape == _decode(data).shape
    assert np.array_equal(_decode(filled), _decode(data))


def test_fill_bytes_before_eoi():
    data = colour_prog()
    filled = data[:-2] + b"\xff" * 7 + EOI_BYTES
    assert len(split_groups(filled)) == 10
    assert b"".join(split_groups(filled)) == data[:-2]  # fill bytes belong to the EOI, not a group


def test_restart_markers_in_baseline():
    data = _baseline("RGB", 96, 72, restart_marker_blocks=1)
    rst = [m for _, m in _markers(data) if scans.RST0 <= m <= scans.RST7]
    assert len(rst) > 8  # every MCU: RST0..RST7 all occur, wrapping
    assert set(rst) == set(range(scans.RST0, scans.RST7 + 1))
    assert scan_ends(data) == [len(data) - 2]


@pytest.mark.skipif(shutil.which("jpegtran") is None, reason="jpegtran not installed")
def test_restart_markers_in_progressive():
    base = _baseline("RGB")
    data = subprocess.run(["jpegtran", "-restart", "1", "-progressive", "-optimize"], input=base,
                          capture_output=True, check=True).stdout
    assert sum(1 for _, m in _markers(data) if scans.RST0 <= m <= scans.RST7) > 10
    groups = split_groups(data)
    assert len(groups) == 10
    assert b"".join(groups) + EOI_BYTES == data
    for k in range(1, 11):
        _decode(b"".join(groups[:k]) + EOI_BYTES)
    assert np.array_equal(_decode(data), _decode(base))


def test_tem_marker_is_skipped():
    data = colour_prog()
    sof = _sof_offset(data)
    with_tem = data[:sof] + b"\xff\x01" + data[sof:]
    assert len(split_groups(with_tem)) == 10


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("which", ["colour", "grey"])
def test_every_truncation_is_a_scan_error(which):
    data = colour_prog() if which == "colour" else grey_prog()
    for cut in range(len(data) - 1):
        with pytest.raises(ScanError):
            scan_ends(data[:cut])


@pytest.mark.parametrize("data, msg", [
    (b"", "SOI"),
    (b"\x89PNG\r\n\x1a\n", "SOI"),
    (b"\xff\xd8", "truncated"),
    (b"\xff\xd8\xff\xd9", "no scan"),
    (b"\xff\xd8\x00\x00\xff\xd9", "expected a marker"),
    (b"\xff\xd8\xff\xe0\x00\x00\xff\xd9", "bad segment length"),
    (b"\xff\xd8\xff\xe0\x00\x01\xff\xd9", "bad segment length"),
    (b"\xff\xd8\xff\xe0\xff\xff\x00\x00\xff\xd9", "bad segment length"),
    (b"\xff\xd8\xff\xda\x00\x02\x12\x34", "truncated"),
    (b"\xff\xd8\xff\xda\x00\x02\x12\x34\xff", "truncated"),
    (b"\xff\xd8" + b"\xff" * 10_000, "truncated"),
])
def test_malformed(data, msg):
    with pytest.raises(ScanError, match=msg):
        scan_ends(data)


def test_scan_count_limit():
    data = colour_prog()
    groups = split_groups(data)
    scan = bytes(groups[1])  # DHT + SOS + data: can be repeated syntactically
    ok = bytes(groups[0]) + scan * (MAX_SCANS - 1) + EOI_BYTES
    assert len(scan_ends(ok)) == MAX_SCANS
    with pytest.raises(ScanError, match="more than"):
        scan_ends(bytes(groups[0]) + scan * MAX_SCANS + EOI_BYTES)


def test_trailing_bytes_after_eoi_are_not_a_group():
    data = colour_prog()
    assert scan_ends(data + b"garbage") == scan_ends(data)


# ----------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=200, deadline=timedelta(seconds=2),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@lru_cache(maxsize=None)
def _bases() -> tuple[bytes, ...]:
    """Small real JPEGs: baseline colour/grey, progressive colour/grey, baseline with restarts."""
    return (
        _baseline("RGB", 48, 40),
        _baseline("L", 40, 33),
        _progressive(_baseline("RGB", 48, 40)),
        _progressive(_baseline("L", 40, 33)),
        _baseline("RGB", 40, 24, restart_marker_blocks=2),
    )


@st.composite
def mutated_jpegs(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(_bases())))
    n = len(data)
    kind = draw(st.sampled_from(["flip", "cut_marker", "cut", "seg_length", "dims", "ff_run", "splice"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, n - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "cut_marker":
        offs = [off for off, _ in _markers(bytes(data))]
        off = draw(st.sampled_from(offs)) + draw(st.integers(0, 5))
        data = data[:off]
        if draw(st.booleans()):
            data += EOI_BYTES
    elif kind == "cut":
        data = data[:draw(st.integers(0, n - 1))]
    elif kind == "seg_length":
        segs = _header_segments(bytes(data))
        _, off, _ = draw(st.sampled_from(segs))
        bogus = draw(st.one_of(st.integers(0, 3), st.integers(0, 0xFFFF)))
        data[off + 2:off + 4] = struct.pack(">H", bogus)
    elif kind == "dims":
        off = _sof_offset(bytes(data))
        h = draw(st.one_of(st.sampled_from([0, 1, 0xFFFF]), st.integers(0, 0xFFFF)))
        w = draw(st.one_of(st.sampled_from([0, 1, 0xFFFF]), st.integers(0, 0xFFFF)))
        data[off + 5:off + 9] = struct.pack(">HH", h, w)
    elif kind == "ff_run":
        pos = draw(st.integers(0, n))
        run = b"\xff" * draw(st.integers(1, 200_000))
        data = data[:pos] + run + (data[pos:] if draw(st.booleans()) else b"")
    else:  # splice: random bytes overwrite a stretch
        pos = draw(st.integers(0, n - 1))
        junk = draw(st.binary(min_size=1, max_size=64))
        data[pos:pos + len(junk)] = junk
    return bytes(data)


def _check_split(data: bytes) -> None:
    try:
        ends = scan_ends(data)
    except ScanError:
        with pytest.raises(ScanError):
            split_groups(data)
        return
    assert 1 <= len(ends) <= MAX_SCANS
    assert all(a < b for a, b in zip([0] + ends, ends))
    assert ends[-1] <= len(data) - 2
    groups = split_groups(data)
    assert [len(g) for g in groups] == [b - a for a, b in zip([0] + ends, ends)]
    assert b"".join(groups) == data[:ends[-1]]


@FUZZ
@given(mutated_jpegs())
def test_fuzz_split_mutated(data):
    _check_split(data)


@FUZZ
@given(st.one_of(st.binary(max_size=512), st.binary(max_size=512).map(lambda b: b"\xff\xd8" + b)))
def test_fuzz_split_arbitrary(data):
    _check_split(data)


# libjpeg would allocate coefficient arrays for whatever the mutated header declares:
# a low pixel cap keeps each example fast (the cap is itself under test).
_FUZZ_OPTS = TranscodeOptions(max_pixels=1 << 22)


@FUZZ
@given(mutated_jpegs())
def test_fuzz_transcode_mutated(data):
    try:
        out = transcode(data, _FUZZ_OPTS)
    except BadImage as e:
        assert str(e)  # a one-line reason
        assert "\n" not in str(e)
        return
    assert out.groups and bytes(out.groups[0][:2]) == scans.SOI_BYTES
    full = b"".join(out.groups) + EOI_BYTES
    assert is_progressive(full)
    assert len(split_groups(full)) == len(out.groups)


@FUZZ
@given(mutated_jpegs())
def test_fuzz_hostile_input_does_not_disturb_the_next_image(data):
    """After any input, good or hostile, the next good JPEG on the same thread must come out
    exactly as always. BUG (pcrfs/jpeg/turbojpeg.py, read_header): a header that libjpeg
    rejects leaves the thread's handle broken, and later images fail or get re-encoded."""
    _fresh_handle()  # only this example's input may disturb the handle
    good = _bases()[0]
    reference = _progressive(good)
    try:
        transcode(data, _FUZZ_OPTS)
    except BadImage:
        pass
    out = transcode(good, _FUZZ_OPTS)
    assert not out.reencoded
    assert b"".join(out.groups) + EOI_BYTES == reference


def test_transcode_every_cut_at_a_marker():
    """Cut a colour baseline and a progressive file at each marker: BadImage, never another error;
    with an EOI appended the result may succeed but must never raise anything else."""
    for base in (_bases()[0], _bases()[2]):
        for off, _ in _markers(base):
            for tail in (b"", EOI_BYTES):
                data = base[:off] + tail
                try:
                    out = transcode(data, _FUZZ_OPTS)
                except BadImage:
                    continue
                assert tail == EOI_BYTES and out.groups


def test_transcode_endless_ff_run_is_bounded():
    base = _bases()[0]
    for data in (base[:-2] + b"\xff" * 1_000_000, base + b"\xff" * 1_000_000,
                 b"\xff\xd8" + b"\xff" * 1_000_000):
        try:
            transcode(data, _FUZZ_OPTS)
        except BadImage:
            pass
