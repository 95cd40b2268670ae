// RUN: python -m shardopt.opt -p fuse-clipping %s --split-input-file | filecheck %s
// RUN: python -m shardopt.opt -p 'fuse-clipping{max-operands=1}' %s --split-input-file | filecheck %s --check-prefix=ONE

// `fuse-clipping`, each chunk between separator lines on its own (tests/test_filecheck.py runs the RUN lines;
// tests/test_pass_fuse_clipping.py runs the same chunks in-process and checks the statistics and the values).
// Prefixes: CHECK (defaults), ONE (max-operands=1: a reduction per gradient, so no variadic reduce anywhere).

// Global norm (tf.clip_by_global_norm) over two replicated f32[4,8] gradients, one f32[6] gradient and one
// f32[4,8] sharded on its minor dim (left alone: its local sums would read across the major dim): the two
// replicated f32[4,8] share a variadic reduce, the add tree of l2_loss halves becomes one reduction over the
// stacked partials, and the clip scale is untouched.
// CHECK-LABEL: module @global_norm
// ONE-LABEL:   module @global_norm
// ONE-NOT:     reducer(
// CHECK:         %[[SQ0:.*]] = stablehlo.multiply %arg0, %arg0 : tensor<4x8xf32>
// CHECK:         %[[SQ1:.*]] = stablehlo.multiply %arg1, %arg1 : tensor<4x8xf32>
// CHECK:         %[[BATCH:.*]]:2 = stablehlo.reduce(%[[SQ0]] init: %{{.*}}), (%[[SQ1]] init: %{{.*}}) across dimensions = [0, 1]
// CHECK-SAME:      -> (tensor<f32>, tensor<f32>)
// CHECK:         stablehlo.divide %[[BATCH]]#0
// CHECK:         stablehlo.divide %[[BATCH]]#1
// CHECK:         %[[STACK:.*]] = stablehlo.concatenate {{.*}} dim = 0 : (tensor<1xf32>, tensor<1xf32>, tensor<1xf32>, tensor<1xf32>) -> tensor<4xf32>
// CHECK:         %[[TOTAL:.*]] = stablehlo.reduce(%[[STACK]] init: %{{.*}}) applies stablehlo.add across dimensions = [0]
// CHECK-NOT:     stablehlo.add {{.*}} : tensor<f32>
// CHECK:         stablehlo.multiply %[[TOTAL]], %{{.*}} : tensor<f32>
// CHECK:         return
module @global_norm {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>},
                         %arg1: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>},
                         %arg2: tensor<6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>},
                         %arg3: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<4x8xf32>, tensor<4x8xf32>, tensor<6xf32>, tensor<4x8xf32>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %two = stablehlo.constant dense<2.000000e+00> : tensor<f32>
    %one = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %0 = stablehlo.multiply %arg0, %arg0 : tensor<4x8xf32>
    %1 = stablehlo.reduce(%0 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<4x8xf32>, tensor<f32>) -> tensor<f32>
    %2 = stablehlo.divide %1, %two : tensor<f32>
    %3 = stablehlo.multiply %arg1, %arg1 : tensor<4x8xf32>
    %4 = stablehlo.reduce(%3 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<4x8xf32>, tensor<f32>) -> tensor<f32>
    %5 = stablehlo.divide %4, %two : tensor<f32>
    %6 = stablehlo.multiply %arg2, %arg2 : tensor<6xf32>
    %7 = stablehlo.reduce(%6 init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<6xf32>, tensor<f32>) -> tensor<f32>
    %8 = stablehlo.divide %7, %two : tensor<f32>
    %9 = stablehlo.multiply %arg3, %arg3 : tensor<4x8xf32>
    %10 = stablehlo.reduce(%9 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<4x8xf32>, tensor<f32>) -> tensor<f32>
    %11 = stablehlo.divide %10, %two : tensor<f32>
    %12 = stablehlo.add %2, %5 : tensor<f32>
    %13 = stablehlo.add %12, %8 : tensor<f32>
    %14 = stablehlo.add %13, %11 : tensor<f32>
    %15 = stablehlo.multiply %14, %two : tensor<f32>
    %16 = stablehlo.sqrt %15 : tensor<f32>
    %17 = stablehlo.divide %one, %16 : tensor<f32>
    %18 = stablehlo.minimum %17, %one : tensor<f32>
    %b0 = stablehlo.broadcast_in_dim %18, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %b1 = stablehlo.broadcast_in_dim %18, dims = [] : (tensor<f32>) -> tensor<6xf32>
    %c0 = stablehlo.multiply %arg0, %b0 : tensor<4x8xf32>
    %c1 = stablehlo.multiply %arg1, %b0 : tensor<4x8xf32>
    %c2 = stablehlo.multiply %arg2, %b1 : tensor<6xf32>
    %c3 = stablehlo.multiply %arg3, %b0 : tensor<4x8xf32>
    return %c0, %c1, %c2, %c3 : tensor<4x8xf32>, tensor<4x8xf32>, tensor<6xf32>, tensor<4x8xf32>
  }
}

