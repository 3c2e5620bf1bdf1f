"""A mount's configuration, declared once.

:data:`OPTIONS` is the one table of the mount's options (name, kind, default, help,
fstab key). Three front ends read it and nothing else:

* ``pcrfs mount``: :func:`pcrfs.cli.options.mount_options` makes its click options from it;
* ``mount.pcrfs`` and /etc/fstab: :meth:`MountConfig.from_fstab` reads ``-o key=value``;
* the daemon's own entry point: :meth:`MountConfig.to_argv` writes the command line that
  :meth:`MountConfig.from_argv` reads back (``python -m pcrfs.fuse.daemon``).

Every front end turns what it was given into a :class:`MountConfig` through
:meth:`MountConfig.from_values`, so a value means the same wherever it is written.
No click here: ``mount.pcrfs`` and the daemon do not need it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from ..remote.deadline import DEFAULT_READ_DEADLINE
from ..units import parse_size

if TYPE_CHECKING:  # the store layer is imported when a mount opens its store
    from ..store.read.reader import ReadOptions

DEFAULT_CACHE_SIZE = "256M"


class ConfigError(ValueError):
    """An option that is unknown or whose value cannot be read; the message names it."""


# ---- kinds of value: text (as typed on a command line) <-> typed ----------------------------------

def parse_switch(value: str | None) -> bool | None:
    """'on'/'off'/'auto' (None: auto) -> True/False/None."""
    if value is None or value.lower() == "auto":
        return None
    if value.lower() in ("on", "yes", "1"):
        return True
    if value.lower() in ("off", "no", "0"):
        return False
    raise ValueError(f"expected on, off or auto, got {value!r}")


def format_switch(value: bool | None) -> str:
    return "auto" if value is None else "on" if value else "off"


def _rate(text: str) -> int:
    from ..remote.bwlimit import parse_rate  # the remote layer only when a rate is given

    return parse_rate(text)


def parse_seconds(value: object) -> float:
    """'20', '2.5', '0' or 'off' (no limit) -> seconds, a float >= 0."""
    text = str(value).strip().lower()
    if text in ("off", "none", "no"):
        return 0.0
    try:
        seconds = float(text[:-1] if text.endswith("s") else text)
    except ValueError:
        raise ValueError(f"expected a number of seconds (or 0/off), got {value!r}") from None
    if not 0 <= seconds < 1e9:  # (nan and inf fail this too)
        raise ValueError(f"expected a number of seconds (or 0/off), got {value!r}")
    return seconds


def _text(value: str) -> str | None:
    return value or None  # an empty value (log_file=) means "not given", as it always did


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return parse_switch(str(value)) is True


# kind -> (parse: text or an already typed value -> typed, format: typed -> text)
KINDS: dict[str, tuple[Callable[[object], object], Callable[[object], str]]] = {
    "size": (lambda v: v if isinstance(v, int) else parse_size(v), str),
    "rate": (lambda v: v if isinstance(v, int) else _rate(v), str),
    "switch": (lambda v: v if v is None or isinstance(v, bool) else parse_switch(v), format_switch),
    "text": (lambda v: _text(str(v)), str),
    "file": (lambda v: _text(str(v)), str),
    "dir": (lambda v: _text(str(v)), str),
    "flag": (_flag, lambda v: "on" if v else "off"),
    "seconds": (lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                else parse_seconds(v), lambda v: f"{v:g}"),
    "fuse": (lambda v: (v,) if isinstance(v, str) else tuple(v), ",".join),
}


# ---- the table -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MountOption:
    """One option of a mount, as every front end spells it."""
    name: str                   # the MountConfig field; --name-with-dashes on command lines
    kind: str                   # a key of KINDS
    help: str                   # `pcrfs mount --help`
    default: str | None = None  # as typed on a command line; None: not set
    metavar: str | None = None
    show_default: bool = False
    flags: tuple[str, ...] = ()     # command-line spellings, when not just --name-with-dashes
    fstab: str | None = None        # mount.pcrfs's help for `-o name=VALUE`; None: not an fstab key
    fstab_value: str | None = None  # VALUE there, when not the metavar

    @property
    def cli_flags(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.name.replace("_", "-"),)

    @property
    def long_flag(self) -> str:
        return self.cli_flags[-1]

    def parse(self, value: object) -> object:
        return KINDS[self.kind][0](value)

    def format(self, value: object) -> str:
        return KINDS[self.kind][1](value)


OPTIONS: tuple[MountOption, ...] = (
    MountOption("foreground", "flag", flags=("-f", "--foreground"),
                help="Serve in this process until unmounted or interrupted (for systemd, containers "
                     "and debugging) instead of starting a background daemon."),
    MountOption("options", "fuse", flags=("-o",), metavar="OPT[,OPT...]",
                help="Mount options, repeatable: allow_other (other users may read; non-root users need "
                     "user_allow_other in /etc/fuse.conf), nonempty (mount over a non-empty directory), "
                     "debug (log every FUSE request), or any other libfuse option."),
    MountOption("cache_size", "size", default=DEFAULT_CACHE_SIZE, show_default=True,
                help="Memory for verified scan groups, shared by all views (scan1's bytes are the "
                     "start of scan5's). For a remote store it holds every group fetched; "
                     "for a local one only groups a read cuts in two (the kernel's page cache already "
                     "holds the record files and the served files). 0 disables it, except that readahead "
                     "needs room for the groups it fetches ahead: with --readahead on (remote stores' "
                     "default) it is at least 4x the readahead window (64M by default); --readahead 0 "
                     "--cache-size 0 keeps nothing.",
                fstab_value="SIZE", fstab=f"memory for verified scan groups [default: {DEFAULT_CACHE_SIZE};\n"
                                          "at least 4x the readahead window]"),
    MountOption("log_file", "file",
                help="Where the daemon logs (errors such as damaged groups are named there) "
                     "[default: /run/pcrfs/<mount>.log for root, else under $XDG_RUNTIME_DIR or /tmp].",
                fstab_value="PATH", fstab="the daemon's log [default: /run/pcrfs/<mount>.log for root]"),
    MountOption("endpoint_url", "text", metavar="URL",
                help="S3-compatible endpoint for an s3:// STORE (MinIO, Ceph, moto ...) [default: AWS, "
                     "or $AWS_ENDPOINT_URL]. Credentials and region come from the usual AWS variables/files.",
                fstab="S3-compatible endpoint of a store at an s3:// URL"),
    MountOption("bwlimit", "rate", metavar="RATE",
                help="Cap the bandwidth taken from the store, all requests together, e.g. 10M (bytes/s, "
                     "binary units, like rclone's --bwlimit).",
                fstab="cap the bytes per second taken from a remote store (e.g. 50M)"),
    MountOption("disk_cache", "dir", metavar="DIR",
                help="Also keep fetched scan groups on local disk in DIR (kept across mounts), so later "
                     "epochs do not download again. Remote stores also keep their index there.",
                fstab="on-disk cache of verified scan groups of a remote store"),
    MountOption("disk_cache_size", "size", default="10G", show_default=True,
                help="Size cap of --disk-cache; least recently used images are dropped first.",
                fstab_value="SIZE", fstab="cap of that cache [default: 10G]"),
    MountOption("readahead", "size", metavar="SIZE",
                help="Budget of one readahead window for reads in image order (a sequential epoch "
                     "fetches groups 1..k of the next images in one request per group); 0 disables "
                     "[default: 16M for remote stores, 0 for local ones].",
                fstab="readahead window of a remote store [default: 16M; 0: off]"),
    MountOption("record_prefix", "switch", default="auto", show_default=True,
                help="Fetch whole record prefixes (groups 1..k of every image of a record, a few large "
                     "requests) instead of k requests per image, when the caches can hold them; auto: on for "
                     "remote stores. When they hold the whole view, an epoch's first records start the "
                     "rest of the view's prefixes in the background. See 'Shuffled training from object "
                     "storage' in the README.",
                fstab_value="MODE", fstab="auto, on or off: fetch whole record prefixes (groups 1..k of\n"
                                                "every image of a record) of a remote store [default: auto]"),
    MountOption("read_deadline", "seconds", default=f"{DEFAULT_READ_DEADLINE:g}", show_default=True,
                metavar="SECONDS",
                help="Longest a read of a remote store may take, all retries and fallbacks included (the "
                     "record prefix, then image by image, or waiting on another reader's fetch): past it the "
                     "read fails with EIO and the reader goes on; no request's connect or read timeout is "
                     "longer. A reader that gets Ctrl-C or a kill meanwhile is answered at once. Raise it for "
                     "a slow link or a low --bwlimit: a record prefix (up to a record's size) must arrive "
                     "within it. 0 or off: no deadline. See docs/remote.md.",
                fstab="seconds a read of a remote store may take before it is EIO\n"
                      f"[default: {DEFAULT_READ_DEADLINE:g}; 0: no limit]"),
)
BY_NAME: dict[str, MountOption] = {o.name: o for o in OPTIONS}
FSTAB_KEYS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.fstab)

# fstab options for mount(8) or systemd only: mount.pcrfs drops them
MOUNT8_ONLY = frozenset({"defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group",
                         "nofail", "_netdev", "loud", "silent"})
IGNORED = frozenset({"ro", "rw"})  # the mount is always read-only
NONEMPTY = "nonempty"              # allow a non-empty mount point (hidden while mounted)


def _default(option: MountOption) -> object:
    return None if option.default is None else option.parse(option.default)


# ---- the configuration -----------------------------------------------------------------------------

@dataclass(frozen=True)
class MountConfig:
    """Everything a mount is made from: the store, the mount point and :data:`OPTIONS`."""
    store: str
    mountpoint: str
    foreground: bool = False
    options: tuple[str, ...] = ()        # for libfuse (and pcrfs's `nonempty`), as given to -o
    cache_size: int = parse_size(DEFAULT_CACHE_SIZE)
    log_file: str | None = None
    endpoint_url: str | None = None
    bwlimit: int | None = None           # bytes per second
    disk_cache: str | None = None
    disk_cache_size: int = parse_size("10G")
    readahead: int | None = None         # None: on for remote stores, off for local ones
    record_prefix: bool | None = None    # None: auto
    read_deadline: float = DEFAULT_READ_DEADLINE  # seconds; 0: none

    @classmethod
    def from_values(cls, store: str, mountpoint: str, values: Mapping[str, object],
                    spell: Callable[[MountOption], str] = lambda o: o.name) -> "MountConfig":
        """A config from option values, as text (``"64M"``) or already typed (``67108864``);
        None keeps the default. ConfigError names an unknown or unreadable option as
        ``spell`` writes it (``--cache-size`` for a command line, ``cache_size`` for fstab)."""
        typed: dict[str, object] = {}
        for name, value in values.items():
            option = BY_NAME.get(name)
            if option is None:
                raise ConfigError(f"unknown option {name!r}")
            if value is None:
                continue
            try:
                typed[name] = option.parse(value)
            except ValueError as e:
                raise ConfigError(f"{spell(option)}: {e}") from None
        return cls(str(store), str(mountpoint), **typed)

    # -- the daemon's command line
    def to_argv(self) -> list[str]:
        """Every option that differs from its default, then ``STORE MOUNTPOINT`` (the inverse
        of :meth:`from_argv`); the daemon always serves in the foreground, so that is not said."""
        argv = []
        for option in OPTIONS:  # --name=VALUE: a value that starts with "-" stays a value
            value = getattr(self, option.name)
            if option.name == "foreground" or value == _default(option):
                continue
            if option.kind == "fuse":
                argv += [f"{_FUSE_LONG}={opt}" for opt in value]
            else:
                argv.append(f"{option.long_flag}={option.format(value)}")
        return argv + [self.store, self.mountpoint]  # absolute (mounting.resolved): never "-..."

    @classmethod
    def from_argv(cls, argv: list[str]) -> "MountConfig":
        a = vars(_argv_parser().parse_args(argv))
        return cls.from_values(a.pop("store"), a.pop("mountpoint"), a, lambda o: o.long_flag)

    def __post_init__(self) -> None:
        if not isinstance(self.options, tuple):  # a list given by a caller: the config stays hashable
            object.__setattr__(self, "options", tuple(self.options))

    # -- /etc/fstab and mount -t pcrfs
    @classmethod
    def from_fstab(cls, store: str, mountpoint: str, options: Iterable[str]) -> "MountConfig":
        """A config from mount(8)'s ``-o`` strings (see :func:`classify_fstab_options`)."""
        own, fuse = classify_fstab_options(options)
        return cls.from_values(store, mountpoint, {**own, "options": tuple(fuse)})

    def to_fstab(self) -> str:
        """The ``-o`` string of this config's options (a comma in a value escaped as ``\\,``)."""
        parts = []
        for option in OPTIONS:
            value = getattr(self, option.name)
            if option.fstab and value != _default(option):
                parts.append(f"{option.name}={_escape(option.format(value))}")
        return ",".join(parts + [_escape(opt) for opt in self.options])

    # -- what the mount is made of
    def read_options(self) -> "ReadOptions":
        from ..remote.fs import RemoteOptions
        from ..store.read.reader import ReadOptions

        remote = RemoteOptions(endpoint_url=self.endpoint_url, read_deadline=self.read_deadline or None)
        return ReadOptions(remote=remote, bwlimit=self.bwlimit,
                           disk_cache=self.disk_cache, disk_cache_bytes=self.disk_cache_size,
                           readahead_bytes=self.readahead, record_prefix=self.record_prefix)

    def with_read_options(self, o: "ReadOptions | None") -> "MountConfig":
        """This config with the fields ``o`` carries (those the daemon's command line can say)."""
        if o is None:
            return self
        return replace(self, endpoint_url=o.remote.endpoint_url, bwlimit=o.bwlimit, disk_cache=o.disk_cache,
                       disk_cache_size=o.disk_cache_bytes, readahead=o.readahead_bytes,
                       record_prefix=o.record_prefix, read_deadline=o.remote.read_deadline or 0.0)

    def fuse_options(self) -> tuple[dict[str, object], bool]:
        """libfuse's keyword options, and whether ``nonempty`` was asked for."""
        return fuse_options(self.options)


