// RUN: python -m shardopt.opt -p "lower-to-kernels{assume-available=true}" %s --split-input-file | filecheck %s
// RUN: python -m shardopt.opt -p "lower-to-kernels{enabled=false}" %s --split-input-file | filecheck %s --check-prefix=INLINE

// `lower-to-kernels`, each chunk between separator lines on its own (tests/test_pass_lower_to_kernels.py runs the
// same chunks in-process and checks the statistics). The frontend marks the update of each variable kept in
// buffers of its own as `stablehlo.composite "shardopt.adam"` (var, grad, lr, t, m, v); the pass replaces it by
// the compiled kernel's custom call (`assume-available` emits it even where this process has no library), with
// alpha = lr * sqrt(1 - b2^t) / (1 - b1^t) computed beside it, or inlines the decomposition.

// A float32 variable: one custom call updating p, m, v in place (results alias operands 0, 1, 2); its gradient
// is the argument; the scalars are Adam's float32 constants.
// CHECK-LABEL: module @adam_f32
// CHECK-NOT:     stablehlo.composite
// CHECK:         %[[T:.*]] = stablehlo.convert %{{.*}} : (tensor<i32>) -> tensor<f32>
// CHECK:         %[[B1:.*]] = stablehlo.constant dense<0.899999976> : tensor<f32>
// CHECK-NEXT:    stablehlo.power %[[B1]], %[[T]] : tensor<f32>
// CHECK-NEXT:    %[[B2:.*]] = stablehlo.constant dense<9.990000e-01> : tensor<f32>
// CHECK-NEXT:    stablehlo.power %[[B2]], %[[T]] : tensor<f32>
// CHECK:         %[[ALPHA:.*]] = stablehlo.divide
// CHECK-NEXT:    %[[EPS:.*]] = stablehlo.constant dense<1.000000e-07> : tensor<f32>
// CHECK:         %[[K:.*]]:3 = stablehlo.custom_call @shardopt_adam_update(%arg0, %arg2, %arg3, %[[ALPHA]], %[[EPS]], %arg1)
// CHECK-SAME:      mhlo.backend_config = {amsgrad = false, has_scale = false, has_weight_decay = false, one_minus_beta_1 = 1.000000e-01 : f32, one_minus_beta_2 = 1.000000e-03 : f32, scale_contracted = false, weight_decay = 0.000000e+00 : f32}
// CHECK-SAME:      output_operand_aliases = [#stablehlo.output_operand_alias<output_tuple_indices = [0], operand_index = 0, operand_tuple_indices = []>, #stablehlo.output_operand_alias<output_tuple_indices = [1], operand_index = 1, operand_tuple_indices = []>, #stablehlo.output_operand_alias<output_tuple_indices = [2], operand_index = 2, operand_tuple_indices = []>]
// CHECK:         return %[[K]]#0, %[[K]]#1, %[[K]]#2
// INLINE-LABEL: module @adam_f32
// INLINE:         func.func public @main
// INLINE-NOT:     stablehlo.custom_call
// INLINE:         stablehlo.power
// INLINE-NOT:     stablehlo.custom_call
// INLINE:         %[[P:.*]] = stablehlo.subtract %arg0, %{{.*}} : tensor<4x8xf32>
// INLINE-NEXT:    return %[[P]]
module @adam_f32 {
  sdy.mesh @mesh = <["replica"=1]>
  func.func public @main(%arg0: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}, {}]>, shardopt.role = "variable", tf.aliasing_output = 0 : i32}, %arg1: tensor<4x8xf32> {shardopt.role = "gradient"}, %arg2: tensor<4x8xf32> {shardopt.role = "slot", tf.aliasing_output = 1 : i32}, %arg3: tensor<4x8xf32> {shardopt.role = "slot", tf.aliasing_output = 2 : i32}, %arg4: tensor<i32>, %arg5: tensor<f32>) -> (tensor<4x8xf32>, tensor<4x8xf32>, tensor<4x8xf32>) {
    %c = stablehlo.constant dense<1> : tensor<i32>
    %0 = stablehlo.add %arg4, %c : tensor<i32>
    %1 = stablehlo.convert %0 : (tensor<i32>) -> tensor<f32>
    %2:3 = stablehlo.composite "shardopt.adam" %arg0, %arg1, %arg5, %1, %arg2, %arg3 {composite_attributes = {amsgrad = false, beta_1 = 9.000000e-01 : f64, beta_2 = 0.99899999999999999 : f64, epsilon = 9.9999999999999995E-8 : f64, has_weight_decay = false, slots = "m,v", weight_decay = 0.000000e+00 : f64}, decomposition = @shardopt.adam} : (tensor<4x8xf32>, tensor<4x8xf32>, tensor<f32>, tensor<f32>, tensor<4x8xf32>, tensor<4x8xf32>) -> (tensor<4x8xf32>, tensor<4x8xf32>, tensor<4x8xf32>)
    return %2#0, %2#1, %2#2 : tensor<4x8xf32>, tensor<4x8xf32>, tensor<4x8xf32>
  }
  func.func private @shardopt.adam(%arg0: tensor<4x8xf32>, %arg1: tensor<4x8xf32>, %arg2: tensor<f32>, %arg3: tensor<f32>, %arg4: tensor<4x8xf32>, %arg5: tensor<4x8xf32>) -> (tensor<4x8xf32>, tensor<4x8xf32>, tensor<4x8xf32>) {
    %cst = stablehlo.constant dense<1.000000e-07> : tensor<f32>
    %cst_0 = stablehlo.constant dense<1.000000e-03> : tensor<f32>
    %cst_1 = stablehlo.constant dense<1.000000e-01> : tensor<f32>
    %cst_2 = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %cst_3 = stablehlo.constant dense<9.990000e-01> : tensor<f32>
    %cst_4 = stablehlo.constant dense<0.899999976> : tensor<f32>
    %0 = stablehlo.power %cst_4, %arg3 : tensor<f32>
    %1 = stablehlo.power %cst_3, %arg3 : tensor<f32>
    %2 = stablehlo.subtract %cst_2, %1 : tensor<f32>
    %3 = stablehlo.sqrt %2 : tensor<f32>
    %4 = stablehlo.multiply %arg2, %3 : tensor<f32>
    %5 = stablehlo.subtract %cst_2, %0 : tensor<f32>
    %6 = stablehlo.divide %4, %5 : tensor<f32>
    %7 = stablehlo.subtract %arg1, %arg4 : tensor<4x8xf32>
    %8 = stablehlo.broadcast_in_dim %cst_1, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %9 = stablehlo.multiply %7, %8 : tensor<4x8xf32>
    %10 = stablehlo.add %arg4, %9 : tensor<4x8xf32>
    %11 = stablehlo.multiply %arg1, %arg1 : tensor<4x8xf32>
    %12 = stablehlo.subtract %11, %arg5 : tensor<4x8xf32>
    %13 = stablehlo.broadcast_in_dim %cst_0, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %14 = stablehlo.multiply %12, %13 : tensor<4x8xf32>
    %15 = stablehlo.add %arg5, %14 : tensor<4x8xf32>
    %16 = stablehlo.broadcast_in_dim %6, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %17 = stablehlo.multiply %10, %16 : tensor<4x8xf32>
    %18 = stablehlo.sqrt %15 : tensor<4x8xf32>
    %19 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %20 = stablehlo.add %18, %19 : tensor<4x8xf32>
    %21 = stablehlo.divide %17, %20 : tensor<4x8xf32>
    %22 = stablehlo.subtract %arg0, %21 : tensor<4x8xf32>
    return %22, %10, %15 : tensor<4x8xf32>, tensor<4x8xf32>, tensor<4x8xf32>
  }
}
// -----

