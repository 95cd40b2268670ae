"""Damaged and hostile artifact files (issue 13): the reserved header bytes are checked, a deeply nested manifest
is an ArtifactError (also through the CLI), special files are refused before anything is read, what is read is
bounded by what the header announces, a save killed mid-write leaves nothing behind for long, and a fuzz run over
truncations, byte flips and special files only ever raises ArtifactError."""

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap

import pytest

import shardopt
from shardopt.runtime import container
from shardopt.runtime.container import HEADER_SIZE, ArtifactError, read_container, read_manifest

# Runs container reads in a fresh process with 1 GiB of address space and a time limit: without the fixes a FIFO
# blocks and /dev/zero reads until memory runs out, which would take pytest (or the machine) down with it.
SPECIAL_FILES = textwrap.dedent("""
    import json, os, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from shardopt.runtime.container import ArtifactError, read_container, read_manifest
    out = {}
    for path in sys.argv[1:]:
        for fn in (read_manifest, read_container):
            try:
                fn(path)
                out[f"{fn.__name__} {path}"] = "loaded"
            except ArtifactError as e:
                out[f"{fn.__name__} {path}"] = "ArtifactError: " + str(e)
            except BaseException as e:
                out[f"{fn.__name__} {path}"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))
""")


def small_container(tmp_path, name="a.shardopt"):
    path = tmp_path / name
    container.write_container(path, {"kind": "test", "names": ["w"]},
                              {"one": (b"x" * 100, "raw"), "two": (b"y" * 1000, "zlib")})
    return path


def rehashed(data: bytes, manifest_bytes: bytes) -> bytes:
    """`data` with its manifest replaced by `manifest_bytes` and the header's length and hash to match."""
    mlen = struct.unpack_from("<Q", data, 16)[0]
    header = bytearray(data[:HEADER_SIZE])
    struct.pack_into("<Q32s", header, 16, len(manifest_bytes), hashlib.sha256(manifest_bytes).digest())
    return bytes(header) + manifest_bytes + data[HEADER_SIZE + mlen:]


def deep_manifest(depth=100_000) -> bytes:
    return b'{"format_version":1,"payloads":[],"x":' + b"[" * depth + b"]" * depth + b"}"


# ----- the header's reserved bytes ------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [12, 13, 14, 15])
def test_a_flip_in_the_reserved_header_bytes_is_an_artifact_error(tmp_path, offset):
    path = small_container(tmp_path)
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x01
    path.write_bytes(bytes(b))
    for read in (read_manifest, read_container):
        with pytest.raises(ArtifactError, match="reserved bytes 12-15"):
            read(path)


# ----- deep manifests -------------------------------------------------------------------------------------------
def test_a_deeply_nested_manifest_is_an_artifact_error_not_a_recursion_error(tmp_path):
    path = small_container(tmp_path)
    path.write_bytes(rehashed(path.read_bytes(), deep_manifest()))
    for read in (read_manifest, read_container, shardopt.load):
        with pytest.raises(ArtifactError, match="nests too deeply|nests deeper"):
            read(path)
    # Deep enough to parse but deeper than any params tree needs: refused before anything recurses over it.
    path.write_bytes(rehashed(path.read_bytes(), deep_manifest(container.MAX_MANIFEST_DEPTH + 10)))
    with pytest.raises(ArtifactError, match=f"nests deeper than {container.MAX_MANIFEST_DEPTH}"):
        read_manifest(path)


