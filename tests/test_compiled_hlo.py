"""What a sharded step compiles to: no communication beyond the all-gathers of norm reductions' partial sums, a
Shardy sharding on every `@main` argument and result (frontend and final IR), and donation of variables, slots and
the counter."""

import re

import numpy as np
import pytest

import shardopt
from shardopt import UNSHARDED, Layout
from shardopt import ir as sir

COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|all-to-all|ragged-all-to-all|collective-permute|"
                        r"collective-broadcast|reduce-scatter)(?:-start)?\(")
DONATED_ROLES = ("variable", "slot", "counter")

CONFIGS = {
    "plain": {},
    "no_reductions": dict(amsgrad=True, use_ema=True, ema_overwrite_frequency=3, clipvalue=0.5, weight_decay=0.01),
    "global_clipnorm": dict(global_clipnorm=1.0),
    "clipnorm": dict(clipnorm=1.0),
}


@pytest.fixture(scope="module")
def programs(mesh):
    """One compiled step per configuration, over two sharded variables and a replicated one."""
    variables = [
        shardopt.Variable(np.ones((8, 16), np.float32), name="dense/kernel", layout=Layout([UNSHARDED, "model"], mesh)),
        shardopt.Variable(np.ones((8, 8), np.float32), name="embedding", layout=Layout(["batch", "model"], mesh)),
        shardopt.Variable(np.zeros((16,), np.float32), name="dense/bias"),
    ]
    grads = [(np.ones(v.shape, np.float32), v) for v in variables]
    out = {}
    for key, kwargs in CONFIGS.items():
        program = shardopt.Adam(mesh=mesh, **kwargs).program_for(grads)
        out[key] = (program, program.executable.lower().compile().as_text())
    return out


def collectives(hlo: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in COLLECTIVE.findall(hlo):
        counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.parametrize("key", ["plain", "no_reductions"])
def test_no_clipping_means_no_collectives(programs, key):
    _, hlo = programs[key]
    assert collectives(hlo) == {}


@pytest.mark.parametrize("key", ["global_clipnorm", "clipnorm"])
def test_norm_clipping_needs_only_all_gathers(programs, key):
    """fixed-order-sums: the norms' per-device partial sums are all-gathered and added in one order on every
    device; no all-reduce (whose order of addition depends on its implementation: XLA's in-process one or gloo's)."""
    _, hlo = programs[key]
    found = collectives(hlo)
    assert set(found) == {"all-gather"}, found


def _boundary(text: str) -> tuple[list[dict], list[dict]]:
    ctx = sir.make_ir_context()
    module = sir.parse(text, ctx)
    with ctx:
        fn = sir.main_func(module)
        args = [{k: str(v) for k, v in a.items()} for a in sir.arg_attrs(fn)]
        results = [{k: str(v) for k, v in r.items()} for r in sir.result_attrs(fn)]
    return args, results


@pytest.mark.parametrize("key", list(CONFIGS))
@pytest.mark.parametrize("stage", ["frontend", "final"])
def test_every_boundary_value_is_sharded_and_state_is_donated(programs, key, stage):
    program, _ = programs[key]
    text = program.lowered.module_text if stage == "frontend" else program.pipeline.final_text
    args, results = _boundary(text)
    roles = [a["shardopt.role"].strip('"') for a in args]
    assert roles.count("variable") == 3 and roles.count("counter") == 1
    for i, (attrs, role) in enumerate(zip(args, roles, strict=True)):
        assert "sdy.sharding" in attrs, f"argument {i} ({attrs.get('shardopt.name')})"
        donated = "tf.aliasing_output" in attrs or attrs.get("jax.buffer_donor") == "true"
        assert donated == (role in DONATED_ROLES), f"argument {i} ({attrs.get('shardopt.name')}, {role})"
    for i, attrs in enumerate(results):
        assert "sdy.sharding" in attrs, f"result {i} ({attrs.get('shardopt.name')})"
    if stage == "final":  # every layout is closed, and each slot has its variable's
        layouts, result_layouts = sir.boundary_layouts(text)
        assert None not in layouts and None not in result_layouts
        by_name = {a["shardopt.name"].strip('"'): lay for a, lay in zip(args, layouts, strict=True)}
        for a, lay in zip(args, layouts, strict=True):
            if a["shardopt.role"] == '"slot"':
                assert lay == by_name[a["shardopt.owner"].strip('"')], a["shardopt.name"]
        assert by_name["dense/kernel"] == (None, "model") and by_name["embedding"] == ("batch", "model")