// A bfloat16 variable with a global-norm clip scale: the kernel reads the bfloat16 gradient argument (not its
// float32 convert) and the scale (not the scaled gradient), contracted as XLA contracts it.
// CHECK-LABEL: module @adam_bf16_clipped
// CHECK:         %[[K:.*]]:3 = stablehlo.custom_call @shardopt_adam_update(%arg0, %arg2, %arg3, %{{.*}}, %{{.*}}, %arg6, %arg1)
// CHECK-SAME:      has_scale = true
// CHECK-SAME:      scale_contracted = true
// CHECK-SAME:      (tensor<4x8xbf16>, tensor<4x8xbf16>, tensor<4x8xbf16>, tensor<f32>, tensor<f32>, tensor<f32>, tensor<4x8xbf16>) -> (tensor<4x8xbf16>, tensor<4x8xbf16>, tensor<4x8xbf16>)
// CHECK:         return %[[K]]#0, %[[K]]#1, %[[K]]#2
// INLINE-LABEL: module @adam_bf16_clipped
// INLINE:         func.func public @main
// INLINE-NOT:     stablehlo.custom_call
// INLINE:         %[[G:.*]] = stablehlo.convert %arg1 : (tensor<4x8xbf16>) -> tensor<4x8xf32>
// INLINE:         stablehlo.multiply %[[G]], %{{.*}} : tensor<4x8xf32>
// INLINE:         stablehlo.convert %{{.*}} : (tensor<4x8xf32>) -> tensor<4x8xbf16>
module @adam_bf16_clipped {
  sdy.mesh @mesh = <["replica"=1]>
  func.func public @main(%arg0: tensor<4x8xbf16>, %arg1: tensor<4x8xbf16>, %arg2: tensor<4x8xbf16>, %arg3: tensor<4x8xbf16>, %arg4: tensor<i32>, %arg5: tensor<f32>, %arg6: tensor<f32>) -> (tensor<4x8xbf16>, tensor<4x8xbf16>, tensor<4x8xbf16>) {
    %c = stablehlo.constant dense<1> : tensor<i32>
    %0 = stablehlo.convert %arg1 : (tensor<4x8xbf16>) -> tensor<4x8xf32>
    %1 = stablehlo.broadcast_in_dim %arg6, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %2 = stablehlo.multiply %0, %1 : tensor<4x8xf32>
    %3 = stablehlo.add %arg4, %c : tensor<i32>
    %4 = stablehlo.convert %3 : (tensor<i32>) -> tensor<f32>
    %5:3 = stablehlo.composite "shardopt.adam" %arg0, %2, %arg5, %4, %arg2, %arg3 {composite_attributes = {amsgrad = false, beta_1 = 9.000000e-01 : f64, beta_2 = 0.99899999999999999 : f64, epsilon = 9.9999999999999995E-8 : f64, has_weight_decay = false, slots = "m,v", weight_decay = 0.000000e+00 : f64}, decomposition = @shardopt.adam} : (tensor<4x8xbf16>, tensor<4x8xf32>, tensor<f32>, tensor<f32>, tensor<4x8xbf16>, tensor<4x8xbf16>) -> (tensor<4x8xbf16>, tensor<4x8xbf16>, tensor<4x8xbf16>)
    return %5#0, %5#1, %5#2 : tensor<4x8xbf16>, tensor<4x8xbf16>, tensor<4x8xbf16>
  }
  func.func private @shardopt.adam(%arg0: tensor<4x8xbf16>, %arg1: tensor<4x8xf32>, %arg2: tensor<f32>, %arg3: tensor<f32>, %arg4: tensor<4x8xbf16>, %arg5: tensor<4x8xbf16>) -> (tensor<4x8xbf16>, tensor<4x8xbf16>, tensor<4x8xbf16>) {
    %cst = stablehlo.constant dense<1.000000e-07> : tensor<f32>
    %cst_0 = stablehlo.constant dense<1.000000e-03> : tensor<f32>
    %cst_1 = stablehlo.constant dense<1.000000e-01> : tensor<f32>
    %cst_2 = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %cst_3 = stablehlo.constant dense<9.990000e-01> : tensor<f32>
    %cst_4 = stablehlo.constant dense<0.899999976> : tensor<f32>
    %0 = stablehlo.convert %arg0 : (tensor<4x8xbf16>) -> tensor<4x8xf32>
    %1 = stablehlo.convert %arg4 : (tensor<4x8xbf16>) -> tensor<4x8xf32>
    %2 = stablehlo.convert %arg5 : (tensor<4x8xbf16>) -> tensor<4x8xf32>
    %3 = stablehlo.power %cst_4, %arg3 : tensor<f32>
    %4 = stablehlo.power %cst_3, %arg3 : tensor<f32>
    %5 = stablehlo.subtract %cst_2, %4 : tensor<f32>
    %6 = stablehlo.sqrt %5 : tensor<f32>
    %7 = stablehlo.multiply %arg2, %6 : tensor<f32>
    %8 = stablehlo.subtract %cst_2, %3 : tensor<f32>
    %9 = stablehlo.divide %7, %8 : tensor<f32>
    %10 = stablehlo.subtract %arg1, %1 : tensor<4x8xf32>
    %11 = stablehlo.broadcast_in_dim %cst_1, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %12 = stablehlo.multiply %10, %11 : tensor<4x8xf32>
    %13 = stablehlo.add %1, %12 : tensor<4x8xf32>
    %14 = stablehlo.multiply %arg1, %arg1 : tensor<4x8xf32>
    %15 = stablehlo.subtract %14, %2 : tensor<4x8xf32>
    %16 = stablehlo.broadcast_in_dim %cst_0, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %17 = stablehlo.multiply %15, %16 : tensor<4x8xf32>
    %18 = stablehlo.add %2, %17 : tensor<4x8xf32>
    %19 = stablehlo.broadcast_in_dim %9, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %20 = stablehlo.multiply %13, %19 : tensor<4x8xf32>
    %21 = stablehlo.sqrt %18 : tensor<4x8xf32>
    %22 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %23 = stablehlo.add %21, %22 : tensor<4x8xf32>
    %24 = stablehlo.divide %20, %23 : tensor<4x8xf32>
    %25 = stablehlo.subtract %0, %24 : tensor<4x8xf32>
    %26 = stablehlo.convert %25 : (tensor<4x8xf32>) -> tensor<4x8xbf16>
    %27 = stablehlo.convert %13 : (tensor<4x8xf32>) -> tensor<4x8xbf16>
    %28 = stablehlo.convert %18 : (tensor<4x8xf32>) -> tensor<4x8xbf16>
    return %26, %27, %28 : tensor<4x8xbf16>, tensor<4x8xbf16>, tensor<4x8xbf16>
  }
}
// -----

