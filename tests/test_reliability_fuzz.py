"""Fuzzing `convert` end to end with hostile images, in a memory-bounded child process.

test_scans.py fuzzes the splitter and transcode() in process. Here every case goes
through the whole conversion (listing, transcoding, record writing, index,
manifest), in a child process whose address space is capped (RLIMIT_AS) and
with a time bound per case. Each case is a tree holding one mutated file and one
good "control" JPEG converted after it on the same worker thread, and must end
with:

* the conversion returning (no exception, no crash, no hang, memory within the cap);
* a store that opens, with the control image byte-identical to its normal conversion
  (hostile input must not disturb the next image);
* the mutated file either stored -- every fidelity a valid JPEG of the stated size,
  pixel-identical to the source for a lossless transcode -- or listed in the report
  with a one-line reason; never both, never neither;
* the source file unchanged.
"""
from __future__ import annotations

import io
import json
import os
import resource
import select
import shutil
import struct
import subprocess
import sys
import time
import traceback
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from corpus import jpeg_segments
from pcrfs.demo import demo_photos
from pcrfs.jpeg.scans import EOI_BYTES, SOI_BYTES, ScanError, is_progressive, scan_ends, split_groups
from pcrfs.jpeg.transcode import BadImage, TranscodeOptions, transcode
from pcrfs.store.read.reader import open_store
from reliability import budget, figures, pcrfs_argv, run_limited, scratch_dir  # noqa: F401 (fixture)

CASE_SECONDS = 20.0   # time bound for one case (a tiny tree) on a loaded 2-core machine
FUZZ_NAME = "a/fuzz.jpg"
CONTROL_NAME = "b/control.jpg"

# T.81 Table B.1 marker codes used by the mutations
SOF_CODES = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
DHT, DQT, DRI, SOS, COM, APP0 = 0xC4, 0xDB, 0xDD, 0xDA, 0xFE, 0xE0
RST0 = 0xD0


# ---- inputs ---------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _photo(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.asarray(demo_photos()["chelsea"])).resize((w, h), Image.Resampling.LANCZOS)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _cjpeg_arithmetic(im: Image.Image) -> bytes | None:
    if not shutil.which("cjpeg"):
        return None
    p = subprocess.run(["cjpeg", "-arithmetic"], input=_encode(im, "PPM"), capture_output=True)
    return p.stdout if p.returncode == 0 and p.stdout[:2] == SOI_BYTES else None


@lru_cache(maxsize=None)
def bases() -> dict[str, bytes]:
    """Small real images of every kind convert meets: JPEG variants and other formats."""
    rgb = _photo(48, 40)
    exif = Image.Exif()
    exif[0x010F] = "fuzz"
    out = {
        "baseline": _encode(rgb, "JPEG", quality=90),
        "grey": _encode(_photo(40, 33).convert("L"), "JPEG", quality=90),
        "progressive": _encode(rgb, "JPEG", quality=90, progressive=True),
        "restart": _encode(rgb, "JPEG", quality=90, restart_marker_blocks=2),
        "ycc444": _encode(rgb, "JPEG", quality=90, subsampling=0),
        "cmyk": _encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "metadata": _encode(rgb, "JPEG", quality=90, exif=exif.tobytes(), comment=b"fuzz comment"),
        "png": _encode(rgb, "PNG"),
        "png16": _encode(Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)), "PNG"),
        "gif": _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "GIF"),
        "bmp": _encode(rgb, "BMP"),
        "tiff": _encode(rgb, "TIFF"),
    }
    arith = _cjpeg_arithmetic(rgb)
    if arith is not None:
        out["arithmetic"] = arith
    if features.check("webp"):
        out["webp"] = _encode(rgb, "WEBP", quality=80)
    return out


def _is_jpeg(data: bytes) -> bool:
    return data[:2] == SOI_BYTES


def _markers(data: bytes) -> list[int]:
    """Offsets of every real marker (FF followed by neither 00 nor FF)."""
    out, i = [], data.find(b"\xff")
    while 0 <= i < len(data) - 1:
        if data[i + 1] not in (0x00, 0xFF):
            out.append(i)
        i = data.find(b"\xff", i + 1)
    return out