// -----

// Per-tensor clipnorm over two f32[16,8] gradients laid out [{"model"}, {}], the second behind a sharding
// constraint: one variadic reduce over the unsharded (minor) dim 1, then one reduce per tensor over the sharded
// dim 0 (XLA turns that into a local reduce plus an all-reduce); each tensor keeps its own norm and clip math.
// CHECK-LABEL: module @clipnorm_sharded
// ONE-LABEL:   module @clipnorm_sharded
// ONE-NOT:     reducer(
// CHECK:         %[[SQ0:.*]] = stablehlo.multiply %arg0, %arg0
// CHECK:         %[[SQ1:.*]] = stablehlo.multiply %{{.*}}, %{{.*}} : tensor<16x8xf32>
// CHECK:         %[[ROWS:.*]]:2 = stablehlo.reduce(%[[SQ0]] init: %{{.*}}), (%[[SQ1]] init: %{{.*}}) across dimensions = [1]
// CHECK-SAME:      -> (tensor<16xf32>, tensor<16xf32>)
// CHECK:         %[[N0:.*]] = stablehlo.reduce(%[[ROWS]]#0 init: %{{.*}}) applies stablehlo.add across dimensions = [0] : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
// CHECK:         stablehlo.sqrt %[[N0]]
// CHECK:         %[[N1:.*]] = stablehlo.reduce(%[[ROWS]]#1 init: %{{.*}}) applies stablehlo.add across dimensions = [0] : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
// CHECK:         stablehlo.sqrt %[[N1]]
// CHECK:         return
module @clipnorm_sharded {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<16x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>},
                         %arg1: tensor<16x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>})
      -> (tensor<16x8xf32>, tensor<16x8xf32>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %one = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %0 = stablehlo.multiply %arg0, %arg0 : tensor<16x8xf32>
    %1 = stablehlo.reduce(%0 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<16x8xf32>, tensor<f32>) -> tensor<f32>
    %2 = stablehlo.sqrt %1 : tensor<f32>
    %3 = stablehlo.maximum %2, %one : tensor<f32>
    %4 = stablehlo.broadcast_in_dim %3, dims = [] : (tensor<f32>) -> tensor<16x8xf32>
    %5 = stablehlo.divide %arg0, %4 : tensor<16x8xf32>
    %g1 = sdy.sharding_constraint %arg1 <@mesh, [{"model"}, {}]> : tensor<16x8xf32>
    %6 = stablehlo.multiply %g1, %g1 : tensor<16x8xf32>
    %7 = stablehlo.reduce(%6 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<16x8xf32>, tensor<f32>) -> tensor<f32>
    %8 = stablehlo.sqrt %7 : tensor<f32>
    %9 = stablehlo.maximum %8, %one : tensor<f32>
    %10 = stablehlo.broadcast_in_dim %9, dims = [] : (tensor<f32>) -> tensor<16x8xf32>
    %11 = stablehlo.divide %arg1, %10 : tensor<16x8xf32>
    return %5, %11 : tensor<16x8xf32>, tensor<16x8xf32>
  }
}

// -----