// A variable sharded over a mesh axis of size 4 (its slots unannotated yet: propagate-layouts gives them the
// variable's layout later): the call runs per device inside a manual computation over every axis (kernel_regions.py).
// In-shardings are the variable's for the state and gradient, replicated for the scalars computed before the
// region; the body sees 1x8 local shards and the results alias them; out-shardings are the state's.
// CHECK-LABEL: module @sharded
// CHECK-NOT:     stablehlo.composite
// CHECK:         %[[ALPHA:.*]] = stablehlo.divide
// CHECK-NEXT:    %[[EPS:.*]] = stablehlo.constant dense<1.000000e-07> : tensor<f32>
// CHECK-NEXT:    %[[R:.*]]:3 = sdy.manual_computation(%arg0, %arg2, %arg3, %[[ALPHA]], %[[EPS]], %arg1)
// CHECK-SAME:      in_shardings=[<@mesh, [{"model"}, {}]>, <@mesh, [{"model"}, {}]>, <@mesh, [{"model"}, {}]>, <@mesh, []>, <@mesh, []>, <@mesh, [{"model"}, {}]>]
// CHECK-SAME:      out_shardings=[<@mesh, [{"model"}, {}]>, <@mesh, [{"model"}, {}]>, <@mesh, [{"model"}, {}]>] manual_axes={"model"}
// CHECK-SAME:      (%[[LP:.*]]: tensor<1x8xf32>, %[[LM:.*]]: tensor<1x8xf32>, %[[LV:.*]]: tensor<1x8xf32>, %[[LA:.*]]: tensor<f32>, %[[LE:.*]]: tensor<f32>, %[[LG:.*]]: tensor<1x8xf32>)
// CHECK-NEXT:      %[[K:.*]]:3 = stablehlo.custom_call @shardopt_adam_update(%[[LP]], %[[LM]], %[[LV]], %[[LA]], %[[LE]], %[[LG]])
// CHECK-SAME:        output_operand_aliases = [#stablehlo.output_operand_alias<output_tuple_indices = [0], operand_index = 0, operand_tuple_indices = []>, #stablehlo.output_operand_alias<output_tuple_indices = [1], operand_index = 1, operand_tuple_indices = []>, #stablehlo.output_operand_alias<output_tuple_indices = [2], operand_index = 2, operand_tuple_indices = []>]
// CHECK-SAME:        (tensor<1x8xf32>, tensor<1x8xf32>, tensor<1x8xf32>, tensor<f32>, tensor<f32>, tensor<1x8xf32>) -> (tensor<1x8xf32>, tensor<1x8xf32>, tensor<1x8xf32>)
// CHECK-NEXT:      sdy.return %[[K]]#0, %[[K]]#1, %[[K]]#2 : tensor<1x8xf32>, tensor<1x8xf32>, tensor<1x8xf32>
// CHECK-NEXT:    } : (tensor<4x8xf32>, tensor<4x8xf32>, tensor<4x8xf32>, tensor<f32>, tensor<f32>, tensor<4x8xf32>) -> (tensor<4x8xf32>, tensor<4x8xf32>, tensor<4x8xf32>)
// CHECK-NEXT:    return %[[R]]#0, %[[R]]#1, %[[R]]#2
// INLINE-LABEL: module @sharded
// INLINE-NOT:     stablehlo.composite
// INLINE-NOT:     sdy.manual_computation
module @sharded {
  sdy.mesh @mesh = <["model"=4]>
  func.func public @main(%arg0: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>}, %arg1: tensor<4x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>}, %arg2: tensor<4x8xf32>, %arg3: tensor<4x8xf32>, %arg4: tensor<f32>, %arg5: tensor<f32>) -> (tensor<4x8xf32>, tensor<4x8xf32>, tensor<4x8xf32>) {
    %0:3 = stablehlo.composite "shardopt.adam" %arg0, %arg1, %arg5, %arg4, %arg2, %arg3 {composite_attributes = {amsgrad = false, beta_1 = 9.000000e-01 : f64, beta_2 = 0.99899999999999999 : f64, epsilon = 9.9999999999999995E-8 : f64, has_weight_decay = false, slots = "m,v", weight_decay = 0.000000e+00 : f64}, decomposition = @shardopt.adam} : (tensor<4x8xf32>, tensor<4x8xf32>, tensor<f32>, tensor<f32>, tensor<4x8xf32>, tensor<4x8xf32>) -> (tensor<4x8xf32>, tensor<4x8xf32>, tensor<4x8xf32>)
    return %0#0, %0#1, %0#2 : tensor<4x8xf32>, tensor<4x8xf32>, tensor<4x8xf32>
  }
  func.func private @shardopt.adam(%arg0: tensor<4x8xf32>, %arg1: tensor<4x8xf32>, %arg2: tensor<f32>, %arg3: tensor<f32>, %arg4: tensor<4x8xf32>, %arg5: tensor<4x8xf32>) -> (tensor<4x8xf32>, tensor<4x8xf32>, tensor<4x8xf32>) {
    %cst = stablehlo.constant dense<1.000000e-07> : tensor<f32>
    %cst_0 = stablehlo.constant dense<1.000000e-03> : tensor<f32>
    %cst_1 = stablehlo.constant dense<1.000000e-01> : tensor<f32>
    %cst_2 = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %cst_3 = stablehlo.constant dense<9.990000e-01> : tensor<f32>
    %cst_4 = stablehlo.constant dense<0.899999976> : tensor<f32>
    %0 = stablehlo.power %cst_4, %arg3 : tensor<f32>
    %1 = stablehlo.power %cst_3, %arg3 : tensor<f32>
    %2 = stablehlo.subtract %cst_2, %1 : tensor<f32>
    %3 = stablehlo.sqrt %2 : tensor<f32>
    %4 = stablehlo.multiply %arg2, %3 : tensor<f32>
    %5 = stablehlo.subtract %cst_2, %0 : tensor<f32>
    %6 = stablehlo.divide %4, %5 : tensor<f32>
    %7 = stablehlo.subtract %arg1, %arg4 : tensor<4x8xf32>
    %8 = stablehlo.broadcast_in_dim %cst_1, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %9 = stablehlo.multiply %7, %8 : tensor<4x8xf32>
    %10 = stablehlo.add %arg4, %9 : tensor<4x8xf32>
    %11 = stablehlo.multiply %arg1, %arg1 : tensor<4x8xf32>
    %12 = stablehlo.subtract %11, %arg5 : tensor<4x8xf32>
    %13 = stablehlo.broadcast_in_dim %cst_0, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %14 = stablehlo.multiply %12, %13 : tensor<4x8xf32>
    %15 = stablehlo.add %arg5, %14 : tensor<4x8xf32>
    %16 = stablehlo.broadcast_in_dim %6, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %17 = stablehlo.multiply %10, %16 : tensor<4x8xf32>
    %18 = stablehlo.sqrt %15 : tensor<4x8xf32>
    %19 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %20 = stablehlo.add %18, %19 : tensor<4x8xf32>
    %21 = stablehlo.divide %17, %20 : tensor<4x8xf32>
    %22 = stablehlo.subtract %arg0, %21 : tensor<4x8xf32>
    return %22, %10, %15 : tensor<4x8xf32>, tensor<4x8xf32>, tensor<4x8xf32>
  }
}
// -----

