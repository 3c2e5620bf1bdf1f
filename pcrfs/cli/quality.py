"""`pcrfs quality`: the quality/bytes trade-off of a store, targets, and the adaptive index."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..units import format_size
from .options import dask_cluster, dask_failure, dask_options, describe_cluster, endpoint_option, fail, quiet_option


def _warn(message: str) -> None:
    click.echo(f"pcrfs: warning: {message}", err=True)


def _progress(quiet: bool, desc: str):
    """(on_start, on_done, close) callbacks driving a tqdm bar on stderr."""
    from tqdm import tqdm

    bar = None

    def on_start(total: int) -> None:
        nonlocal bar
        if not quiet:
            bar = tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def on_done(n: int) -> None:
        if bar is not None:
            bar.update(n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return on_start, on_done, close


ADVICE_AFTER_S = 60.0  # a table expected to take longer gets one line of advice on stderr


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _table_progress(quiet: bool, timing: bool, exact: bool):
    """(on_start, on_done, close) for the table: the bar (with its ETA), and once the first
    images show that the whole sample will take over ADVICE_AFTER_S, a line on what is quicker."""
    from tqdm import tqdm

    on_start, on_done, close = _progress(quiet, "quality")
    state = {"t0": 0.0, "t1": 0.0, "total": 0, "done": 0, "advised": False}

    def start(total: int) -> None:
        state.update(t0=time.monotonic(), total=total)
        on_start(total)

    def done(n: int) -> None:
        on_done(n)
        state["done"] += n
        finished, total = state["done"], state["total"]
        now = time.monotonic()
        if finished == n:  # the first result: workers started, caches warm; the rate counts from here
            state["t1"] = now
        if state["advised"] or finished < 4 or finished >= total:
            return
        each = (now - state["t1"]) / (finished - 1)
        expected = now - state["t0"] + each * (total - finished)
        if expected > ADVICE_AFTER_S:
            state["advised"] = True
            tips = [f"--sample {max(10, total // 4)} measures a quarter of the images in about a quarter "
                    f"of the time"]
            if timing:
                tips.append("--no-timing skips the RGB decode timing")
            if exact:
                tips.append("without --exact large images are estimated, at about half the cost")
            tqdm.write(f"pcrfs: measuring {total} images will take about {_duration(expected)} "
                       f"({each:.2f} s an image); " + "; ".join(tips) + ".", file=sys.stderr)

    return start, done, close


def format_table(table) -> str:
    """The terminal table: one line per view."""
    head = (f"{'view':<8} {'bytes/img':>10} {'of full':>8} {'per image':>15}  {'PSNR dB':>7} {'p5':>6}  "
            f"{'MS-SSIM':>7} {'p5':>7}  {'decode':>7}")
    lines = [head, f"{'':<8} {'':>10} {'':>8} {'mean ± sd':>15}  {'mean':>7} {'':>6}  {'mean':>7} {'':>7}  "
                   f"{'ms/img':>7}"]
    for n, r in enumerate(table.rows):
        if r.k is None and n and table.rows[n - 1].k is not None:
            lines.append("")  # adaptive views below the fixed ones
        decode = f"{r.decode_ms_mean:7.2f}" if r.decode_ms_mean is not None else f"{'-':>7}"
        spread = f"{r.fraction_mean:.1%} ± {r.fraction_std:.1%}"
        lines.append(f"{r.view:<8} {format_size(r.bytes_mean):>10} {r.fraction_total:>8.1%} {spread:>15}  "
                     f"{r.psnr_mean:7.2f} {r.psnr_p5:6.2f}  {r.ms_ssim_mean:7.4f} {r.ms_ssim_p5:7.4f}  {decode}")
    return "\n".join(lines)


def _describe_choice(choice, metric_label: str) -> str:
    r = choice.row
    value = f"{choice.value:.4f}" if choice.metric == "ms_ssim" else f"{choice.value:.2f} dB"
    target = f"{choice.target:g}" if choice.metric == "ms_ssim" else f"{choice.target:g} dB"
    return (f"{r.view} is the smallest view whose 5th-percentile {metric_label} ({value}) reaches {target}: "
            f"it reads {r.fraction_total:.1%} of the full view's bytes, a saving of {choice.saving:.1%}.")


def _load_adaptive(store):
    from ..store.format.adaptiveindex import AdaptiveIndexError, load

    try:
        return load(store)
    except AdaptiveIndexError as e:
        _warn(f"{e}; the table shows the fixed-k views only")
        return None


def _progress_resumable(quiet: bool, desc: str):
    """(on_start(total, already), on_done, close) for a run that may resume."""
    on_start, on_done, close = _progress(quiet, desc)

    def start(total: int, already: int) -> None:
        if already:
            click.echo(f"Resuming: {already} of {total} images already scored.", err=True)
        on_start(total)
        on_done(already)

    return start, on_done, close


def report_index(store, store_path: str, built, entry: dict, as_json: bool) -> None:
    """What `quality --write-index` and `convert --quality-index` print about the new index."""
    from ..quality import scoring as adaptive

    for image, reason in built.failures[:20]:
        _warn(f"{store.path(image)}: not scored ({reason}); its adaptive views serve it whole")
    summary = {"store": store_path, "file": entry["file"], "images": store.num_images,
               "not_scored": len(built.failures), "resumed": built.resumed,
               "views": adaptive.summarize(store, built.ks, entry["thresholds"])}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"wrote index/{entry['file']} for {store.num_images} images "
               f"({len(built.failures)} not scored); the mount now shows {', '.join(entry['views'])}")
    click.echo(f"{'view':<8} {'MS-SSIM >=':>10} {'bytes':>12} {'of full':>8} {'mean k':>7}  images per k")
    for v in summary["views"]:
        counts = " ".join(f"k{k}:{c}" for k, c in v["k_counts"].items())
        click.echo(f"{v['view']:<8} {v['threshold']:>10g} {format_size(v['bytes']):>12} {v['fraction']:>8.1%} "
                   f"{v['mean_k']:>7.2f}  {counts}")


def _write_index(store, store_path: str, workers: int, quiet: bool, as_json: bool, client=None,
                 remote=None) -> None:
    from ..quality.build import build_and_write

    on_start, on_done, close = _progress_resumable(quiet, "score")
    try:
        built, entry = build_and_write(store, workers=workers, client=client, remote=remote,
                                       on_start=on_start, on_done=on_done)
    except KeyboardInterrupt:
        close()
        fail("interrupted; the store is unchanged and scored parts are kept: run the same command "
              "again to resume", 130)
    finally:
        close()
    report_index(store, store_path, built, entry, as_json)


@click.command("quality")
@click.argument("store")
@click.option("--sample", type=click.IntRange(1), default=200, show_default=True,
              help="Images to measure (a reproducible random sample; all if the store has fewer).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on standard output.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a plot of quality against bytes (PNG, or any format matplotlib knows by extension).")
@click.option("--target-ssim", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Print the smallest k whose 5th-percentile MS-SSIM reaches this (0-1] and what it saves.")
@click.option("--target-psnr", type=click.FloatRange(0, None, min_open=True), default=None,
              help="The same for PSNR in dB (identical decodes count as 60 dB).")
@click.option("--write-index", is_flag=True,
              help="Score every image and store, per image, the smallest k reaching MS-SSIM 0.90/0.95/0.98; "
                   "mounts then show ssim90/, ssim95/, ssim98/.")
@click.option("--no-timing", is_flag=True,
              help="Skip the RGB decode timing (timed on 32 images of the sample otherwise).")
@click.option("--exact", is_flag=True,
              help="Score every window of large images too (slower): by default a scale with over 2M "
                   "windows (images over ~2 Mpx) has its MS-SSIM term estimated on 2M of them.")
@click.option("-j", "--workers", type=click.IntRange(1), default=None,
              help="Worker processes [default: all cores].")
@quiet_option
@dask_options("With --write-index: score on a Dask LocalCluster of -j worker processes (pip install 'pcrfs[dask]').",
              "With --write-index: score on the Dask cluster at ADDR; workers must read STORE at the "
              "same path or URL.")
@endpoint_option
@click.pass_context
def quality_cmd(ctx: click.Context, store: str, sample: int, seed: int, as_json: bool, plot: Path | None,
                target_ssim: float | None, target_psnr: float | None, write_index: bool, no_timing: bool,
                exact: bool, workers: int | None, quiet: bool, use_dask: bool, scheduler: str | None,
                endpoint_url: str | None) -> None:
    """How much quality each fidelity view keeps, for how many bytes.

    \b
    On a reproducible sample of STORE's images, every view scanK is decoded and
    compared with the full decode of the same image: PSNR and MS-SSIM (Wang et
    al. 2003, 5 scales, on luminance), as a mean and as the 5th percentile over
    images (the bad tail), with the byte fraction each view reads and the time
    a full RGB decode of it takes (timed on 32 images of the sample). It costs
    up to about twice what --write-index spends on the same images; a progress
    bar shows the time left. Images over ~2 Mpx have their MS-SSIM estimated on
    a sample of each large scale's windows (within 2e-4 on 12-20 Mpx photos;
    an estimate within 1e-3 of 0.90/0.95/0.98 or --target-ssim is computed on
    every window; --exact: every window always).

    \b
    Examples:
      pcrfs quality /data/train.pcr --target-ssim 0.95     # which scanK to train on
      pcrfs quality /data/train.pcr --plot quality.png --json > quality.json
      pcrfs quality /data/train.pcr --write-index          # per-image k: ssim90/ ssim95/ ssim98/
      pcrfs quality /data/train.pcr --write-index --scheduler tcp://head:8786

    \b
    --write-index keeps every scored part under STORE/.adaptive-partial until the
    index is written: an interrupted run resumes where it stopped.
    """
    from ..quality import measure
    from ..remote.fs import RemoteOptions

    table_flags = [name for name, on in (("--no-timing", no_timing), ("--exact", exact)) if on]
    _check_usage(ctx, plot, target_ssim, target_psnr, write_index, table_flags, use_dask, scheduler)
    s = _open_scored_store(store, endpoint_url)
    workers = workers or measure.default_workers()
    _warn_slow_blas()
    if write_index:
        _write_index_cmd(s, store, workers, quiet, as_json, use_dask, scheduler,
                         RemoteOptions(endpoint_url=endpoint_url))
        return
    table = _measure(s, store, sample, seed, not no_timing, workers, quiet, exact,
                     () if target_ssim is None else (target_ssim,))
    choice = None
    if target_ssim is not None:
        choice = measure.choose_k(table.rows, "ms_ssim", target_ssim)
    elif target_psnr is not None:
        choice = measure.choose_k(table.rows, "psnr", target_psnr)
    if plot is not None:
        _plot(table, plot, choice)
    _report_table(store, table, seed, choice, as_json, targeted=target_ssim is not None or target_psnr is not None)
    if plot is not None:
        click.echo(f"plot written to {plot}", err=True)
    if (target_ssim is not None or target_psnr is not None) and choice is None:
        fail("no view reaches the target on this sample")


def _warn_slow_blas() -> None:
    from ..quality.search import blas_kernel_note

    note = blas_kernel_note()
    if note:
        _warn(note)


def _check_usage(ctx: click.Context, plot: Path | None, target_ssim: float | None, target_psnr: float | None,
                 write_index: bool, table_flags: list[str], use_dask: bool, scheduler: str | None) -> None:
    """The combinations of options `quality` refuses (click's usage errors)."""
    from ..quality.msssim import PSNR_CAP

    if target_ssim is not None and target_psnr is not None:
        raise click.UsageError("give --target-ssim or --target-psnr, not both")
    if target_psnr is not None and target_psnr > PSNR_CAP:
        raise click.BadParameter(f"must be at most {PSNR_CAP:g} dB (identical decodes count as {PSNR_CAP:g} dB)",
                                 param_hint="--target-psnr")
    if (use_dask or scheduler) and not write_index:
        raise click.UsageError("--dask and --scheduler apply to --write-index")
    if use_dask and scheduler:
        raise click.UsageError("--dask and --scheduler are mutually exclusive")
    if write_index:
        given = [name for name, on in (("--plot", plot is not None), ("--target-ssim", target_ssim is not None),
                                       ("--target-psnr", target_psnr is not None)) if on] + table_flags
        for name in ("sample", "seed"):
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                given.append(f"--{name}")
        if given:
            raise click.UsageError(f"--write-index scores every image and cannot be combined with {', '.join(given)}")
    if plot is not None:
        if not plot.parent.is_dir():
            raise click.BadParameter(f"directory {str(plot.parent)!r} does not exist", param_hint="--plot")
        from ..quality.plot import check_format

        problem = check_format(plot)
        if problem:
            raise click.BadParameter(problem, param_hint="--plot")


def _open_scored_store(store: str, endpoint_url: str | None):
    """The store to score (one error line if it cannot be opened or holds no images)."""
    from ..remote.fs import RemoteOptions
    from ..store.read.reader import ReadOptions, StoreError, open_store

    try:
        s = open_store(store, options=ReadOptions(remote=RemoteOptions(endpoint_url=endpoint_url)))
    except StoreError as e:
        fail(str(e))
    if s.num_images == 0:
        fail(f"{store} holds no images")
    return s


def _measure(s, store: str, sample: int, seed: int, timing: bool, workers: int, quiet: bool, exact: bool,
             exact_near: tuple[float, ...]):
    """The quality table of a sample (fixed-k and adaptive views), with a progress bar."""
    from ..quality import measure

    adaptive_ks = None
    index = _load_adaptive(s)
    if index is not None:
        adaptive_ks = {v: (t, index.column(v, s.num_groups)) for v, t in zip(index.views, index.thresholds)}
    on_start, on_done, close = _table_progress(quiet, timing, exact)
    try:
        return measure.quality_table(s, sample=sample, seed=seed, timing=timing, workers=workers,
                                     adaptive=adaptive_ks, exact_near=exact_near,
                                     sample_windows=None if exact else measure.SAMPLE_WINDOWS,
                                     on_start=on_start, on_done=on_done)
    except KeyboardInterrupt:
        close()
        fail("interrupted", 130)
    except measure.MeasureFailed as e:
        close()
        fail(f"{s.path(e.image)} could not be scored: {e.reason} (run `pcrfs verify {store}`)")
    finally:
        close()


def _plot(table, plot: Path, choice) -> None:
    from ..quality.plot import plot_table

    try:
        plot_table(table, plot, choice=choice)
    except ImportError:
        fail("--plot needs matplotlib: pip install matplotlib")


def _report_table(store: str, table, seed: int, choice, as_json: bool, targeted: bool) -> None:
    """The table (and the chosen view) as JSON or for the terminal."""
    if as_json:
        doc = table.as_dict()
        if choice is not None or targeted:
            doc["target"] = None if choice is None else {
                "metric": choice.metric, "target": choice.target, "view": choice.row.view, "k": choice.row.k,
                "p5": choice.value, "fraction": choice.row.fraction_total, "saving": choice.saving}
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{store}: {len(table.sample)} of {table.images} images (seed {seed}), "
               f"quality against each image's full decode; p5 = 5th percentile over images")
    click.echo(format_table(table))
    notes = []
    if table.timed and len(table.timed) < len(table.sample):
        notes.append(f"decode: mean over {len(table.timed)} of the {len(table.sample)} images")
    if table.estimated:
        notes.append(f"MS-SSIM of {len(table.estimated)} large images estimated on "
                     f"{table.sample_windows / 2**20:g}M windows a scale (--exact: every window)")
    if notes:
        click.echo("; ".join(notes))
    if choice is not None:
        click.echo("")
        click.echo(_describe_choice(choice, "MS-SSIM" if choice.metric == "ms_ssim" else "PSNR"))


def _write_index_cmd(s, store: str, workers: int, quiet: bool, as_json: bool, use_dask: bool,
                     scheduler: str | None, remote) -> None:
    from contextlib import nullcontext

    from ..store.read.reader import StoreError

    cluster = dask_cluster(use_dask, scheduler, workers if use_dask else None)
    try:
        with cluster or nullcontext(None) as client:
            if client is not None:
                describe_cluster(client)
            _write_index(s, store, workers, quiet, as_json, client=client, remote=remote)
    except (OSError, ValueError, StoreError) as e:
        fail(f"could not write the adaptive index: {e}")
    except Exception as e:  # noqa: BLE001
        if cluster is None:
            raise
        dask_failure(e, "scoring on Dask failed", "scored parts are kept")


def register(main: click.Group) -> None:
    """Add `quality` to the ``pcrfs`` command group."""
    main.add_command(quality_cmd)
