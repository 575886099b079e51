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


# Libraries that cost a command or the worker's start-up enough to import them only where
# they are used (numba compiles, matplotlib and scikit-learn take seconds, the clients and
# pyarrow a few tenths). A function-local import of one of our modules must say which of
# these it keeps off its importer's path: `# lazy: numba` on its line or on a comment line
# just above its block of imports. The test checks each named library is one the imported
# module loads at its top (through our modules too) and the importer does not.
HEAVY = {"numba", "matplotlib", "shap", "sklearn", "scipy", "faust", "mode", "aiohttp", "aiokafka", "hera",
         "confluent_kafka", "clickhouse_connect", "chdb", "pyarrow", "fairlearn", "lightgbm", "xgboost"}


def _top_level(module: str, modules: set[str]) -> tuple[set[str], set[str]]:
    """(our modules, heavy libraries) that `module` imports at its top, outside any function."""
    path = source_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    ours, libs = set(), set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue  # for type checkers only: not imported when the module runs
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1] + ([child.module] if child.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            else:
                visit(child)
                continue
            for name in names:
                if name in modules:
                    ours.add(name)
                elif name.split(".")[0] in HEAVY:
                    libs.add(name.split(".")[0])
    visit(ast.parse(path.read_text()))
    return ours, libs


def heavy_closure(modules: set[str]) -> dict[str, set[str]]:
    """Every heavy library importing each module loads (its packages' __init__ included)."""
    direct = {m: _top_level(m, modules) for m in modules}
    out: dict[str, set[str]] = {}

    def closure(m: str, seen: set[str]) -> set[str]:
        if m in out:
            return out[m]
        seen = seen | {m}
        parents = {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)} & modules
        libs = set(direct[m][1])
        for dep in (direct[m][0] | parents) - seen:
            libs |= closure(dep, seen)
        return libs
    for m in modules:
        out[m] = closure(m, set())
    return out


def lazy_imports(module: str, modules: set[str]):
    """(line, our modules imported, the reason's libraries) of each import inside a function."""
    path = source_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    lines = path.read_text().splitlines()
    found = []

    def reason(lineno: int) -> set[str]:
        text = lines[lineno - 1]
        k = lineno - 1
        while "# lazy:" not in text and k > 0 and lines[k - 1].strip().startswith(("from ", "import ", "#")):
            k -= 1
            text = lines[k] if lines[k].strip().startswith("#") else lines[k] + ""
            if lines[k].strip().startswith("#"):
                break
        if "# lazy:" not in text:
            return set()
        words = text.split("# lazy:", 1)[1].split("(")[0].replace(",", " ").split()
        return set(words)

    def visit(node, inside: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, True)
                continue
            if inside and isinstance(child, ast.ImportFrom | ast.Import):
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                else:
                    base = child.module or ""
                    if child.level:
                        parts = package.split(".")
                        base = ".".join(parts[:len(parts) - child.level + 1] + ([child.module] if child.module else []))
                    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
                ours = {n for n in names if n in modules}
                if ours:
                    found.append((child.lineno, ours, reason(child.lineno)))
            visit(child, inside)
    visit(ast.parse(path.read_text()), False)
    return found


def test_an_import_inside_a_function_keeps_a_named_heavy_library_off_its_importers_path():
    modules = set(every_module())
    heavy = heavy_closure(modules)
    wrong = []
    for m in sorted(modules):
        for line, targets, named in lazy_imports(m, modules):
            if all((m, t) in TWO_WAY_RULE for t in targets):
                continue
            kept_off = set().union(*(heavy[t] for t in targets)) - heavy[m]
            if not named or not named <= HEAVY or not named <= kept_off:
                wrong.append(f"{source_file(m).relative_to(ROOT)}:{line} imports {', '.join(sorted(targets))} "
                             f"inside a function; named {sorted(named) or 'no reason'}, keeps off "
                             f"{sorted(kept_off) or 'nothing'}")
    assert wrong == [], "\n".join(wrong)


def test_the_check_reads_what_a_module_loads():
    modules = set(every_module())
    heavy = heavy_closure(modules)
    assert {"faust", "clickhouse_connect", "pyarrow"} <= heavy["enricher.worker"]
    assert "numba" in heavy["enricher.models.treeshap"] and "numba" not in heavy["enricher.worker"]
    assert heavy["enricher.store.reports"] == set() and heavy["enricher.windows"] == set()
