"""`lower-to-kernels`: the frontend marks each loose variable's Adam update as a `stablehlo.composite`; the pass
makes it one in-place custom call to the compiled kernel, or inlines it. Results are bitwise those of the
pipeline with the pass off (`lower-to-kernels{enabled=false}`, today's StableHLO) over several steps, for every
supported option; the compiled HLO has one custom call and no copies; what is not lowered says why; artifacts
record the kernels and refuse, by name, to load where one is missing."""

import re
import warnings

import numpy as np
import pytest
from fusion_testlib import adam, build, filecheck, one_device_mesh

import shardopt
from shardopt import ArtifactError, IndexedSlices, Layout
from shardopt import kernels as sk
from shardopt.passes import lower_to_kernels
from shardopt.passes.pipeline import DEFAULT_PIPELINE, REGISTRY, run_pipeline

PASS = "lower-to-kernels"
OFF = tuple("lower-to-kernels{enabled=false}" if p == PASS else p for p in DEFAULT_PIPELINE)
needs_kernels = pytest.mark.skipif(not sk.available("adam"), reason=f"no compiled kernels: {sk.reason('adam')}")

CONFIGS = {
    "plain": {},
    "amsgrad": {"amsgrad": True},
    "weight_decay": {"weight_decay": 0.05},
    "global_clipnorm": {"global_clipnorm": 0.5},
    "ema": {"use_ema": True, "ema_overwrite_frequency": 2},
    "everything": {"amsgrad": True, "weight_decay": 0.05, "global_clipnorm": 0.5, "use_ema": True},
}


def stage_stats(program, names=DEFAULT_PIPELINE, stage=PASS):
    return run_pipeline(program.lowered.module_text, names).stage(stage).stats


def test_registered_right_after_inline_calls():
    assert PASS in REGISTRY and DEFAULT_PIPELINE.index(PASS) == DEFAULT_PIPELINE.index("inline-calls") + 1
    assert REGISTRY[PASS]().enabled and REGISTRY[PASS]().platform == "auto"


def test_filecheck():
    rc, err, stats = filecheck(PASS, "lower-to-kernels{assume-available=true}")
    assert rc == 0, err
    assert stats[0]["lowered"] == 1 and stats[0]["kernels"] == {"shardopt_adam_update": 1}, stats
    assert stats[1]["lowered"] == 1 and stats[1]["scales_folded"] == 1 and stats[1]["bf16_gradients"] == 1, stats
    assert stats[2]["lowered"] == stats[2]["per_device"] == 1, stats  # in a manual computation (kernel_regions)
    assert stats[3]["packs_lowered"] == stats[3]["per_device"] == 1, stats
    assert stats[4]["lowered"] == 0 and stats[4]["left"] == {"state not divisible by its mesh axes": 1}, stats
    # stats[5], stats[6]: SGD's chunks (tests/test_sgd_kernel.py)
    # a flat pack under a global norm: one pack kernel call, the norm's two sums one shardopt_sumsq call
    assert stats[7]["packs_lowered"] == 1 and stats[7]["norms_lowered"] == 1, stats
    assert stats[7]["kernels"] == {"shardopt_adam_pack_update": 1, "shardopt_sumsq": 1}, stats
    # a large loose gradient's sum of squares: one shardopt_sumsq call (StableHLO's fixed order when disabled)
    assert stats[8]["norms_fixed_order"] == 1 and stats[8]["kernels"] == {"shardopt_sumsq": 1}, stats


def _run_steps(dtype, config, pipeline, steps=3, shape=(96, 70)):
    """`steps` apply_gradients of Adam(config) on two loose variables (one 1-D) with `pipeline`; every value."""
    rng = np.random.default_rng(7)
    opt = adam(one_device_mesh(), packed=False, learning_rate=0.01, **config)
    opt.pipeline = pipeline
    shapes = [shape, (shape[0] * 3,)]
    vs = [shardopt.Variable(rng.normal(size=s).astype(dtype), name=f"w{i}") for i, s in enumerate(shapes)]
    for _ in range(steps):
        grads = [rng.normal(size=s).astype(dtype) * 3 for s in shapes]
        opt.apply_gradients(list(zip(grads, vs, strict=True)))
    out = [np.asarray(v.value) for v in vs]
    for v in vs:
        out += [np.asarray(opt.get_slot(v, s).value) for s in opt.slot_names()]
    return out, opt


def bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


@needs_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("key", list(CONFIGS))
def test_bitwise_equal_to_stablehlo_path(key, dtype):
    import ml_dtypes  # noqa: F401  (numpy bfloat16)

    dt = np.dtype("bfloat16") if dtype == "bfloat16" else np.float32
    with_kernel, opt = _run_steps(dt, CONFIGS[key], DEFAULT_PIPELINE)
    without, _ = _run_steps(dt, CONFIGS[key], OFF)
    stats = opt.program_for([(np.zeros(v.shape, dt), v) for v in opt._model_variables]).pipeline.stage(PASS).stats
    lowered = 0 if (dtype == "bfloat16" and CONFIGS[key].get("use_ema")) else 2  # bf16 EMA reads float32 var
    assert stats["lowered"] == lowered, stats
    for x, y in zip(with_kernel, without, strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))


@needs_kernels
def test_compiled_hlo_one_custom_call_no_copies():
    mesh = one_device_mesh()
    v = shardopt.Variable(np.ones((512, 300), np.float32), name="w")
    program = adam(mesh, packed=False, global_clipnorm=1.0).program_for([(np.ones((512, 300), np.float32), v)])
    hlo = build(program, DEFAULT_PIPELINE, "cleanup", mesh).hlo
    entry = hlo[hlo.index("ENTRY"):]
    calls = [line for line in entry.splitlines() if "custom-call(" in line and "shardopt_adam_update" in line]
    assert len(calls) == 1, calls
    assert "output_to_operand_aliasing={{0}: (0, {}), {1}: (1, {}), {2}: (2, {})}" in calls[0]
    # the global norm: one shardopt_sumsq call reading the gradient argument in place
    norms = [line for line in entry.splitlines() if 'custom_call_target="shardopt_sumsq"' in line]
    assert len(norms) == 1 and "custom-call(%args_" in norms[0], norms
    assert not [line for line in entry.splitlines() if " copy(" in line and "f32[512,300]" in line]
    # no loop over the tensor either: the clip scale is folded, the sum of squares is the only pass over g
    assert not re.search(r"= f32\[512,300\]\S* fusion\(", entry), entry


