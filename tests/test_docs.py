"""What README.md and docs/*.md show must exist: commands, options, tools, links.

* Every ``pcrfs SUBCOMMAND ...`` (also ``.venv/bin/pcrfs ...``) in a shell code block
  (```sh, ```bash, ```console, ```shell or unlabelled) or an inline code span names a
  real subcommand, and every option after it (``-k``, ``--scan``, ``--scan=3``) is
  listed by ``pcrfs SUBCOMMAND --help``. Upper-case words (``pcrfs COMMAND --help``) are
  placeholders and are not checked.
* Every ``python tools/NAME.py ...`` names a tool that exists, and its options are
  listed by the tool's ``--help`` (with the subcommand words given, if any).
* Every relative link (``[text](path#anchor)``, images too) reaches a file that exists
  and, for a Markdown target, a heading with that anchor (GitHub's anchor rules).

Output blocks (```text) and Python blocks are not read as commands. The checkers are
plain functions, tested on examples that must fail, so a bogus option cannot slip through.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcrfs.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SHELL_LANGS = {"", "sh", "bash", "shell", "console"}

_FENCE = re.compile(r"^(```+|~~~+)[ \t]*([\w+-]*)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
_INLINE = re.compile(r"(?<!`)`((?:[^`\n]|\n(?!\s*\n))+)`(?!`)")  # a span may wrap, not across a blank line
_OPTION = re.compile(r"^--?[A-Za-z][\w-]*$")
_SEPARATORS = {"&&", "||", ";", "|", "(", ")", "&", "<", ">", ">>", "2>", "<<", ";;"}


# ---------------------------------------------------------------- reading the docs

def split_markdown(text: str) -> tuple[list[tuple[str, str]], str]:
    """(the fenced code blocks as (language, body), the text outside them)."""
    blocks = [(m.group(2).lower(), m.group(3)) for m in _FENCE.finditer(text)]
    return blocks, _FENCE.sub("", text)


def command_lines(text: str) -> list[str]:
    """The lines of ``text`` that may hold commands: shell code blocks and inline code spans."""
    blocks, prose = split_markdown(text)
    lines = [line for lang, body in blocks if lang in SHELL_LANGS
             for line in re.sub(r"\\\n", " ", body).splitlines()]  # a trailing \ continues the line
    return lines + [span.replace("\n", " ") for span in _INLINE.findall(prose)]


def _tokens(line: str) -> list[str]:
    line = re.sub(r"^\s*\$\s+", "", line)            # a prompt
    line = re.sub(r"(^|\s)#.*$", "", line)           # a comment
    try:
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        return list(lex)
    except ValueError:                               # unbalanced quotes in a prose span
        return line.split()


def _segments(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at &&, |, ; ...), as token lists."""
    out, cur = [], []
    for tok in _tokens(line):
        if tok in _SEPARATORS or set(tok) <= set("&|;()<>"):
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(tok.strip("[]"))
    if cur:
        out.append(cur)
    return out


def _options(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if _OPTION.match(w.split("=", 1)[0])]


def pcrfs_commands(line: str) -> list[tuple[str | None, list[str]]]:
    """Every ``pcrfs [SUBCOMMAND] ...`` of a line: (subcommand or None for the bare group,
    its options). Placeholders (``pcrfs COMMAND``) are left out."""
    found = []
    for seg in _segments(line):
        for i, tok in enumerate(seg):
            if tok == "pcrfs" or tok.endswith("/pcrfs"):
                rest = seg[i + 1:]
                if rest and not rest[0].startswith("-"):
                    if rest[0].isupper():
                        break
                    found.append((rest[0], _options(rest[1:])))
                else:
                    found.append((None, _options(rest)))
                break
    return found


def tool_commands(line: str) -> list[tuple[str, list[str], list[str]]]:
    """Every ``python tools/NAME.py ...`` of a line: (script, leading words, options)."""
    found = []
    for seg in _segments(line):
        for i, tok in enumerate(seg):
            if re.fullmatch(r"(?:\S*/)?python3?", tok) and i + 1 < len(seg) and re.fullmatch(r"tools/\w+\.py", seg[i + 1]):
                rest = seg[i + 2:]
                words = []
                for w in rest:
                    if w.startswith("-") or w.startswith("<"):
                        break
                    words.append(w)
                found.append((seg[i + 1], words, _options(rest)))
                break
    return found


# ---------------------------------------------------------------- what exists

def help_options(help_text: str) -> set[str]:
    """The options a click or argparse ``--help`` lists (``-k, --scan INTEGER`` -> -k, --scan)."""
    opts = set()
    for line in help_text.splitlines():
        m = re.match(r"\s+(-[^\s].*?)(?:\s{2,}|$)", line)
        if m:
            opts.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", m.group(1)))
    return opts


@lru_cache(maxsize=None)
def pcrfs_help(sub: str | None) -> str | None:
    """``pcrfs [SUB] --help``, or None if SUB is not a command."""
    if sub is not None and sub not in main.commands:
        return None
    res = CliRunner().invoke(main, ([sub] if sub else []) + ["--help"])
    assert res.exit_code == 0, res.output
    return res.output


