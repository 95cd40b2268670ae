"""`propagate-layouts`: FileCheck of IR in/out (tests/filecheck/propagate-layouts.mlir), its statistics, and the
errors it raises instead of guessing."""

import pytest
from fusion_testlib import chunks, filecheck

from shardopt.passes.base import PassError
from shardopt.passes.pipeline import run_pipeline

PASS = "propagate-layouts"


def test_filecheck():
    rc, err, stats = filecheck(PASS)
    assert rc == 0, err
    # m/w, grad/w and m/b follow their variable, the learning rate is replicated, w and b are checked
    # second chunk (weight-update sharding asked per variable): m/w follows w onto ["batch"]; b cannot, falls back
    state = {"state_sharded": 1, "state_sharded_slots": 1, "state_fallback": 1, "state_packed": 0, "state_kernel": 0,
             "state_fallback_variables": ["b"]}
    assert stats == [{"arguments": 6, "followed_owner": 3, "replicated": 1, "checked": 2, "results": 4},
                     {"arguments": 5, "followed_owner": 2, "replicated": 0, "checked": 3, "results": 4, **state}], stats


def test_slot_pinned_elsewhere_is_an_error():
    chunk = chunks(PASS)[0].replace('[{?}, {?}]>, shardopt.name = "m/w"', '[{}, {"model"}]>, shardopt.name = "m/w"')
    with pytest.raises(PassError, match=r"conflicting layouts: m/w is pinned to \[\{\}, \{'model'\}\]"):
        run_pipeline(chunk, [PASS])


def test_indivisible_dimension_is_an_error():
    chunk = chunks(PASS)[0].replace('[{"model"}, {}]>, shardopt.name = "w"',
                                    '[{}, {"batch", "model"}]>, shardopt.name = "w"')
    with pytest.raises(PassError, match="w: dimension 1 of size 4 is not divisible by mesh axis batchxmodel of size 8"):
        run_pipeline(chunk, [PASS])