def test_unavailable_kernel_keeps_stablehlo_and_warns_once(monkeypatch):
    mesh = one_device_mesh()
    v = shardopt.Variable(np.ones((64, 8), np.float32), name="w")
    program = adam(mesh, packed=False).program_for([(np.ones((64, 8), np.float32), v)])
    monkeypatch.setattr(sk, "reason", lambda *a, **k: "no library (test)")
    monkeypatch.setattr(lower_to_kernels, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run_pipeline(program.lowered.module_text)
        second = run_pipeline(program.lowered.module_text)
    stats = first.stage(PASS).stats
    assert stats["lowered"] == 0 and stats["left"] == {"no library (test)": 1}, stats
    assert len([w for w in caught if "lower-to-kernels" in str(w.message)]) == 1
    assert "custom_call" not in first.final_text and "composite" not in first.final_text
    off = run_pipeline(program.lowered.module_text, OFF)
    assert first.final_text == second.final_text == off.final_text


def test_what_is_not_marked():
    """Packed members are marked as one pack composite (tests/test_pack_kernel.py), not one per member; sparse
    gradients and adaptive_epsilon (no kernel) are not marked."""
    mesh = one_device_mesh()
    small = [shardopt.Variable(np.ones((16,), np.float32), name=f"b{i}") for i in range(2)]
    opt = adam(mesh)  # packs the small variables
    program = opt.program_for([(np.ones((16,), np.float32), v) for v in small])
    assert program.lowered.module_text.count("stablehlo.composite") == 1
    assert '"shardopt.adam_pack"' in program.lowered.module_text
    assert program.pipeline.stage(PASS).stats["packs_lowered"] == 1
    emb = shardopt.Variable(np.ones((100, 8), np.float32), name="emb")
    sparse = adam(mesh, packed=False).program_for([(IndexedSlices(np.ones((3, 8), np.float32),
                                                                  np.array([1, 5, 7]), (100, 8)), emb)])
    assert "stablehlo.composite" not in sparse.lowered.module_text
    w = shardopt.Variable(np.ones((64, 8), np.float32), name="w")
    adaptive = adam(mesh, packed=False, adaptive_epsilon=True).program_for([(np.ones((64, 8), np.float32), w)])
    assert "stablehlo.composite" not in adaptive.lowered.module_text


def _mesh_steps(mesh, pipeline):
    rng = np.random.default_rng(3)
    w = shardopt.Variable(rng.normal(size=(64, 8)).astype(np.float32), name="w",
                          layout=Layout(["model", shardopt.UNSHARDED], mesh))
    r = shardopt.Variable(rng.normal(size=(32, 8)).astype(np.float32), name="r")  # replicated on 8 devices
    opt = adam(mesh, packed=False, global_clipnorm=1.0)
    opt.pipeline = pipeline
    for _ in range(2):
        opt.apply_gradients([(rng.normal(size=(64, 8)).astype(np.float32), w),
                             (rng.normal(size=(32, 8)).astype(np.float32), r)])
    stats = opt.program_for([(np.ones((64, 8), np.float32), w), (np.ones((32, 8), np.float32), r)]
                            ).pipeline.stage(PASS).stats
    return stats, [np.asarray(x.value) for x in (w, r, opt.get_slot(r, "m"), opt.get_slot(r, "v"))]


def test_sharded_and_replicated_lowered_per_device(mesh):
    """On the 2x4 mesh: a variable sharded on "model" and a replicated one are both lowered, each call run per
    device on its local shard or full copy (tests/test_kernel_regions.py), bitwise as without the pass."""
    stats, on = _mesh_steps(mesh, DEFAULT_PIPELINE)
    lowered = 2 if sk.available("adam") else 0
    assert stats["lowered"] == stats["per_device"] == lowered and sum(stats["left"].values()) == 2 - lowered, stats
    _, off = _mesh_steps(mesh, OFF)
    for x, y in zip(on, off, strict=True):
        np.testing.assert_array_equal(bits(x), bits(y))


@needs_kernels
def test_artifact_records_kernels_and_falls_back_to_the_portable_module(tmp_path, monkeypatch):
    mesh = one_device_mesh()
    specs = {"w": shardopt.VariableSpec((128, 64), "float32")}
    step = shardopt.Adam(1e-3, mesh=mesh).compile(specs)
    path = tmp_path / "k.shardopt"
    step.save(path)
    loaded = shardopt.load(path, mesh=mesh)
    assert loaded.artifact.manifest["kernels"] == ["shardopt_adam_update"]
    assert loaded.executable.portable is not None  # the portable module is stored beside the kernel one
    monkeypatch.setattr(sk, "target_reason", lambda t: "library not built (test)")
    with pytest.warns(RuntimeWarning, match="portable module"):
        fallback = shardopt.load(path, mesh=mesh)  # no kernels here: runs the portable module stored beside
    assert sk.module_kernels(fallback.executable.exported.mlir_module()) == []
    rng = np.random.default_rng(0)
    init = {"w": rng.normal(size=(128, 64)).astype(np.float32)}
    grads = {"w": rng.normal(size=(128, 64)).astype(np.float32)}
    results = []
    for s in (loaded, fallback):
        params = s.place_params(init)
        params, _ = s(params, s.place_params(grads), s.init(params))
        results.append(np.asarray(params["w"]))
    np.testing.assert_array_equal(results[0], results[1])  # bitwise the kernel step's numbers
    step.executable.portable = None  # a file without the portable module: a clear error, not a crash
    bare = tmp_path / "bare.shardopt"
    step.save(bare)
    with pytest.raises(ArtifactError, match="shardopt_adam_update: library not built"):
        shardopt.load(bare, mesh=mesh)
    portable = tmp_path / "p.shardopt"
    opt = shardopt.Adam(1e-3, mesh=mesh)
    opt.pipeline = OFF
    opt.compile(specs).save(portable)
    assert shardopt.load(portable, mesh=mesh).artifact.manifest["kernels"] == []
