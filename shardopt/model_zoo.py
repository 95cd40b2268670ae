"""Variable shapes of real models, for the example, the benchmarks and tests (no weights, just specs)."""

from __future__ import annotations

from jax.sharding import Mesh

from shardopt.core.layout import UNSHARDED, Layout
from shardopt.core.specs import VariableSpec


def gpt2_small(mesh: Mesh | None = None, model_axis: str = "model", n_layer: int = 12, d_model: int = 768,
               vocab: int = 50257, n_ctx: int = 1024) -> dict[str, VariableSpec]:
    """GPT-2 small's 148 float32 tensors (124M parameters), Megatron-style layouts on `model_axis`.

    Column-parallel matrices (c_attn, c_fc) split their output dimension, row-parallel ones (c_proj) their input
    dimension, embeddings their feature dimension (50257 is not divisible by a power of two); the rest is
    replicated. Without a mesh every layout is None (replicated on the optimizer's mesh).
    """
    def lay(*specs: str) -> Layout | None:
        return None if mesh is None else Layout(list(specs), mesh)

    U, M = UNSHARDED, model_axis
    specs: dict[str, VariableSpec] = {}

    def add(name: str, shape: tuple[int, ...], layout: Layout | None) -> None:
        specs[name] = VariableSpec(shape, "float32", layout, name)

    add("wte", (vocab, d_model), lay(U, M))
    add("wpe", (n_ctx, d_model), lay(U, M))
    for i in range(n_layer):
        p = f"h{i}"
        add(f"{p}/ln_1/g", (d_model,), lay(U))
        add(f"{p}/ln_1/b", (d_model,), lay(U))
        add(f"{p}/attn/c_attn/w", (d_model, 3 * d_model), lay(U, M))
        add(f"{p}/attn/c_attn/b", (3 * d_model,), lay(M))
        add(f"{p}/attn/c_proj/w", (d_model, d_model), lay(M, U))
        add(f"{p}/attn/c_proj/b", (d_model,), lay(U))
        add(f"{p}/ln_2/g", (d_model,), lay(U))
        add(f"{p}/ln_2/b", (d_model,), lay(U))
        add(f"{p}/mlp/c_fc/w", (d_model, 4 * d_model), lay(U, M))
        add(f"{p}/mlp/c_fc/b", (4 * d_model,), lay(M))
        add(f"{p}/mlp/c_proj/w", (4 * d_model, d_model), lay(M, U))
        add(f"{p}/mlp/c_proj/b", (d_model,), lay(U))
    add("ln_f/g", (d_model,), lay(U))
    add("ln_f/b", (d_model,), lay(U))
    return specs


def many_small(count: int = 2000, size: int = 3700) -> dict[str, VariableSpec]:
    """`count` replicated float32 vectors of `size` elements (2000 x 3700 = 7.4M parameters)."""
    return {f"t{i}": VariableSpec((size,), "float32", None, f"t{i}") for i in range(count)}
