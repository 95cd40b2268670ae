"""A torch fused-Adam worker in its own process (no JAX runtime threads competing with torch's OpenMP threads).

    python benchmarks/_torch_step.py     # first stdin line: {"shapes": [[3700], ...], "threads": null or N}

It builds the parameters (0.02 * randn) and gradients (1e-3 * randn), runs one `torch.optim.Adam(fused=True)`
step, prints {"ready": true, "first_step_s", "threads", "torch"}, then for every "step" line runs one step and
prints its wall seconds; "quit" ends it. bench_step.py interleaves these steps with its JAX rows.
"""

import json
import sys
import time


def main() -> None:
    import torch

    req = json.loads(sys.stdin.readline())
    if req.get("threads"):
        torch.set_num_threads(int(req["threads"]))
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in req["shapes"]:
        p = torch.nn.Parameter(0.02 * torch.randn(*shape, generator=gen))
        p.grad = 1e-3 * torch.randn(*shape, generator=gen)
        params.append(p)
    opt = torch.optim.Adam(params, lr=1e-3, eps=1e-7, fused=True)
    t0 = time.perf_counter()
    opt.step()
    first = time.perf_counter() - t0
    print(json.dumps({"ready": True, "first_step_s": first, "threads": torch.get_num_threads(),
                      "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        opt.step()
        print(time.perf_counter() - t0, flush=True)


if __name__ == "__main__":
    main()
