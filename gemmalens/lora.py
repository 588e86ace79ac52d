"""LoRA: low-rank adapters as visible, hookable Penzai layers.

A LoRA adapter (Hu et al., 2021) adds a low-rank update to a frozen projection ``W``::

    y = W x + scale * B (A x),    A: [rank, in],  B: [out, rank],  scale = alpha / rank

(``alpha / sqrt(rank)`` with rank-stabilised LoRA). Here each adapted projection becomes a
`LoRALinear` holding the untouched base `pz.nn.Linear` beside a `LowRankAdapter`, whose
contribution ``scale * B A x`` passes a hook point ``<projection>.lora.hook_delta`` (e.g.
``blocks.3.attn.q_proj.lora.hook_delta``), so what a fine-tune adds can be captured,
ablated or patched like any other value. A projection used at several places (Gemma 4's
K=V layers read values through ``k_proj``; T5Gemma 2's decoder reads cross-attention keys
through it) has one adapter, shared, and one hook per use: ``hook_delta``, then
``hook_delta_1``, ... in forward order::

    m = gl.teaching_model("gemma3")
    tuned = gl.lora.attach(m, rank=4, targets=("q_proj", "v_proj"))
    tuned, losses = gl.lora.train(tuned, [("The capital of Zorbia is", " Quill")], steps=200)
    gl.lora.save_adapter(tuned, "my-adapter")            # PEFT's file layout
    again = gl.lora.load_adapter(m, "my-adapter")        # also reads adapters PEFT saved
    merged = gl.lora.merge(tuned)                         # plain projections, W + scale B A
    gl.lora.delta_norms(tuned)                            # which layers and heads changed most

Adapters are stored in PEFT's layout (``adapter_model.safetensors`` and
``adapter_config.json``, tensors ``base_model.model.<module>.lora_A.weight`` [rank, in] and
``lora_B.weight`` [out, rank]), so adapters trained with PEFT on the Hugging Face model load
here and the other way round. Pickle-based files are never read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens import patching
from gemmalens.checkpoints.safetensors_files import CheckpointError
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.kv_sharing import SharedKVAttention
from gemmalens.layers.params import apply_once
from gemmalens.layers.stacking import LayerSlice
from gemmalens.lens import Model

__all__ = [
    "LoRALinear",
    "LowRankAdapter",
    "adapted_modules",
    "attach",
    "delta_norms",
    "detach",
    "load_adapter",
    "lens_difference",
    "merge",
    "module_effects",
    "save_adapter",
    "train",
]

RANK_AXIS = "lora_rank"
DEFAULT_TARGETS = ("q_proj", "v_proj")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PICKLED = ("adapter_model.bin", "adapter_model.pt", "adapter_model.ckpt", "adapter_model.pth")


@pz.pytree_dataclass
class LowRankAdapter(pz.nn.Layer):
    """``x -> scale * up(down(x))``: an adapter's contribution to its projection's output.

    Attributes:
      down: LoRA's ``A``, the input axes -> ``lora_rank``.
      up: LoRA's ``B``, ``lora_rank`` -> the output axes.
      scale: ``alpha / rank`` (``alpha / sqrt(rank)`` for rank-stabilised LoRA).
      hook_delta: the contribution, axes ``batch, seq`` and the projection's output axes.
    """

    down: pz.nn.Linear
    up: pz.nn.Linear
    scale: float = dataclasses.field(metadata={"pytree_node": False})
    hook_delta: HookPoint

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        delta = self.up(self.down(x, **side_inputs), **side_inputs) * self.scale
        return self.hook_delta(delta, **side_inputs)

    @property
    def rank(self) -> int:
        return self.down.weights.value.named_shape[RANK_AXIS]


@pz.pytree_dataclass
class LoRALinear(pz.nn.Layer):
    """A frozen projection plus its low-rank adapter: ``base(x) + lora(x)``."""

    base: pz.nn.Linear
    lora: LowRankAdapter

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return self.base(x, **side_inputs) + self.lora(x, **side_inputs)

    @property
    def module(self) -> str:
        """The projection's name, e.g. ``blocks.3.attn.q_proj``."""
        return _module_of(self.base)


