"""The never-rules of docs/architecture.md, checked on the source (AST, no imports run).

- the format/store/JPEG layers (and everything else outside the FUSE adapter and the
  CLI) never import the FUSE layer or a CLI module, nor click;
- only the CLI (``pcrfs/cli/``, with the demo tour) and the two process entry points
  (``mount.pcrfs``; the daemon, whose stdout/stderr are its log file) write to the
  terminal; library functions return values, raise, or take a log callback;
- nothing outside the store-location code asks which kind of store it has: no
  ``isinstance`` of a location or sink class or of ``Path``, no ``is_url``, no
  ``"://" in text``, no mention of ``LocalRecords`` (callers ask the location, sink or
  record source what it can do);
- no module imports the package root (versions come from ``pcrfs/_version.py``);
- no import cycles between modules, counting imports inside functions;
- no function longer than ``MAX_FUNCTION_LINES``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "pcrfs"
MAX_FUNCTION_LINES = 60

# modules (dotted, below pcrfs) allowed to write to the terminal
TERMINAL_WRITERS = ("cli", "fuse.mount_helper", "fuse.daemon")
# modules that may import click (the CLI declares its options there)
CLICK_USERS = ("cli",)
# modules that may import the FUSE layer (it is an adapter over the store and views)
FUSE_USERS = ("fuse", "cli")
# where the kinds of store locations (local directory, object-store prefix) are told apart
LOCATION_KINDS = ("LocalLocation", "RemoteLocation", "LocalSink", "ObjectSink")
LOCATION_MODULES = ("store.sources.location", "store.write.sink")
# other ways to ask the kind, each also allowed where it is defined
KIND_TESTS = {"is_url": "remote.fs", "LocalRecords": "store.sources.backends"}
PATH_TYPES = ("Path", "PurePath", "PosixPath", "PurePosixPath")  # isinstance(x, Path): "is it local?"
# modules outside LOCATION_MODULES that may ask isinstance(..., Path), and why: an argument's
# type (str | Path) would be a reason, a store's kind never is. None left: arguments are taken
# with os.fspath, and the kind of a store is a capability of its location (issue 28).
PATH_CHECKS_ALLOWED: dict[str, str] = {}
# modules that may look for "://" in a string (`"://" in text`: "is it a URL?"), and why
SCHEME_CHECKS_ALLOWED = {
    "remote.fs": "defines is_url",
    "access.filesystem": "composes fsspec's chained URLs (pcr::s3://...), URL syntax rather than a store's kind",
}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _is_package(module: str) -> bool:
    return (ROOT.joinpath(*module.split(".")) / "__init__.py").exists() if module else True


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of nodes under ``if TYPE_CHECKING:`` (annotations only; never executed)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def _imports(module: str, tree: ast.Module) -> list[tuple[str, int]]:
    """(absolute dotted name below the package root, line) for every import of pcrfs
    code in ``module``; external imports as ('<ext>:name', line)."""
    skip = _type_checking_only(tree)
    package = module if _is_package(module) else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "pcrfs" or a.name.startswith("pcrfs."):
                    out.append((a.name[len("pcrfs."):] if a.name != "pcrfs" else "", node.lineno))
                else:
                    out.append((f"<ext>:{a.name}", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and (node.module == "pcrfs" or node.module.startswith("pcrfs.")):
                    base = node.module[len("pcrfs."):] if node.module != "pcrfs" else ""
                else:
                    out.append((f"<ext>:{node.module}", node.lineno))
                    continue
            else:
                parts = package.split(".") if package else []
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}" if base else a.name
                out.append((sub if sub in MODULES else base, node.lineno))
    return out


def test_lower_layers_never_import_the_fuse_layer_the_cli_or_click():
    bad = []
    for module, tree in MODULES.items():
        for name, line in _imports(module, tree):
            if not _within(module, FUSE_USERS) and _within(name, ("fuse",)):
                bad.append(f"{module}:{line} imports pcrfs.{name}")
            if not _within(module, ("cli",)) and _within(name, ("cli",)):
                bad.append(f"{module}:{line} imports pcrfs.{name}")
            if not _within(module, CLICK_USERS) and name in ("<ext>:click",) :
                bad.append(f"{module}:{line} imports click")
    assert not bad, "layering broken:\n" + "\n".join(bad)


# the store's subpackages, bottom up: each may import only those listed (and store.errors);
# nothing in the store imports the layers above it (access, quality, convert, ...)
STORE_LAYERS = {
    "store.format": (),
    "store.sources": ("store.format",),
    "store.read": ("store.format", "store.sources"),
    "store.write": ("store.format", "store.sources"),
}
STORE_MAY_USE = ("store.errors", "jpeg", "remote", "fsutil", "imagenames", "units", "_version")
# public names that are the FUSE-free access layer's modules under another name (sys.modules alias)
ACCESS_ALIASES = {"torch": "access.torch", "sampling": "access.sampling", "filesystem": "access.filesystem"}


def _store_layer_breaks(module: str, tree: ast.Module) -> list[str]:
    """Imports of ``module`` (in the store) that reach past the layers below it."""
    layer = next((name for name in STORE_LAYERS if _within(module, (name,))), None)
    if layer is None:
        return []
    allowed = (layer,) + STORE_LAYERS[layer] + STORE_MAY_USE
    return [f"{module}:{line} imports pcrfs.{name}" for name, line in _imports(module, tree)
            if not name.startswith("<ext>:") and name not in ("store", "store.format") + STORE_LAYERS[layer]
            and not _within(name, allowed)]


def test_the_store_subpackages_import_only_the_layers_below():
    bad = [line for module, tree in MODULES.items() for line in _store_layer_breaks(module, tree)]
    assert set(STORE_LAYERS) | {"store.errors"} >= {m for m in MODULES if m.startswith("store.") and m.count(".") == 1}, \
        "a module directly in pcrfs/store/ other than errors: put it in the subpackage of its job"
    assert not bad, "store layering broken (format < sources < read, write):\n" + "\n".join(bad)


@pytest.mark.parametrize("module, source", [
    ("store.format.index", "from ..sources.location import open_location\n"),
    ("store.sources.cache", "from ..read.reader import Store\n"),
    ("store.read.fetch", "from ..write.sink import RecordSink\n"),
    ("store.write.writer", "from ..read import reader\n"),
    ("store.read.reader", "from ...access.views import ViewTree\n"),
    ("store.format.groups", "from ...quality import scoring\n"),
])
def test_the_store_layering_check_catches_what_it_is_for(module, source):
    assert _store_layer_breaks(module, ast.parse(source))
    assert not _store_layer_breaks(module, ast.parse("from ...store.errors import StoreError\n"))


def test_the_public_access_names_are_aliases_and_nothing_else():
    """pcrfs.torch, pcrfs.sampling and pcrfs.filesystem *are* the access layer's modules: each
    alias module holds the alias only (no code of its own to drift), and the import gives
    the very module object."""
    import importlib
    for alias, real in ACCESS_ALIASES.items():
        tree = MODULES[alias]
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert all(isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign)) for n in body), alias
        assigns = [ast.unparse(n) for n in body if isinstance(n, ast.Assign)]
        assert assigns[0] == "sys.modules[__name__] = _module", alias
        assert all(a.startswith("sys.modules[__name__ + '.") for a in assigns[1:]), alias  # its submodules
        if alias == "torch" and importlib.util.find_spec("torch") is None:
            continue
        assert importlib.import_module(f"pcrfs.{alias}") is importlib.import_module(f"pcrfs.{real}")
        for sub in [m for m in sys.modules if m.startswith(f"pcrfs.{real}.")]:
            assert importlib.import_module(sub.replace(real, alias, 1)) is sys.modules[sub]


def _writes_to_terminal(node: ast.AST) -> bool:
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Name) and f.id in ("print", "input"):
            return True
        if isinstance(f, ast.Attribute) and f.attr in ("echo", "secho") \
                and isinstance(f.value, ast.Name) and f.value.id == "click":
            return True
    # sys.stdout / sys.stderr used at all (write, flush, print(file=...), passed on)
    return (isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr", "__stdout__", "__stderr__")
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


def test_only_the_cli_writes_to_the_terminal():
    bad = [f"{module}:{node.lineno} {ast.unparse(node)[:60]}"
           for module, tree in MODULES.items() if not _within(module, TERMINAL_WRITERS)
           for node in ast.walk(tree) if _writes_to_terminal(node)]
    assert not bad, "library code writing to the terminal (return values, raise, or take a log callback):\n" \
        + "\n".join(bad)


def _names(node: ast.AST) -> set[str]:
    """The names in ``node``: ``Path``, ``pathlib.Path`` and ``(str, Path)`` all give ``Path``."""
    return {n.id if isinstance(n, ast.Name) else getattr(n, "attr", "") for n in ast.walk(node)}


def _asks_kind(node: ast.AST) -> str | None:
    """What ``node`` asks about a store's kind (``isinstance``, ``is_url``, ``LocalRecords``), or None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance" \
            and len(node.args) == 2:
        kinds = _names(node.args[1])
        if kinds & set(LOCATION_KINDS):
            return "isinstance"
        if kinds & set(PATH_TYPES):
            return "Path"
    if isinstance(node, ast.Call) and _name_of(node.func) == "is_url":  # is_url(...), fs.is_url(...)
        return "is_url"
    if isinstance(node, ast.ImportFrom) and any(a.name in KIND_TESTS for a in node.names):
        return next(a.name for a in node.names if a.name in KIND_TESTS)  # imported, even under another name
    if _name_of(node) == "LocalRecords":
        return "LocalRecords"
    if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) \
            and isinstance(node.left, ast.Constant) and node.left.value == "://":
        return "://"
    return None


