"""Names of pytree leaves: the key path of a leaf as the slash-separated name the step contract uses."""

from __future__ import annotations

from typing import Any


def path_name(path: tuple[Any, ...]) -> str:
    """A pytree key path as a slash-separated name: {'dense': {'kernel': x}} -> 'dense/kernel'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts) if parts else "param"


def same_paths(tree: Any, treedef: Any) -> bool:
    """Whether `tree` has the leaf paths (by name) of `treedef`, whatever its node types."""
    import jax

    got = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    want = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        jax.tree_util.tree_unflatten(treedef, [0] * treedef.num_leaves))[0]]
    return got == want


__all__ = ["path_name", "same_paths"]
