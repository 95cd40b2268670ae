// RUN: python -m shardopt.opt -p fuse-moments %s --split-input-file | filecheck %s --check-prefixes=CHECK,FUSED,DEFAULT
// RUN: python -m shardopt.opt -p 'fuse-moments{unpacked=true}' %s --split-input-file | filecheck %s --check-prefixes=CHECK,FUSED,UNPACKED
// RUN: python -m shardopt.opt -p 'fuse-moments{unpacked=true max-group=1}' %s --split-input-file | filecheck %s --check-prefixes=CHECK,ONE

// `fuse-moments`, each chunk between separator lines on its own (tests/test_filecheck.py runs the RUN lines;
// tests/test_pass_fuse_moments.py runs the same chunks in-process and checks the statistics and, with the
// reference interpreter, that the results are bitwise unchanged). Each variable's update is a small momentum
// step: m' = m + (g * scale - m) * 0.1, var' = var - lr * m'.
// Prefixes: CHECK (all runs), FUSED (default and unpacked=true: packed state is fused either way), DEFAULT (only
// packed state is fused; variables returned one buffer each are left alone), UNPACKED (those are fused too),
// ONE (max-group=1: groups of one variable, so nothing is fused).

// Packed state as every step lowers it (core/packing.py, core/contract.py): the variables a (f32[8]) and b
// (f32[2,3]) are arguments of their own (the user's arrays); their m slot and that of c (f32[6], no gradient this
// step) live in one flat buffer f32[20], which the IR marks with `shardopt.pack` and names its members in order.
// Each member's m is cut out (slice, reshape), updated, and packed again (concatenate). After the pass one chain
// updates a's and b's m on the packed buffer itself: the cuts and re-packs fold away, only the gradients are
// concatenated, c's piece is copied through as one slice, and each variable keeps its own small update, which
// now reads its slice of the packed m.
// CHECK-LABEL: module @packed_state
// ONE-NOT:       tensor<14xf32>
// FUSED:         %[[CM:.*]] = stablehlo.slice %arg4 [14:20] : (tensor<20xf32>) -> tensor<6xf32>
// FUSED:         %[[M:.*]] = stablehlo.slice %arg4 [0:14] : (tensor<20xf32>) -> tensor<14xf32>
// FUSED:         %[[MC:.*]] = sdy.sharding_constraint %[[M]] <@mesh, [{}]> : tensor<14xf32>
// FUSED:         %[[GB:.*]] = stablehlo.reshape %arg3 : (tensor<2x3xf32>) -> tensor<6xf32>
// FUSED:         %[[G:.*]] = stablehlo.concatenate %arg2, %[[GB]], dim = 0 : (tensor<8xf32>, tensor<6xf32>) -> tensor<14xf32>
// FUSED:         %[[NEWM:.*]] = stablehlo.add %[[MC]], %{{.*}} : tensor<14xf32>
// DEFAULT:       %[[OUTM:.*]] = sdy.sharding_constraint %[[NEWM]] <@mesh, [{}]> : tensor<14xf32>
// DEFAULT:       %[[MA:.*]] = stablehlo.slice %[[OUTM]] [0:8] : (tensor<14xf32>) -> tensor<8xf32>
// DEFAULT:       %[[MB0:.*]] = stablehlo.slice %[[OUTM]] [8:14] : (tensor<14xf32>) -> tensor<6xf32>
// DEFAULT:       %[[MB:.*]] = stablehlo.reshape %[[MB0]] : (tensor<6xf32>) -> tensor<2x3xf32>
// DEFAULT:       %[[PM:.*]] = stablehlo.concatenate %[[OUTM]], %[[CM]], dim = 0 : (tensor<14xf32>, tensor<6xf32>) -> tensor<20xf32>
// DEFAULT:       %[[LA:.*]] = stablehlo.multiply %{{.*}}, %[[MA]] : tensor<8xf32>
// DEFAULT:       %[[NA:.*]] = stablehlo.subtract %arg0, %[[LA]] : tensor<8xf32>
// DEFAULT:       %[[LB:.*]] = stablehlo.multiply %{{.*}}, %[[MB]] : tensor<2x3xf32>
// DEFAULT:       %[[NB:.*]] = stablehlo.subtract %arg1, %[[LB]] : tensor<2x3xf32>
// DEFAULT:       return %[[NA]], %[[NB]], %[[PM]] :
// UNPACKED:      %[[NEWV:.*]] = stablehlo.subtract %{{.*}}, %{{.*}} : tensor<14xf32>
// UNPACKED:      return %{{.*}}, %{{.*}}, %{{.*}} : tensor<8xf32>, tensor<2x3xf32>, tensor<20xf32>
module @packed_state {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(
      %arg0: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "a", shardopt.role = "variable"},
      %arg1: tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "b", shardopt.role = "variable"},
      %arg2: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "grad/a", shardopt.owner = "a", shardopt.role = "gradient"},
      %arg3: tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "grad/b", shardopt.owner = "b", shardopt.role = "gradient"},
      %arg4: tensor<20xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.members = ["a", "b", "c"], shardopt.name = "m/@pack0/float32", shardopt.pack = "@pack0/float32", shardopt.role = "slot", shardopt.slot = "m"},
      %arg5: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "scale", shardopt.role = "hyperparameter"},
      %arg6: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "learning_rate", shardopt.role = "hyperparameter"})
      -> (tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "a", shardopt.role = "variable"},
          tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "b", shardopt.role = "variable"},
          tensor<20xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.members = ["a", "b", "c"], shardopt.name = "m/@pack0/float32", shardopt.pack = "@pack0/float32", shardopt.role = "slot", shardopt.slot = "m"}) {
    %c01 = stablehlo.constant dense<1.000000e-01> : tensor<f32>
    %ma = stablehlo.slice %arg4 [0:8] : (tensor<20xf32>) -> tensor<8xf32>
    %mb0 = stablehlo.slice %arg4 [8:14] : (tensor<20xf32>) -> tensor<6xf32>
    %mb = stablehlo.reshape %mb0 : (tensor<6xf32>) -> tensor<2x3xf32>
    %mc = stablehlo.slice %arg4 [14:20] : (tensor<20xf32>) -> tensor<6xf32>
    %a0 = stablehlo.broadcast_in_dim %arg5, dims = [] : (tensor<f32>) -> tensor<8xf32>
    %a1 = stablehlo.multiply %arg2, %a0 : tensor<8xf32>
    %a2 = stablehlo.subtract %a1, %ma : tensor<8xf32>
    %a3 = stablehlo.broadcast_in_dim %c01, dims = [] : (tensor<f32>) -> tensor<8xf32>
    %a4 = stablehlo.multiply %a2, %a3 : tensor<8xf32>
    %a5 = stablehlo.add %ma, %a4 : tensor<8xf32>
    %a6 = stablehlo.broadcast_in_dim %arg6, dims = [] : (tensor<f32>) -> tensor<8xf32>
    %a7 = stablehlo.multiply %a6, %a5 : tensor<8xf32>
    %a8 = stablehlo.subtract %arg0, %a7 : tensor<8xf32>
    %b0 = stablehlo.broadcast_in_dim %arg5, dims = [] : (tensor<f32>) -> tensor<2x3xf32>
    %b1 = stablehlo.multiply %arg3, %b0 : tensor<2x3xf32>
    %b2 = stablehlo.subtract %b1, %mb : tensor<2x3xf32>
    %b3 = stablehlo.broadcast_in_dim %c01, dims = [] : (tensor<f32>) -> tensor<2x3xf32>
    %b4 = stablehlo.multiply %b2, %b3 : tensor<2x3xf32>
    %b5 = stablehlo.add %mb, %b4 : tensor<2x3xf32>
    %b6 = stablehlo.broadcast_in_dim %arg6, dims = [] : (tensor<f32>) -> tensor<2x3xf32>
    %b7 = stablehlo.multiply %b6, %b5 : tensor<2x3xf32>
    %b8 = stablehlo.subtract %arg1, %b7 : tensor<2x3xf32>
    %b5f = stablehlo.reshape %b5 : (tensor<2x3xf32>) -> tensor<6xf32>
    %pm = stablehlo.concatenate %a5, %b5f, %mc, dim = 0 : (tensor<8xf32>, tensor<6xf32>, tensor<6xf32>) -> tensor<20xf32>
    return %a8, %b8, %pm : tensor<8xf32>, tensor<2x3xf32>, tensor<20xf32>
  }
}

