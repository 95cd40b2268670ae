"""`step.save` / `shardopt.load`: a fresh process with no optimizer definition gets bitwise the same steps, and
every way a file can be wrong (truncated, corrupted, tampered, unknown version, wrong mesh, wrong params) is an
error that says what does not match."""

import json
import os
import struct
import subprocess
import sys
import textwrap
from collections import namedtuple

import jax
import numpy as np
import pytest

import shardopt
from shardopt.runtime import artifact, container, functional
from shardopt.runtime.container import HEADER_SIZE, TRAILER, ArtifactError, read_container, read_manifest

STEPS = 3


def make_specs(mesh):
    lay = shardopt.Layout
    return {
        "dense": {"kernel": shardopt.VariableSpec((16, 8), "float32", lay([shardopt.UNSHARDED, "model"], mesh)),
                  "bias": shardopt.VariableSpec((8,), "float32")},
        "blocks": [shardopt.VariableSpec((8, 4), "float32", lay(["model", shardopt.UNSHARDED], mesh)),
                   shardopt.VariableSpec((4,), "float32")],
    }


def make_data(step):
    """Deterministic params and STEPS gradient sets, as flat lists in the step's leaf order."""
    rng = np.random.default_rng(7)
    shapes = [step.convention.args[step.convention.arg_index(n)].shape for n in step.names]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(STEPS)]
    return params, grads


def run_steps(step, params, grads):
    """STEPS steps; returns every param and state leaf after each step, flattened, as numpy."""
    tree = lambda leaves: jax.tree_util.tree_unflatten(step.treedef, leaves)  # noqa: E731
    p = step.place_params(tree(params))
    state = step.init(p)
    out = []
    for g in grads:
        p, state = step(p, tree(g), state)
        out.append([np.asarray(x) for x in jax.tree_util.tree_leaves((p, state))])
    return out


@pytest.fixture(scope="module")
def saved(mesh, tmp_path_factory):
    """A compiled step (EMA + global-norm clipping, nested dict/list params), saved, with its in-process results."""
    step = shardopt.Adam(1e-3, use_ema=True, global_clipnorm=1.0, mesh=mesh).compile(make_specs(mesh))
    path = tmp_path_factory.mktemp("art") / "adam.shardopt"
    size = step.save(path)
    params, grads = make_data(step)
    return {"step": step, "path": path, "size": size, "params": params, "grads": grads,
            "expected": run_steps(step, params, grads)}