@pytest.mark.parametrize("command", [["inspect"], ["inspect", "--manifest"], ["run"]])
def test_the_cli_reports_a_deep_manifest_as_an_error_without_a_traceback(tmp_path, command):
    path = small_container(tmp_path)
    path.write_bytes(rehashed(path.read_bytes(), deep_manifest()))
    args = [command[0], str(path), *command[1:]]
    r = subprocess.run([sys.executable, "-m", "shardopt", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"shardopt {command[0]}: error:" in r.stderr and "nests too deeply" in r.stderr
    assert "Traceback" not in r.stderr and "RecursionError" not in r.stderr


# ----- special files and bounded reads --------------------------------------------------------------------------
def test_special_files_are_refused_up_front_without_blocking_or_reading_them(tmp_path):
    fifo = tmp_path / "fifo.shardopt"
    os.mkfifo(fifo)  # no writer: opening it for reading would block forever
    link = tmp_path / "zero.shardopt"
    link.symlink_to("/dev/zero")
    paths = [str(fifo), "/dev/zero", "/dev/urandom", "/dev/null", str(tmp_path), str(link)]
    r = subprocess.run([sys.executable, "-c", SPECIAL_FILES, *paths], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(r.stdout)
    assert len(results) == 2 * len(paths)
    bad = {k: v for k, v in results.items() if not v.startswith("ArtifactError: ")}
    assert not bad
    assert "a FIFO, not a shardopt artifact" in results[f"read_manifest {fifo}"]
    assert "a character device" in results["read_container /dev/zero"]
    assert "a directory" in results[f"read_container {tmp_path}"]


def test_a_manifest_length_beyond_the_file_is_refused_before_reading(tmp_path, monkeypatch):
    path = small_container(tmp_path)
    b = bytearray(path.read_bytes())
    struct.pack_into("<Q", b, 16, 1 << 62)
    path.write_bytes(bytes(b))
    for read in (read_manifest, read_container):
        with pytest.raises(ArtifactError, match=r"announces a \d+-byte manifest but the file has"):
            read(path)


def test_reads_never_ask_for_more_than_the_file_announces(tmp_path, monkeypatch):
    """The reader asks the OS for header, manifest and payloads by their announced sizes, never "everything"."""
    path = small_container(tmp_path)
    size = path.stat().st_size
    requested = []
    real_fdopen = os.fdopen

    class Recorder:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            requested.append(n)
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(container.os, "fdopen", lambda fd, mode="r", *a, **k: Recorder(real_fdopen(fd, mode)))
    read_container(path)
    assert requested and all(0 <= n <= size for n in requested) and sum(requested) == size
    requested.clear()
    read_manifest(path)
    assert all(0 <= n < size for n in requested)


# ----- stale temporary files of killed saves --------------------------------------------------------------------
KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from shardopt.runtime import container
    calls = []
    def die_midway(f, chunk):
        calls.append(1)
        f.write(chunk[: len(chunk) // 2])
        if len(calls) == 3:
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        f.write(chunk[len(chunk) // 2:])
    container._write_chunk = die_midway
    container.write_container(sys.argv[1], {"kind": "test"}, {"one": (b"x" * 4096, "raw"), "two": (b"y" * 4096, "raw")})
""")


def test_the_next_save_removes_temporary_files_of_killed_saves(tmp_path):
    target = tmp_path / "adam.shardopt"
    seen = []
    for _ in range(2):  # the second killed save removes the first one's file before it is killed in turn
        r = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target)], capture_output=True, timeout=60)
        assert r.returncode == -signal.SIGKILL, r.stderr
        partials = [p.name for p in tmp_path.iterdir()]
        assert len(partials) == 1 and partials[0].startswith(".adam.shardopt.") and partials[0].endswith(".partial")
        assert partials[0] not in seen
        seen.append(partials[0])
    assert not target.exists()
    # Temporary files that are not stale stay: a live writer's (this process's pid, a sleeping child's) and other
    # targets' (a name that merely starts like this one's).
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = [f".adam.shardopt.{os.getpid()}.0123abcd.partial", f".adam.shardopt.{sleeper.pid}.0123abcd.partial",
                ".adam.shardopt.bak.1.0123abcd.partial", "adam.shardopt.1.0123abcd.partial"]
        for name in keep:
            (tmp_path / name).write_bytes(b"in progress")
        small_container(tmp_path, "adam.shardopt")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "adam.shardopt"])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert read_container(target)[0]["kind"] == "test"


# ----- fuzz -----------------------------------------------------------------------------------------------------
FUZZ = textwrap.dedent("""
    import faulthandler, json, os, stat, struct, sys, tempfile
    faulthandler.enable()
    import shardopt
    from shardopt.runtime.container import HEADER_SIZE, ArtifactError

    src, workdir = sys.argv[1], sys.argv[2]
    data = open(src, "rb").read()
    shardopt.load(src)  # the undamaged file loads
    mlen = struct.unpack_from("<Q", data, 16)[0]
    payload_start = HEADER_SIZE + mlen
    payloads = json.loads(data[HEADER_SIZE:payload_start])["payloads"]

    cases = []
    n = len(data)
    for cut in sorted({*range(0, HEADER_SIZE + 65), *range(0, n, max(1, n // 150)), n - 9, n - 8, n - 1}):
        cases.append((f"truncated at {cut}", data[:cut]))
    positions = set(range(HEADER_SIZE)) | set(range(HEADER_SIZE, payload_start, max(1, mlen // 150)))
    off = payload_start
    for p in payloads:
        positions |= {off, off + p["size"] - 1, *range(off, off + p["size"], max(1, p["size"] // 20))}
        off += p["size"]
    positions |= set(range(n - 8, n))
    for pos in sorted(positions):
        for mask in (0x01, 0x80):
            b = bytearray(data)
            b[pos] ^= mask
            cases.append((f"flip {mask:#04x} at {pos}", bytes(b)))
    cases.append(("appended byte", data + b"\\0"))
    cases.append(("empty", b""))

    results = {"ok": 0, "loaded": [], "other": []}
    for i, (how, blob) in enumerate(cases):
        path = os.path.join(workdir, f"case{i % 4}.shardopt")
        with open(path, "wb") as f:
            f.write(blob)
        faulthandler.dump_traceback_later(10, exit=True)  # a hang is a failure, not a stuck test
        try:
            shardopt.load(path)
            results["loaded"].append(how)
        except ArtifactError:
            results["ok"] += 1
        except BaseException as e:
            results["other"].append(f"{how}: {type(e).__name__}: {e}"[:300])
        finally:
            faulthandler.cancel_dump_traceback_later()

    fifo = os.path.join(workdir, "fifo.shardopt")
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero", "/dev/urandom", "/dev/null", workdir):
        faulthandler.dump_traceback_later(10, exit=True)
        try:
            shardopt.load(path)
            results["loaded"].append(path)
        except ArtifactError:
            results["ok"] += 1
        except BaseException as e:
            results["other"].append(f"{path}: {type(e).__name__}: {e}"[:300])
        finally:
            faulthandler.cancel_dump_traceback_later()
    results["cases"] = len(cases) + 5
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def real_artifact(mesh, tmp_path_factory):
    """A real step artifact (EMA + global-norm clipping, two variables)."""
    lay = shardopt.Layout
    specs = {"kernel": shardopt.VariableSpec((8, 4), "float32", lay([shardopt.UNSHARDED, "model"], mesh)),
             "bias": shardopt.VariableSpec((4,), "float32")}
    step = shardopt.Adam(1e-3, use_ema=True, global_clipnorm=1.0, mesh=mesh).compile(specs)
    path = tmp_path_factory.mktemp("fuzz") / "adam.shardopt"
    step.save(path)
    return path


@pytest.mark.slow
def test_fuzzed_artifacts_only_ever_raise_artifact_error(real_artifact, tmp_path):
    """Truncations at many offsets, byte flips over header, manifest, every payload and the trailer, and special
    files, each loaded with `shardopt.load` in a subprocess (so a crash or hang fails this test, not pytest).
    Every flip must be refused: the hashes cover every byte."""
    r = subprocess.run([sys.executable, "-c", FUZZ, str(real_artifact), str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert results["other"] == [] and results["loaded"] == []
    assert results["ok"] == results["cases"] > 1000