# ----------------------------------------------------------------------------- attaching


def _module_of(linear: pz.nn.Linear) -> str:
    label = linear.weights.label
    return label[: -len(".weights")] if label.endswith(".weights") else label


def _projection_name(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _projections(tree: pz.nn.Layer) -> list[str]:
    """Every plain projection of the model a LoRA can wrap, by module name."""
    found = pz.select(tree).at_instances_of(pz.nn.Linear).get_sequence()
    # A stacked layer's weights are a view (`LayerSlice`) with the same label.
    plain = (pz.Parameter, pz.ParameterValue, LayerSlice)
    return [_module_of(p) for p in found if isinstance(p.weights, plain)]


def _matcher(targets: str | Sequence[str], tree: pz.nn.Layer) -> Callable[[str], bool]:
    """``targets``: projection names (``"q_proj"``), module names (``"blocks.3.attn.q_proj"``)
    or a regular expression matched against whole module names; unknown names are errors."""
    modules = _projections(tree)
    if isinstance(targets, str) and not re.fullmatch(r"\w+", targets):
        pattern = re.compile(targets)
        if not any(pattern.fullmatch(m) for m in modules):
            raise ValueError(
                f"targets={targets!r} matches no projection. Projections are named like "
                f"{modules[:3]}."
            )
        return lambda module: bool(pattern.fullmatch(module))
    wanted = (targets,) if isinstance(targets, str) else tuple(targets)
    names = {_projection_name(m) for m in modules}
    unknown = [t for t in wanted if t not in names and t not in modules]
    if unknown:
        raise ValueError(
            f"No projection is named {unknown}; this model has {sorted(names)} (or give full "
            f"module names such as {modules[0]!r}, or a regular expression)."
        )
    return lambda module: _projection_name(module) in wanted or module in wanted


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    if rank == 0:
        return 0.0
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _adapter_for(
    base: pz.nn.Linear,
    rank: int,
    scale: float,
    a: jax.Array,
    b: jax.Array,
) -> LoRALinear:
    """Wraps ``base`` with ``A`` [rank, *in] and ``B`` [*out, rank] (plain arrays)."""
    module = _module_of(base)
    dtype = base.weights.value.dtype
    down = pz.nn.Linear(
        weights=pz.Parameter(
            value=pz.nx.wrap(jnp.asarray(a, dtype)).tag(RANK_AXIS, *base.in_axis_names),
            label=f"{module}.lora.A",
        ),
        in_axis_names=base.in_axis_names,
        out_axis_names=(RANK_AXIS,),
    )
    up = pz.nn.Linear(
        weights=pz.Parameter(
            value=pz.nx.wrap(jnp.asarray(b, dtype)).tag(*base.out_axis_names, RANK_AXIS),
            label=f"{module}.lora.B",
        ),
        in_axis_names=(RANK_AXIS,),
        out_axis_names=base.out_axis_names,
    )
    hook = HookPoint(f"{module}.lora.hook_delta", ("batch", "seq", *base.out_axis_names))
    return LoRALinear(
        base=base, lora=LowRankAdapter(down=down, up=up, scale=scale, hook_delta=hook)
    )


def _adapted(tree: pz.nn.Layer, make: Callable[[pz.nn.Linear], pz.nn.Layer]) -> pz.nn.Layer:
    """``tree`` with each projection replaced by ``make(projection)`` (made once per
    projection, so a projection used at several places keeps one adapter), each further use
    of an adapter getting its own hook (``hook_delta_1``, ...): the uses see different
    inputs, and a capture needs one name per value."""
    tree = apply_once(pz.select(tree).at_instances_of(pz.nn.Linear), _module_of, make)
    uses: dict[str, int] = {}

    def name_use(layer: LoRALinear) -> LoRALinear:
        n = uses[layer.module] = uses.get(layer.module, -1) + 1
        if n == 0:
            return layer
        hook = layer.lora.hook_delta
        renamed = HookPoint(f"{hook.name}_{n}", hook.axes)
        return dataclasses.replace(layer, lora=dataclasses.replace(layer.lora, hook_delta=renamed))

    return pz.select(tree).at_instances_of(LoRALinear).apply(name_use)


def _axis_sizes(linear: pz.nn.Linear) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = linear.weights.value.named_shape
    return (
        tuple(shape[a] for a in linear.out_axis_names),
        tuple(shape[a] for a in linear.in_axis_names),
    )


def attach(
    m: Model,
    rank: int = 8,
    targets: str | Sequence[str] = DEFAULT_TARGETS,
    alpha: float | None = None,
    *,
    use_rslora: bool = False,
    init: str = "lora",
    seed: int = 0,
) -> Model:
    """A copy of ``m`` with a LoRA adapter on each chosen projection (``m`` is unchanged).

    Args:
      m: a `gemmalens.Model` of any family; must not carry adapters already.
      rank: the adapters' rank (0 makes adapters that add nothing).
      targets: projection names (default query and value: ``("q_proj", "v_proj")``), full
        module names (``"blocks.3.attn.q_proj"``), or a regular expression over module
        names (``r"blocks\\.(1|2)\\..*_proj"``). Mixture-of-experts banks are not wrapped.
      alpha: LoRA's alpha; the adapter's output is scaled by ``alpha / rank`` (by default
        ``alpha = rank``: scale 1).
      use_rslora: scale by ``alpha / sqrt(rank)`` instead.
      init: ``"lora"`` (A random, B zero: the model starts unchanged, as LoRA and PEFT do),
        ``"zeros"`` or ``"random"`` (both random: a visible change, for tests and demos).
      seed: for the random parts.

    Returns:
      a `gemmalens.Model` whose hook names include ``<module>.lora.hook_delta``.
    """
    if adapted_modules(m):
        raise ValueError(
            "This model already carries LoRA adapters: use gl.lora.detach(m) first, or "
            "gl.lora.merge(m) to fold them into the weights."
        )
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}.")
    if init not in ("lora", "zeros", "random"):
        raise ValueError(f"init must be 'lora', 'zeros' or 'random', got {init!r}.")
    alpha = float(rank if alpha is None else alpha)
    wanted = _matcher(targets, m.model)
    scale = _scale(alpha, rank, use_rslora)
    key = jax.random.key(seed)

    def wrap(linear: pz.nn.Linear) -> pz.nn.Layer:
        nonlocal key
        if not wanted(_module_of(linear)):
            return linear
        out, inp = _axis_sizes(linear)
        key, ka, kb = jax.random.split(key, 3)
        fan_in = math.prod(inp)
        # Kaiming-uniform A as PEFT initialises it (bound 1/sqrt(fan_in)).
        a = jax.random.uniform(ka, (rank, *inp), minval=-1.0, maxval=1.0) / math.sqrt(fan_in)
        b = (
            jax.random.normal(kb, (*out, rank)) / math.sqrt(max(rank, 1))
            if init == "random"
            else jnp.zeros((*out, rank))
        )
        if init == "zeros":
            a = jnp.zeros_like(a)
        return _adapter_for(linear, rank, scale, a, b)

    tree = _adapted(m.model, wrap)
    config = dict(
        r=rank,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        target_modules=sorted(set(_projection_name(x) for x in adapted_modules_of(tree))),
    )
    return m.with_tree(tree, adapter_config=config)