// A pack of rows sharded on dim 0 (core/packing.py: slots [S, N/S], row k = device k's blocks of the members in
// order) on a 2x2 mesh: one pack call per device, on local rows (1x7 = the 2x3 and 1-element local shards of the
// members), replicated over "batch". (The decomposition here only passes its operands through: this chunk checks
// the region, not the math.)
// CHECK-LABEL: module @row_pack
// CHECK:         %[[R:.*]]:4 = sdy.manual_computation(%arg2, %arg3, %{{.*}}, %{{.*}}, %arg0, %arg1, %arg4, %arg5)
// CHECK-SAME:      in_shardings=[<@mesh, [{"model"}, {}]>, <@mesh, [{"model"}, {}]>, <@mesh, []>, <@mesh, []>, <@mesh, [{"model"}, {}]>, <@mesh, [{"model"}]>, <@mesh, [{"model"}, {}]>, <@mesh, [{"model"}]>]
// CHECK-SAME:      out_shardings=[<@mesh, [{"model"}, {}]>, <@mesh, [{"model"}, {}]>, <@mesh, [{"model"}, {}]>, <@mesh, [{"model"}]>] manual_axes={"batch", "model"}
// CHECK-SAME:      tensor<1x7xf32>, %{{.*}}: tensor<1x7xf32>, %{{.*}}: tensor<f32>, %{{.*}}: tensor<f32>, %{{.*}}: tensor<2x3xf32>, %{{.*}}: tensor<1xf32>, %{{.*}}: tensor<2x3xf32>, %{{.*}}: tensor<1xf32>)
// CHECK-NEXT:      stablehlo.custom_call @shardopt_adam_pack_update
// CHECK-SAME:        -> (tensor<1x7xf32>, tensor<1x7xf32>, tensor<2x3xf32>, tensor<1xf32>)
// CHECK:         return %[[R]]#2, %[[R]]#3, %[[R]]#0, %[[R]]#1
// INLINE-LABEL: module @row_pack
// INLINE-NOT:     sdy.manual_computation
// INLINE:         return %arg0, %arg1, %arg2, %arg3
module @row_pack {
  sdy.mesh @mesh = <["batch"=2, "model"=2]>
  func.func public @main(%arg0: tensor<4x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.role = "variable"}, %arg1: tensor<2xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>, shardopt.role = "variable"}, %arg2: tensor<2x7xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.role = "slot"}, %arg3: tensor<2x7xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>, shardopt.role = "slot"}, %arg4: tensor<4x3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>}, %arg5: tensor<2xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>}, %arg6: tensor<i32>, %arg7: tensor<f32>) -> (tensor<4x3xf32> {shardopt.role = "variable"}, tensor<2xf32> {shardopt.role = "variable"}, tensor<2x7xf32> {shardopt.role = "slot"}, tensor<2x7xf32> {shardopt.role = "slot"}) {
    %c = stablehlo.constant dense<1> : tensor<i32>
    %0 = stablehlo.add %arg6, %c : tensor<i32>
    %1 = stablehlo.convert %0 : (tensor<i32>) -> tensor<f32>
    %2:4 = stablehlo.composite "shardopt.adam_pack" %arg7, %1, %arg6, %arg2, %arg3, %arg0, %arg1, %arg4, %arg5 {composite_attributes = {amsgrad = false, beta_1 = 9.000000e-01 : f64, beta_2 = 0.99899999999999999 : f64, epsilon = 9.9999999999999995E-8 : f64, has_weight_decay = false, members = 2 : i64, pack = "@pack0/float32", slots = "m,v", weight_decay = 0.000000e+00 : f64}, decomposition = @shardopt.adam_pack} : (tensor<f32>, tensor<f32>, tensor<i32>, tensor<2x7xf32>, tensor<2x7xf32>, tensor<4x3xf32>, tensor<2xf32>, tensor<4x3xf32>, tensor<2xf32>) -> (tensor<2x7xf32>, tensor<2x7xf32>, tensor<4x3xf32>, tensor<2xf32>)
    return %2#2, %2#3, %2#0, %2#1 : tensor<4x3xf32>, tensor<2xf32>, tensor<2x7xf32>, tensor<2x7xf32>
  }
  func.func private @shardopt.adam_pack(%arg0: tensor<f32>, %arg1: tensor<f32>, %arg2: tensor<i32>, %arg3: tensor<2x7xf32>, %arg4: tensor<2x7xf32>, %arg5: tensor<4x3xf32>, %arg6: tensor<2xf32>, %arg7: tensor<4x3xf32>, %arg8: tensor<2xf32>) -> (tensor<2x7xf32>, tensor<2x7xf32>, tensor<4x3xf32>, tensor<2xf32>) {
    return %arg3, %arg4, %arg5, %arg6 : tensor<2x7xf32>, tensor<2x7xf32>, tensor<4x3xf32>, tensor<2xf32>
  }
}
// -----

// What cannot run per device stays StableHLO, the reason in the statistics: 6 rows do not split over 4 devices.
// CHECK-LABEL: module @not_divisible
// CHECK-NOT:     sdy.manual_computation
// CHECK-NOT:     stablehlo.custom_call
// CHECK:         return %arg1, %arg2, %arg0
// INLINE-LABEL: module @not_divisible
// INLINE:         return %arg1, %arg2, %arg0
module @not_divisible {
  sdy.mesh @mesh = <["model"=4]>
  func.func public @main(%arg0: tensor<6x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>}, %arg1: tensor<6x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>}, %arg2: tensor<6x8xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}, {}]>}, %arg3: tensor<6x8xf32>, %arg4: tensor<f32>, %arg5: tensor<f32>) -> (tensor<6x8xf32>, tensor<6x8xf32>, tensor<6x8xf32>) {
    %0:3 = stablehlo.composite "shardopt.adam" %arg0, %arg3, %arg5, %arg4, %arg1, %arg2 {composite_attributes = {amsgrad = false, beta_1 = 9.000000e-01 : f64, beta_2 = 0.99899999999999999 : f64, epsilon = 9.9999999999999995E-8 : f64, has_weight_decay = false, slots = "m,v", weight_decay = 0.000000e+00 : f64}, decomposition = @shardopt.adam} : (tensor<6x8xf32>, tensor<6x8xf32>, tensor<f32>, tensor<f32>, tensor<6x8xf32>, tensor<6x8xf32>) -> (tensor<6x8xf32>, tensor<6x8xf32>, tensor<6x8xf32>)
    return %0#0, %0#1, %0#2 : tensor<6x8xf32>, tensor<6x8xf32>, tensor<6x8xf32>
  }
  func.func private @shardopt.adam(%arg0: tensor<6x8xf32>, %arg1: tensor<6x8xf32>, %arg2: tensor<f32>, %arg3: tensor<f32>, %arg4: tensor<6x8xf32>, %arg5: tensor<6x8xf32>) -> (tensor<6x8xf32>, tensor<6x8xf32>, tensor<6x8xf32>) {
    return %arg4, %arg5, %arg0 : tensor<6x8xf32>, tensor<6x8xf32>, tensor<6x8xf32>
  }
}
// -----

