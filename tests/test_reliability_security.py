"""Security: nothing escapes the source tree or the mount, nothing in a store executes.

* the source tree: symlinks that escape (relative ``..`` chains, absolute, through
  other links, loops, to devices), FIFOs and sockets are refused without being
  opened; a file swapped for an escaping symlink after the listing is not followed;
* names: ``..``/absolute lookups find nothing; names that are not valid UTF-8 (and
  other awkward bytes) survive convert -> mount -> readdir/open byte for byte; a store
  whose index holds non-canonical names is refused;
* the store is only ever opened read-only (descriptors, memory maps, a read-only
  filesystem), ``allow_other`` is never on unless asked for (also not through a store
  path with a comma), and neither the manifest (YAML tags, alias bombs) nor the index
  (pickled .npy) can run code.
"""
from __future__ import annotations

import ast
import errno
import gc
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mountutil import Mounts, fuse_unavailable, pcrfs_cli
from pcrfs.cli import main as cli_main
from pcrfs.convert import convert, list_sources
from pcrfs.fuse import mounting
from pcrfs.store import format as fmt
from pcrfs.store.format.index import file_crc32
from pcrfs.store.read.reader import StoreError, open_store
from pcrfs.store.read.verify import verify_store
from pcrfs.store.write.writer import ImageEntry, StoreWriter
from reliability import REPO, pcrfs_argv, read_all_files, run_limited, tmpfs_unavailable, views

needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setuid children)")
needs_mount = pytest.mark.skipif(tmpfs_unavailable() is not None, reason=f"bind mounts: {tmpfs_unavailable()}")
NOBODY = 65534


def _jpeg(demo_src: Path, n: int = 0) -> bytes:
    return sorted((demo_src / "cat").iterdir())[n].read_bytes()


def _stored_form(jpeg: bytes) -> bytes:
    """What a store serves at full fidelity for this source JPEG."""
    from pcrfs.jpeg.scans import EOI_BYTES
    from pcrfs.jpeg.transcode import TranscodeOptions, transcode

    return b"".join(transcode(jpeg, TranscodeOptions()).groups) + EOI_BYTES


# ---- the source tree ----------------------------------------------------------------------------

