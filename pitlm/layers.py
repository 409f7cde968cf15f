"""The package's layers and its import graph: which module imports which, read from the source (no import runs).

    python -m pitlm.layers            # key: value lines: modules, edges, cycles, upward arrows (0 and 0 is the rule)
    python -m pitlm.layers --edges    # + every arrow between packages, with its count
    python -m pitlm.layers --files    # every module by layer, with its docstring's first sentence (README's Files)

Layers, lowest first: a module may import its own package and anything in a lower layer, never a higher one.
The stages run world/market -> corpus -> train -> eval -> report, `jobs` submits any of them and `demo` chains them;
`kernels` (GPU fast paths) serves both train and eval; the core (errors, config, log, volume, ...) serves everyone.
Every import counts, function-local ones too: a deferred import is still an arrow. The root `cli.py` and each stage's
`cli.py` only register commands, so they sit above their stage (a stage's CLI may reach a lower stage's code).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent

# lowest first; a layer may hold several packages / top-level modules that must not import each other's layer-mates
# only where listed in the same tuple (those may import one another).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors"),  # the root package holds only __version__
    ("config", "log", "secrets"),
    ("volume",),
    ("runs", "cliutil", "archs"),
    ("kernels",),
    ("market",),
    ("world",),
    ("corpus",),
    ("train",),
    ("eval",),
    ("report",),
    ("jobs",),
    ("doctor", "demo"),
    ("cli", "recipes", "layers"),
)


def layer_of(unit: str) -> int:
    for i, names in enumerate(LAYERS):
        if unit in names:
            return i
    raise KeyError(f"pitlm.{unit} is in no layer of pitlm.layers.LAYERS; add it there")


def unit_of(module: str) -> str:
    """The layering unit of a module: its stage package (pitlm.eval.engine -> eval) or top-level module; a stage's
    cli.py is the unit `<stage>.cli` (one layer above its stage)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    if len(parts) >= 3 and parts[2] == "cli":
        return f"{parts[1]}.cli"
    return parts[1]


def unit_layer(unit: str) -> float:
    if unit.endswith(".cli"):
        return layer_of(unit[:-4]) + 0.5
    return layer_of(unit)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The pitlm modules `path` imports (module level and function level; `from pitlm.x import name` counts as
    pitlm.x.name when that is a module, else pitlm.x)."""
    me = module_name(path, root)
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(me, node, path.name == "__init__.py")
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names] if mod else []
        else:
            continue
        out.update(t for t in targets if t and (t == "pitlm" or t.startswith("pitlm.")) and t != me)
    return out


@dataclass
class Graph:
    modules: nx.DiGraph

    @property
    def cycles(self) -> list[list[str]]:
        """Module-level import cycles (strongly connected components of more than one module)."""
        return sorted(sorted(c) for c in nx.strongly_connected_components(self.modules) if len(c) > 1)

    def package_edges(self) -> Counter:
        return Counter((unit_of(a), unit_of(b)) for a, b in self.modules.edges if unit_of(a) != unit_of(b))

    def upward(self) -> list[tuple[str, str]]:
        """Module arrows that point from a unit to a higher layer (or to a layer-mate in another layer tuple)."""
        bad = []
        for a, b in self.modules.edges:
            ua, ub = unit_of(a), unit_of(b)
            if ua == ub or ub.endswith(".cli") and ub[:-4] == ua:
                continue
            if ua.endswith(".cli") and ua[:-4] == ub:
                continue
            if unit_layer(ub) > unit_layer(ua) or ub.endswith(".cli"):
                bad.append((a, b))
        return sorted(bad)


def build_graph(root: Path = ROOT) -> Graph:
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for p in paths:
        me = module_name(p, root)
        for target in imports_of(p, modules, root):
            # `import pitlm.x.y` / `from pitlm.x import y` of a name that is no module: the nearest module above
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != me:
                g.add_edge(me, target)
    return Graph(g)


def summary_line(path: Path, width: int = 84) -> str:
    """The first sentence of a module's docstring, on one line, cut at `width` characters."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    end = text.find(". ")
    text = text[: end + 1] if 0 < end else text
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def file_table(root: Path = ROOT) -> list[str]:
    """Every module, grouped by layer (lowest first), as `path  summary` lines."""
    paths = sorted(root.rglob("*.py"))
    out = []
    for i, names in enumerate(LAYERS):
        group = [p for p in paths if unit_of(module_name(p, root)).removesuffix(".cli") in names]
        if not group:
            continue
        out.append(f"# layer {i}: {', '.join(names)}")
        for p in sorted(group, key=lambda p: (len(p.relative_to(root).parts), str(p))):
            rel = str(p.relative_to(root.parent))
            out.append(f"{rel:<34} {summary_line(p)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pitlm.layers", description=__doc__.splitlines()[0])
    ap.add_argument("--edges", action="store_true", help="print every arrow between packages")
    ap.add_argument("--files", action="store_true", help="print every module by layer with its summary line")
    args = ap.parse_args(argv)
    if args.files:
        print("\n".join(file_table()))
        return 0
    graph = build_graph()
    cycles, upward = graph.cycles, graph.upward()
    if args.edges:
        for (a, b), n in sorted(graph.package_edges().items()):
            print(f"{a} -> {b}: {n}")
    for c in cycles:
        print("cycle: " + " <-> ".join(c))
    for a, b in upward:
        print(f"upward: {a} -> {b}")
    print(f"modules: {graph.modules.number_of_nodes()}")
    print(f"import_edges: {graph.modules.number_of_edges()}")
    print(f"package_edges: {len(graph.package_edges())}")
    print(f"cycles: {len(cycles)}")
    print(f"upward_arrows: {len(upward)}")
    return 1 if cycles or upward else 0


if __name__ == "__main__":
    sys.exit(main())
