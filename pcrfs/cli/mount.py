"""``pcrfs mount | umount | stats | demo``: the mount's command-line face.

cli.py calls :func:`register`; everything here is a thin layer over
:mod:`pcrfs.fuse.daemon` (mounting) and the mount's ``/.pcrfs/stats`` file.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from ..units import format_size
from .options import SIZE
from ..fuse.daemon import DEFAULT_CACHE_SIZE, MountError, mount, mount_entry, umount

STATS_PATH = (".pcrfs", "stats")


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"pcrfs: error: {message}", err=True)
    sys.exit(code)


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


# ---- mount / umount ---------------------------------------------------------------------------

class _MountPoint(click.Path):
    """A directory argument that is not stat'ed while parsing: a stat of a mount point
    whose daemon is stopped blocks, and mount/umount must say so instead of hanging."""

    def convert(self, value, param, ctx):
        return os.fspath(value)


@click.command("mount")
@click.argument("store")
@click.argument("mountpoint", type=_MountPoint(file_okay=False))
@click.option("-f", "--foreground", is_flag=True,
              help="Serve in this process until unmounted or interrupted (for systemd, containers "
                   "and debugging) instead of starting a background daemon.")
@click.option("-o", "options", multiple=True, metavar="OPT[,OPT...]",
              help="Mount options, repeatable: allow_other (other users may read; non-root users need "
                   "user_allow_other in /etc/fuse.conf), nonempty (mount over a non-empty directory), "
                   "debug (log every FUSE request), or any other libfuse option.")
@click.option("--cache-size", type=SIZE, default=DEFAULT_CACHE_SIZE, show_default=True,
              help="Memory for verified scan groups, shared by all views (scan1's bytes are the "
                   "start of scan5's); 0 disables it. For a remote store it holds every group fetched; "
                   "for a local one only groups a read cuts in two (the kernel's page cache already "
                   "holds the record files and the served files).")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Where the daemon logs (errors such as damaged groups are named there) "
                   "[default: /run/pcrfs/<mount>.log for root, else under $XDG_RUNTIME_DIR or /tmp].")
@click.option("--endpoint-url", metavar="URL", default=None,
              help="S3-compatible endpoint for an s3:// STORE (MinIO, Ceph, moto ...) [default: AWS, "
                   "or $AWS_ENDPOINT_URL]. Credentials and region come from the usual AWS variables/files.")
@click.option("--bwlimit", metavar="RATE", default=None,
              help="Cap the bandwidth taken from the store, all requests together, e.g. 10M (bytes/s, "
                   "binary units, like rclone's --bwlimit).")
@click.option("--disk-cache", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Also keep fetched scan groups on local disk in DIR (kept across mounts), so later "
                   "epochs do not download again. Remote stores also keep their index there.")
@click.option("--disk-cache-size", type=SIZE, default="10G", show_default=True,
              help="Size cap of --disk-cache; least recently used images are dropped first.")
@click.option("--readahead", type=SIZE, default=None, metavar="SIZE",
              help="Budget of one readahead window for reads in image order (a sequential epoch "
                   "fetches groups 1..k of the next images in one request per group); 0 disables "
                   "[default: 16M for remote stores, 0 for local ones].")
@click.option("--record-prefix", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Fetch whole record prefixes (groups 1..k of every image of a record, a few large "
                   "requests) instead of k requests per image, when the caches can hold them; auto: on for "
                   "remote stores. See 'Shuffled training from object storage' in the README.")
def mount_cmd(store: str, mountpoint: str, foreground: bool, options: tuple[str, ...], cache_size: int,
              log_file: str | None, endpoint_url: str | None, bwlimit: str | None, disk_cache: str | None,
              disk_cache_size: int, readahead: int | None, record_prefix: str = "auto") -> None:
    """Mount the PCR store STORE at the empty directory MOUNTPOINT, read-only.

    \b
    MOUNTPOINT/scan1 ... MOUNTPOINT/scanN   the source tree, each image cut after k scan groups
    MOUNTPOINT/full                         the source tree at full fidelity (pixel-identical JPEGs)
    MOUNTPOINT/.pcrfs/stats                 live counters as JSON (see `pcrfs stats`)

    Every view is an ordinary directory tree of complete JPEG files, so any loader
    works unchanged (e.g. torchvision ImageFolder on MOUNTPOINT/scan3). Files are
    immutable and cached by the kernel; damaged stored bytes read as EIO (errno 5).

    Returns once the mount is ready; the daemon keeps running in the background and
    stops on `pcrfs umount MOUNTPOINT` (or SIGTERM). A mount left behind by a daemon
    that died ("Transport endpoint is not connected") is cleaned up automatically.

    STORE may be a URL such as s3://bucket/prefix: its index is downloaded once,
    then each read fetches only the byte ranges it needs (ranged GETs, retried on
    failures; an unreachable store reads as EIO until it is back).
    """
    from ..remote.bwlimit import parse_rate
    from ..remote.fs import RemoteOptions
    from ..store.reader import ReadOptions

    try:
        rate = parse_rate(bwlimit) if bwlimit else None
    except ValueError as e:
        _fail(f"--bwlimit: {e}")
    if disk_cache:
        try:
            os.makedirs(disk_cache, exist_ok=True)
        except OSError as e:
            _fail(f"--disk-cache {disk_cache}: cannot create the directory: {e.strerror or e}")
        if not os.access(disk_cache, os.W_OK | os.X_OK):
            _fail(f"--disk-cache {disk_cache}: the directory is not writable")
    read_options = ReadOptions(remote=RemoteOptions(endpoint_url=endpoint_url), bwlimit=rate,
                               disk_cache=disk_cache, disk_cache_bytes=disk_cache_size, readahead_bytes=readahead,
                               record_prefix={"auto": None, "on": True, "off": False}[record_prefix])
    try:
        mount(store, mountpoint, foreground=foreground, options=options, cache_size=cache_size,
              log_file=log_file, echo=_echo_err, read_options=read_options)
    except MountError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        pass


@click.command("umount")
@click.argument("mountpoint", type=_MountPoint())
@click.option("-l", "--lazy", is_flag=True,
              help="Detach now even if files are open or a shell is inside; the daemon exits when the "
                   "last user lets go.")
def umount_cmd(mountpoint: str, lazy: bool) -> None:
    """Unmount a pcrfs mount and wait for its daemon to exit.

    Fails with a clear message if a process still uses the mount (see `fuser -vm
    MOUNTPOINT`); --lazy detaches it anyway.
    """
    try:
        umount(mountpoint, lazy=lazy, echo=_echo_err)
    except MountError as e:
        _fail(str(e))


# ---- stats -----------------------------------------------------------------------------------

STATS_XATTR = "user.pcrfs.stats"  # always fresh (the stats file may lag a read behind: see pcrfs.fuse.ops)


def read_stats(mountpoint: str | os.PathLike) -> dict:
    """The counters of the pcrfs mount at ``mountpoint`` (MountError if it is none)."""
    path = os.path.join(os.fspath(mountpoint), *STATS_PATH)
    try:
        os.stat(path)  # not a pcrfs mount: FileNotFoundError, named below
        return json.loads(os.getxattr(os.fspath(mountpoint), STATS_XATTR))
    except FileNotFoundError:
        raise MountError(f"{mountpoint} is not a pcrfs mount (no {'/'.join(STATS_PATH)})") from None
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise MountError(f"{mountpoint} is a stale mount (its daemon is gone); remount it with "
                             f"`pcrfs mount STORE {mountpoint}` or remove it with `pcrfs umount {mountpoint}`") from None
        raise MountError(f"{path}: {e.strerror or e}") from None
    except ValueError as e:
        raise MountError(f"{path} is not valid JSON: {e}") from None


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _io_lines(io: dict) -> list[str]:
    """Lines for the read path's counters (Store.io_stats()), when the stats carry them."""
    lines = []
    source = io.get("source", {})
    if "retries" in source or "bwlimit_bytes_per_s" in source:
        limit = source.get("bwlimit_bytes_per_s")
        lines.append(f"remote       {source.get('retries', 0)} retries" +
                     (f", bwlimit {format_size(limit)}/s (held back {source.get('bwlimit_waited_s', 0)}s)"
                      if limit else ""))
    ra = io.get("readahead")
    if ra:
        lines.append(f"readahead    {ra.get('windows', 0)} windows, {ra.get('images', 0)} images "
                     f"({ra.get('sequential', 0)} sequential / {ra.get('random', 0)} random accesses)")
    rp = io.get("record_prefix")
    if rp:
        lines.append(f"prefixes     {rp.get('fetches', 0)} record prefixes in {rp.get('parts', 0)} requests "
                     f"({rp.get('failed_parts', 0)} failed, {rp.get('bad_groups', 0)} bad groups; "
                     f"{rp.get('declined', 0)} reads image by image)")
    dc = io.get("disk_cache")
    if dc:
        lines.append(f"disk cache   {format_size(dc.get('bytes', 0))} of {format_size(dc.get('capacity', 0))}, "
                     f"{dc.get('hits', 0)} hits, {dc.get('misses', 0)} misses")
    return lines


