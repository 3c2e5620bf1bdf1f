"""The `pcrfs` command group and its store commands: ``convert``, ``info``, ``verify``, ``get``."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
from pathlib import Path

import click

from .._version import __version__
from ..units import format_size
from .options import (SIZE, dask_cluster, dask_failure, dask_options, describe_cluster, endpoint_option, fail,
                      quiet_option)


def _open(store: str, endpoint_url: str | None = None):
    from ..remote.fs import RemoteOptions
    from ..store.read.reader import ReadOptions, StoreError, open_store

    try:
        return open_store(store, options=ReadOptions(remote=RemoteOptions(endpoint_url=endpoint_url)))
    except StoreError as e:
        fail(str(e))


class _OneLineErrors(click.Group):
    """Whatever a command lets escape becomes one line on stderr, not a traceback: a store
    the reader refuses (StoreError) or whose bytes fail their checks (CorruptData), and,
    as a last resort, anything else (``PCRFS_DEBUG=1`` shows the traceback instead)."""

    def invoke(self, ctx: click.Context):
        from ..store.errors import CorruptData, StoreError, StoreUnavailable

        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:
            _reader_went_away()
        except StoreError as e:
            fail(str(e))
        except (CorruptData, StoreUnavailable) as e:
            fail(e.strerror or str(e))
        except RecursionError:
            if os.environ.get("PCRFS_DEBUG"):
                raise
            fail("input nested too deeply to process (RecursionError)")
        except Exception as e:  # noqa: BLE001
            if os.environ.get("PCRFS_DEBUG"):
                raise
            fail(f"unexpected {type(e).__name__}: {e} (a damaged input or a pcrfs bug; "
                  "PCRFS_DEBUG=1 shows the traceback)")


def _quiet_library_warnings() -> None:
    """The library's warnings (each retry of a failed request, ...) are not printed: a
    command that fails says so in one line, naming the cause. A mount's daemon logs them
    to its log file; PCRFS_DEBUG=1 prints them here too."""
    if not os.environ.get("PCRFS_DEBUG"):
        logging.getLogger("pcrfs").addHandler(logging.NullHandler())


def _reader_went_away() -> None:
    """Standard output's reader closed the pipe (`pcrfs info STORE | head -1`): stop
    quietly with the status a shell shows for SIGPIPE, as cat or ls would. Standard
    output now points at /dev/null so that nothing tries to flush into the pipe again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(141)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pcrfs")
def main() -> None:
    """pcrfs: image datasets as Progressive Compressed Records, served as a filesystem.

    \b
    Typical use:
      pcrfs convert ~/data/imagenet/train /data/train.pcr   # once, lossless for JPEGs
      pcrfs mount /data/train.pcr /mnt/train                # views /mnt/train/scan1 ... /full
      python train.py --data /mnt/train/scan5               # any unmodified loader
    """
    _quiet_library_warnings()


@main.command()
@click.argument("src")
@click.argument("store")
@click.option("-j", "--workers", type=click.IntRange(1), default=None,
              help="Parallel transcoding threads [default: all cores].")
@click.option("--record-size", type=SIZE, default="64M", show_default=True,
              help="Target size of each record file.")
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True,
              help="JPEG quality for re-encoding non-JPEG inputs (JPEGs are never re-encoded).")
@click.option("--non-jpeg", type=click.Choice(["encode", "skip", "fail"]), default="encode", show_default=True,
              help="What to do with PNG/WebP/BMP/TIFF/GIF... inputs.")
@click.option("--keep-metadata", is_flag=True, help="Keep EXIF/ICC/comment markers (dropped by default).")
@click.option("--max-pixels", type=click.IntRange(1), default=178_956_970, show_default=True,
              help="Refuse images with more pixels than this (decompression bombs).")
@click.option("--skip-bad", is_flag=True,
              help="Exit 0 even if some files could not be converted (they are listed in the report).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing store at STORE (refused if SRC and STORE overlap in any way).")
@quiet_option
@dask_options("Convert on a Dask LocalCluster of -j worker processes on this machine (pip install 'pcrfs[dask]').",
              "Convert on the Dask cluster at ADDR (e.g. tcp://host:8786). Workers must read SRC and "
              "write STORE at the same path (shared filesystem) or URL; see docs/distributed.md.")
