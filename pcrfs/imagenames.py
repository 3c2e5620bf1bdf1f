"""Which files of a source tree are images, by name (and, for a name without an
extension, by its first bytes): what ``convert`` takes, and what tells an image tree
from a store when a command is given one for the other."""
from __future__ import annotations

import os
import re

# Names that claim an image (case-insensitive): torchvision's IMG_EXTENSIONS, the other
# formats the converter re-encodes, and formats it cannot read (a .heic is named as an
# image: it is reported as bad, not skipped). A file with another extension (README.md,
# labels.txt, meta.json) is skipped and listed in the report, as ImageFolder skips it.
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".pjpeg", ".pjp", ".png", ".apng", ".ppm", ".pgm", ".pbm", ".pnm",
    ".bmp", ".dib", ".tif", ".tiff", ".webp", ".gif", ".tga", ".ico", ".jp2", ".j2k", ".jpx", ".jpf",
    ".jpc", ".j2c", ".mpo", ".heic", ".heif", ".avif", ".jxl",
})
# The first bytes of the formats above (TGA has none), for a file not named as an image
_IMAGE_MAGIC = re.compile(
    rb"\xff\xd8\xff|\x89PNG\r\n\x1a\n|GIF8[79]a|BM.{4}\x00\x00\x00\x00|II\*\x00|MM\x00\*|RIFF.{4}WEBP"
    rb"|\x00\x00\x00\x0cjP  |\xffO\xffQ|\x00\x00\x01\x00|P[1-7]\s+[#0-9]"
    rb"|\x00\x00\x00.ftyp(?:heic|heix|mif1|avif)", re.DOTALL)


def image_by_name(name: str, path: str | None = None) -> str | None:
    """Why the regular file ``name`` is not an image to convert, or None if it is one.

    A name with an image extension (:data:`IMAGE_SUFFIXES`) is one: converted, or reported
    as bad if it fails. Any other file is one only if its first bytes (read from ``path``)
    are an image's: a JPEG named ``x.txt`` or without an extension is converted, a
    README.md or labels.txt is skipped (as torchvision's ImageFolder skips it). A file
    that cannot be read is left to the converter, which reports why."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix in IMAGE_SUFFIXES or path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            head = os.read(fd, 16)
        finally:
            os.close(fd)
    except OSError:
        return None
    if _IMAGE_MAGIC.match(head):
        return None
    named = f"by its name ({suffix})" if suffix else "by its name (no extension)"
    return f"not an image {named} nor by its first bytes; skipped, as ImageFolder would skip it"


def looks_like_image_tree(path: str | os.PathLike, budget: int = 2000) -> str | None:
    """The relative path of an image file near the top of the directory ``path`` (in it
    or one level down, as in class/img.jpg), or None: what a store never holds. Looks at
    no more than ``budget`` entries."""
    def images_in(directory: str, prefix: str, subdirs: list | None) -> str | None:
        nonlocal budget
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    budget -= 1
                    if budget < 0:
                        return None
                    if entry.name.startswith("."):
                        continue
                    if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                        return prefix + entry.name
                    if subdirs is not None and entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry)
        except OSError:
            return None
        return None

    subdirs: list[os.DirEntry] = []
    found = images_in(os.fspath(path), "", subdirs)
    for sub in sorted(subdirs, key=lambda e: e.name):
        if found or budget <= 0:
            break
        found = images_in(sub.path, sub.name + "/", None)
    return found