def _name_of(node: ast.AST) -> str | None:
    """``x`` for the name ``x`` and the attribute ``a.b.x``; None for anything else."""
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def _kind_questions(module: str, tree: ast.AST) -> list[str]:
    """Where ``module`` asks which kind of store it has, outside the places allowed to."""
    if _within(module, LOCATION_MODULES):
        return []
    bad = []
    for node in ast.walk(tree):
        asked = _asks_kind(node)
        if asked is None or KIND_TESTS.get(asked) == module or (asked == "Path" and module in PATH_CHECKS_ALLOWED) \
                or (asked == "://" and module in SCHEME_CHECKS_ALLOWED):
            continue
        bad.append(f"{module}:{node.lineno} {ast.unparse(node)[:100]}")
    return bad


def test_nothing_outside_the_location_code_asks_which_kind_of_store_it_has():
    bad = [line for module, tree in MODULES.items() for line in _kind_questions(module, tree)]
    assert not bad, "ask the location, sink or record source what it can do (pcrfs.store.sources.location), " \
        "not which kind it is:\n" + "\n".join(bad)


@pytest.mark.parametrize("source", [
    "isinstance(location, LocalLocation)\n",
    "isinstance(sink, (sink_mod.ObjectSink, str))\n",
    "from ..remote.fs import is_url\n",
    "if is_url(text):\n    pass\n",
    "fs.is_url(text)\n",
    "ok = isinstance(store.root, Path)\n",
    "import pathlib\nok = isinstance(store.root, pathlib.Path)\n",
    "ok = isinstance(arg, (str, Path))\n",
    "from ..store.backends import LocalRecords\n",
    "from ..store.backends import RecordSource, LocalRecords as LR\n",
    "local = isinstance(store.records, backends.LocalRecords)\n",
    "source = LocalRecords(root, sizes)\n",
    "remote = '://' in text\n",
    "if '://' not in store:\n    pass\n",
])
def test_the_kind_check_catches_what_it_is_for(source):
    # the lint must be able to fail: each snippet asks a store's kind outside the location code ...
    assert _kind_questions("quality.build", ast.parse(source))
    # ... and the location code itself may ask it
    assert not _kind_questions("store.sources.location", ast.parse(source))