// -----

// Two replicated variables (f32[8], f32[2,3]) pack flat into f32[14]; two variables sharded on dim 0 over
// "model" (f32[8,3], f32[4,5]) pack as [4, n/4] rows concatenated on dim 1, pinned to [{"model"}, {}]. One chain
// per group; each result is sliced (and reshaped) back and returned in place of the per-variable one.
// CHECK-LABEL: module @flat_and_rows
// DEFAULT-NOT:   stablehlo.concatenate
// ONE-NOT:       stablehlo.concatenate
// UNPACKED:         %[[AM:.*]] = stablehlo.reshape %arg7 : (tensor<2x3xf32>) -> tensor<6xf32>
// UNPACKED:         %[[PM:.*]] = stablehlo.concatenate %arg6, %[[AM]], dim = 0 : (tensor<8xf32>, tensor<6xf32>) -> tensor<14xf32>
// UNPACKED:         %[[PMC:.*]] = sdy.sharding_constraint %[[PM]] <@mesh, [{}]> : tensor<14xf32>
// UNPACKED:         %[[PG:.*]] = stablehlo.concatenate %arg4, %{{.*}}, dim = 0 : (tensor<8xf32>, tensor<6xf32>) -> tensor<14xf32>
// UNPACKED:         %[[PGC:.*]] = sdy.sharding_constraint %[[PG]] <@mesh, [{}]> : tensor<14xf32>
// UNPACKED:         %[[S:.*]] = stablehlo.broadcast_in_dim %arg12, dims = [] : (tensor<f32>) -> tensor<14xf32>
// UNPACKED:         %[[CG:.*]] = stablehlo.multiply %[[PGC]], %[[S]] : tensor<14xf32>
// UNPACKED:         stablehlo.subtract %[[CG]], %[[PMC]] : tensor<14xf32>
// UNPACKED:         stablehlo.broadcast_in_dim %{{.*}}, dims = [] : (tensor<f32>) -> tensor<14xf32>
// UNPACKED:         %[[NEWM:.*]] = stablehlo.add %[[PMC]], %{{.*}} : tensor<14xf32>
// UNPACKED:         %[[NEWV:.*]] = stablehlo.subtract %{{.*}}, %{{.*}} : tensor<14xf32>
// UNPACKED:         %[[OUTM:.*]] = sdy.sharding_constraint %[[NEWM]] <@mesh, [{}]> : tensor<14xf32>
// UNPACKED:         %[[M0:.*]] = stablehlo.slice %[[OUTM]] [0:8]
// UNPACKED:         %[[M1S:.*]] = stablehlo.slice %[[OUTM]] [8:14]
// UNPACKED:         %[[M1:.*]] = stablehlo.reshape %[[M1S]] : (tensor<6xf32>) -> tensor<2x3xf32>
// UNPACKED:         %[[OUTV:.*]] = sdy.sharding_constraint %[[NEWV]] <@mesh, [{}]> : tensor<14xf32>
// UNPACKED:         %[[V0:.*]] = stablehlo.slice %[[OUTV]] [0:8]
// UNPACKED:         %[[V1S:.*]] = stablehlo.slice %[[OUTV]] [8:14]
// UNPACKED:         %[[V1:.*]] = stablehlo.reshape %[[V1S]] : (tensor<6xf32>) -> tensor<2x3xf32>
// UNPACKED:         %[[RM:.*]] = stablehlo.reshape %arg8 : (tensor<8x3xf32>) -> tensor<4x6xf32>
// UNPACKED:         stablehlo.concatenate %[[RM]], %arg9, dim = 1 : (tensor<4x6xf32>, tensor<4x5xf32>) -> tensor<4x11xf32>
// UNPACKED:         sdy.sharding_constraint %{{.*}} <@mesh, [{"model"}, {}]> : tensor<4x11xf32>
// UNPACKED:         stablehlo.slice %{{.*}} [0:4, 0:6] : (tensor<4x11xf32>) -> tensor<4x6xf32>
// UNPACKED:         stablehlo.reshape %{{.*}} : (tensor<4x6xf32>) -> tensor<8x3xf32>
// UNPACKED:         stablehlo.slice %{{.*}} [0:4, 6:11] : (tensor<4x11xf32>) -> tensor<4x5xf32>
// UNPACKED:         return %[[V0]], %[[V1]], %{{.*}}, %{{.*}}, %[[M0]], %[[M1]], %{{.*}}, %{{.*}} :
module @flat_and_rows {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(
      %arg0: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "a", shardopt.role = "variable"},
      %arg1: tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "b", shardopt.role = "variable"},
      %arg2: tensor<8x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "r", shardopt.role = "variable"},
      %arg3: tensor<4x5xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "s", shardopt.role = "variable"},
      %arg4: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "grad/a", shardopt.owner = "a", shardopt.role = "gradient"},
      %arg5: tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "grad/b", shardopt.owner = "b", shardopt.role = "gradient"},
      %arg6: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "m/a", shardopt.owner = "a", shardopt.role = "slot", shardopt.slot = "m"},
      %arg7: tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "m/b", shardopt.owner = "b", shardopt.role = "slot", shardopt.slot = "m"},
      %arg8: tensor<8x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "m/r", shardopt.owner = "r", shardopt.role = "slot", shardopt.slot = "m"},
      %arg9: tensor<4x5xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "m/s", shardopt.owner = "s", shardopt.role = "slot", shardopt.slot = "m"},
      %arg10: tensor<8x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "grad/r", shardopt.owner = "r", shardopt.role = "gradient"},
      %arg11: tensor<4x5xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "grad/s", shardopt.owner = "s", shardopt.role = "gradient"},
      %arg12: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "scale", shardopt.role = "hyperparameter"},
      %arg13: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "learning_rate", shardopt.role = "hyperparameter"})
      -> (tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "a", shardopt.role = "variable"},
          tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "b", shardopt.role = "variable"},
          tensor<8x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "r", shardopt.role = "variable"},
          tensor<4x5xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "s", shardopt.role = "variable"},
          tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "m/a", shardopt.owner = "a", shardopt.role = "slot", shardopt.slot = "m"},
          tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "m/b", shardopt.owner = "b", shardopt.role = "slot", shardopt.slot = "m"},
          tensor<8x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "m/r", shardopt.owner = "r", shardopt.role = "slot", shardopt.slot = "m"},
          tensor<4x5xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "m/s", shardopt.owner = "s", shardopt.role = "slot", shardopt.slot = "m"}) {
    %c01 = stablehlo.constant dense<1.000000e-01> : tensor<f32>
    %a0 = stablehlo.broadcast_in_dim %arg12, dims = [] : (tensor<f32>) -> tensor<8xf32>
    %a1 = stablehlo.multiply %arg4, %a0 : tensor<8xf32>
    %a2 = stablehlo.subtract %a1, %arg6 : tensor<8xf32>
    %a3 = stablehlo.broadcast_in_dim %c01, dims = [] : (tensor<f32>) -> tensor<8xf32>
    %a4 = stablehlo.multiply %a2, %a3 : tensor<8xf32>
    %a5 = stablehlo.add %arg6, %a4 : tensor<8xf32>
    %a6 = stablehlo.broadcast_in_dim %arg13, dims = [] : (tensor<f32>) -> tensor<8xf32>
    %a7 = stablehlo.multiply %a6, %a5 : tensor<8xf32>
    %a8 = stablehlo.subtract %arg0, %a7 : tensor<8xf32>
    %bg = sdy.sharding_constraint %arg5 <@mesh, [{}, {}]> : tensor<2x3xf32>
    %b0 = stablehlo.broadcast_in_dim %arg12, dims = [] : (tensor<f32>) -> tensor<2x3xf32>
    %b1 = stablehlo.multiply %bg, %b0 : tensor<2x3xf32>
    %b2 = stablehlo.subtract %b1, %arg7 : tensor<2x3xf32>
    %b3 = stablehlo.broadcast_in_dim %c01, dims = [] : (tensor<f32>) -> tensor<2x3xf32>
    %b4 = stablehlo.multiply %b2, %b3 : tensor<2x3xf32>
    %b5 = stablehlo.add %arg7, %b4 : tensor<2x3xf32>
    %b6 = stablehlo.broadcast_in_dim %arg13, dims = [] : (tensor<f32>) -> tensor<2x3xf32>
    %b7 = stablehlo.multiply %b6, %b5 : tensor<2x3xf32>
    %b8 = stablehlo.subtract %arg1, %b7 : tensor<2x3xf32>
    %r0 = stablehlo.broadcast_in_dim %arg12, dims = [] : (tensor<f32>) -> tensor<8x3xf32>
    %r1 = stablehlo.multiply %arg10, %r0 : tensor<8x3xf32>
    %r2 = stablehlo.subtract %r1, %arg8 : tensor<8x3xf32>
    %r3 = stablehlo.broadcast_in_dim %c01, dims = [] : (tensor<f32>) -> tensor<8x3xf32>
    %r4 = stablehlo.multiply %r2, %r3 : tensor<8x3xf32>
    %r5 = stablehlo.add %arg8, %r4 : tensor<8x3xf32>
    %r6 = stablehlo.broadcast_in_dim %arg13, dims = [] : (tensor<f32>) -> tensor<8x3xf32>
    %r7 = stablehlo.multiply %r6, %r5 : tensor<8x3xf32>
    %r8 = stablehlo.subtract %arg2, %r7 : tensor<8x3xf32>
    %s0 = stablehlo.broadcast_in_dim %arg12, dims = [] : (tensor<f32>) -> tensor<4x5xf32>
    %s1 = stablehlo.multiply %arg11, %s0 : tensor<4x5xf32>
    %s2 = stablehlo.subtract %s1, %arg9 : tensor<4x5xf32>
    %s3 = stablehlo.broadcast_in_dim %c01, dims = [] : (tensor<f32>) -> tensor<4x5xf32>
    %s4 = stablehlo.multiply %s2, %s3 : tensor<4x5xf32>
    %s5 = stablehlo.add %arg9, %s4 : tensor<4x5xf32>
    %s6 = stablehlo.broadcast_in_dim %arg13, dims = [] : (tensor<f32>) -> tensor<4x5xf32>
    %s7 = stablehlo.multiply %s6, %s5 : tensor<4x5xf32>
    %s8 = stablehlo.subtract %arg3, %s7 : tensor<4x5xf32>
    return %a8, %b8, %r8, %s8, %a5, %b5, %r5, %s5 : tensor<8xf32>, tensor<2x3xf32>, tensor<8x3xf32>, tensor<4x5xf32>, tensor<8xf32>, tensor<2x3xf32>, tensor<8x3xf32>, tensor<4x5xf32>
  }
}