// Left alone: a minor-dim sharded layout (strided local sums) next to a major-dim sharded one of the same
// shape (different layouts never share a reduction), a layout with no unsharded dimension, a sum that is not
// of squares, and a partial (not full) reduction.
// CHECK-LABEL: module @left_alone
// CHECK-COUNT-5: stablehlo.reduce(%{{[0-9]+}} init: %{{.*}}) applies stablehlo.add
// CHECK-NOT:     stablehlo.reduce
// CHECK:         return
module @left_alone {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>},
                         %arg1: tensor<8x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>},
                         %arg2: tensor<8x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>},
                         %arg3: tensor<8x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {"model"}]>})
      -> (tensor<f32>, tensor<f32>, tensor<f32>, tensor<f32>, tensor<8xf32>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %0 = stablehlo.multiply %arg0, %arg0 : tensor<8x8xf32>
    %1 = stablehlo.reduce(%0 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x8xf32>, tensor<f32>) -> tensor<f32>
    %2 = stablehlo.multiply %arg1, %arg1 : tensor<8x8xf32>
    %3 = stablehlo.reduce(%2 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x8xf32>, tensor<f32>) -> tensor<f32>
    %4 = stablehlo.multiply %arg2, %arg2 : tensor<8x8xf32>
    %5 = stablehlo.reduce(%4 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x8xf32>, tensor<f32>) -> tensor<f32>
    %6 = stablehlo.multiply %arg3, %arg2 : tensor<8x8xf32>
    %7 = stablehlo.reduce(%6 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x8xf32>, tensor<f32>) -> tensor<f32>
    %8 = stablehlo.multiply %arg0, %arg0 : tensor<8x8xf32>
    %9 = stablehlo.reduce(%8 init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<8x8xf32>, tensor<f32>) -> tensor<8xf32>
    return %1, %3, %5, %7, %9 : tensor<f32>, tensor<f32>, tensor<f32>, tensor<f32>, tensor<8xf32>
  }
}

// -----

// Global norm where fuse-moments has already packed two of the gradients (f32[8] and f32[2,3] concatenated into
// the f32[14] its fused chain reads): their squares are summed once over the packed gradient (one contiguous
// read instead of one per member buffer), the second member's sum becomes zero, and the add tree still sums
// every contribution (then collapses into one reduction as usual). The third gradient is not packed.
// CHECK-LABEL: module @packed_gradient
// CHECK:         %[[G1:.*]] = stablehlo.reshape %arg1 : (tensor<2x3xf32>) -> tensor<6xf32>
// CHECK:         %[[PACKED:.*]] = stablehlo.concatenate %arg0, %[[G1]], dim = 0 : (tensor<8xf32>, tensor<6xf32>) -> tensor<14xf32>
// CHECK:         %[[SQ:.*]] = stablehlo.multiply %[[PACKED]], %[[PACKED]] : tensor<14xf32>
// CHECK:         %[[SUM:.*]] = stablehlo.reduce(%[[SQ]] init: %[[ZERO:.*]]) applies stablehlo.add across dimensions = [0]
// CHECK-NOT:     stablehlo.multiply %arg0, %arg0
// CHECK-NOT:     stablehlo.multiply %arg1, %arg1
// CHECK:         stablehlo.divide %[[SUM]]
// CHECK:         stablehlo.divide %[[ZERO]]
// CHECK:         stablehlo.reduce(%{{.*}} init: %{{.*}}) applies stablehlo.add across dimensions = [0] : (tensor<3xf32>, tensor<f32>) -> tensor<f32>
// CHECK:         return
module @packed_gradient {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>},
                         %arg1: tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>},
                         %arg2: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<14xf32>, tensor<4x8xf32>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %two = stablehlo.constant dense<2.000000e+00> : tensor<f32>
    %one = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %g1 = stablehlo.reshape %arg1 : (tensor<2x3xf32>) -> tensor<6xf32>
    %packed = stablehlo.concatenate %arg0, %g1, dim = 0 : (tensor<8xf32>, tensor<6xf32>) -> tensor<14xf32>
    %0 = stablehlo.multiply %arg0, %arg0 : tensor<8xf32>
    %1 = stablehlo.reduce(%0 init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<8xf32>, tensor<f32>) -> tensor<f32>
    %2 = stablehlo.divide %1, %two : tensor<f32>
    %3 = stablehlo.multiply %arg1, %arg1 : tensor<2x3xf32>
    %4 = stablehlo.reduce(%3 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<2x3xf32>, tensor<f32>) -> tensor<f32>
    %5 = stablehlo.divide %4, %two : tensor<f32>
    %6 = stablehlo.multiply %arg2, %arg2 : tensor<4x8xf32>
    %7 = stablehlo.reduce(%6 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<4x8xf32>, tensor<f32>) -> tensor<f32>
    %8 = stablehlo.divide %7, %two : tensor<f32>
    %9 = stablehlo.add %2, %5 : tensor<f32>
    %10 = stablehlo.add %9, %8 : tensor<f32>
    %11 = stablehlo.multiply %10, %two : tensor<f32>
    %12 = stablehlo.sqrt %11 : tensor<f32>
    %13 = stablehlo.divide %one, %12 : tensor<f32>
    %14 = stablehlo.minimum %13, %one : tensor<f32>
    %b14 = stablehlo.broadcast_in_dim %14, dims = [] : (tensor<f32>) -> tensor<14xf32>
    %b48 = stablehlo.broadcast_in_dim %14, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %c0 = stablehlo.multiply %packed, %b14 : tensor<14xf32>
    %c2 = stablehlo.multiply %arg2, %b48 : tensor<4x8xf32>
    return %c0, %c2 : tensor<14xf32>, tensor<4x8xf32>
  }
}

