"""Feature tools: ablation, steering, top activations, logit effects, attribution."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens import compiling
from gemmalens.compiling import Distinct
from gemmalens.layers.attention import Attention
from gemmalens.layers.embeddings import TiedUnembed
from gemmalens.layers.hooks import HookFn, checked_indices
from gemmalens.layers.norms import RMSNorm
from gemmalens.lens import Model
from gemmalens.sae.files import SAE
from gemmalens.sae.layers import _spliced

# ----------------------------------------------------------------------------- interventions


def _features(sae: SAE, features: int | Iterable[int]) -> np.ndarray:
    return checked_indices(features, sae.d_sae, "feature", f"the SAE at {sae.site!r}")


def ablate(sae: SAE, features: int | Iterable[int], value: float = 0.0) -> dict[str, HookFn]:
    """Hooks for `Model.run_with_hooks` on a spliced model: set ``features`` to ``value``
    (0: zero-ablation) at every position. With the error term, the site's value then drops
    by ``(activation - value) * w_dec[feature]`` for each of them."""
    index = _features(sae, features)

    def fn(f: jax.Array, name: str) -> jax.Array:
        return f.at[..., index].set(jnp.asarray(value, f.dtype))

    return {sae.hook_name("features"): fn}


def steer(
    sae: SAE, feature: int, value: float, positions: int | Sequence[int] | None = None
) -> dict[str, HookFn]:
    """Hooks that add ``value * w_dec[feature]`` to the value the dictionary reconstructs
    (``sae.hook_out``), at every position or the given ones. Works with or without
    splicing (on a spliced model the SAE then sees the steered value)."""
    direction = np.asarray(sae.w_dec[int(_features(sae, feature)[0])], np.float32)

    def fn(x: jax.Array, name: str) -> jax.Array:
        add = (jnp.asarray(direction) * value).reshape(x.shape[2:]).astype(x.dtype)
        if positions is None:
            return x + add
        return x.at[:, checked_indices(positions, x.shape[1], "position", repr(name))].add(add)

    return {sae.hook_out: fn}


# ----------------------------------------------------------------------------- feature tools


@dataclasses.dataclass(frozen=True)
class TopActivations:
    """The ``k`` strongest activations of each feature over a corpus.

    ``values``, ``sequence`` (corpus row) and ``position`` are ``[feature, k]``, strongest
    first; entries past the number of real tokens are ``-inf`` (sequence and position -1).
    """

    features: np.ndarray
    values: np.ndarray
    sequence: np.ndarray
    position: np.ndarray

    def examples(self, feature: int) -> list[tuple[int, int, float]]:
        """``(sequence, position, activation)`` of one feature, strongest first."""
        rows = np.flatnonzero(self.features == feature)
        if not rows.size:
            raise KeyError(
                f"Feature {feature} was not among those searched; these are "
                f"{self.features.tolist()}. Pass it to top_activations(..., features=...)."
            )
        row = int(rows[0])
        return [
            (int(s), int(p), float(v))
            for s, p, v in zip(self.sequence[row], self.position[row], self.values[row])
            if s >= 0
        ]


@compiling.jit(static_argnames=("forward", "k"))
def _batch_top(plan, inputs, valid, features, *, forward, k):
    model, state = plan.tree()
    _, values = forward(model, state, *inputs)
    acts = values[0].value[..., features].astype(jnp.float32)  # [batch, seq, F]
    acts = jnp.where(valid[..., None], acts, -jnp.inf)
    flat = acts.reshape(-1, acts.shape[-1]).T
    return jax.lax.top_k(flat, k)


def top_activations(
    m: Model,
    sae: SAE | str,
    features: int | Iterable[int],
    corpus_tokens: Any,
    k: int = 10,
    batch_size: int = 8,
    show_progress: bool = True,
) -> TopActivations:
    """The top-``k`` (sequence, position) activations of ``features`` of a spliced SAE
    (or its site) over ``corpus_tokens`` ``[n, seq]`` (pad ids mark padding), run in
    compiled batches of ``batch_size`` rows with a progress bar."""
    (sae,) = _spliced(m, sae)
    index = jnp.asarray(_features(sae, features))
    tokens = np.asarray(corpus_tokens)
    if tokens.ndim != 2:
        raise ValueError(f"corpus_tokens must be [n, seq] ids; got shape {tokens.shape}.")
    n, seq = tokens.shape
    unbound, state = m._capture_plan([sae.hook_name("features")])
    plan = Distinct(*m._flat_plan(unbound, state))
    kk = min(k, batch_size * seq)
    best_v = np.full((len(index), 0), -np.inf, np.float32)
    best_s = np.zeros((len(index), 0), np.int64)
    best_p = np.zeros((len(index), 0), np.int64)
    starts = range(0, n, batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"top activations at {sae.site}", unit="batch")
    for start in starts:
        rows = tokens[start : start + batch_size]
        real = len(rows)
        if real < batch_size:  # same shapes every batch: repeat a row, never count it
            rows = np.concatenate([rows, np.repeat(rows[:1], batch_size - real, 0)])
        inputs = m._prepare(rows, None, {})
        valid = rows != m.config.pad_token_id
        valid[real:] = False
        vals, idx = _batch_top(
            plan, inputs, jnp.asarray(valid), index, forward=m.captured_run, k=kk
        )
        vals, idx = np.asarray(vals), np.asarray(idx)
        best_v = np.concatenate([best_v, vals], 1)
        best_s = np.concatenate([best_s, start + idx // seq], 1)
        best_p = np.concatenate([best_p, idx % seq], 1)
        order = np.argsort(-best_v, axis=1, kind="stable")[:, :k]
        best_v, best_s, best_p = (np.take_along_axis(a, order, 1) for a in (best_v, best_s, best_p))
    missing = ~np.isfinite(best_v)
    best_s[missing], best_p[missing] = -1, -1
    return TopActivations(np.asarray(index), best_v, best_s, best_p)


def _block_attention_output(m: Model, layer: int) -> tuple[pz.nn.Linear, RMSNorm | None]:
    blocks = [
        b
        for b in pz.select(m.model).at_instances_of(pz.nn.NamedGroup).get_sequence()
        if b.name == f"blocks.{layer}"
    ]
    for branch in pz.select(blocks[:1]).at_instances_of(pz.nn.Sequential).get_sequence():
        parts = branch.sublayers
        for i, part in enumerate(parts):
            if isinstance(part, Attention):
                post = next((p for p in parts[i + 1 :] if isinstance(p, RMSNorm)), None)
                return part.output, post
    raise NotImplementedError(f"Could not find block {layer}'s attention output projection.")


def _gain(norm: RMSNorm | None) -> jax.Array | float:
    if norm is None or norm.form == "none":
        return 1.0
    scale = norm.scale.value.unwrap("embedding").astype(jnp.float32)
    return 1.0 + scale if norm.form == "one_plus" else scale


def logit_effects(
    m: Model, sae: SAE, features: int | Iterable[int] | None = None, final_norm_gain: bool = True
) -> jax.Array:
    """Direct logit effects: each feature's decoder row, as a residual-stream direction,
    through the unembedding, ``[feature, vocab]`` (``[vocab]`` for one int; all features
    when None).

    The final RMSNorm's division by the token's rms is left out (it depends on the token:
    this is the effect per unit of normalised residual, as TransformerLens reads ``W_U``
    with the norm folded in); its gain is applied unless ``final_norm_gain=False``. For
    ``attn.hook_z`` SAEs the row goes through the block's output projection and the gain of
    its post-attention norm first (that norm's rms division likewise left out). With
    final-logit soft-capping (Gemma 2 style ``cap * tanh(logit / cap)``) these are
    pre-cap logits: the cap keeps their order but squeezes large ones.
    """
    family = getattr(m.config, "family", None)
    if family != "gemma3":
        why = {
            "gemma3n": "the residual hooks hold AltUp's active stream, which reaches the "
            "logits only through the other streams' corrections and the final collapse",
            "gemma4": "every later layer multiplies the residual stream by its layer scalar, "
            "so a direction written at one layer is rescaled before the unembedding",
        }.get(family, "this model's path from a layer to the logits is not a fixed matrix")
        raise NotImplementedError(
            f"logit_effects reads a decoder row straight through the unembedding, which is "
            f"the direct effect only in Gemma 3. On {type(m.config).__name__}, {why}. Measure "
            "a feature's effect with gl.sae.steer(...) and run_with_hooks, or attribute a "
            "metric to features with gl.sae.attribute."
        )
    single = isinstance(features, (int, np.integer))
    chosen = np.arange(sae.d_sae) if features is None else _features(sae, features)
    rows = jnp.asarray(sae.w_dec[chosen], jnp.float32)  # [F, d_out]
    if sae.hook_out.endswith("attn.hook_z"):
        output, post = _block_attention_output(m, sae.layer)
        w = output.weights.value.unwrap("embedding", "heads", "head_dim").astype(jnp.float32)
        rows = (rows @ w.reshape(w.shape[0], -1).T) * _gain(post)
    if final_norm_gain:
        rows = rows * _gain(
            pz.select(m.model.final_norm).at_instances_of(RMSNorm).get_sequence()[0]
        )
    (unembed,) = pz.select(m.model.unembed).at_instances_of(TiedUnembed).get_sequence()[:1]
    table = unembed.table.value.unwrap("vocab", "embedding").astype(jnp.float32)
    effects = rows @ table.T
    return effects[0] if single else effects


@dataclasses.dataclass(frozen=True)
class FeatureAttribution:
    """Gradient x activation attribution of a metric to the features of spliced SAEs.

    ``features[site]`` is ``[d_sae]``: ``sum over batch and positions of activation *
    d metric / d activation``; ``error[site]`` the same for the error term (its dot product
    with the gradient). ``metric`` is the metric's value on the run.
    """

    metric: float
    features: dict[str, np.ndarray]
    error: dict[str, float]

    def error_share(self, site: str) -> float:
        """``|error| / (sum |features| + |error|)`` at ``site``: how much of the first-order
        attribution the SAE does not explain."""
        e = abs(self.error[site])
        total = float(np.abs(self.features[site]).sum()) + e
        return e / total if total else 0.0


def attribute(
    m: Model,
    tokens: Any,
    metric: Callable[[jax.Array], jax.Array],
    saes: SAE | str | None = None,
    attention_mask: Any = None,
) -> FeatureAttribution:
    """Attributes ``metric(logits)`` (a scalar jax function) to the features of the spliced
    SAEs (all, or one given by SAE or site) and to their error terms, by gradient x
    activation in one forward and backward pass."""
    from gemmalens import patching

    chosen = _spliced(m, saes)
    names = tuple(n for s in chosen for n in (s.hook_name("features"), s.hook_name("error")))
    inputs = m._prepare(tokens, attention_mask, {})
    _, values = m._captured(inputs, list(names))
    zeros = [jnp.zeros_like(values[n]) for n in names]
    value, grads = patching._metric_and_grads(
        m._frozen_distinct,
        zeros,
        inputs,
        names=names,
        metric=metric,
        forward=m.logits_of,
        window=patching._logit_window(m, inputs, metric),
    )
    features, error = {}, {}
    for i, sae in enumerate(chosen):
        f_name, e_name = names[2 * i], names[2 * i + 1]
        f_attr = (values[f_name].astype(jnp.float32) * grads[2 * i].astype(jnp.float32)).sum((0, 1))
        e_attr = (values[e_name].astype(jnp.float32) * grads[2 * i + 1].astype(jnp.float32)).sum()
        features[sae.site] = np.asarray(f_attr)
        error[sae.site] = float(e_attr)
    return FeatureAttribution(float(value), features, error)
