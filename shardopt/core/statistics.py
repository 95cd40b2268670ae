"""What each pass statistic means, in words a user knows (the passes report terse keys such as `units` or
`packed_leaves`, which scripts and tests read; people read these).

Shared by `shardopt inspect --html` (one statistics table per pass) and the examples (one line per pass). A key
missing here is still shown, spelled from its name; tests/test_report_words.py fails when a pass reports a key
this table does not describe.
"""

from __future__ import annotations

from typing import Any

# pass name -> statistic key -> what the number counts (read as "<value> <words>")
WORDS: dict[str, dict[str, str]] = {
    "inline-calls": {
        "calls_inlined": "function calls inlined into the step",
    },
    "lower-to-kernels": {
        "composites": "variable updates a compiled kernel could run",
        "lowered": "updates run by the compiled kernel",
        "kernels": "kernel calls, by kernel",
        "left": "left as XLA code, by reason",
        "scales_folded": "clipping scales folded into a kernel call",
        "bf16_gradients": "bfloat16 gradients handed to a kernel as they are",
        "library": "kernel library built for",
        "packs_lowered": "packs updated whole by one multi-tensor kernel call",
        "pack_members": "variables in those packs",
        "gradient_buffers_freed": "gradient gathers the pack kernel made unnecessary",
        "per_device": "kernel calls run per device on local shards (a manual computation over the mesh)",
        "state_sharded_unmarked": "variables with state sharded beyond their layout (shard_state_over), left as "
                                  "XLA code",
        "norms_lowered": "sums of squares (a pack's global norm, a large gradient's) by one in-place kernel call",
        "norms_fixed_order": "sums of squares of large gradients in buffers of their own put in the fixed order",
    },
    "fixed-order-sums": {
        "reductions": "float sums in the step",
        "rewritten": "sums across devices made to add the devices' partial sums in a fixed order",
        "gathers": "all-gathers of partial sums",
        "partials_gathered": "partial sums gathered",
        "left": "sums left as they were, by reason",
        "ops_moved": "operations moved to keep definitions before uses",
    },
    "propagate-layouts": {
        "arguments": "step inputs laid out",
        "checked": "layouts checked against the mesh",
        "followed_owner": "slots and gradients given their variable's layout",
        "replicated": "inputs replicated (scalars, the counter)",
        "results": "step outputs laid out like the state they replace",
        "scattered_gradients": "gradients taken reduce-scattered, in their state's layout",
    },
    "fuse-moments": {
        "units": "per-variable updates found",
        "groups": "fused updates (each runs once for many variables)",
        "tensors_per_group": "fused updates (how many x variables each)",
        "packed_leaves": "tensors the fused updates read packed",
        "pack_copies_folded": "copies into and out of packed state removed",
        "variable_updates_moved": "operations moved after the fused update they read",
        "results_unfused": "results left unfused, by reason",
    },
    "fuse-clipping": {
        "sums_of_squares": "gradient norms (sums of squares)",
        "groups": "groups of gradients of one dtype and layout",
        "tensors_per_group": "groups (how many x gradients each)",
        "batched_reductions": "batched norms (one pass reads many gradients)",
        "unbatched": "norms left unbatched, by reason",
        "packed_gradient_norms": "norms summed over a packed gradient (a flat pack's in the fixed order)",
        "norm_trees_collapsed": "global-norm sums collapsed into one reduction",
        "norm_tree_leaves": "partial sums those reductions add",
        "ops_moved": "operations reordered",
    },
}
OPS_BEFORE, OPS_AFTER = "ops_before", "ops_after"  # every fusing pass reports both: shown as one "operations" row
SIZES = "tensors_per_group"  # {group size: how many groups}, shown as "1 x 4, 1 x 8"
# terse reasons in a breakdown, spelled out
REASONS: dict[str, str] = {
    "large": "larger than max-elements (XLA's own reduction is faster)",
    "strided": "sharded on a minor dimension (the sums would read with a stride)",
}


def words(pass_name: str, key: str) -> str:
    """The words for one statistic (`key` spelled out when the table has none)."""
    return WORDS.get(pass_name, {}).get(key, key.replace("_", " "))


def _value(value: Any, key: str = "") -> str:
    if isinstance(value, dict) and key == SIZES:
        return ", ".join(f"{v} x {k}" for k, v in value.items()) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{REASONS.get(k, k)}: {v}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def describe(pass_name: str, stats: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Each statistic as (words, value, key), in the pass's order; `ops_before`/`ops_after` as one row
    ("operations", "1430 -> 1351")."""
    rows = []
    for key, value in stats.items():
        if key == OPS_AFTER and OPS_BEFORE in stats:
            continue
        if key == OPS_BEFORE and OPS_AFTER in stats:
            rows.append(("operations", f"{value} -> {stats[OPS_AFTER]}", f"{OPS_BEFORE}, {OPS_AFTER}"))
            continue
        rows.append((words(pass_name, key), _value(value, key), key))
    return rows


def sentence(pass_name: str, stats: dict[str, Any]) -> str:
    """The statistics on one line, zeros and empty breakdowns left out: '28 per-variable updates found, ...'."""
    parts = []
    for text, value, key in describe(pass_name, stats):
        raw = stats.get(key)
        if raw in (0, {}, [], None, "") and key in stats:
            continue
        if key.startswith(OPS_BEFORE):
            parts.append(f"operations {value}")
        elif isinstance(raw, (dict, list, tuple)):
            parts.append(f"{text}: {value}")
        elif key == "library":
            parts.append(f"{text} {value}")
        else:
            parts.append(f"{value} {text}")
    return "; ".join(parts) or "nothing to do"


__all__ = ["REASONS", "WORDS", "describe", "sentence", "words"]