@click.option("--quality-index", is_flag=True,
              help="Also score every image and write the adaptive index (ssim90/ ssim95/ ssim98/ views), as "
                   "`pcrfs quality --write-index` would.")
@click.option("--order", type=click.Choice(["shuffled", "source"]), default="shuffled", show_default=True,
              help="Which images share a record. shuffled: each record holds a random sample of the whole "
                   "dataset, so a cache of a few records feeds well-mixed batches (RecordShuffleSampler, "
                   "bounded-memory shuffles); a store format version 2. source: runs of consecutive paths "
                   "(a few classes per record), format version 1, readable by older pcrfs.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the shuffled order: the same source and seed give the same store.")
@endpoint_option
def convert(src: Path, store: str, workers, record_size, quality, non_jpeg, keep_metadata, max_pixels,
            skip_bad, overwrite, quiet, use_dask, scheduler, quality_index, order, seed, endpoint_url) -> None:
    """Convert the image tree SRC into a PCR store at STORE.

    SRC is an image tree such as torchvision's ImageFolder layout (class/img.jpg);
    any nesting works and relative paths are kept exactly. JPEGs are transcoded
    losslessly to progressive JPEG (identical pixels at full fidelity); other image
    formats are encoded at --quality and marked as re-encoded. SRC is never modified.

    Interrupted conversions (Ctrl-C, kill, full disk) resume when the same command
    is run again. Files that cannot be converted are listed in STORE/report.json;
    the command then exits 1 unless --skip-bad is given.

    STORE may be a URL such as s3://bucket/prefix (the bucket must exist): the
    conversion then runs in a staging directory under ~/.cache/pcrfs, uploads each
    record as it is finished and the manifest last.

    With --dask or --scheduler each record-sized batch of SRC is converted by a Dask
    task that writes its record straight into STORE; the store is the same as a local
    conversion's, and interrupted runs resume the same way.

    SRC may also be a PCR store (a directory with pcr.yaml, or a URL): its images are
    then copied into a new layout at STORE without their source -- e.g. an older store
    in --order shuffled -- every scan group checked against its CRC-32 and copied as
    stored (no transcoding); the views serve the same bytes, the adaptive index is
    carried over, and damaged images are reported as bad and left out.
    """
    from ..convert import list_sources
    from ..convert.target import check_arguments
    from ..jpeg.transcode import TranscodeOptions
    from ..remote.fs import RemoteOptions
    from ..store.sources.location import absolute_location, names_a_store

    if names_a_store(src):
        if use_dask or scheduler or quality_index:
            fail("copying a store into a new layout runs here (no --dask/--scheduler) and keeps its adaptive "
                 "index (no --quality-index)")
        _migrate(src, store, record_size, overwrite, quiet, order, seed, skip_bad, endpoint_url)
        return
    src = _source_tree(src)
    cluster = dask_cluster(use_dask, scheduler, workers)
    if cluster is not None:
        # workers open SRC and STORE themselves: give them paths that do not depend on our cwd
        src = Path(os.path.abspath(src))
        store = absolute_location(store)
    opts = TranscodeOptions(keep_metadata=keep_metadata, quality=quality, non_jpeg=non_jpeg, max_pixels=max_pixels)
    try:  # before a listing (of a store, or of every view of a mount): swapped or overlapping arguments
        check_arguments(src, store)
    except ValueError as e:
        fail(str(e))
    if not quiet:
        click.echo(f"Listing {src} ...", err=True)
    kwargs = dict(opts=opts, workers=workers, record_bytes=record_size, overwrite=overwrite,
                  listing=list_sources(src), remote=RemoteOptions(endpoint_url=endpoint_url),
                  quality_index=quality_index, order=order, seed=seed)
    result = _run_convert(src, store, kwargs, cluster, _ConvertProgress(quiet))
    _report_convert(result, store, skip_bad, endpoint_url)


def _source_tree(src: str) -> Path:
    """SRC as an image tree: a usage error (exit 2, as click says it for a path argument) if
    it is not a directory."""
    if not os.path.isdir(src):
        what = "is not a directory" if os.path.exists(src) else "does not exist"
        raise click.BadParameter(f"{src!r} {what} (SRC is an image tree, or a PCR store to copy into a new "
                                 "layout)", param_hint="'SRC'")
    return Path(src)


