"""`ActivationCache`: the values of one run, by hook name, and the analyses built on them.

Every analysis here is linear algebra on cached values plus the model's weights; nothing
runs the model again. Shapes are batch-first; stacks of residual-stream pieces put their
``component`` axis first: ``[component, batch, pos, d_model]``.

In Gemma 3 the residual stream is ``h = embed + sum_i (attn_out_i + mlp_out_i)`` where each
branch output is *after* its post-norm (``blocks.{i}.hook_attn_out`` / ``hook_mlp_out``).
The newer families write it otherwise (Gemma 4 scales it per layer, Gemma 3n keeps several
AltUp streams, T5Gemma 2 has two stacks): `gemmalens.residual` holds each family's algebra,
and every method here goes through it, so decompositions add up on every family. The final
norm is not linear, but with the run's own RMS divisor (``ln_final.hook_scale``) held fixed
it is: ``ln_final(sum_c x_c) = sum_c x_c / rms * gain``. That is how `accumulated_resid`,
`decompose_resid` and `logit_attrs` apply it when asked (``apply_ln=True``).

Encoder-decoder models: every method takes ``stack="encoder"`` or ``"decoder"`` (default:
the decoder, whose output reaches the logits).
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Union

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens import residual
from gemmalens.layers.hooks import checked_indices

if TYPE_CHECKING:
    from gemmalens.lens import Model

# None: every position; an int: one position (the pos axis is dropped); a slice or a list of
# ints: those positions; an integer *array* of shape [batch]: one position per row (e.g. the
# last real token of each right-padded row; the pos axis is dropped).
PosSlice = Union[None, int, slice, Sequence[int], jax.Array, np.ndarray]

# Short names for ``cache["resid_pre", 3]``-style lookups.
_SHORT_NAMES = {
    "embed": "hook_embed",
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "q": "blocks.{}.attn.hook_q",
    "k": "blocks.{}.attn.hook_k",
    "v": "blocks.{}.attn.hook_v",
    "z": "blocks.{}.attn.hook_z",
    "attn_scores": "blocks.{}.attn.hook_attn_scores",
    "pattern": "blocks.{}.attn.hook_pattern",
    "mlp_pre": "blocks.{}.mlp.hook_pre",
    "mlp_pre_linear": "blocks.{}.mlp.hook_pre_linear",
    "mlp_post": "blocks.{}.mlp.hook_post",
    "ln_final": "ln_final.hook_normalized",
    "ln_final_scale": "ln_final.hook_scale",
}


# Capturing attention patterns (or scores) that would take more bytes than this warns first.
PATTERN_WARNING_BYTES = 2 * 2**30

_SQUARE_HOOKS = (".hook_pattern", ".hook_attn_scores")


class PatternMemoryWarning(UserWarning):
    """Capturing attention patterns or scores of a long sequence needs a lot of memory."""


def _bytes_text(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def pattern_memory(names: Sequence[str], batch: int, seq: int, heads: int, itemsize: int) -> int:
    """Bytes that capturing the ``[batch, heads, seq, seq]`` values of the attention
    pattern / score hooks among ``names`` takes (other hooks count 0)."""
    count = sum(1 for name in names if name.endswith(_SQUARE_HOOKS))
    return count * batch * heads * seq * seq * itemsize


def warn_if_patterns_are_large(
    model: Model,
    names: Sequence[str],
    batch: int,
    seq: int,
    stacklevel: int = 3,
    heads: int | None = None,
) -> None:
    """Warns (`PatternMemoryWarning`) when the pattern / score hooks among ``names`` need
    more than ``PATTERN_WARNING_BYTES`` for ``batch`` sequences of ``seq`` tokens (with
    ``heads`` heads; by default the model's largest head count)."""
    squares = [name for name in names if name.endswith(_SQUARE_HOOKS)]
    if not squares:
        return
    config = model.config
    stack_configs = [
        getattr(config, name) for name in ("encoder", "decoder") if hasattr(config, name)
    ]
    if heads is None:
        heads = max(c.num_attention_heads for c in stack_configs or [config])
    # Leaves without a dtype (a Python float such as pz.nn.ConstantRescale's) are skipped.
    dtypes = [leaf.dtype for leaf in model._leaves if hasattr(leaf, "dtype")]
    floats = [dtype for dtype in dtypes if jnp.issubdtype(dtype, jnp.floating)]
    itemsize = max((jnp.dtype(d).itemsize for d in floats), default=4)
    needed = pattern_memory(squares, batch, seq, heads, itemsize)
    if needed <= PATTERN_WARNING_BYTES:
        return
    warnings.warn(
        f"Capturing {len(squares)} attention pattern/score hook(s) for {batch} x {seq} tokens "
        f"will need about {_bytes_text(needed)} ({needed} bytes = {len(squares)} hooks x "
        f"{batch} batch x {heads} heads x {seq} x {seq} positions x {itemsize} bytes). Ask "
        "for fewer layers (e.g. names='blocks.3.attn.hook_pattern'), a shorter sequence or a "
        "smaller batch; gemmalens.cache.PATTERN_WARNING_BYTES sets this threshold.",
        PatternMemoryWarning,
        stacklevel=stacklevel,
    )


def unknown_name_message(name: str, valid: list[str], where: str) -> str:
    """An error message for an unknown hook name that lists the nearest valid ones."""
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"No hook point named {name!r} {where}.{hint} (`m.hook_names` lists all {len(valid)}.)"


def select_positions(x: jax.Array, pos_slice: PosSlice, pos_axis: int) -> jax.Array:
    """``x`` restricted to the positions ``pos_slice`` picks along ``pos_axis``.

    The batch axis is the one just before ``pos_axis`` (used by per-row positions).
    """
    if pos_slice is None:
        return x
    if isinstance(pos_slice, (jax.Array, np.ndarray)) and np.ndim(pos_slice) == 1:
        # One position per batch row: gather along pos with the row's own index.
        rows = x.shape[pos_axis - 1]
        positions = jnp.asarray(pos_slice)
        if positions.shape != (rows,):
            raise ValueError(
                f"A position array must have shape [batch] = ({rows},), got {positions.shape}."
            )
        shape = [1] * x.ndim
        shape[pos_axis - 1] = rows
        positions = jnp.asarray(_checked_positions(positions, x.shape[pos_axis]))
        index = positions.reshape(shape)
        index = jnp.where(index < 0, index + x.shape[pos_axis], index)  # from the end
        return jnp.take_along_axis(x, index, axis=pos_axis).squeeze(pos_axis)
    if isinstance(pos_slice, slice):
        key = pos_slice
    elif isinstance(pos_slice, (int, np.integer)) or np.ndim(pos_slice) == 0:
        key = int(_checked_positions(pos_slice, x.shape[pos_axis]))
    else:
        key = _checked_positions(list(pos_slice), x.shape[pos_axis])
    index = [slice(None)] * x.ndim
    index[pos_axis] = key
    return x[tuple(index)]


def _checked_positions(positions: Any, length: int) -> Any:
    """``positions`` checked against a sequence of ``length`` (JAX's indexing would clamp
    one past the end to the last position, silently); traced ones pass unchecked."""
    if isinstance(positions, jax.core.Tracer):
        return positions
    index = checked_indices(
        np.asarray(positions).ravel().tolist(), length, "position", "the cached sequence"
    )
    return index.reshape(np.shape(positions))


def _checked_token_ids(tokens: Any, vocab: int, argument: str) -> jax.Array:
    """Token ids checked against the vocabulary (JAX's indexing would clamp one past it
    to the last row of the unembedding, silently); traced ones pass unchecked."""
    if isinstance(tokens, jax.core.Tracer):
        return tokens
    ids = np.asarray(tokens)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{argument} must be token ids (integers); got dtype {ids.dtype}.")
    outside = ids[(ids < 0) | (ids >= vocab)]
    if outside.size:
        raise ValueError(
            f"{argument} holds token id {int(outside.ravel()[0])}, outside the vocabulary "
            f"[0, {vocab}). Token ids come from m.to_tokens or m.tokenizer.encode."
        )
    return jnp.asarray(ids)


@dataclasses.dataclass(frozen=True)
class LogitLens:
    """What each layer's residual stream would predict if the model stopped there.

    Attributes:
      labels: one per layer entry: ``hook_embed``, then ``blocks.{i}.hook_resid_post``.
      logits: ``[layer, batch, pos, vocab]`` (pos dropped for an int / per-row pos_slice).
      top_tokens: ``[layer, batch, pos, k]`` token ids of the k largest logits, best first.
      top_logprobs: ``[layer, batch, pos, k]`` their log-probabilities.
      target_logprobs: ``[layer, batch, pos]`` log-probability of ``targets`` (when given).
    """

    labels: list[str]
    logits: jax.Array
    top_tokens: jax.Array
    top_logprobs: jax.Array
    target_logprobs: jax.Array | None = None

    def decode(self, tokenizer: Any, batch: int = 0, pos: int = -1) -> list[list[str]]:
        """The top tokens as text, one list per layer, for one (batch, pos) entry."""
        tops = np.asarray(self.top_tokens)
        tops = tops[:, batch, pos] if tops.ndim == 4 else tops[:, batch]
        return [[tokenizer.decode([[int(t)]])[0] for t in row] for row in tops]


class ActivationCache(Mapping):
    """Values captured by `Model.run_with_cache`, by hook name, in forward order.

    ``cache[name]`` is a plain batch-first array (``Model.hook_names`` lists the names);
    ``cache["resid_pre", 3]`` is short for ``cache["blocks.3.hook_resid_pre"]``.
    The analysis methods need ``model`` (for weights) and the hooks they read; when a value
    is missing the error says which hook to capture.
    """

    def __init__(self, values: dict[str, jax.Array], model: Model | None = None):
        self._values = values
        self.model = model
        self._readouts: dict[str | None, tuple[Any, residual.Readout]] = {}

    def gather(self) -> ActivationCache:
        """The same cache with every value whole on this host (NumPy arrays).

        On a mesh (`gemmalens.sharding`) captured values stay sharded across the devices;
        this collects them, across hosts too in a multi-host job."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            gather = lambda v: np.asarray(multihost_utils.process_allgather(v, tiled=True))  # noqa: E731
        else:
            gather = np.asarray
        return ActivationCache({k: gather(v) for k, v in self._values.items()}, self.model)

    # ------------------------------------------------------------------------ mapping

    def __getitem__(self, name: str | tuple[str, int]) -> jax.Array:
        if isinstance(name, tuple):
            short, layer = name
            if short not in _SHORT_NAMES:
                raise KeyError(
                    f"Unknown short name {short!r}; use one of {sorted(_SHORT_NAMES)} "
                    "or a full hook name."
                )
            name = _SHORT_NAMES[short].format(layer)
        try:
            return self._values[name]
        except KeyError:
            if self.model is not None and name in self.model.hook_names:
                raise KeyError(
                    f"{name!r} is a hook point of this model but was not captured in this "
                    f"cache (it holds {len(self._values)} of the model's "
                    f"{len(self.model.hook_names)}). Capture it with "
                    f"m.run_with_cache(tokens, names=[..., {name!r}]) (or names=None for all)."
                ) from None
            raise KeyError(
                unknown_name_message(name, list(self._values), "in this cache")
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in list(self._values.items())[:4])
        more = f", ... ({len(self)} in all)" if len(self) > 4 else ""
        return f"ActivationCache({shown}{more})"

    # ------------------------------------------------------------------------ helpers

    def _need(self, *names: str, purpose: str) -> jax.Array:
        """The first of ``names`` present in the cache (they are equal values)."""
        for name in names:
            if name in self._values:
                return self._values[name]
        raise KeyError(
            f"{purpose} needs {names[0]!r} in the cache; capture it with "
            f"m.run_with_cache(tokens, names=[..., {names[0]!r}]) (or names=None for all)."
        )

    def _need_model(self, purpose: str) -> Model:
        if self.model is None:
            raise ValueError(f"{purpose} needs the model's weights; this cache has no model.")
        return self.model

    def readout(self, stack: str | None = None) -> residual.Readout:
        """The residual algebra of ``stack`` for this run (see `gemmalens.residual`):
        ``"encoder"`` or ``"decoder"`` on encoder-decoder models, None for the stack whose
        output reaches the logits."""
        # Made once per stack (and model): finding a model's blocks walks its whole tree.
        made = self._readouts.get(stack)
        if made is None or made[0] is not self.model:
            made = self._readouts[stack] = (self.model, residual.readout(self, stack))
        return made[1]

    def num_layers_of(self, stack: str | None = None) -> int:
        """The block count of ``stack`` (None: the stack that reaches the logits)."""
        return residual.find_stack(self._need_model("The layer count").config, stack).num_layers

    @property
    def num_layers(self) -> int:
        return self.num_layers_of(None)

    def _layer_count(self, layer: int | None, stack: str | None = None) -> int:
        total = self.num_layers_of(stack)
        if layer is None:
            return total
        if not 0 <= layer <= total:
            raise ValueError(f"layer must be in [0, {total}] (or None for all), got {layer}.")
        return layer

    def final_scale(self, stack: str | None = None) -> jax.Array:
        """The final norm's RMS divisor of this run, ``[batch, pos, 1]`` (float32).

        Read from ``ln_final.hook_scale`` when captured, else recomputed (identically) from
        the final residual stream (for Gemma 3n: the AltUp collapse).
        """
        out = self.readout(stack)
        name = out.p + "ln_final.hook_scale"
        if name in self._values:
            return self._values[name]
        return residual.rms(out.resid(out.stack.num_layers), out.final_norm().eps)

    def apply_ln_to_stack(self, residual_stack: jax.Array, stack: str | None = None) -> jax.Array:
        """The final norm applied to each component with this run's RMS divisor.

        ``residual_stack``: ``[..., batch, pos, d_model]`` with every position (slice
        afterwards). Because the divisor is fixed, the result is linear: the normalised
        components sum to ``ln_final.hook_normalized`` when the raw ones sum to the final
        residual stream.
        """
        gain = residual.norm_gain(self.readout(stack).final_norm())
        scaled = residual_stack.astype(jnp.float32) / self.final_scale(stack)
        return (scaled * gain).astype(residual_stack.dtype)

    def _finish_stack(
        self,
        components: list[jax.Array],
        labels: list[str],
        apply_ln: bool,
        pos_slice: PosSlice,
        return_labels: bool,
        stack: str | None,
    ) -> jax.Array | tuple[jax.Array, list[str]]:
        values = jnp.stack(components)
        if apply_ln:
            values = self.apply_ln_to_stack(values, stack)
        values = select_positions(values, pos_slice, pos_axis=2)
        return (values, labels) if return_labels else values

    # ------------------------------------------------------------------------ residual stream

    def accumulated_resid(
        self,
        layer: int | None = None,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        return_labels: bool = False,
        stack: str | None = None,
    ) -> jax.Array | tuple[jax.Array, list[str]]:
        """The residual stream as it grows: the embedding, then after each block.

        Args:
          layer: include blocks ``0 .. layer-1`` (so the last entry is the input of block
            ``layer``); None for all blocks (the last entry is the final residual stream).
          apply_ln: apply the final norm with this run's cached RMS divisor (the linear
            view used for attribution; `logit_lens` can instead renormalise each layer).
          pos_slice: which positions to keep (see `PosSlice`).
          return_labels: also return the hook name each entry was read from.
          stack: ``"encoder"`` / ``"decoder"`` on encoder-decoder models (default: the
            stack whose output reaches the logits).

        Returns:
          ``[layer + 1, batch, pos, d_model]`` (pos dropped for an int / per-row slice),
          float32.

        Gemma 3n keeps K AltUp streams; its entries are what the model reads out of them:
        the collapse (``hook_altup_collapsed`` at the end) applied to the streams after
        each block (``blocks.{i}.hook_streams_post``; the first entry collapses
        ``hook_altup_expanded``), not the active stream of ``hook_resid_post``.
        """
        out = self.readout(stack)
        count = self._layer_count(layer, stack)
        components = [out.resid(d) for d in range(count + 1)]
        labels = [out.resid_label(d) for d in range(count + 1)]
        return self._finish_stack(components, labels, apply_ln, pos_slice, return_labels, stack)

    def decompose_resid(
        self,
        layer: int | None = None,
        mode: Literal["all", "attn", "mlp"] = "all",
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
        stack: str | None = None,
        detail: bool = True,
    ) -> jax.Array | tuple[jax.Array, list[str]]:
        """The residual stream split into what wrote it, each part as it arrives there.

        With ``mode="all"`` and ``incl_embeds=True`` the components sum (up to float
        rounding) to entry ``layer`` of `accumulated_resid`: the input of block ``layer``,
        or the final residual stream for None. Per family:

        * Gemma 3, T5Gemma 2: the embedding, each attention and MLP output (after their
          post-norms, ``hook_attn_out`` / ``hook_mlp_out``). The decoder of T5Gemma 2
          splits its merged attention into ``hook_attn_out[self]`` and
          ``hook_attn_out[cross]`` (with ``detail``), the post-norm's divisor held at its
          value in this run.
        * Gemma 4: each part multiplied by the ``layer_scalar`` of its block and of every
          later block (as it arrives); the per-layer-input term
          (``hook_per_layer_out``, E2B/E4B) as its own part; MoE layers split (with
          ``detail``) into the dense branch (``hook_dense_mlp_out``) and the routed experts
          (``moe.hook_out``), the shared post-norm's divisor held fixed.
        * Gemma 3n: the parts are the AltUp initial streams (``hook_altup_expanded``) and,
          per block, the attention output, LAuReL's output, the MLP output and the
          per-layer-input term, each carried through the later blocks' AltUp prediction
          and correction and read out through the collapse, with this run's router
          coefficients and the collapse's rescaling held fixed
          (`gemmalens.residual.AltUpReadout` has the algebra).

        Holding a norm divisor or a router coefficient fixed is the linearisation direct
        logit attribution already makes with the final norm: exact for this run, but
        removing a part would also change the held values.

        Returns:
          ``[component, batch, pos, d_model]`` float32, labels naming where each part was
          read (hook names; ``[self]`` / ``[cross]`` marks the two attention parts).
        """
        out = self.readout(stack)
        count = self._layer_count(layer, stack)
        components, labels = out.components(count, mode, incl_embeds, detail)
        if not components:
            raise ValueError("decompose_resid selected no components (layer=0, no embeds?).")
        return self._finish_stack(components, labels, apply_ln, pos_slice, return_labels, stack)

    # ------------------------------------------------------------------------ heads

    def head_results(
        self,
        layer: int,
        fold_post_norm: bool = True,
        part: Literal["self", "cross"] | None = None,
        stack: str | None = None,
    ) -> jax.Array:
        """What each attention head of block ``layer`` writes, ``[batch, pos, head, d_model]``.

        A head's raw output is ``z_h @ W_O[h]``; the raw outputs sum to the attention
        output *before* the post-attention norm. That norm is not linear, so a head's
        share of ``hook_attn_out`` is defined here by holding the norm's RMS divisor at its
        value in this run (computed exactly from the cached ``hook_z``):
        ``result_h = z_h W_O[h] / rms(sum_h z_h W_O[h]) * gain``. These sum to
        ``blocks.{layer}.hook_attn_out``. They are a linearisation: removing a head would
        also change the divisor, which this split does not show. Works for every attention
        variant (own keys, keys shared from an earlier layer, K=V, merged self+cross).

        With ``fold_post_norm=False`` the raw ``z_h @ W_O[h]`` are returned (they sum to the
        pre-norm attention output). ``part`` (T5Gemma 2's decoder): only the part of each
        head's output that comes from its own tokens (``"self"``) or the encoder's
        (``"cross"``); the two parts sum to the whole.
        """
        out = self.readout(stack)
        return out.head_results(layer, fold_post_norm, part)

    def stack_head_results(
        self,
        layer: int | None = None,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        fold_post_norm: bool = True,
        return_labels: bool = False,
        stack: str | None = None,
        part: Literal["self", "cross"] | None = None,
    ) -> jax.Array | tuple[jax.Array, list[str]]:
        """Every head's result (see `head_results`) of blocks ``0 .. layer-1`` (all for
        None), stacked as ``[layer * head, batch, pos, d_model]`` with labels ``L{i}H{h}``.

        Each result is taken as it arrives in the stream that `decompose_resid` splits
        (multiplied by later layer scalars in Gemma 4, carried through AltUp in Gemma 3n;
        unchanged in Gemma 3), so with ``fold_post_norm=True`` (default) the heads of block
        ``i`` sum to that block's attention part of `decompose_resid`: they can replace
        the attention terms in a direct logit attribution.
        """
        out = self.readout(stack)
        count = self._layer_count(layer, stack)
        components, labels = [], []
        suffix = "" if part is None else f".{part}"
        for i in range(count):
            results = out.head_results(i, fold_post_norm, part)  # [b, p, h, d]
            if fold_post_norm:
                results = jnp.moveaxis(
                    out.transport(i, jnp.moveaxis(results, 2, 0), count, "attn"), 0, 2
                )
            for h in range(results.shape[2]):
                components.append(results[:, :, h])
                labels.append(f"L{i}H{h}{suffix}")
        if not components:
            raise ValueError("stack_head_results selected no heads (layer=0).")
        return self._finish_stack(components, labels, apply_ln, pos_slice, return_labels, stack)

    # ------------------------------------------------------------------------ logits

    def logit_attrs(
        self,
        residual_stack: jax.Array,
        tokens: int | jax.Array,
        incorrect_tokens: int | jax.Array | None = None,
        pos_slice: PosSlice = -1,
        apply_ln: bool = True,
        stack: str | None = None,
    ) -> jax.Array:
        """Direct logit attribution: each component's contribution to a logit (difference).

        Args:
          residual_stack: ``[component, batch, pos, d_model]`` with every position, as the
            stack methods return it with ``pos_slice=None``; raw (not yet normalised)
            unless ``apply_ln=False``.
          tokens: the token whose logit is explained: an int, ``[batch]`` (with an int or
            per-row ``pos_slice``) or ``[batch, pos]`` (with a slice).
          incorrect_tokens: if given, explain ``logit(tokens) - logit(incorrect_tokens)``.
          pos_slice: the positions read (default: the last).
          apply_ln: apply the final norm with the cached RMS divisor first.

        Returns:
          ``[component, batch]`` (or ``[component, batch, pos]`` for a slice). With the
          full `decompose_resid` stack the components sum to the model's logit (difference)
          *before* the final soft-cap. Without a ``final_logit_softcapping`` that is the
          logit itself. With one (Gemma 3n, Gemma 4) the model outputs
          ``cap * tanh(pre / cap)``; the attributions split ``pre`` (recover it from the
          logits as ``cap * arctanh(logit / cap)``, or use `pre_softcap_logits`), which
          the cap then squashes monotonically: their sum is not the capped logit, and
          this function does not pretend otherwise.
        """
        out = self.readout(stack)
        if apply_ln:
            residual_stack = self.apply_ln_to_stack(residual_stack, stack)
        values = select_positions(residual_stack, pos_slice, pos_axis=2)
        unembed = out.unembed_matrix()
        vocab = unembed.shape[0]
        direction = unembed[_checked_token_ids(tokens, vocab, "tokens")]
        if incorrect_tokens is not None:
            wrong = _checked_token_ids(incorrect_tokens, vocab, "incorrect_tokens")
            direction = direction - unembed[wrong]
        return jnp.sum(values.astype(jnp.float32) * direction.astype(jnp.float32), axis=-1)

    def pre_softcap_logits(self, logits: jax.Array, stack: str | None = None) -> jax.Array:
        """The model's logits before its final soft-cap, ``cap * arctanh(logits / cap)``
        (the logits themselves when the model has no cap): what `logit_attrs` splits."""
        cap = self.readout(stack).softcap()
        logits = jnp.asarray(logits, jnp.float32)
        if cap is None:
            return logits
        return cap * jnp.arctanh(logits / cap)

    def logit_lens(
        self,
        layer: int | None = None,
        pos_slice: PosSlice = None,
        top_k: int = 5,
        targets: jax.Array | None = None,
        norm: Literal["recompute", "cached"] = "recompute",
        softcap: bool = True,
        stack: str | None = None,
    ) -> LogitLens:
        """Logits read off the residual stream after each block (and the embedding).

        Args:
          layer: as in `accumulated_resid` (None: every block).
          pos_slice: which positions (see `PosSlice`).
          top_k: how many top tokens to keep per entry.
          targets: token ids shaped like the selected positions (``[batch, pos]``, or
            ``[batch]`` for an int / per-row slice); their log-probabilities are returned,
            e.g. ``tokens[:, 1:]`` with ``pos_slice=slice(0, -1)`` for next-token loss.
          norm: ``"recompute"`` applies the final norm to each layer's residual afresh
            (what the model would output if it stopped there); ``"cached"`` uses the final
            residual's RMS divisor for every layer (the linear view of `logit_attrs`).
          softcap: apply the model's final soft-cap, if it has one.
          stack: on encoder-decoder models only the decoder (the default) has logits;
            ``stack="encoder"`` raises, since the encoder's stream is never unembedded.

        Each entry is read out the way the model reads its last one: for Gemma 3n the
        AltUp collapse of all streams (see `accumulated_resid`), then the final norm, the
        unembedding and the soft-cap. With ``norm="recompute"``, ``softcap=True`` and every
        block, the last entry equals the model's logits.
        """
        out = self.readout(stack)
        unembed = out.unembed_matrix()  # raises for a stack without logits
        values, labels = self.accumulated_resid(layer, return_labels=True, stack=stack)
        if norm == "cached":
            normalized = self.apply_ln_to_stack(values, stack)
        else:
            final = out.final_norm()
            normalized = final(pz.nx.wrap(values).tag("layer", "batch", "seq", "embedding"))
            normalized = normalized.unwrap("layer", "batch", "seq", "embedding")
        normalized = select_positions(normalized, pos_slice, pos_axis=2)
        logits = jnp.einsum("...m,vm->...v", normalized, unembed.astype(normalized.dtype))
        cap = out.softcap()
        if softcap and cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        top_logprobs, top_tokens = jax.lax.top_k(logprobs, top_k)
        target_logprobs = None
        if targets is not None:
            targets = _checked_token_ids(targets, logprobs.shape[-1], "targets")
            index = jnp.broadcast_to(targets, logprobs.shape[1:-1])
            target_logprobs = jnp.take_along_axis(
                logprobs, jnp.broadcast_to(index, logprobs.shape[:-1])[..., None], axis=-1
            )[..., 0]
        return LogitLens(labels, logits, top_tokens, top_logprobs, target_logprobs)
