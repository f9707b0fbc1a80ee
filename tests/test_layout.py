"""The top level is one-way: the API never reaches into the worker, the engine into neither.

Every module under ``app/`` and ``worker/`` is parsed, with the imports inside
functions, ``importlib.import_module("…")`` literals and relative imports, and
each arrow is checked against the layout of DESIGN.md:

- ``app`` imports from ``worker`` only the engine's torch-free modules the API
  validates with (:data:`API_ENGINE_MODULES`, and their submodules);
- ``worker.engine`` imports nothing of ``app`` or of ``worker`` outside itself;
- those engine modules, followed through their own imports inside the engine,
  never import torch or a library that loads it (:data:`TORCH`).

``bench/`` may import anything and is not checked. That the running API and the
worker's parent process never load torch is checked in fresh interpreters by
``tests/app/test_main.py`` and ``tests/worker/test_celery_app.py``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The top-level packages whose arrows are checked.
CHECKED = ("app", "worker")
ENGINE = "worker.engine"
#: What the API may import from worker/: the engine's torch-free modules.
API_ENGINE_MODULES = tuple(
    f"{ENGINE}.{name}"
    for name in (
        "spec",
        "errors",
        "signature",
        "inspection",
        "isolated",
        "compatibility",
        "archive",
        "data",
        "planning",
    )
)
#: Modules that load torch when imported.
TORCH = ("torch", "transformers", "safetensors.torch", "sentence_transformers")
#: Calls whose first argument, a string literal, names a module to import.
_IMPORT_CALLS = frozenset({"import_module", "__import__"})


@dataclass(frozen=True)
class Edge:
    """One import: ``source`` imports ``target`` at ``line`` (only for type checkers unless
    ``runtime``)."""

    source: str
    target: str
    line: int
    runtime: bool = True

    def __str__(self) -> str:
        return f"{self.source}:{self.line} -> {self.target}"


def within(module: str, package: str) -> bool:
    """Whether ``module`` is ``package`` or one of its submodules."""
    return module == package or module.startswith(package + ".")


def module_files(root: Path = REPO) -> dict[str, Path]:
    """Every module under the checked packages, by dotted name (a package by its own name)."""
    found: dict[str, Path] = {}
    for top in CHECKED:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


class _ImportVisitor(ast.NodeVisitor):
    """Collects the imports of one module, resolving relative ones against its package."""

    def __init__(self, module: str, is_package: bool, known: Iterable[str]) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = frozenset(known)
        self.edges: list[Edge] = []
        self._type_checking = 0

    def _add(self, target: str, node: ast.AST) -> None:
        line = getattr(node, "lineno", 0)
        self.edges.append(Edge(self.module, target, line, runtime=not self._type_checking))

    def _absolute(self, name: str, level: int) -> str:
        if level == 0:
            return name
        base = self.package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join([*base, name] if name else base)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._absolute(node.module or "", node.level)
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            # ``from package import module`` imports the module; ``from module import name``
            # the module. Outside the repository, the name is kept: it may be a submodule.
            local = any(within(base, top) for top in CHECKED)
            self._add(candidate if candidate in self.known or not local else base, node)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
        if name in _IMPORT_CALLS and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                text = first.value
                level = len(text) - len(text.lstrip("."))
                self._add(self._absolute(text.lstrip("."), level), node)
        self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = getattr(test, "id", None) == "TYPE_CHECKING" or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        if not guarded:
            self.generic_visit(node)
            return
        self._type_checking += 1
        for statement in node.body:
            self.visit(statement)
        self._type_checking -= 1
        for statement in node.orelse:
            self.visit(statement)


def imports_of(source: str, module: str, *, is_package: bool, known: Iterable[str]) -> list[Edge]:
    """Every import in ``source``, the text of ``module``; ``known`` names the local modules."""
    visitor = _ImportVisitor(module, is_package, known)
    visitor.visit(ast.parse(source))
    return visitor.edges


def import_graph(root: Path = REPO) -> dict[str, list[Edge]]:
    """The imports of every checked module, by module."""
    files = module_files(root)
    return {
        module: imports_of(
            path.read_text(), module, is_package=path.name == "__init__.py", known=files
        )
        for module, path in files.items()
    }


def direction_violations(edges: Iterable[Edge]) -> list[Edge]:
    """The arrows against the layout: app into the worker beyond the engine's torch-free
    modules, and the engine out of itself into app or worker."""
    return [edge for edge in edges if _against_the_layout(edge)]


def _against_the_layout(edge: Edge) -> bool:
    if within(edge.source, "app"):
        return within(edge.target, "worker") and not any(
            within(edge.target, allowed) for allowed in API_ENGINE_MODULES
        )
    if within(edge.source, ENGINE):
        leaves = not within(edge.target, ENGINE)
        return leaves and (within(edge.target, "app") or within(edge.target, "worker"))
    return False


def _parents(module: str) -> Iterator[str]:
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
    parts = module.split(".")
    for end in range(1, len(parts)):
        yield ".".join(parts[:end])


def torch_leaks(graph: Mapping[str, list[Edge]], roots: Iterable[str]) -> list[str]:
    """Import chains from ``roots`` through the engine's modules to a module of :data:`TORCH`.

    Only imports that run count (those under ``if TYPE_CHECKING:`` do not);
    imports inside functions do, since the API calls those functions.
    """
    leaks: list[str] = []
    chains: dict[str, list[str]] = {}
    waiting: list[tuple[str, list[str]]] = []
    for root in roots:
        for module in [*_parents(root), root]:
            waiting.append((module, [module]))
    while waiting:
        module, chain = waiting.pop()
        if module in chains or module not in graph:
            continue
        chains[module] = chain
        for edge in graph[module]:
            if not edge.runtime:
                continue
            if any(within(edge.target, heavy) for heavy in TORCH):
                leaks.append(" -> ".join([*chain, f"{edge.target} (line {edge.line})"]))
            elif within(edge.target, ENGINE):
                for reached in [*_parents(edge.target), edge.target]:
                    waiting.append((reached, [*chain, reached]))
    return sorted(leaks)


# ---------------------------------------------------------------------- the repository


def test_every_module_the_api_may_import_from_the_engine_exists() -> None:
    files = module_files()
    assert [name for name in API_ENGINE_MODULES if name not in files] == []


def test_app_imports_only_the_engines_torch_free_modules_from_worker() -> None:
    graph = import_graph()
    arrows = [e for module, edges in graph.items() if within(module, "app") for e in edges]
    assert [str(e) for e in direction_violations(arrows)] == []


def test_the_engine_imports_nothing_of_app_or_of_the_rest_of_worker() -> None:
    graph = import_graph()
    arrows = [e for module, edges in graph.items() if within(module, ENGINE) for e in edges]
    assert [str(e) for e in direction_violations(arrows)] == []


def test_the_engine_modules_the_api_imports_never_import_torch() -> None:
    assert torch_leaks(import_graph(), API_ENGINE_MODULES) == []


# ---------------------------------------------------------------------- the checker itself


def test_the_checker_reports_a_new_bad_arrow() -> None:
    edges = [
        Edge("app.jobs.service", "worker.runner", 1),
        Edge("app", "worker.engine.training", 2),
        Edge("app.jobs.schemas", "worker.tasks", 3, runtime=False),
        Edge("worker.engine.pipeline", "app.config", 4),
        Edge("worker.engine.pipeline", "worker.sessions", 5),
        # Allowed: the torch-free engine modules (and their submodules), and the worker
        # using the API's domain.
        Edge("app.jobs.service", "worker.engine.spec", 6),
        Edge("app.datasets.service", "worker.engine.data.readers", 7),
        Edge("worker.runner", "app.jobs.service", 8),
        Edge("worker.engine.pipeline", "worker.engine.training", 9),
    ]
    assert [e.line for e in direction_violations(edges)] == [1, 2, 3, 4, 5]


def test_the_checker_follows_an_allowed_module_to_torch() -> None:
    graph = {
        "worker": [],
        "worker.engine": [],
        "worker.engine.spec": [Edge("worker.engine.spec", "worker.engine.units", 3)],
        "worker.engine.units": [
            Edge("worker.engine.units", "torch.nn", 7),
            Edge("worker.engine.units", "transformers", 8, runtime=False),
        ],
    }
    assert torch_leaks(graph, ["worker.engine.spec"]) == [
        "worker.engine.spec -> worker.engine.units -> torch.nn (line 7)"
    ]


def test_the_checker_sees_imports_in_functions_relative_imports_and_literals() -> None:
    source = """
import importlib
from typing import TYPE_CHECKING
from . import queue
from ..models.models import TeacherModel
from worker import runner
from safetensors import torch as weights
if TYPE_CHECKING:
    from worker.tasks import run_job
def later():
    from worker.engine.training import Callbacks
    importlib.import_module("worker.reconciler")
"""
    known = {"app.jobs.queue", "app.models.models", "worker.runner", "worker.engine.training"}
    edges = imports_of(source, "app.jobs.service", is_package=False, known=known)
    assert [(e.target, e.runtime) for e in edges] == [
        ("importlib", True),
        ("typing.TYPE_CHECKING", True),
        ("app.jobs.queue", True),
        ("app.models.models", True),
        ("worker.runner", True),
        ("safetensors.torch", True),
        ("worker.tasks", False),
        ("worker.engine.training", True),
        ("worker.reconciler", True),
    ]
    assert [e.target for e in direction_violations(edges)] == [
        "worker.runner",
        "worker.tasks",
        "worker.engine.training",
        "worker.reconciler",
    ]
