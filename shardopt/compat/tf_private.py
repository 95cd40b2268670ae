"""The one place shardopt touches TensorFlow's private `tensorflow.compiler.tf2xla` path (pinned to TF 2.21.0).

`XlaCallModule` (the op jax2tf uses to run a serialized StableHLO module) is registered in TF 2.21 but not
exported under `tf.raw_ops`; `tensorflow.compiler.tf2xla.python.xla.call_module` is how jax2tf reaches it.
tests/test_compat_tf.py pins the path and the version window so an upgrade fails there, not inside a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PINNED_TF = "2.21.0"


def _tfxla() -> Any:
    from tensorflow.compiler.tf2xla.python import xla as tfxla

    return tfxla


def call_module_maximum_supported_version() -> int:
    """The newest jax.export calling convention this TensorFlow's XlaCallModule runs."""
    return int(_tfxla().call_module_maximum_supported_version())


def call_module(args: Sequence[Any], exported: Any) -> list[Any]:
    """Runs `exported` (a `jax.export.Exported`) on TF tensors/variables with XlaCallModule.

    The arguments are the ones jax2tf sends for a module without tokens, effects or symbolic shapes. The
    module is compiled by TF's XLA on TF's device: an artifact sharded over N jax devices runs there unsharded.
    """
    import tensorflow as tf

    version = int(exported.calling_convention_version)
    if version > call_module_maximum_supported_version():
        raise RuntimeError(f"the step uses jax.export calling convention {version}, this TensorFlow "
                           f"({tf.__version__}) runs at most {call_module_maximum_supported_version()}")
    outs = _tfxla().call_module(
        list(args),
        version=version,
        module=exported.mlir_module_serialized,
        Tout=[tf.as_dtype(a.dtype) for a in exported.out_avals],
        Sout=[tuple(a.shape) for a in exported.out_avals],
        platforms=[p.upper() for p in exported.platforms],
        function_list=[],
        has_token_input_output=False,
        disabled_checks=[str(c) for c in exported.disabled_safety_checks],
        use_shardy_partitioner=True,
    )
    return list(outs)


__all__ = ["PINNED_TF", "call_module", "call_module_maximum_supported_version"]
