"""One MountConfig for every way a mount is asked for.

``pcrfs mount``'s click options, ``mount.pcrfs``'s ``-o key=value`` (fstab) and the
daemon's own command line are all read through :data:`pcrfs.fuse.config.OPTIONS`;
every option's value survives click -> MountConfig -> daemon command line ->
MountConfig and fstab ``-o`` -> MountConfig unchanged, and a value that cannot be read
is one line naming the option.
"""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from pcrfs.cli import main
from pcrfs.cli.options import mount_config_from_click
from pcrfs.fuse import config as cfg
from pcrfs.fuse.config import OPTIONS, ConfigError, MountConfig, classify_fstab_options

from mountutil import fuse_unavailable

ROOT = Path(__file__).resolve().parents[1]

# values as a user types them, per kind of option
_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30).filter(
    lambda s: s == s.strip())
_PATH = _TEXT.map(lambda s: "/" + s)  # the store, the mount point and files reach the daemon absolute
_NEW_PATH = _TEXT.map(lambda s: "/nonexistent-pcrfs-test/" + s)  # click checks what an existing path is
_SIZE = st.integers(0, 2**50).map(str) | st.tuples(st.integers(0, 2**20), st.sampled_from("KMG")).map(
    lambda t: f"{t[0]}{t[1]}")
_FUSE = st.sampled_from(["allow_other", "nonempty", "debug", "default_permissions", "max_read=131072",
                         "ro", "fsname=a\\,b", "subtype=x,y"])
KIND_VALUES = {
    "size": _SIZE,
    "rate": st.integers(1, 2**50).map(str) | st.integers(1, 2**20).map(lambda n: f"{n}M/s"),
    "switch": st.sampled_from(["auto", "on", "off"]),
    "text": _TEXT,
    "file": _NEW_PATH,
    "dir": _NEW_PATH,
    "flag": st.booleans(),
    "fuse": st.lists(_FUSE, max_size=4).map(tuple),
    "seconds": st.integers(0, 10**6).map(str) | st.sampled_from(["2.5", "0.25", "off", "20s"]),
}


@st.composite
def typed_values(draw) -> dict:
    """Some options (each one drawn or left out), with values as typed on a command line."""
    return {o.name: draw(KIND_VALUES[o.kind]) for o in OPTIONS if draw(st.booleans())}


def click_args(values: dict) -> list[str]:
    args = []
    for o in OPTIONS:
        if o.name not in values:
            continue
        v = values[o.name]
        if o.kind == "flag":
            args += [o.long_flag] if v else []
        elif o.kind == "fuse":
            args += [a for opt in v for a in ("-o", opt)]
        else:
            args.append(f"{o.long_flag}={v}")
    return args


def from_click(store: str, mnt: str, args: list[str]) -> MountConfig:
    """What `pcrfs mount ARGS STORE MNT` would mount: click's parse, then the CLI's conversion."""
    ctx = main.commands["mount"].make_context("mount", [*args, "--", store, mnt])
    params = dict(ctx.params)
    return mount_config_from_click(params.pop("store"), params.pop("mountpoint"), params)


def test_one_field_per_option_and_every_kind_is_covered():
    assert [f.name for f in dataclasses.fields(MountConfig)][2:] == [o.name for o in OPTIONS]
    assert {o.kind for o in OPTIONS} <= set(KIND_VALUES) == set(cfg.KINDS)
    defaults = MountConfig("s", "m")
    for o in OPTIONS:  # the dataclass's defaults are the table's
        expected = {"flag": False, "fuse": ()}.get(o.kind, cfg._default(o))
        assert getattr(defaults, o.name) == expected, o.name
    click_opts = {p.name: p for p in main.commands["mount"].params if isinstance(p, click.Option)}
    assert list(click_opts) == [o.name for o in OPTIONS]
    for o in OPTIONS:
        assert click_opts[o.name].help == o.help and tuple(click_opts[o.name].opts) == o.cli_flags


@settings(max_examples=300, deadline=None)
@given(typed_values(), _PATH, _PATH)
def test_click_to_config_to_daemon_argv_and_back(values, store, mnt):
    config = from_click(store, mnt, click_args(values))
    for o in OPTIONS:  # each given value arrives typed, each other option at its default
        if o.name in values:
            assert getattr(config, o.name) == o.parse(values[o.name])
        else:
            assert getattr(config, o.name) == getattr(MountConfig(store, mnt), o.name)
    argv = config.to_argv()
    assert MountConfig.from_argv(argv) == dataclasses.replace(config, foreground=False)  # the daemon always serves


