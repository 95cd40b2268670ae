"""The Keras-shaped optimizers, and `get` / `serialize` / `deserialize` as `keras.optimizers` has them.

Definitions are imported lazily (by `shardopt`'s own lazy exports), so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE = "keras.optimizers"
# every definition: class name -> its module (one module each)
DEFINITIONS = {
    "Adadelta": "adadelta", "Adafactor": "adafactor", "Adagrad": "adagrad", "Adam": "adam", "AdamW": "adamw",
    "Adamax": "adamax", "Ftrl": "ftrl", "Lion": "lion", "Nadam": "nadam", "RMSprop": "rmsprop", "SGD": "sgd",
}


def _classes() -> dict[str, type]:
    """Lower-cased class name -> class, for every definition."""
    return {name.lower(): getattr(importlib.import_module(f"shardopt.optimizers.{module}"), name)
            for name, module in DEFINITIONS.items()}


def optimizer_class(name: str, custom_objects: dict[str, Any] | None = None) -> type:
    """The optimizer class called `name` (case-insensitive; "Custom>Adam" and dotted paths accepted)."""
    if custom_objects and name in custom_objects:
        return custom_objects[name]
    short = name.rsplit(">", 1)[-1].rsplit(".", 1)[-1]
    known = _classes()
    if short.lower() not in known:
        raise ValueError(f"Could not interpret optimizer identifier: {name!r}; shardopt has "
                         f"{sorted(c.__name__ for c in known.values())}")
    return known[short.lower()]


def serialize(optimizer: Any) -> dict[str, Any]:
    """`keras.optimizers.serialize`: module, class name, `get_config()` and registered name."""
    from shardopt.optimizers.base import Optimizer

    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"Expected a shardopt optimizer, got {type(optimizer).__name__}")
    builtin = _classes().get(type(optimizer).__name__.lower()) is type(optimizer)
    return {"module": _MODULE if builtin else None, "class_name": type(optimizer).__name__,
            "config": optimizer.get_config(), "registered_name": None if builtin else type(optimizer).__name__}


def deserialize(config: dict[str, Any], custom_objects: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Rebuilds an optimizer from `serialize`'s dict (also tf-keras's and Keras 3's)."""
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"A serialized optimizer must be a dict with 'class_name' and 'config' keys: {config!r}")
    cls = optimizer_class(config.get("registered_name") or config["class_name"], custom_objects)
    return cls.from_config({**config.get("config", {}), **kwargs}, custom_objects=custom_objects)


def get(identifier: Any, **kwargs: Any) -> Any:
    """An optimizer from an instance (returned as is), a class name ("adam", "SGD") or a serialized dict."""
    from shardopt.optimizers.base import Optimizer

    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, dict):
        return deserialize(identifier, **kwargs)
    if isinstance(identifier, str):
        return optimizer_class(identifier)(**kwargs)
    raise ValueError(f"Could not interpret optimizer identifier: {identifier!r}")


__all__ = ["deserialize", "get", "optimizer_class", "serialize"]
