"""One process of the killed-peer tests: joins through shardopt.distributed.initialize (peer watchdog), steps a
compiled Adam over variables split across the processes until something goes wrong or TIME_LIMIT passes, and
records what it saw in <out>/fault.p<id>.json; a survivor then waits, saves its own shards (its "checkpoint")
and exits 0 by itself.

usage: python tests/mp_workers/fault_worker.py OUT_DIR GRADS PEER_TIMEOUT_S
  GRADS: numpy (host gradients: each step exchanges data across processes) or placed (jax arrays placed once)
"""

import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios  # noqa: E402

from shardopt import distributed  # noqa: E402

TIME_LIMIT_S = 60.0
STILL_ALIVE_AFTER_S = 3.0
EXIT_IF_BLOCKED_S = 3.0


def main() -> int:
    out_dir, grads_kind, peer_timeout_s = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    pid = int(os.environ["SHARDOPT_MP_PROCESS_ID"])
    record = {"process_id": pid, "grads": grads_kind}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    def on_peer_lost(error):  # runs in the watchdog thread, even while the main thread is blocked in XLA
        (out_dir / f"lost.p{pid}.json").write_text(json.dumps({"at": time.time(), "error": str(error)}))

    wd = distributed.initialize(os.environ["SHARDOPT_MP_COORDINATOR"], int(os.environ["SHARDOPT_MP_NUM_PROCESSES"]),
                                pid, peer_timeout_s=peer_timeout_s, heartbeat_interval_s=min(0.5, peer_timeout_s / 4),
                                on_peer_lost=on_peer_lost, exit_if_blocked_s=EXIT_IF_BLOCKED_S,
                                external_service=os.environ.get("SHARDOPT_MP_EXTERNAL_SERVICE") == "1",
                                initialization_timeout=60)
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    step = scenarios.compile_step(mesh)
    p0, grads = scenarios._tree_data(step, seed=5)
    if grads_kind == "placed":
        grads = [step.place_params(g) for g in grads]
    p = step.place_params(p0)
    s = step.init(p)
    i = 0
    t0 = time.time()
    try:
        while time.time() - t0 < TIME_LIMIT_S:
            with wd.deferred():  # a loss detected mid-step is raised after the assignment: no lost state
                p, s = step(p, grads[i % len(grads)], s)
                jax.block_until_ready(p)
            i += 1
            time.sleep(0.005)  # leave the shared CPUs some air
            if i == 20:
                (out_dir / f"ready.p{pid}").write_text(str(time.time()))
    except BaseException as e:  # PeerLostError from the watchdog, or JaxRuntimeError from gloo
        wd.disarm()
        record.update(error_type=type(e).__name__, error=str(e)[:1000], error_at=time.time(), steps=i)
        # a gloo error comes first when data was in flight; the watchdog names the peer within its bound
        record["watchdog_lost"] = wd.lost.wait(peer_timeout_s + 5)
        record["watchdog_error"] = str(wd.error) if wd.error else None
        record["watchdog_at"] = time.time() - (time.monotonic() - wd.detected_at) if wd.detected_at else None
    else:
        record.update(error_type=None, steps=i)
    time.sleep(STILL_ALIVE_AFTER_S)
    # the checkpoint: this process's own shards of what is intact (a step interrupted mid-call donated its inputs)
    shards = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path((p, s))[0]:
        if not leaf.is_deleted():
            for k, sh in enumerate(leaf.addressable_shards):
                shards[f"{jax.tree_util.keystr(path)}#{k}"] = np.asarray(sh.data)
    np.savez(out_dir / f"checkpoint.p{pid}.npz", **shards)
    record.update(alive_at=time.time(), checkpoint_arrays=len(shards))
    (out_dir / f"fault.p{pid}.json").write_text(json.dumps(record))
    distributed.shutdown()
    record["shutdown_at"] = time.time()
    (out_dir / f"fault.p{pid}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
