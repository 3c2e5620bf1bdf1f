"""A built-in demo dataset of real photographs, in ImageFolder layout.

The photographs are the samples scikit-image ships inside its wheel
(``skimage/data``). They are read straight from the package directory with
Pillow rather than through ``skimage.data.<name>()``: some of those loaders
fall back to downloading through pooch, and the demo must never touch the
network.

Every image is a random crop of one source photo, resized to an
ImageNet-like size and saved as a baseline JPEG with varied quality and
chroma subsampling, so a converter sees the same kind of input it would see
on a real dataset. Output is byte-for-byte deterministic for a given seed
(on the same Pillow/libjpeg build).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

__all__ = ["DemoSummary", "make_demo", "demo_photos", "CLASSES"]

_INSTALL_HINT = "the demo dataset needs scikit-image: pip install 'pcrfs[demo]'"

# class name -> file names inside skimage/data. Grey sources (moon, cell,
# brick, grass, gravel) give the dataset its greyscale content.
CLASSES: dict[str, tuple[str, ...]] = {
    "astronaut": ("astronaut.png",),
    "cat": ("chelsea.png",),
    "coffee": ("coffee.png",),
    "motorcycle": ("motorcycle_left.png", "motorcycle_right.png"),
    "rocket": ("rocket.jpg",),
    "space": ("hubble_deep_field.jpg", "moon.png"),
    "microscopy": ("retina.jpg", "ihc.png", "cell.png"),
    "texture": ("brick.png", "grass.png", "gravel.png"),
}

# ImageNet-ish shapes: most photos are landscape 4:3 with a 500 px long side.
_ASPECTS = np.array([4 / 3, 3 / 4, 1.0, 3 / 2, 2 / 3, 16 / 9, 5 / 4])
_ASPECT_P = np.array([0.45, 0.15, 0.10, 0.12, 0.06, 0.06, 0.06])
_MIN_SIDE, _MAX_SIDE = 300, 640


@dataclass(frozen=True)
class DemoSummary:
    """What :func:`make_demo` wrote."""

    classes: list[str]
    count: int
    total_bytes: int
    files: list[Path] = field(default_factory=list, repr=False)


def _skimage_data_dir() -> Path:
    try:
        import skimage.data
    except ImportError as e:
        raise RuntimeError(_INSTALL_HINT) from e
    return Path(skimage.data.__file__).parent


@lru_cache(maxsize=1)
def _load_photos() -> dict[str, np.ndarray]:
    data_dir = _skimage_data_dir()
    photos: dict[str, np.ndarray] = {}
    for files in CLASSES.values():
        for fname in files:
            path = data_dir / fname
            if not path.is_file():
                continue  # an older/newer wheel may lack one sample; the class survives on the rest
            with Image.open(path) as im:
                im = im.convert("L" if im.mode in ("L", "I;16", "I", "1") else "RGB")
                arr = np.asarray(im)
            arr.setflags(write=False)  # shared via the cache: nobody may scribble on it
            photos[Path(fname).stem] = arr
    if not photos:
        raise RuntimeError(f"no sample photographs found in {data_dir}; {_INSTALL_HINT}")
    return photos


def demo_photos() -> dict[str, np.ndarray]:
    """The source photographs by name (uint8, HxWx3 colour or HxW grey, read-only)."""
    return dict(_load_photos())


def _available_classes() -> dict[str, list[str]]:
    photos = _load_photos()
    out = {}
    for cls, files in CLASSES.items():
        names = [Path(f).stem for f in files if Path(f).stem in photos]
        if names:
            out[cls] = names
    return out


def _target_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) like ImageNet's: mostly a 500 px long side, sometimes anything."""
    aspect = float(rng.choice(_ASPECTS, p=_ASPECT_P))
    if rng.random() < 0.6:
        long_side = 500
    else:
        long_side = int(rng.integers(_MIN_SIDE + 40, _MAX_SIDE + 1))  # odd sizes included
    if aspect >= 1:
        w, h = long_side, round(long_side / aspect)
    else:
        w, h = round(long_side * aspect), long_side
    if rng.random() < 0.15:  # jitter one side by a few px so not everything is a tidy ratio
        h += int(rng.integers(-7, 8))
    return max(w, _MIN_SIDE), max(h, _MIN_SIDE)


def _crop_box(rng: np.random.Generator, src_w: int, src_h: int,
              aspect: float) -> tuple[float, float, float, float]:
    """A random box with the target's aspect ratio covering 35-100% of the largest fit."""
    fit_w = min(src_w, src_h * aspect)
    scale = float(np.sqrt(rng.uniform(0.35, 1.0)))
    cw, ch = fit_w * scale, fit_w * scale / aspect
    x0 = rng.uniform(0, src_w - cw)
    y0 = rng.uniform(0, src_h - ch)
    return x0, y0, x0 + cw, y0 + ch


def _render(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    w, h = _target_size(rng)
    src = Image.fromarray(photo)
    box = _crop_box(rng, src.width, src.height, w / h)
    out = src.resize((w, h), Image.Resampling.LANCZOS, box=box)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def _encode(im: Image.Image, rng: np.random.Generator) -> bytes:
    """Baseline JPEG; quality 80-95, mostly 4:2:0 with some 4:4:4."""
    quality = int(rng.integers(80, 96))
    subsampling = 0 if rng.random() < 0.2 else 2
    grey = im.mode == "L"
    if grey and rng.random() < 0.5:
        # much real grey content (ImageNet included) is stored as 3-channel JPEG
        im = im.convert("RGB")
        grey = False
    buf = io.BytesIO()
    kwargs = {} if grey else {"subsampling": subsampling}
    im.save(buf, format="JPEG", quality=quality, progressive=False, optimize=False, **kwargs)
    return buf.getvalue()


def _prepare_dest(dest: Path, overwrite: bool) -> None:
    if dest.exists():
        if not dest.is_dir():
            raise ValueError(f"{dest} exists and is not a directory")
        if any(dest.iterdir()) and not overwrite:
            raise ValueError(f"{dest} is not empty; refusing to write the demo dataset into it "
                             "(choose an empty or new directory)")
    dest.mkdir(parents=True, exist_ok=True)


def make_demo(dest: Path, per_class: int = 50, seed: int = 0,
              progress: Callable[[int, int], None] | bool = False,
              *, overwrite: bool = False) -> DemoSummary:
    """Write ``dest/<class>/<class>_NNNN.jpg``: ``per_class`` baseline JPEGs per class.

    ``progress``, if callable, is called with (images written, images in all) after each
    image (``pcrfs make-demo`` draws its bar from it); nothing here writes to the terminal.

    With ``overwrite=True`` an existing non-empty ``dest`` is written into:
    demo files of the same name are replaced, nothing else is deleted.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    dest = Path(dest)
    classes = _available_classes()  # fails (RuntimeError) before touching dest
    _prepare_dest(dest, overwrite)
    photos = _load_photos()

    files: list[Path] = []
    total = 0
    for ci, (cls, sources) in enumerate(classes.items()):
        cdir = dest / cls
        cdir.mkdir(exist_ok=True)
        for i in range(per_class):
            # one generator per image: image i is the same whatever per_class is
            rng = np.random.default_rng([seed, ci, i])
            photo = photos[sources[int(rng.integers(len(sources)))]]
            data = _encode(_render(photo, rng), rng)
            path = cdir / f"{cls}_{i:04d}.jpg"
            path.write_bytes(data)
            files.append(path)
            total += len(data)
            if callable(progress):
                progress(len(files), len(classes) * per_class)
    return DemoSummary(classes=list(classes), count=len(files), total_bytes=total, files=files)
