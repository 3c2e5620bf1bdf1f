"""Training processes run in lockstep: each child builds its loader (a rank of a job, say),
says it is ready, then runs an epoch each time it is told, all children at once; the parent
reads the link's counters between epochs, so they hold exactly those epochs.

Parent::

    with Lockstep([cfg0, cfg1], [sys.executable, TOOL, CHILD], log_file) as group:
        group.ready                  # what each child built (its first line)
        rows = group.epoch(1)        # one dict per child: its epoch's figures, + t_start/t_end (time.time())

Child (``TOOL CHILD '<config json>'``): ``sys.exit(child_main(config, build))`` where
``build(config) -> (run(epoch) -> dict, info)`` (e.g. :func:`benchlib.loaders.epoch_runner`).
The protocol is one line each way: the parent writes the epoch number (or ``quit``), the
child answers one JSON object on stdout (its stderr goes to the log file).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable


def child_main(config: dict, build: Callable[[dict], tuple[Callable[[int], dict], dict]]) -> int:
    """The child's side: build, say ready (with ``info``), run the epochs it is told."""
    run, info = build(config)
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line or line == "quit":
            break
        t0 = time.time()
        out = run(int(line))
        out.update(t_start=t0, t_end=time.time())
        print(json.dumps(out), flush=True)
    return 0


class Lockstep:
    """Child processes ``argv + [json config]``, one per config, driven epoch by epoch."""

    def __init__(self, configs: list[dict], argv: list[str], log_file: Path, timeout: float = 1800) -> None:
        self.timeout = timeout
        self._log = open(log_file, "ab")
        self.procs = [subprocess.Popen(argv + [json.dumps(c)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=self._log, text=True) for c in configs]
        self.log_file = log_file
        try:
            self.ready = self._answers()
        except BaseException:
            self.kill()
            self.close()
            raise

    def _read(self, p: subprocess.Popen) -> dict:
        while True:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"an epoch process exited ({p.wait()}); see {self.log_file}")
            try:
                out = json.loads(line)
            except ValueError:
                continue  # not ours (something a library printed)
            if isinstance(out, dict):
                return out

    def _answers(self) -> list[dict]:
        """One answer from every child, all of them killed if that takes over ``timeout`` s."""
        timer = threading.Timer(self.timeout, self.kill)
        timer.start()
        try:
            return [self._read(p) for p in self.procs]
        finally:
            timer.cancel()

    def epoch(self, epoch: int) -> list[dict]:
        """Tell every child to run ``epoch`` (at once) and wait for all of them."""
        for p in self.procs:
            p.stdin.write(f"{epoch}\n")
            p.stdin.flush()
        return self._answers()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    def close(self) -> None:
        for p in self.procs:
            try:
                if p.poll() is None:
                    p.stdin.write("quit\n")
                    p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._log.close()

    def __enter__(self) -> "Lockstep":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
