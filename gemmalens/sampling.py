"""Generation: a KV cache in the Penzai tree and a compiled decode loop.

`with_kv_cache` swaps every `Attention` layer for a `CachingAttention` that keeps its
keys, values and their positions in a `pz.StateVariable`. Sliding-window layers keep only
``window`` entries (a ring buffer indexed by ``position % window``); global layers keep
``max_length``. A step attends over ``cache ++ new tokens`` with the usual position-based
mask, so prefill (many tokens, empty cache) and decoding (one token) share one code path.

The whole generation (prefill, then ``max_new_tokens`` sampling steps in ``lax.scan``)
is one ``jax.jit`` call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens import compiling
from gemmalens.compiling import Distinct
from gemmalens.kernels import decode_attention, decode_mlp
from gemmalens.layers.attention import KV_AXES, QKV_AXES, Attention, DotProductAttention
from gemmalens.layers.embeddings import activation_dtype_of
from gemmalens.layers.hooks import HookPoint, stateless_call
from gemmalens.layers.mlp import GatedMLP
from gemmalens.layers.transformer import LOGIT_WINDOW, positions_from_mask, unembeds_per_token

_KV_LABEL = "gemmalens.kv_cache:"

# Whether a decode step (one new token per row) runs its cache write and attention as one
# kernel (`gemmalens.kernels.decode_attention`): "auto" does on GPUs for batches of two or
# more rows (measured on an H100: +4 % at batch 8, -2 % at batch 1; docs/benchmarks.md),
# "on" does on GPUs always, "off" never, and "interpret" runs the kernel in Pallas'
# interpreter on any backend (for tests). Read when a model is prepared for generation.
DECODE_ATTENTION_KERNEL = "auto"
# The same choices for the gated feed-forward block (`gemmalens.kernels.decode_mlp`): "auto"
# runs it on GPUs for 2 to 16 rows (XLA's matrix-vector kernels are faster for one row).
DECODE_MLP_KERNEL = "auto"
_KERNEL_CHOICES = ("auto", "on", "off", "interpret")


def _kernel_wanted(setting: str, batch: int) -> bool:
    """Whether a decode kernel under ``setting`` runs for a step of ``batch`` rows."""
    if setting == "off":
        return False
    if setting == "interpret":
        return True
    return jax.default_backend() == "gpu" and (setting == "on" or batch >= 2)


def cache_length(attention: Attention, max_length: int) -> int:
    """How many keys a layer must remember: its causal window, else everything."""
    mask = attention.mixer.mask
    if mask.causal and mask.window_before is not None:
        return min(mask.window_before, max_length)
    return max_length


@pz.pytree_dataclass
class CachingAttention(pz.nn.Layer):
    """An `Attention` layer that reads and extends a KV cache.

    ``cache.value`` holds ``k`` and ``v`` (named axes ``batch``, ``seq``, ``kv_heads``,
    ``head_dim``; ``seq`` of the cache length) and ``positions`` (``batch``, ``seq``; -1 for
    empty slots). The wrapped layer's sublayers and hook points are used unchanged.
    ``kernel`` (see `DECODE_ATTENTION_KERNEL`) lets one-token steps run the cache write and
    attention as `gemmalens.kernels.decode_attention.decode_attention`.
    """

    attention: Attention
    cache: pz.StateVariable
    kernel: str = dataclasses.field(default="off", metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        layer = self.attention
        q = layer.query(x, **side_inputs)
        k = layer.key(x, **side_inputs)
        v = layer.value(x, **side_inputs)
        stored = self.cache.value
        new_positions = side_inputs["token_positions"]
        if q.named_shape["seq"] == 1 and self._kernel_applies(q, k, stored):
            z = self._attend_with_kernel(q, k, v, new_positions)
            z = layer.hook_z(z, **side_inputs)
            return layer.output(z, **side_inputs)
        updated = _write(stored, k, v, new_positions)
        if q.named_shape["seq"] == 1:
            # One new token evicts only a key its own window no longer sees, so it can
            # attend over the updated cache directly.
            keys, values, kv_positions = updated["k"], updated["v"], updated["positions"]
        else:
            # Several new tokens (a prompt) may overwrite each other's window in a ring
            # buffer: attend over the old cache followed by all new keys.
            def extend(old, new):
                return pz.nx.nmap(jnp.concatenate)([old.untag("seq"), new.untag("seq")]).tag("seq")

            keys, values = extend(stored["k"], k), extend(stored["v"], v)
            kv_positions = extend(stored["positions"], new_positions)
        z = layer.mixer((q, keys, values), **{**side_inputs, "kv_positions": kv_positions})
        z = layer.hook_z(z, **side_inputs)
        self.cache.value = updated
        return layer.output(z, **side_inputs)

    def _kernel_applies(self, q, k, stored) -> bool:
        """Whether this step can run as `decode_attention`: a plain causal mixer whose
        weights nobody hooks, a shape the kernel tiles, keys in the cache's dtype."""
        if not _kernel_wanted(self.kernel, q.named_shape["batch"]):
            return False
        mixer = self.attention.mixer
        return (
            type(mixer) is DotProductAttention
            and not mixer.uses_explicit_weights()
            and mixer.mask.causal
            and mixer.mask.window_after is None
            and k.dtype == stored["k"].dtype
            and decode_attention.supported(
                q.named_shape["head_dim"], q.named_shape["heads"] // k.named_shape["kv_heads"]
            )
        )

    def _attend_with_kernel(self, q, k, v, new_positions) -> pz.nx.NamedArray:
        stored = self.cache.value
        length = stored["positions"].named_shape["seq"]
        mixer = self.attention.mixer

        def one_token(named, axes):
            return named.unwrap(*axes)[:, 0]

        z, key_cache, value_cache = decode_attention.decode_attention(
            one_token(q, QKV_AXES),
            one_token(k, KV_AXES),
            one_token(v, KV_AXES),
            new_positions.unwrap("batch", "seq")[:, 0],
            stored["positions"].unwrap("batch", "seq"),
            stored["k"].unwrap(*KV_AXES),
            stored["v"].unwrap(*KV_AXES),
            scale=mixer.scale,
            window=mixer.mask.window_before,
            interpret=self.kernel == "interpret",
            **decode_attention.launch_settings(
                length, q.named_shape["head_dim"], jnp.dtype(stored["k"].dtype).itemsize
            ),
        )

        def as_cache(array, old):
            return pz.nx.wrap(array).tag(*KV_AXES).order_as(*old.named_shape)

        self.cache.value = {
            "k": as_cache(key_cache, stored["k"]),
            "v": as_cache(value_cache, stored["v"]),
            "positions": _write(stored, None, None, new_positions)["positions"],
        }
        return pz.nx.wrap(z[:, None]).tag(*QKV_AXES)