def _adapters(tree: pz.nn.Layer) -> list[LoRALinear]:
    """Each adapted projection once, in model order."""
    seen: dict[str, LoRALinear] = {}
    for layer in pz.select(tree).at_instances_of(LoRALinear).get_sequence():
        seen.setdefault(layer.module, layer)
    return list(seen.values())


def adapted_modules_of(tree: pz.nn.Layer) -> list[str]:
    """`adapted_modules` of a model tree (a `Model`'s ``.model``, or part of one)."""
    return [a.module for a in _adapters(tree)]


def adapted_modules(m: Model) -> list[str]:
    """The names of the projections that carry an adapter, e.g. ``blocks.0.attn.q_proj``."""
    return adapted_modules_of(m.model)


def _require_adapters(m: Model, what: str) -> None:
    if not adapted_modules(m):
        raise ValueError(
            f"{what} needs a model with LoRA adapters; attach some with gl.lora.attach(m) or "
            "load them with gl.lora.load_adapter(m, directory)."
        )


def detach(m: Model) -> Model:
    """The base model: every adapter removed, the frozen projections as they were."""
    _require_adapters(m, "detach")
    tree = pz.select(m.model).at_instances_of(LoRALinear).apply(lambda layer: layer.base)
    return m.with_tree(tree, adapter_config=None)