def test_escaping_links_and_special_files_are_refused_unopened(demo_src, tmp_path):
    """Every way out of SRC through a link is refused and reported, special files are skipped,
    and none of them is ever opened (a FIFO would block the conversion forever)."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "cls" / "deep").mkdir(parents=True)
    outside.mkdir()
    secret = _jpeg(demo_src, 1)
    (outside / "secret.jpg").write_bytes(secret)
    (src / "cls" / "ok.jpg").write_bytes(_jpeg(demo_src, 0))
    links = {
        "cls/dotdot.jpg": "../../outside/secret.jpg",          # relative, climbs out
        "cls/deep/dotdot2.jpg": "../../../outside/secret.jpg",
        "cls/absolute.jpg": str(outside / "secret.jpg"),
        "cls/chain.jpg": "dotdot.jpg",                          # a link to a link that escapes
        "cls/loop_a.jpg": "loop_b.jpg",
        "cls/loop_b.jpg": "loop_a.jpg",
        "cls/dev_zero.jpg": "/dev/zero",                        # endless bytes if ever read
        "cls/proc.jpg": "/proc/self/environ",
        "cls/back_inside.jpg": "../cls/ok.jpg",                 # climbs out and back in: fine
        "up": "..",                                             # a directory link to the parent
    }
    for rel, target in links.items():
        os.symlink(target, src / rel)
    os.mkfifo(src / "cls" / "fifo.jpg")
    os.symlink("fifo.jpg", src / "cls" / "to_fifo.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "cls" / "socket.jpg"))
    try:
        res = run_limited(pcrfs_argv("convert", src, tmp_path / "s.pcr", "-q", "-j", "2"), timeout=60)
    finally:
        sock.close()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    report = json.loads((tmp_path / "s.pcr" / fmt.REPORT).read_text())
    refused = {p["path"] for p in report["bad"] + report["skipped"]}
    with open_store(tmp_path / "s.pcr") as s:
        assert sorted(s.paths()) == ["cls/back_inside.jpg", "cls/ok.jpg"]
        stored = {s.read(i, s.num_groups) for i in range(len(s))}
    escaping = set(links) - {"cls/back_inside.jpg"}
    assert escaping | {"cls/fifo.jpg", "cls/to_fifo.jpg", "cls/socket.jpg"} == refused
    assert _stored_form(secret) not in stored


def test_file_swapped_for_escaping_link_after_listing_is_not_followed(demo_src, tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "cls").mkdir(parents=True)
    outside.mkdir()
    secret = _jpeg(demo_src, 3)
    (outside / "secret.jpg").write_bytes(secret)
    (src / "cls" / "a.jpg").write_bytes(_jpeg(demo_src, 0))
    (src / "cls" / "b.jpg").write_bytes(_jpeg(demo_src, 1))
    listing = list_sources(src)
    (src / "cls" / "b.jpg").unlink()
    os.symlink(outside / "secret.jpg", src / "cls" / "b.jpg")  # the race, made certain
    res = convert(src, tmp_path / "s.pcr", listing=listing, workers=1)
    with open_store(tmp_path / "s.pcr") as s:
        stored = {s.read(i, s.num_groups) for i in range(len(s))}
    assert _stored_form(secret) not in stored, "the file outside SRC was converted"
    assert "cls/b.jpg" in {p["path"] for p in res.bad}


# ---- names ----------------------------------------------------------------------------------------

def test_dotdot_and_absolute_lookups_find_nothing(demo_store, tmp_path):
    from pcrfs.access.views import ViewTree

    with open_store(demo_store) as s:
        real = s.path(0)
        cls, name = real.split("/")
        for probe in (f"../{real}", f"{cls}/../{real}", f"{cls}/./{name}", f"./{real}", f"{cls}//{name}",
                      "/etc/passwd", "../../../../etc/passwd", "..", ".", f"{real}/..", f"{cls}/{name}\0"):
            with pytest.raises(KeyError):
                s.find(probe)
        tree = ViewTree(s)
        for probe in (f"/scan1/../scan1/{real}", f"/scan1/{cls}/../{real}", "/../etc/passwd", "/scan1/..",
                      f"/scan1/./{real}", f"/full/{cls}/{name}/..", "/.pcrfs/../scan1"):
            with pytest.raises(FileNotFoundError):
                tree.resolve(probe)
    res = run_limited(pcrfs_argv("get", demo_store, "../../../../etc/passwd", "-o", tmp_path / "out"), timeout=60)
    assert res.returncode == 1 and "no image" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


AWKWARD_NAMES = [b"bad\xff.jpg", b"latin1 \xe9t\xe9.jpg", b"new\nline.jpg", b"back\\slash.jpg", b"-leading.jpg",
                 b"comma,allow_other.jpg", b"percent %s %n.jpg", b"x" * 251 + b".jpg", "ünï €.jpg".encode()]
AWKWARD_DIRS = [b"cl\xffass", b"plain"]


@needs_fuse
def test_awkward_names_survive_convert_mount_readdir_and_open(demo_src, tmp_path, mounts):
    """Names that are not valid UTF-8, carry control characters, commas, percent signs or are
    255 bytes long: the mount lists exactly the source's raw bytes and serves the right image
    under each, and `pcrfs get` finds them."""
    src = tmp_path / "src"
    bsrc = os.fsencode(src)
    rel_names = []
    for d in AWKWARD_DIRS:
        os.makedirs(os.path.join(bsrc, d))
        for n, name in enumerate(AWKWARD_NAMES):
            with open(os.path.join(bsrc, d, name), "wb") as f:
                f.write(_jpeg(demo_src, n % 10))
            rel_names.append(d + b"/" + name)
    store = tmp_path / "s.pcr"
    res = convert(src, store, workers=2)
    assert res.images == len(rel_names) and not res.bad
    s = open_store(store)
    info = mounts.mount(store, "m")
    mnt = os.fsencode(info.mountpoint)
    for view, k in views(s):
        assert sorted(os.listdir(os.path.join(mnt, view.encode()))) == sorted(AWKWARD_DIRS)
        for d in AWKWARD_DIRS:
            assert sorted(os.listdir(os.path.join(mnt, view.encode(), d))) == sorted(AWKWARD_NAMES)
    for rel in rel_names:
        i = s.find(os.fsdecode(rel))
        src_bytes = open(os.path.join(bsrc, rel), "rb").read()
        assert int(s.index.images[i]["src_size"]) == len(src_bytes)
        for view, k in views(s):
            with open(os.path.join(mnt, view.encode(), rel), "rb") as f:
                assert f.read() == s.read(i, k)
    seen = read_all_files(Path(info.mountpoint), s)
    assert seen["ok"] == len(rel_names) * len(views(s)) and not seen["wrong"]
    out = tmp_path / "got.jpg"
    res = subprocess.run([sys.executable, "-m", "pcrfs.cli", "get", os.fsencode(store), rel_names[0], b"-o",
                          os.fsencode(out)], capture_output=True)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == s.read(s.find(os.fsdecode(rel_names[0])), s.num_groups)
    s.close()


def _hostile_store(root: Path, names: list[str], jpeg: bytes) -> None:
    """A store written through the writer API with the given names (as a hostile or buggy
    producer could), checksums and all."""
    from pcrfs.jpeg.transcode import TranscodeOptions, transcode

    groups = [bytes(g) for g in transcode(jpeg, TranscodeOptions()).groups]
    w = StoreWriter(root)
    w.start("hostile")
    w.write_record(0, [ImageEntry(name, len(jpeg), 0, 0, groups) for name in sorted(names, key=fmt.path_sort_key)],
                   sources=(0, len(names)))
    w.finalize({})


@pytest.mark.parametrize("name", ["../evil.jpg", "/abs.jpg", "cls/../up.jpg", "./dot.jpg", "a//b.jpg",
                                  "cls/..", "nul\0byte.jpg"])
def test_open_store_and_verify_refuse_non_canonical_names(demo_src, tmp_path, name):
    """A path table with '..', '.', empty or absolute components or NUL bytes is refused at
    open (so no mount lists it and nothing extracts by it), and `pcrfs verify` says why."""
    from click.testing import CliRunner

    from pcrfs.cli import main

    _hostile_store(tmp_path / "s.pcr", ["cls/ok.jpg", name], _jpeg(demo_src))
    with pytest.raises(StoreError, match="canonical relative path|NUL byte"):
        open_store(tmp_path / "s.pcr")
    res = CliRunner().invoke(main, ["verify", "-q", str(tmp_path / "s.pcr")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "canonical relative path" in res.output or "NUL byte" in res.output


# ---- the store is only read ----------------------------------------------------------------------------

def _store_handles(pid: int | str, store: Path) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(path, open flags) of ``pid``'s descriptors and (path, perms) of its mappings inside ``store``."""
    root = os.path.realpath(store)
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            flags = int(open(f"/proc/{pid}/fdinfo/{fd}").read().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError):
            continue
        if target.startswith(root + "/"):
            fds.append((target, flags))
    maps = []
    for line in open(f"/proc/{pid}/maps"):
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].strip().startswith(root + "/"):
            maps.append((parts[5].strip(), parts[1]))
    return fds, maps