@lru_cache(maxsize=None)
def tool_help(script: str, words: tuple[str, ...]) -> str | None:
    if not (ROOT / script).is_file():
        return None
    res = subprocess.run([sys.executable, script, *words, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    if res.returncode != 0 and words:  # the words were arguments, not a subcommand
        return tool_help(script, ())
    assert res.returncode == 0, f"{script} --help: {res.stderr[-2000:]}"
    return res.stdout


def command_problems(text: str) -> list[str]:
    """What ``text`` (Markdown) shows that the CLI and the tools do not have."""
    problems = []
    for line in command_lines(text):
        for sub, opts in pcrfs_commands(line):
            help_text = pcrfs_help(sub)
            if help_text is None:
                problems.append(f"`pcrfs {sub}` is not a command: {line.strip()}")
                continue
            unknown = sorted(set(opts) - help_options(help_text))
            if unknown:
                problems.append(f"`pcrfs {sub or ''}` has no option {', '.join(unknown)}: {line.strip()}")
        for script, words, opts in tool_commands(line):
            help_text = tool_help(script, tuple(words))
            if help_text is None:
                problems.append(f"{script} does not exist: {line.strip()}")
                continue
            unknown = sorted(set(opts) - help_options(help_text))
            if unknown:
                problems.append(f"{script} has no option {', '.join(unknown)}: {line.strip()}")
    return problems


# ---------------------------------------------------------------- links

def anchor(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # links: their text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    _, prose = split_markdown(text)
    seen: dict[str, int] = {}
    out = set()
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M):
        a = anchor(h)
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return out


def link_problems(path: Path, text: str) -> list[str]:
    """Relative links of the Markdown file ``path`` (content ``text``) that lead nowhere."""
    _, prose = split_markdown(text)
    prose = _INLINE.sub("", prose)
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
        if re.match(r"[a-z][\w+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, frag = target.partition("#")
        if not file_part:
            headings = anchors(text)
        else:
            dest = (path.parent / file_part).resolve()
            if not dest.exists():
                problems.append(f"{path.name}: link to a missing file: {target}")
                continue
            headings = anchors(dest.read_text()) if dest.suffix == ".md" else None
        if frag and headings is not None and frag not in headings:
            problems.append(f"{path.name}: no heading for the anchor: {target}")
    return problems


# ---------------------------------------------------------------- the docs themselves

@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_and_option_shown_exists(doc):
    problems = command_problems(doc.read_text())
    assert not problems, f"{doc.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(doc):
    problems = link_problems(doc, doc.read_text())
    assert not problems, "\n".join(problems)


def test_the_docs_show_commands_at_all():
    # the checks above would pass on docs that the parser cannot read: make sure it reads them
    shown = [c for doc in DOCS for line in command_lines(doc.read_text()) for c in pcrfs_commands(line)]
    subs = {sub for sub, _ in shown}
    assert {"convert", "mount", "umount", "info", "quality", "stats", "demo"} <= subs
    assert sum(len(opts) for _, opts in shown) > 30
    tools = [t for doc in DOCS for line in command_lines(doc.read_text()) for t in tool_commands(line)]
    assert len({script for script, _, _ in tools}) >= 8


def test_every_docs_page_has_contents():
    for doc in DOCS:
        if doc.name == "format.md":  # the format specification is its own document
            continue
        text = doc.read_text()
        assert re.search(r"^## Contents$", text, re.M), f"{doc.relative_to(ROOT)} has no table of contents"


# ---------------------------------------------------------------- the checkers can fail

def test_a_bogus_option_is_caught():
    text = "```sh\npcrfs mount /data/train.pcr /mnt/train --cache-size 1G --no-such-option\n```\n"
    assert command_problems(text) == [
        "`pcrfs mount` has no option --no-such-option: pcrfs mount /data/train.pcr /mnt/train --cache-size 1G "
        "--no-such-option"]
    assert command_problems("Run `pcrfs get STORE PATH --scan 3 --bogus=1`.")[0].startswith(
        "`pcrfs get` has no option --bogus")
    assert command_problems("```sh\n.venv/bin/pcrfs --versions\n```\n")
    assert command_problems("```sh\npcrfs convert SRC STORE \\\n    --workers 2 --no-such-option\n```\n")


def test_a_bogus_command_or_tool_is_caught():
    assert command_problems("```sh\ncd /x && pcrfs mnt STORE MNT\n```\n") == [
        "`pcrfs mnt` is not a command: cd /x && pcrfs mnt STORE MNT"]
    assert command_problems("`python tools/no_such_tool.py --rounds 3`")
    assert command_problems("`python tools/bench_shuffle.py --no-such-flag`")


def test_what_is_not_a_command_is_left_alone():
    ok = ("```text\n==> 3. Mount it: pcrfs mount --bogus\n```\n"
          "```python\nos.system('pcrfs mount --bogus')\n```\n"
          "`pcrfs COMMAND --help`, `pcrfs[demo]`, `pcrfs.torch`, `$PCRFS_RUNTIME_DIR`\n"
          "```sh\npcrfs quality demo.pcr --write-index -q && pcrfs info demo.pcr   # --not-an-option\n```\n")
    assert command_problems(ok) == []


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## A `code` heading — with: punctuation\n")
    page = tmp_path / "page.md"
    good = "[a](other.md) [b](other.md#a-code-heading--with-punctuation) [c](#mine)\n\n## Mine\n"
    assert link_problems(page, good) == []
    bad = "[a](missing.md) [b](other.md#nope) [c](#nope)\n\n## Mine\n"
    assert len(link_problems(page, bad)) == 3
