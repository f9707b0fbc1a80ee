"""The one registration module, and the import graph it keeps free of cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import worker.engine

ENGINE = Path(worker.engine.__file__).parent


def test_importing_components_fills_every_registry() -> None:
    code = (
        "from worker.engine.components import STUDENTS, TEACHER_RUNTIMES; "
        "print(STUDENTS.names(), TEACHER_RUNTIMES.names())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (
        "['auto', 'cnn', 'hf_encoder', 'mlp', 'rnn', 'transformer'] "
        "['huggingface', 'onnx', 'safetensors']"
    )


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ENGINE.parent.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(module: str, path: Path) -> set[str]:
    """Every name ``module`` imports, anywhere in it, importlib string literals included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}".rstrip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and str(node.value).startswith("worker.engine."):
            names.add(str(node.value))
    return names


def _engine_imports() -> dict[str, set[str]]:
    """Engine module -> the engine modules it imports, a package's ``__init__`` included."""
    paths = {_module_name(p): p for p in ENGINE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets: set[str] = set()
        for name in _imported_names(module, path):
            parts = name.split(".")
            for end in range(3, len(parts) + 1):
                target = ".".join(parts[:end])
                # A package's own modules do not count as importing it: its __init__ gathers them.
                if target in paths and target != module and not module.startswith(f"{target}."):
                    targets.add(target)
        graph[module] = targets
    return graph


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path from ``start`` back to itself, if there is one."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        module, path = stack.pop()
        for target in graph[module]:
            if target == start:
                return [*path, start]
            if target not in seen:
                seen.add(target)
                stack.append((target, [*path, target]))
    return None


def test_no_engine_module_is_in_an_import_cycle() -> None:
    graph = _engine_imports()
    assert "worker.engine.components" in graph
    cycles = [cycle for module in sorted(graph) if (cycle := _cycle_through(graph, module))]
    assert cycles == []
