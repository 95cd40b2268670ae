"""SGD with momentum through `lower-to-kernels`: a loose variable's update becomes one in-place
`shardopt_sgd_update` call, a flat pack's whole update one `shardopt_sgd_pack_update` call (the packed `m` and
every member's own variable and gradient as operands).

Bitwise equal to the pipeline with the pass off (`lower-to-kernels{enabled=false}`: the composite inlined, a pack
then fused by fuse-moments) over several steps for every option, float32 and bfloat16. Two measured exceptions
are pinned instead: with `global_clipnorm` the StableHLO path takes a pack's norm over the packed gradient where
the kernel path adds the members' sums (so the pack tests use gradients whose sum of squares is exact in any
order, and a second test bounds the difference for any gradient); and XLA:CPU contracts the clip scale's
product the other way in a 1-D fusion small enough to be unrolled whole (~320 elements; a loose variable has
more than `pack_max_elements`).
"""

import re
import warnings

import ml_dtypes  # noqa: F401  (numpy bfloat16)
import numpy as np
import pytest
from fusion_testlib import filecheck, one_device_mesh

import shardopt
from shardopt import kernels as sk
from shardopt.passes import lower_to_kernels
from shardopt.passes.pipeline import DEFAULT_PIPELINE, run_pipeline

PASS = "lower-to-kernels"
OFF = tuple("lower-to-kernels{enabled=false}" if p == PASS else p for p in DEFAULT_PIPELINE)
SINGLE = [(96, 70), (1024,)]  # loose variables (pack_max_elements=0): a 2-D and a 1-D loop
PACKED = [(37,), (10, 20), (5,), (640,), (3, 3, 3)]  # one flat pack of 909 elements
CONFIGS = {
    "momentum": {},
    "nesterov": {"nesterov": True},
    "zero_momentum": {"momentum": 0.0},
    "weight_decay": {"weight_decay": 0.05},
    "clipnorm": {"clipnorm": 0.3},
    "clipvalue": {"clipvalue": 0.2, "nesterov": True},
    "global_clipnorm": {"global_clipnorm": 0.5},
    "schedule": {"learning_rate": shardopt.schedules.ExponentialDecay(0.1, 3, 0.5)},
    "everything": {"nesterov": True, "weight_decay": 0.05, "global_clipnorm": 0.5,
                   "learning_rate": shardopt.schedules.PiecewiseConstantDecay([2], [0.1, 0.05])},
}
BF16 = np.dtype("bfloat16")


def bits(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def run(dtype, options, pipeline, shapes, packed, steps=4, exact_norm=False):
    """`steps` apply_gradients of SGD(momentum 0.9, options); every variable and slot. `exact_norm`: gradients
    of multiples of 1/8 (their sum of squares is exact in any order, so every global norm agrees)."""
    rng = np.random.default_rng(1)
    vs = [shardopt.Variable(rng.standard_normal(s).astype(dtype), name=f"v{i}") for i, s in enumerate(shapes)]
    opt = shardopt.SGD(**{"learning_rate": 0.1, "momentum": 0.9, **options})
    if not packed:
        opt.pack_max_elements = 0
    opt.pipeline = pipeline
    for _ in range(steps):
        grads = [(rng.integers(-4, 5, s) / 8 if exact_norm else rng.standard_normal(s)).astype(np.float32)
                 for s in shapes]
        opt.apply_gradients([(g.astype(dtype), v) for g, v in zip(grads, vs, strict=True)])
    program = next(iter(opt._programs.values()))
    return [np.asarray(v.value) for v in vs] + [np.asarray(opt.get_slot(v, "m").value) for v in vs], program


def test_filecheck_sgd_chunks():
    """tests/filecheck/lower-to-kernels.mlir (its chunks 5 and 6 are SGD's), with the statistics they report."""
    rc, err, stats = filecheck(PASS, "lower-to-kernels{assume-available=true}")
    assert rc == 0, err
    single, pack = stats[5], stats[6]
    assert single["kernels"] == {"shardopt_sgd_update": 1} and single["scales_folded"] == 1, single
    assert pack["kernels"] == {"shardopt_sgd_pack_update": 1} and pack["pack_members"] == 2, pack
    assert pack["bf16_gradients"] == 1 and pack["gradient_buffers_freed"] == 1, pack


def test_library_has_the_sgd_kernels():
    assert sk.available("sgd"), sk.reason("sgd")
    assert sk.available("sgd_pack", "bfloat16"), sk.reason("sgd_pack", "bfloat16")


@pytest.mark.parametrize("packed", [False, True], ids=["single", "packed"])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("key", list(CONFIGS))
def test_bitwise_equal_to_the_stablehlo_path(key, dtype, packed):
    shapes = PACKED if packed else SINGLE
    exact = packed and "global_clipnorm" in CONFIGS[key]
    with_kernel, program = run(dtype, CONFIGS[key], DEFAULT_PIPELINE, shapes, packed, exact_norm=exact)
    without, off_program = run(dtype, CONFIGS[key], OFF, shapes, packed, exact_norm=exact)
    stats = program.pipeline.stage(PASS).stats
    if packed:
        norm = {"shardopt_sumsq": 1} if "global_clipnorm" in CONFIGS[key] else {}  # the pack's norm, fixed order
        assert stats["kernels"] == {"shardopt_sgd_pack_update": 1, **norm}, stats
        assert stats["pack_members"] == len(shapes), stats
        assert stats["gradient_buffers_freed"] == 1, stats
    else:
        assert stats["kernels"] == {"shardopt_sgd_update": len(shapes)} and stats["left"] == {}, stats
    assert stats["scales_folded"] == ("global_clipnorm" in CONFIGS[key]) * (1 if packed else len(shapes)), stats
    # the gradient arguments themselves, unless clipnorm/clipvalue made new float32 gradients
    as_is = dtype == BF16 and not {"clipnorm", "clipvalue"} & set(CONFIGS[key])
    assert stats["bf16_gradients"] == as_is * (1 if packed else len(shapes)), stats
    assert off_program.pipeline.stage(PASS).stats["lowered"] == 0  # the reference is the StableHLO path
    for x, y in zip(with_kernel, without, strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))


