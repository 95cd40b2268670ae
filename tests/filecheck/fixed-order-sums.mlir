// RUN: python -m shardopt.opt -p fixed-order-sums %s --split-input-file | filecheck %s

// `fixed-order-sums`, each chunk between separator lines on its own (tests/test_filecheck.py runs the RUN line;
// tests/test_pass_fixed_order_sums.py runs the same chunks in-process and checks the statistics, the values and
// the compiled collectives).

// A global norm over two tensors sharded on "model" (they share one gather), one on "batch" (a gather of its
// own) and a replicated one (left alone): each sharded reduced dim is split into [shards, rest], each device sums
// its rest, the partials are gathered by a sharding constraint to replicated and summed locally.
// CHECK-LABEL: module @global_norm
// CHECK:         %[[SQ0:.*]] = stablehlo.multiply %arg0, %arg0 : tensor<16x8xf32>
// CHECK:         %[[S0:.*]] = stablehlo.reshape %[[SQ0]] {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{}, {"model"}, {}]>]>} : (tensor<16x8xf32>) -> tensor<16x4x2xf32>
// CHECK:         %[[P0:.*]] = stablehlo.reduce(%[[S0]] init: %{{.*}}) applies stablehlo.add across dimensions = [0, 2] {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{"model"}]>]>} : (tensor<16x4x2xf32>, tensor<f32>) -> tensor<4xf32>
// CHECK:         %[[S1:.*]] = stablehlo.reshape %{{.*}} : (tensor<8x4xf32>) -> tensor<2x4x4xf32>
// CHECK:         %[[P1:.*]] = stablehlo.reduce(%[[S1]] init: %{{.*}}) applies stablehlo.add across dimensions = [1, 2] {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{"batch"}]>]>}
// CHECK:         %[[G1:.*]] = sdy.sharding_constraint %[[P1]] <@mesh, [{}]> : tensor<2xf32>
// CHECK:         %[[N1:.*]] = stablehlo.reduce(%[[G1]] init: %{{.*}}) applies stablehlo.add across dimensions = [0] : (tensor<2xf32>, tensor<f32>) -> tensor<f32>
// CHECK:         %[[P2:.*]] = stablehlo.reduce({{.*}}) applies stablehlo.add across dimensions = [0, 2] {{.*}} : (tensor<4x4x2xf32>, tensor<f32>) -> tensor<4xf32>
// CHECK:         %[[C0:.*]] = stablehlo.reshape %[[P0]] : (tensor<4xf32>) -> tensor<4x1xf32>
// CHECK:         %[[C2:.*]] = stablehlo.reshape %[[P2]] : (tensor<4xf32>) -> tensor<4x1xf32>
// CHECK:         %[[ST:.*]] = stablehlo.concatenate %[[C0]], %[[C2]], dim = 1 {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{"model"}, {}]>]>}
// CHECK:         %[[G:.*]] = sdy.sharding_constraint %[[ST]] <@mesh, [{}, {}]> : tensor<4x2xf32>
// CHECK:         %[[SUMS:.*]] = stablehlo.reduce(%[[G]] init: %{{.*}}) applies stablehlo.add across dimensions = [0] : (tensor<4x2xf32>, tensor<f32>) -> tensor<2xf32>
// CHECK:         %[[A:.*]] = stablehlo.slice %[[SUMS]] [0:1]
// CHECK:         %[[N0:.*]] = stablehlo.reshape %[[A]] : (tensor<1xf32>) -> tensor<f32>
// CHECK:         %[[B:.*]] = stablehlo.slice %[[SUMS]] [1:2]
// CHECK:         %[[N2:.*]] = stablehlo.reshape %[[B]] : (tensor<1xf32>) -> tensor<f32>
// CHECK:         stablehlo.reduce(%{{.*}} init: %{{.*}}) applies stablehlo.add across dimensions = [0] : (tensor<8xf32>, tensor<f32>) -> tensor<f32>
// CHECK:         stablehlo.add %[[N0]], %[[N1]] : tensor<f32>
// CHECK-NEXT:    stablehlo.add %{{.*}}, %[[N2]] : tensor<f32>
// CHECK-NOT:     (tensor<16x8xf32>, tensor<f32>) -> tensor<f32>
// CHECK:         return
module @global_norm {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<16x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %arg1: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {}]>},
                         %arg2: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %arg3: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>})
      -> (tensor<f32>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %0 = stablehlo.multiply %arg0, %arg0 : tensor<16x8xf32>
    %1 = stablehlo.reduce(%0 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<16x8xf32>, tensor<f32>) -> tensor<f32>
    %2 = stablehlo.multiply %arg1, %arg1 : tensor<8x4xf32>
    %3 = stablehlo.reduce(%2 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x4xf32>, tensor<f32>) -> tensor<f32>
    %4 = stablehlo.multiply %arg2, %arg2 : tensor<4x8xf32>
    %5 = stablehlo.reduce(%4 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<4x8xf32>, tensor<f32>) -> tensor<f32>
    %6 = stablehlo.multiply %arg3, %arg3 : tensor<8xf32>
    %7 = stablehlo.reduce(%6 init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<8xf32>, tensor<f32>) -> tensor<f32>
    %8 = stablehlo.add %1, %3 : tensor<f32>
    %9 = stablehlo.add %8, %5 : tensor<f32>
    %10 = stablehlo.add %9, %7 : tensor<f32>
    %11 = stablehlo.sqrt %10 : tensor<f32>
    return %11 : tensor<f32>
  }
}