// tf-keras SGD with Nesterov momentum and weight decay, its gradient scaled by a global-norm clip scale: one
// `shardopt_sgd_update` call updating p and m in place (results alias operands 0 and 1). Its scalars are the
// learning rate and the scale (the scaled gradient is never written); momentum and weight decay are float32
// attributes, and the scale is applied as the step computes it (`scale_float32`).
// CHECK-LABEL: module @sgd_nesterov_clipped
// CHECK-NOT:     stablehlo.composite
// CHECK:         %[[K:.*]]:2 = stablehlo.custom_call @shardopt_sgd_update(%arg0, %arg2, %arg4, %arg5, %arg1)
// CHECK-SAME:      mhlo.backend_config = {has_scale = true, has_weight_decay = true, momentum = 0.899999976 : f32, nesterov = true, scale_float32 = true, weight_decay = 0.00999999977 : f32}
// CHECK-SAME:      output_operand_aliases = [#stablehlo.output_operand_alias<output_tuple_indices = [0], operand_index = 0, operand_tuple_indices = []>, #stablehlo.output_operand_alias<output_tuple_indices = [1], operand_index = 1, operand_tuple_indices = []>]
// CHECK-SAME:      (tensor<4x8xf32>, tensor<4x8xf32>, tensor<f32>, tensor<f32>, tensor<4x8xf32>) -> (tensor<4x8xf32>, tensor<4x8xf32>)
// CHECK:         return %[[K]]#0, %[[K]]#1
// INLINE-LABEL: module @sgd_nesterov_clipped
// INLINE-NOT:     stablehlo.custom_call
// INLINE:         %[[G:.*]] = stablehlo.multiply %arg1, %{{.*}} : tensor<4x8xf32>
// INLINE:         stablehlo.negate %[[G]] : tensor<4x8xf32>
// INLINE:         %[[M:.*]] = stablehlo.add
// INLINE-NEXT:    stablehlo.multiply %[[M]]
// INLINE-NEXT:    stablehlo.add
// INLINE-NEXT:    %[[P:.*]] = stablehlo.add %{{.*}}, %{{.*}} : tensor<4x8xf32>
// INLINE-NEXT:    return %[[P]], %[[M]]
module @sgd_nesterov_clipped {
  sdy.mesh @mesh = <["replica"=1]>
  func.func public @main(%arg0: tensor<4x8xf32> {shardopt.role = "variable", tf.aliasing_output = 0 : i32}, %arg1: tensor<4x8xf32> {shardopt.role = "gradient"}, %arg2: tensor<4x8xf32> {shardopt.role = "slot", tf.aliasing_output = 1 : i32}, %arg3: tensor<i32>, %arg4: tensor<f32>, %arg5: tensor<f32>) -> (tensor<4x8xf32>, tensor<4x8xf32>) {
    %c = stablehlo.constant dense<1> : tensor<i32>
    %0 = stablehlo.broadcast_in_dim %arg5, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %1 = stablehlo.multiply %arg1, %0 : tensor<4x8xf32>
    %2 = stablehlo.add %arg3, %c : tensor<i32>
    %3 = stablehlo.convert %2 : (tensor<i32>) -> tensor<f32>
    %4:2 = stablehlo.composite "shardopt.sgd" %arg0, %1, %arg4, %3, %arg2 {composite_attributes = {has_weight_decay = true, momentum = 9.000000e-01 : f64, nesterov = true, slots = "m", weight_decay = 1.000000e-02 : f64}, decomposition = @shardopt.sgd} : (tensor<4x8xf32>, tensor<4x8xf32>, tensor<f32>, tensor<f32>, tensor<4x8xf32>) -> (tensor<4x8xf32>, tensor<4x8xf32>)
    return %4#0, %4#1 : tensor<4x8xf32>, tensor<4x8xf32>
  }
  func.func private @shardopt.sgd(%arg0: tensor<4x8xf32>, %arg1: tensor<4x8xf32>, %arg2: tensor<f32>, %arg3: tensor<f32>, %arg4: tensor<4x8xf32>) -> (tensor<4x8xf32>, tensor<4x8xf32>) {
    %cst = stablehlo.constant dense<0.899999976> : tensor<f32>
    %cst_0 = stablehlo.constant dense<0.00999999977> : tensor<f32>
    %0 = stablehlo.broadcast_in_dim %cst_0, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %1 = stablehlo.multiply %arg0, %0 : tensor<4x8xf32>
    %2 = stablehlo.broadcast_in_dim %arg2, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %3 = stablehlo.multiply %1, %2 : tensor<4x8xf32>
    %4 = stablehlo.subtract %arg0, %3 : tensor<4x8xf32>
    %5 = stablehlo.negate %arg1 : tensor<4x8xf32>
    %6 = stablehlo.multiply %5, %2 : tensor<4x8xf32>
    %7 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<4x8xf32>
    %8 = stablehlo.multiply %arg4, %7 : tensor<4x8xf32>
    %9 = stablehlo.add %6, %8 : tensor<4x8xf32>
    %10 = stablehlo.multiply %9, %7 : tensor<4x8xf32>
    %11 = stablehlo.add %6, %10 : tensor<4x8xf32>
    %12 = stablehlo.add %4, %11 : tensor<4x8xf32>
    return %12, %9 : tensor<4x8xf32>, tensor<4x8xf32>
  }
}
// -----

