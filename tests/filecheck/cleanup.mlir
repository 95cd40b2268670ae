// RUN: python -m shardopt.opt -p cleanup %s --split-input-file | filecheck %s

// `cleanup` (MLIR's canonicalize, cse and symbol-dce), each chunk between separator lines on its own
// (tests/test_filecheck.py runs the RUN lines; tests/test_pass_cleanup.py checks the statistics): what the other
// passes leave dead goes.

// A dead chain (subtract -> exponential), a duplicate multiply (cse: both uses read the first one) and a private
// function nobody calls (inline-calls leaves its callees behind).
// CHECK-LABEL: module @dead_ops
// CHECK:       func.func public @main(%arg0: tensor<4xf32>, %arg1: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>) {
// CHECK-NEXT:    %[[M:.*]] = stablehlo.multiply %arg0, %arg1 : tensor<4xf32>
// CHECK-NEXT:    %[[A:.*]] = stablehlo.add %[[M]], %[[M]] : tensor<4xf32>
// CHECK-NEXT:    return %[[A]], %[[M]] : tensor<4xf32>, tensor<4xf32>
// CHECK-NEXT:  }
// CHECK-NOT:   @unused
module @dead_ops {
  func.func public @main(%arg0: tensor<4xf32>, %arg1: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>) {
    %0 = stablehlo.multiply %arg0, %arg1 : tensor<4xf32>
    %dead = stablehlo.subtract %arg0, %arg1 : tensor<4xf32>
    %dead2 = stablehlo.exponential %dead : tensor<4xf32>
    %1 = stablehlo.multiply %arg0, %arg1 : tensor<4xf32>
    %2 = stablehlo.add %0, %1 : tensor<4xf32>
    return %2, %0 : tensor<4xf32>, tensor<4xf32>
  }
  func.func private @unused(%a: tensor<4xf32>) -> tensor<4xf32> {
    %0 = stablehlo.negate %a : tensor<4xf32>
    return %0 : tensor<4xf32>
  }
}
