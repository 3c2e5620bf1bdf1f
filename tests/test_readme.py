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

import re
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
