"""The package's layers point one way: no module imports a layer above its own, no sibling of the middle layer
imports another, and no import circle exists. Every import counts: module-level, inside functions, and under
`TYPE_CHECKING`.

    compat                                  private jax/TF APIs, one adapter per dependency
    ir, core, kernels, distributed          pure data (layout, contract, packing plan, records, errors), IR helpers
    frontend | passes | runtime             tracing and lowering | MLIR passes | PJRT, artifacts, embeddings
    compiler                                the one entry point that compiles a step
    optimizers, model_zoo                   the stateful Keras-shaped API and the definitions
    cli, opt, tf, __main__, shardopt        tools and the package's lazy front door
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "shardopt"

LAYERS: list[tuple[str, ...]] = [
    ("shardopt.compat",),
    ("shardopt.ir", "shardopt.core", "shardopt.kernels", "shardopt.distributed"),
    ("shardopt.frontend", "shardopt.passes", "shardopt.runtime"),
    ("shardopt.compiler",),
    ("shardopt.optimizers", "shardopt.model_zoo"),
    ("shardopt.cli", "shardopt.opt", "shardopt.tf", "shardopt.keras", "shardopt.tf_keras", "shardopt.__main__",
     "shardopt"),
]


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _component(module: str) -> tuple[int, str]:
    """(layer index, the layer entry `module` belongs to): the longest matching prefix wins."""
    best = None
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best


def _imports(module: str, path: pathlib.Path, mods: dict[str, pathlib.Path]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            # `from pkg import submodule` imports the submodule; the package counts only for names defined in it
            names = subs + ([base] if any(n not in mods for n in subs) else [])
        for n in names:
            while n and n not in mods:  # `from shardopt.core import layout` names the module shardopt.core.layout
                n = n.rsplit(".", 1)[0] if "." in n else ""
            if n and n != module and n != "shardopt":  # the root's __init__ is lazy: it imports nothing itself
                found.add(n)
    return found


MODS = _modules()
EDGES = {m: _imports(m, p, MODS) for m, p in MODS.items()}


def test_every_module_has_a_layer():
    for m in MODS:
        _component(m)


def _violations(module: str, targets: set[str]) -> list[str]:
    """What is wrong with `module` importing `targets`: upward imports and imports between siblings."""
    layer, entry = _component(module)
    if entry == "shardopt":  # the package root re-exports everything (lazily)
        return []
    out = []
    for target in sorted(targets):
        t_layer, t_entry = _component(target)
        siblings_may_import = layer in (1, len(LAYERS) - 1)  # data modules and tools may use each other
        if t_layer > layer:
            out.append(f"{module} (layer {layer}) imports {target} from layer {t_layer} above it")
        elif t_layer == layer and t_entry != entry and not siblings_may_import:
            out.append(f"{module} imports its sibling {target}: {entry} and {t_entry} share layer {layer} and "
                       "must not depend on each other")
    return out


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return circles


@pytest.mark.parametrize("module", sorted(MODS))
def test_no_upward_or_sideways_import(module):
    assert not _violations(module, EDGES[module])


def test_no_import_circles():
    assert not _circles(EDGES), f"import circles: {_circles(EDGES)}"


def test_the_checks_can_fail():
    """The same checks flag an upward import, a sibling import and a circle when one is made up."""
    assert _violations("shardopt.frontend.step", {"shardopt.compiler"})
    assert _violations("shardopt.passes.fuse_moments", {"shardopt.runtime.functional"})
    assert not _violations("shardopt.passes.fuse_moments", {"shardopt.core.contract"})
    edges = {**EDGES, "shardopt.core.contract": EDGES["shardopt.core.contract"] | {"shardopt.core.packing"},
             "shardopt.core.packing": EDGES["shardopt.core.packing"] | {"shardopt.core.contract"}}
    assert ["shardopt.core.contract", "shardopt.core.packing"] in _circles(edges)