def test_packed_global_clipnorm_bitwise_for_any_gradients():
    """Any gradient: the pack's norm is one `shardopt_sumsq` on the kernel path and the same fixed order in
    StableHLO on the portable one (passes/fixed_order_norm.py), so both compute the same scale."""
    with_kernel, program = run(np.float32, {"global_clipnorm": 0.5, "nesterov": True}, DEFAULT_PIPELINE, PACKED, True)
    without, _ = run(np.float32, {"global_clipnorm": 0.5, "nesterov": True}, OFF, PACKED, True)
    assert program.pipeline.stage(PASS).stats["scales_folded"] == 1
    for x, y in zip(with_kernel, without, strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))


def test_small_unrolled_variable_with_global_clipnorm_within_a_few_ulp():
    """A loose 1-D variable of 288 elements: XLA unrolls its fusion whole and contracts m*momentum instead of
    the scaled gradient's product (measured, jaxlib 0.10.2); the kernel takes the loop's form."""
    with_kernel, _ = run(np.float32, {"global_clipnorm": 0.5}, DEFAULT_PIPELINE, [(288,)], False)
    without, _ = run(np.float32, {"global_clipnorm": 0.5}, OFF, [(288,)], False)
    for x, y in zip(with_kernel, without, strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-7)


def _entry(program) -> str:
    hlo = program.executable.lower().compile().as_text()
    return hlo[hlo.index("ENTRY"):]


def test_compiled_hlo_single_is_one_custom_call_in_place():
    _, program = run(np.float32, {"global_clipnorm": 1.0, "nesterov": True}, DEFAULT_PIPELINE, [(512, 300)], False,
                     steps=1)
    entry = _entry(program)
    calls = [line for line in entry.splitlines() if "custom-call(" in line]
    # the global norm of a large gradient is one shardopt_sumsq (fixed order), the update one in-place call
    updates = [c for c in calls if 'custom_call_target="shardopt_sgd_update"' in c]
    assert len(updates) == 1 and len(calls) == 2 and 'custom_call_target="shardopt_sumsq"' in calls[0], calls
    assert "output_to_operand_aliasing={{0}: (0, {}), {1}: (1, {})}" in updates[0], updates[0]
    # no copy of the state and no other loop over the tensor: the clip scale is folded into the call
    assert not [line for line in entry.splitlines() if " copy(" in line and "f32[512,300]" in line], entry
    assert not re.search(r"= f32\[512,300\]\S* fusion\(", entry), entry


def test_compiled_hlo_pack_is_one_custom_call_without_the_gather():
    _, program = run(np.float32, {}, DEFAULT_PIPELINE, PACKED, True, steps=1)
    entry = _entry(program)
    calls = [line for line in entry.splitlines() if "custom-call(" in line]
    assert len(calls) == 1 and 'custom_call_target="shardopt_sgd_pack_update"' in calls[0], calls
    # m and every variable in place (operand 1 is the learning rate)
    aliasing = ", ".join(f"{{{i}}}: ({i + (i > 0)}, {{}})" for i in range(1 + len(PACKED)))
    assert f"output_to_operand_aliasing={{{aliasing}}}" in calls[0], calls[0]
    # nothing else writes a pack-sized buffer: no gradient gather, no copy of the packed slot
    assert not re.search(r"= f32\[909\]\S* (concatenate|fusion|copy)\(", entry), entry


