"""Gradient clipping with tf-keras's formulas and precedence (clipnorm, then global_clipnorm, then clipvalue).

Each function takes the raw gradients (dense arrays, or the `values` of sparse ones) and is traced into the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array


def clip_by_norm(x: Array, clip_norm: float) -> Array:
    """`tf.clip_by_norm` over all axes: x * c / max(||x||, c), with a NaN-free norm of zero."""
    c = jnp.asarray(clip_norm, x.dtype)
    l2sum = jnp.sum(x * x)
    positive = l2sum > 0
    l2norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, l2sum, jnp.ones_like(l2sum))), l2sum)
    return (x * c) / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.maximum(l2norm, c), x.shape))


def global_norm(xs: list[Array]) -> Array:
    """`tf.linalg.global_norm`: sqrt(2 * sum_i l2_loss(x_i)), l2_loss being sum(x^2)/2."""
    half_squares = [jnp.sum(x * x) / jnp.asarray(2, x.dtype) for x in xs]
    total = half_squares[0]
    for h in half_squares[1:]:
        total = total + h
    return jnp.sqrt(total * jnp.asarray(2, total.dtype))


def clip_by_global_norm(xs: list[Array], clip_norm: float) -> list[Array]:
    """`tf.clip_by_global_norm`: every x scaled by c*min(1/norm, 1/c); any non-finite x makes all NaN."""
    norm = global_norm(xs)
    c = jnp.asarray(clip_norm, norm.dtype)
    one = jnp.asarray(1, norm.dtype)
    scale = c * jnp.minimum(one / norm, one / c) + (norm - norm)
    return [x * scale.astype(x.dtype) for x in xs]


def clip_by_value(x: Array, clip_value: float) -> Array:
    """Elementwise clamp to [-c, c]."""
    c = jnp.asarray(clip_value, x.dtype)
    return jnp.maximum(jnp.minimum(x, c), -c)


def clip_gradients(xs: list[Array], clipnorm: float | None, global_clipnorm: float | None,
                   clipvalue: float | None) -> list[Array]:
    """tf-keras precedence: the first of clipnorm, global_clipnorm, clipvalue that is set and > 0 wins."""
    if clipnorm and clipnorm > 0:
        return [clip_by_norm(x, clipnorm) for x in xs]
    if global_clipnorm and global_clipnorm > 0:
        return clip_by_global_norm(xs, global_clipnorm) if xs else xs
    if clipvalue and clipvalue > 0:
        return [clip_by_value(x, clipvalue) for x in xs]
    return xs
