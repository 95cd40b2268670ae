"""One process of a multi-process run (started by tests/multiprocess_lib.launch, which sets the SHARDOPT_MP_*
environment): joins the job through `jax.distributed.initialize`, runs the named scenarios of
tests/mp_workers/scenarios.py (and host_gradient_scenarios.py, scattered_jit.py) on the global 2x4 mesh, and
saves each result as <out>/<scenario>.p<id>.npz (or <scenario>.p<id>.error.txt with the traceback when it raises).

usage: python tests/mp_workers/worker.py OUT_DIR [LABEL:]SCENARIO[=ARG] ...   (results saved under LABEL,
default the scenario's name, so one scenario can run twice with different arguments)
"""

import os
import sys
import time
import traceback
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_gradient_scenarios  # noqa: E402
import scattered_jit  # noqa: E402
import scenarios  # noqa: E402

SCENARIOS = {**scenarios.SCENARIOS, **host_gradient_scenarios.SCENARIOS, **scattered_jit.SCENARIOS}


def main() -> int:
    out_dir = Path(sys.argv[1])
    pid = int(os.environ["SHARDOPT_MP_PROCESS_ID"])
    coordinator = os.environ["SHARDOPT_MP_COORDINATOR"]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, int(os.environ["SHARDOPT_MP_NUM_PROCESSES"]), pid,
                               coordinator_bind_address=coordinator, initialization_timeout=60,
                               heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)
    assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("batch", "model"))
    for item in sys.argv[2:]:
        head, _, arg = item.partition("=")
        label, _, scenario = head.rpartition(":")
        name = label or scenario
        t0 = time.perf_counter()
        try:
            result = SCENARIOS[scenario](mesh, *([arg] if arg else []))
        except Exception:
            (out_dir / f"{name}.p{pid}.error.txt").write_text(traceback.format_exc())
            print(f"[{pid}] {name}: FAILED", flush=True)
            continue
        np.savez(out_dir / f"{name}.p{pid}.npz", **result)
        print(f"[{pid}] {name}: {time.perf_counter() - t0:.2f} s", flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