def _assert_read_only(fds, maps) -> None:
    assert fds, "no descriptor on the store: nothing was checked"
    for path, flags in fds:
        assert flags & os.O_ACCMODE == os.O_RDONLY, (path, oct(flags))
    for path, perms in maps:
        assert "w" not in perms, (path, perms)


@needs_fuse
def test_store_is_opened_read_only(demo_store, tmp_path, mounts):
    """Every descriptor the reader and the daemon hold on store files is O_RDONLY and every
    mapping of them read-only, after reading everything."""
    with open_store(demo_store) as s:
        for i in range(len(s)):
            s.read(i, s.num_groups)
        verify_store(s)
        fds, maps = _store_handles("self", demo_store)
        _assert_read_only(fds, maps)
        # the index is read into private memory, never mapped: nothing done to its files
        # afterwards can change what is served (issue 26 item 2)
        assert not {p for p, _ in maps if f"/{fmt.INDEX_DIR}/" in p}, maps
        info = mounts.mount(demo_store, "ro")
        assert not read_all_files(Path(info.mountpoint), s)["wrong"]
    _assert_read_only(*_store_handles(info.pid, demo_store))


def _tree_state(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


@contextmanager
def read_only_bind(source: Path, target: Path):
    """``source`` also visible, read-only, at ``target`` (a bind mount, always undone)."""
    target.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], check=True, capture_output=True)
        yield target
    finally:
        gc.collect()  # a closed Store still maps its index until it is collected
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


@needs_fuse
@needs_mount
def test_everything_works_on_a_read_only_filesystem(demo_store, tmp_path, mounts):
    """The store on a read-only bind mount: info, verify, get and a mount that serves every
    file all work, and not a byte or a timestamp of the store changes."""
    before = _tree_state(demo_store)
    with read_only_bind(demo_store, tmp_path / "ro") as ro:
        with pytest.raises(OSError) as e:
            (ro / "probe").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
        for args in (["info", ro], ["verify", "-q", ro]):
            res = run_limited(pcrfs_argv(*args), timeout=120)
            assert res.returncode == 0, res.stderr
        s = open_store(ro)
        try:
            res = run_limited(pcrfs_argv("get", ro, s.path(3), "-o", tmp_path / "g.jpg"), timeout=60)
            assert res.returncode == 0 and (tmp_path / "g.jpg").read_bytes() == s.read(3, s.num_groups)
            info = mounts.mount(ro, "m")
            seen = read_all_files(Path(info.mountpoint), s)
            assert not seen["wrong"] and not seen["eio"] and not seen["other_errors"]
            mounting.umount(info.mountpoint, echo=lambda _m: None)
        finally:
            s.close()
            del s
    assert _tree_state(demo_store) == before


