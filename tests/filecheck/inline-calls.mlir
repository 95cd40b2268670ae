// RUN: python -m shardopt.opt -p inline-calls %s --split-input-file | filecheck %s

// `inline-calls`, each chunk between separator lines on its own (tests/test_filecheck.py runs the RUN lines;
// tests/test_pass_inline_calls.py runs the same chunks in-process and checks the statistics). jax lowers some
// helpers (`jnp.where`, optax pieces) to private functions; the pass replaces every `func.call` by the callee's
// body. The callees stay (symbol-dce in `cleanup` removes them).

// One call to a private helper: its body replaces the call, the argument values are substituted.
// CHECK-LABEL: module @one_call
// CHECK:       func.func public @main(%arg0: tensor<4xf32>, %arg1: tensor<4xf32>) -> tensor<4xf32> {
// CHECK-NEXT:    %[[M:.*]] = stablehlo.multiply %arg0, %arg1 : tensor<4xf32>
// CHECK-NEXT:    %[[A:.*]] = stablehlo.add %[[M]], %arg0 : tensor<4xf32>
// CHECK-NEXT:    return %[[A]] : tensor<4xf32>
// CHECK:       func.func private @helper
module @one_call {
  func.func public @main(%arg0: tensor<4xf32>, %arg1: tensor<4xf32>) -> tensor<4xf32> {
    %0 = call @helper(%arg0, %arg1) : (tensor<4xf32>, tensor<4xf32>) -> tensor<4xf32>
    %1 = stablehlo.add %0, %arg0 : tensor<4xf32>
    return %1 : tensor<4xf32>
  }
  func.func private @helper(%a: tensor<4xf32>, %b: tensor<4xf32>) -> tensor<4xf32> {
    %0 = stablehlo.multiply %a, %b : tensor<4xf32>
    return %0 : tensor<4xf32>
  }
}

// -----

// Two calls of a helper that itself calls `_where` (optax's shape): every call in every function goes, each
// call site gets its own copy, and the copies read their own operands.
// CHECK-LABEL: module @nested_calls
// CHECK-NOT:     call @
// CHECK:         %[[ABS0:.*]] = stablehlo.abs %arg0 : tensor<4xf32>
// CHECK:         %[[P0:.*]] = stablehlo.broadcast_in_dim %arg1, dims = [] : (tensor<i1>) -> tensor<4xi1>
// CHECK:         %[[W0:.*]] = stablehlo.select %[[P0]], %[[ABS0]], %arg0 : tensor<4xi1>, tensor<4xf32>
// CHECK:         %[[NEG:.*]] = stablehlo.negate %arg0 : tensor<4xf32>
// CHECK:         %[[ABS1:.*]] = stablehlo.abs %[[NEG]] : tensor<4xf32>
// CHECK:         %[[P1:.*]] = stablehlo.broadcast_in_dim %arg1, dims = [] : (tensor<i1>) -> tensor<4xi1>
// CHECK:         %[[W1:.*]] = stablehlo.select %[[P1]], %[[ABS1]], %[[NEG]] : tensor<4xi1>, tensor<4xf32>
// CHECK:         return %[[W0]], %[[W1]] : tensor<4xf32>, tensor<4xf32>
// CHECK-NOT:     call @
module @nested_calls {
  func.func public @main(%arg0: tensor<4xf32>, %arg1: tensor<i1>) -> (tensor<4xf32>, tensor<4xf32>) {
    %0 = call @outer(%arg0, %arg1) : (tensor<4xf32>, tensor<i1>) -> tensor<4xf32>
    %1 = stablehlo.negate %arg0 : tensor<4xf32>
    %2 = call @outer(%1, %arg1) : (tensor<4xf32>, tensor<i1>) -> tensor<4xf32>
    return %0, %2 : tensor<4xf32>, tensor<4xf32>
  }
  func.func private @outer(%x: tensor<4xf32>, %p: tensor<i1>) -> tensor<4xf32> {
    %0 = stablehlo.abs %x : tensor<4xf32>
    %1 = call @_where(%p, %0, %x) : (tensor<i1>, tensor<4xf32>, tensor<4xf32>) -> tensor<4xf32>
    return %1 : tensor<4xf32>
  }
  func.func private @_where(%p: tensor<i1>, %a: tensor<4xf32>, %b: tensor<4xf32>) -> tensor<4xf32> {
    %0 = stablehlo.broadcast_in_dim %p, dims = [] : (tensor<i1>) -> tensor<4xi1>
    %1 = stablehlo.select %0, %a, %b : tensor<4xi1>, tensor<4xf32>
    return %1 : tensor<4xf32>
  }
}
