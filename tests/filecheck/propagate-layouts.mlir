// RUN: python -m shardopt.opt -p propagate-layouts %s --split-input-file | filecheck %s
// RUN: python -m shardopt.opt -p 'propagate-layouts{shard-state-over=batch}' %s --split-input-file | filecheck %s --check-prefix=STATE
// RUN: python -m shardopt.opt -p 'propagate-layouts{shard-state-over=batch,scatter-gradients=true}' %s --split-input-file | filecheck %s --check-prefix=SCATTER

// `propagate-layouts`, each chunk between separator lines on its own (tests/test_filecheck.py runs the RUN
// lines; tests/test_pass_propagate_layouts.py checks the statistics): every argument and result of @main gets a
// closed Shardy sharding. Slots and gradients follow their variable (`shardopt.owner`), other arguments without
// a layout are replicated, and results take the layout of the state they replace.

// w is sharded on dim 0 over "model"; its slot m/w arrives open ({?}) and its gradient without a sharding;
// b is replicated, its slot has no sharding; the learning rate is a scalar. No result has a sharding.
// CHECK-LABEL: module @slots_follow_variables
// CHECK:       func.func public @main(
// CHECK-SAME:    %arg0: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "w",
// CHECK-SAME:    %arg1: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "m/w",
// CHECK-SAME:    %arg2: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "grad/w",
// CHECK-SAME:    %arg3: tensor<6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "b",
// CHECK-SAME:    %arg4: tensor<6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "m/b",
// CHECK-SAME:    %arg5: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "learning_rate",
// CHECK-SAME:    -> (tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "w",
// CHECK-SAME:    tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "m/w",
// CHECK-SAME:    tensor<6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "b",
// CHECK-SAME:    tensor<6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "m/b",
// CHECK-NOT:   ?}
// CHECK:         return
// With `shard-state-over=batch` (weight-update sharding for every variable): m/w is split over "batch" as well, on
// dim 0 after "model" (8 = 4 x 2), and b's slot on its only dimension; the variables and gradients keep their
// layouts, and each new variable is pinned to its state's layout before it is returned (then all-gathered).
// STATE-LABEL: module @slots_follow_variables
// STATE:         %arg0: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "w",
// STATE-SAME:    %arg1: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model", "batch"}, {}]>, shardopt.name = "m/w",
// STATE-SAME:    %arg2: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "grad/w",
// STATE-SAME:    %arg4: tensor<6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}]>, shardopt.name = "m/b",
// STATE-SAME:    -> (tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "w",
// STATE-SAME:    tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model", "batch"}, {}]>, shardopt.name = "m/w",
// STATE-SAME:    tensor<6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "b",
// STATE-SAME:    tensor<6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}]>, shardopt.name = "m/b",
// STATE:         %[[W:.+]] = sdy.sharding_constraint %{{.+}} <@mesh, [{"model", "batch"}, {}]> : tensor<8x4xf32>
// STATE:         %[[B:.+]] = sdy.sharding_constraint %arg3 <@mesh, [{"batch"}]> : tensor<6xf32>
// STATE:         return %[[W]], %{{.+}}, %[[B]],
// With `scatter-gradients=true` as well (`compile(..., scatter_gradients=True)`): grad/w arrives reduce-scattered,
// in m/w's layout, not w's.
// SCATTER-LABEL: module @slots_follow_variables
// SCATTER:         %arg1: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model", "batch"}, {}]>, shardopt.name = "m/w",
// SCATTER-SAME:    %arg2: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model", "batch"}, {}]>, shardopt.name = "grad/w",
module @slots_follow_variables {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(
      %arg0: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.name = "w", shardopt.role = "variable"},
      %arg1: tensor<8x4xf32> {sdy.sharding = #sdy.sharding<@mesh, [{?}, {?}]>, shardopt.name = "m/w", shardopt.owner = "w", shardopt.role = "slot", shardopt.slot = "m"},
      %arg2: tensor<8x4xf32> {shardopt.name = "grad/w", shardopt.owner = "w", shardopt.role = "gradient"},
      %arg3: tensor<6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "b", shardopt.role = "variable"},
      %arg4: tensor<6xf32> {shardopt.name = "m/b", shardopt.owner = "b", shardopt.role = "slot", shardopt.slot = "m"},
      %arg5: tensor<f32> {shardopt.name = "learning_rate", shardopt.role = "hyperparameter"})
      -> (tensor<8x4xf32> {shardopt.name = "w", shardopt.role = "variable"},
          tensor<8x4xf32> {shardopt.name = "m/w", shardopt.owner = "w", shardopt.role = "slot", shardopt.slot = "m"},
          tensor<6xf32> {shardopt.name = "b", shardopt.role = "variable"},
          tensor<6xf32> {shardopt.name = "m/b", shardopt.owner = "b", shardopt.role = "slot", shardopt.slot = "m"}) {
    %0 = stablehlo.add %arg1, %arg2 : tensor<8x4xf32>
    %1 = stablehlo.broadcast_in_dim %arg5, dims = [] : (tensor<f32>) -> tensor<8x4xf32>
    %2 = stablehlo.multiply %1, %0 : tensor<8x4xf32>
    %3 = stablehlo.subtract %arg0, %2 : tensor<8x4xf32>
    %4 = stablehlo.add %arg4, %arg3 : tensor<6xf32>
    return %3, %0, %arg3, %4 : tensor<8x4xf32>, tensor<8x4xf32>, tensor<6xf32>, tensor<6xf32>
  }
}

