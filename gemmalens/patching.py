"""Activation patching sweeps and attribution patching, each one compiled computation.

Convention (as in TransformerLens): run the *corrupted* prompt, and at one site at a time
put back the value that site had in the *clean* run; record ``metric(logits)``. A site is
one (layer, position) of a residual-stream-shaped hook, or one (layer, head) of a per-head
hook (``z``, ``q``, ``k``, ``v``, ``pattern``), patched at every position.

`sweep` does every site in one ``jax.jit``-compiled program: the forward pass is
``jax.vmap``-ed over the site index, and each hook blends clean and corrupted values with a
one-hot mask computed from that (traced) index. `attribution_patching` replaces the sweep
by its first-order estimate ``(clean - corrupted) . d metric / d value`` at the corrupted
run, from one forward and one backward pass (``jax.grad``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from penzai import pz

from gemmalens.layers.hooks import HookPoint, InterveneHook

if TYPE_CHECKING:
    from gemmalens.lens import Model

Metric = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Site:
    """A kind of patch site: the hook name pattern and which axis indexes its units.

    ``unit_axis`` is the axis of the user-facing (batch-first) value that a site patches
    one entry of: 1 is ``pos`` for ``[batch, pos, ...]`` values; heads are axis 2 of
    ``[batch, pos, head, d_head]`` and axis 1 of ``[batch, head, q_pos, k_pos]``.
    """

    hook: str
    unit_axis: int
    unit: str


SITES: dict[str, Site] = {
    "resid_pre": Site("blocks.{}.hook_resid_pre", 1, "pos"),
    "resid_mid": Site("blocks.{}.hook_resid_mid", 1, "pos"),
    "resid_post": Site("blocks.{}.hook_resid_post", 1, "pos"),
    "attn_out": Site("blocks.{}.hook_attn_out", 1, "pos"),
    "mlp_out": Site("blocks.{}.hook_mlp_out", 1, "pos"),
    "z": Site("blocks.{}.attn.hook_z", 2, "head"),
    "q": Site("blocks.{}.attn.hook_q", 2, "head"),
    "k": Site("blocks.{}.attn.hook_k", 2, "kv_head"),
    "v": Site("blocks.{}.attn.hook_v", 2, "kv_head"),
    "pattern": Site("blocks.{}.attn.hook_pattern", 1, "head"),
}


def site_names(m: Model, site: str) -> tuple[str, ...]:
    """The hook names of ``site`` for every layer, in layer order."""
    if site not in SITES:
        raise ValueError(f"Unknown patch site {site!r}; choose one of {sorted(SITES)}.")
    names = tuple(SITES[site].hook.format(i) for i in range(m.config.num_hidden_layers))
    missing = [n for n in names if n not in m.hook_names]
    if missing:
        raise ValueError(f"This model has no hook point {missing[0]!r} for site {site!r}.")
    return names


def _with_hook_fns(model: Any, fns: dict[str, Callable]) -> Any:
    # Called inside a traced function, so the fns may close over tracers: the rewritten
    # tree never crosses a jit boundary, so its static fields are never hashed.
    return (
        pz.select(model)
        .at_instances_of(HookPoint)
        .where(lambda hp: hp.name in fns)
        .apply(lambda hp: InterveneHook(name=hp.name, axes=hp.axes, fn=fns[hp.name]))
    )


def _forward(model: Any, tokens: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    side = {}
    if attention_mask is not None:
        side["attention_mask"] = pz.nx.wrap(attention_mask).tag("batch", "seq")
    logits = model(pz.nx.wrap(tokens).tag("batch", "seq"), **side)
    return logits.unwrap("batch", "seq", "vocab")


def _unit_mask(selected: jax.Array, ndim: int, axis: int) -> jax.Array:
    """``selected`` ([units], bool) shaped to broadcast along ``axis`` of an ndim array."""
    shape = [1] * ndim
    shape[axis] = selected.shape[0]
    return selected.reshape(shape)


@functools.partial(jax.jit, static_argnames=("names", "unit_axis", "metric", "chunk_size"))
def _sweep(model, clean_values, tokens, attention_mask, *, names, unit_axis, metric, chunk_size):
    layers, units = len(names), clean_values[0].shape[unit_axis]

    def patched_metric(site: jax.Array) -> jax.Array:
        chosen = (jnp.arange(layers * units) == site).reshape(layers, units)

        def blend(layer: int) -> Callable:
            def fn(value: jax.Array, name: str) -> jax.Array:
                # where, not a weighted sum: the patched entry is bit-for-bit the clean one.
                mask = _unit_mask(chosen[layer], value.ndim, unit_axis)
                return jnp.where(mask, clean_values[layer].astype(value.dtype), value)

            return fn

        hooked = _with_hook_fns(model, {n: blend(i) for i, n in enumerate(names)})
        return jnp.asarray(metric(_forward(hooked, tokens, attention_mask)))

    sites = jnp.arange(layers * units)
    if chunk_size is None:
        scores = jax.vmap(patched_metric)(sites)
    else:
        # Bounded memory: vmap inside chunks of sites, chunks one after another.
        scores = jax.lax.map(patched_metric, sites, batch_size=chunk_size)
    return scores.reshape(layers, units, *scores.shape[1:])


def _prepare(m: Model, clean_tokens, corrupted_tokens, attention_mask, corrupted_mask):
    clean, clean_mask = m._inputs(clean_tokens, attention_mask)
    corrupted, corrupted_mask_ = m._inputs(
        corrupted_tokens, attention_mask if corrupted_mask is None else corrupted_mask
    )
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"Clean tokens {tuple(clean.shape)} and corrupted tokens "
            f"{tuple(corrupted.shape)} must have the same shape to patch between them."
        )
    return clean, clean_mask, corrupted, corrupted_mask_


def sweep(
    m: Model,
    clean_tokens: Any,
    corrupted_tokens: Any,
    metric: Metric,
    site: str = "resid_pre",
    attention_mask: Any = None,
    corrupted_attention_mask: Any = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """Activation patching at every site of one kind, in one compiled vectorised program.

    Args:
      m: the model.
      clean_tokens, corrupted_tokens: ``[batch, seq]`` ids of the same shape.
      metric: a jax function of the patched run's logits ``[batch, seq, vocab]`` that
        returns a scalar (e.g. a logit difference averaged over the batch). Pass the same
        function object again to reuse the compiled sweep.
      site: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out`` or ``mlp_out``
        (sites are ``[layer, pos]``); ``z``, ``q`` or ``pattern`` (``[layer, head]``);
        ``k`` or ``v`` (``[layer, kv_head]``). A head site patches all positions.
      attention_mask: for padded batches (defaults to ``tokens != pad``); the corrupted
        run uses ``corrupted_attention_mask`` when given.
      chunk_size: patch this many sites at a time (bounds memory on big models); None
        patches all sites in one batch.

    Returns:
      ``[layer, unit]`` metric values: entry ``[l, u]`` is the metric of the corrupted run
      with unit ``u`` (position or head) of layer ``l`` set to its clean value, for every
      batch row at once.
    """
    names = site_names(m, site)
    spec = SITES[site]
    clean, clean_mask, corrupted, corrupted_mask = _prepare(
        m, clean_tokens, corrupted_tokens, attention_mask, corrupted_attention_mask
    )
    _, clean_cache = m.run_with_cache(clean, names=list(names), attention_mask=clean_mask)
    clean_values = [clean_cache[n] for n in names]
    return _sweep(
        m._frozen,
        clean_values,
        corrupted,
        corrupted_mask,
        names=names,
        unit_axis=spec.unit_axis,
        metric=metric,
        chunk_size=chunk_size,
    )


@functools.partial(jax.jit, static_argnames=("names", "metric"))
def _metric_and_grads(model, zeros, tokens, attention_mask, *, names, metric):
    def run(deltas):
        # Adding a zero offset at each hook makes d metric / d offset = d metric / d value.
        fns = {n: (lambda d: lambda value, name: value + d)(deltas[i]) for i, n in enumerate(names)}
        return jnp.asarray(metric(_forward(_with_hook_fns(model, fns), tokens, attention_mask)))

    return jax.value_and_grad(run)(zeros)


def attribution_patching(
    m: Model,
    clean_tokens: Any,
    corrupted_tokens: Any,
    metric: Metric,
    site: str = "resid_pre",
    attention_mask: Any = None,
    corrupted_attention_mask: Any = None,
) -> jax.Array:
    """The first-order estimate of `sweep`'s effects, from one forward and backward pass.

    For each site, ``(clean_value - corrupted_value) . d metric / d value`` with the
    gradient taken on the corrupted run and the dot product over every axis but the
    site's unit (so over batch, d_model / d_head / key positions). It estimates
    ``sweep(...)[l, u] - metric(corrupted run)``: note the *difference*, not the metric.

    Returns:
      ``[layer, unit]`` like `sweep` (same arguments, same site names).
    """
    names = site_names(m, site)
    spec = SITES[site]
    clean, clean_mask, corrupted, corrupted_mask = _prepare(
        m, clean_tokens, corrupted_tokens, attention_mask, corrupted_attention_mask
    )
    _, clean_cache = m.run_with_cache(clean, names=list(names), attention_mask=clean_mask)
    _, corrupted_cache = m.run_with_cache(
        corrupted, names=list(names), attention_mask=corrupted_mask
    )
    zeros = [jnp.zeros_like(corrupted_cache[n]) for n in names]
    _, grads = _metric_and_grads(
        m._frozen, zeros, corrupted, corrupted_mask, names=names, metric=metric
    )
    scores = []
    for name, grad in zip(names, grads):
        delta = (clean_cache[name] - corrupted_cache[name]).astype(jnp.float32)
        product = delta * grad.astype(jnp.float32)
        other_axes = tuple(a for a in range(product.ndim) if a != spec.unit_axis)
        scores.append(product.sum(axis=other_axes))
    return jnp.stack(scores)
