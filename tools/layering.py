"""The package's layering, read from its source: import graph, layer rules, size limits, and the picture.

``python tools/layering.py`` prints the component import graph as a Mermaid diagram (pasted into ARCHITECTURE.md)
and every violation; ``tests/test_architecture.py`` fails on any violation and when ARCHITECTURE.md's picture no
longer matches the code. Imports are read with ``ast`` (never executed), at module level and inside functions alike:
a lazy import is still an arrow.
"""
from __future__ import annotations

import ast
import os
import sys
from typing import Dict, Iterable, List, Optional, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "learned_opt"

# Bottom to top. A component (a top-level module or subpackage of learned_opt) may import from components of lower
# layers only; components that share a layer stay independent of each other.
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("registry", "validate", "flags", "repro", "functional", "estimators"),  # neutral helpers, no learned_opt import
    ("log", "control"),  # run records; meta-control (LR and stop decisions)
    ("tasks",),  # the inner problems
    ("unroll",),  # the one inner loop
    ("optim",),  # baselines, meta-networks, the torch.optim adapter
    ("evaluate",),  # splits and seeds, tuning search, baselines, statistics
    ("distributed",),  # ranks, all-reduce of meta-gradients
    ("meta",),  # meta-training: config, losses, checkpoints, estimators, trainer
    ("pretrained",),  # shipped meta-networks and their manifest
    ("dropin",),  # LearnedOptimizer, the torch.optim face of a shipped network
    ("cli", "integrations"),  # the learned-opt command; the loss hand-over to training frameworks
)
# Size limits of issue 22, for learned_opt/ and experiments/.
MAX_FILE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 500, 250, 100


def module_files(root: str = ROOT, package: str = PACKAGE) -> Dict[str, str]:
    """Dotted module name -> file path, for every ``.py`` file of ``package`` under ``root``."""
    out = {}
    base = os.path.join(root, package)
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(files):
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, name)
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative levels resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imports_of(module: str, path: str, known: Iterable[str]) -> Set[str]:
    """The package-internal modules ``module`` imports, anywhere in its body (``TYPE_CHECKING`` blocks excluded)."""
    known = set(known)
    tree = ast.parse(open(path).read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    skip = {id(n) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
            for n in ast.walk(n)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            # `from pkg import sub` imports the submodule pkg.sub where one exists
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        for name in names:
            while name and name not in known:  # `import a.b.c` of a non-module attribute: its module
                name = name.rpartition(".")[0]
            if name and name != module and name.split(".")[0] == PACKAGE:
                out.add(name)
    return out


def import_graph(root: str = ROOT, package: str = PACKAGE) -> Dict[str, Set[str]]:
    """Module -> the package-internal modules it imports."""
    files = module_files(root, package)
    return {m: imports_of(m, p, files) for m, p in files.items()}


def component(module: str) -> str:
    """The layer component of a module: ``learned_opt.meta.trainer -> meta``; the root package is ``''``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(comp: str) -> Optional[int]:
    """The index of the layer that holds component ``comp`` (None: not placed in any layer)."""
    for i, layer in enumerate(LAYERS):
        if comp in layer:
            return i
    return None


def layering_violations(graph: Dict[str, Set[str]]) -> List[str]:
    """Every import that runs sideways or upwards between layers, or from a component no layer names."""
    bad = []
    for src, targets in sorted(graph.items()):
        a = component(src)
        if a == "":
            continue  # the root package imports lazily, by name, on first use
        if layer_of(a) is None:
            bad.append(f"{src}: component '{a}' is in no layer of tools/layering.py")
            continue
        for dst in sorted(targets):
            b = component(dst)
            if b == a:
                continue
            lb = layer_of(b)
            if lb is None or lb >= layer_of(a):
                bad.append(f"{src} imports {dst}: '{a}' may not import '{b}' (layers in tools/layering.py)")
    return bad


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Import circles between modules (each as the list of modules on it), by Tarjan's strongly connected parts."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in graph.get(v, ()):
                found.append(sorted(part))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def size_violations(folders: Iterable[str]) -> List[str]:
    """Files over MAX_FILE_LINES lines, classes over MAX_CLASS_LINES, functions over MAX_FUNCTION_LINES."""
    bad = []
    for folder in folders:
        for dirpath, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(dirpath, name)
                src = open(path).read()
                rel = os.path.relpath(path, ROOT)
                if src.count("\n") > MAX_FILE_LINES:
                    bad.append(f"{rel}: {src.count(chr(10))} lines (at most {MAX_FILE_LINES})")
                for node in ast.walk(ast.parse(src, path)):
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        n = node.end_lineno - node.lineno + 1
                        kind, limit = (("class", MAX_CLASS_LINES) if isinstance(node, ast.ClassDef)
                                       else ("function", MAX_FUNCTION_LINES))
                        if n > limit:
                            bad.append(f"{rel}:{node.lineno}: {kind} {node.name} is {n} lines (at most {limit})")
    return bad


def component_edges(graph: Dict[str, Set[str]]) -> Set[Tuple[str, str]]:
    """The arrows between components (``(importer, imported)``), the root package left out."""
    return {(component(s), component(d)) for s, ts in graph.items() for d in ts
            if component(s) and component(d) and component(s) != component(d)}


def mermaid(graph: Dict[str, Set[str]]) -> str:
    """The component graph as a Mermaid flowchart, one subgraph per layer (top layer first)."""
    lines = ["```mermaid", "flowchart TD"]
    for i in reversed(range(len(LAYERS))):
        lines.append(f'  subgraph L{i}["layer {i}"]')
        lines += [f"    {c}" for c in LAYERS[i]]
        lines.append("  end")
    lines += [f"  {a} --> {b}" for a, b in sorted(component_edges(graph))]
    lines.append("```")
    return "\n".join(lines)


def main() -> int:
    """Print the Mermaid picture and every violation; exit 1 when there is one."""
    graph = import_graph()
    print(mermaid(graph))
    bad = layering_violations(graph) + [" -> ".join(c) + " (import circle)" for c in cycles(graph)]
    bad += size_violations([os.path.join(ROOT, PACKAGE), os.path.join(ROOT, "experiments")])
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
