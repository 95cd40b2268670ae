"""Sparse gradients whose row count changes every step compile a bounded number of programs (row counts are
bucketed to powers of two, the padding rows dropped by the step's scatter), with the same numbers."""

import jax.numpy as jnp
import numpy as np

import shardopt
from shardopt.optimizers.gradients import row_bucket


def test_row_buckets():
    assert [row_bucket(n) for n in (1, 7, 8, 9, 16, 17, 100)] == [8, 8, 8, 16, 16, 32, 128]


def test_varying_row_counts_compile_few_programs_and_padding_changes_nothing(mesh):
    rng = np.random.default_rng(0)
    emb = shardopt.Variable(np.ones((64, 4), np.float32), name="emb")
    ref = shardopt.Variable(np.ones((64, 4), np.float32), name="emb")
    opt, opt_ref = shardopt.Adam(0.01, mesh=mesh), shardopt.Adam(0.01, mesh=mesh)
    for step in range(40):
        rows = 1 + step % 37
        idx = rng.integers(0, 64, size=rows).astype(np.int32)
        vals = rng.normal(size=(rows, 4)).astype(np.float32)
        opt.apply_gradients([(shardopt.IndexedSlices(jnp.asarray(vals), jnp.asarray(idx)), emb)])
        # the reference pads by hand to the same bucket with zero rows on a real row: x + 0 == x
        pad = row_bucket(rows) - rows
        idx_ref = np.concatenate([idx, np.zeros(pad, np.int32)])
        vals_ref = np.concatenate([vals, np.zeros((pad, 4), np.float32)])
        opt_ref.apply_gradients([(shardopt.IndexedSlices(jnp.asarray(vals_ref), jnp.asarray(idx_ref)), ref)])
    assert len(opt._programs) <= 4, len(opt._programs)  # buckets 8, 16, 32, 64 (37 rows at most)
    np.testing.assert_array_equal(emb.numpy(), ref.numpy())
    np.testing.assert_array_equal(opt.get_slot(emb, "v").numpy(), opt_ref.get_slot(ref, "v").numpy())