@settings(max_examples=300, deadline=None)
@given(typed_values(), _PATH, _PATH)
def test_config_to_fstab_options_and_back(values, store, mnt):
    config = from_click(store, mnt, click_args(values))
    assert MountConfig.from_fstab(store, mnt, [config.to_fstab()]) == dataclasses.replace(config, foreground=False)


def test_fstab_options_are_classified_and_read():
    opts = ["rw,cache_size=1M,nofail,noauto,x-systemd.automount,log_file=/l\\,og,allow_other",
            "_netdev,comment=x,record_prefix=off,bwlimit=10M/s,readahead=0,disk_cache_size=2G"]
    own, fuse = classify_fstab_options(opts)
    assert fuse == ["rw", "allow_other"]
    assert set(own) == {"cache_size", "log_file", "record_prefix", "bwlimit", "readahead", "disk_cache_size"}
    c = MountConfig.from_fstab("/s", "/m", opts)
    assert (c.cache_size, c.log_file, c.record_prefix, c.bwlimit, c.readahead, c.disk_cache_size) == \
        (1 << 20, "/l,og", False, 10 << 20, 0, 2 << 30)
    assert c.options == ("rw", "allow_other") and c.fuse_options() == ({"allow_other": True}, False)


@pytest.mark.parametrize("option, value", [("cache_size", "lots"), ("bwlimit", "fast"), ("bwlimit", "0"),
                                           ("readahead", "-1"), ("record_prefix", "sometimes"),
                                           ("disk_cache_size", "1X"), ("read_deadline", "soon"),
                                           ("read_deadline", "-1"), ("read_deadline", "nan")])
def test_an_ill_typed_value_is_one_line_naming_the_option(option, value):
    flag = cfg.BY_NAME[option].long_flag
    for read, name in ((lambda: MountConfig.from_fstab("s", "m", [f"{option}={value}"]), option),
                       (lambda: MountConfig.from_argv([f"{flag}={value}", "s", "m"]), flag)):
        with pytest.raises(ConfigError) as e:
            read()
        assert str(e.value).startswith(f"{name}: ") and "\n" not in str(e.value)


def test_an_unknown_option_is_one_line():
    with pytest.raises(ConfigError, match="unrecognized arguments: --cache") as e:
        MountConfig.from_argv(["--cache=1M", "s", "m"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown option 'cache'"):
        MountConfig.from_values("s", "m", {"cache": "1M"})
    with pytest.raises(ConfigError, match="the following arguments are required"):
        MountConfig.from_argv(["s"])


def test_the_daemon_entry_point_says_a_bad_option_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pcrfs.fuse.daemon", "--cache-size", "lots", str(tmp_path),
                          str(tmp_path)], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("pcrfs: error: --cache-size: not a size: 'lots' "
                                                 "(examples: 4096, 512K, 64M, 2G)"), res.stderr


def test_pcrfs_mount_says_a_bad_rate_in_one_line(tmp_path):
    r = CliRunner().invoke(main, ["mount", "--bwlimit", "fast", str(tmp_path), str(tmp_path)])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("pcrfs: error: --bwlimit: ")


# ---- library functions do not print ----------------------------------------------------------------

LIBRARY = ["pcrfs/fuse/config.py", "pcrfs/fuse/mounting.py", "pcrfs/fuse/daemon.py", "pcrfs/demo.py"]


@pytest.mark.parametrize("path", LIBRARY)
def test_the_mount_library_never_writes_to_the_terminal(path):
    """print, click and writes to sys.stdout/sys.stderr belong to pcrfs/cli and mount.pcrfs (the
    daemon only flushes what Python buffered before it sends fds 1 and 2 to its log)."""
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "print", f"{path}:{node.lineno}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.split(".")[0] in ("click", "tqdm") for n in names), f"{path}:{node.lineno}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                isinstance(node.value.value, ast.Name) and node.value.value.id == "sys" and \
                node.value.attr in ("stdout", "stderr"):
            assert node.attr == "flush", f"{path}:{node.lineno}: sys.{node.value.attr}.{node.attr}"


@pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))
def test_mount_and_umount_are_silent_unless_given_a_callback(demo_store, tmp_path, capfd):
    from mountutil import Mounts
    from pcrfs.fuse.mounting import mount, umount

    mounts = Mounts(tmp_path)
    mnt = mounts.point("quiet")
    said: list[str] = []
    try:
        mounts.pids.add(mount(demo_store, mnt, log_file=tmp_path / "quiet.log").pid)  # the default echo
        umount(mnt)
        mounts.pids.add(mount(demo_store, mnt, log_file=tmp_path / "loud.log", echo=said.append).pid)
        umount(mnt, echo=said.append)
    finally:
        assert not mounts.cleanup()
    assert capfd.readouterr() == ("", "")
    assert [m.split(" ")[1] for m in said] == ["mounted", "unmounted"]