def _flat(param: Any, *axes: str) -> jax.Array:
    return param.value.unwrap(*axes)


def _factors(layer: LoRALinear) -> tuple[jax.Array, jax.Array]:
    """``(B [out, rank], A [rank, in])`` as matrices (output and input axes flattened)."""
    base, lora = layer.base, layer.lora
    out, inp = _axis_sizes(base)
    b = _flat(lora.up.weights, *base.out_axis_names, RANK_AXIS).reshape(math.prod(out), -1)
    a = _flat(lora.down.weights, RANK_AXIS, *base.in_axis_names).reshape(-1, math.prod(inp))
    return b, a


def merge(m: Model) -> Model:
    """``m`` with each adapter folded into its projection (``W + scale * B A``): plain
    projections, the same outputs, no adapter hook points."""
    _require_adapters(m, "merge")

    def fold(layer: LoRALinear) -> pz.nn.Linear:
        base = layer.base
        out, inp = _axis_sizes(base)
        axes = (*base.out_axis_names, *base.in_axis_names)
        w = _flat(base.weights, *axes).reshape(math.prod(out), math.prod(inp))
        b, a = _factors(layer)
        merged = w.astype(jnp.float32) + layer.lora.scale * (
            b.astype(jnp.float32) @ a.astype(jnp.float32)
        )
        value = pz.nx.wrap(merged.astype(w.dtype).reshape(*out, *inp)).tag(*axes)
        return dataclasses.replace(
            base, weights=pz.Parameter(value=value, label=base.weights.label)
        )

    selection = pz.select(m.model).at_instances_of(LoRALinear)
    return m.with_tree(apply_once(selection, lambda layer: layer.module, fold), adapter_config=None)


def delta_norms(m: Model) -> list[dict[str, Any]]:
    """How much each adapter changes its projection: the Frobenius norm of ``scale * B A``,
    largest first, with the relative size against the base weight, and for the attention
    projections one row per head as well.

    Returns:
      rows ``{"module", "layer", "projection", "head", "norm", "relative"}``; ``head`` is
      None for the whole projection.
    """
    _require_adapters(m, "delta_norms")
    rows = []
    for layer in _adapters(m.model):
        base, scale = layer.base, layer.lora.scale
        b, a = _factors(layer)
        b, a = b.astype(jnp.float32), a.astype(jnp.float32)
        gram_a = a @ a.T  # [rank, rank]: the norm without forming B A
        axes = (*base.out_axis_names, *base.in_axis_names)
        w_norm = float(jnp.linalg.norm(_flat(base.weights, *axes).astype(jnp.float32)))
        match = re.search(r"blocks\.(\d+)\.", layer.module)
        common = dict(
            module=layer.module,
            layer=int(match.group(1)) if match else None,
            projection=_projection_name(layer.module),
        )
        norm = abs(scale) * float(jnp.sqrt(jnp.maximum(jnp.trace(b.T @ b @ gram_a), 0.0)))
        rows.append(dict(common, head=None, norm=norm, relative=norm / max(w_norm, 1e-30)))
        head_axis = next(
            (h for h in ("heads", "kv_heads") if h in (*base.out_axis_names, *base.in_axis_names)),
            None,
        )
        if head_axis is not None:  # attention projections: one row per head as well
            out, inp = _axis_sizes(base)
            delta = pz.nx.wrap((scale * (b @ a)).reshape(*out, *inp)).tag(*axes)
            rest = [n for n in axes if n != head_axis]
            per_head = delta.unwrap(head_axis, *rest).reshape(delta.named_shape[head_axis], -1)
            for h, value in enumerate(np.asarray(jnp.linalg.norm(per_head, axis=1))):
                rows.append(dict(common, head=h, norm=float(value), relative=None))
    rows.sort(key=lambda r: (r["head"] is not None, -r["norm"]))
    return rows