// -----

// optax's global norm (`optax.clip_by_global_norm`): optax squares `x.real` and `x.imag`, which jax lowers for a
// real x as `x*x + 0*0` (the zeros a broadcast of a scalar +0.0), and its add tree starts from +0.0. Adding +0.0
// to a square changes no bit, so the sum of squares reads `x*x`: the two replicated f32[4,8] share a variadic
// reduce of the squares themselves, and the add tree (with its +0.0 leaf) collapses into one reduction.
// CHECK-LABEL: module @optax_global_norm
// ONE-LABEL:   module @optax_global_norm
// ONE-NOT:     reducer(
// CHECK:         %[[SQ0:.*]] = stablehlo.multiply %arg0, %arg0 : tensor<4x8xf32>
// CHECK:         %[[SQ1:.*]] = stablehlo.multiply %arg1, %arg1 : tensor<4x8xf32>
// CHECK:         %[[BATCH:.*]]:2 = stablehlo.reduce(%[[SQ0]] init: %{{.*}}), (%[[SQ1]] init: %{{.*}}) across dimensions = [0, 1]
// CHECK-SAME:      -> (tensor<f32>, tensor<f32>)
// CHECK:         %[[STACK:.*]] = stablehlo.concatenate {{.*}} dim = 0 : (tensor<1xf32>, tensor<1xf32>, tensor<1xf32>, tensor<1xf32>) -> tensor<4xf32>
// CHECK:         %[[TOTAL:.*]] = stablehlo.reduce(%[[STACK]] init: %{{.*}}) applies stablehlo.add across dimensions = [0]
// CHECK-NOT:     stablehlo.add {{.*}} : tensor<f32>
// CHECK:         stablehlo.sqrt %[[TOTAL]] : tensor<f32>
// CHECK:         return
module @optax_global_norm {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>},
                         %arg1: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>},
                         %arg2: tensor<6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>})
      -> (tensor<4x8xf32>, tensor<4x8xf32>, tensor<6xf32>) {
    %cst = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %one = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %0 = stablehlo.multiply %arg0, %arg0 : tensor<4x8xf32>
    %1 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %2 = stablehlo.multiply %1, %1 : tensor<4x8xf32>
    %3 = stablehlo.add %0, %2 : tensor<4x8xf32>
    %4 = stablehlo.multiply %arg1, %arg1 : tensor<4x8xf32>
    %5 = stablehlo.multiply %1, %1 : tensor<4x8xf32>
    %6 = stablehlo.add %4, %5 : tensor<4x8xf32>
    %7 = stablehlo.multiply %arg2, %arg2 : tensor<6xf32>
    %8 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<6xf32>
    %9 = stablehlo.multiply %8, %8 : tensor<6xf32>
    %10 = stablehlo.add %7, %9 : tensor<6xf32>
    %11 = stablehlo.reduce(%3 init: %cst) applies stablehlo.add across dimensions = [0, 1] : (tensor<4x8xf32>, tensor<f32>) -> tensor<f32>
    %12 = stablehlo.reduce(%6 init: %cst) applies stablehlo.add across dimensions = [0, 1] : (tensor<4x8xf32>, tensor<f32>) -> tensor<f32>
    %13 = stablehlo.reduce(%10 init: %cst) applies stablehlo.add across dimensions = [0] : (tensor<6xf32>, tensor<f32>) -> tensor<f32>
    %14 = stablehlo.add %cst, %11 : tensor<f32>
    %15 = stablehlo.add %14, %12 : tensor<f32>
    %16 = stablehlo.add %15, %13 : tensor<f32>
    %17 = stablehlo.sqrt %16 : tensor<f32>
    %18 = stablehlo.divide %one, %17 : tensor<f32>
    %19 = stablehlo.minimum %18, %one : tensor<f32>
    %b0 = stablehlo.broadcast_in_dim %19, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %b1 = stablehlo.broadcast_in_dim %19, dims = [] : (tensor<f32>) -> tensor<6xf32>
    %c0 = stablehlo.multiply %arg0, %b0 : tensor<4x8xf32>
    %c1 = stablehlo.multiply %arg1, %b0 : tensor<4x8xf32>
    %c2 = stablehlo.multiply %arg2, %b1 : tensor<6xf32>
    return %c0, %c1, %c2 : tensor<4x8xf32>, tensor<4x8xf32>, tensor<6xf32>
  }
}

