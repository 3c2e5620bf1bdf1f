#!/usr/bin/env python3
"""The figures of the last slow reliability run, as the README's "Reliability" table.

    python tools/reliability_report.py          # print the table from results/reliability.json
    python tools/reliability_report.py --run    # run `python -m pytest -m slow` on the
                                                # reliability tests first (~10 minutes), then print

The figures are written by the tests themselves (tests/reliability.py, fixture
``figures``): only slow-marked tests record, and each slow run starts a fresh file.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchlib import REPO  # noqa: E402  (the checkout's root)

RESULTS = REPO / "results" / "reliability.json"

# (section, counter) pairs: a fault injected and the count of those the system survived
FAULTS = [
    ("convert killed with SIGKILL at random moments", "convert_sigkills"),
    ("convert killed at each durable step (rename, fsync, cleanup)", "convert_crash_points"),
    ("convert into a full filesystem, then resumed", "disk_full_runs"),
    ("daemon killed with SIGKILL under load, then remounted", "daemon_sigkills"),
    ("daemon stopped with SIGTERM during reads", "daemon_sigterms"),
    ("loader processes killed mid-read", "loaders_killed"),
    ("busy unmount, then --lazy", "busy_unmounts"),
]


def _n(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def rows(doc: dict) -> list[tuple[str, str]]:
    sec = doc.get("sections", {})
    fuzz, corrupt, faults, soak = (sec.get(k, {}) for k in ("fuzz", "corrupt", "faults", "soak"))
    out = [
        ("Fuzz cases through `convert` end to end (memory-capped child, time-bounded)",
         f"{_n(fuzz.get('convert_cases', 0))} ({_n(fuzz.get('convert_cases_stored', 0))} stored, "
         f"{_n(fuzz.get('convert_cases_rejected', 0))} rejected with a reason; slowest "
         f"{fuzz.get('max_case_seconds', 0):.2f} s)"),
        ("Truncated JPEGs through the CLI (every cut at every marker, -j 2)", _n(fuzz.get("cli_cut_files", 0))),
        ("Splitter/transcoder cases in process", _n(fuzz.get("in_process_cases", 0))),
        ("Damaged stores mounted, every file of every view read",
         f"{_n(corrupt.get('scenarios', 0))} ({_n(corrupt.get('damages_injected', 0))} damages, "
         f"{_n(corrupt.get('files_read', 0))} files read, {_n(corrupt.get('files_eio', 0))} EIO as predicted)"),
        ("Random record damages checked against verify and the reader", _n(corrupt.get("random_damage_cases", 0))),
        ("Index inconsistencies given to verify", _n(corrupt.get("index_edits", 0))),
    ]
    injected = survived = 0
    for label, key in FAULTS:
        n, ok = faults.get(key, 0), faults.get(f"{key}_survived", 0)
        injected += n
        survived += ok
        out.append((f"Faults: {label}", f"{_n(ok)} of {_n(n)} survived"))
    out.append(("Faults injected / survived (total)", f"{_n(injected)} / {_n(survived)}"))
    out.append(("Soak: reader-seconds (threads + processes), GB read and checked",
                f"{_n(soak.get('reader_seconds', 0))} s, {soak.get('gb_read', 0):.2f} GB "
                f"({soak.get('gb_served_by_daemon', 0):.2f} GB served by the daemon, "
                f"{_n(soak.get('reads', 0))} reads)"))
    out.append(("Soak: daemon RSS (max, growth after warm-up)",
                f"{soak.get('max_daemon_rss_mib', 0):.0f} MiB, {soak.get('max_daemon_rss_growth_mib', 0):+.1f} MiB"))
    wrong = sum(v for s in sec.values() for k, v in s.items() if k.startswith("bytes_wrong"))
    out.append(("Bytes found wrong", _n(wrong)))
    return out


def table(doc: dict) -> str:
    lines = [f"Last slow run: {doc.get('started', '?')} to {doc.get('finished', '?')} "
             f"({doc.get('host', {}).get('cpus', '?')} CPUs, Linux {doc.get('host', {}).get('kernel', '?')}); "
             "`python -m pytest -m slow tests/test_reliability_*.py`", "",
             "| what | figure |", "|---|---|"]
    lines += [f"| {what} | {figure} |" for what, figure in rows(doc)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help="run the slow reliability tests first")
    p.add_argument("--json", action="store_true", help="print the raw figures")
    a = p.parse_args(argv)
    if a.run:
        tests = sorted(str(t.relative_to(REPO)) for t in (REPO / "tests").glob("test_reliability_*.py"))
        rc = subprocess.call([sys.executable, "-m", "pytest", "-m", "slow", "-q", *tests], cwd=REPO)
        if rc != 0:
            print(f"the slow run failed (pytest exit {rc}); figures below are what it recorded", file=sys.stderr)
    if not RESULTS.exists():
        print(f"no {RESULTS.relative_to(REPO)} yet: run `python -m pytest -m slow` (or this tool with --run)",
              file=sys.stderr)
        return 1
    doc = json.loads(RESULTS.read_text())
    print(json.dumps(doc, indent=1) if a.json else table(doc))
    return 0 if not a.run or rc == 0 else rc


if __name__ == "__main__":
    sys.exit(main())