def _migrate(src: str, store: str, record_size: int, overwrite: bool, quiet: bool, order: str, seed: int,
             skip_bad: bool, endpoint_url: str | None) -> None:
    """convert's form with a store as SRC: pcrfs.convert.migrate, every failure one line."""
    from ..convert.migrate import migrate
    from ..convert.plan import refuse_overlap
    from ..convert.target import StoreExists
    from ..remote.fs import RemoteError, RemoteOptions
    from ..store.errors import StoreError
    from ..store.sources.location import image_tree_example, local_directory
    from ..store.write.writer import ResumeMismatch

    example = image_tree_example(store)
    if example is not None:
        fail(f"the store {store} looks like an image tree (it holds {example}), not a PCR store; are the "
             "arguments swapped? `pcrfs convert IMAGE_TREE STORE` reads IMAGE_TREE and writes STORE")
    try:
        src_dir, store_dir = local_directory(src), local_directory(store)
        if src_dir is not None and store_dir is not None:  # a URL overlaps nothing on this machine
            refuse_overlap(src_dir, store_dir)
        progress = _ConvertProgress(quiet)
        if not quiet:
            click.echo(f"Copying the store {src} into a new layout ({order}) at {store} ...", err=True)
        result = migrate(src, store, order=order, seed=seed, record_bytes=record_size, overwrite=overwrite,
                         remote=RemoteOptions(endpoint_url=endpoint_url), on_start=progress.on_start,
                         on_progress=progress.on_progress)
        progress.close()
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume", 130)
    except (StoreExists, ResumeMismatch, ValueError, StoreError, RemoteError) as e:
        fail(str(e))
    _report_convert(result, store, skip_bad, endpoint_url)


