"""`jax.distributed` with a bound on how long a dead or hung peer goes unnoticed.

Out of the box (jax 0.10.2), when one process of a job dies the others either get a `JaxRuntimeError` from gloo
(if they were exchanging data with it at that moment) or keep running or blocking with no error, and then all of
them die by SIGABRT when the coordination service's heartbeat timeout (default 100 s) fires: the error is
propagated to every task and the client's error handler is `LOG(QFATAL)`. The handler cannot be replaced from
Python: `missed_heartbeat_callback` of the jaxlib client is called with an `absl::Status` that nanobind cannot
convert, and the process terminates with `std::bad_cast` instead.

`initialize` here therefore

1. turns on `jax_enable_recoverability`, so the service does not propagate a task's death to the others (and
   the shutdown barrier does not wait for it): no SIGABRT in the survivors when a non-coordinator peer dies;
2. runs a watchdog thread that beats through the distributed key-value store every `heartbeat_interval_s`
   and watches the others' beats; a peer silent for `peer_timeout_s` (killed, SIGSTOPped, wedged with its GIL
   held, or unreachable) is lost; so is the coordinator when the store stops answering;
3. then raises `PeerLostError` in the main thread (through a Python signal handler, so it surfaces at the next
   Python bytecode the main thread runs), calls `on_peer_lost(error)` in the watchdog thread, and sets
   `Watchdog.lost`. A main thread blocked inside XLA (a collective waiting for the dead peer) gets it when XLA
   returns: gloo fails at once with "Connection closed by peer" for a killed peer; for a hung one it waits for
   gloo's own timeout. `on_peer_lost` runs regardless, within the bound.

Limits: the process that hosts the coordination service (process 0 under `jax.distributed.initialize`) is
special: when it dies, jaxlib's error-polling RPC fails at once and the survivors abort inside jaxlib before
any Python code can run. Losing any other process is caught. `external_service=True` with `serve` running in
a process of its own removes that exception: then process 0 is a peer like the others.
"""

from __future__ import annotations

import _thread
import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from shardopt.compat import jax_private

PREFIX = "shardopt/heartbeat/"
DONE = "done"


class PeerLostError(RuntimeError):
    """A peer process of the job stopped beating (died, hung or became unreachable)."""

    def __init__(self, lost: tuple[int, ...], process_id: int, silent_s: float, detail: str = ""):
        self.lost = lost
        self.process_id = process_id
        self.silent_s = silent_s
        who = ", ".join(map(str, lost))
        super().__init__(f"process {process_id}: peer process(es) {who} lost (no heartbeat for {silent_s:.1f} s)"
                         + (f": {detail}" if detail else "")
                         + "; collectives with them will fail or block: save this process's state and exit")