def _segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset, total length) of the header segments up to and including the first SOS."""
    try:
        return jpeg_segments(data)
    except (ValueError, struct.error):
        return []


def _sos_headers(data: bytes) -> list[int]:
    """Offsets of every SOS marker in the file (progressive files have several)."""
    return [off for off in _markers(data) if data[off + 1] == SOS]


# ---- mutations ---------------------------------------------------------------------------------------

JPEG_KINDS = ("flip", "flip_header", "cut", "cut_marker", "seg_length", "dims", "sof_fields", "sos_fields",
              "table_fields", "dri", "ff_run", "marker_run", "rst_in_scan", "dup_segment", "drop_segment",
              "swap_segments", "splice", "concat")
OTHER_KINDS = ("flip", "cut", "splice", "dims", "concat")
HUGE_SIDES = (0, 1, 8_000, 13_000, 13_400, 40_000, 0xFFFF)


def _flip(draw, data: bytearray, lo: int, hi: int) -> None:
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(lo, hi - 1))] ^= 1 << draw(st.integers(0, 7))


def _side(draw) -> int:
    return draw(st.one_of(st.sampled_from(HUGE_SIDES), st.integers(0, 0xFFFF)))


def _mutate_jpeg(draw, data: bytearray, kind: str) -> bytearray:
    segs = _segments(bytes(data)) or [(0xD8, 0, 2)]
    header_end = segs[-1][1] + segs[-1][2]
    if kind == "flip":
        _flip(draw, data, 0, len(data))
    elif kind == "flip_header":
        _flip(draw, data, 0, header_end)
    elif kind == "cut":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "cut_marker":
        data = data[:draw(st.sampled_from(_markers(bytes(data)))) + draw(st.integers(0, 5))]
        if draw(st.booleans()):
            data += EOI_BYTES
    elif kind == "seg_length":
        _, off, _ = draw(st.sampled_from(segs))
        data[off + 2:off + 4] = struct.pack(">H", draw(st.one_of(st.integers(0, 3), st.integers(0, 0xFFFF))))
    elif kind == "dims":
        sof = [s for s in segs if s[0] in SOF_CODES]
        if sof:  # SOFn: FF Cn | Lf(2) | P(1) | Y(2) | X(2) | Nf(1) | components (T.81 B.2.2)
            off = sof[0][1]
            data[off + 5:off + 9] = struct.pack(">HH", _side(draw), _side(draw))
    elif kind == "sof_fields":
        sof = [s for s in segs if s[0] in SOF_CODES]
        if sof:
            off, length = sof[0][1], sof[0][2]
            field = draw(st.integers(off + 4, off + length - 1))  # P, Y, X, Nf or a component's C/H,V/Tq
            data[field] = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 4, 12, 16, 0x11, 0x22, 0x44, 0xFF]),
                                         st.integers(0, 255)))
    elif kind == "sos_fields":  # SOS: Ls(2) Ns(1) {Cs Td/Ta}*Ns Ss Se Ah/Al (T.81 B.2.3)
        off = draw(st.sampled_from(_sos_headers(bytes(data)) or [segs[-1][1]]))
        length = int.from_bytes(data[off + 2:off + 4], "big")
        field = draw(st.integers(off + 4, min(off + 1 + length, len(data) - 1)))
        data[field] = draw(st.one_of(st.sampled_from([0, 1, 5, 10, 63, 64, 0x0F, 0xF0, 0xFF]), st.integers(0, 255)))
    elif kind == "table_fields":
        tables = [s for s in segs if s[0] in (DHT, DQT)]
        if tables:
            _, off, length = draw(st.sampled_from(tables))
            data[draw(st.integers(off + 4, off + length - 1))] = draw(st.integers(0, 255))
    elif kind == "dri":
        interval = draw(st.sampled_from([0, 1, 2, 7, 0xFFFF]))
        pos = segs[-1][1]
        data[pos:pos] = b"\xff\xdd\x00\x04" + struct.pack(">H", interval)
    elif kind == "ff_run":
        pos = draw(st.integers(0, len(data)))
        data[pos:pos] = b"\xff" * draw(st.integers(1, 200_000))
    elif kind == "marker_run":
        seg = draw(st.sampled_from([
            b"\xff\xfe\x00\x04hi",                                # COM
            bytes([0xFF, APP0 + draw(st.integers(0, 15))]) + b"\x00\x02",  # empty APPn
            bytes([0xFF, RST0 + draw(st.integers(0, 7))]),       # stray RSTn
            b"\xff\x01",                                         # TEM
        ] + [bytes(data[o:o + n]) for m, o, n in segs if m in (DHT, DQT)]))
        count = draw(st.one_of(st.integers(1, 50), st.sampled_from([5_000, 30_000])))
        pos = draw(st.sampled_from([2, segs[-1][1], max(len(data) - 2, 2)]))
        data[pos:pos] = seg * count
    elif kind == "rst_in_scan":
        start = header_end
        for _ in range(draw(st.integers(1, 20))):
            pos = draw(st.integers(start, max(start, len(data) - 3)))
            data[pos:pos] = bytes([0xFF, RST0 + draw(st.integers(0, 7))])
    elif kind in ("dup_segment", "drop_segment", "swap_segments"):
        movable = [s for s in segs if s[0] != 0xD8 and s[2] >= 2]
        if movable:
            a = draw(st.sampled_from(movable))
            seg_a = bytes(data[a[1]:a[1] + a[2]])
            if kind == "dup_segment":
                data[a[1]:a[1]] = seg_a * draw(st.integers(1, 3))
            elif kind == "drop_segment":
                del data[a[1]:a[1] + a[2]]
            else:
                b = draw(st.sampled_from(movable))
                first, second = sorted([a, b], key=lambda s: s[1])
                if first[1] + first[2] <= second[1]:
                    seg1 = bytes(data[first[1]:first[1] + first[2]])
                    seg2 = bytes(data[second[1]:second[1] + second[2]])
                    data[second[1]:second[1] + second[2]] = seg1
                    data[first[1]:first[1] + first[2]] = seg2
    elif kind == "splice":
        pos = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=1, max_size=64))
        data[pos:pos + len(junk)] = junk
    elif kind == "concat":
        data += draw(st.sampled_from([bases()["baseline"], bases()["progressive"], b"\x00" * 100, b"\xff" * 7]))
    return data


def _mutate_other(draw, data: bytearray, kind: str, name: str) -> bytearray:
    if kind == "flip":
        _flip(draw, data, 0, len(data))
    elif kind == "cut":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "splice":
        pos = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=1, max_size=64))
        data[pos:pos + len(junk)] = junk
    elif kind == "dims":
        w, h = _side(draw), _side(draw)
        if name.startswith("png"):  # IHDR width/height, then its CRC so the chunk stays valid
            data[16:24] = struct.pack(">II", w, h)
            data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        elif name == "gif":  # logical screen and first image descriptor share the header's place
            data[6:10] = struct.pack("<HH", w, h)
        elif name == "bmp":  # BITMAPINFOHEADER width/height (signed)
            data[18:26] = struct.pack("<ii", w, h if draw(st.booleans()) else -h)
        else:
            _flip(draw, data, 0, min(len(data), 64))
    elif kind == "concat":
        data += draw(st.sampled_from([bytes(data), b"\x00" * 100, bases()["baseline"]]))
    return data


@st.composite
def hostile_images(draw) -> tuple[str, str, bytes]:
    """(base name, mutation kind, bytes) -- a real image mutated one way."""
    name = draw(st.sampled_from(sorted(bases())))
    data = bytearray(bases()[name])
    if _is_jpeg(data):
        kind = draw(st.sampled_from(JPEG_KINDS))
        data = _mutate_jpeg(draw, data, kind)
    else:
        kind = draw(st.sampled_from(OTHER_KINDS))
        data = _mutate_other(draw, data, kind, name)
    return name, kind, bytes(data)


# ---- the conversion worker (a child process with a capped address space) ------------------------------

def worker_main() -> None:
    """Child side: one JSON request per line on stdin, one JSON reply per line on stdout."""
    from pcrfs.convert import convert

    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.monotonic()
        try:
            res = convert(Path(req["src"]), Path(req["store"]), workers=1,
                          opts=TranscodeOptions(keep_metadata=req["keep_metadata"]))
            reply = {"ok": True, "images": res.images, "bad": res.bad, "skipped": res.skipped}
        except BaseException:  # noqa: BLE001 -- anything escaping convert is what we are looking for
            reply = {"ok": False, "error": traceback.format_exc()}
        reply["seconds"] = time.monotonic() - t0
        reply["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class ConvertWorker:
    """Parent side: runs conversions in the child; restarts it after a crash or a hang."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def _start(self) -> None:
        from reliability import popen_limited

        self.proc = popen_limited(
            [sys.executable, "-c", "from test_reliability_fuzz import worker_main; worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "ab"), text=True, bufsize=1)

    def convert(self, src: Path, store: Path, keep_metadata: bool) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.restarts += 1
            self._start()
        req = {"src": str(src), "store": str(store), "keep_metadata": keep_metadata}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], CASE_SECONDS)
        if not ready:
            self.close()
            return {"ok": False, "error": f"hang: no answer within {CASE_SECONDS:.0f}s"}
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            tail = self.log.read_bytes()[-3000:].decode(errors="replace")
            self.proc = None
            return {"ok": False, "error": f"the converting process died (status {rc}); its stderr:\n{tail}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                f.close()
            self.proc = None


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = ConvertWorker(tmp_path_factory.mktemp("fuzzlog") / "worker.stderr")
    yield w
    w.close()


@lru_cache(maxsize=None)
def control() -> tuple[bytes, bytes]:
    """A good JPEG and its full-fidelity file as a normal conversion stores it."""
    data = bases()["baseline"]
    return data, b"".join(transcode(data, TranscodeOptions()).groups) + EOI_BYTES


# ---- checks -------------------------------------------------------------------------------------------

def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


def check_stored(store, i: int, source: bytes, keep_metadata: bool = False) -> None:
    """A stored image is a valid JPEG at every fidelity, and lossless when it was transcoded."""
    n = store.n_groups(i)
    full = store.read(i, store.num_groups)
    assert full[:2] == SOI_BYTES and full[-2:] == EOI_BYTES
    assert len(split_groups(full)) == n
    for k in range(1, store.num_groups + 1):
        data = store.read(i, k)
        assert len(data) == store.size(i, k)
        assert _pixels(data).shape == _pixels(full).shape, f"fidelity {k} does not decode like the full image"
    if not store.is_reencoded(i):
        check_lossless(full, source, keep_metadata)


def check_lossless(full: bytes, source: bytes, keep_metadata: bool) -> None:
    """The stored file is what jpegtran makes of the source: the same DCT coefficients.

    Pixels are not the test: a source that is itself an incomplete progressive JPEG
    (cut between two scans) decodes with libjpeg's block smoothing, which its complete
    transcode no longer gets, so identical coefficients can decode to different pixels.
    """
    if shutil.which("jpegtran") is None:
        if not is_progressive(source):
            assert np.array_equal(_pixels(full), _pixels(source)), "lossless transcode changed the pixels"
        return
    copy = "all" if keep_metadata else "none"
    ref = subprocess.run(["jpegtran", "-copy", copy, "-optimize", "-progressive"], input=source,
                         capture_output=True, timeout=60)
    assert ref.returncode == 0 and ref.stdout == full, "the transcode differs from jpegtran's"


def check_case(reply: dict, store_dir: Path, source: bytes, src_file: Path, keep_metadata: bool) -> str:
    """Everything one case must satisfy; returns the outcome (stored / bad / skipped)."""
    assert reply["ok"], reply["error"]
    assert reply["seconds"] < CASE_SECONDS
    assert src_file.read_bytes() == source, "the source file was modified"
    bad = {b["path"]: b["reason"] for b in reply["bad"]}
    skipped = {b["path"]: b["reason"] for b in reply["skipped"]}
    with open_store(store_dir) as s:
        paths = set(s.paths())
        ctl = s.find(CONTROL_NAME)
        assert not s.is_reencoded(ctl)
        assert s.read(ctl, s.num_groups) == control()[1], "the control image came out different"
        outcomes = [FUZZ_NAME in paths, FUZZ_NAME in bad, FUZZ_NAME in skipped]
        assert sum(outcomes) == 1, (outcomes, bad, skipped)
        if FUZZ_NAME in bad:
            reason = bad[FUZZ_NAME]
            assert reason.strip() and "\n" not in reason, repr(reason)
            assert "Traceback" not in reason
            return "bad"
        if FUZZ_NAME in skipped:
            return "skipped"
        check_stored(s, s.find(FUZZ_NAME), source, keep_metadata)
        return "stored"


def run_case(worker: ConvertWorker, root: Path, data: bytes, keep_metadata: bool) -> tuple[str, float]:
    shutil.rmtree(root, ignore_errors=True)
    src = root / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    src_file = src / FUZZ_NAME
    src_file.write_bytes(data)
    (src / CONTROL_NAME).write_bytes(control()[0])
    reply = worker.convert(src, root / "out.pcr", keep_metadata)
    try:
        return check_case(reply, root / "out.pcr", data, src_file, keep_metadata), reply.get("seconds", 0.0)
    except AssertionError:
        kept = Path(os.environ.get("PCRFS_FUZZ_KEEP", "/tmp")) / f"pcrfs-fuzz-failure-{os.getpid()}.bin"
        kept.write_bytes(data)
        print(f"failing input kept in {kept}")
        raise


# ---- tests ----------------------------------------------------------------------------------------------

@budget(fast=60, slow=2500)
def test_fuzz_convert_end_to_end(worker, figures, budget):
    counts = {"stored": 0, "bad": 0, "skipped": 0}
    slowest = [0.0]
    kinds: set[str] = set()
    with scratch_dir("pcrfs-fuzz-") as scratch:
        @settings(max_examples=budget, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.large_base_example])
        @given(case=hostile_images(), keep_metadata=st.booleans())
        def case(case, keep_metadata):
            base, kind, data = case
            kinds.add(f"{base}/{kind}")
            outcome, seconds = run_case(worker, scratch / "case", data, keep_metadata)
            counts[outcome] += 1
            slowest[0] = max(slowest[0], seconds)

        try:
            case()
        finally:
            tried = sum(counts.values())
            figures.add("fuzz", convert_cases=tried, convert_cases_stored=counts["stored"],
                        convert_cases_rejected=counts["bad"] + counts["skipped"],
                        max_case_seconds=round(slowest[0], 3), worker_restarts=worker.restarts)
    assert worker.restarts == 0
    assert counts["bad"] > 0 and counts["stored"] > 0  # the generator reaches both outcomes