// -----

// Column-sharded variables ([{}, {"model"}], f32[4,8] and f32[6,8]) concatenate along their unsharded dim 0;
// per-variable scalars (a clipnorm-style factor each) become broadcast pieces concatenated like tensors. Left
// unfused: [{"batch"}, {"model"}] has no unsharded dimension, and a chain with a different constant does not
// match the others.
// CHECK-LABEL: module @columns_and_leftovers
// DEFAULT-NOT:   stablehlo.concatenate
// ONE-NOT:       stablehlo.concatenate
// UNPACKED:         %[[PM:.*]] = stablehlo.concatenate %arg4, %arg5, dim = 0 : (tensor<4x8xf32>, tensor<6x8xf32>) -> tensor<10x8xf32>
// UNPACKED:         sdy.sharding_constraint %[[PM]] <@mesh, [{}, {"model"}]> : tensor<10x8xf32>
// UNPACKED:         %[[F0:.*]] = stablehlo.broadcast_in_dim %arg10, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
// UNPACKED:         %[[F1:.*]] = stablehlo.broadcast_in_dim %arg11, dims = [] : (tensor<f32>) -> tensor<6x8xf32>
// UNPACKED:         stablehlo.concatenate %[[F0]], %[[F1]], dim = 0 : (tensor<4x8xf32>, tensor<6x8xf32>) -> tensor<10x8xf32>
// UNPACKED:         stablehlo.slice %{{.*}} [0:4, 0:8] : (tensor<10x8xf32>) -> tensor<4x8xf32>
// UNPACKED:         stablehlo.slice %{{.*}} [4:10, 0:8] : (tensor<10x8xf32>) -> tensor<6x8xf32>
// UNPACKED-NOT:     stablehlo.concatenate
// UNPACKED:         return
module @columns_and_leftovers {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(
      %arg0: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "c", shardopt.role = "variable"},
      %arg1: tensor<6x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "d", shardopt.role = "variable"},
      %arg2: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "grad/c", shardopt.owner = "c", shardopt.role = "gradient"},
      %arg3: tensor<6x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "grad/d", shardopt.owner = "d", shardopt.role = "gradient"},
      %arg4: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "m/c", shardopt.owner = "c", shardopt.role = "slot", shardopt.slot = "m"},
      %arg5: tensor<6x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "m/d", shardopt.owner = "d", shardopt.role = "slot", shardopt.slot = "m"},
      %arg6: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>, shardopt.name = "e", shardopt.role = "variable"},
      %arg7: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>, shardopt.name = "f", shardopt.role = "variable"},
      %arg8: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "h", shardopt.role = "variable"},
      %arg9: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "k", shardopt.role = "variable"},
      %arg10: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "factor/c", shardopt.role = "hyperparameter"},
      %arg11: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "factor/d", shardopt.role = "hyperparameter"})
      -> (tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "c", shardopt.role = "variable"},
          tensor<6x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "d", shardopt.role = "variable"},
          tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "m/c", shardopt.owner = "c", shardopt.role = "slot", shardopt.slot = "m"},
          tensor<6x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "m/d", shardopt.owner = "d", shardopt.role = "slot", shardopt.slot = "m"},
          tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>, shardopt.name = "e", shardopt.role = "variable"},
          tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>, shardopt.name = "f", shardopt.role = "variable"},
          tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "h", shardopt.role = "variable"},
          tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "k", shardopt.role = "variable"}) {
    %c0 = stablehlo.broadcast_in_dim %arg10, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %c1 = stablehlo.multiply %arg2, %c0 : tensor<4x8xf32>
    %c2 = stablehlo.add %arg4, %c1 : tensor<4x8xf32>
    %c3 = stablehlo.subtract %arg0, %c2 : tensor<4x8xf32>
    %d0 = stablehlo.broadcast_in_dim %arg11, dims = [] : (tensor<f32>) -> tensor<6x8xf32>
    %d1 = stablehlo.multiply %arg3, %d0 : tensor<6x8xf32>
    %d2 = stablehlo.add %arg5, %d1 : tensor<6x8xf32>
    %d3 = stablehlo.subtract %arg1, %d2 : tensor<6x8xf32>
    %e0 = stablehlo.negate %arg6 : tensor<4x8xf32>
    %f0 = stablehlo.negate %arg7 : tensor<4x8xf32>
    %k2 = stablehlo.constant dense<2.000000e+00> : tensor<8xf32>
    %k3 = stablehlo.constant dense<3.000000e+00> : tensor<8xf32>
    %h0 = stablehlo.multiply %arg8, %k2 : tensor<8xf32>
    %k0 = stablehlo.multiply %arg9, %k3 : tensor<8xf32>
    return %c3, %d3, %c2, %d2, %e0, %f0, %h0, %k0 : tensor<4x8xf32>, tensor<6x8xf32>, tensor<4x8xf32>, tensor<6x8xf32>, tensor<4x8xf32>, tensor<4x8xf32>, tensor<8xf32>, tensor<8xf32>
  }
}