// -----

// A sum that keeps a sharded dim (the gather is over "model" only; the result stays sharded on "batch"), and a
// dim sharded over two axes (8 shards, major to minor).
// CHECK-LABEL: module @partial
// CHECK:         %[[S:.*]] = stablehlo.reshape %arg0 {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{"batch"}, {"model"}, {}]>]>} : (tensor<8x16xf32>) -> tensor<8x4x4xf32>
// CHECK:         %[[P:.*]] = stablehlo.reduce(%[[S]] init: %{{.*}}) applies stablehlo.add across dimensions = [2] {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{"batch"}, {"model"}]>]>}
// CHECK:         %[[G:.*]] = sdy.sharding_constraint %[[P]] <@mesh, [{"batch"}, {}]> : tensor<8x4xf32>
// CHECK:         %[[R:.*]] = stablehlo.reduce(%[[G]] init: %{{.*}}) applies stablehlo.add across dimensions = [1] : (tensor<8x4xf32>, tensor<f32>) -> tensor<8xf32>
// CHECK:         stablehlo.reshape %arg1 {sdy.sharding = #sdy.sharding_per_value<[<@mesh, [{"batch", "model"}, {}, {}]>]>} : (tensor<8x16xf32>) -> tensor<8x1x16xf32>
// CHECK:         sdy.sharding_constraint %{{.*}} <@mesh, [{}]> : tensor<8xf32>
// CHECK:         return %[[R]], %{{.*}} : tensor<8xf32>, tensor<f32>

module @partial {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>},
                         %arg1: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch", "model"}, {}]>})
      -> (tensor<8xf32>, tensor<f32>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %0 = stablehlo.reduce(%arg0 init: %zero) applies stablehlo.add across dimensions = [1] : (tensor<8x16xf32>, tensor<f32>) -> tensor<8xf32>
    %1 = stablehlo.reduce(%arg1 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x16xf32>, tensor<f32>) -> tensor<f32>
    return %0, %1 : tensor<8xf32>, tensor<f32>
  }
}


// -----

// Left alone: a sum whose init is not +0.0 (splitting it would add the init once per stage), a sum over replicated
// data (no all-reduce), an integer sum and a maximum (exact in any order).
// CHECK-LABEL: module @left_alone
// CHECK-NOT:     stablehlo.reshape
// CHECK-NOT:     sdy.sharding_constraint
// CHECK:         return

module @left_alone {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>},
                         %arg1: tensor<8x16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>},
                         %arg2: tensor<8x16xi32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {}]>})
      -> (tensor<f32>, tensor<f32>, tensor<i32>, tensor<f32>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %one = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %zi = stablehlo.constant dense<0> : tensor<i32>
    %0 = stablehlo.reduce(%arg0 init: %one) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x16xf32>, tensor<f32>) -> tensor<f32>
    %1 = stablehlo.reduce(%arg1 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x16xf32>, tensor<f32>) -> tensor<f32>
    %3 = stablehlo.reduce(%arg2 init: %zi) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x16xi32>, tensor<i32>) -> tensor<i32>
    %4 = stablehlo.reduce(%arg0 init: %zero) applies stablehlo.maximum across dimensions = [0, 1] : (tensor<8x16xf32>, tensor<f32>) -> tensor<f32>
    return %0, %1, %3, %4 : tensor<f32>, tensor<f32>, tensor<i32>, tensor<f32>
  }
}
