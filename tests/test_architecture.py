"""The architecture as tests: the import graph of ``fdp/`` has no cycle, and outside
``fdp/backends/`` nothing asks which backend runs (capabilities and methods instead)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import fdp
from fdp.backends import Backend, DistributedBackend, ThreadsBackend, VmapBackend

ROOT = pathlib.Path(fdp.__file__).resolve().parent
BACKEND_NAMES = {VmapBackend.name, ThreadsBackend.name, DistributedBackend.name}
CONCRETE = {"VmapBackend", "ThreadsBackend", "DistributedBackend", "SpmdBackend"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _edges(name: str, path: pathlib.Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in _runtime_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names if a.name.split(".")[0] == "fdp"}
            continue
        base = node.module or ""
        if node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                            + ([node.module] if node.module else []))
        if base.split(".")[0] != "fdp":
            continue
        for alias in node.names:  # `from fdp import _tree` imports a module
            sub = f"{base}.{alias.name}"
            targets.add(sub if sub in MODULES else base)
    return {t for t in targets if t in MODULES and t != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = {name: _edges(name, path) for name, path in MODULES.items()}
    assert sum(len(v) for v in graph.values()) > 100  # the walk sees the imports
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _backend_dispatch(path: pathlib.Path) -> list[str]:
    """Comparisons with a backend's name, and isinstance checks for a concrete backend."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            texts = [ast.unparse(o) for o in operands]
            names = any(isinstance(o, ast.Constant) and o.value in BACKEND_NAMES
                        for o in operands) or any(
                isinstance(o, (ast.Tuple, ast.List, ast.Set))
                and any(isinstance(e, ast.Constant) and e.value in BACKEND_NAMES for e in o.elts)
                for o in operands)
            about_backend = any("backend" in t or t.endswith(".name") for t in texts)
            if (names and about_backend) or any(t.endswith("backend_name") for t in texts):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "isinstance" \
                and len(node.args) == 2 and set(ast.unparse(node.args[1]).replace(
                    "(", " ").replace(")", " ").replace(",", " ").split()) & CONCRETE:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_dispatch_on_the_backend_outside_fdp_backends():
    outside = [p for n, p in MODULES.items() if not n.startswith("fdp.backends")]
    found = [line for path in outside for line in _backend_dispatch(path)]
    assert not found, "\n".join(found)


def test_the_dispatch_finder_finds_dispatch(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('if mesh.backend_name == "vmap":\n    pass\n'
                   'x = mesh.backend.name in ("threads", "distributed")\n'
                   'y = isinstance(mesh.backend, VmapBackend)\n'
                   'z = "distributed" in sections\n')  # not about a backend: allowed
    assert [line.split(":")[1] for line in _backend_dispatch(bad)] == ["1", "3", "4"]


@pytest.mark.parametrize("backend", [VmapBackend, ThreadsBackend, DistributedBackend])
def test_every_backend_implements_the_contract(backend):
    assert issubclass(backend, Backend) and not backend.__abstractmethods__
    assert backend.name in BACKEND_NAMES
    for capability in ("ragged", "tape_collectives", "replicas_share_generator"):
        assert isinstance(getattr(backend, capability), bool)


def test_a_backend_is_not_its_name():
    mesh = fdp.Mesh(2)
    assert mesh.backend_name == "vmap" and mesh.backend.name == "vmap"
    with pytest.raises(TypeError, match=r"mesh\.backend_name == 'vmap'"):
        _ = mesh.backend == "vmap"


PRIVATE_TORCH = ("torch._C", "torch.utils._pytree", "_broadcast_to_and_flatten",
                 "modules.batchnorm", "nn.parameter", "torch._guards", "torch._dynamo",
                 "torch._functorch", "forward_ad._")


def test_private_torch_apis_only_in_compat():
    found = []
    for name, path in MODULES.items():
        code = " ".join(ast.unparse(n) for n in ast.walk(ast.parse(path.read_text()))
                        if isinstance(n, (ast.Attribute, ast.Import, ast.ImportFrom)))
        found += [f"{name}: {needle}" for needle in PRIVATE_TORCH
                  if needle in code and name != "fdp._compat"]
    assert not found, found