def format_stats(doc: dict) -> str:
    cache = doc.get("cache", {})
    lookups = cache.get("hits", 0) + cache.get("misses", 0)
    hit_rate = f"{cache.get('hits', 0) / lookups:.1%}" if lookups else "-"
    reads = doc.get("store_reads", {})
    lines = [
        f"store        {doc.get('store')}",
        f"mount        {doc.get('mountpoint', '?')}  (daemon pid {doc.get('pid', '?')}, "
        f"up {_duration(doc.get('uptime_s', 0))})",
        f"log          {doc.get('log_file') or '-'}",
        f"store reads  {reads.get('requests', 0)} requests, {format_size(reads.get('bytes', 0))}",
        f"group cache  {format_size(cache.get('bytes', 0))} of {format_size(cache.get('capacity', 0))}, "
        f"hit rate {hit_rate} ({cache.get('hits', 0)} hits, {cache.get('misses', 0)} misses)",
        f"errors       {doc.get('errors', {}).get('eio', 0)} EIO (damaged data; see the log)",
        *_io_lines(doc.get("io") or {}),
        "",
        f"{'view':<8} {'first reads':>11} {'served':>12}",
    ]
    for name, v in doc.get("views", {}).items():
        lines.append(f"{name:<8} {v.get('first_reads', 0):>11} {format_size(v.get('bytes_served', 0)):>12}")
    lines.append("(first reads: reads at offset 0 that reached the daemon; re-reads served from the "
                 "kernel's page cache are not counted)")
    return "\n".join(lines)


