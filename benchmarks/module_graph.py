"""The shape of `pipelines/`: its import graph, cycles, imports hidden in functions, and file sizes.

    .venv/bin/python benchmarks/module_graph.py
    .venv/bin/python benchmarks/module_graph.py --root /tmp/old_tree

Reads the source of any tree (`--root`, default this checkout) without importing it, so it works on a tree that is
half-way through a change. The graph between the package's own modules is built from every import statement (module
level, inside functions, under `if TYPE_CHECKING:`), with the standard library's `ast`; when grimp (the engine of
import-linter) is installed, grimp builds the same graph from the same tree and the two are compared. Imports are
edges from the importing module to the imported one; `from pkg import name` is an import of `pkg.name` when that is
a module, else of `pkg`. A package's `__init__` is the module named after the package.

Prints: the number of modules and import edges; the import cycles (strongly connected components of more than one
module, with their members), also counting only the imports that run (leaving out `if TYPE_CHECKING:` blocks); the
imports of the package's own modules made inside functions or classes rather than at module level; module-level
imports of its own modules wrapped in try/except ImportError (anywhere); the imports from `tune_spaces/` of
`pipelines` or `vae`; and the line count of every file, longest first, flagging files over the limit (600 lines).
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINE_LIMIT = 600


@dataclass(frozen=True)
class Import:
    importer: str        # dotted module that holds the statement
    target: str          # dotted name as written, relative imports resolved
    names: tuple[str, ...]  # for `from X import a, b`: ("a", "b"); for `import X`: ()
    line: int
    where: str           # "module", "function" (inside a def or class) or "type_checking"
    guarded: bool        # inside a try whose handlers catch ImportError (at module level or in a function)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path, package: str) -> dict[str, Path]:
    base = root / package
    return {module_name(root, p): p for p in sorted(base.rglob("*.py")) if "__pycache__" not in p.parts}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _catches_import_error(handlers: list[ast.ExceptHandler]) -> bool:
    for h in handlers:
        names = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
        if h.type is None or any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError",
                                                                        "Exception") for n in names):
            return True
    return False


def imports_of(module: str, path: Path) -> list[Import]:
    """Every import statement of one file, with where it sits."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    package_parts = module.split(".") if is_pkg else module.split(".")[:-1]
    found: list[Import] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package_parts[: len(package_parts) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, where: str, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, alias.name, (), child.lineno, where, guarded))
            elif isinstance(child, ast.ImportFrom):
                found.append(Import(module, resolve(child), tuple(a.name for a in child.names), child.lineno,
                                    where, guarded))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                visit(child, "function", False)
            elif isinstance(child, ast.If) and where == "module" and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), "type_checking", guarded)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), where, guarded)
            elif isinstance(child, ast.Try):
                catches = _catches_import_error(child.handlers)
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), where, guarded or catches)
                for part in (child.handlers, child.orelse, child.finalbody):
                    for stmt in part:
                        visit(stmt if isinstance(stmt, ast.ExceptHandler)
                              else ast.Module(body=[stmt], type_ignores=[]), where, guarded)
            else:
                visit(child, where, guarded)

    visit(tree, "module", False)
    return found


def targets(imp: Import, modules: set[str]) -> tuple[set[str], set[str]]:
    """(modules the statement imports, names it imports that the tree has no module for).

    `import a.b` imports module `a.b`; `from a import b` imports module `a.b` when there is one, else module `a`
    (b is then a name defined in it). A name with no module behind it is an import the tree cannot satisfy, e.g.
    of a module that was moved.
    """
    if not imp.names:
        return ({imp.target}, set()) if imp.target in modules else (set(), {imp.target})
    found, missing = set(), set()
    for name in imp.names:
        if f"{imp.target}.{name}" in modules:
            found.add(f"{imp.target}.{name}")
        elif imp.target in modules:
            found.add(imp.target)
        else:
            missing.add(f"{imp.target}.{name}")
    return found, missing


def is_own(imp: Import, package: str) -> bool:
    return imp.target == package or imp.target.startswith(package + ".")


def sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative), each sorted; only those of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out, key=lambda c: (-len(c), c))


def build(root: Path, package: str, skip_type_checking: bool
          ) -> tuple[set[str], dict[str, set[str]], list[tuple[str, int, str]]]:
    """(modules, import graph, unresolved imports as (importer, line, name))."""
    files = source_files(root, package)
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    unresolved: list[tuple[str, int, str]] = []
    for mod, path in files.items():
        for imp in imports_of(mod, path):
            if skip_type_checking and imp.where == "type_checking":
                continue
            if is_own(imp, package):
                found, missing = targets(imp, modules)
                graph[mod] |= found - {mod}
                unresolved += [(mod, imp.line, name) for name in sorted(missing)]
    return modules, graph, unresolved


def grimp_graph(root: Path, package: str) -> dict[str, set[str]] | str:
    """The same graph from grimp, or a line saying why it could not be built."""
    try:
        import grimp
    except ImportError:
        return "grimp not installed (pip install 'import-linter>=2.1,<3')"
    sys.path.insert(0, str(root))
    try:
        g = grimp.build_graph(package, include_external_packages=False, cache_dir=None)
    except Exception as exc:  # grimp raises its own error types across versions; report any of them
        return f"grimp could not build the graph: {exc!r}"
    finally:
        sys.path.remove(str(root))
    return {m: set(g.find_modules_directly_imported_by(m)) - {m} for m in g.modules}