def test_without_the_library_keeps_stablehlo_and_warns_once(monkeypatch):
    rng = np.random.default_rng(0)
    vs = [shardopt.Variable(rng.standard_normal(s).astype(np.float32), name=f"v{i}")
          for i, s in enumerate([(300, 300), *PACKED])]
    opt = shardopt.SGD(0.1, momentum=0.9, nesterov=True)
    program = opt.program_for([(np.ones(v.shape, np.float32), v) for v in vs])
    assert program.pipeline.stage(PASS).stats["kernels"] == {"shardopt_sgd_pack_update": 1,
                                                             "shardopt_sgd_update": 1}
    monkeypatch.setattr(sk, "reason", lambda *a, **k: "no library (test)")
    monkeypatch.setattr(lower_to_kernels, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run_pipeline(program.lowered.module_text)
        second = run_pipeline(program.lowered.module_text)
    stats = first.stage(PASS).stats
    assert stats["lowered"] == 0 and stats["left"] == {"no library (test)": 2}, stats
    assert len([w for w in caught if "lower-to-kernels" in str(w.message)]) == 1
    assert "custom_call" not in first.final_text and "composite" not in first.final_text
    assert first.final_text == second.final_text == run_pipeline(program.lowered.module_text, OFF).final_text


def test_not_marked_for_a_sparse_gradient_and_per_device_for_sharded_state(mesh):
    emb = shardopt.Variable(np.ones((100, 8), np.float32), name="emb")
    opt = shardopt.SGD(0.1, momentum=0.9)
    opt.pack_max_elements = 0
    sparse = opt.program_for([(shardopt.IndexedSlices(np.ones((3, 8), np.float32), np.array([1, 5, 7]), (100, 8)),
                               emb)])
    assert "stablehlo.composite" not in sparse.lowered.module_text
    w = shardopt.Variable(np.ones((64, 8), np.float32), name="w",
                          layout=shardopt.Layout(["model", shardopt.UNSHARDED], mesh))
    sharded = shardopt.SGD(0.1, momentum=0.9, mesh=mesh)
    sharded.pack_max_elements = 0
    stats = sharded.program_for([(np.ones((64, 8), np.float32), w)]).pipeline.stage(PASS).stats
    # a sharded variable's update runs per device on its shards (passes/kernel_regions.py), bitwise as XLA's
    assert stats["lowered"] == stats["per_device"] == 1 and stats["left"] == {}, stats
    rng = np.random.default_rng(3)
    grads = [rng.normal(size=(64, 8)).astype(np.float32) for _ in range(3)]
    values = []
    for pipeline in (DEFAULT_PIPELINE, OFF):
        v = shardopt.Variable(np.ones((64, 8), np.float32), name="w",
                              layout=shardopt.Layout(["model", shardopt.UNSHARDED], mesh))
        opt = shardopt.SGD(0.1, momentum=0.9, nesterov=True, mesh=mesh)
        opt.pack_max_elements, opt.pipeline = 0, pipeline
        for g in grads:
            opt.apply_gradients([(g, v)])
        values.append(np.asarray(v.value))
    np.testing.assert_array_equal(bits(values[0]), bits(values[1]))


def test_artifact_records_the_sgd_kernels_and_inspect_shows_them(tmp_path, monkeypatch):
    import io

    specs = {"w": shardopt.VariableSpec((128, 600), "float32"), "b": shardopt.VariableSpec((64,), "float32"),
             "c": shardopt.VariableSpec((32,), "float32")}
    mesh = one_device_mesh()
    step = shardopt.SGD(0.1, momentum=0.9, nesterov=True, mesh=mesh).compile(specs)
    path = tmp_path / "sgd.shardopt"
    step.save(path)
    loaded = shardopt.load(path, mesh=mesh)
    assert loaded.artifact.manifest["kernels"] == ["shardopt_sgd_pack_update", "shardopt_sgd_update"]
    out = io.StringIO()
    loaded.inspect(file=out)
    text = out.getvalue()
    assert "shardopt_sgd_update" in text and "shardopt_sgd_pack_update" in text, text
    monkeypatch.setattr(sk, "target_reason", lambda t: "library not built (test)")
    with pytest.warns(RuntimeWarning, match="portable module"):
        fallback = shardopt.load(path, mesh=mesh)
    assert sk.module_kernels(fallback.executable.exported.mlir_module()) == []
    rng = np.random.default_rng(0)
    init = {k: rng.standard_normal(s.shape).astype(np.float32) for k, s in specs.items()}
    results = []
    for s in (loaded, fallback):
        params = s.place_params(init)
        state = s.init(params)
        for _ in range(2):
            grads = s.place_params({k: np.full(v.shape, 0.25, np.float32) for k, v in init.items()})
            params, state = s(params, grads, state)
        results.append({k: np.asarray(v) for k, v in params.items()})
    for k in specs:
        np.testing.assert_array_equal(results[0][k], results[1][k])  # bitwise the kernel step's numbers
