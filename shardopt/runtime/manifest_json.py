"""What an artifact's manifest stores as plain JSON: config values and the params' pytree structure (never
pickled: a structure of dicts with string keys, lists, tuples and None, a leaf written as its index)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from shardopt.core.errors import ArtifactError


def jsonable(value: Any) -> Any:
    """`value` with numpy scalars/arrays, tuples and other odd leaves turned into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)) or isinstance(value, jax.Array):
        return jsonable(np.asarray(value).tolist())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ----- the params' pytree structure, as JSON -----------------------------------------------------------------
def tree_to_json(treedef: Any) -> Any:
    """Encodes a pytree structure of dicts (string keys), lists, tuples and None: a leaf is its index."""
    skeleton = jax.tree_util.tree_unflatten(treedef, list(range(treedef.num_leaves)))

    def enc(node: Any) -> Any:
        if type(node) is int:
            return node
        if node is None:
            return {"none": True}
        if type(node) is dict:
            bad = [k for k in node if not isinstance(k, str)]
            if bad:
                raise ArtifactError(f"cannot store the params structure: dict keys must be strings, got {bad!r}")
            return {"dict": {k: enc(v) for k, v in node.items()}}
        if type(node) in (list, tuple):
            return {type(node).__name__: [enc(v) for v in node]}
        raise ArtifactError(f"cannot store the params structure: a {type(node).__name__} node; artifacts keep "
                            "dicts with string keys, lists, tuples and None")

    doc = enc(skeleton)
    if tree_from_json(doc, treedef.num_leaves) != treedef:
        raise ArtifactError(f"cannot store the params structure {treedef} as JSON")
    return doc


def tree_from_json(doc: Any, num_leaves: int) -> Any:
    """The pytree structure `tree_to_json` wrote; its leaves must be 0..num_leaves-1 in flattening order."""
    def dec(node: Any) -> Any:
        if type(node) is int:
            return node
        if isinstance(node, dict) and len(node) == 1:
            (kind, body), = node.items()
            if kind == "none":
                return None
            if kind == "dict" and isinstance(body, dict):
                return {k: dec(v) for k, v in body.items()}
            if kind in ("list", "tuple") and isinstance(body, list):
                items = [dec(v) for v in body]
                return items if kind == "list" else tuple(items)
        raise ArtifactError(f"malformed params structure in the manifest at {node!r}")

    leaves, treedef = jax.tree_util.tree_flatten(dec(doc))
    if leaves != list(range(num_leaves)):
        raise ArtifactError(f"malformed params structure in the manifest: leaves {leaves}, expected "
                            f"0..{num_leaves - 1}")
    return treedef


__all__ = ["jsonable", "tree_from_json", "tree_to_json"]