def test_fresh_process_loads_without_optimizer_and_matches_bitwise(saved, tmp_path):
    inputs = tmp_path / "inputs.npz"
    arrays = {f"p{i}": a for i, a in enumerate(saved["params"])}
    arrays.update({f"g{s}_{i}": a for s, gs in enumerate(saved["grads"]) for i, a in enumerate(gs)})
    np.savez(inputs, **arrays)
    out = tmp_path / "out.npz"
    script = textwrap.dedent(f"""
        import sys, numpy as np, jax
        import shardopt
        step = shardopt.load({str(saved["path"])!r})
        data = np.load({str(inputs)!r}, allow_pickle=False)
        n = len(step.names)
        tree = lambda leaves: jax.tree_util.tree_unflatten(step.treedef, leaves)
        p = step.place_params(tree([data[f"p{{i}}"] for i in range(n)]))
        state = step.init(p)
        res = {{}}
        for s in range({STEPS}):
            p, state = step(p, tree([data[f"g{{s}}_{{i}}"] for i in range(n)]), state)
            for j, x in enumerate(jax.tree_util.tree_leaves((p, state))):
                res[f"s{{s}}_{{j}}"] = np.asarray(x)
        np.savez({str(out)!r}, **res)
        defs = [m for m in sys.modules if m in ("shardopt.optimizers.adam", "shardopt.optimizers.base",
                                                 "shardopt.frontend.lowering", "shardopt.compiler", "optax")]
        print("DEFINITIONS", defs)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "DEFINITIONS []" in proc.stdout, proc.stdout  # no optimizer definition, no lowering, no re-compile path
    got = np.load(out, allow_pickle=False)
    for s, leaves in enumerate(saved["expected"]):
        for j, want in enumerate(leaves):
            np.testing.assert_array_equal(got[f"s{s}_{j}"], want, strict=True)
            assert got[f"s{s}_{j}"].tobytes() == want.tobytes()


def test_in_process_load_matches_and_keeps_stages(saved):
    loaded = shardopt.load(saved["path"])
    assert loaded.program is None and loaded.artifact is not None
    assert loaded.names == saved["step"].names and loaded.treedef == saved["step"].treedef
    got = run_steps(loaded, saved["params"], saved["grads"])
    for a, b in zip(got, saved["expected"], strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.tobytes() == y.tobytes()
    want = [(s.name, s.text, s.stats) for s in saved["step"].program.pipeline.stages]
    assert [(s.name, s.text, s.stats) for s in loaded.artifact.stages] == want
    assert loaded.optimizer_class == "Adam" and loaded.optimizer_config["global_clipnorm"] == 1.0
    # re-saving a loaded step keeps everything (no program needed)
    again = saved["path"].with_name("again.shardopt")
    loaded.save(again)
    assert read_manifest(again)["stages"] == read_manifest(saved["path"])["stages"]


def test_manifest_describes_the_step(saved):
    m = read_manifest(saved["path"])
    assert m["format"] == "shardopt-artifact" and m["format_version"] == 1 and m["kind"] == "optimizer-step"
    assert set(m["versions"]) >= {"shardopt", "jax", "jaxlib", "stablehlo", "stablehlo_target"}
    assert m["versions"]["jax"] == jax.__version__
    assert m["mesh"] == {"axes": [["batch", 2], ["model", 4]], "device_count": 8,
                         "axis_types": ["Explicit", "Explicit"]}
    assert m["platforms"] == ["cpu"]
    assert m["optimizer"]["class_name"] == "Adam" and m["optimizer"]["config"]["use_ema"] is True
    assert m["pipeline"] == list(saved["step"].pipeline)
    var = {v["name"]: v for v in m["variables"]}
    assert var["dense/kernel"]["shape"] == [16, 8] and var["dense/kernel"]["layout"] == [None, "model"]
    assert var["dense/kernel"]["slots"] == {"m": [None, "model"], "v": [None, "model"], "average": [None, "model"]}
    assert var["dense/kernel"]["bytes_per_device"] == 16 * 2 * 4  # 8 columns over model=4
    assert var["dense/bias"]["bytes_per_device"] == 8 * 4
    assert m["convention"] == saved["step"].convention.to_json()
    assert m["tree"] == {"dict": {"blocks": {"list": [0, 1]}, "dense": {"dict": {"bias": 2, "kernel": 3}}}}
    names = [p["name"] for p in m["payloads"]]
    portable = ["exported-portable"] if m["kernels"] else []  # the module without kernels, stored beside
    assert names[:1 + len(portable)] == ["exported", *portable], names
    assert all(n.startswith("stage/") for n in names[1 + len(portable):]), names
    assert all(len(p["sha256"]) == 64 for p in m["payloads"])
    assert [s["name"] for s in m["stages"]] == ["frontend", *saved["step"].pipeline]


def test_tree_structures_round_trip_and_unsupported_nodes_are_refused():
    for tree in [{"a": 1, "b": [2, (3, None, {"c": 4})]}, [1, 2], (1,), {"x": {"y": {"z": 1}}}]:
        treedef = jax.tree_util.tree_structure(tree)
        doc = artifact.tree_to_json(treedef)
        assert artifact.tree_from_json(json.loads(json.dumps(doc)), treedef.num_leaves) == treedef
    Pair = namedtuple("Pair", "a b")
    with pytest.raises(ArtifactError, match="Pair node"):
        artifact.tree_to_json(jax.tree_util.tree_structure(Pair(1, 2)))
    with pytest.raises(ArtifactError, match="malformed params structure"):
        artifact.tree_from_json({"set": [0]}, 1)


def _payload_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    mlen = struct.unpack_from("<Q", data, 16)[0]
    off = HEADER_SIZE + mlen
    out = {}
    for p in json.loads(data[HEADER_SIZE:HEADER_SIZE + mlen])["payloads"]:
        out[p["name"]] = (off, p["size"])
        off += p["size"]
    return out


def _variant(data: bytes, how: str) -> bytes:
    b = bytearray(data)
    if how == "bad magic":
        b[0:8] = b"NOTSHARD"
    elif how == "unknown version":
        struct.pack_into("<I", b, 8, 99)
    elif how == "tampered manifest":
        i = b.index(b'"dense/kernel"', HEADER_SIZE)
        b[i + 1] = ord("D")
    elif how == "trailing bytes":
        b += b"extra"
    elif how == "bad trailer":
        b[-1] ^= 0xFF
    elif how.startswith("truncated at "):
        b = b[: int(how.rsplit(" ", 1)[1])]
    return bytes(b)


@pytest.mark.parametrize("how, message", [
    ("bad magic", "not a shardopt artifact"),
    ("unknown version", "unknown artifact format version 99"),
    ("tampered manifest", "manifest was modified or corrupted"),
    ("trailing bytes", "5 unexpected bytes"),
    ("bad trailer", "trailer"),
    ("truncated at 0", "not a shardopt artifact"),
    ("truncated at 30", "truncated"),
    ("truncated at 200", "truncated"),
    ("truncated at -1", "truncated"),
])
def test_damaged_files_are_rejected_with_the_reason(saved, tmp_path, how, message):
    data = saved["path"].read_bytes()
    if how == "truncated at -1":
        how = f"truncated at {len(data) - 1}"
    bad = tmp_path / "bad.shardopt"
    bad.write_bytes(_variant(data, how))
    with pytest.raises(ArtifactError, match=message):
        shardopt.load(bad)
    assert issubclass(ArtifactError, ValueError) and shardopt.ArtifactError is ArtifactError


def test_package_exports_are_lazy_and_complete():
    assert set(shardopt.__all__) == {*shardopt._EXPORTS, "__version__"}
    assert all(getattr(shardopt, name) is not None for name in shardopt.__all__)
    assert shardopt.load is functional.load


def test_a_flipped_byte_in_each_payload_names_that_payload(saved, tmp_path):
    data = saved["path"].read_bytes()
    offsets = _payload_offsets(data)
    assert len(offsets) >= 4
    for name, (off, size) in offsets.items():
        b = bytearray(data)
        b[off + size // 2] ^= 0x01
        bad = tmp_path / "flip.shardopt"
        bad.write_bytes(bytes(b))
        with pytest.raises(ArtifactError, match=f"payload '{name}' is corrupted"):
            read_container(bad)


def test_a_rehashed_manifest_that_contradicts_the_module_is_inconsistent(saved, tmp_path):
    manifest, payloads = read_container(saved["path"])
    kernel = next(a for a in manifest["convention"]["args"] if a["name"] == "dense/kernel")
    kernel["shape"] = [16, 16]
    enc = {p["name"]: (payloads[p["name"]], p["encoding"]) for p in manifest.pop("payloads")}
    bad = tmp_path / "rehashed.shardopt"
    container.write_container(bad, manifest, enc)
    want = r"inconsistent artifact: dense/kernel: export float32\[16, 8\] vs convention float32\[16, 16\]"
    with pytest.raises(ArtifactError, match=want):
        shardopt.load(bad)


def test_wrong_mesh_is_an_error(saved, mesh8):
    with pytest.raises(ArtifactError, match="wrong mesh: .* batch=2,model=4, got batch=4,model=2"):
        shardopt.load(saved["path"], mesh=jax.make_mesh((4, 2), ("batch", "model")))
    with pytest.raises(ArtifactError, match="wrong mesh: .* got x=8"):
        shardopt.load(saved["path"], mesh=mesh8)
    loaded = shardopt.load(saved["path"], mesh=jax.make_mesh((2, 4), ("batch", "model")))
    assert loaded.convention.mesh_axes == (("batch", 2), ("model", 4))


def test_params_that_do_not_match_the_manifest_are_rejected(saved):
    step = shardopt.load(saved["path"])
    params = jax.tree_util.tree_unflatten(step.treedef, saved["params"])
    missing = {"dense": dict(params["dense"]), "blocks": params["blocks"]}
    del missing["dense"]["bias"]
    with pytest.raises(shardopt.StepInputError, match=r"missing \['dense/bias'\]"):
        step.place_params(missing)
    extra = {**params, "head": np.zeros(3, np.float32)}
    with pytest.raises(shardopt.StepInputError, match=r"unexpected \['head'\]"):
        step.place_params(extra)
    wrong_shape = {"dense": {**params["dense"], "kernel": np.zeros((8, 16), np.float32)}, "blocks": params["blocks"]}
    with pytest.raises(shardopt.StepInputError, match=r"dense/kernel: expected shape \(16, 8\), got \(8, 16\)"):
        step.place_params(wrong_shape)
    placed = step.place_params(params)
    state = step.init(placed)
    grads = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float16), params)
    with pytest.raises(shardopt.StepInputError, match="expected dtype float32, got float16"):
        step(placed, grads, state)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(placed))  # nothing was donated


def test_save_is_atomic(saved, tmp_path, monkeypatch):
    target = tmp_path / "adam.shardopt"
    saved["step"].save(target)
    before = target.read_bytes()
    calls = []

    def crash_midway(f, chunk):
        calls.append(len(chunk))
        if len(calls) == 3:
            f.write(chunk[: len(chunk) // 2])
            raise OSError("disk full (simulated)")
        f.write(chunk)

    monkeypatch.setattr(container, "_write_chunk", crash_midway)
    with pytest.raises(OSError, match="simulated"):
        saved["step"].save(target)
    assert target.read_bytes() == before  # the old file is intact
    calls.clear()
    fresh = tmp_path / "new.shardopt"
    with pytest.raises(OSError, match="simulated"):
        saved["step"].save(fresh)
    assert not fresh.exists()
    assert sorted(os.listdir(tmp_path)) == ["adam.shardopt"]  # no temporary file left behind


def test_saving_without_stages(saved, tmp_path):
    lean = tmp_path / "lean.shardopt"
    size = saved["step"].save(lean, stages=False)
    assert size < saved["size"] and size == lean.stat().st_size
    manifest = read_manifest(lean)
    assert [p["name"] for p in manifest["payloads"]] == ["exported"] + (["exported-portable"] if manifest["kernels"]
                                                                        else [])
    step = shardopt.load(lean)
    assert [s.name for s in step.artifact.stages] == ["frontend", *step.pipeline]
    with pytest.raises(ValueError, match="was not saved"):
        step.inspect(stage="cleanup")
    assert lean.read_bytes().endswith(TRAILER)