// A flat pack of two bfloat16 variables: one `shardopt_sgd_pack_update` call takes the packed m, then lr, then
// each member's own variable and its bfloat16 gradient argument (not the float32 converts); results are m and the
// variables, each aliasing its operand. The pack's gradient buffer is returned as it came in, so the gather of
// the gradients is dead.
// CHECK-LABEL: module @sgd_pack_bf16
// CHECK-NOT:     stablehlo.composite
// CHECK:         %[[K:.*]]:3 = stablehlo.custom_call @shardopt_sgd_pack_update(%arg4, %arg7, %arg0, %arg1, %arg2, %arg3)
// CHECK-SAME:      mhlo.backend_config = {has_scale = false, has_weight_decay = false, momentum = 0.899999976 : f32, nesterov = false, scale_float32 = false, weight_decay = 0.000000e+00 : f32}
// CHECK-SAME:      output_operand_aliases = [#stablehlo.output_operand_alias<output_tuple_indices = [0], operand_index = 0, operand_tuple_indices = []>, #stablehlo.output_operand_alias<output_tuple_indices = [1], operand_index = 2, operand_tuple_indices = []>, #stablehlo.output_operand_alias<output_tuple_indices = [2], operand_index = 3, operand_tuple_indices = []>]
// CHECK-SAME:      (tensor<8xbf16>, tensor<f32>, tensor<3xbf16>, tensor<5xbf16>, tensor<3xbf16>, tensor<5xbf16>) -> (tensor<8xbf16>, tensor<3xbf16>, tensor<5xbf16>)
// CHECK:         return %[[K]]#1, %[[K]]#2, %[[K]]#0, %arg5, %{{.*}}, %arg7
// INLINE-LABEL: module @sgd_pack_bf16
// INLINE-NOT:     stablehlo.custom_call
// INLINE:         stablehlo.slice %arg4 [0:3]
// INLINE:         %[[M:.*]] = stablehlo.concatenate %{{.*}}, %{{.*}}, dim = 0 : (tensor<3xbf16>, tensor<5xbf16>) -> tensor<8xbf16>
// INLINE:         %[[G:.*]] = stablehlo.concatenate %arg2, %arg3, dim = 0
// INLINE:         return %{{.*}}, %{{.*}}, %[[M]], %[[G]]
module @sgd_pack_bf16 {
  sdy.mesh @mesh = <["replica"=1]>
  func.func public @main(%arg0: tensor<3xbf16> {shardopt.role = "variable", tf.aliasing_output = 0 : i32}, %arg1: tensor<5xbf16> {shardopt.role = "variable", tf.aliasing_output = 1 : i32}, %arg2: tensor<3xbf16> {shardopt.role = "gradient"}, %arg3: tensor<5xbf16> {shardopt.role = "gradient"}, %arg4: tensor<8xbf16> {shardopt.pack = "@pack0/bfloat16", shardopt.role = "slot", tf.aliasing_output = 2 : i32}, %arg5: tensor<8xbf16> {shardopt.pack = "@pack0/bfloat16", shardopt.role = "gradient_buffer", tf.aliasing_output = 3 : i32}, %arg6: tensor<i32>, %arg7: tensor<f32>) -> (tensor<3xbf16>, tensor<5xbf16>, tensor<8xbf16>, tensor<8xbf16> {shardopt.pack = "@pack0/bfloat16", shardopt.role = "gradient_buffer"}, tensor<i32>, tensor<f32>) {
    %c = stablehlo.constant dense<1> : tensor<i32>
    %0 = stablehlo.convert %arg2 : (tensor<3xbf16>) -> tensor<3xf32>
    %1 = stablehlo.convert %arg3 : (tensor<5xbf16>) -> tensor<5xf32>
    %2 = stablehlo.add %arg6, %c : tensor<i32>
    %3 = stablehlo.convert %2 : (tensor<i32>) -> tensor<f32>
    %4:3 = stablehlo.composite "shardopt.sgd_pack" %arg7, %3, %arg6, %arg4, %arg0, %arg1, %0, %1 {composite_attributes = {has_weight_decay = false, members = 2 : i64, momentum = 9.000000e-01 : f64, nesterov = false, pack = "@pack0/bfloat16", slots = "m", weight_decay = 0.000000e+00 : f64}, decomposition = @shardopt.sgd_pack} : (tensor<f32>, tensor<f32>, tensor<i32>, tensor<8xbf16>, tensor<3xbf16>, tensor<5xbf16>, tensor<3xf32>, tensor<5xf32>) -> (tensor<8xbf16>, tensor<3xbf16>, tensor<5xbf16>)
    %5 = stablehlo.concatenate %arg2, %arg3, dim = 0 : (tensor<3xbf16>, tensor<5xbf16>) -> tensor<8xbf16>
    %6 = stablehlo.add %arg6, %c : tensor<i32>
    return %4#1, %4#2, %4#0, %5, %6, %arg7 : tensor<3xbf16>, tensor<5xbf16>, tensor<8xbf16>, tensor<8xbf16>, tensor<i32>, tensor<f32>
  }
  func.func private @shardopt.sgd_pack(%arg0: tensor<f32>, %arg1: tensor<f32>, %arg2: tensor<i32>, %arg3: tensor<8xbf16>, %arg4: tensor<3xbf16>, %arg5: tensor<5xbf16>, %arg6: tensor<3xf32>, %arg7: tensor<5xf32>) -> (tensor<8xbf16>, tensor<3xbf16>, tensor<5xbf16>) {
    %cst = stablehlo.constant dense<0.899999976> : tensor<f32>
    %0 = stablehlo.slice %arg3 [0:3] : (tensor<8xbf16>) -> tensor<3xbf16>
    %1 = stablehlo.convert %arg4 : (tensor<3xbf16>) -> tensor<3xf32>
    %2 = stablehlo.convert %0 : (tensor<3xbf16>) -> tensor<3xf32>
    %3 = stablehlo.negate %arg6 : tensor<3xf32>
    %4 = stablehlo.broadcast_in_dim %arg0, dims = [] : (tensor<f32>) -> tensor<3xf32>
    %5 = stablehlo.multiply %3, %4 : tensor<3xf32>
    %6 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<3xf32>
    %7 = stablehlo.multiply %2, %6 : tensor<3xf32>
    %8 = stablehlo.add %5, %7 : tensor<3xf32>
    %9 = stablehlo.add %1, %8 : tensor<3xf32>
    %10 = stablehlo.convert %8 : (tensor<3xf32>) -> tensor<3xbf16>
    %11 = stablehlo.convert %9 : (tensor<3xf32>) -> tensor<3xbf16>
    %12 = stablehlo.slice %arg3 [3:8] : (tensor<8xbf16>) -> tensor<5xbf16>
    %13 = stablehlo.convert %arg5 : (tensor<5xbf16>) -> tensor<5xf32>
    %14 = stablehlo.convert %12 : (tensor<5xbf16>) -> tensor<5xf32>
    %15 = stablehlo.negate %arg7 : tensor<5xf32>
    %16 = stablehlo.broadcast_in_dim %arg0, dims = [] : (tensor<f32>) -> tensor<5xf32>
    %17 = stablehlo.multiply %15, %16 : tensor<5xf32>
    %18 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<5xf32>
    %19 = stablehlo.multiply %14, %18 : tensor<5xf32>
    %20 = stablehlo.add %17, %19 : tensor<5xf32>
    %21 = stablehlo.add %13, %20 : tensor<5xf32>
    %22 = stablehlo.convert %20 : (tensor<5xf32>) -> tensor<5xbf16>
    %23 = stablehlo.convert %21 : (tensor<5xf32>) -> tensor<5xbf16>
    %24 = stablehlo.concatenate %10, %22, dim = 0 : (tensor<3xbf16>, tensor<5xbf16>) -> tensor<8xbf16>
    return %24, %11, %23 : tensor<8xbf16>, tensor<3xbf16>, tensor<5xbf16>
  }
}

// -----