@click.command("stats")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the raw counters as JSON.")
def stats_cmd(mountpoint: str, as_json: bool) -> None:
    """Show a mount's counters: first reads and bytes served per view, store reads,
    group-cache hit rate, EIO errors, daemon pid and log file.

    Read from the extended attribute user.pcrfs.stats of MOUNTPOINT (always current);
    MOUNTPOINT/.pcrfs/stats holds the same JSON.
    """
    try:
        doc = read_stats(mountpoint)
    except MountError as e:
        _fail(str(e))
    click.echo(json.dumps(doc, indent=2) if as_json else format_stats(doc))


# ---- demo -------------------------------------------------------------------------------------

def _sh(args: list[str], limit: int | None = None) -> None:
    """Run a command and show it and its real output (first ``limit`` lines)."""
    click.secho("$ " + " ".join(args), bold=True)
    res = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    out = (res.stdout + res.stderr).rstrip("\n").splitlines()
    shown = out if limit is None else out[:limit]
    for line in shown:
        click.echo(line)
    if len(out) > len(shown):
        click.echo(f"... ({len(out) - len(shown)} more lines)")


def view_table(mnt: Path) -> list[tuple[str, int, int]]:
    """(view, files, bytes) for every view of the mount, as seen through the filesystem."""
    rows = []
    for view in sorted((p.name for p in mnt.iterdir() if not p.name.startswith(".")),
                       key=lambda n: (n == "full", int(n[4:]) if n.startswith("scan") else 0)):
        files = total = 0
        for root, _, names in os.walk(mnt / view):
            for n in names:
                files += 1
                total += os.stat(os.path.join(root, n)).st_size
        rows.append((view, files, total))
    return rows


def _step(text: str) -> None:
    click.echo("")
    click.secho(f"==> {text}", fg="green", bold=True)


def _first_jpeg(root: Path) -> Path:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            return path
    raise click.ClickException(f"no files under {root}")


@click.command("demo")
@click.argument("workdir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", type=click.IntRange(1), default=20, show_default=True,
              help="Demo photographs per class.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--keep-mounted", is_flag=True, help="Leave the mount up at the end to explore it.")
