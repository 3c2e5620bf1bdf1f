"""The README is the user's door: its commands, its tour and the reference must match the code.

* every click command and every one of its options appears in the command reference,
  docs/cli.md (its own ``### `pcrfs NAME …``` section), so a new option cannot go
  undocumented;
* every flag and ``-o`` option of ``mount.pcrfs`` appears in its fstab section;
* ``.ci/run`` runs exactly the README's "Run the tests" command;
* the README's quick tour is the output of a real ``pcrfs demo`` run (see
  :func:`normalize_tour` for what may differ from machine to machine).

That every command and option *shown* in the README and docs/ exists is tests/test_docs.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from pcrfs.cli import main
from pcrfs.fuse import mount_helper
from pcrfs.fuse.config import FSTAB_KEYS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CLI_DOC = (ROOT / "docs" / "cli.md").read_text()


def _section(title_start: str, text: str = CLI_DOC) -> str:
    """The text of the section of ``text`` (the command reference) whose heading starts with
    ``title_start``, up to the next heading."""
    m = re.search(r"^#{2,4} " + re.escape(title_start) + r".*?$(.*?)(?=^#{2,4} |\Z)", text, re.M | re.S)
    assert m, f"docs/cli.md has no section '{title_start}…'"
    return m.group(1)


def _mentions(text: str, token: str) -> bool:
    """``token`` (an option such as -k or --scan) as a whole word in ``text``."""
    return re.search(r"(?<![\w-])" + re.escape(token) + r"(?![\w-])", text) is not None


def _options(cmd: click.Command) -> list[str]:
    return [o for p in cmd.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts]


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_option_of_every_command_is_in_the_reference(name):
    cmd = main.commands[name]
    text = _section(f"`pcrfs {name} ")
    missing = [o for o in _options(cmd) if not _mentions(text, o)]
    assert not missing, f"docs/cli.md's reference for `pcrfs {name}` lacks {missing}"


def test_the_reference_covers_every_command_and_the_group_options():
    ref = _section("Conventions") + "".join(_section(f"`pcrfs {n} ") for n in main.commands)
    assert _mentions(ref, "--version") and _mentions(ref, "--help")
    headings = re.findall(r"^### `pcrfs ([\w-]+)", CLI_DOC, re.M)
    assert sorted(headings) == sorted(main.commands), "one reference section per command, no stale ones"


def test_mount_helper_flags_and_options_are_in_the_reference_and_its_help():
    text = _section("`mount -t pcrfs")
    own = list(FSTAB_KEYS) + ["nonempty", "debug"]
    assert not [o for o in own if not _mentions(text, o)]
    assert not [f for f in "sfnv" if not _mentions(text, "-" + f)]
    assert not [o for o in own if not _mentions(mount_helper.HELP, o)]
    assert not [f for f in "sfnv" if not _mentions(mount_helper.HELP, "-" + f)]


def test_mount_helper_help_exits_0(capsys):
    assert mount_helper.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mount.pcrfs") and "cache_size=SIZE" in out


def _readme_command(heading: str) -> str:
    block = re.search(re.escape(heading) + r".*?```sh\n(.*?)\n```", README, re.S)
    assert block, f"README has no command block after '{heading}'"
    return block.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_command("**Run the tests**")
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci.splitlines(), ".ci/run must run the README's test command verbatim"


def test_readme_commands_work_without_pip_or_python_on_path():
    # A stock Debian 12 has python3 (externally managed: no `pip install` into it) and
    # neither `pip` nor `python`: both commands make a virtual environment and use it.
    for heading in ("**Try it**", "**Run the tests**"):
        command = _readme_command(heading)
        assert "python3 -m venv" in command and "python3-venv" in command
        for word in re.findall(r"(?:^|&&|;)\s*(\S+)", command):
            assert word not in ("pip", "python", "pcrfs"), f"{heading}: '{word}' is not on a stock PATH"


# ---------------------------------------------------------------- the quick tour

TOUR_WORKDIR = "/tmp/pcrfs-demo"   # the README's `pcrfs demo /tmp/pcrfs-demo`
ELLIPSIS = "…"                    # a README line of its own: one or more lines left out

# What may differ from one run (or machine) to another, on both sides: pids, durations,
# the file dates, owners and group of `ls -l`, the log's path (under the runtime
# directory), and the counters of store reads (the compiled read path and the Python
# one read the store differently). Sizes, names, counts and the decoded pixels may not.
_TOUR_NORMALIZE = [
    (re.compile(r"daemon pid \d+"), "daemon pid PID"),
    (re.compile(r"\blog [^\s)]+\.log"), "log LOG"),
    (re.compile(r"^log +\S+$", re.M), "log LOG"),
    (re.compile(r"stored, [\d.]+s$", re.M), "stored, Ts"),
    (re.compile(r"\bup [^)]*\)"), "up T)"),
    (re.compile(r"^([-dlrwx]{10}) +(\d+) +\S+ +\S+ +(\d+) +\w{3} +\d+ +[\d:]+ +(.*)$", re.M),
     r"\1 \2 OWNER GROUP \3 DATE \4"),
    (re.compile(r"^store reads  .*$", re.M), "store reads  N"),
    (re.compile(r"^group cache  .*$", re.M), "group cache  N"),
]


def normalize_tour(text: str, workdir: str = TOUR_WORKDIR) -> list[str]:
    """The lines of a tour's output with what may vary replaced (see _TOUR_NORMALIZE)."""
    text = text.replace(workdir, TOUR_WORKDIR)
    for pattern, repl in _TOUR_NORMALIZE:
        text = pattern.sub(repl, text)
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def tour_mismatch(expected: list[str], actual: list[str]) -> str | None:
    """None if ``actual`` is ``expected`` with each ELLIPSIS line standing for one or more
    lines; else what differs first."""
    i = 0
    for k, line in enumerate(expected):
        if line == ELLIPSIS:
            continue
        if k and expected[k - 1] == ELLIPSIS:
            j = i + 1
            while j < len(actual) and actual[j] != line:
                j += 1
            if j == len(actual):
                return f"README line {k + 1} {line!r} (after {ELLIPSIS}) is not in the real output after line {i + 1}"
            i = j
        if i >= len(actual):
            return f"the real output ends before README line {k + 1}: {line!r}"
        if actual[i] != line:
            return f"README line {k + 1}: {line!r}\n     real output: {actual[i]!r}"
        i += 1
    if expected and expected[-1] == ELLIPSIS:
        return None if i < len(actual) else "nothing left for the final ellipsis"
    if i != len(actual):
        return f"the real output goes on after the README's last line: {actual[i]!r}"
    return None


