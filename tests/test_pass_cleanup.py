"""`cleanup`: FileCheck of IR in/out (tests/filecheck/cleanup.mlir) and the op counts it reports."""

from fusion_testlib import filecheck

from shardopt.passes.pipeline import DEFAULT_PIPELINE

PASS = "cleanup"


def test_last_in_default_pipeline():
    assert DEFAULT_PIPELINE[-1] == PASS


def test_filecheck():
    rc, err, stats = filecheck(PASS)
    assert rc == 0, err
    # 2 funcs, @main's 5 ops and return, @unused's negate and return -> @main with a multiply, an add and return
    assert stats == [{"ops_before": 10, "ops_after": 4}], stats
