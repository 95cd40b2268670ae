// Inputs for tests/test_pass_fuse_moments.py: each chunk between separator lines is run through `fuse-moments`
// alone and the concatenated outputs are checked against the CHECK lines of this file. Each variable's update is
// a small momentum step: m' = m + (g * scale - m) * 0.1, var' = var - lr * m'.

// Packed state as the frontend lowers it (frontend/packing.py): the variables a (f32[8]), b (f32[2,3]) and c
// (f32[6]) live in one flat buffer f32[20], their m slot in another; a and b get gradients, c does not. Each
// member is cut out (slice, reshape), updated, and packed again (concatenate). After the pass one chain updates
// a and b on the packed buffers themselves: the cuts and re-packs of the fused members fold away, only the
// gradients are concatenated, and c's untouched piece is copied through as one slice.
// CHECK-LABEL: module @packed_state
// CHECK:         %[[CV:.*]] = stablehlo.slice %arg0 [14:20] : (tensor<20xf32>) -> tensor<6xf32>
// CHECK:         %[[CM:.*]] = stablehlo.slice %arg3 [14:20] : (tensor<20xf32>) -> tensor<6xf32>
// CHECK:         %[[M:.*]] = stablehlo.slice %arg3 [0:14] : (tensor<20xf32>) -> tensor<14xf32>
// CHECK:         %[[MC:.*]] = sdy.sharding_constraint %[[M]] <@mesh, [{}]> : tensor<14xf32>
// CHECK:         %[[GB:.*]] = stablehlo.reshape %arg2 : (tensor<2x3xf32>) -> tensor<6xf32>
// CHECK:         %[[G:.*]] = stablehlo.concatenate %arg1, %[[GB]], dim = 0 : (tensor<8xf32>, tensor<6xf32>) -> tensor<14xf32>
// CHECK:         %[[NEWM:.*]] = stablehlo.add %[[MC]], %{{.*}} : tensor<14xf32>
// CHECK:         %[[V:.*]] = stablehlo.slice %arg0 [0:14] : (tensor<20xf32>) -> tensor<14xf32>
// CHECK:         %[[VC:.*]] = sdy.sharding_constraint %[[V]] <@mesh, [{}]> : tensor<14xf32>
// CHECK:         %[[NEWV:.*]] = stablehlo.subtract %[[VC]], %{{.*}} : tensor<14xf32>
// CHECK:         %[[OUTM:.*]] = sdy.sharding_constraint %[[NEWM]] <@mesh, [{}]> : tensor<14xf32>
// CHECK:         %[[OUTV:.*]] = sdy.sharding_constraint %[[NEWV]] <@mesh, [{}]> : tensor<14xf32>
// CHECK:         %[[PV:.*]] = stablehlo.concatenate %[[OUTV]], %[[CV]], dim = 0 : (tensor<14xf32>, tensor<6xf32>) -> tensor<20xf32>
// CHECK:         %[[PM:.*]] = stablehlo.concatenate %[[OUTM]], %[[CM]], dim = 0 : (tensor<14xf32>, tensor<6xf32>) -> tensor<20xf32>
// CHECK:         return %[[PV]], %[[PM]] :
module @packed_state {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(
      %arg0: tensor<20xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "@pack0/float32", shardopt.role = "variable"},
      %arg1: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "grad/a", shardopt.owner = "a", shardopt.role = "gradient"},
      %arg2: tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "grad/b", shardopt.owner = "b", shardopt.role = "gradient"},
      %arg3: tensor<20xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "m/@pack0/float32", shardopt.owner = "@pack0/float32", shardopt.role = "slot"},
      %arg4: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "scale", shardopt.role = "hyperparameter"},
      %arg5: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "learning_rate", shardopt.role = "hyperparameter"})
      -> (tensor<20xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "@pack0/float32", shardopt.role = "variable"},
          tensor<20xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "m/@pack0/float32", shardopt.owner = "@pack0/float32", shardopt.role = "slot"}) {
    %c01 = stablehlo.constant dense<1.000000e-01> : tensor<f32>
    %va = stablehlo.slice %arg0 [0:8] : (tensor<20xf32>) -> tensor<8xf32>
    %vb0 = stablehlo.slice %arg0 [8:14] : (tensor<20xf32>) -> tensor<6xf32>
    %vb = stablehlo.reshape %vb0 : (tensor<6xf32>) -> tensor<2x3xf32>
    %vc = stablehlo.slice %arg0 [14:20] : (tensor<20xf32>) -> tensor<6xf32>
    %ma = stablehlo.slice %arg3 [0:8] : (tensor<20xf32>) -> tensor<8xf32>
    %mb0 = stablehlo.slice %arg3 [8:14] : (tensor<20xf32>) -> tensor<6xf32>
    %mb = stablehlo.reshape %mb0 : (tensor<6xf32>) -> tensor<2x3xf32>
    %mc = stablehlo.slice %arg3 [14:20] : (tensor<20xf32>) -> tensor<6xf32>
    %a0 = stablehlo.broadcast_in_dim %arg4, dims = [] : (tensor<f32>) -> tensor<8xf32>
    %a1 = stablehlo.multiply %arg1, %a0 : tensor<8xf32>
    %a2 = stablehlo.subtract %a1, %ma : tensor<8xf32>
    %a3 = stablehlo.broadcast_in_dim %c01, dims = [] : (tensor<f32>) -> tensor<8xf32>
    %a4 = stablehlo.multiply %a2, %a3 : tensor<8xf32>
    %a5 = stablehlo.add %ma, %a4 : tensor<8xf32>
    %a6 = stablehlo.broadcast_in_dim %arg5, dims = [] : (tensor<f32>) -> tensor<8xf32>
    %a7 = stablehlo.multiply %a6, %a5 : tensor<8xf32>
    %a8 = stablehlo.subtract %va, %a7 : tensor<8xf32>
    %b0 = stablehlo.broadcast_in_dim %arg4, dims = [] : (tensor<f32>) -> tensor<2x3xf32>
    %b1 = stablehlo.multiply %arg2, %b0 : tensor<2x3xf32>
    %b2 = stablehlo.subtract %b1, %mb : tensor<2x3xf32>
    %b3 = stablehlo.broadcast_in_dim %c01, dims = [] : (tensor<f32>) -> tensor<2x3xf32>
    %b4 = stablehlo.multiply %b2, %b3 : tensor<2x3xf32>
    %b5 = stablehlo.add %mb, %b4 : tensor<2x3xf32>
    %b6 = stablehlo.broadcast_in_dim %arg5, dims = [] : (tensor<f32>) -> tensor<2x3xf32>
    %b7 = stablehlo.multiply %b6, %b5 : tensor<2x3xf32>
    %b8 = stablehlo.subtract %vb, %b7 : tensor<2x3xf32>
    %b8f = stablehlo.reshape %b8 : (tensor<2x3xf32>) -> tensor<6xf32>
    %b5f = stablehlo.reshape %b5 : (tensor<2x3xf32>) -> tensor<6xf32>
    %pv = stablehlo.concatenate %a8, %b8f, %vc, dim = 0 : (tensor<8xf32>, tensor<6xf32>, tensor<6xf32>) -> tensor<20xf32>
    %pm = stablehlo.concatenate %a5, %b5f, %mc, dim = 0 : (tensor<8xf32>, tensor<6xf32>, tensor<6xf32>) -> tensor<20xf32>
    return %pv, %pm : tensor<20xf32>, tensor<20xf32>
  }
}