def _readme_tour() -> list[str]:
    m = re.search(r"^## A quick tour\n.*?```text\n(.*?)\n```", README, re.M | re.S)
    assert m, "README has no quick tour block"
    return normalize_tour(m.group(1))


def test_tour_normalization_and_matching():
    line = "pcrfs: mounted /w/demo.pcr at /w/mnt (daemon pid 812, log /run/pcrfs/w-mnt-1a2b.log)"
    assert normalize_tour(line, "/w") == [
        "pcrfs: mounted /tmp/pcrfs-demo/demo.pcr at /tmp/pcrfs-demo/mnt (daemon pid PID, log LOG)"]
    assert normalize_tour("-r--r--r-- 1 alice users  4370 Nov 25 13:31 a.jpg") == \
        normalize_tour("-r--r--r-- 1 root root 4370 Dec  7  2025 a.jpg") == ["-r--r--r-- 1 OWNER GROUP 4370 DATE a.jpg"]
    assert tour_mismatch(["a", ELLIPSIS, "d"], ["a", "b", "c", "d"]) is None
    assert tour_mismatch(["a", ELLIPSIS, "d"], ["a", "d"])            # an ellipsis stands for at least one line
    assert tour_mismatch(["a", "b"], ["a", "c"])
    assert tour_mismatch(["a"], ["a", "b"])
    assert tour_mismatch(["a", "b"], ["a"])


def test_the_readme_tour_is_a_real_run(tmp_path):
    """Run `pcrfs demo` as the README does and compare its output with the README's block."""
    from mountutil import force_unmount, fuse_unavailable

    why = fuse_unavailable()
    if why:
        pytest.skip(why)
    pytest.importorskip("skimage", reason="the demo photos need the demo extra (scikit-image)")
    workdir = tmp_path / "pcrfs-demo"
    env = dict(os.environ, LC_ALL="C", COLUMNS="80")
    try:
        res = subprocess.run([sys.executable, "-m", "pcrfs.cli", "demo", str(workdir)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, env=env)
    finally:
        force_unmount(workdir / "mnt")
    assert res.returncode == 0, res.stdout[-3000:]
    actual = normalize_tour(res.stdout, str(workdir))
    problem = tour_mismatch(_readme_tour(), actual)
    assert problem is None, (f"README's quick tour differs from a real `pcrfs demo` run: {problem}\n"
                             "Update the README's block from `.venv/bin/pcrfs demo /tmp/pcrfs-demo`; the real "
                             "output, normalized:\n" + "\n".join(actual))
