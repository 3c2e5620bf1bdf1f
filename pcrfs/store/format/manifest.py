"""The manifest (``pcr.yaml``): parsed safely and checked for the keys readers rely on.

Its own module so that everything that needs a store's manifest without reading the
store (the sampler's catalogue, the adaptive index, ``pcrfs info``) does not import the
reader. YAML through PyYAML's safe loader, without aliases and nested at most
MANIFEST_MAX_DEPTH deep; the format's rules are docs/format.md's.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .. import format as fmt
from ..errors import StoreError


class _ManifestLoader(yaml.SafeLoader):
    """Safe YAML without aliases: pcrfs never writes them, and an alias bomb
    ("billion laughs") would expand to unbounded memory in whoever walks the result."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed in a pcrfs manifest",
                                              event.start_mark)
        return super().compose_node(parent, index)


MANIFEST_MAX_BYTES = 2 << 20  # a manifest is a few KiB plus a line per class (ImageNet-21k: ~300 KB)
MANIFEST_MAX_DEPTH = 64  # nested collections in a manifest (pcrfs writes 3)


def _safe_yaml(text: str) -> object:
    """The YAML document in ``text`` through PyYAML's safe loader, without aliases and nested
    at most MANIFEST_MAX_DEPTH deep. With libyaml (PyYAML's wheels have it) a pass over the
    parser's events checks both, then the C loader builds the document: a 1,000-class
    manifest loads in ~30 ms instead of ~0.6 s in pure Python (measured at ImageNet scale)."""
    c_loader = getattr(yaml, "CSafeLoader", None)
    if c_loader is not None:
        try:
            return _safe_yaml_c(text, c_loader)
        except yaml.scanner.ScannerError:
            pass  # libyaml refuses what PyYAML writes and reads (lone surrogates of undecodable names)
    loader = _ManifestLoader(text)  # pure Python: it refuses aliases; deep nesting is a RecursionError
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _safe_yaml_c(text: str, c_loader: type) -> object:
    depth = 0
    for event in yaml.parse(text, Loader=c_loader):
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed in a pcrfs manifest",
                                              event.start_mark)
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MANIFEST_MAX_DEPTH:
                raise RecursionError
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    loader = c_loader(text)  # a safe loader: plain data only
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# optional manifest keys readers use, and the type each must have
_OPTIONAL_TYPES = {"total_bytes": int, "record_target_bytes": int, "classes": list, "options": dict}


def parse_manifest(raw: bytes, where: str) -> dict:
    """The manifest from its bytes, checked for the keys readers rely on; ``where`` names it in errors."""
    if len(raw) > MANIFEST_MAX_BYTES:
        raise StoreError(f"{where} is {len(raw)} bytes, more than a manifest can be ({MANIFEST_MAX_BYTES})")
    try:
        manifest = _safe_yaml(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        if "nesting depth" in str(e):  # libyaml's own limit, met before ours
            raise StoreError(f"{where} is damaged: its YAML is nested too deeply") from None
        raise StoreError(f"{where} is damaged: {e}") from e
    except RecursionError:  # PyYAML composes nested collections recursively
        raise StoreError(f"{where} is damaged: its YAML is nested too deeply") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.FORMAT_NAME:
        raise StoreError(f"{where} is not a PCR manifest")
    if manifest.get("format_version") not in fmt.READ_VERSIONS:
        raise StoreError(f"{where}: format version {manifest.get('format_version')} is not supported "
                         f"(this pcrfs reads versions {', '.join(map(str, fmt.READ_VERSIONS))}; "
                         "a newer pcrfs wrote it: upgrade pcrfs)")
    for key in ("num_images", "num_groups", "num_records", "index_files"):
        if key not in manifest:
            raise StoreError(f"{where} is damaged: no '{key}'")
    files = manifest["index_files"]
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and _uint(v.get("size")) and _uint(v.get("crc32")) and v["crc32"] < 1 << 32
            for v in files.values()):
        raise StoreError(f"{where} is damaged: 'index_files' is not a table of sizes and CRC-32s")
    for key in ("num_images", "num_groups", "num_records"):
        if not _uint(manifest[key]):
            raise StoreError(f"{where} is damaged: '{key}' is not a non-negative integer")
    if manifest["num_groups"] > fmt.MAX_GROUPS:
        raise StoreError(f"{where} is damaged: 'num_groups' is {manifest['num_groups']} "
                         f"(an image has at most {fmt.MAX_GROUPS} scan groups)")
    for key, kind in _OPTIONAL_TYPES.items():
        value = manifest.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and not _uint(value))):
            raise StoreError(f"{where} is damaged: '{key}' is {type(value).__name__} {str(value)[:40]!r}, "
                             f"expected {'a non-negative integer' if kind is int else 'a ' + kind.__name__}")
    if not all(isinstance(c, str) for c in manifest.get("classes") or []):
        raise StoreError(f"{where} is damaged: 'classes' is not a list of names")
    return manifest


def _uint(value: object) -> bool:
    return type(value) is int and value >= 0
