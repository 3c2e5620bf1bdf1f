"""``pcrfs demo`` (the whole tour in one command) and ``pcrfs make-demo`` (its dataset).

:mod:`pcrfs.cli.main` calls :func:`register`. The dataset itself is :mod:`pcrfs.demo`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import click

from ..fuse.mounting import MountError, mount, mount_entry, umount
from ..units import format_size
from .mount import format_stats, read_stats
from .options import echo_err, fail


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


class _Bar:
    """make_demo's ``progress`` callback drawing a tqdm bar on stderr (made at the first
    image, so that a dataset that cannot be made leaves one error line, not a bar)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="demo")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@click.command("make-demo")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", type=click.IntRange(1), default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def make_demo_cmd(dest: Path, per_class: int, seed: int) -> None:
    """Write the demo dataset (real photographs, ImageFolder layout) to DEST."""
    from ..demo import make_demo

    bar = _Bar()
    try:
        summary = make_demo(dest, per_class=per_class, seed=seed, progress=bar)
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    finally:
        bar.close()
    click.echo(f"{summary.count} JPEGs in {len(summary.classes)} classes, "
               f"{format_size(summary.total_bytes)} in {dest}", err=True)


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
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="pcrfs-demo-"))
    workdir = workdir.resolve()
    photos, store, mnt = workdir / "photos", workdir / "demo.pcr", workdir / "mnt"
    _make_photos(photos, per_class, seed)
    _convert(photos, store)
    _mount(store, mnt)
    try:
        _tour(mnt, photos)
    finally:
        if keep_mounted:
            _step("Left mounted. Explore it, then: pcrfs umount " + str(mnt))
        else:
            _step("7. Unmount")
            try:
                umount(mnt, echo=click.echo)
            except MountError as e:
                fail(str(e))
            click.echo(f"(the photos and the store stay in {workdir})")


def _make_photos(photos: Path, per_class: int, seed: int) -> None:
    from ..demo import make_demo

    _step(f"1. A dataset of real photographs in ImageFolder layout: {photos}")
    if photos.is_dir() and any(photos.iterdir()):
        click.echo("(already there; reusing it)")
        return
    try:
        s = make_demo(photos, per_class=per_class, seed=seed)
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    click.echo(f"{s.count} baseline JPEGs in {len(s.classes)} classes, {format_size(s.total_bytes)}")


def _convert(photos: Path, store: Path) -> None:
    from ..convert import StoreExists, convert

    _step(f"2. Convert it to a PCR store (lossless): {store}")
    try:
        r = convert(photos, store, workers=os.cpu_count())
        click.echo(f"{r.images} images, {r.manifest['num_groups']} scan groups, "
                   f"{format_size(r.bytes_in)} in, {format_size(r.bytes_out)} stored, {r.seconds:.1f}s")
    except StoreExists:
        click.echo("(already converted; reusing it)")


def _mount(store: Path, mnt: Path) -> None:
    _step(f"3. Mount it: pcrfs mount {store} {mnt}")
    mnt.mkdir(exist_ok=True)
    try:
        if mount_entry(str(mnt)) is not None:
            umount(mnt, echo=echo_err)
        mount(store, mnt, echo=click.echo)
    except MountError as e:
        fail(str(e))


def _tour(mnt: Path, photos: Path) -> None:
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
    _decode(mnt, photos, first.relative_to(mnt / "full"))
    click.echo("")
    click.echo(format_stats(read_stats(mnt)))


def _decode(mnt: Path, photos: Path, rel: Path) -> None:
    """Step 6: one image, full view against the source, and scan1 against full."""
    import numpy as np
    from PIL import Image

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


def register(main: click.Group) -> None:
    """Add demo and make-demo to the ``pcrfs`` command group."""
    for cmd in (demo_cmd, make_demo_cmd):
        main.add_command(cmd)