# ------------------------------------------------------------------------ comparisons


def module_effects(
    m: Model,
    tokens: Any,
    metric: Callable[[jax.Array], jax.Array],
    attention_mask: Any = None,
    **streams: Any,
) -> dict[str, Any]:
    """What each adapter does to ``metric``, measured by switching adapters on and off.

    Every on/off configuration runs in one compiled, vectorised program: each adapter's
    ``B`` is multiplied by a gate of 0 or 1 (the same as zeroing its ``hook_delta``).

    Args:
      m: a model with adapters.
      tokens: ``[batch, seq]`` ids (or text).
      metric: ``logits [batch, seq, vocab] -> scalar``, e.g. the log-probability of an answer.
      attention_mask: as for ``m(tokens, attention_mask)``.
      streams: further inputs by keyword (T5Gemma 2: ``decoder_tokens=...``).

    Returns:
      ``{"base": metric with every adapter off, "adapted": with all on, "modules": rows}``;
      a row per adapted projection ``{"module", "layer", "projection", "alone", "knockout"}``
      with ``alone = metric(only this adapter on) - base`` and ``knockout = adapted -
      metric(all on but this one)``, largest ``|knockout|`` first.
    """
    _require_adapters(m, "module_effects")
    modules = adapted_modules(m)
    inputs = m._prepare(tokens, attention_mask, streams)
    unbound, params = pz.unbind_params(m.model, freeze=True)
    slot = {f"{name}.lora.B": i for i, name in enumerate(modules)}
    logits_of = m.logits_of
    # Every configuration's logits at once: only the positions the metric reads.
    window = patching._logit_window(m, inputs, metric)

    def run(gates: jax.Array) -> jax.Array:
        gated = tuple(
            dataclasses.replace(p, value=p.value * gates[slot[p.label]]) if p.label in slot else p
            for p in params
        )
        return metric(
            patching._logits_at(logits_of, pz.bind_variables(unbound, gated), inputs, window)
        )

    n = len(modules)
    eye = np.eye(n, dtype=np.float32)
    gates = np.concatenate([np.zeros((1, n)), np.ones((1, n)), eye, 1.0 - eye]).astype(np.float32)
    values = np.asarray(jax.jit(jax.vmap(run))(jnp.asarray(gates)), np.float64)
    base, adapted = float(values[0]), float(values[1])
    rows = []
    for i, module in enumerate(modules):
        match = re.search(r"blocks\.(\d+)\.", module)
        rows.append(
            dict(
                module=module,
                layer=int(match.group(1)) if match else None,
                projection=_projection_name(module),
                alone=float(values[2 + i]) - base,
                knockout=adapted - float(values[2 + n + i]),
            )
        )
    rows.sort(key=lambda r: -abs(r["knockout"]))
    return dict(base=base, adapted=adapted, modules=rows)


def lens_difference(
    base: Model,
    adapted: Model,
    tokens: Any,
    target: int,
    position: int = -1,
    attention_mask: Any = None,
    **streams: Any,
) -> dict[str, Any]:
    """The logit lens of both models side by side: the log-probability of ``target`` read off
    the residual stream after each layer, at ``position`` of every sequence (of the
    decoder, for T5Gemma 2: pass ``decoder_tokens=...``).

    Returns:
      ``{"labels": layer labels, "base": [layer, batch], "adapted": [layer, batch]}`` (the
      last entry of each is the model's own output).
    """
    out = {}
    for name, model in (("base", base), ("adapted", adapted)):
        _, cache = model.run_with_cache(tokens, None, attention_mask, **streams)
        lens = cache.logit_lens(pos_slice=position, targets=jnp.asarray(target))
        out["labels"] = list(lens.labels)
        out[name] = np.asarray(lens.target_logprobs)
    return out


