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


__all__ = ["path_name"]