// -----

// A sum of squares of a tensor scaled by another's norm (adafactor clips each update by its RMS; an optax chain
// may take a norm after scaling by one) depends on that other sum: the two have the same type and layout but
// are not batched, which would make a cycle; each keeps its own reduction.
// CHECK-LABEL: module @dependent_norms
// CHECK:         %[[S0:.*]] = stablehlo.reduce(%{{.*}} init: %{{.*}}) applies stablehlo.add across dimensions = [0, 1]
// CHECK:         %[[B:.*]] = stablehlo.broadcast_in_dim %[[S0]]
// CHECK:         %[[Y:.*]] = stablehlo.multiply %arg1, %[[B]]
// CHECK:         %[[SQ:.*]] = stablehlo.multiply %[[Y]], %[[Y]]
// CHECK:         stablehlo.reduce(%[[SQ]] init: %{{.*}}) applies stablehlo.add across dimensions = [0, 1]
// CHECK:         return
module @dependent_norms {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>},
                         %arg1: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>})
      -> (tensor<f32>, tensor<f32>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %0 = stablehlo.multiply %arg0, %arg0 : tensor<4x8xf32>
    %1 = stablehlo.reduce(%0 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<4x8xf32>, tensor<f32>) -> tensor<f32>
    %2 = stablehlo.broadcast_in_dim %1, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %3 = stablehlo.multiply %arg1, %2 : tensor<4x8xf32>
    %4 = stablehlo.multiply %3, %3 : tensor<4x8xf32>
    %5 = stablehlo.reduce(%4 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<4x8xf32>, tensor<f32>) -> tensor<f32>
    return %1, %5 : tensor<f32>, tensor<f32>
  }
}

// -----