// A flat pack whose members' gradients (f32[3], f32[2]) are the leaves of one global-norm add tree: the pack
// becomes one shardopt_adam_pack_update call and the two sums of squares one shardopt_sumsq call over the
// gradient arguments, in the fixed order fuse-clipping writes for the packed gradient on the portable path
// (fixed_order_norm.py); the second member's sum becomes +0, so the add tree is unchanged. Disabled, the pass
// marks the two sums (`shardopt.fixed_order_pack`) for fuse-clipping to sum the packed gradient in that order.
// CHECK-LABEL: module @pack_global_norm
// CHECK-NOT:     stablehlo.reduce
// CHECK:         %[[SUMSQ:.*]] = stablehlo.custom_call @shardopt_sumsq(%arg2, %arg3) {{{.*}}shardopt.fixed_order_norm} : (tensor<3xf32>, tensor<2xf32>) -> tensor<f32>
// CHECK:         %[[ZERO:.*]] = stablehlo.constant dense<0.000000e+00> : tensor<f32>
// CHECK:         stablehlo.divide %[[SUMSQ]], %{{.*}} : tensor<f32>
// CHECK:         stablehlo.divide %[[ZERO]], %{{.*}} : tensor<f32>
// CHECK-NOT:     stablehlo.reduce
// CHECK:         stablehlo.custom_call @shardopt_adam_pack_update(%arg4, %arg5, %{{.*}}, %{{.*}}, %{{.*}}, %arg0, %arg1, %arg2, %arg3)
// INLINE-LABEL: module @pack_global_norm
// INLINE-NOT:    shardopt_sumsq
// INLINE:        stablehlo.reduce(%{{.*}} init: %{{.*}}) applies stablehlo.add across dimensions = [0] {shardopt.fixed_order_pack} : (tensor<3xf32>, tensor<f32>) -> tensor<f32>
// INLINE:        stablehlo.reduce(%{{.*}} init: %{{.*}}) applies stablehlo.add across dimensions = [0] {shardopt.fixed_order_pack} : (tensor<2xf32>, tensor<f32>) -> tensor<f32>
// INLINE-NOT:    custom_call
module @pack_global_norm attributes {jax.uses_shape_polymorphism = false, mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  sdy.mesh @mesh = <["replica"=1]> {stablehlo.mesh = {axes = [{name = "replica", size = 1 : i64}]}}
  func.func public @main(%arg0: tensor<3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "w0", shardopt.role = "variable", tf.aliasing_output = 0 : i32}, %arg1: tensor<2xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "w1", shardopt.role = "variable", tf.aliasing_output = 1 : i32}, %arg2: tensor<3xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "grad/w0", shardopt.owner = "w0", shardopt.role = "gradient"}, %arg3: tensor<2xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "grad/w1", shardopt.owner = "w1", shardopt.role = "gradient"}, %arg4: tensor<5xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.members = ["w0", "w1"], shardopt.name = "m/@pack0/float32", shardopt.pack = "@pack0/float32", shardopt.role = "slot", shardopt.slot = "m", tf.aliasing_output = 2 : i32}, %arg5: tensor<5xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.members = ["w0", "w1"], shardopt.name = "v/@pack0/float32", shardopt.pack = "@pack0/float32", shardopt.role = "slot", shardopt.slot = "v", tf.aliasing_output = 3 : i32}, %arg6: tensor<5xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.members = ["w0", "w1"], shardopt.name = "gradient_buffer/@pack0/float32", shardopt.pack = "@pack0/float32", shardopt.role = "gradient_buffer", tf.aliasing_output = 4 : i32}, %arg7: tensor<i32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "iterations", shardopt.role = "counter", tf.aliasing_output = 5 : i32}, %arg8: tensor<f32> {sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "learning_rate", shardopt.role = "hyperparameter"}) -> (tensor<3xf32> {jax.result_info = "result[0]", sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "w0", shardopt.role = "variable"}, tensor<2xf32> {jax.result_info = "result[1]", sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "w1", shardopt.role = "variable"}, tensor<5xf32> {jax.result_info = "result[2]", sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.members = ["w0", "w1"], shardopt.name = "m/@pack0/float32", shardopt.pack = "@pack0/float32", shardopt.role = "slot", shardopt.slot = "m"}, tensor<5xf32> {jax.result_info = "result[3]", sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.members = ["w0", "w1"], shardopt.name = "v/@pack0/float32", shardopt.pack = "@pack0/float32", shardopt.role = "slot", shardopt.slot = "v"}, tensor<5xf32> {jax.result_info = "result[4]", sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.members = ["w0", "w1"], shardopt.name = "gradient_buffer/@pack0/float32", shardopt.pack = "@pack0/float32", shardopt.role = "gradient_buffer"}, tensor<i32> {jax.result_info = "result[5]", sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "iterations", shardopt.role = "counter"}, tensor<f32> {jax.result_info = "result[6]", sdy.sharding = #sdy.sharding<@mesh, []>, shardopt.name = "learning_rate", shardopt.role = "hyperparameter"}) {
    %c = stablehlo.constant dense<1> : tensor<i32>
    %cst = stablehlo.constant dense<5.000000e-01> : tensor<f32>
    %cst_0 = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %cst_1 = stablehlo.constant dense<2.000000e+00> : tensor<f32>
    %cst_2 = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %0 = stablehlo.multiply %arg2, %arg2 : tensor<3xf32>
    %1 = stablehlo.reduce(%0 init: %cst_2) applies stablehlo.add across dimensions = [0] : (tensor<3xf32>, tensor<f32>) -> tensor<f32>
    %2 = stablehlo.divide %1, %cst_1 : tensor<f32>
    %3 = stablehlo.multiply %arg3, %arg3 : tensor<2xf32>
    %4 = stablehlo.reduce(%3 init: %cst_2) applies stablehlo.add across dimensions = [0] : (tensor<2xf32>, tensor<f32>) -> tensor<f32>
    %5 = stablehlo.divide %4, %cst_1 : tensor<f32>
    %6 = stablehlo.add %2, %5 : tensor<f32>
    %7 = stablehlo.multiply %6, %cst_1 : tensor<f32>
    %8 = stablehlo.sqrt %7 : tensor<f32>
    %9 = stablehlo.divide %cst_0, %8 : tensor<f32>
    %10 = stablehlo.divide %cst_0, %cst : tensor<f32>
    %11 = stablehlo.minimum %9, %10 : tensor<f32>
    %12 = stablehlo.multiply %cst, %11 : tensor<f32>
    %13 = stablehlo.subtract %8, %8 : tensor<f32>
    %14 = stablehlo.add %12, %13 : tensor<f32>
    %15 = stablehlo.broadcast_in_dim %14, dims = [] : (tensor<f32>) -> tensor<3xf32>
    %16 = stablehlo.multiply %arg2, %15 : tensor<3xf32>
    %17 = stablehlo.broadcast_in_dim %14, dims = [] : (tensor<f32>) -> tensor<2xf32>
    %18 = stablehlo.multiply %arg3, %17 : tensor<2xf32>
    %19 = stablehlo.add %arg7, %c : tensor<i32>
    %20 = stablehlo.convert %19 : (tensor<i32>) -> tensor<f32>
    %21:4 = stablehlo.composite "shardopt.adam_pack" %arg8, %20, %arg7, %arg4, %arg5, %arg0, %arg1, %16, %18 {composite_attributes = {amsgrad = false, beta_1 = 9.000000e-01 : f64, beta_2 = 0.99899999999999999 : f64, epsilon = 9.9999999999999995E-8 : f64, has_weight_decay = false, members = 2 : i64, pack = "@pack0/float32", slots = "m,v", weight_decay = 0.000000e+00 : f64}, decomposition = @shardopt.adam_pack} : (tensor<f32>, tensor<f32>, tensor<i32>, tensor<5xf32>, tensor<5xf32>, tensor<3xf32>, tensor<2xf32>, tensor<3xf32>, tensor<2xf32>) -> (tensor<5xf32>, tensor<5xf32>, tensor<3xf32>, tensor<2xf32>)
    %22 = stablehlo.concatenate %arg2, %arg3, dim = 0 : (tensor<3xf32>, tensor<2xf32>) -> tensor<5xf32>
    %23 = stablehlo.add %arg7, %c : tensor<i32>
    return %21#2, %21#3, %21#0, %21#1, %22, %23, %arg8 : tensor<3xf32>, tensor<2xf32>, tensor<5xf32>, tensor<5xf32>, tensor<5xf32>, tensor<i32>, tensor<f32>
  }
  func.func private @shardopt.adam_pack(%arg0: tensor<f32>, %arg1: tensor<f32>, %arg2: tensor<i32>, %arg3: tensor<5xf32>, %arg4: tensor<5xf32>, %arg5: tensor<3xf32>, %arg6: tensor<2xf32>, %arg7: tensor<3xf32>, %arg8: tensor<2xf32>) -> (tensor<5xf32>, tensor<5xf32>, tensor<3xf32>, tensor<2xf32>) {
    %0 = stablehlo.slice %arg3 [0:3] : (tensor<5xf32>) -> tensor<3xf32>
    %1 = stablehlo.slice %arg4 [0:3] : (tensor<5xf32>) -> tensor<3xf32>
    %cst = stablehlo.constant dense<1.000000e-07> : tensor<f32>
    %cst_0 = stablehlo.constant dense<1.000000e-03> : tensor<f32>
    %cst_1 = stablehlo.constant dense<1.000000e-01> : tensor<f32>
    %cst_2 = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %cst_3 = stablehlo.constant dense<9.990000e-01> : tensor<f32>
    %cst_4 = stablehlo.constant dense<0.899999976> : tensor<f32>
    %2 = stablehlo.power %cst_4, %arg1 : tensor<f32>
    %3 = stablehlo.power %cst_3, %arg1 : tensor<f32>
    %4 = stablehlo.subtract %cst_2, %3 : tensor<f32>
    %5 = stablehlo.sqrt %4 : tensor<f32>
    %6 = stablehlo.multiply %arg0, %5 : tensor<f32>
    %7 = stablehlo.subtract %cst_2, %2 : tensor<f32>
    %8 = stablehlo.divide %6, %7 : tensor<f32>
    %9 = stablehlo.subtract %arg7, %0 : tensor<3xf32>
    %10 = stablehlo.broadcast_in_dim %cst_1, dims = [] : (tensor<f32>) -> tensor<3xf32>
    %11 = stablehlo.multiply %9, %10 : tensor<3xf32>
    %12 = stablehlo.add %0, %11 : tensor<3xf32>
    %13 = stablehlo.multiply %arg7, %arg7 : tensor<3xf32>
    %14 = stablehlo.subtract %13, %1 : tensor<3xf32>
    %15 = stablehlo.broadcast_in_dim %cst_0, dims = [] : (tensor<f32>) -> tensor<3xf32>
    %16 = stablehlo.multiply %14, %15 : tensor<3xf32>
    %17 = stablehlo.add %1, %16 : tensor<3xf32>
    %18 = stablehlo.broadcast_in_dim %8, dims = [] : (tensor<f32>) -> tensor<3xf32>
    %19 = stablehlo.multiply %12, %18 : tensor<3xf32>
    %20 = stablehlo.sqrt %17 : tensor<3xf32>
    %21 = stablehlo.broadcast_in_dim %cst, dims = [] : (tensor<f32>) -> tensor<3xf32>
    %22 = stablehlo.add %20, %21 : tensor<3xf32>
    %23 = stablehlo.divide %19, %22 : tensor<3xf32>
    %24 = stablehlo.subtract %arg5, %23 : tensor<3xf32>
    %25 = stablehlo.slice %arg3 [3:5] : (tensor<5xf32>) -> tensor<2xf32>
    %26 = stablehlo.slice %arg4 [3:5] : (tensor<5xf32>) -> tensor<2xf32>
    %cst_5 = stablehlo.constant dense<1.000000e-07> : tensor<f32>
    %cst_6 = stablehlo.constant dense<1.000000e-03> : tensor<f32>
    %cst_7 = stablehlo.constant dense<1.000000e-01> : tensor<f32>
    %cst_8 = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %cst_9 = stablehlo.constant dense<9.990000e-01> : tensor<f32>
    %cst_10 = stablehlo.constant dense<0.899999976> : tensor<f32>
    %27 = stablehlo.power %cst_10, %arg1 : tensor<f32>
    %28 = stablehlo.power %cst_9, %arg1 : tensor<f32>
    %29 = stablehlo.subtract %cst_8, %28 : tensor<f32>
    %30 = stablehlo.sqrt %29 : tensor<f32>
    %31 = stablehlo.multiply %arg0, %30 : tensor<f32>
    %32 = stablehlo.subtract %cst_8, %27 : tensor<f32>
    %33 = stablehlo.divide %31, %32 : tensor<f32>
    %34 = stablehlo.subtract %arg8, %25 : tensor<2xf32>
    %35 = stablehlo.broadcast_in_dim %cst_7, dims = [] : (tensor<f32>) -> tensor<2xf32>
    %36 = stablehlo.multiply %34, %35 : tensor<2xf32>
    %37 = stablehlo.add %25, %36 : tensor<2xf32>
    %38 = stablehlo.multiply %arg8, %arg8 : tensor<2xf32>
    %39 = stablehlo.subtract %38, %26 : tensor<2xf32>
    %40 = stablehlo.broadcast_in_dim %cst_6, dims = [] : (tensor<f32>) -> tensor<2xf32>
    %41 = stablehlo.multiply %39, %40 : tensor<2xf32>
    %42 = stablehlo.add %26, %41 : tensor<2xf32>
    %43 = stablehlo.broadcast_in_dim %33, dims = [] : (tensor<f32>) -> tensor<2xf32>
    %44 = stablehlo.multiply %37, %43 : tensor<2xf32>
    %45 = stablehlo.sqrt %42 : tensor<2xf32>
    %46 = stablehlo.broadcast_in_dim %cst_5, dims = [] : (tensor<f32>) -> tensor<2xf32>
    %47 = stablehlo.add %45, %46 : tensor<2xf32>
    %48 = stablehlo.divide %44, %47 : tensor<2xf32>
    %49 = stablehlo.subtract %arg6, %48 : tensor<2xf32>
    %50 = stablehlo.concatenate %12, %37, dim = 0 : (tensor<3xf32>, tensor<2xf32>) -> tensor<5xf32>
    %51 = stablehlo.concatenate %17, %42, dim = 0 : (tensor<3xf32>, tensor<2xf32>) -> tensor<5xf32>
    return %50, %51, %24, %49 : tensor<5xf32>, tensor<5xf32>, tensor<3xf32>, tensor<2xf32>
  }
}