# ------------------------------------------------------------------------------ training


def _examples(m: Model, examples: Iterable[str | tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [n, seq] (BOS first, right-padded) and a loss mask on the tokens to predict:
    every token of a plain text, only the completion of a ``(prompt, completion)`` pair."""
    if m.tokenizer is None:
        raise ValueError("train needs a tokenizer: this model has none.")
    if "decoder_tokens" in m.input_streams:
        raise NotImplementedError(
            "gl.lora.train trains decoder-only models; for T5Gemma 2 train with optax on "
            "m.model directly (adapters attach and run there as anywhere)."
        )
    rows, masks = [], []
    for example in examples:
        prompt, completion = ("", example) if isinstance(example, str) else example
        head = m.tokenizer.encode([prompt])[0] if prompt else m.tokenizer.encode([""])[0]
        whole = m.tokenizer.encode([prompt + completion])[0]
        if whole[: len(head)] != head:  # the pair tokenises differently when joined
            whole = head + m.tokenizer.encode([completion])[0][1:]
        start = len(head) if prompt else 1
        if len(whole) <= start:
            raise ValueError(
                f"Example {example!r} has no tokens to learn: its completion is empty."
            )
        rows.append(whole)
        masks.append([0] * start + [1] * (len(whole) - start))
    if not rows:
        raise ValueError("train needs at least one example.")
    width = max(map(len, rows))
    pad = m.config.pad_token_id
    tokens = np.array([r + [pad] * (width - len(r)) for r in rows], np.int32)
    loss_mask = np.array([k + [0] * (width - len(k)) for k in masks], np.float32)
    return tokens, loss_mask


def _is_adapter_param(label: str) -> bool:
    return ".lora." in label


def train(
    m: Model,
    examples: Iterable[str | tuple[str, str]],
    steps: int = 200,
    learning_rate: float = 1e-2,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    show_progress: bool = False,
) -> tuple[Model, list[float]]:
    """Trains only the adapters of ``m`` (the base stays frozen) with AdamW on next-token loss.

    Args:
      m: a decoder-only model with adapters (`attach`).
      examples: texts (loss on every token) or ``(prompt, completion)`` pairs (loss on the
        completion's tokens only).
      steps: optimiser steps.
      learning_rate: AdamW's rate (constant).
      batch_size: examples per step, drawn at random; all of them by default.
      seed: for the batches.
      show_progress: a progress bar.

    Returns:
      ``(trained model, loss of each step)``.
    """
    import optax  # the training extra; the teaching script uses it too

    from gemmalens.teaching.train import next_token_loss

    _require_adapters(m, "train")
    tokens, loss_mask = _examples(m, examples)
    attention = tokens != m.config.pad_token_id
    unbound, params = pz.unbind_params(m.model, freeze=True)
    trainable = tuple(p for p in params if _is_adapter_param(p.label))
    frozen = tuple(p for p in params if not _is_adapter_param(p.label))
    optimizer = optax.adamw(learning_rate, weight_decay=0.0)
    state = optimizer.init(trainable)
    logits_of = m.logits_of

    def loss_fn(trainable, batch_tokens, batch_attention, batch_mask):
        model = pz.bind_variables(unbound, trainable + frozen)
        logits = logits_of(model, batch_tokens, batch_attention.astype(jnp.int32))
        return next_token_loss(logits, batch_tokens, batch_mask)

    @jax.jit
    def step(trainable, state, batch_tokens, batch_attention, batch_mask):
        loss, grads = jax.value_and_grad(loss_fn)(
            trainable, batch_tokens, batch_attention, batch_mask
        )
        updates, state = optimizer.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    rng = np.random.default_rng(seed)
    n = len(tokens)
    losses = []
    iterator = range(steps)
    if show_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="LoRA training")
    for _ in iterator:
        rows = rng.choice(n, size=batch_size, replace=n < batch_size) if batch_size else slice(None)
        trainable, state, loss = step(
            trainable,
            state,
            jnp.asarray(tokens[rows]),
            jnp.asarray(attention[rows]),
            jnp.asarray(loss_mask[rows]),
        )
        losses.append(float(loss))
    tree = pz.bind_variables(unbound, trainable + frozen, unfreeze_as_copy=True)
    return m.with_tree(tree), losses


# -------------------------------------------------------------------------- PEFT files


def _family(m: Model):
    from gemmalens.families import registry

    return registry.family(m.config.family)


# transformers' in-memory module names, which PEFT's files use, where they differ from the
# tensor names of saved checkpoints: T5Gemma 2's encoder text stack sits in ``text_model``.
_IN_MEMORY = {"t5gemma2": ("model.encoder.", "model.encoder.text_model.")}


def _hf_module(m: Model, module: str) -> str:
    """``blocks.3.attn.q_proj`` -> ``model.layers.3.self_attn.q_proj`` (transformers' name)."""
    name = _family(m).tensor_name(module + ".weights")
    name = name[: -len(".weight")] if name.endswith(".weight") else name
    stored, in_memory = _IN_MEMORY.get(m.config.family, ("", ""))
    if stored and name.startswith(stored) and not name.startswith(in_memory):
        name = in_memory + name[len(stored) :]
    return name


# Where transformers' text models sit inside the classes PEFT may have wrapped.
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def _canonical(name: str) -> str:
    """A module name without the wrapper prefixes, for matching adapters to projections."""
    for prefix in _TEXT_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name.replace("encoder.text_model.", "encoder.", 1)


def save_adapter(
    m: Model, directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> pathlib.Path:
    """Writes the adapters of ``m`` in PEFT's layout: ``adapter_model.safetensors`` and
    ``adapter_config.json`` (readable by ``peft.PeftModel.from_pretrained``)."""
    from safetensors.numpy import save_file

    _require_adapters(m, "save_adapter")
    layers = _adapters(m.model)
    ranks = {layer.lora.rank for layer in layers}
    scales = {layer.lora.scale for layer in layers}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(
            "save_adapter writes adapters that share one rank and one scale (PEFT's "
            f"r and lora_alpha); these have ranks {sorted(ranks)} and scales {sorted(scales)}."
        )
    tensors = {}
    for layer in layers:
        b, a = _factors(layer)
        name = "base_model.model." + _hf_module(m, layer.module)
        tensors[name + ".lora_A.weight"] = np.asarray(a, np.float32)
        tensors[name + ".lora_B.weight"] = np.asarray(b, np.float32)
    rank, scale = ranks.pop(), scales.pop()
    saved = getattr(m, "adapter_config", None) or {}
    rslora = bool(saved.get("use_rslora", False))
    alpha = (
        scale * (math.sqrt(rank) if rslora else rank) if rank else float(saved.get("lora_alpha", 0))
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": sorted({_projection_name(x.module) for x in layers}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        directory / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: a key matches a module name ending in it
    (as a regular expression)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_adapter_config(directory: pathlib.Path) -> dict[str, Any]:
    path = directory / "adapter_config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no adapter_config.json: is it a PEFT adapter?")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{path} is a {config.get('peft_type')} adapter; gemmalens reads LoRA adapters."
        )
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") not in ("none", None),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "modules_to_save": bool(config.get("modules_to_save")),
    }
    if any(unsupported.values()):
        raise CheckpointError(
            f"{path} uses {[k for k, v in unsupported.items() if v]}, which gemmalens' LoRA "
            "layers do not implement (plain LoRA: A, B, alpha, rsLoRA)."
        )
    return config


def load_adapter(m: Model, directory: str | os.PathLike) -> Model:
    """``m`` with the LoRA adapter saved in ``directory`` (PEFT's layout) attached.

    Args:
      m: the base model the adapter was trained on (without adapters).
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.

    Raises:
      CheckpointError: a missing or pickle-based file, an adapter for another architecture
        (a module this model lacks, or shapes that differ), unsupported PEFT options.
    """
    directory = pathlib.Path(directory).expanduser()
    if adapted_modules(m):
        raise ValueError("This model already carries adapters: load onto gl.lora.detach(m).")
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = [p.name for p in map(directory.joinpath, _PICKLED) if p.is_file()]
        if pickled:
            raise CheckpointError(
                f"{directory / pickled[0]} is a pickle file, which gemmalens never opens (it can "
                "run arbitrary code). Convert it where you trust it:\n"
                "    import torch; from safetensors.torch import save_file\n"
                f"    save_file(torch.load({pickled[0]!r}, weights_only=True), "
                "'adapter_model.safetensors')"
            )
        raise CheckpointError(f"{directory} has no adapter_model.safetensors.")
    config = _read_adapter_config(directory)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{weights} cannot be read ({error}): the file is truncated or not safetensors. "
            "Copy it again."
        ) from error
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(
            r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key
        )
        if match is None:
            raise CheckpointError(
                f"{weights} holds {key!r}, which is not a LoRA A or B matrix (DoRA magnitudes, "
                "embeddings and saved modules are not supported)."
            )
        found.setdefault(_canonical(match.group(1)), {})[match.group(2)] = value
    linears = {
        _canonical(_hf_module(m, _module_of(p))): p
        for p in pz.select(m.model).at_instances_of(pz.nn.Linear).get_sequence()
    }
    # KV-sharing layers (Gemma 3n, Gemma 4) keep k_proj / v_proj in transformers' files but
    # never use them: an adapter there changes nothing, so it is left out (and listed).
    unused = set()
    for shared in pz.select(m.model).at_instances_of(SharedKVAttention).get_sequence():
        scope = shared.hook_z.name.rsplit(".", 1)[0]
        unused |= {_canonical(_hf_module(m, f"{scope}.{p}")) for p in ("k_proj", "v_proj")}
    # Adapters on vision or audio towers act only on image or sound inputs, which gemmalens'
    # text models do not take: the text logits are the same without them.
    towers = {
        n
        for n in found
        if re.search(
            r"(^|\.)(vision_tower|multi_modal_projector|audio_tower|embed_vision|embed_audio)\.", n
        )
    }
    skipped = sorted(set(found) & (unused | towers))
    for name in skipped:
        del found[name]
    unknown = sorted(set(found) - set(linears))
    if unknown:
        raise CheckpointError(
            f"The adapter in {directory} is for modules this {m.config.family} model does not "
            f"have: {unknown[:3]}{' ...' if len(unknown) > 3 else ''}. Was it trained on "
            "another architecture?"
        )
    rslora = bool(config.get("use_rslora"))
    by_module = {}
    for name, pair in found.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{weights}: {name} has only {sorted(pair)}.")
        base = linears[name]
        out, inp = _axis_sizes(base)
        a, b = pair["lora_A"], pair["lora_B"]
        rank = a.shape[0]
        if a.shape != (rank, math.prod(inp)) or b.shape != (math.prod(out), rank):
            raise CheckpointError(
                f"{weights}: {name} has lora_A {a.shape} and lora_B {b.shape}; this model's "
                f"projection needs [rank, {math.prod(inp)}] and [{math.prod(out)}, rank]. "
                "Was the adapter trained on another model size?"
            )
        expected_rank = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r"))
        if expected_rank is not None and expected_rank != rank:
            raise CheckpointError(
                f"{weights}: {name} has rank {rank} but adapter_config.json says r={expected_rank}."
            )
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        by_module[_module_of(base)] = (
            _scale(alpha, rank, rslora),
            a.reshape(rank, *inp),
            b.reshape(*out, rank),
        )

    def wrap(linear: pz.nn.Linear) -> pz.nn.Layer:
        if _module_of(linear) not in by_module:
            return linear
        scale, a, b = by_module[_module_of(linear)]
        return _adapter_for(linear, a.shape[0], scale, a, b)

    return m.with_tree(_adapted(m.model, wrap), adapter_config=dict(config, unused_modules=skipped))
