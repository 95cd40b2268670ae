"""Pass specs and the registry: options as dataclass fields parsed from `pass{opt=v}`, textual pipelines, the
deprecated `fuse-moments-unpacked` alias, `register()`, and that nothing imports a pass module it does not run."""

import dataclasses
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from shardopt import ir as sir
from shardopt.passes import registry
from shardopt.passes.base import ModulePass, PassError, option
from shardopt.passes.pipeline import DEFAULT_PIPELINE, REGISTRY, build_pipeline, register, run_pipeline
from shardopt.passes.spec import parse_element, split_pipeline

MODULE = """module @m {
  func.func public @main(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    %0 = stablehlo.negate %arg0 : tensor<4xf32>
    %1 = stablehlo.negate %arg0 : tensor<4xf32>
    return %0 : tensor<4xf32>
  }
}
"""


@dataclass(frozen=True)
class CountOps(ModulePass):
    """Counts ops (a test pass with one option of each type)."""

    NAME: ClassVar[str] = "count-ops"
    scale: float = option(1.0, "multiplies the count")
    label: str = option("", "a name for the count")
    verbose: bool = option(False, "also count per op name")
    limit: int = option(0, "unused")

    def run(self, module: Any) -> dict[str, Any]:
        return {"label": self.label, "ops": sum(sir.op_counts(module).values()) * self.scale}


@pytest.fixture
def scratch_registry():
    saved = dict(registry._PASSES)
    yield
    registry._PASSES.clear()
    registry._PASSES.update(saved)


# ----- splitting ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, elements", [
    ("inline-calls,propagate-layouts,fuse-moments{unpacked=true},cleanup",
     ("inline-calls", "propagate-layouts", "fuse-moments{unpacked=true}", "cleanup")),
    ("fuse-clipping{max-operands=8,max-elements=64}, cleanup",
     ("fuse-clipping{max-operands=8,max-elements=64}", "cleanup")),
    ("builtin.module(inline-calls,fuse-moments{max-group=4 unpacked})",
     ("inline-calls", "fuse-moments{max-group=4 unpacked}")),
    ('count-ops{label="a, b}"},cleanup', ('count-ops{label="a, b}"}', "cleanup")),
    ("  ", ()),
    ("cleanup", ("cleanup",)),
])
def test_split_pipeline(text, elements):
    assert split_pipeline(text) == elements


@pytest.mark.parametrize("text, message", [
    ("a,,b", "empty pass name"),
    ("a,", "empty pass name"),
    ("fuse-moments{unpacked=true", "unclosed brace"),
    ("a},b", "'}' without '{'"),
    ('count-ops{label="x}', "unclosed quote"),
    ("builtin.module(a,b", "is not closed"),
])
def test_split_pipeline_errors(text, message):
    with pytest.raises(PassError, match=message):
        split_pipeline(text)


def test_parse_element():
    assert parse_element("cleanup") == ("cleanup", {})
    assert parse_element("fuse-moments{ unpacked max-group=4 }") == ("fuse-moments", {"unpacked": "true",
                                                                                      "max-group": "4"})
    assert parse_element('count-ops{label="say \\"hi\\", twice"}') == ("count-ops", {"label": 'say "hi", twice'})
    for bad, message in [("fuse-moments{a=1 a=2}", "given twice"), ("x{=1}", "without a name"),
                         ("{a=1}", "not a pass name"), ("a b", "not a pass name"), ("a{b{c}}", "unexpected")]:
        with pytest.raises(PassError, match=message):
            parse_element(bad)


# ----- options ------------------------------------------------------------------------------------------------