class _ConvertProgress:
    """convert's on_start/on_progress callbacks, drawing a tqdm bar on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar, self.bytes = quiet, None, 0

    def on_start(self, total: int, done: int) -> None:
        if done:
            click.echo(f"Resuming an interrupted conversion: {done} of {total} files already done.", err=True)
        if not self.quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="img", dynamic_ncols=True, desc="convert",
                            file=sys.stderr, smoothing=0.1)

    def on_progress(self, n: int, nbytes: int) -> None:
        if self.bar is not None:
            self.bytes += nbytes
            self.bar.update(n)
            elapsed = self.bar.format_dict["elapsed"] or 1e-9
            self.bar.set_postfix_str(f"{self.bytes / elapsed / 1e6:.1f} MB/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_convert(src: Path, store: str, kwargs: dict, cluster, progress: _ConvertProgress):
    """pcrfs.convert.convert, on ``cluster`` if there is one; every failure is one line."""
    from contextlib import nullcontext

    from ..convert import StoreExists, convert as run_convert
    from ..jpeg.turbojpeg import TurboJPEGUnavailable
    from ..remote.fs import RemoteError
    from ..store.write.writer import ResumeMismatch

    try:
        with cluster or nullcontext(None) as client:
            if client is not None:
                describe_cluster(client)
            return run_convert(src, store, on_start=progress.on_start, on_progress=progress.on_progress,
                               client=client, **kwargs)
    except KeyboardInterrupt:
        progress.close()
        fail("interrupted; run the same command again to resume", 130)
    except (StoreExists, ResumeMismatch, ValueError, FileNotFoundError, TurboJPEGUnavailable, RemoteError) as e:
        fail(str(e))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            fail(f"no space left on the device holding {store}; free some and run the same command "
                 "again to resume (finished records are kept)")
        fail(f"{e.filename or store}: {e.strerror or e}")
    except Exception as e:  # noqa: BLE001
        if cluster is None:
            raise
        dask_failure(e, "the conversion on Dask failed", "finished records are kept")
    finally:
        progress.close()


def _report_convert(result, store: str, skip_bad: bool, endpoint_url: str | None) -> None:
    from ..store import format as fmt
    from ..store.sources.location import join_location

    report_path = join_location(store, fmt.REPORT)
    # the ratio is of the whole source: a resumed run reads only the rest, the store holds all
    click.echo(
        f"{result.images} images in {result.manifest['num_records']} records, {result.manifest['num_groups']} scan groups; "
        f"{format_size(result.bytes_in)} read, {format_size(result.bytes_out)} stored "
        f"({result.ratio:.1%} of {format_size(result.source_bytes)} source) "
        f"in {result.seconds:.1f}s; {result.reencoded} re-encoded, {len(result.skipped)} skipped, "
        f"{len(result.bad)} bad.", err=True)
    if result.adaptive is not None:
        _report_adaptive(store, *result.adaptive, endpoint_url)
    for p in result.bad[:20]:
        click.echo(f"  bad: {p['path']}: {p['reason']}", err=True)
    if len(result.bad) > 20:
        click.echo(f"  ... {len(result.bad) - 20} more in {report_path}", err=True)
    if result.bad and not skip_bad:
        fail(f"{len(result.bad)} file(s) could not be converted (see {report_path}); "
             "the store holds the others. Use --skip-bad to accept this.")


def _report_adaptive(store: str, built, entry: dict, endpoint_url: str | None) -> None:
    """`convert --quality-index`: the adaptive views, as `quality --write-index` reports them."""
    from .quality import report_index

    with _open(store, endpoint_url) as s:
        report_index(s, store, built, entry, as_json=False)


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@endpoint_option
def info(store: str, as_json: bool, endpoint_url: str | None) -> None:
    """Show counts, classes, scan groups and the bytes each fidelity view needs."""
    from ..store.read.verify import cumulative_fractions

    s = _open(store, endpoint_url)
    m = s.manifest
    fractions = cumulative_fractions(s)
    summary = {
        "store": str(store), "format_version": m["format_version"], "pcrfs_version": m.get("pcrfs_version"),
        "created": m.get("created"), "images": m["num_images"], "classes": len(m.get("classes", [])),
        "records": m["num_records"], "scan_groups": m["num_groups"], "stored_bytes": m.get("total_bytes"),
        "reencoded": int((s.index.images["flags"] & 1).sum()), "options": m.get("options"),
        "order": m.get("order", "shuffled" if s.index.shuffled else "source"), "seed": m.get("seed"),
        "views": fractions,
    }
    summary.update(_adaptive_views(s))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"store        {store}")
    click.echo(f"images       {summary['images']} in {summary['classes']} classes, {summary['records']} records "
               f"({summary['reencoded']} re-encoded)")
    click.echo(f"stored       {format_size(summary['stored_bytes'] or 0)}, {summary['scan_groups']} scan groups")
    seed = f", seed {summary['seed']}" if summary["order"] == "shuffled" and summary["seed"] is not None else ""
    click.echo(f"order        {summary['order']}{seed} (format version {summary['format_version']})")
    click.echo("")
    click.echo(f"{'view':>6}  {'bytes':>12}  {'of full':>8}")
    for v in fractions:
        click.echo(f"{'scan' + str(v['k']):>6}  {format_size(v['bytes']):>12}  {v['fraction']:>8.1%}")
    full = fractions[-1] if fractions else {"bytes": 0, "fraction": 1.0}  # every group: scanN's bytes
    click.echo(f"{'full':>6}  {format_size(full['bytes']):>12}  {full['fraction']:>8.1%}")
    for v in summary["adaptive_views"]:
        click.echo(f"{v['view']:>6}  {format_size(v['bytes']):>12}  {v['fraction']:>8.1%}  "
                   f"per image: smallest k with MS-SSIM >= {v['threshold']:g} (mean k {v['mean_k']:.2f})")
    if summary.get("adaptive_index_error"):
        click.echo(f"adaptive views not shown: {summary['adaptive_index_error']}")


def _adaptive_views(s) -> dict:
    """`info`'s adaptive views (pcrfs quality --write-index): bytes and fraction of the full view each."""
    from ..quality.scoring import summarize
    from ..store.format import adaptiveindex as adaptive

    try:
        index = adaptive.load(s)
    except adaptive.AdaptiveIndexError as e:
        return {"adaptive_views": [], "adaptive_index_error": str(e)}
    if index is None:
        return {"adaptive_views": []}
    views = summarize(s, index.ks, index.thresholds)
    return {"adaptive_views": [{k: v[k] for k in ("view", "threshold", "bytes", "fraction", "mean_k")}
                               for v in views]}