// -----

// Weight-update sharding asked per variable by the frontend (`shardopt.shard_state_over`, from the step
// contract), with no pass option: w's slot is split over "batch" on dim 0, the first dimension divisible by 2;
// b (3 elements) has no such dimension and is not required, so its slot stays replicated (`state_fallback`).
// CHECK-LABEL: module @state_sharded_per_variable
// CHECK:         %arg0: tensor<8x6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "w",
// CHECK-SAME:    %arg1: tensor<8x6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {}]>, shardopt.name = "m/w",
// CHECK-SAME:    %arg2: tensor<8x6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "grad/w",
// CHECK-SAME:    %arg4: tensor<3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "m/b",
// CHECK-SAME:    -> (tensor<8x6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "w",
// CHECK-SAME:    tensor<8x6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {}]>, shardopt.name = "m/w",
// CHECK:         %[[W:.+]] = sdy.sharding_constraint %{{.+}} <@mesh, [{"batch"}, {}]> : tensor<8x6xf32>
// CHECK-NOT:     sdy.sharding_constraint
// CHECK:         return %[[W]],
// The frontend pins a gradient to its variable's layout; the state's layout replaces it, and a variable whose
// state is not sharded (b) would keep its own.
// SCATTER-LABEL: module @state_sharded_per_variable
// SCATTER:         %arg2: tensor<8x6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"batch"}, {}]>, shardopt.name = "grad/w",
module @state_sharded_per_variable {
  sdy.mesh @mesh = <["batch"=2, "model"=4]>
  func.func public @main(
      %arg0: tensor<8x6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "w", shardopt.role = "variable", shardopt.shard_state_over = ["batch"]},
      %arg1: tensor<8x6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{?}, {?}]>, shardopt.name = "m/w", shardopt.owner = "w", shardopt.role = "slot", shardopt.slot = "m"},
      %arg2: tensor<8x6xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.name = "grad/w", shardopt.owner = "w", shardopt.role = "gradient"},
      %arg3: tensor<3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "b", shardopt.role = "variable", shardopt.shard_state_over = ["batch"]},
      %arg4: tensor<3xf32> {shardopt.name = "m/b", shardopt.owner = "b", shardopt.role = "slot", shardopt.slot = "m"})
      -> (tensor<8x6xf32> {shardopt.name = "w", shardopt.role = "variable"},
          tensor<8x6xf32> {shardopt.name = "m/w", shardopt.owner = "w", shardopt.role = "slot", shardopt.slot = "m"},
          tensor<3xf32> {shardopt.name = "b", shardopt.role = "variable"},
          tensor<3xf32> {shardopt.name = "m/b", shardopt.owner = "b", shardopt.role = "slot", shardopt.slot = "m"}) {
    %0 = stablehlo.add %arg1, %arg2 : tensor<8x6xf32>
    %1 = stablehlo.subtract %arg0, %0 : tensor<8x6xf32>
    %2 = stablehlo.add %arg4, %arg3 : tensor<3xf32>
    return %1, %0, %arg3, %2 : tensor<8x6xf32>, tensor<8x6xf32>, tensor<3xf32>, tensor<3xf32>
  }
}