def demo_cmd(workdir: Path | None, per_class: int, seed: int, keep_mounted: bool) -> None:
    """The whole tour in one command: build a small dataset, convert it, mount it, look at it.

    WORKDIR (default: a new directory under /tmp) receives photos/ (the source
    JPEGs), demo.pcr (the store) and mnt/ (the mount point). Every listing below is
    the real output of the command shown. Needs scikit-image for the photographs.
    """
    from PIL import Image
    import numpy as np

    from ..convert import StoreExists, convert
    from ..demo import make_demo

    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="pcrfs-demo-"))
    workdir = workdir.resolve()
    photos, store, mnt = workdir / "photos", workdir / "demo.pcr", workdir / "mnt"

    _step(f"1. A dataset of real photographs in ImageFolder layout: {photos}")
    if photos.is_dir() and any(photos.iterdir()):
        click.echo("(already there; reusing it)")
    else:
        try:
            s = make_demo(photos, per_class=per_class, seed=seed, progress=False)
        except (ValueError, RuntimeError) as e:
            _fail(str(e))
        click.echo(f"{s.count} baseline JPEGs in {len(s.classes)} classes, {format_size(s.total_bytes)}")

    _step(f"2. Convert it to a PCR store (lossless): {store}")
    try:
        r = convert(photos, store, workers=os.cpu_count())
        click.echo(f"{r.images} images, {r.manifest['num_groups']} scan groups, "
                   f"{format_size(r.bytes_in)} in, {format_size(r.bytes_out)} stored, {r.seconds:.1f}s")
    except StoreExists:
        click.echo("(already converted; reusing it)")

    _step(f"3. Mount it: pcrfs mount {store} {mnt}")
    mnt.mkdir(exist_ok=True)
    if mount_entry(str(mnt)) is not None:
        try:
            umount(mnt, echo=_echo_err)
        except MountError as e:
            _fail(str(e))
    try:
        mount(store, mnt, echo=lambda m: click.echo(m))
    except MountError as e:
        _fail(str(e))
    try:
        _tour(mnt, photos, Image, np)
    finally:
        if keep_mounted:
            _step("Left mounted. Explore it, then: pcrfs umount " + str(mnt))
        else:
            _step("7. Unmount")
            try:
                umount(mnt, echo=lambda m: click.echo(m))
            except MountError as e:
                _fail(str(e))
            click.echo(f"(the photos and the store stay in {workdir})")


def _tour(mnt: Path, photos: Path, Image, np) -> None:
    views = [p.name for p in mnt.iterdir() if not p.name.startswith(".")]
    n = max(int(v[4:]) for v in views if v.startswith("scan"))
    mid = f"scan{max(1, n // 2)}"
    first = _first_jpeg(mnt / "full")
    cls = first.parent.relative_to(mnt / "full")

    _step("4. Every fidelity is a directory; each is the source tree")
    _sh(["ls", str(mnt)])
    _sh(["ls", str(mnt / "scan1")])
    _sh(["ls", "-l", str(mnt / "scan1" / cls)], limit=6)
    _sh(["ls", "-l", str(mnt / mid / cls)], limit=6)
    if shutil.which("du"):
        _sh(["du", "-sh", "--apparent-size", str(mnt / "scan1"), str(mnt / mid), str(mnt / "full")])

    _step("5. What each view costs to read")
    rows = view_table(mnt)
    full_bytes = dict((v, b) for v, _, b in rows).get("full") or 1
    click.echo(f"{'view':<8} {'files':>7} {'bytes':>12} {'of full':>8}")
    for view, files, total in rows:
        click.echo(f"{view:<8} {files:>7} {format_size(total):>12} {total / full_bytes:>8.1%}")

    _step("6. They are ordinary JPEGs: decode one with Pillow")
    rel = first.relative_to(mnt / "full")
    with Image.open(mnt / "full" / rel) as im:
        full_px = np.asarray(im.convert("RGB"))
        click.echo(f"full/{rel}: {(mnt / 'full' / rel).stat().st_size:,} bytes, {im.format} "
                   f"{im.size[0]}x{im.size[1]} {im.mode}")
    with Image.open(photos / rel) as im:
        same = np.array_equal(np.asarray(im.convert("RGB")), full_px)
    click.echo(f"  pixel-identical to the source photos/{rel}: {'yes' if same else 'NO'}")
    with Image.open(mnt / "scan1" / rel) as im:
        low = np.asarray(im.convert("RGB")).astype(np.float64)
        click.echo(f"scan1/{rel}: {(mnt / 'scan1' / rel).stat().st_size:,} bytes, {im.format} "
                   f"{im.size[0]}x{im.size[1]} {im.mode}")
    mse = float(np.mean((low - full_px) ** 2))
    psnr = 10 * np.log10(255 ** 2 / mse) if mse else float("inf")
    click.echo(f"  same size, coarser detail: PSNR {psnr:.1f} dB against full")
    click.echo("")
    click.echo(format_stats(read_stats(mnt)))


def register(main: click.Group) -> None:
    """Add mount, umount, stats and demo to the ``pcrfs`` command group."""
    for cmd in (mount_cmd, umount_cmd, stats_cmd, demo_cmd):
        main.add_command(cmd)
