"""The repository stands alone: no tracked file points at a machine path or a document it does not contain."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Joined at run time so that this file never matches its own patterns.
_FORBIDDEN = [
    "DEVELOPERS" + r"\.md",              # notes of one workplace, not shipped
    "shared" + "/reference",
    "reference" + " note",
    "/" + "work/",                       # a machine's checkout path
    "/tmp" + "/metrics",
    "ray-deepspeed" + "-stack",
    "offline-eval" + "-data",
    "digan-official" + r"\.md",
    "slurm" + "-loopback",
    "style" + r"\.md",
]
PATTERN = re.compile("|".join(_FORBIDDEN))


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in out.decode().split("\0"):
        p = REPO / name
        if name and p.is_file() and not p.is_symlink():
            files.append(p)
    return files


def test_no_pointers_outside_the_repository():
    hits = []
    for p in _tracked_text_files():
        data = p.read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if PATTERN.search(line):
                hits.append(f"{p.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not hits, "tracked files point outside the repository:\n" + "\n".join(hits)


def test_the_patterns_catch_what_they_should():
    for text in ("see DEVELOPERS" + ".md", "/" + "work/shared/x", "ray-deepspeed" + "-stack.md §2",
                 "/tmp" + "/metrics/jaxenv"):
        assert PATTERN.search(text), text
    assert not PATTERN.search("README.md, docs/ and ~/work-dir are fine")


# ----------------------------------------------------------------------------------------------------
# The house drawn from its imports: every arrow points down (or stays inside its own room).

# Bottom to top. A module may import its own room and the rooms of LOWER floors only (function-level
# imports count too: a lazy import is still an arrow).
FLOORS = [
    {"digan.config", "digan.storage", "digan.malloc", "digan.video_io"},
    {"digan.models", "data_shards"},
    {"digan.data", "digan.training", "digan.sampling"},
    {"digan.metrics"},
    {"digan.distributed"},
    {"digan.train", "digan.generate", "digan.evaluate", "digan.predict"},
    {"sweeps", "benchmarks"},
]
_OURS = ("digan", "data_shards", "sweeps", "benchmarks")


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "digan" and len(parts) > 1 else parts[0]


def _floor(room: str) -> int:
    for i, rooms in enumerate(FLOORS):
        if room in rooms:
            return i
    raise AssertionError(f"{room}: not on any floor of FLOORS; put it where it belongs")


def _imports(path: Path) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {m for m in out if m.split(".")[0] in _OURS}


def _arrows_up(files: list[Path]) -> list[str]:
    bad = []
    for p in files:
        rel = p.relative_to(REPO)
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        here = _room(module)
        for target in sorted(_imports(p)):
            there = _room(target)
            if there != here and _floor(there) >= _floor(here):
                bad.append(f"{rel}: {here} (floor {_floor(here)}) imports {target} (floor {_floor(there)})")
    return bad


def _product_py_files() -> list[Path]:
    return [p for p in _tracked_text_files() if p.suffix == ".py" and p.relative_to(REPO).parts[0] in _OURS]


def test_no_import_runs_back_up_the_house():
    files = _product_py_files()
    assert len(files) > 40, "the checker found too few files to mean anything"
    bad = _arrows_up(files)
    assert not bad, "imports that run up or sideways:\n" + "\n".join(bad)


def test_nothing_outside_the_tests_imports_the_tests():
    bad = []
    for p in _product_py_files():
        text = p.read_text()
        if re.search(r"^\s*(from|import)\s+(tests\b|fixtures_s3|ray_nodes|slurm_fixture|conftest)", text, re.M) or \
                re.search(r"sys\.path\.insert\([^\n]*[\"']tests[\"']", text):
            bad.append(str(p.relative_to(REPO)))
    assert not bad, "product code reaching into tests/: " + ", ".join(bad)


# ----------------------------------------------------------------------------------------------------
# Sizes: no file over ~350 lines outside the tests, no function over 60 lines without a reason next to it.

MAX_FILE_LINES = 360
MAX_FUNCTION_LINES = 60
REASON = "# long function:"  # in the comment block right above the `def` (or on its line), then the reason


def _long_functions(path: Path) -> list[str]:
    """Functions whose body (the docstring not counted) is longer than MAX_FUNCTION_LINES, without a reason."""
    import ast

    text = path.read_text()
    lines = text.splitlines()
    out = []
    for node in ast.walk(ast.parse(text, str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]
        if not body:
            continue
        length = node.end_lineno - body[0].lineno + 1
        top = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1  # 0-based index of the first line
        while top > 0 and lines[top - 1].strip().startswith("#"):  # the comment block right above
            top -= 1
        context = " ".join(lines[top: node.lineno])
        if length > MAX_FUNCTION_LINES and REASON not in context:
            out.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    return out


def test_files_and_functions_stay_small():
    files = _product_py_files()
    big = [f"{p.relative_to(REPO)}: {n} lines" for p in files if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not big, f"files over {MAX_FILE_LINES} lines (split them where the jobs part):\n" + "\n".join(big)
    long = [entry for p in files for entry in _long_functions(p)]
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines without a `{REASON} ...` comment:\n"
                      + "\n".join(long))
