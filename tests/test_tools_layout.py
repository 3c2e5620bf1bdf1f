"""The benchmark tools keep the package's 60-line rule: no function under ``tools/`` (the
bench library included) is longer than ``MAX_FUNCTION_LINES``. Checked on the source (AST:
nothing under tools/ is imported or run)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
MAX_FUNCTION_LINES = 60  # as for pcrfs/ (tests/test_architecture.py; see the last test)


def long_functions(source: str, filename: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:function:length`` of every function in ``source`` (methods and nested functions
    too) longer than ``limit`` lines, counted as end_lineno - lineno + 1 of its ``def``."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                out.append(f"{filename}:{node.name}:{lines}")
    return out


def test_no_tool_function_is_longer_than_the_limit():
    files = sorted(TOOLS.rglob("*.py"))
    assert len(files) > 10, f"no tools found under {TOOLS}"
    too_long = [f for path in files for f in long_functions(path.read_text(), str(path.relative_to(REPO)))]
    assert not too_long, (f"functions over {MAX_FUNCTION_LINES} lines (file:function:lines; split them into "
                          "named steps):\n" + "\n".join(too_long))


def _function(name: str, body_lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(body_lines))
    return f"{indent}def {name}():\n{body}"


def test_the_check_catches_a_long_function():
    # the check must be able to fail: 61 lines (the def and 60 below it) are one too many
    source = (_function("short", 3) + "\n\n" + _function("at_the_limit", 59) + "\n\n" + _function("too_long", 60)
              + "\n\nclass C:\n" + _function("long_method", 60, indent="    "))
    assert long_functions(source, "tools/x.py") == ["tools/x.py:too_long:61", "tools/x.py:long_method:61"]
    assert long_functions(_function("at_the_limit", 59), "tools/x.py") == []


def test_the_limit_is_the_package_one():
    tree = ast.parse((REPO / "tests" / "test_architecture.py").read_text())
    limits = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "MAX_FUNCTION_LINES" for t in node.targets)]
    assert limits == [MAX_FUNCTION_LINES]
