"""Pins the behaviour of every private jax API shardopt uses (all of them live in shardopt/compat/jax_private.py),
so a jax upgrade fails here, by name, instead of deep inside the pipeline or the artifact loader."""

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import func
from jaxlib.mlir.dialects import stablehlo as hlo

from shardopt.compat import jax_private as jp
from shardopt.runtime.executable import portable_target

MODULE = """
module @m {
  sdy.mesh @mesh = <["x"=8]>
  func.func public @main(%a: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"x"}]>}) -> tensor<16xf32> {
    %0 = func.call @twice(%a) : (tensor<16xf32>) -> tensor<16xf32>
    return %0 : tensor<16xf32>
  }
  func.func private @twice(%b: tensor<16xf32>) -> tensor<16xf32> {
    %0 = stablehlo.add %b, %b : tensor<16xf32>
    return %0 : tensor<16xf32>
  }
}
"""


def test_pinned_version():
    assert jp.PINNED_JAX == jax.__version__ == jaxlib.version.__version__


def test_make_ir_context_parses_func_stablehlo_and_sdy():
    ctx = jp.make_ir_context()
    with ctx:
        m = ir.Module.parse(MODULE)
        assert m.operation.verify()


def test_module_to_bytecode_round_trips():
    ctx = jp.make_ir_context()
    with ctx:
        m = ir.Module.parse(MODULE)
        again = ir.Module.parse(jp.module_to_bytecode(m))
        assert str(again) == str(m)


def test_serialize_portable_keeps_sdy_and_leaves_the_module_alone():
    ctx = jp.make_ir_context()
    with ctx:
        m = ir.Module.parse(MODULE)
        before = str(m)
        blob = jp.serialize_portable(m, portable_target())
        assert str(m) == before  # unlike stablehlo.serialize_portable_artifact, which rewrites to VHLO in place
        back = hlo.deserialize_portable_artifact(ctx, blob)
        assert "sdy.mesh @mesh" in str(back) and "stablehlo.add" in str(back)


def test_exported_with_module_swaps_module_and_shardings(mesh8):
    sh = NamedSharding(mesh8, P("x"))
    exp = jax.export.export(jax.jit(lambda a: a * 3.0, in_shardings=sh, out_shardings=sh))(
        jax.ShapeDtypeStruct((16,), np.float32))
    ctx = jp.make_ir_context()
    with ctx:
        m = ir.Module.parse(exp.mlir_module().replace("stablehlo.multiply", "stablehlo.add"))
        blob = jp.serialize_portable(m, portable_target())
    ins = (NamedSharding(mesh8.abstract_mesh, P("x")),)
    swapped = jp.exported_with_module(exp, blob, ins, ins)
    fields = jp.exported_fields(swapped)
    assert set(fields) == {"in_named_shardings", "out_named_shardings", "has_named_shardings"}
    assert fields["in_named_shardings"] == ins and fields["has_named_shardings"] is True
    assert swapped._get_vjp is None
    x = jax.device_put(jnp.arange(16, dtype=np.float32), sh)
    for e in (swapped, jax.export.deserialize(swapped.serialize())):
        np.testing.assert_array_equal(jax.jit(e.call)(x), np.arange(16, dtype=np.float32) + 3.0)


def test_hlo_sharding_from_proto(mesh8):
    sh = NamedSharding(mesh8, P("x"))
    compiled = jax.jit(lambda a: a * 2, in_shardings=sh).lower(jnp.zeros(16)).compile()
    proto = compiled.runtime_executable().get_parameter_shardings()[0]
    assert str(jp.hlo_sharding_from_proto(proto)) == "{devices=[8]<=[8]}"


def test_inline_func_call_clones_the_callee_body():
    ctx = jp.make_ir_context()
    with ctx, ir.Location.unknown():
        m = ir.Module.parse(MODULE)
        funcs = {ir.StringAttr(op.attributes["sym_name"]).value: op for op in m.body.operations
                 if op.operation.name == "func.func"}
        call = next(op for op in funcs["main"].regions[0].blocks[0].operations if op.operation.name == "func.call")
        with ir.InsertionPoint(call):
            results = jp.inline_func_call(funcs["twice"].operation, list(call.operands))
        call.results[0].replace_all_uses_with(results[0])
        call.operation.erase()
        assert isinstance(funcs["main"], func.FuncOp)
        assert m.operation.verify()
        body = str(funcs["main"])
        assert "func.call" not in body and "stablehlo.add" in body
