"""The pass registry: pass name -> where its class lives ("module:Class"), imported only when a pipeline uses it.

Like xDSL's `get_all_passes()`, nothing here imports a pass module, so running `cleanup` alone (or importing
`shardopt.passes.pipeline`) never loads fuse-moments' analysis code. `register()` adds a pass, either lazily by
"module:Class" or as a class (also usable as a decorator). Deprecated names are aliases that expand to a spec
with options and warn.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator, Mapping, Sequence

from shardopt.passes.base import ModulePass, PassError
from shardopt.passes.spec import parse_element, split_pipeline

_PASSES: dict[str, str | type[ModulePass]] = {
    "inline-calls": "shardopt.passes.inline_calls:InlineCalls",
    "lower-to-kernels": "shardopt.passes.lower_to_kernels:LowerToKernels",
    "propagate-layouts": "shardopt.passes.propagate_layouts:PropagateLayouts",
    "fuse-moments": "shardopt.passes.fuse_moments:FuseMoments",
    "fuse-clipping": "shardopt.passes.fuse_clipping:FuseClipping",
    "fixed-order-sums": "shardopt.passes.fixed_order_sums:FixedOrderSums",
    "cleanup": "shardopt.passes.cleanup:Cleanup",
}

# old name -> the spec it stands for; used with a DeprecationWarning
DEPRECATED_ALIASES: dict[str, str] = {
    "fuse-moments-unpacked": "fuse-moments{unpacked=true}",
}


def register(pass_or_name: type[ModulePass] | str, loader: str | None = None) -> type[ModulePass] | str:
    """Adds a pass: `register(PassClass)` (a decorator too) or `register("name", "package.module:Class")`, which
    imports the module only when a pipeline names the pass. Returns its argument."""
    if isinstance(pass_or_name, str):
        if loader is None or ":" not in loader:
            raise ValueError(f"register({pass_or_name!r}, ...): the loader must be 'package.module:Class'")
        _PASSES[pass_or_name] = loader
    else:
        if loader is not None:
            raise ValueError("register(PassClass) takes no loader")
        if not pass_or_name.NAME:
            raise ValueError(f"{pass_or_name.__name__} has no NAME")
        _PASSES[pass_or_name.NAME] = pass_or_name
    return pass_or_name


def pass_names() -> list[str]:
    """The registered pass names (deprecated aliases not included)."""
    return sorted(_PASSES)


def pass_class(name: str) -> type[ModulePass]:
    """The class registered as `name`, imported now if it was registered by "module:Class"."""
    entry = _PASSES.get(name)
    if entry is None:
        raise PassError(f"unknown pass {name!r}; known: {', '.join(pass_names())}")
    if isinstance(entry, str):
        module_name, _, cls_name = entry.partition(":")
        cls = getattr(importlib.import_module(module_name), cls_name)
        if getattr(cls, "NAME", None) != name:
            raise PassError(f"{entry} is registered as {name!r} but its NAME is {getattr(cls, 'NAME', None)!r}")
        _PASSES[name] = entry = cls
    return entry


class _Registry(Mapping[str, type[ModulePass]]):
    """A read-only mapping view of the registry: `name in REGISTRY` imports nothing, `REGISTRY[name]` does."""

    def __getitem__(self, name: str) -> type[ModulePass]:
        if name not in _PASSES:
            raise KeyError(name)
        return pass_class(name)

    def __contains__(self, name: object) -> bool:
        return name in _PASSES

    def __iter__(self) -> Iterator[str]:
        return iter(pass_names())

    def __len__(self) -> int:
        return len(_PASSES)

    def __repr__(self) -> str:
        return f"REGISTRY({', '.join(pass_names())})"


REGISTRY: Mapping[str, type[ModulePass]] = _Registry()


def make_pass(element: str) -> ModulePass:
    """The pass one pipeline element names: `"fuse-moments{max-group=4}"` -> `FuseMoments(max_group=4)`."""
    name, options = parse_element(element)
    if name in DEPRECATED_ALIASES:
        replacement = DEPRECATED_ALIASES[name]
        warnings.warn(f"pass name {name!r} is deprecated; use {replacement!r}", DeprecationWarning,
                      stacklevel=3)  # the caller of build_pipeline
        name, preset = parse_element(replacement)
        options = {**preset, **options}
    return pass_class(name).from_options(options)


def build_pipeline(pipeline: str | Sequence[str | ModulePass]) -> tuple[ModulePass, ...]:
    """Passes from a textual pipeline ("a,b{x=1}") or a sequence of elements and/or pass instances."""
    if isinstance(pipeline, str):
        elements: Sequence[str | ModulePass] = split_pipeline(pipeline)
    else:
        elements = pipeline
    out: list[ModulePass] = []
    for element in elements:
        if isinstance(element, ModulePass):
            out.append(element)
        elif isinstance(element, str):
            for e in split_pipeline(element):  # one element may itself be "a,b"
                out.append(make_pass(e))
        else:
            raise PassError(f"pipeline element {element!r} is neither a pass spec nor a pass")
    return tuple(out)