// The packed_gradient case with the two members' sums marked by lower-to-kernels (`shardopt.fixed_order_pack`: a
// pack the kernel path lowers, left StableHLO here): the packed sum is spelled out in the fixed order of
// fixed_order_norm.py, the order of the kernel path's shardopt_sumsq. 14 elements take W = 16 lanes and no whole
// row, so the tail padded to 16 lanes is squared, then halved 16 -> 1.
// CHECK-LABEL: module @packed_gradient_fixed_order
// CHECK:         %[[G1:.*]] = stablehlo.reshape %arg1 : (tensor<2x3xf32>) -> tensor<6xf32>
// CHECK:         %[[PACKED:.*]] = stablehlo.concatenate %arg0, %[[G1]], dim = 0 : (tensor<8xf32>, tensor<6xf32>) -> tensor<14xf32>
// CHECK:         %[[ZERO:.*]] = stablehlo.constant dense<0.000000e+00> : tensor<f32>
// CHECK-NOT:     stablehlo.while
// CHECK:         %[[TAIL:.*]] = stablehlo.slice %[[PACKED]] [0:14]
// CHECK:         %[[PAD:.*]] = stablehlo.pad %[[TAIL]], %{{.*}}, low = [0], high = [2], interior = [0] : (tensor<14xf32>, tensor<f32>) -> tensor<16xf32>
// CHECK:         %[[SQ:.*]] = stablehlo.multiply %[[PAD]], %[[PAD]] : tensor<16xf32>
// CHECK:         %[[ACC:.*]] = stablehlo.add %{{.*}}, %[[SQ]] : tensor<16xf32>
// CHECK:         %[[LO:.*]] = stablehlo.slice %[[ACC]] [0:8]
// CHECK:         %[[HI:.*]] = stablehlo.slice %[[ACC]] [8:16]
// CHECK:         stablehlo.add %[[LO]], %[[HI]] : tensor<8xf32>
// CHECK:         %[[LAST:.*]] = stablehlo.add %{{.*}}, %{{.*}} : tensor<1xf32>
// CHECK:         %[[SUM:.*]] = stablehlo.reshape %[[LAST]] {shardopt.fixed_order_norm} : (tensor<1xf32>) -> tensor<f32>
// CHECK-NOT:     stablehlo.multiply %arg0, %arg0
// CHECK-NOT:     stablehlo.multiply %arg1, %arg1
// CHECK:         stablehlo.divide %[[SUM]]
// CHECK:         stablehlo.divide %[[ZERO]]
// CHECK:         stablehlo.reduce(%{{.*}} init: %{{.*}}) applies stablehlo.add across dimensions = [0] : (tensor<3xf32>, tensor<f32>) -> tensor<f32>
// CHECK:         return
module @packed_gradient_fixed_order {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(%arg0: tensor<8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>},
                         %arg1: tensor<2x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>},
                         %arg2: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {"model"}]>})
      -> (tensor<14xf32>, tensor<4x8xf32>) {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %two = stablehlo.constant dense<2.000000e+00> : tensor<f32>
    %one = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %g1 = stablehlo.reshape %arg1 : (tensor<2x3xf32>) -> tensor<6xf32>
    %packed = stablehlo.concatenate %arg0, %g1, dim = 0 : (tensor<8xf32>, tensor<6xf32>) -> tensor<14xf32>
    %0 = stablehlo.multiply %arg0, %arg0 : tensor<8xf32>
    %1 = stablehlo.reduce(%0 init: %zero) applies stablehlo.add across dimensions = [0] {shardopt.fixed_order_pack} : (tensor<8xf32>, tensor<f32>) -> tensor<f32>
    %2 = stablehlo.divide %1, %two : tensor<f32>
    %3 = stablehlo.multiply %arg1, %arg1 : tensor<2x3xf32>
    %4 = stablehlo.reduce(%3 init: %zero) applies stablehlo.add across dimensions = [0, 1] {shardopt.fixed_order_pack} : (tensor<2x3xf32>, tensor<f32>) -> tensor<f32>
    %5 = stablehlo.divide %4, %two : tensor<f32>
    %6 = stablehlo.multiply %arg2, %arg2 : tensor<4x8xf32>
    %7 = stablehlo.reduce(%6 init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<4x8xf32>, tensor<f32>) -> tensor<f32>
    %8 = stablehlo.divide %7, %two : tensor<f32>
    %9 = stablehlo.add %2, %5 : tensor<f32>
    %10 = stablehlo.add %9, %8 : tensor<f32>
    %11 = stablehlo.multiply %10, %two : tensor<f32>
    %12 = stablehlo.sqrt %11 : tensor<f32>
    %13 = stablehlo.divide %one, %12 : tensor<f32>
    %14 = stablehlo.minimum %13, %one : tensor<f32>
    %b14 = stablehlo.broadcast_in_dim %14, dims = [] : (tensor<f32>) -> tensor<14xf32>
    %b48 = stablehlo.broadcast_in_dim %14, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %c0 = stablehlo.multiply %packed, %b14 : tensor<14xf32>
    %c2 = stablehlo.multiply %arg2, %b48 : tensor<4x8xf32>
    return %c0, %c2 : tensor<14xf32>, tensor<4x8xf32>
  }
}