class Watchdog:
    """The heartbeat thread of one process (`shardopt.distributed.initialize` starts it)."""

    def __init__(self, process_id: int, num_processes: int, peer_timeout_s: float, heartbeat_interval_s: float,
                 on_peer_lost: Callable[[PeerLostError], Any] | None, raise_in_main_thread: bool,
                 exit_if_blocked_s: float | None = None, blocked_exit_code: int = 75):
        self.process_id = process_id
        self.num_processes = num_processes
        self.peer_timeout_s = peer_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.on_peer_lost = on_peer_lost
        self.exit_if_blocked_s = exit_if_blocked_s
        self.blocked_exit_code = blocked_exit_code
        # the main thread ran Python after the loss (handler, check) or took charge (disarm)
        self.delivered = threading.Event()
        self.error: PeerLostError | None = None
        self.lost = threading.Event()
        self.detected_at: float | None = None  # time.monotonic() when the loss was detected
        self._stop = threading.Event()
        self._client = jax_private.distributed_client()
        self._signum: int | None = None
        self._defer_depth = 0
        self._pending = False
        self._previous_handler: Any = None
        if raise_in_main_thread and threading.current_thread() is threading.main_thread():
            self._signum = signal.SIGUSR1
            self._previous_handler = signal.signal(self._signum, self._raise_in_main)
        self._thread = threading.Thread(target=self._run, name="shardopt-peer-watchdog", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raises the PeerLostError if a peer is lost (for loops that poll instead of being interrupted)."""
        if self.error is not None:
            self.delivered.set()
            raise self.error

    def disarm(self) -> None:
        """No PeerLostError in the main thread from now on (call it first thing in an `except` that saves
        state, so a loss detected while saving does not interrupt the save; `lost`/`check()` still work).
        The main thread has then taken charge: `exit_if_blocked_s` no longer applies."""
        self.delivered.set()
        if self._signum is not None:
            signal.signal(self._signum, self._previous_handler)
            self._signum = None

    @contextlib.contextmanager
    def deferred(self):
        """A block the PeerLostError does not interrupt: it is raised when the block ends. Wrap each step
        (`with wd.deferred(): params, state = step(params, grads, state)`) so a loss never lands between the
        step donating its inputs and the assignment of its results, which would lose the state."""
        self._defer_depth += 1
        try:
            yield
        finally:
            self._defer_depth -= 1
        if self._defer_depth == 0 and self._pending:
            self._pending = False
            raise self.error

    def _raise_in_main(self, signum, frame):
        if self.error is None:
            return
        self.delivered.set()
        if self._defer_depth:
            self._pending = True
            return
        raise self.error

    def _beat(self, value: str) -> None:
        self._client.key_value_set(f"{PREFIX}{self.process_id}", value, True)

    def _run(self) -> None:
        start = last_ok = time.monotonic()
        last_seen = {p: start for p in range(self.num_processes) if p != self.process_id}
        last_value: dict[int, str] = {}
        beat = 0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                beat += 1
                self._beat(str(beat))
                for key, value in self._client.key_value_dir_get(PREFIX):
                    p = int(key.rsplit("/", 1)[-1])
                    if p in last_seen and value != last_value.get(p):
                        last_value[p] = value
                        last_seen[p] = now
                store_error, last_ok = None, now
            except Exception as e:  # the coordination service is unreachable: treat it as lost
                store_error = e
            done = {p for p, v in last_value.items() if v == DONE}
            silent = {p: now - t for p, t in last_seen.items() if p not in done and now - t > self.peer_timeout_s}
            if store_error is not None:
                self._lose((0,), now - last_ok,
                           f"the coordination service stopped answering: {type(store_error).__name__}: "
                           f"{store_error}")
                return
            if silent:
                self._lose(tuple(sorted(silent)), max(silent.values()))
                return
            self._stop.wait(self.heartbeat_interval_s)

    def _lose(self, lost: tuple[int, ...], silent_s: float, detail: str = "") -> None:
        self.error = PeerLostError(lost, self.process_id, silent_s, detail)
        self.detected_at = time.monotonic()
        self.lost.set()
        if self.on_peer_lost is not None:
            try:
                self.on_peer_lost(self.error)
            except Exception as e:  # never let a callback kill the watchdog silently
                print(f"shardopt.distributed: on_peer_lost raised {type(e).__name__}: {e}", flush=True)
        signum = self._signum
        if signum is not None:
            _thread.interrupt_main(signum)
        if self.exit_if_blocked_s is not None and not self.delivered.wait(self.exit_if_blocked_s):
            # the main thread is stuck inside a C++ call (a collective waiting for the lost peer): no Python
            # exception can reach it; exit with a distinct code instead of hanging until jax aborts
            print(f"shardopt.distributed: {self.error} -- the main thread is blocked inside XLA and did not "
                  f"take the error within {self.exit_if_blocked_s} s; exiting with code {self.blocked_exit_code}",
                  file=sys.stderr, flush=True)
            os._exit(self.blocked_exit_code)

    def stop(self, done: bool = True) -> None:
        """Stops beating; `done` tells the peers this process finished on purpose (so they do not flag it)."""
        self._stop.set()
        self._thread.join(timeout=max(5.0, 2 * self.heartbeat_interval_s))
        if done and self.error is None:
            try:
                self._beat(DONE)
            except Exception:
                pass
        self.disarm()


_watchdog: Watchdog | None = None


def initialize(coordinator_address: str, num_processes: int, process_id: int, *, peer_timeout_s: float = 60.0,
               heartbeat_interval_s: float | None = None, on_peer_lost: Callable[[PeerLostError], Any] | None = None,
               raise_in_main_thread: bool = True, exit_if_blocked_s: float | None = None,
               blocked_exit_code: int = 75, coordinator_bind_address: str | None = None,
               initialization_timeout: int = 300, shutdown_timeout_s: int = 30, external_service: bool = False,
               **jax_kwargs: Any) -> Watchdog:
    """`jax.distributed.initialize` plus a peer watchdog: a peer silent for `peer_timeout_s` raises
    `PeerLostError` in the main thread of every survivor (see the module docstring for what is and is not
    caught). Returns the Watchdog (`.lost`, `.error`, `.check()`); `shutdown()` stops it and the job.

    `on_peer_lost(error)` runs in the watchdog thread as soon as the loss is detected, even when the main thread
    is blocked inside XLA; `exit_if_blocked_s`: when the main thread has not taken the error (run Python) that
    many seconds after the loss, the process exits with `blocked_exit_code` (default 75, EX_TEMPFAIL) instead
    of hanging in a collective that waits for the dead peer (off by default).

    `external_service=True`: no process of the job hosts jax's coordination service; it runs in a process of
    its own (`python -m shardopt.distributed serve ADDRESS NUM_PROCESSES --peer-timeout-s T`, see `serve`), so
    the death of process 0 is caught like any other's (with the service inside process 0 the survivors abort).

    `coordinator_bind_address` defaults to `coordinator_address` (jax's default binds every interface).
    jax's own heartbeat timeout is set to twice `peer_timeout_s` (at least 10 s): it stays a backstop that
    fires after the watchdog.
    """
    global _watchdog
    if _watchdog is not None:
        raise RuntimeError("shardopt.distributed.initialize was already called in this process")
    if peer_timeout_s <= 0:
        raise ValueError(f"peer_timeout_s must be positive, got {peer_timeout_s}")
    interval = heartbeat_interval_s if heartbeat_interval_s is not None else min(5.0, max(0.1, peer_timeout_s / 5))
    if not 0 < interval < peer_timeout_s:
        raise ValueError(f"heartbeat_interval_s must be in (0, peer_timeout_s={peer_timeout_s}), got {interval}")
    jax.config.update("jax_enable_recoverability", True)
    jax_kwargs.setdefault("heartbeat_timeout_seconds", jax_heartbeat_timeout_s(peer_timeout_s))
    if external_service:
        if coordinator_bind_address is not None or set(jax_kwargs) - {"heartbeat_timeout_seconds"}:
            raise ValueError("external_service=True: the service's options belong to `serve`; got "
                             f"{sorted({*jax_kwargs, 'coordinator_bind_address'} - {'heartbeat_timeout_seconds'})}")
        jax_private.connect_distributed_client(coordinator_address, num_processes, process_id,
                                               initialization_timeout=initialization_timeout,
                                               heartbeat_timeout=jax_kwargs["heartbeat_timeout_seconds"],
                                               shutdown_timeout=shutdown_timeout_s)
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   coordinator_bind_address=coordinator_bind_address or coordinator_address,
                                   initialization_timeout=initialization_timeout,
                                   shutdown_timeout_seconds=shutdown_timeout_s, **jax_kwargs)
    _watchdog = Watchdog(process_id, num_processes, peer_timeout_s, interval, on_peer_lost, raise_in_main_thread,
                         exit_if_blocked_s, blocked_exit_code)
    return _watchdog


def jax_heartbeat_timeout_s(peer_timeout_s: float) -> int:
    """jax's own heartbeat timeout for a given peer timeout: a backstop that fires after the watchdog."""
    return max(10, math.ceil(2 * peer_timeout_s))


def serve(bind_address: str, num_processes: int, *, peer_timeout_s: float = 60.0, shutdown_timeout_s: int = 30,
          lifetime_s: float | None = None) -> None:
    """Hosts jax's coordination service for a job whose processes call `initialize(..., external_service=True)`
    with the same `peer_timeout_s`; runs until SIGTERM/SIGINT or `lifetime_s`. Run it beside the job (a
    sidecar, the launcher's own process), not inside a training process."""
    service = jax_private.start_distributed_service(bind_address, num_processes,
                                                    heartbeat_timeout=jax_heartbeat_timeout_s(peer_timeout_s),
                                                    shutdown_timeout=shutdown_timeout_s, recoverable=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"shardopt.distributed: coordination service for {num_processes} processes on {bind_address}", flush=True)
    stop.wait(lifetime_s)
    service.shutdown()


def watchdog() -> Watchdog | None:
    return _watchdog


def shutdown() -> None:
    """Stops the watchdog and shuts jax.distributed down (also after a lost peer: the shutdown barrier does not
    wait for it)."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
    jax.distributed.shutdown()


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m shardopt.distributed", description="jax's coordination service "
                                 "on its own, for a job started with initialize(..., external_service=True)")
    sub = ap.add_subparsers(dest="command", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("bind_address")
    sv.add_argument("num_processes", type=int)
    sv.add_argument("--peer-timeout-s", type=float, default=60.0)
    sv.add_argument("--lifetime-s", type=float, default=None)
    args = ap.parse_args(argv)
    serve(args.bind_address, args.num_processes, peer_timeout_s=args.peer_timeout_s, lifetime_s=args.lifetime_s)


if __name__ == "__main__":
    main()