# ---- allow_other ------------------------------------------------------------------------------------------

def _mount_options(mnt: Path) -> set[str]:
    target = os.path.realpath(mnt)
    for line in open("/proc/self/mountinfo"):
        left, _, right = line.partition(" - ")
        if left.split()[4] == target:
            return set(right.split()[2].split(","))
    raise AssertionError(f"{mnt} is not mounted")


def _as_nobody(path: Path) -> subprocess.CompletedProcess:
    """cat(1) the file as user nobody (Python itself may live where nobody cannot run it)."""
    return subprocess.run(["cat", str(path)], capture_output=True, timeout=30,
                          user=NOBODY, group=NOBODY, extra_groups=[])


@pytest.fixture
def public_base():
    """A directory other users may traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="pcrfs-public-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@needs_fuse
@needs_root
def test_allow_other_is_off_unless_asked_for(demo_store, public_base):
    """Mounted by the API, the CLI and mount.pcrfs with default options, another user cannot
    even read a file; the same check passes with -o allow_other (so it can tell). A store path
    containing ',allow_other' does not smuggle the option in."""
    from pcrfs.fuse.mount_helper import main as mount_helper

    store_link = public_base / "evil,allow_other,.pcr"  # the fsname option carries the store path
    store_link.symlink_to(demo_store)
    mounts = Mounts(public_base)
    try:
        with open_store(demo_store) as s:
            rel = s.path(0)
            want = s.size(0, s.num_groups)
        made = []
        info = mounts.mount(demo_store, "api")
        made.append(Path(info.mountpoint))
        cli = mounts.point("cli")
        assert pcrfs_cli("mount", str(store_link), str(cli), "--log-file", str(public_base / "cli.log")).returncode == 0
        mounts.track(cli)
        made.append(cli)
        helper = mounts.point("helper")
        assert mount_helper([str(demo_store), str(helper), "-o", f"log_file={public_base}/h.log"]) == 0
        mounts.track(helper)
        made.append(helper)
        for mnt in made:
            assert "allow_other" not in _mount_options(mnt), mnt
            assert (mnt / "full" / rel).stat().st_size == want  # root, the owner, can read
            res = _as_nobody(mnt / "full" / rel)
            assert res.returncode != 0 and b"Permission denied" in res.stderr and not res.stdout, (mnt, res)
        opened = mounts.mount(demo_store, "opened", options=["allow_other"])
        assert "allow_other" in _mount_options(Path(opened.mountpoint))
        res = _as_nobody(Path(opened.mountpoint) / "full" / rel)
        assert res.returncode == 0 and len(res.stdout) == want, res.stderr
    finally:
        mounts.cleanup()


def test_systemd_unit_and_daemon_defaults_do_not_allow_other():
    from pcrfs.fuse.config import fuse_options

    assert "allow_other" not in fuse_options([], allow_other=False)[0]
    assert "allow_other" not in fuse_options(["ro", "nonempty"], allow_other=False)[0]
    unit = (REPO / "systemd" / "pcrfs@.service").read_text()
    exec_start = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start and not any("allow_other" in line for line in exec_start)


# ---- nothing in a store executes ------------------------------------------------------------------------

@pytest.fixture
def sentinel(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "code from the store ran"


def _manifest_with(root: Path, edit) -> None:
    text = (root / fmt.MANIFEST).read_text()
    (root / fmt.MANIFEST).write_text(edit(text))


@pytest.mark.parametrize("where", ["document", "options", "index_files", "num_images"])
@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system", "!!python/object/apply:subprocess.call"])
def test_manifest_python_tags_are_refused(demo_store, tmp_path, sentinel, where, tag):
    root = tmp_path / "s.pcr"
    shutil.copytree(demo_store, root)
    payload = f'{tag} ["touch {sentinel}"]' if "name:" not in tag else tag
    if tag.endswith("subprocess.call"):
        payload = f'{tag} [["touch", "{sentinel}"]]'
    if where == "document":
        _manifest_with(root, lambda t: payload + "\n")
    elif where == "options":
        _manifest_with(root, lambda t: t.replace("options:", f"options: {payload}\nold_options:", 1))
    elif where == "index_files":
        _manifest_with(root, lambda t: t.replace("  images.npy:", f"  images.npy: {payload}\n  old_images.npy:", 1))
    else:
        _manifest_with(root, lambda t: t.replace("num_images:", f"num_images: {payload}\nold_num_images:", 1))
    with pytest.raises(StoreError):
        open_store(root)
    for args in (["info", root], ["verify", "-q", root], ["get", root, "x.jpg"]):
        r = CliRunner().invoke(cli_main, [str(a) for a in args])
        assert r.exit_code == 1 and r.stderr.startswith("pcrfs: error:"), r.output
        assert isinstance(r.exception, SystemExit)


class _Payload:
    """Unpickling this creates the sentinel file: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["images.npy", "group_lengths.npy", "group_crc32.npy", "records.npy",
                                  "record_group_offsets.npy", "path_offsets.npy", "dir_offsets.npy",
                                  "dir_ranges.npy"])