@main.command()
@click.argument("store")
@quiet_option
@endpoint_option
def verify(store: str, quiet: bool, endpoint_url: str | None) -> None:
    """Check every scan group's checksum and the store structure.

    Names each damaged image and group; exits 1 if anything is wrong.
    """
    from tqdm import tqdm

    from ..store.read.verify import verify_store

    s = _open(store, endpoint_url)
    total = int(s.index.records["size"].sum()) if len(s.index.records) else 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=quiet, file=sys.stderr) as bar:
        damage = verify_store(s, on_record=bar.update)
    for d in damage:
        click.echo(f"DAMAGED {d}")
    if damage:
        fail(f"{len(damage)} problem(s) found in {store}")
    click.echo(f"OK: {s.num_images} images, {len(s.index.records)} records, all checksums match", err=True)


@main.command()
@click.argument("store")
@click.argument("path")
@click.option("-k", "--scan", "k", type=click.IntRange(1), default=None,
              help="Number of scan groups (fidelity) [default: full].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here instead of standard output.")
@endpoint_option
def get(store: str, path: str, k, output, endpoint_url: str | None) -> None:
    """Extract the image at PATH (relative, as in the source tree) at fidelity --scan."""
    from ..store.read.reader import CorruptData, StoreUnavailable

    s = _open(store, endpoint_url)
    k = k or s.num_groups
    if k > s.num_groups:
        fail(f"--scan must be at most {s.num_groups} for this store")
    try:
        size = s.size(path, k)
        if size <= GET_PIECE:
            data = s.read(path, k)
        else:  # in pieces: a file of huge scan groups in bounded memory, each piece checked
            data = None
            pieces = (s.read_at(path, k, off, GET_PIECE) for off in range(0, size, GET_PIECE))
            first = next(pieces)
    except KeyError:
        view, _, rest = path.strip("/").partition("/")
        if rest and re.fullmatch(r"scan\d+|full|ssim\d+", view):  # a path as the mount shows it
            k = f" --scan {min(int(view[4:]), s.num_groups)}" if view.startswith("scan") else ""
            fail(f"no image {path!r} in {store}: PATH is as in the source tree, without a view; "
                 f"try: pcrfs get {store} {rest}{k}")
        fail(f"no image {path!r} in {store}")
    except (CorruptData, StoreUnavailable) as e:
        fail(e.strerror or str(e))
    if output is None and sys.stdout.isatty():
        fail("refusing to write JPEG bytes to a terminal; use -o FILE or a pipe")
    if data is not None:
        _write_out(output, data)
        return
    _write_pieces(output, first, pieces)


GET_PIECE = 64 << 20  # `pcrfs get` writes a file larger than this in pieces of this size


def _write_out(output: Path | None, data: bytes) -> None:
    if output is None:
        _write_stdout(data)
        return
    try:
        output.write_bytes(data)
    except OSError as e:
        fail(f"cannot write {output}: {e.strerror or e}")


def _write_pieces(output: Path | None, first: bytes, pieces) -> None:
    """``first`` then every piece to ``output`` (standard output if None), each failure one
    line; a file that could not be written whole is removed (never left partly right)."""
    from ..store.read.reader import CorruptData, StoreUnavailable

    try:
        out = open(output, "wb") if output is not None else sys.stdout.buffer
    except OSError as e:
        fail(f"cannot write {output}: {e.strerror or e}")
    try:
        out.write(first)
        for piece in pieces:
            out.write(piece)
        out.flush()
    except (CorruptData, StoreUnavailable) as e:
        _drop_partial(output, out)
        fail(e.strerror or str(e))
    except BrokenPipeError:  # the reader went away (`| head -c 100`): as for cat
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except OSError as e:
        _drop_partial(output, out)
        fail(f"cannot write {output or 'to standard output'}: {e.strerror or e}")
    if output is not None:
        out.close()


def _drop_partial(output: Path | None, out) -> None:
    if output is not None:
        out.close()
        output.unlink(missing_ok=True)


def _write_stdout(data: bytes) -> None:
    """Write ``data`` to standard output, flushed here so that a full disk or a closed
    pipe is one line now rather than a traceback at exit."""
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        # the reader went away (`| head -c 100`): as for cat, not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except OSError as e:
        # stdout now holds unwritten bytes: drop them so that exit does not try again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        fail(f"cannot write to standard output: {e.strerror or e}")


# The mount commands import no libfuse until they run.
from .mount import register as _register_fuse_commands  # noqa: E402

_register_fuse_commands(main)

from .quality import register as _register_quality  # noqa: E402

_register_quality(main)

from .demo import register as _register_demo  # noqa: E402

_register_demo(main)

if __name__ == "__main__":
    main()
