"""The package's import graph, read with ast: no module imports, even from inside a
function, a module that imports it back, but for the one two-way rule of the domain."""

import ast
from collections import defaultdict

from .test_layout import ROOT, declared, every_module

# A schema may not name a column an enrichment outputs, and enrichments are written
# against the schema: models/spec.py reads the catalog (and places columns in their
# slots) inside the functions that check a schema. Nothing else may close a circle.
TWO_WAY_RULE = {("enricher.models.spec", "enricher.models.catalog"),
                ("enricher.models.spec", "enricher.models.enrichment"),
                ("enricher.models.spec", "enricher.models.slots")}


def source_file(module: str):
    package_dir, packages = declared()
    package = module if module in packages else module.rpartition(".")[0]
    base = max((n for n in package_dir if package == n or package.startswith(n + ".")), key=len)
    folder = ROOT / package_dir[base] / "/".join(package[len(base):].strip(".").split(".") if package != base else [])
    return folder / ("__init__.py" if module in packages else module.rpartition(".")[2] + ".py")


def imports(module: str, modules: set[str]) -> set[str]:
    """Our modules `module` imports, at its top or inside a function."""
    path = source_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != module}
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1; stack.append(child); on.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop(); on.discard(member); component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circle_but_the_two_way_rule():
    modules = set(every_module())
    graph = {m: imports(m, modules) for m in modules}
    assert TWO_WAY_RULE <= {(m, t) for m in graph for t in graph[m]}, "the rule's imports moved: update TWO_WAY_RULE"
    for m, t in TWO_WAY_RULE:
        graph[m].discard(t)
    assert circles(graph) == []


def test_the_check_finds_a_circle():
    graph = defaultdict(set, {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert circles(graph) == [["a", "b", "c"]]