@pytest.mark.parametrize("shape", ["object array", "struct with an object field"])
def test_pickled_index_arrays_are_refused(demo_store, tmp_path, sentinel, name, shape):
    """An index .npy holding Python objects (with checksums to match) is refused without
    unpickling it."""
    root = tmp_path / "s.pcr"
    shutil.copytree(demo_store, root)
    p = root / fmt.INDEX_DIR / name
    if shape == "object array":
        arr = np.array([_Payload(str(sentinel))] * 4, dtype=object)
    else:
        arr = np.zeros(4, dtype=[("x", "<u8"), ("evil", "O")])
        arr["evil"] = [_Payload(str(sentinel))] * 4
    np.save(p, arr, allow_pickle=True)
    m = yaml.safe_load((root / fmt.MANIFEST).read_text())
    m["index_files"][name] = {"size": p.stat().st_size, "crc32": file_crc32(p)}
    (root / fmt.MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))
    with pytest.raises(StoreError, match=name.replace(".", r"\.") + "|pickle|object"):
        open_store(root)
    r = CliRunner().invoke(cli_main, ["verify", "-q", str(root)])
    assert r.exit_code == 1 and r.stderr.startswith("pcrfs: error:") and isinstance(r.exception, SystemExit)


def _alias_bomb(text: str, depth: int = 9) -> str:
    """A manifest whose `options` expand to 9**9 strings (the 'billion laughs' of YAML)."""
    lines = ["laughs:", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for d in range(1, depth):
        lines.append(f"  l{d}: &l{d} [" + ", ".join([f"*l{d - 1}"] * 9) + "]")
    head, _, rest = text.partition("options:")
    rest = rest.split("\n", 1)[1]
    while rest.startswith("  "):
        rest = rest.split("\n", 1)[1]
    return "\n".join(lines) + "\n" + head + f"options: *l{depth - 1}\n" + rest


def test_manifest_alias_bomb_is_bounded(demo_store, tmp_path):
    root = tmp_path / "s.pcr"
    shutil.copytree(demo_store, root)
    _manifest_with(root, _alias_bomb)
    t0 = time.monotonic()
    try:
        open_store(root).close()
    except StoreError:
        pass
    assert time.monotonic() - t0 < 5
    res = run_limited(pcrfs_argv("info", "--json", root), timeout=120, as_bytes=640 << 20)
    assert res.returncode in (0, 1) and "Traceback" not in res.stderr, res.stderr[-500:]


def test_no_unsafe_deserialisation_in_the_code():
    """No pickle/marshal/shelve, no unsafe YAML loader, no allow_pickle=True, no eval/exec, no
    shell=True anywhere in pcrfs/."""
    problems = []
    for path in sorted((REPO / "pcrfs").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any((m or "").split(".")[0] in ("pickle", "cPickle", "marshal", "shelve", "dill") for m in mods):
                    problems.append(f"{where}: imports {mods}")
            if isinstance(node, ast.Attribute) and node.attr in ("load", "load_all", "unsafe_load", "full_load",
                                                                 "Loader", "UnsafeLoader", "FullLoader") \
                    and isinstance(node.value, ast.Name) and node.value.id == "yaml":
                problems.append(f"{where}: yaml.{node.attr}")
            if isinstance(node, ast.keyword) and node.arg in ("allow_pickle", "shell") \
                    and not (isinstance(node.value, ast.Constant) and node.value.value is False):
                problems.append(f"{where}: {node.arg}=...")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                problems.append(f"{where}: {node.func.id}()")
    assert problems == []
