"""``mount.pcrfs``: lets ``mount -t pcrfs`` and /etc/fstab mount stores.

mount(8) runs ``mount.pcrfs SPEC DIR [-sfnv] [-o OPTIONS]`` for filesystems of
type ``pcrfs``. It looks for helpers in /sbin (and /sbin/fs.d, /sbin/fs), so
link the console script there once::

    ln -s "$(command -v mount.pcrfs)" /sbin/mount.pcrfs

Then::

    mount -t pcrfs -o allow_other,cache_size=1G /data/train.pcr /mnt/train

    # /etc/fstab
    /data/train.pcr  /mnt/train  pcrfs  allow_other,cache_size=1G,nofail,x-systemd.requires-mounts-for=/data  0 0
    s3://bucket/train.pcr  /mnt/s3train  pcrfs  endpoint_url=https://minio.lan:9000,disk_cache=/var/cache/pcrfs,_netdev,nofail  0 0

Options pcrfs handles itself: ``cache_size=SIZE``, ``log_file=PATH``,
``nonempty``, and for stores at a URL ``endpoint_url=URL``, ``bwlimit=RATE``,
``disk_cache=DIR``, ``disk_cache_size=SIZE``, ``readahead=SIZE``,
``record_prefix=on|off|auto`` (the ``pcrfs mount`` options of the same names, declared once in
:mod:`pcrfs.fuse.config`; credentials come from the usual AWS
variables and files of the user mount(8) runs as). Options that are only for mount(8) or systemd (``defaults``,
``auto``/``noauto``, ``user``/``users``, ``nofail``, ``_netdev``, ``x-*``,
``comment=*``) are dropped; ``ro``/``rw`` are ignored (the mount is always
read-only). Everything else goes to libfuse (e.g. ``allow_other``).
"""
from __future__ import annotations

import sys

from .config import BY_NAME, OPTIONS, MountConfig, classify_fstab_options
from .daemon import start
from .mounting import MountError

USAGE = "usage: mount.pcrfs STORE MOUNTPOINT [-sfnv] [-o OPTION[,OPTION...]]"


def _option_lines() -> str:
    """HELP's lines for pcrfs's own options, from :data:`pcrfs.fuse.config.OPTIONS`."""
    lines = []
    for o in OPTIONS:
        if o.fstab:
            value = o.fstab_value or o.metavar
            first, *rest = o.fstab.split("\n")
            lines.append(f"  {o.name + '=' + value:<22}{first}")
            lines += [" " * 24 + line for line in rest]
    return "\n".join(lines)


HELP = f"""{USAGE}

Mount a pcrfs store read-only at MOUNTPOINT; what mount(8) runs for
`mount -t pcrfs STORE MOUNTPOINT` and for /etc/fstab lines of type pcrfs.
STORE is a store directory or a URL such as s3://bucket/train.pcr.

Flags (as mount(8) passes them):
  -s          sloppy: tolerate options this helper does not know (accepted;
              unknown options go to libfuse, which refuses what it cannot use)
  -f          fake: parse and check everything, then exit 0 without mounting
  -n          do not write /etc/mtab (accepted; the kernel keeps the mount table)
  -v          verbose: say what is mounted and with which options, on stderr
  -h, --help  this text

Options (-o, comma-separated; a comma inside a value is written as \\,):
{_option_lines()}
  nonempty              allow a non-empty mount point (its files are hidden while mounted)
  debug                 libfuse's debug output, into the log
  ro, rw                ignored: the mount is always read-only
  defaults, auto, noauto, user, users, nouser, owner, group, nofail, _netdev,
  loud, silent, x-*, comment=*
                        for mount(8) or systemd only; dropped
  anything else         passed to libfuse (e.g. allow_other, default_permissions)

Credentials for s3:// stores come from the usual AWS variables and files of the
user mount(8) runs as. Exit status: 0 mounted, 32 mount failure (the message says why).

Example /etc/fstab lines:
  /data/train.pcr  /mnt/train  pcrfs  allow_other,cache_size=1G,nofail  0 0
  s3://bucket/train.pcr  /mnt/s3train  pcrfs  endpoint_url=https://minio.lan:9000,disk_cache=/var/cache/pcrfs,_netdev,nofail  0 0
"""

def parse_argv(argv: list[str]) -> tuple[list[str], list[str], set[str]]:
    """(positional args, -o option strings, single-letter flags) of a mount(8) helper call."""
    positional: list[str] = []
    options: list[str] = []
    flags: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-o":
            if i + 1 >= len(argv):
                raise MountError("-o needs an argument")
            options.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("-o") and len(arg) > 2:
            options.append(arg[2:])
        elif arg.startswith("-") and len(arg) > 1:
            flags.update(arg[1:])
        else:
            positional.append(arg)
        i += 1
    return positional, options, flags


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(HELP, end="")
        return 0
    try:
        positional, options, flags = parse_argv(argv)
        if len(positional) != 2:
            print(USAGE, file=sys.stderr)
            return 1
        store, mountpoint = positional
        own, fuse = classify_fstab_options(options)
        if "v" in flags:
            _stderr(f"mount.pcrfs: {store} on {mountpoint}, libfuse options {','.join(fuse) or '-'}, "
                    f"cache {own.get('cache_size', BY_NAME['cache_size'].default)}")
        config = MountConfig.from_fstab(store, mountpoint, options)
        if "f" in flags:  # mount -f: "fake", do everything but the mount itself
            return 0
        quiet = "v" not in flags  # mount(8) helpers are silent unless asked
        start(config, echo=(lambda _m: None) if quiet else _stderr)
    except (MountError, ValueError) as e:
        _stderr(f"mount.pcrfs: {e}")
        return 32  # mount(8): "mount failure"
    return 0


if __name__ == "__main__":
    sys.exit(main())
