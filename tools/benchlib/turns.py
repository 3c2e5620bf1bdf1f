"""Child processes that take turns: each answers one request at a time, so a parent can measure
several of them (different packages, say) alternately, a few milliseconds apart, instead of one
process after another.

    child = Child([sys.executable, TOOL, "--serve", cfg], env, log_file)  # waits for its first line
    child.ready                      # what the child said when it was ready (a dict)
    child.ask({"op": "pass"})        # one JSON line to its stdin, its one JSON line back
    child.close()                    # EOF on its stdin, then it must exit (else SIGTERM/SIGKILL)

The child's side is a loop over its stdin: one JSON object per line in, one per line out on
stdout (its stderr goes to ``log_file``); it says ``{"ready": ...}`` first and exits at EOF. A
child that exits or does not answer within ``timeout`` seconds raises RuntimeError naming
the log. Children are registered with :data:`benchlib.mounts.CLEANUP` until closed.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path

from .mounts import CLEANUP, stop_process


class Child:
    def __init__(self, argv: list[str], env: dict, log_file: str | os.PathLike, *, cwd: str = "/",
                 timeout: float = 600) -> None:
        self.log_file, self.timeout = Path(log_file), timeout
        with open(self.log_file, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf,
                                         env=env, cwd=cwd, text=True, bufsize=1)
        CLEANUP.procs.append(self.proc)
        try:
            self.ready: dict = self._answer()
        except BaseException:
            self.close()
            raise

    def _fail(self, why: str) -> RuntimeError:
        tail = self.log_file.read_text(errors="replace")[-3000:] if self.log_file.exists() else ""
        return RuntimeError(f"child {self.proc.pid} {why}; its log {self.log_file} ends:\n{tail}")

    def _answer(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"did not answer within {self.timeout:.0f} s")
            if select.select([self.proc.stdout], [], [], min(left, 1.0))[0]:
                break
            if self.proc.poll() is not None:
                raise self._fail(f"exited with {self.proc.returncode}")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise self._fail(f"exited with {self.proc.returncode}")
        return json.loads(line)

    def ask(self, request: dict) -> dict:
        """Send ``request``; the child's answer."""
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._fail("closed its stdin") from None
        return self._answer()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc in CLEANUP.procs:
            CLEANUP.procs.remove(self.proc)
