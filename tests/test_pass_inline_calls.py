"""`inline-calls`: FileCheck of IR in/out (tests/filecheck/inline-calls.mlir) and the calls it counts."""

from fusion_testlib import chunks, filecheck

from shardopt.passes.pipeline import DEFAULT_PIPELINE, run_pipeline

PASS = "inline-calls"


def test_first_in_default_pipeline():
    assert DEFAULT_PIPELINE[0] == PASS  # the fusion passes need one flat @main


def test_filecheck():
    rc, err, stats = filecheck(PASS)
    assert rc == 0, err
    # nested: the first sweep inlines main's two calls of @outer and @outer's call of @_where; the copies of
    # @outer's body brought their own call of @_where into main, inlined in the second sweep
    assert [s["calls_inlined"] for s in stats] == [1, 5], stats


def test_nothing_to_inline_is_a_no_op():
    first = chunks(PASS)[0]
    once = run_pipeline(first, [PASS]).final_text
    again = run_pipeline(once, [PASS])
    assert again.stage(PASS).stats == {"calls_inlined": 0}
    assert again.final_text == once
