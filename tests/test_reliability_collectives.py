"""XLA:CPU collectives on a loaded machine (issue 13): the in-process all-reduce of the virtual CPU devices aborts
the process when one device's thread arrives xla_cpu_collective_call_warn_stuck_timeout_seconds (20 s) +
xla_cpu_collective_call_terminate_timeout_seconds (40 s) after the others. The CLI and the tests raise the
termination timeout; these tests pin that jaxlib accepts the flags and that the termination flag is the one that
decides (a device made to lag aborts the process under a short timeout and not under ours)."""

import os
import subprocess
import sys
import textwrap

import pytest

from shardopt import cli

# One psum over 8 virtual devices; device 0 arrives LAG seconds late (a host callback sleeps before the psum).
PSUM = textwrap.dedent("""
    import sys, time
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    lag = float(sys.argv[1])
    mesh = jax.make_mesh((8,), ("x",))
    assert len(jax.devices()) == 8
    def late(i, a):
        if int(i) == 0:
            time.sleep(lag)
        return a
    def body(a):
        a = jax.pure_callback(late, jax.ShapeDtypeStruct(a.shape, a.dtype), jax.lax.axis_index("x"), a)
        return jax.lax.psum(a, "x")
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P()))
    x = jax.device_put(np.arange(8, dtype=np.float32), NamedSharding(mesh, P("x")))
    print("psum", float(f(x)[0]), flush=True)
""")


def run_psum(xla_flags, lag=0.0):
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", PSUM, str(lag)], capture_output=True, text=True, timeout=120,
                          env=env)


def test_the_collective_timeout_flags_parse_and_a_psum_runs():
    flags = cli.with_collective_timeouts("--xla_force_host_platform_device_count=8")
    assert "--xla_cpu_collective_call_terminate_timeout_seconds=3600" in flags
    assert "--xla_cpu_collective_timeout_seconds=3600" in flags
    r = run_psum(flags)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "psum 28.0" in r.stdout
    # The tests themselves run with them (conftest.py).
    assert all(f"--{name}=" in os.environ["XLA_FLAGS"] for name in cli.COLLECTIVE_TIMEOUT_FLAGS)


def test_an_unknown_flag_would_abort_so_the_check_above_means_something():
    r = run_psum("--xla_force_host_platform_device_count=8 --xla_cpu_no_such_flag_seconds=1")
    assert r.returncode != 0 and "Unknown flag" in r.stderr


@pytest.mark.slow
def test_the_termination_flag_decides_whether_a_late_device_aborts_the_process():
    base = "--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_warn_stuck_timeout_seconds=1"
    short = run_psum(f"{base} --xla_cpu_collective_call_terminate_timeout_seconds=1", lag=4)
    assert short.returncode != 0 and "Termination timeout for `all reduce" in short.stderr, short.stderr[-2000:]
    ours = run_psum(cli.with_collective_timeouts(base), lag=4)
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert "psum 28.0" in ours.stdout


def test_ensure_cpu_devices_adds_the_timeouts_but_keeps_the_users(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_collective_timeout_seconds=5")
    cli.ensure_cpu_devices(8)
    flags = os.environ["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=8" in flags
    assert "--xla_cpu_collective_call_terminate_timeout_seconds=3600" in flags
    assert [f for f in flags if "xla_cpu_collective_timeout_seconds" in f] == ["--xla_cpu_collective_timeout_seconds=5"]
    monkeypatch.setenv("XLA_FLAGS", "")
    cli.ensure_cpu_devices(1)
    assert "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]
    assert "--xla_cpu_collective_call_terminate_timeout_seconds=3600" in os.environ["XLA_FLAGS"]