def describe_cycle(graph: dict[str, set[str]], members: list[str]) -> int:
    inside = set(members)
    return sum(len(graph[m] & inside) for m in members)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=REPO, help="source tree to read (default: this checkout)")
    p.add_argument("--package", default="pipelines", help="the package whose graph is built")
    args = p.parse_args(argv)
    root, pkg = args.root.resolve(), args.package
    if not (root / pkg / "__init__.py").is_file():
        p.error(f"{root / pkg} is not a package (no __init__.py); pass --root the top of a vaepipe checkout")

    files = source_files(root, pkg)
    modules, graph, unresolved = build(root, pkg, skip_type_checking=False)
    _, runtime_graph, _ = build(root, pkg, skip_type_checking=True)
    n_edges = sum(len(v) for v in graph.values())
    print(f"== {root} : package {pkg}")
    print(f"modules: {len(modules)}   import edges between them: {n_edges} (ast)")
    namespace = sorted(str(d.relative_to(root)) for d in (root / pkg).rglob("*")
                       if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
                       and not (d / "__init__.py").exists())
    if namespace:
        print(f"directories with .py files but no __init__.py (grimp skips them): {', '.join(namespace)}")
    if unresolved:
        print(f"imports of {pkg}.* that no file in the tree provides: {len(unresolved)}"
              + "".join(f"\n  {mod}:{line} {name}" for mod, line, name in unresolved))

    g = grimp_graph(root, pkg)
    if isinstance(g, str):
        print(f"grimp cross-check: skipped, {g}")
    else:
        mine = {(a, b) for a, bs in graph.items() for b in bs}
        theirs = {(a, b) for a, bs in g.items() for b in bs}
        if mine == theirs:
            print(f"grimp cross-check: same {len(theirs)} edges")
        else:
            print(f"grimp cross-check: grimp has {len(theirs)} edges, ast {len(mine)}")
            for label, diff in (("only in ast", mine - theirs), ("only in grimp", theirs - mine)):
                if diff:
                    print(f"  {label}: " + ", ".join(f"{a} -> {b}" for a, b in sorted(diff)))

    for label, gr in (("all imports", graph), ("runtime imports (without `if TYPE_CHECKING:`)", runtime_graph)):
        cycles = sccs(gr)
        print(f"\nimport cycles, {label}: {len(cycles)}"
              + (f" (modules in cycles: {sum(len(c) for c in cycles)})" if cycles else ""))
        for c in cycles:
            print(f"  {len(c)} modules, {describe_cycle(gr, c)} edges inside: {', '.join(c)}")

    hidden: dict[str, list[int]] = defaultdict(list)
    guarded: dict[str, list[int]] = defaultdict(list)
    type_checking = 0
    for mod, path in files.items():
        for imp in imports_of(mod, path):
            if not is_own(imp, pkg):
                continue
            if imp.where == "function":
                hidden[mod].append(imp.line)
            elif imp.where == "type_checking":
                type_checking += 1
            if imp.guarded:
                guarded[mod].append(imp.line)
    n_hidden = sum(len(v) for v in hidden.values())
    print(f"\nimports of {pkg}.* (absolute or relative) inside functions or classes: {n_hidden} statements "
          f"in {len(hidden)} files")
    for mod, lines in sorted(hidden.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        print(f"  {len(lines):>3}  {mod}")
    print(f"imports of {pkg}.* guarded by try/except ImportError (any level): {sum(len(v) for v in guarded.values())}"
          + "".join(f"\n  {mod}: lines {', '.join(map(str, v))}" for mod, v in sorted(guarded.items())))
    print(f"imports of {pkg}.* under `if TYPE_CHECKING:`: {type_checking}")

    spaces = root / "tune_spaces"
    if spaces.is_dir():
        cross = [(mod, imp) for mod, path in source_files(root, "tune_spaces").items()
                 for imp in imports_of(mod, path) if imp.target.split(".")[0] in ("pipelines", "vae")]
        print(f"\ntune_spaces -> pipelines/vae imports: {len(cross)}"
              + "".join(f"\n  {mod}:{imp.line} {imp.target} ({imp.where})" for mod, imp in cross))

    print(f"\nlines per file ({pkg}/ and tune_spaces/), longest first; * = over {LINE_LIMIT}")
    sized = [(len(p.read_text().splitlines()), p.relative_to(root)) for p in
             list(files.values()) + sorted((root / "tune_spaces").rglob("*.py"))
             if "__pycache__" not in p.parts]
    for n, rel in sorted(sized, key=lambda t: (-t[0], str(t[1]))):
        print(f"  {n:>5} {'*' if n > LINE_LIMIT else ' '} {rel}")
    over = [s for s in sized if s[0] > LINE_LIMIT]
    print(f"  total {sum(n for n, _ in sized)} lines in {len(sized)} files; {len(over)} over {LINE_LIMIT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