// -----

// The sum of squares of a large replicated gradient kept in its own buffer (70,000 elements > norm-above): one
// shardopt_sumsq call over the gradient argument; with the pass disabled the same fixed order in StableHLO (the
// portable twin): 2^16 lanes, one whole row summed in a while loop over dynamic slices, the tail padded to 2^16
// lanes and added, then halved.
// CHECK-LABEL: module @loose_norm
// CHECK-NOT:     stablehlo.reduce
// CHECK:         %[[S:.*]] = stablehlo.custom_call @shardopt_sumsq(%arg0) {{{.*}}shardopt.fixed_order_norm} : (tensor<70000xf32>) -> tensor<f32>
// CHECK:         return %[[S]]
// INLINE-LABEL: module @loose_norm
// INLINE-NOT:    stablehlo.reduce
// INLINE:        stablehlo.while
// INLINE:        stablehlo.dynamic_slice %{{.*}}, %{{.*}}, sizes = [65536] : (tensor<70000xf32>, tensor<i64>) -> tensor<65536xf32>
// INLINE:        stablehlo.slice %{{.*}} [65536:70000]
// INLINE:        stablehlo.pad %{{.*}}, %{{.*}}, low = [0], high = [61072], interior = [0]
// INLINE:        %[[T:.*]] = stablehlo.reshape %{{.*}} {shardopt.fixed_order_norm} : (tensor<1xf32>) -> tensor<f32>
// INLINE:        return %[[T]]
module @loose_norm {
  sdy.mesh @mesh = <["replica"=1]>
  func.func public @main(%arg0: tensor<70000xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>, shardopt.name = "grad/w", shardopt.owner = "w", shardopt.role = "gradient"}) -> tensor<f32> {
    %zero = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %0 = stablehlo.multiply %arg0, %arg0 : tensor<70000xf32>
    %1 = stablehlo.reduce(%0 init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<70000xf32>, tensor<f32>) -> tensor<f32>
    return %1 : tensor<f32>
  }
}
