"""The bench library every tool under ``tools/`` shares: mounting, timing, machine facts,
JSON results and plots. Import it from a tool with ``tools/`` on ``sys.path`` (a script
run as ``python tools/x.py`` has it) after :func:`benchlib.repo_path` put the checkout
first (so the pcrfs measured is the checkout's, not an installed one)::

    from benchlib import REPO, log                  # REPO: the checkout's root (Path)
    from benchlib.mounts import PcrfsMount, CLEANUP # a pcrfs mount by PID, always unmounted
    from benchlib.proc import Meter, loadavg        # wall time + CPU per item from /proc
    from benchlib.machine import machine_facts      # cores, kernel, python, pcrfs, git, ...
    from benchlib.results import Run                # one run's header, load before/after, JSON
    from benchlib.plots import pyplot, save         # matplotlib (optional: None if missing)

Modules (each one job; none imports a tool):

``benchlib.proc``      CPU and load from /proc: ``cpu_s(pid)`` (utime+stime, 10 ms ticks),
                       ``threads_cpu_s(pid)`` (ns, the sum of /proc/PID/task/*/schedstat: fine
                       enough for a few µs per file), ``self_cpu_s()``, ``loadavg()``, and
                       ``Meter(pid=None, precise=False)``: a with-block that measures wall time,
                       this process's CPU and (optionally) another process's, then
                       ``m.per_item(n)`` -> ``{"seconds", "items", "items_per_s",
                       "self_us_per_item", "daemon_us_per_item", "daemon_cores"}``.
``benchlib.reads``     reading files the way a data loader does: ``walk(root)`` (sorted relative
                       paths, like ImageFolder's listing), ``read_pass(paths)`` (``open``+read+close),
                       ``read_pass_os(paths)`` (``os.open``: no isatty ioctl), ``sample(items, n)``,
                       ``warm(paths_or_dir)`` (into the page cache).
``benchlib.mounts``    ``PcrfsMount(store, mp, log_file=..., cache_size=..., read_options=...,
                       options=..., env=...)``: ``pcrfs mount`` in a with-block; ``.pid`` is the
                       daemon's, ``.stats()`` its counters; the exit always unmounts (detaching
                       as a last resort) and waits for that PID. ``ProcessMount(argv, mp, log_file)``:
                       any FUSE server run in the foreground as a child (ratarmount, an
                       instrumented daemon). ``CLEANUP`` tracks every mount and PID a run made;
                       ``CLEANUP.all()`` (in a ``finally``) stops only those, by PID, and unmounts;
                       ``on_signals()`` turns SIGTERM into KeyboardInterrupt so the finally runs.
                       ``is_mounted(mp)``, ``unmount_any(mp)``, ``stop_process(popen)``,
                       ``libfuse_of(pid)`` (the libfuse a FUSE server has mapped).
``benchlib.pagecache`` ``drop_caches()`` (root: the next reads come from disk), ``can_drop_caches()``,
                       ``fincore(paths)``: which fraction of the files the page cache holds.
``benchlib.machine``   ``machine_facts(packages=())``: cpu model, cores, memory, kernel, python,
                       platform, pcrfs version, git commit (+ whether pcrfs/ differs from it) and
                       the versions of ``packages``; ``source_state()``: HEAD, changed pcrfs files,
                       a hash of pcrfs/**/*.py; ``cpu_model()``, ``memory_gb()``.
``benchlib.results``   ``Run(tool, argv=None, packages=())``: started time, command line, machine
                       facts and the load average before; ``run.doc(**fields)`` -> the result dict
                       with ``tool``, ``command``, ``started_utc``, ``seconds``, ``machine``,
                       ``pcrfs_source``, ``loadavg_before``/``loadavg_after``, then ``fields``;
                       ``write_json(path, doc, key=None)`` (``key``: update one key of an existing
                       file and keep the rest).
``benchlib.plots``     ``pyplot()`` -> matplotlib.pyplot on the Agg backend, or None (logged) when
                       matplotlib is not installed; ``save(fig, png)``.
``benchlib.data``      ``demo_store(work, per_class, store_name="store.pcr", **convert_options)``:
                       the demo photos and their store under ``work``, each made once.
``benchlib.remote``    an S3 server whose ranged GETs do not read the whole object (``S3rver``,
                       s3rver 3.7.1 installed with npm on first use; credentials ``S3RVER_ENV``)
                       and ``LinkProxy(upstream_port, latency, rate)``: a user-space link on
                       127.0.0.1 (latency per request, a shared rate, requests/GETs/bytes counted;
                       ``.counts()``); ``upload(files, endpoint)``; ``free_port()``.
``benchlib.revisions`` ``code_tree(rev, work)``: another git revision's pcrfs (compiled path
                       built in place) beside the checkout's, ``env_for(tree)`` to run it.
``benchlib.turns``     ``Child``: processes that take turns answering requests, so variants are
                       measured alternately, a few milliseconds apart.
``benchlib.loaders``   training epochs as benchmarks run them (torchvision or ``pcrfs.torch``
                       ImageFolder, ``decode`` or ``bytes`` loaders), drained and timed.
``benchlib.lockstep``  training processes (ranks) that run each epoch together on a signal.
``benchlib.training_targets``, ``benchlib.training_plot``: issue 25's targets and plot for
                       ``tools/bench_remote_epoch.py``'s rows.

Rules the library keeps so the figures are comparable between tools: CPU per item comes from
/proc (it does not drift with the machine's load the way wall time does), every result records
the load average before and after, and nothing a run started is left mounted or running.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The checkout's root (tools/benchlib/__init__.py -> ../..)."""

if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    """A progress line on stderr (stdout stays free for a tool's JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def quiet(_msg: str) -> None:
    """An ``echo`` callback for pcrfs library calls that says nothing."""