@pz.pytree_dataclass
class KernelMLP(pz.nn.Layer):
    """A `GatedMLP` whose one-token decode steps run as `decode_mlp.gated_mlp` (see
    `DECODE_MLP_KERNEL`); any other call, or a hooked or sparse-gated block, runs ``mlp``."""

    mlp: GatedMLP
    kernel: str = dataclasses.field(default="off", metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        if not self._kernel_applies(x):
            return self.mlp(x, **side_inputs)
        mlp = self.mlp

        def matrix(linear: pz.nn.Linear, out_axis: str, in_axis: str) -> jax.Array:
            return linear.weights.value.unwrap(out_axis, in_axis)

        out = decode_mlp.gated_mlp(
            x.unwrap("batch", "seq", "embedding")[:, 0],
            matrix(mlp.gate_proj, "neurons", "embedding"),
            matrix(mlp.up_proj, "neurons", "embedding"),
            matrix(mlp.down_proj, "embedding", "neurons"),
            interpret=self.kernel == "interpret",
        )
        return pz.nx.wrap(out[:, None]).tag("batch", "seq", "embedding")

    def _kernel_applies(self, x: pz.nx.NamedArray) -> bool:
        shape = x.named_shape
        mlp = self.mlp
        if set(shape) != {"batch", "seq", "embedding"} or shape["seq"] != 1:
            return False
        if not _kernel_wanted(self.kernel, shape["batch"]):
            return False
        hooks = (mlp.hook_pre, mlp.hook_pre_linear, mlp.hook_post)
        return (
            type(mlp) is GatedMLP
            and mlp.gate_sparsity is None
            and all(type(hook) is HookPoint for hook in hooks)
            and all(
                linear.weights.value.dtype == x.dtype
                for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            )
            and decode_mlp.supported(
                shape["batch"],
                shape["embedding"],
                mlp.gate_proj.weights.value.named_shape["neurons"],
            )
        )


def _write(stored: dict, k, v, positions) -> dict:
    """Writes the new entries at slot ``position % length`` (``k`` and ``v`` may be None:
    only what is given is written).

    Only the last ``length`` real tokens of each row are written, so a prompt longer than a
    sliding window never writes two tokens to one slot.
    """
    length = stored["positions"].named_shape["seq"]

    def slots(pos):
        last = jnp.max(pos)
        keep = (pos >= 0) & (pos > last - length)
        return jnp.where(keep, pos % length, length)  # index `length` is dropped

    slot = pz.nx.nmap(slots)(positions.untag("seq"))

    if positions.named_shape["seq"] == 1:
        # One token per row: a select over the cache is one fused kernel, where a scatter
        # vmapped over heads and features is several slow ones.
        hit = pz.nx.nmap(lambda where: jnp.arange(length) == where[0])(slot).tag("seq")

        def write(old, new):
            only = pz.nx.nmap(lambda n: n[0])(new.untag("seq"))
            # Same axis order as before: the cache is a loop carry and must keep its layout.
            return pz.nx.nmap(jnp.where)(hit, only, old).order_as(*old.named_shape)

    else:

        def scatter(old, new, where):
            return old.at[where].set(new, mode="drop")

        def write(old, new):
            return pz.nx.nmap(scatter)(old.untag("seq"), new.untag("seq"), slot).tag("seq")

    new = {"k": k, "v": v, "positions": positions}
    return {name: write(stored[name], new[name]) for name in new if new[name] is not None}


# What an empty cache slot holds: zero keys and values at position -1 (never attended to).
_EMPTY_FILL = {"k": 0, "v": 0, "positions": -1}


def _check_kernel_setting(setting: str, name: str) -> None:
    if setting not in _KERNEL_CHOICES:
        raise ValueError(
            f"Unknown decode kernel setting {setting!r}; choose one of "
            f"{', '.join(map(repr, _KERNEL_CHOICES))} (gemmalens.sampling.{name})."
        )


def with_kv_cache(
    model: pz.nn.Layer,
    batch_size: int,
    max_length: int,
    kernel: str = "off",
    mlp_kernel: str = "off",
) -> pz.nn.Layer:
    """A copy of ``model`` whose attention layers keep an (empty) KV cache.

    ``kernel`` says whether decode steps may use `gemmalens.kernels.decode_attention`
    (see `DECODE_ATTENTION_KERNEL`), ``mlp_kernel`` whether gated feed-forward blocks may
    use `gemmalens.kernels.decode_mlp` (see `DECODE_MLP_KERNEL`)."""
    _check_kernel_setting(kernel, "DECODE_ATTENTION_KERNEL")
    _check_kernel_setting(mlp_kernel, "DECODE_MLP_KERNEL")
    counter = iter(range(1_000_000))
    # Keys and values are kept in the stream's dtype where it is wider than the weights'.
    stream_dtype = activation_dtype_of(model)

    def add_cache(attention: Attention) -> CachingAttention:
        length = cache_length(attention, max_length)
        kv_shape = {
            "batch": batch_size,
            "seq": length,
            **{a: n for a, n in attention.key.sublayers[0].output_axes.items()},
        }
        dtype = attention.key.sublayers[0].weights.value.dtype
        if stream_dtype is not None:
            dtype = jnp.promote_types(dtype, stream_dtype)
        positions_shape = {"batch": batch_size, "seq": length}
        shapes = {"k": kv_shape, "v": kv_shape, "positions": positions_shape}
        dtypes = {"k": dtype, "v": dtype, "positions": jnp.int32}
        cache = {name: pz.nx.full(shapes[name], _EMPTY_FILL[name], dtypes[name]) for name in shapes}
        return CachingAttention(
            attention, pz.StateVariable(cache, label=f"{_KV_LABEL}{next(counter)}"), kernel
        )

    model = pz.select(model).at_instances_of(Attention).apply(add_cache)
    if mlp_kernel == "off":
        return model
    return pz.select(model).at_instances_of(GatedMLP).apply(lambda mlp: KernelMLP(mlp, mlp_kernel))


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `Model.generate` returns.

    Attributes:
      tokens: the new tokens, [batch, max_new_tokens] (pad after an end token).
      prompt_tokens, prompt_mask: the left-padded prompts, [batch, prompt_len].
      text: the decoded new text per prompt (up to the end token), with a tokenizer.
      prompt_cache: captured hook values on the prompt (when ``capture`` was given).
      step_cache: captured values at each step, with a leading [step] axis.
    """

    tokens: jax.Array
    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    text: list[str] | None = None
    prompt_cache: Any = None
    step_cache: Any = None

    @property
    def sequences(self) -> jax.Array:
        """Prompt and continuation, [batch, prompt_len + max_new_tokens]."""
        return jnp.concatenate([self.prompt_tokens, self.tokens], axis=1)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Turns next-token logits [batch, vocab] into tokens [batch].

    ``temperature == 0`` is greedy. ``top_k`` keeps the k most likely tokens; ``top_p``
    keeps the smallest set whose probability reaches p (the most likely token always).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        # A negative temperature would sample from the reversed distribution and top_p = 0
        # would keep no token: both ran silently before, so each is refused here.
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(
                f"temperature={self.temperature!r}: use 0 for greedy decoding or a positive "
                "number (1.0 samples from the model's own distribution)."
            )
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            raise ValueError(
                f"top_k={self.top_k!r}: it is how many of the most likely tokens stay in play, "
                "a whole number of at least 1 (None keeps every token)."
            )
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ValueError(
                f"top_p={self.top_p!r}: it is the probability mass kept, in (0, 1] "
                "(None or 1.0 keeps every token)."
            )

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.float32)
        if self.temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / self.temperature
        logits = jnp.where(self.allowed(logits), logits, -jnp.inf)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    def allowed(self, logits: jax.Array) -> jax.Array:
        """Boolean [batch, vocab]: the tokens top-k and top-p leave in play."""
        keep = jnp.ones(logits.shape, bool)
        if self.top_k is not None and self.top_k > logits.shape[-1]:
            raise ValueError(
                f"top_k={self.top_k} is more than the vocabulary's {logits.shape[-1]} tokens; "
                "use None to keep every token."
            )
        if self.top_k is not None:
            kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
            keep &= logits >= kth
        if self.top_p is not None:
            order = jnp.argsort(-logits, axis=-1)
            probs = jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)
            sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
            before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
            keep_sorted = before < self.top_p
            inverse = jnp.argsort(order, axis=-1)
            keep &= jnp.take_along_axis(keep_sorted, inverse, axis=-1)
        return keep


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_max_new_tokens(max_new_tokens) -> int:
    """``max_new_tokens`` as an int, or a ValueError that says what it must be."""
    if not (_is_int(max_new_tokens) and max_new_tokens >= 0):
        raise ValueError(
            f"max_new_tokens={max_new_tokens!r}: it is how many tokens each prompt gets, a "
            "whole number of at least 0."
        )
    return int(max_new_tokens)


def _split(values, prefix: str):
    inside = [v for v in values if isinstance(v.label, str) and v.label.startswith(prefix)]
    outside = [v for v in values if not (isinstance(v.label, str) and v.label.startswith(prefix))]
    return inside, outside


# Decode steps per loop iteration: unrolling amortises the loop's own per-iteration cost.
DECODE_UNROLL = 1


def _is_positions_leaf(path) -> bool:
    return any(getattr(key, "key", None) == "positions" for key in path)


@dataclasses.dataclass(frozen=True)
class _EmptyCaches:
    """The KV caches of a program as shapes: made (zeros, positions -1) inside the
    compiled call, so a call allocates and fills nothing beforehand. Hashable (static)."""

    treedef: Any
    leaves: tuple[tuple[tuple[int, ...], str, int], ...]  # (shape, dtype, fill)
    # On a mesh: each cache's sharding (KV heads over the model axis, rows over the data
    # axis, where they divide), so that no device holds the whole cache.
    shardings: tuple[Any, ...] | None = None

    def make(self) -> list:
        arrays = [jnp.full(shape, fill, dtype) for shape, dtype, fill in self.leaves]
        if self.shardings is not None:
            arrays = [
                a if s is None else jax.lax.with_sharding_constraint(a, s)
                for a, s in zip(arrays, self.shardings)
            ]
        return jax.tree.unflatten(self.treedef, arrays)


@dataclasses.dataclass(frozen=True)
class GenerationProgram:
    """A model prepared for `generate_tokens`: KV caches added, state split off, and the
    tree flattened once. Rewriting and flattening a Penzai tree costs tens of milliseconds
    per call for a 1B model, several decode steps' worth, so `Model.generate` keeps one
    program per (captures, batch, length) until the model changes.

    Attributes:
      treedef: the tree structure of ``(model without state, capture state values)``.
      leaves: the arrays of that tree (weights).
      caches: the empty KV caches, as shapes.
    """

    treedef: Any
    leaves: list
    caches: _EmptyCaches


def prepare(
    model: pz.nn.Layer, batch_size: int, max_length: int, placement: Any = None
) -> GenerationProgram:
    """The `GenerationProgram` of ``model`` (parameters frozen, captures installed) for
    ``batch_size`` rows of up to ``max_length`` tokens (prompt and new tokens). With the
    model's `gemmalens.sharding.Placement`, the KV caches are split like the keys."""
    # The empty caches made here are only read for their shapes (once per program).
    cached = with_kv_cache(
        model, batch_size, max_length, DECODE_ATTENTION_KERNEL, DECODE_MLP_KERNEL
    )
    unbound, state = pz.unbind_state_vars(cached)
    caches, captures = _split([v.freeze() for v in state], _KV_LABEL)
    leaves, treedef = jax.tree.flatten((unbound, captures))
    with_paths, caches_treedef = jax.tree_util.tree_flatten_with_path(caches)
    shapes = tuple(
        (tuple(leaf.shape), jnp.dtype(leaf.dtype).name, -1 if _is_positions_leaf(path) else 0)
        for path, leaf in with_paths
    )
    shardings = None
    if placement is not None:
        named = jax.tree.leaves(caches, is_leaf=pz.nx.is_namedarray)
        shardings = tuple(placement.activation_sharding(a.named_shape) for a in named)
    return GenerationProgram(treedef, leaves, _EmptyCaches(caches_treedef, shapes, shardings))


def generate_tokens(
    program: GenerationProgram, tokens: jax.Array, mask: jax.Array, key: jax.Array, **options
) -> tuple[jax.Array, Any, Any]:
    """Runs `_generate` on a prepared program: same options and results."""
    plan = Distinct(program.treedef, program.leaves)
    return _generate_program(program.caches, plan, tokens, mask, key, **options)


_STATIC = ("max_new_tokens", "sampler", "eos_ids", "pad_id", "unroll")


@compiling.jit(static_argnums=0, static_argnames=_STATIC, decoding=True)
def _generate_program(empty_caches, plan, tokens, mask, key, **options):
    model, captures = plan.tree()  # a `Distinct`
    return _decode(model, empty_caches.make(), captures, tokens, mask, key, **options)


@compiling.jit(static_argnames=_STATIC, decoding=True)
def _generate(
    plan: Distinct, tokens, mask, key, *, max_new_tokens, sampler, eos_ids, pad_id, unroll=1
):
    """Prefill then scan, for ``plan = Distinct.of((model, state))`` (the state holding the
    KV caches and capture slots). Returns new tokens [batch, max_new_tokens], the prefill
    captures and the per-step captures (stacked along a leading step axis)."""
    model, state = plan.tree()
    caches, captures = _split(state, _KV_LABEL)
    return _decode(
        model, caches, captures, tokens, mask, key,
        max_new_tokens=max_new_tokens, sampler=sampler, eos_ids=eos_ids, pad_id=pad_id,
        unroll=unroll,
    )  # fmt: skip


def _decode(
    model, caches, captures, tokens, mask, key, *, max_new_tokens, sampler, eos_ids, pad_id, unroll
):
    empty_captures = captures

    # Only the last position's logits are read: the prompt's others are not computed (at
    # 4,096 tokens and Gemma's 262k vocabulary they would be 2 GiB and a few % of the
    # prefill), unless a hook there is captured or the unembedding is not per-token.
    last = (tokens.shape[1] - 1, tokens.shape[1]) if unembeds_per_token(model) else None

    def forward(caches, tokens, positions):
        logits, values = stateless_call(
            model,
            [*caches, *empty_captures],
            pz.nx.wrap(tokens).tag("batch", "seq"),
            token_positions=positions,
            **{LOGIT_WINDOW: last if tokens.shape[1] > 1 else None},
        )
        new_caches, captured = _split(values, _KV_LABEL)
        return logits.unwrap("batch", "seq", "vocab")[:, -1], new_caches, captured

    positions = positions_from_mask(pz.nx.wrap(mask).tag("batch", "seq"))
    next_logits, caches, prompt_captures = forward(caches, tokens, positions)
    next_position = jnp.sum(mask, axis=1).astype(jnp.int32)
    done = jnp.zeros(tokens.shape[0], bool)
    eos = jnp.asarray(eos_ids, jnp.int32)

    def step(carry, step_key):
        caches, next_logits, position, done = carry
        token = jnp.where(done, pad_id, sampler(next_logits, step_key))
        done = done | jnp.isin(token, eos)
        named_position = pz.nx.wrap(position[:, None]).tag("batch", "seq")
        logits, caches, captured = forward(caches, token[:, None], named_position)
        return (caches, logits, position + 1, done), (token, captured)

    keys = jax.random.split(key, max_new_tokens)
    _, (new_tokens, step_captures) = jax.lax.scan(
        step, (caches, next_logits, next_position, done), keys, unroll=unroll
    )
    return new_tokens.T, prompt_captures, step_captures
