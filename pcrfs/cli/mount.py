"""``pcrfs mount | umount | stats``: the mount's command-line face.

:mod:`pcrfs.cli.main` calls :func:`register`; everything here is a thin layer over
:mod:`pcrfs.fuse.mounting` (its options: :mod:`pcrfs.fuse.config`) and the mount's
``/.pcrfs/stats`` file.
"""
from __future__ import annotations

import errno
import json
import os

import click

from ..fuse.daemon import start as start_mount
from ..fuse.mounting import MountError, umount
from ..units import format_size
from .options import echo_err, fail, mount_config_from_click, mount_options

STATS_PATH = (".pcrfs", "stats")


# ---- mount / umount ---------------------------------------------------------------------------

class _MountPoint(click.Path):
    """A directory argument that is not stat'ed while parsing: a stat of a mount point
    whose daemon is stopped blocks, and mount/umount must say so instead of hanging."""

    def convert(self, value, param, ctx):
        return os.fspath(value)


@click.command("mount")
@click.argument("store")
@click.argument("mountpoint", type=_MountPoint(file_okay=False))
@mount_options
def mount_cmd(store: str, mountpoint: str, **values) -> None:
    """Mount the PCR store STORE at the empty directory MOUNTPOINT, read-only.

    \b
    MOUNTPOINT/scan1 ... MOUNTPOINT/scanN   the source tree, each image cut after k scan groups
    MOUNTPOINT/full                         the source tree at full fidelity (pixel-identical JPEGs)
    MOUNTPOINT/ssim90, ssim95, ssim98       each image cut at its own k, the smallest reaching that
                                            MS-SSIM (stores with the quality index: `pcrfs quality
                                            STORE --write-index` or `pcrfs convert --quality-index`)
    MOUNTPOINT/.pcrfs/stats                 live counters as JSON (see `pcrfs stats`)

    Every view is an ordinary directory tree of complete JPEG files, so any loader
    works unchanged (e.g. torchvision ImageFolder on MOUNTPOINT/scan3). Give loaders a
    view, not MOUNTPOINT itself: its directories are views, not classes (an empty
    hidden directory there names this advice in the error ImageFolder(MOUNTPOINT)
    raises). Files are immutable and cached by the kernel; damaged stored bytes read
    as EIO (errno 5).

    Returns once the mount is ready; the daemon keeps running in the background and
    stops on `pcrfs umount MOUNTPOINT` (or SIGTERM). A mount left behind by a daemon
    that died ("Transport endpoint is not connected") is cleaned up automatically.

    STORE may be a URL such as s3://bucket/prefix: its index is downloaded once,
    then each read fetches only the byte ranges it needs (ranged GETs, retried on
    failures; an unreachable store reads as EIO until it is back).
    """
    config = mount_config_from_click(store, mountpoint, values)
    if config.disk_cache:
        _check_disk_cache(config.disk_cache)
    try:
        start_mount(config, echo=echo_err)
    except MountError as e:
        fail(str(e))
    except KeyboardInterrupt:
        pass


def _check_disk_cache(disk_cache: str) -> None:
    """--disk-cache DIR: made if missing, and writable (one error line otherwise)."""
    try:
        os.makedirs(disk_cache, exist_ok=True)
    except OSError as e:
        fail(f"--disk-cache {disk_cache}: cannot create the directory: {e.strerror or e}")
    if not os.access(disk_cache, os.W_OK | os.X_OK):
        fail(f"--disk-cache {disk_cache}: the directory is not writable")


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
        umount(mountpoint, lazy=lazy, echo=echo_err)
    except MountError as e:
        fail(str(e))


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
        fail(str(e))
    click.echo(json.dumps(doc, indent=2) if as_json else format_stats(doc))


def register(main: click.Group) -> None:
    """Add mount, umount and stats to the ``pcrfs`` command group."""
    for cmd in (mount_cmd, umount_cmd, stats_cmd):
        main.add_command(cmd)
