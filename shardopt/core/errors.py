"""The errors every layer raises, defined once at the bottom so that no layer imports another for its errors."""

from __future__ import annotations


class PassError(ValueError):
    """A pass met IR or layouts it cannot accept, or a pipeline names a pass or option that does not exist; the
    message names the pass, option, tensor, dimension or axis."""


class StepInputError(ValueError):
    """An input does not match the compiled step; nothing was donated or changed."""


class ArtifactError(ValueError):
    """A `.shardopt` file cannot be used: not an artifact, truncated, corrupted, tampered with, from an unknown
    format version, or made for another mesh, device count or platform. The message says what does not match."""


class NotInThisProcessError(RuntimeError):
    """A value is split across the processes of a multi-process job and this process holds only part of it; the
    message says how to gather it (a collective every process must call) or read the local part."""


__all__ = ["ArtifactError", "NotInThisProcessError", "PassError", "StepInputError"]
