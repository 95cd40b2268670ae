"""Launch N local jax processes (M CPU devices each) under `jax.distributed` on loopback, bounded and
self-stopping: every child has a deadline and is killed in a `finally`, whatever happens in the test.

The children do not inherit the test process's `--xla_force_host_platform_device_count=8` (tests/conftest.py):
their XLA_FLAGS are rebuilt with their own device count, and they use gloo for cross-process collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "mp_workers"
DEFAULT_TIMEOUT_S = 120.0


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, coordinator: str, devices_per_process: int,
              extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    # the worktree's shardopt must win over any installed copy, in the children too
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["SHARDOPT_MP_COORDINATOR"] = coordinator
    env["SHARDOPT_MP_NUM_PROCESSES"] = str(num_processes)
    env["SHARDOPT_MP_PROCESS_ID"] = str(process_id)
    env["SHARDOPT_MP_DEVICES_PER_PROCESS"] = str(devices_per_process)
    env.update(extra or {})
    return env


@dataclasses.dataclass
class ProcResult:
    process_id: int
    returncode: int | None  # None: still running at the deadline (then killed); negative: died by that signal
    stdout: str
    stderr: str
    killed_at_deadline: bool = False

    def describe(self) -> str:
        return (f"--- process {self.process_id}: rc={self.returncode}"
                f"{' (killed at the deadline)' if self.killed_at_deadline else ''}\n"
                f"stdout:\n{self.stdout[-4000:]}\nstderr:\n{self.stderr[-4000:]}")


def launch(args: Sequence[str], workdir: Path, *, num_processes: int = 2, devices_per_process: int = 4,
           timeout_s: float = DEFAULT_TIMEOUT_S, env: dict[str, str] | None = None,
           monitor: Callable[[list[subprocess.Popen]], None] | None = None,
           coordinator: str | None = None) -> list[ProcResult]:
    """Runs `python *args` once per process (ids 0..num_processes-1) and waits for all of them, at most
    `timeout_s` in all; any still running then is killed. `monitor(procs)` is called about every 50 ms while
    they run (the fault tests kill a peer from there). Output goes to files, so a chatty child cannot block."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    coordinator = coordinator or f"127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen] = []
    files = []
    deadline = time.monotonic() + timeout_s
    timed_out = set()
    try:
        for pid in range(num_processes):
            out = open(workdir / f"stdout.{pid}.txt", "w+b")  # closed in the finally
            err = open(workdir / f"stderr.{pid}.txt", "w+b")
            files.append((out, err))
            procs.append(subprocess.Popen(
                [sys.executable, *args], cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env=child_env(pid, num_processes, coordinator, devices_per_process, env),
                start_new_session=True))
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if monitor is not None:
                monitor(procs)
            time.sleep(0.05)
        for i, p in enumerate(procs):
            if p.poll() is None:
                timed_out.add(i)
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the child and anything it started
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        results = []
        for i, (p, (out, err)) in enumerate(zip(procs, files, strict=False)):
            out.seek(0)
            err.seek(0)
            results.append(ProcResult(i, None if i in timed_out else p.returncode,
                                      out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                                      killed_at_deadline=i in timed_out))
            out.close()
            err.close()
    return results


@contextlib.contextmanager
def coordination_service(workdir: Path, num_processes: int = 2, peer_timeout_s: float = 60.0,
                         lifetime_s: float = DEFAULT_TIMEOUT_S):
    """`python -m shardopt.distributed serve` in a process of its own, on a free loopback port; yields its
    address (for launch(coordinator=...), with SHARDOPT_MP_EXTERNAL_SERVICE=1 for the workers). It stops by
    itself after `lifetime_s` and is killed on leaving the block."""
    address = f"127.0.0.1:{free_port()}"
    log = open(Path(workdir) / "service.txt", "w+b")  # closed in the finally
    proc = subprocess.Popen([sys.executable, "-m", "shardopt.distributed", "serve", address, str(num_processes),
                             "--peer-timeout-s", str(peer_timeout_s), "--lifetime-s", str(lifetime_s)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=child_env(0, num_processes, address, 1), start_new_session=True)
    try:
        yield address
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()


def describe(results: Sequence[ProcResult]) -> str:
    return "\n".join(r.describe() for r in results)


def load_result(workdir: Path, name: str, pid: int, results: Sequence[ProcResult]) -> dict[str, np.ndarray]:
    """What worker scenario `name` saved in process `pid` (`<name>.p<pid>.npz`); fails the test with the
    scenario's error, or with every process's output when it saved nothing."""
    import pytest

    err = workdir / f"{name}.p{pid}.error.txt"
    if err.exists():
        pytest.fail(f"{name} raised in process {pid}:\n{err.read_text()}")
    f = workdir / f"{name}.p{pid}.npz"
    if not f.exists():
        pytest.fail(f"process {pid} saved no result for {name}\n{describe(results)}")
    with np.load(f) as z:
        return {k: z[k] for k in z.files}