def test_options_become_fields():
    from shardopt.passes.fuse_clipping import FuseClipping
    from shardopt.passes.fuse_moments import FuseMoments

    assert build_pipeline("fuse-moments{unpacked=true}") == (FuseMoments(unpacked=True),)
    assert build_pipeline("fuse-moments{max-group=4}") == (FuseMoments(max_group=4),)
    assert build_pipeline(["fuse-moments{max_group=0x10 unpacked=0}"]) == (FuseMoments(max_group=16),)
    assert build_pipeline("fuse-moments{unpacked}") == (FuseMoments(unpacked=True),)
    assert build_pipeline("fuse-clipping{max-operands=8,max-elements=1_024}") == (
        FuseClipping(max_operands=8, max_elements=1024),)
    assert [o.name for o in FuseMoments.options()] == ["max-group", "unpacked"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        FuseMoments().unpacked = True  # type: ignore[misc]


@pytest.mark.parametrize("spec, message", [
    ("fuse-moments{unpacked=maybe}", "pass 'fuse-moments': option 'unpacked' takes true or false, got 'maybe'"),
    ("fuse-moments{max-group=four}", "pass 'fuse-moments': option 'max-group' takes an integer, got 'four'"),
    ("fuse-moments{max-group=-1}", "pass 'fuse-moments': option 'max-group' must be non-negative, got -1"),
    ("fuse-moments{group=2}", r"pass 'fuse-moments' has no option 'group' \(its options: max-group, unpacked\)"),
    ("fuse-clipping{max-operands=0}", "pass 'fuse-clipping': option 'max-operands' must be at least 1, got 0"),
    ("cleanup{aggressive=true}", r"pass 'cleanup' has no option 'aggressive' \(its options: none\)"),
    ("fuse-momentz", "unknown pass 'fuse-momentz'; known: cleanup, fixed-order-sums, fuse-clipping, fuse-moments, "
                     "inline-calls"),
])
def test_bad_specs(spec, message):
    with pytest.raises(PassError, match=message):
        build_pipeline(spec)


def test_spec_prints_non_default_options_and_round_trips():
    passes = build_pipeline("inline-calls,fuse-moments{unpacked=true max-group=4},fuse-clipping{max-operands=2}")
    assert [p.spec() for p in passes] == ["inline-calls", "fuse-moments{max-group=4 unpacked=true}",
                                          "fuse-clipping{max-operands=2}"]
    assert build_pipeline([p.spec() for p in passes]) == passes
    assert [p.spec() for p in build_pipeline(DEFAULT_PIPELINE)] == list(DEFAULT_PIPELINE)


def test_every_option_type(scratch_registry):
    register(CountOps)
    (p,) = build_pipeline('count-ops{scale=2.5 label="two words" verbose=TRUE limit=3}')
    assert p == CountOps(scale=2.5, label="two words", verbose=True, limit=3)
    assert p.spec() == 'count-ops{scale=2.5 label="two words" verbose=true limit=3}'
    assert build_pipeline(p.spec()) == (p,)
    with pytest.raises(PassError, match="option 'scale' takes a number"):
        build_pipeline("count-ops{scale=x}")


# ----- the deprecated alias -------------------------------------------------------------------------------------

def test_fuse_moments_unpacked_is_a_deprecated_alias():
    from shardopt.passes.fuse_moments import FuseMoments

    with pytest.warns(DeprecationWarning, match=r"'fuse-moments-unpacked' is deprecated; use "
                                                r"'fuse-moments\{unpacked=true\}'"):
        passes = build_pipeline(("inline-calls", "fuse-moments-unpacked"))
    assert passes[1] == FuseMoments(unpacked=True)
    with pytest.warns(DeprecationWarning):
        assert build_pipeline("fuse-moments-unpacked{max-group=2}") == (FuseMoments(max_group=2, unpacked=True),)
    assert "fuse-moments-unpacked" not in REGISTRY
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_pipeline(DEFAULT_PIPELINE)  # the current names do not warn


def test_alias_stage_is_named_after_the_pass():
    from fusion_testlib import chunks

    with pytest.warns(DeprecationWarning):
        result = run_pipeline(chunks("fuse-moments")[1], ["fuse-moments-unpacked"])
    stage = result.stage("fuse-moments")
    assert stage.name == "fuse-moments" and stage.spec == "fuse-moments{unpacked=true}"
    assert result.stage("fuse-moments{unpacked=true}") is stage
    assert stage.stats["groups"] == 2


# ----- pipelines and the registry -------------------------------------------------------------------------------

def test_run_pipeline_takes_text_specs_and_instances():
    from shardopt.passes.cleanup import Cleanup

    by_text = run_pipeline(MODULE, "inline-calls, cleanup")
    by_tuple = run_pipeline(MODULE, ("inline-calls", "cleanup"))
    by_instance = run_pipeline(MODULE, ["inline-calls", Cleanup()])
    assert [s.name for s in by_text.stages] == ["frontend", "inline-calls", "cleanup"]
    assert by_text.final_text == by_tuple.final_text == by_instance.final_text
    assert by_text.final_text.count("stablehlo.negate") == 1
    assert run_pipeline(MODULE, "").final_text == MODULE


def test_pipeline_is_checked_before_any_pass_runs():
    with pytest.raises(PassError, match="has no option 'x'"):
        run_pipeline("not MLIR at all", "cleanup,fuse-moments{x=1}")


def test_registry_mapping():
    from shardopt.passes.cleanup import Cleanup

    assert list(REGISTRY) == sorted(REGISTRY) == ["cleanup", "fixed-order-sums", "fuse-clipping",
                                                  "fuse-moments", "inline-calls", "lower-to-kernels",
                                                  "propagate-layouts"]
    assert set(DEFAULT_PIPELINE) <= set(REGISTRY) and len(REGISTRY) == 7
    assert REGISTRY["cleanup"] is Cleanup
    with pytest.raises(KeyError):
        REGISTRY["fuse-moments-unpacked"]


def test_register_class_and_lazy_loader(scratch_registry):
    assert register(CountOps) is CountOps  # usable as a decorator
    assert "count-ops" in REGISTRY
    stats = run_pipeline(MODULE, "count-ops{label=x}").stage("count-ops").stats
    assert stats == {"label": "x", "ops": 4.0}  # func, 2 negates, return

    registry._PASSES.pop("count-ops")
    register("count-ops", f"{__name__}:CountOps")
    assert isinstance(registry._PASSES["count-ops"], str)
    assert REGISTRY["count-ops"] is CountOps
    register("counting", f"{__name__}:CountOps")
    with pytest.raises(PassError, match="registered as 'counting' but its NAME is 'count-ops'"):
        build_pipeline("counting")
    with pytest.raises(ValueError, match="module:Class"):
        register("broken", "no_colon")


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_pipeline_imports_no_pass_module_until_used():
    out = _python("""
        import sys
        import shardopt.passes.pipeline as p
        passes = [m for m in sys.modules if m.startswith("shardopt.passes.") and m.rsplit(".", 1)[1] in
                  ("inline_calls", "propagate_layouts", "fuse_moments", "fuse_clipping", "cleanup")]
        assert not passes, passes
        assert "fuse-moments" in p.REGISTRY and list(p.REGISTRY)
        assert "shardopt.passes.fuse_moments" not in sys.modules
        p.build_pipeline("cleanup")
        assert "shardopt.passes.cleanup" in sys.modules
        assert "shardopt.passes.fuse_moments" not in sys.modules and "shardopt.frontend" not in sys.modules
        print("ok")
    """)
    assert out.strip() == "ok"
