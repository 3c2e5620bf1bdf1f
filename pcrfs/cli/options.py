"""Command-line options and helpers shared by several `pcrfs` commands (kept apart so that
every command module can import them without importing the others)."""
from __future__ import annotations

import sys
from typing import NoReturn

import click

from ..fuse.config import OPTIONS, ConfigError, MountConfig, MountOption
from ..units import parse_size


def endpoint_option(fn):
    """``--endpoint-url`` for commands that take a STORE (which may be an s3:// URL)."""
    return click.option(
        "--endpoint-url", metavar="URL", default=None,
        help="S3-compatible endpoint for s3:// stores (MinIO, Ceph, moto ...) [default: AWS, or "
             "$AWS_ENDPOINT_URL]. Credentials and region come from the usual AWS variables/files.")(fn)


class SizeType(click.ParamType):
    """A click option value such as 64M or 2G (see :func:`parse_size`)."""
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


def fail(message: str, code: int = 1) -> NoReturn:
    """One ``pcrfs: error:`` line on stderr, then exit ``code`` (every command's way out)."""
    click.echo(f"pcrfs: error: {message}", err=True)
    sys.exit(code)


def echo_err(message: str) -> None:
    """What the library's ``echo`` callbacks say, on stderr."""
    click.echo(message, err=True)


def quiet_option(fn):
    """``-q/--quiet`` for commands that draw a progress bar."""
    return click.option("-q", "--quiet", is_flag=True, help="No progress bar.")(fn)


def dask_options(dask_help: str, scheduler_help: str):
    """``--dask`` and ``--scheduler ADDR`` (run on a Dask cluster), with each command's help."""
    def decorate(fn):
        fn = click.option("--scheduler", metavar="ADDR", default=None, help=scheduler_help)(fn)
        return click.option("--dask", "use_dask", is_flag=True, help=dask_help)(fn)
    return decorate


def dask_cluster(use_dask: bool, scheduler: str | None, n_workers: int | None):
    """The client context of the cluster --dask/--scheduler asked for, or None (not on Dask);
    a missing dask.distributed is one error line."""
    if use_dask and scheduler:
        raise click.UsageError("--dask and --scheduler are mutually exclusive")
    if not (use_dask or scheduler):
        return None
    from ..cluster import DaskUnavailable, dask_client, require_dask

    try:
        require_dask()
    except DaskUnavailable as e:
        fail(str(e))
    return dask_client(scheduler, n_workers=n_workers)


def dask_failure(e: Exception, what: str, kept: str) -> NoReturn:
    """One line for a failure of the cluster itself (unreachable scheduler, a task that kept
    killing its workers, a worker that cannot see its input); the run resumes."""
    if type(e).__name__ == "ClusterUnavailable":
        fail(str(e))
    fail(f"{what}: {type(e).__name__}: {e}; {kept}, run the same command again to resume")


def describe_cluster(client) -> None:
    """The dashboard link and the cluster's size, before the progress bar takes the terminal."""
    workers = client.scheduler_info().get("workers", {})
    threads = sum(w.get("nthreads", 0) for w in workers.values())
    if "dashboard" in client.scheduler_info().get("services", {}):
        click.echo(f"Dask dashboard: {client.dashboard_link}", err=True)
    click.echo(f"Dask cluster at {client.scheduler.address}: {len(workers)} workers, {threads} threads"
               + ("" if workers else " (tasks wait until workers connect)"), err=True)


# ---- the mount's options, from their one declaration (pcrfs.fuse.config.OPTIONS) -----------------

def _click_type(option: MountOption):
    return {"size": SIZE, "file": click.Path(dir_okay=False), "dir": click.Path(file_okay=False),
            "switch": click.Choice(["auto", "on", "off"])}.get(option.kind)


def mount_options(fn):
    """The click options of ``pcrfs mount``, one per :data:`pcrfs.fuse.config.OPTIONS` entry."""
    for option in reversed(OPTIONS):
        kw: dict = {"help": option.help, "default": option.default, "show_default": option.show_default}
        if option.kind == "flag":
            kw.update(is_flag=True, default=False)
        if option.kind == "fuse":
            kw.update(multiple=True, default=())
        if option.metavar:
            kw["metavar"] = option.metavar
        if _click_type(option) is not None:
            kw["type"] = _click_type(option)
        fn = click.option(*option.cli_flags, option.name, **kw)(fn)
    return fn


def mount_config_from_click(store: str, mountpoint: str, values: dict) -> MountConfig:
    """``pcrfs mount``'s options as a :class:`MountConfig` (a malformed value: one error line)."""
    try:
        return MountConfig.from_values(store, mountpoint, values, lambda o: o.long_flag)
    except ConfigError as e:
        fail(str(e))
