"""Gradients that are not what they should be (issue 13): IndexedSlices indices out of range in int64/uint64 are
refused before any conversion (without jax x64 they wrapped to int32 and updated rows 1, 2, 0), and gradients
that are objects, strings, dicts or IndexedSlices with None parts are TypeErrors that name the variable. Nothing
changes on a refusal."""

import numpy as np
import pytest
from test_errors import assert_unchanged, snapshot

import shardopt
from shardopt import UNSHARDED, Layout


@pytest.fixture(scope="module")
def built(mesh):
    emb = shardopt.Variable(np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), name="emb",
                            layout=Layout([UNSHARDED, "model"], mesh))
    bias = shardopt.Variable(np.zeros((8,), np.float32), name="bias")
    opt = shardopt.Adam(learning_rate=0.01, mesh=mesh)
    opt.apply_gradients([(np.full((8, 8), 0.5, np.float32), emb), (np.ones(8, np.float32), bias)])
    return opt, emb, bias


def rows(n=3):
    return np.ones((n, 8), np.float32)


@pytest.mark.parametrize("indices, shown", [
    (np.array([2**32 + 1, 2**32 + 2, 2**32], np.int64), r"\[4294967296, 4294967298\]"),   # wrapped to 1, 2, 0
    (np.array([1, 2, -(2**32)], np.int64), r"\[-4294967296, 2\]"),                         # wrapped to 1, 2, 0
    (np.array([2**63 + 1, 2, 0], np.uint64), r"\[0, 9223372036854775809\]"),
    (np.array([2**64 - 1, 1, 0], np.uint64), r"\[0, 18446744073709551615\]"),
    (np.array([8, 1, 0], np.int64), r"\[0, 8\]"),
], ids=["int64_over_2**32", "int64_negative_wraps", "uint64_over_2**63", "uint64_max", "int64_just_out"])
def test_wide_out_of_range_indices_are_refused_before_conversion(built, indices, shown):
    opt, emb, bias = built
    before = snapshot(opt, emb, bias)
    with pytest.raises(ValueError, match=rf"IndexedSlices for 'emb': indices must be in \[0, 8\), got {shown}"):
        opt.apply_gradients([(shardopt.IndexedSlices(rows(), indices, (8, 8)), emb)])
    assert_unchanged(before, opt, emb, bias)


def test_wide_in_range_indices_still_work(mesh):
    a = shardopt.Variable(np.zeros((8, 4), np.float32), name="a")
    b = shardopt.Variable(np.zeros((8, 4), np.float32), name="b")
    opt_a, opt_b = shardopt.Adam(0.1, mesh=mesh), shardopt.Adam(0.1, mesh=mesh)
    values = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    opt_a.apply_gradients([(shardopt.IndexedSlices(values, np.array([5, 1, 5], np.uint64), (8, 4)), a)])
    opt_b.apply_gradients([(shardopt.IndexedSlices(values, np.array([5, 1, 5], np.int32), (8, 4)), b)])
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert np.count_nonzero(a.numpy().any(axis=1)) == 2


class Opaque:
    pass


@pytest.mark.parametrize("make, match", [
    (lambda: Opaque(), r"gradient for 'emb' must be an array .* got Opaque"),
    (lambda: "0.5", r"gradient for 'emb' must be an array .* got str"),
    (lambda: {"grad": np.ones((8, 8), np.float32)}, r"gradient for 'emb' must be an array .* got dict"),
    (lambda: np.array(["a"] * 8), r"gradient for 'emb' has dtype <U1"),
    (lambda: np.array([Opaque()] * 8, dtype=object), r"gradient for 'emb' has dtype object"),
    (lambda: [[Opaque()] * 8] * 8, r"gradient for 'emb' must be an array .* got list"),
    (lambda: shardopt.IndexedSlices(None, np.array([0, 1]), (8, 8)),
     r"IndexedSlices values for 'emb' must be an array .* got NoneType"),
    (lambda: shardopt.IndexedSlices(rows(2), None, (8, 8)), r"IndexedSlices for 'emb': indices must be a 1-D integer"),
    (lambda: shardopt.IndexedSlices(rows(2), "01", (8, 8)), r"IndexedSlices for 'emb': indices must be a 1-D integer"),
    (lambda: shardopt.IndexedSlices(rows(2), np.array([0.0, 1.0]), (8, 8)),
     r"IndexedSlices for 'emb': indices must be a 1-D integer"),
    (lambda: shardopt.IndexedSlices("values", np.array([0, 1]), (8, 8)),
     r"IndexedSlices values for 'emb' must be an array .* got str"),
    (lambda: shardopt.IndexedSlices({"v": 1}, np.array([0, 1]), (8, 8)),
     r"IndexedSlices values for 'emb' must be an array .* got dict"),
], ids=["object", "string", "dict", "string_array", "object_array", "list_of_objects", "sparse_none_values",
        "sparse_none_indices", "sparse_string_indices", "sparse_float_indices", "sparse_string_values",
        "sparse_dict_values"])
def test_non_array_gradients_are_type_errors_naming_the_variable(built, make, match):
    opt, emb, bias = built
    before = snapshot(opt, emb, bias)
    with pytest.raises(TypeError, match=match):
        opt.apply_gradients([(make(), emb), (np.ones(8, np.float32), bias)])
    assert_unchanged(before, opt, emb, bias)


def test_a_bad_dense_shape_names_the_variable(built):
    opt, emb, bias = built
    with pytest.raises(ValueError, match="IndexedSlices for 'emb' has dense_shape"):
        opt.apply_gradients([(shardopt.IndexedSlices(rows(2), np.array([0, 1]), "8x8"), emb)])
