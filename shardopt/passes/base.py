"""What every shardopt pass is: a frozen dataclass with a `NAME`, its options as fields, and `run(module) ->
statistics`.

As in MLIR and xDSL (`ModulePass`), a pass is configured by its options, not by a subclass per option:
`fuse-moments{unpacked=true max-group=4}` is `FuseMoments(unpacked=True, max_group=4)`. An option's textual name
is its field name with dashes for underscores (the field's own spelling is accepted too); its type (bool, int,
float or str) is the field's annotation. Bools read true/false (also 1/0, on/off, yes/no), ints also 0x10 and 1_000.
`pipeline.py` runs each pass inside MLIR's `PassManager` as a Python pass.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from jaxlib.mlir import ir

from shardopt.core.errors import PassError  # defined in the data layer; re-exported for the passes

_TRUE = ("true", "1", "on", "yes")
_FALSE = ("false", "0", "off", "no")
_SCALARS = (bool, int, float, str)


def option(default: Any, help: str) -> Any:
    """A pass option: a dataclass field with a default and a one-line description (shown by `opt --list-passes`)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class OptionInfo:
    """One option of a pass as the textual pipeline spells it."""

    name: str  # textual: "max-group"
    field: str  # Python: "max_group"
    type: type
    default: Any
    help: str


def format_value(value: Any) -> str:
    """`value` as the textual pipeline writes it (bools as true/false, strings quoted when needed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if isinstance(value, str) and (not text or any(c in text for c in ' \t,{}="')):
        return '"' + text.replace('"', '\\"') + '"'
    return text


@dataclass(frozen=True)
class ModulePass:
    """Base of every pass: subclasses set `NAME`, declare options as fields and implement `run`."""

    NAME: ClassVar[str] = ""

    def run(self, module: ir.Module) -> dict[str, Any]:
        """Rewrites `module` in place and returns statistics (counts, group sizes)."""
        raise NotImplementedError

    @classmethod
    def options(cls) -> tuple[OptionInfo, ...]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if kind not in _SCALARS:
                raise TypeError(f"{cls.__name__}.{f.name}: pass options are bool, int, float or str, not {kind}")
            out.append(OptionInfo(f.name.replace("_", "-"), f.name, kind, f.default, f.metadata.get("help", "")))
        return tuple(out)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> ModulePass:
        """The pass configured by textual `options` (`{"max-group": "4"}`); PassError naming the pass and the
        option for an unknown option or a value of the wrong type."""
        known = {o.name: o for o in cls.options()}
        kwargs: dict[str, Any] = {}
        for key, text in options.items():
            opt = known.get(key) or known.get(key.replace("_", "-"))
            if opt is None:
                choices = ", ".join(sorted(known)) or "none"
                raise PassError(f"pass {cls.NAME!r} has no option {key!r} (its options: {choices})")
            kwargs[opt.field] = _convert(cls.NAME, opt, text)
        return cls(**kwargs)

    def spec(self) -> str:
        """The textual form of this pass: its name, then the options that differ from their defaults."""
        changed = [f"{o.name}={format_value(getattr(self, o.field))}" for o in self.options()
                   if getattr(self, o.field) != o.default]
        return self.NAME + ("{" + " ".join(changed) + "}" if changed else "")

    def check(self, condition: bool, option_name: str, requirement: str) -> None:
        """For `__post_init__`: PassError naming the pass and the option unless `condition` holds."""
        if not condition:
            value = getattr(self, option_name.replace("-", "_"))
            raise PassError(f"pass {self.NAME!r}: option {option_name.replace('_', '-')!r} must be {requirement}, "
                            f"got {format_value(value)}")


def _convert(pass_name: str, opt: OptionInfo, text: str) -> Any:
    def bad(expected: str) -> PassError:
        return PassError(f"pass {pass_name!r}: option {opt.name!r} takes {expected}, got {text!r}")

    if opt.type is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise bad("true or false")
    if opt.type is int:
        for base in (10, 0):  # 10 first so that "08" is 8; then 0x10, 0b101, 1_000
            try:
                return int(text, base)
            except ValueError:
                pass
        raise bad("an integer")
    if opt.type is float:
        try:
            return float(text)
        except ValueError:
            raise bad("a number") from None
    return text


Pass = ModulePass  # the name this base had when it was a Protocol
