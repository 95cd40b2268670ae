// Inputs for tests/test_pass_fuse_moments.py: each chunk between separator lines is run through `fuse-moments-unpacked`
// alone and the concatenated outputs are checked against the CHECK lines of this file. Each variable's update is
// a small momentum step: m' = m + (g * scale - m) * 0.1, var' = var - lr * m'.

// Two replicated variables (f32[8], f32[2,3]) pack flat into f32[14]; two variables sharded on dim 0 over
// "model" (f32[8,3], f32[4,5]) pack as [4, n/4] rows concatenated on dim 1, pinned to [{"model"}, {}]. One chain
// per group; each result is sliced (and reshaped) back and returned in place of the per-variable one.
// CHECK-LABEL: module @flat_and_rows
// CHECK:         %[[AM:.*]] = stablehlo.reshape %arg7 : (tensor<2x3xf32>) -> tensor<6xf32>
// CHECK:         %[[PM:.*]] = stablehlo.concatenate %arg6, %[[AM]], dim = 0 : (tensor<8xf32>, tensor<6xf32>) -> tensor<14xf32>
// CHECK:         %[[PMC:.*]] = sdy.sharding_constraint %[[PM]] <@mesh, [{}]> : tensor<14xf32>
// CHECK:         %[[PG:.*]] = stablehlo.concatenate %arg4, %{{.*}}, dim = 0 : (tensor<8xf32>, tensor<6xf32>) -> tensor<14xf32>
// CHECK:         %[[PGC:.*]] = sdy.sharding_constraint %[[PG]] <@mesh, [{}]> : tensor<14xf32>
// CHECK:         %[[S:.*]] = stablehlo.broadcast_in_dim %arg12, dims = [] : (tensor<f32>) -> tensor<14xf32>
// CHECK:         %[[CG:.*]] = stablehlo.multiply %[[PGC]], %[[S]] : tensor<14xf32>
// CHECK:         stablehlo.subtract %[[CG]], %[[PMC]] : tensor<14xf32>
// CHECK:         stablehlo.broadcast_in_dim %{{.*}}, dims = [] : (tensor<f32>) -> tensor<14xf32>
// CHECK:         %[[NEWM:.*]] = stablehlo.add %[[PMC]], %{{.*}} : tensor<14xf32>
// CHECK:         %[[NEWV:.*]] = stablehlo.subtract %{{.*}}, %{{.*}} : tensor<14xf32>
// CHECK:         %[[OUTM:.*]] = sdy.sharding_constraint %[[NEWM]] <@mesh, [{}]> : tensor<14xf32>
// CHECK:         %[[M0:.*]] = stablehlo.slice %[[OUTM]] [0:8]
// CHECK:         %[[M1S:.*]] = stablehlo.slice %[[OUTM]] [8:14]
// CHECK:         %[[M1:.*]] = stablehlo.reshape %[[M1S]] : (tensor<6xf32>) -> tensor<2x3xf32>
// CHECK:         %[[OUTV:.*]] = sdy.sharding_constraint %[[NEWV]] <@mesh, [{}]> : tensor<14xf32>
// CHECK:         %[[V0:.*]] = stablehlo.slice %[[OUTV]] [0:8]
// CHECK:         %[[V1S:.*]] = stablehlo.slice %[[OUTV]] [8:14]
// CHECK:         %[[V1:.*]] = stablehlo.reshape %[[V1S]] : (tensor<6xf32>) -> tensor<2x3xf32>
// CHECK:         %[[RM:.*]] = stablehlo.reshape %arg8 : (tensor<8x3xf32>) -> tensor<4x6xf32>
// CHECK:         stablehlo.concatenate %[[RM]], %arg9, dim = 1 : (tensor<4x6xf32>, tensor<4x5xf32>) -> tensor<4x11xf32>
// CHECK:         sdy.sharding_constraint %{{.*}} <@mesh, [{"model"}, {}]> : tensor<4x11xf32>
// CHECK:         stablehlo.slice %{{.*}} [0:4, 0:6] : (tensor<4x11xf32>) -> tensor<4x6xf32>
// CHECK:         stablehlo.reshape %{{.*}} : (tensor<4x6xf32>) -> tensor<8x3xf32>
// CHECK:         stablehlo.slice %{{.*}} [0:4, 6:11] : (tensor<4x11xf32>) -> tensor<4x5xf32>
// CHECK:         return %[[V0]], %[[V1]], %{{.*}}, %{{.*}}, %[[M0]], %[[M1]], %{{.*}}, %{{.*}} :
module @flat_and_rows {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(
      %arg0: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "a", shardopt.role = "variable"},
      %arg1: tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "b", shardopt.role = "variable"},
      %arg2: tensor<8x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "r", shardopt.role = "variable"},
      %arg3: tensor<4x5xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "s", shardopt.role = "variable"},
      %arg4: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "grad/a", shardopt.owner = "a", shardopt.role = "gradient"},
      %arg5: tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "grad/b", shardopt.owner = "b", shardopt.role = "gradient"},
      %arg6: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "m/a", shardopt.owner = "a", shardopt.role = "slot"},
      %arg7: tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "m/b", shardopt.owner = "b", shardopt.role = "slot"},
      %arg8: tensor<8x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "m/r", shardopt.owner = "r", shardopt.role = "slot"},
      %arg9: tensor<4x5xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "m/s", shardopt.owner = "s", shardopt.role = "slot"},
      %arg10: tensor<8x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "grad/r", shardopt.owner = "r", shardopt.role = "gradient"},
      %arg11: tensor<4x5xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "grad/s", shardopt.owner = "s", shardopt.role = "gradient"},
      %arg12: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "scale", shardopt.role = "hyperparameter"},
      %arg13: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "learning_rate", shardopt.role = "hyperparameter"})
      -> (tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "a", shardopt.role = "variable"},
          tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "b", shardopt.role = "variable"},
          tensor<8x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "r", shardopt.role = "variable"},
          tensor<4x5xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "s", shardopt.role = "variable"},
          tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "m/a", shardopt.owner = "a", shardopt.role = "slot"},
          tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "m/b", shardopt.owner = "b", shardopt.role = "slot"},
          tensor<8x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "m/r", shardopt.owner = "r", shardopt.role = "slot"},
          tensor<4x5xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "m/s", shardopt.owner = "s", shardopt.role = "slot"}) {
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
// CHECK:         %[[PM:.*]] = stablehlo.concatenate %arg4, %arg5, dim = 0 : (tensor<4x8xf32>, tensor<6x8xf32>) -> tensor<10x8xf32>
// CHECK:         sdy.sharding_constraint %[[PM]] <@mesh, [{}, {"model"}]> : tensor<10x8xf32>
// CHECK:         %[[F0:.*]] = stablehlo.broadcast_in_dim %arg10, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
// CHECK:         %[[F1:.*]] = stablehlo.broadcast_in_dim %arg11, dims = [] : (tensor<f32>) -> tensor<6x8xf32>
// CHECK:         stablehlo.concatenate %[[F0]], %[[F1]], dim = 0 : (tensor<4x8xf32>, tensor<6x8xf32>) -> tensor<10x8xf32>
// CHECK:         stablehlo.slice %{{.*}} [0:4, 0:8] : (tensor<10x8xf32>) -> tensor<4x8xf32>
// CHECK:         stablehlo.slice %{{.*}} [4:10, 0:8] : (tensor<10x8xf32>) -> tensor<6x8xf32>
// CHECK-NOT:     stablehlo.concatenate
// CHECK:         return
module @columns_and_leftovers {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(
      %arg0: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "c", shardopt.role = "variable"},
      %arg1: tensor<6x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "d", shardopt.role = "variable"},
      %arg2: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "grad/c", shardopt.owner = "c", shardopt.role = "gradient"},
      %arg3: tensor<6x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "grad/d", shardopt.owner = "d", shardopt.role = "gradient"},
      %arg4: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "m/c", shardopt.owner = "c", shardopt.role = "slot"},
      %arg5: tensor<6x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "m/d", shardopt.owner = "d", shardopt.role = "slot"},
      %arg6: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>, shardopt.name = "e", shardopt.role = "variable"},
      %arg7: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>, shardopt.name = "f", shardopt.role = "variable"},
      %arg8: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "h", shardopt.role = "variable"},
      %arg9: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "k", shardopt.role = "variable"},
      %arg10: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "factor/c", shardopt.role = "hyperparameter"},
      %arg11: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "factor/d", shardopt.role = "hyperparameter"})
      -> (tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "c", shardopt.role = "variable"},
          tensor<6x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "d", shardopt.role = "variable"},
          tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "m/c", shardopt.owner = "c", shardopt.role = "slot"},
          tensor<6x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>, shardopt.name = "m/d", shardopt.owner = "d", shardopt.role = "slot"},
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