@pytest.mark.parametrize("source, module", [
    ("def is_url(location):\n    return bool(_URL.match(location))\nis_url('s3://b')\n", "remote.fs"),
    ("class LocalRecords(RecordSource):\n    pass\nLocalRecords(root, sizes)\n", "store.sources.backends"),
])
def test_the_kind_check_allows_the_defining_module(source, module):
    assert not _kind_questions(module, ast.parse(source))
    assert _kind_questions("fuse.fastpath", ast.parse(source))


@pytest.mark.parametrize("source", [
    "ok = isinstance(x, str)\npath = Path(text)\n",
    "ok = store.location.workers_can_reopen()\n",
    "local = store.records.offers_descriptors()\n",
    "from ..store.location import local_directory\n",
])
def test_the_kind_check_leaves_capabilities_alone(source):
    assert not _kind_questions("quality.build", ast.parse(source))


def _defined(module: str) -> set[str]:
    return {n.name for n in ast.walk(MODULES[module]) if isinstance(n, (ast.ClassDef, ast.FunctionDef))}


def test_the_kind_check_names_what_exists():
    # a stale name exempts nothing and checks nothing (the list once named store.target,
    # RemoteSink and RemoteTarget, none of which existed)
    assert all(m in MODULES for m in LOCATION_MODULES + tuple(KIND_TESTS.values()) + tuple(PATH_CHECKS_ALLOWED)
               + tuple(SCHEME_CHECKS_ALLOWED))
    defined_there = set().union(*(_defined(m) for m in LOCATION_MODULES))
    assert set(LOCATION_KINDS) <= defined_there, set(LOCATION_KINDS) - defined_there
    assert all(name in _defined(module) for name, module in KIND_TESTS.items())


def test_no_module_imports_the_package_root():
    bad = [f"{module}:{line}" for module, tree in MODULES.items() if module
           for name, line in _imports(module, tree) if name == ""]
    assert not bad, "import pcrfs._version (or the module you need), not the package root:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    for module, tree in MODULES.items():
        deps = {name for name, _ in _imports(module, tree) if name in MODULES and name != module}
        # a package's __init__ re-exporting its own submodules is not a cycle of design
        graph[module] = {d for d in deps if not (_is_package(module) and _within(d, (module,)))} \
            if module else set()
    cycles = _cycles(graph)
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_function_is_longer_than_a_screen():
    long = []
    for module, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("source, rule", [
    ("print('x')\n", "terminal"),
    ("import sys\nsys.stderr.write('x')\n", "terminal"),
    ("import click\nclick.echo('x')\n", "terminal"),
])
def test_the_terminal_check_catches_what_it_is_for(source, rule):
    # the lint must be able to fail: each snippet breaks the rule it names
    assert any(_writes_to_terminal(n) for n in ast.walk(ast.parse(source)))


def test_the_cycle_check_catches_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_to_modules():
    tree = ast.parse("from .. import format as fmt\nfrom .reader import Store\nfrom ... import _version\n")
    names = {n for n, _ in _imports("store.read.fetch", tree)}
    assert {"store.format", "store.read.reader", "_version"} <= names
