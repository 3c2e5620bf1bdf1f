"""One run's result document: header (tool, command, time, machine, load) and JSON writing."""
from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

from . import REPO, log
from .machine import machine_facts, source_state
from .proc import loadavg


class Run:
    """Started when a tool starts measuring: records the command line, the time, the machine
    and the load average before; :meth:`doc` closes it with the load average after."""

    def __init__(self, tool: str, argv: list[str] | None = None, packages: tuple[str, ...] | list[str] = ()) -> None:
        self.tool = tool
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self._t0 = time.monotonic()
        self.machine = machine_facts(packages)
        self.loadavg_before = loadavg()

    @property
    def command(self) -> str:
        return " ".join(["python", self.tool] + self.argv)

    def doc(self, **fields) -> dict:
        """The result: header first, then ``fields`` (in the order given)."""
        return {"tool": self.tool, "command": self.command,
                "started_utc": self.started.isoformat(timespec="seconds"),
                "seconds": round(time.monotonic() - self._t0, 1),
                "machine": self.machine, "pcrfs_source": source_state(),
                "loadavg_before": self.loadavg_before, "loadavg_after": loadavg(), **fields}


def write_json(path: str | Path, doc: dict, key: str | None = None) -> Path:
    """Write ``doc`` as indented JSON; with ``key``, set only ``key`` in the existing file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if key is not None:
        whole = json.loads(path.read_text()) if path.exists() else {}
        whole[key] = doc
        doc = whole
    path.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    full = path.resolve()
    shown = full.relative_to(REPO) if full.is_relative_to(REPO) else full
    log(f"wrote {shown}" + (f" ({key})" if key else ""))
    return path