def _cut_tree(src: Path) -> dict[str, bytes]:
    """Every JPEG base cut at every marker (with and without an EOI appended), each followed
    in listing order by a copy of the control image."""
    files = {}
    for name, data in sorted(bases().items()):
        if not _is_jpeg(data):
            continue
        for off in _markers(data):
            for tail in (b"", EOI_BYTES):
                stem = f"{name}_{off:06d}{'_eoi' if tail else ''}"
                files[f"cut/{stem}_a.jpg"] = data[:off] + tail
                files[f"cut/{stem}_b_control.jpg"] = control()[0]
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return files


@budget(fast=1, slow=3)
def test_every_cut_at_every_marker_through_the_cli(tmp_path, figures, budget):
    """The real command, two worker threads, hundreds of truncated files interleaved with good
    ones: it finishes in bounded time and memory, exits 0 with --skip-bad, stores every good file
    exactly as a clean conversion does and accounts for every truncated one."""
    src = tmp_path / "src"
    files = _cut_tree(src)
    for run in range(budget):  # repeated runs: thread interleavings differ
        store = tmp_path / f"out{run}.pcr"
        t0 = time.monotonic()
        res = run_limited(pcrfs_argv("convert", src, store, "-j", "2", "-q", "--skip-bad",
                                     "--record-size", "256K"), timeout=300)
        seconds = time.monotonic() - t0
        assert res.returncode == 0, res.stderr[-3000:]
        assert "Traceback" not in res.stderr
        report = json.loads((store / "report.json").read_text())
        bad = {b["path"] for b in report["bad"]}
        with open_store(store) as s:
            stored = set(s.paths())
            for rel, data in files.items():
                if rel.endswith("_control.jpg"):
                    assert s.read(rel, s.num_groups) == control()[1], rel
                    continue
                assert (rel in stored) != (rel in bad), rel
                if rel in stored:
                    check_stored(s, s.find(rel), data)
        verify = run_limited(pcrfs_argv("verify", store, "-q"), timeout=120)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        figures.add("fuzz", cli_cut_files=len(files) // 2, cli_cut_rejected=len(bad),
                    max_cli_run_seconds=round(seconds, 2))
        shutil.rmtree(store)


def _check_split(data: bytes) -> None:
    try:
        ends = scan_ends(data)
    except ScanError:
        return
    groups = split_groups(data)
    assert b"".join(groups) == data[:ends[-1]]
    assert [len(g) for g in groups] == [b - a for a, b in zip([0] + ends, ends)]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")  # Pillow on broken TIFF/EXIF
def test_split_and_transcode_in_process_full_budget(figures):
    """The full budget for the in-process properties test_scans.py checks with 200 examples,
    with this module's richer mutations (table/scan fields, marker runs, segment shuffles)."""
    opts = TranscodeOptions(max_pixels=1 << 22)  # in process: no RLIMIT_AS, so keep the decoder small
    tried = [0]

    @settings(max_examples=6000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(case=hostile_images())
    def case(case):
        tried[0] += 1
        _, _, data = case
        _check_split(data)
        try:
            out = transcode(data, opts)
        except BadImage as e:
            assert str(e) and "\n" not in str(e)
            return
        assert len(split_groups(b"".join(out.groups) + EOI_BYTES)) == len(out.groups)

    try:
        case()
    finally:
        figures.add("fuzz", in_process_cases=tried[0])