_FUSE_LONG = "--option"  # -o on the daemon's command line, where a value may start with "-"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage and exit 2
        raise ConfigError(message)


def _argv_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m pcrfs.fuse.daemon", add_help=False, allow_abbrev=False,
                       description="Serve a PCR store at a mount point (used by `pcrfs mount`).")
    p.add_argument("store")
    p.add_argument("mountpoint")
    for option in OPTIONS:
        if option.kind == "flag":
            p.add_argument(*option.cli_flags, dest=option.name, action="store_true", default=None)
        elif option.kind == "fuse":
            p.add_argument(*option.cli_flags, _FUSE_LONG, dest=option.name, action="append", default=None)
        else:
            p.add_argument(*option.cli_flags, dest=option.name, default=None)
    return p


# ---- -o strings --------------------------------------------------------------------------------------

def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


def split_options(options: Iterable[str]) -> list[str]:
    """['a,b=1', 'c'] -> ['a', 'b=1', 'c'] (a backslash escapes a comma)."""
    out: list[str] = []
    for group in options:
        cur, escaped = [], False
        for ch in group:
            if escaped:
                cur.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == ",":
                out.append("".join(cur))
                cur = []
            else:
                cur.append(ch)
        out.append("".join(cur))
    return [o.strip() for o in out if o.strip()]


def classify_fstab_options(options: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """mount(8)'s -o options as (pcrfs's own: key -> value, those for libfuse); the options
    only mount(8) or systemd use are dropped."""
    own: dict[str, str] = {}
    fuse: list[str] = []
    for opt in split_options(options):
        key, _, value = opt.partition("=")
        if key in FSTAB_KEYS:
            own[key] = value
        elif key in MOUNT8_ONLY or key.startswith("x-") or key == "comment":
            continue
        else:
            fuse.append(opt)
    return own, fuse


def fuse_options(options: Iterable[str], allow_other: bool = False) -> tuple[dict[str, object], bool]:
    """libfuse keyword options from ``-o`` strings, and whether ``nonempty`` was asked for."""
    kwargs: dict[str, object] = {}
    nonempty = False
    for opt in split_options(options):
        key, eq, value = opt.partition("=")
        if key in IGNORED:
            continue
        if key == NONEMPTY:
            nonempty = True
            continue
        kwargs[key] = value if eq else True
    if allow_other:
        kwargs["allow_other"] = True
    return kwargs, nonempty
