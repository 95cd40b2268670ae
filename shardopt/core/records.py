"""What a compile produced, as plain records: the IR and statistics after every pipeline stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stage:
    """The IR after one pass (or the frontend's output), with that pass's statistics."""

    name: str  # the pass's NAME (what `inspect --stage` takes), or "frontend"
    text: str
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    spec: str = ""  # the pass as the pipeline spelled it, with non-default options; `name` when it has none

    def __post_init__(self) -> None:
        if not self.spec:
            self.spec = self.name


@dataclass
class PipelineResult:
    """Every stage of one pipeline run, the frontend's module first."""

    stages: list[Stage]

    @property
    def final_text(self) -> str:
        return self.stages[-1].text

    def stage(self, name: str) -> Stage:
        """The first stage whose pass name (`fuse-moments`) or spec (`fuse-moments{unpacked=true}`) is `name`."""
        for s in self.stages:
            if name in (s.name, s.spec):
                return s
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")


__all__ = ["PipelineResult", "Stage"]
