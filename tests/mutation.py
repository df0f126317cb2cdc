"""Mutation testing: break the code one small change at a time and check that a test fails.

    python -m tests.mutation                       # every module in TARGETS, with its tests
    python -m tests.mutation server/federation/screening.py --summary docs/results/mutation.md

Each mutant is one change to one module's syntax tree (a comparison flipped or loosened, `+` for
`-`, `*` for `/`, `and` for `or`, a `not` or a minus dropped, `min` for `max`, a number nudged,
True for False). The module's tests then run against a copy of the package tree holding the mutant
(first on sys.path, so the editable install's own folders are not touched): a failing test, or
one slower than ten times the clean run, kills it; a mutant that passes survives and is listed
with its line. mutmut was the first choice, but its copying of the source does not follow this
repository's package-dir layout (`server/` is `skip2fleet.server`).
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "server", "client", "shared")
PEFT = ("lora", "dora", "galore", "skip", "sgd")  # the methods' numerics (shared/peft/)
# module -> the tests that should kill its mutants
TARGETS = {
    "server/federation/aggregation.py": ["tests/test_aggregation.py"],
    "server/federation/validation.py": ["tests/test_round.py"],
    "server/federation/screening.py": ["tests/test_round.py"],
    "server/federation/guard.py": ["tests/test_aggregation.py", "tests/test_round.py"],
    "client/acceptance.py": ["tests/test_device.py"],
    # the versions kept, activation and rollback
    "client/store.py": ["tests/test_device.py", "tests/test_owndata.py"],
    "shared/cache.py": ["tests/test_cache.py", "tests/test_device.py"],  # the device loads one
    **{f"shared/peft/{name}.py": ["tests/test_engine.py"] for name in PEFT},
}
SWAPS = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div, ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv,
    ast.And: ast.Or, ast.Or: ast.And,
}  # fmt: skip
CALLS = {"min": "max", "max": "min", "any": "all", "all": "any"}
EQUIVALENT_FLAGS = {"frozen", "copy", "full_matrices"}  # see _equivalent_flags


@dataclass(frozen=True)
class Mutant:
    index: int  # the index-th mutable site of the module, in ast.walk order
    line: int
    what: str


Change = Callable[[], None]


def sites(tree: ast.Module) -> Iterator[tuple[ast.AST, str, Change]]:
    """Every place a mutant may change (the node, what the change is, and the change itself),
    skipping type annotations. Operators are shared instances in CPython's trees: a change
    replaces one in its parent."""
    skipped = {id(n) for node in ast.walk(tree) for n in _annotations(node)}
    skipped |= {id(n) for n in _equivalent_flags(tree)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in SWAPS:
                    yield node, _swap(op), _set_item(node.ops, i, SWAPS[type(op)]())
        elif isinstance(node, ast.BinOp | ast.AugAssign | ast.BoolOp) and type(node.op) in SWAPS:
            yield node, _swap(node.op), _set(node, "op", SWAPS[type(node.op)]())
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
            yield node, f"drop {type(node.op).__name__}", _set(node, "op", ast.UAdd())
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in CALLS:
                other = CALLS[node.func.id]
                yield node, f"{node.func.id} -> {other}", _set(node.func, "id", other)
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            nudged = _nudged(node.value)
            yield node, f"{node.value!r} -> {nudged!r}", _set(node, "value", nudged)


def _swap(op: ast.AST) -> str:
    return f"{type(op).__name__} -> {SWAPS[type(op)].__name__}"


def _set(node: ast.AST, field: str, value: object) -> Change:
    return lambda: setattr(node, field, value)


def _set_item(values: list, index: int, value: object) -> Change:
    return lambda: values.__setitem__(index, value)


def _annotations(node: ast.AST) -> Iterator[ast.AST]:
    """The nodes inside `node`'s type annotations, which no mutant changes."""
    roots = []
    if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
        roots.append(node.annotation)
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
        roots.append(node.returns)
    for root in roots:
        yield from ast.walk(root)


def _equivalent_flags(tree: ast.Module) -> Iterator[ast.AST]:
    """Keyword values whose flip cannot change a result, so their mutants are equivalent by
    construction: `frozen=` (nothing assigns to these dataclasses), `copy=` (a copy more or
    less of an array nobody writes), `full_matrices=` (the extra singular vectors are cut off
    before use), and `strict=True` (lengths equal by construction: a guard that never fires)."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.keyword) and isinstance(node.value, ast.Constant)):
            continue
        if node.arg in EQUIVALENT_FLAGS or (node.arg == "strict" and node.value.value is True):
            yield node.value


def _nudged(value: int | float | bool) -> int | float | bool:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return value * 2 if value else 1.0


def mutate(source: str, index: int) -> str:
    """`source` with its index-th site changed."""
    tree = ast.parse(source)
    _, _, change = list(sites(tree))[index]
    change()
    return ast.unparse(tree)


def run_tests(tree: Path, tests: list[str], timeout: float) -> bool:
    """Whether `tests` pass against the package tree at `tree`."""
    env = os.environ | {"PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def package_tree(folder: Path) -> Path:
    """A copy of the import package under `folder`/skip2fleet, found before the installed one."""
    for part in PACKAGES:
        shutil.copytree(
            ROOT / part,
            folder / "skip2fleet" / part,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    return folder


def mutation_test(module: str, tests: list[str]) -> tuple[int, list[Mutant]]:
    """(mutants made, survivors) for `module` under `tests`."""
    source = (ROOT / module).read_text()
    tree = ast.parse(source)
    mutants = [
        Mutant(i, getattr(node, "lineno", 0), what) for i, (node, what, _) in enumerate(sites(tree))
    ]
    tests = [t for t in tests if (ROOT / t).is_file()]
    survivors = []
    with tempfile.TemporaryDirectory(prefix="mutation-") as scratch:
        folder = package_tree(Path(scratch))
        target = folder / "skip2fleet" / module
        target.write_text(ast.unparse(tree))
        started = time.monotonic()
        if not run_tests(folder, tests, timeout=3600):
            raise SystemExit(f"{module}: {' '.join(tests)} fail without any mutant")
        timeout = 10 * (time.monotonic() - started) + 10
        for mutant in mutants:
            target.write_text(mutate(source, mutant.index))
            if run_tests(folder, tests, timeout):
                survivors.append(mutant)
                print(f"  survived: {module}:{mutant.line} {mutant.what}", flush=True)
    return len(mutants), survivors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="modules (default: all of TARGETS)")
    parser.add_argument("--summary", type=Path, help="write the summary (markdown) here")
    args = parser.parse_args()
    lines = ["| module | killed / total | survivors (line: change) |", "|---|---:|---|"]
    for module in args.modules or list(TARGETS):
        print(f"{module} ...", flush=True)
        total, survivors = mutation_test(module, TARGETS[module])
        listed = "; ".join(f"{m.line}: {m.what}" for m in survivors) or "none"
        lines.append(f"| `{module}` | {total - len(survivors)} / {total} | {listed} |")
        print(lines[-1], flush=True)
    if args.summary:
        args.summary.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
