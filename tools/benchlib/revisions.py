"""Another git revision's pcrfs next to the checkout's, for old-vs-new runs in one process tree.

``code_tree(rev, work)`` extracts ``pcrfs/`` (and the build files) of a revision under
``work`` once per commit and builds its compiled extension (``pcrfs/fuse/_fastpath.c``) in
place, so a process started with ``PYTHONPATH=<tree>`` (:func:`env_for`) imports that pcrfs,
compiled read path included. ``rev == "checkout"`` is a copy of the checkout's ``pcrfs/`` as it
is on disk when the run starts (:func:`snapshot`: others may edit or commit during a run, and
every round must measure the same code), its extension built from the copied ``_fastpath.c``.
``describe(tree)`` asks a fresh process which pcrfs it imports and whether its compiled
path loads (``fastpath.load()``), so a run can show that each side ran its own code.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import REPO, log

CHECKOUT = "checkout"
BUILD_FILES = ("pcrfs", "setup.py", "pyproject.toml", "README.md")


def commit_of(rev: str) -> str:
    """The full commit hash of ``rev`` in the checkout's repository."""
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()


def _built(dest: Path) -> list[Path]:
    return sorted((dest / "pcrfs" / "fuse").glob("_fastpath*.so"))


def extract(commit: str, work: Path) -> Path:
    """``pcrfs/`` and the build files of ``commit`` under ``work`` (made once), its extension built in place."""
    dest = work / f"pcrfs-{commit[:12]}"
    if not (dest / "pcrfs" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", commit], check=True,
                               capture_output=True, text=True).stdout.split()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, *[n for n in BUILD_FILES if n in names]],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return build(dest, commit[:12])


def build(dest: Path, what: str) -> Path:
    """``dest`` with its ``pcrfs/fuse/_fastpath`` built in place (``setup.py build_ext --inplace``)."""
    if not _built(dest):
        log(f"building {what}'s compiled extension in {dest}")
        r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest,
                           capture_output=True, text=True)
        if r.returncode != 0 or not _built(dest):
            raise RuntimeError(f"building {what}'s _fastpath failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return dest


def tree_sha1(tree: Path) -> str:
    """A hash of the sources under ``tree/pcrfs`` (every .py and .c file, by relative path)."""
    h = hashlib.sha1()
    for f in sorted(p for p in (tree / "pcrfs").rglob("*") if p.suffix in (".py", ".c") and p.is_file()):
        h.update(str(f.relative_to(tree)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def snapshot(work: Path) -> Path:
    """A copy of the checkout's ``pcrfs/`` and build files under ``work``, named by :func:`tree_sha1`
    (the same sources make the same directory), its extension built in place."""
    tmp = work / f"pcrfs-checkout-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    shutil.copytree(REPO / "pcrfs", tmp / "pcrfs", ignore=skip)
    for name in BUILD_FILES[1:]:
        if (REPO / name).exists():
            shutil.copy2(REPO / name, tmp / name)
    dest = work / f"pcrfs-checkout-{tree_sha1(tmp)[:12]}"
    if dest.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(dest)
    return build(dest, "the checkout's copy")


def code_tree(rev: str, work: Path) -> Path:
    """The directory whose ``pcrfs/`` is ``rev``'s (for :data:`CHECKOUT`: :func:`snapshot`)."""
    return snapshot(work) if rev == CHECKOUT else extract(commit_of(rev), work)


def env_for(tree: Path, base: dict | None = None) -> dict:
    """An environment whose Python imports the pcrfs under ``tree`` first."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(tree)
    env.pop("PCRFS_NO_FASTPATH", None)
    return env


_DESCRIBE = """
import json, pcrfs
from pcrfs.fuse import fastpath
m, why = fastpath.load()
print(json.dumps({"pcrfs_file": pcrfs.__file__, "compiled": m is not None, "why_not": why,
                  "extension": getattr(m, "__file__", None), "contract": fastpath.CONTRACT}))
"""


def describe(tree: Path) -> dict:
    """What a fresh process with ``PYTHONPATH=tree`` imports: pcrfs's file, whether the compiled
    path loads (and why not), the extension's file; raises if it is not ``tree``'s pcrfs."""
    r = subprocess.run([sys.executable, "-c", _DESCRIBE], env=env_for(tree), capture_output=True, text=True,
                       cwd="/", timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"importing pcrfs from {tree} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if not Path(out["pcrfs_file"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"PYTHONPATH={tree} imported pcrfs from {out['pcrfs_file']}")
    c, so = tree / "pcrfs" / "fuse" / "_fastpath.c", out.get("extension")
    if so and c.exists():
        out["extension_older_than_source"] = os.path.getmtime(so) < os.path.getmtime(c)
    return out


class RevisionMount:
    """``pcrfs mount STORE MP`` run by the pcrfs under ``tree`` (its CLI starts its own daemon,
    which imports that tree's code and compiled extension), for a with-block; ``.pid`` is the
    daemon's (from the mount's stats), ``.stats()`` its counters. The exit runs that tree's
    ``pcrfs umount``, then makes sure the daemon is gone (by PID) and nothing stays mounted."""

    def __init__(self, tree: Path, store: str | os.PathLike, mp: str | os.PathLike, log_file: str | os.PathLike,
                 args: tuple[str, ...] = ()) -> None:
        self.tree, self.store, self.mp = tree, os.fspath(store), os.path.abspath(os.fspath(mp))
        self.log_file, self.args = os.fspath(log_file), tuple(args)
        self.pid: int | None = None

    def _cli(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pcrfs.cli", *argv], env=env_for(self.tree), cwd="/",
                              capture_output=True, text=True, timeout=120)

    def __enter__(self) -> "RevisionMount":
        from .mounts import CLEANUP, read_stats

        CLEANUP.add_mount(self.mp)
        Path(self.mp).mkdir(parents=True, exist_ok=True)
        r = self._cli("mount", self.store, self.mp, "--log-file", self.log_file, *self.args)
        if r.returncode != 0:
            self.__exit__()
            raise RuntimeError(f"pcrfs mount ({self.tree}) failed: {(r.stdout + r.stderr)[-2000:]}")
        self.pid = int(read_stats(self.mp)["pid"])
        CLEANUP.pids.add(self.pid)
        return self

    def stats(self) -> dict:
        from .mounts import read_stats

        return read_stats(self.mp)

    def __exit__(self, *exc) -> None:
        from .mounts import CLEANUP, is_mounted, unmount_pcrfs

        if is_mounted(self.mp):
            r = self._cli("umount", self.mp)
            if r.returncode != 0:
                log(f"pcrfs umount ({self.tree}) {self.mp}: {(r.stdout + r.stderr).strip()[-500:]}")
        unmount_pcrfs(self.mp, self.pid)  # detaches if still mounted; waits for (or stops) the daemon
        if self.pid is not None:
            CLEANUP.pids.discard(self.pid)
