"""How each family writes its residual stream, as exact algebra on one run's captured values.

The cache analyses (`gemmalens.cache.ActivationCache`) split a residual stream into what
wrote it and read it out through the unembedding. Gemma 3 adds branch outputs to one
stream, but the newer families do not:

* **Gemma 4** multiplies the whole stream by a learned ``layer_scalar`` at the end of every
  block, adds a per-layer-input term (E2B/E4B), and its MoE layers normalise the *sum* of
  the dense and routed branches.
* **Gemma 3n** keeps K AltUp streams. A block mixes them (prediction coefficients), runs the
  layer on one of them, spreads the layer's innovation to all (correction coefficients) and
  adds the per-layer input to streams 1..K-1; the model reads out the magnitude-matched mean
  of the streams (the model's ``collapse``).
* **T5Gemma 2**'s decoder attention reads its own tokens and the encoder's in one softmax.

Every step that is not linear is made linear by holding a quantity of this run fixed, the
way direct logit attribution holds the final norm's divisor: an RMS norm's divisor, AltUp's
router-made coefficients and its collapse's rescaling factors. With those frozen, every
block is a linear map of the stream, so a value written in block ``i`` arrives at the
read-out through the linear maps of the blocks after it (`Readout.transport`), and the
transported components sum exactly (up to float rounding) to the stream they decompose.
What the frozen quantities hide (removing a component would change them) is the usual
caveat of direct attribution.

`Readout` is that algebra for one stack of a model; `stacks` says which stacks a model
has. Everything here is float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
from penzai import pz

from gemmalens.layers.altup import AltUpCollapse, AltUpCorrect
from gemmalens.layers.attention import Attention
from gemmalens.layers.embeddings import TanhSoftCap, TiedUnembed
from gemmalens.layers.kv_sharing import SharedKVAttention
from gemmalens.layers.merged_attention import MergedDotProductAttention
from gemmalens.layers.moe import DenseAndExperts
from gemmalens.layers.norms import RMSNorm

if TYPE_CHECKING:
    from gemmalens.cache import ActivationCache

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Stack:
    """One stack of blocks of a model.

    Attributes:
      name: ``"decoder"`` for a decoder-only model; ``"encoder"`` or ``"decoder"`` for an
        encoder-decoder.
      prefix: what its hook names start with (``""``, ``"encoder."``, ``"decoder."``).
      num_layers: its block count.
      reads: the input stream it reads: ``"tokens"`` or ``"decoder_tokens"``.
      reaches_logits: whether its output is unembedded (the encoder's is not: the decoder
        reads it through cross-attention).
    """

    name: str
    prefix: str
    num_layers: int
    reads: str
    reaches_logits: bool


def stacks(config: Any) -> tuple[Stack, ...]:
    """The stacks of a model with this config, in the order they run."""
    if getattr(config, "family", None) == "t5gemma2":
        return (
            Stack("encoder", "encoder.", config.encoder.num_hidden_layers, "tokens", False),
            Stack("decoder", "decoder.", config.decoder.num_hidden_layers, "decoder_tokens", True),
        )
    return (Stack("decoder", "", config.num_hidden_layers, "tokens", True),)


def find_stack(config: Any, name: str | None) -> Stack:
    """The stack called ``name`` (None: the one whose output reaches the logits)."""
    options = stacks(config)
    if name is None:
        return next(s for s in options if s.reaches_logits)
    for stack in options:
        if stack.name == name:
            return stack
    raise ValueError(
        f"This model has no stack {name!r}; it has {[s.name for s in options]} "
        "(stack=None picks the one whose output reaches the logits)."
    )


def norm_gain(norm: RMSNorm) -> jnp.ndarray:
    """The per-channel multiplier an `RMSNorm` applies after dividing by the RMS."""
    if norm.form == "none":
        return jnp.ones((), F32)
    weight = norm.scale.value.unwrap(norm.axis).astype(F32)
    return 1.0 + weight if norm.form == "one_plus" else weight


def rms(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """``sqrt(mean(x**2) + eps)`` over the last axis, kept as a size-1 axis (float32)."""
    x = x.astype(F32)
    return jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _sequentials(tree: Any) -> list[pz.nn.Sequential]:
    """Every `pz.nn.Sequential` in ``tree``, nested ones included, outermost first."""
    found = []
    for seq in pz.select(tree).at_instances_of(pz.nn.Sequential).get_sequence():
        found.append(seq)
        for layer in seq.sublayers:
            found.extend(_sequentials(layer))
    return found


def _following(sequence: pz.nn.Sequential, kind: type | tuple[type, ...]):
    """``(layer, the RMSNorm right after it or None)`` for the first ``kind`` in the
    Sequentials of ``sequence``'s subtree."""
    for seq in _sequentials(sequence):
        layers = list(seq.sublayers)
        for j, layer in enumerate(layers):
            if isinstance(layer, kind):
                after = layers[j + 1] if j + 1 < len(layers) else None
                return layer, after if isinstance(after, RMSNorm) else None
    return None, None


class Readout:
    """The residual algebra of one stack, read from one run's captured values.

    Depth ``L`` (0..num_layers) is the stream after blocks ``0..L-1``: the embedding at 0.
    `resid` gives the stream the model would read out at depth ``L`` (its actual value, in
    d_model space), `components` splits it into labelled parts that sum to it.
    """

    def __init__(self, cache: ActivationCache, stack: Stack, root: pz.nn.Layer):
        self.cache = cache
        self.stack = stack
        self.root = root  # the stack's Penzai subtree (embed, blocks, final_norm, ...)
        self.p = stack.prefix
        self.blocks = {
            g.name: g
            for g in pz.select(root).at_instances_of(pz.nn.NamedGroup).get_sequence()
            if g.name.startswith(f"{self.p}blocks.")
        }

    # ----------------------------------------------------------------- model parts

    def block(self, i: int) -> pz.nn.NamedGroup:
        name = f"{self.p}blocks.{i}"
        if name not in self.blocks:
            raise ValueError(f"The model has no block named {name!r}.")
        return self.blocks[name]

    def attention(self, i: int) -> tuple[Any, RMSNorm | None]:
        """Block ``i``'s attention layer (any variant: own, shared or merged keys) and the
        norm right after it."""
        layer, norm = _following(self.block(i), (Attention, SharedKVAttention))
        if layer is None:
            raise ValueError(f"Block {self.p}blocks.{i} has no attention layer.")
        return layer, norm

    def is_merged(self, i: int) -> bool:
        attention, _ = self.attention(i)
        return isinstance(getattr(attention, "mixer", None), MergedDotProductAttention)

    def final_norm(self) -> RMSNorm:
        return pz.select(self.root.final_norm).at_instances_of(RMSNorm).get_sequence()[0]

    def unembed_matrix(self) -> jnp.ndarray:
        """``[vocab, d_model]``, the tied embedding table (unscaled)."""
        if not self.stack.reaches_logits:
            raise ValueError(
                f"The {self.stack.name}'s residual stream is not unembedded: the decoder reads "
                "it through cross-attention, so logits read off it are not logits the model "
                "computes. Use stack='decoder' (the default)."
            )
        (unembed,) = pz.select(self.root.unembed).at_instances_of(TiedUnembed).get_sequence()
        return unembed.table.value.unwrap("vocab", "embedding")

    def softcap(self) -> float | None:
        if not self.stack.reaches_logits:
            return None
        caps = pz.select(self.root.unembed).at_instances_of(TanhSoftCap).get_sequence()
        return caps[0].cap if caps else None

    # ----------------------------------------------------------------- captured values

    def need(self, *names: str, purpose: str) -> jnp.ndarray:
        return self.cache._need(*[self.p + n for n in names], purpose=purpose)

    def has(self, name: str) -> bool:
        return self.p + name in self.cache

    # ----------------------------------------------------------------- the algebra

    @property
    def embed_label(self) -> str:
        return f"{self.p}hook_embed"

    def embedding(self) -> jnp.ndarray:
        return self.need("hook_embed", "blocks.0.hook_resid_pre", purpose="The embedding")

    def resid(self, depth: int) -> jnp.ndarray:
        """The stream after ``depth`` blocks, ``[batch, pos, d_model]`` (float32)."""
        if depth == 0:
            return self.embedding().astype(F32)
        i = depth - 1
        return self.need(
            f"blocks.{i}.hook_resid_post",
            f"blocks.{i + 1}.hook_resid_pre",
            purpose=f"The residual stream after block {i}",
        ).astype(F32)

    def resid_label(self, depth: int) -> str:
        return self.embed_label if depth == 0 else f"{self.p}blocks.{depth - 1}.hook_resid_post"

    def transport(self, i: int, values: jnp.ndarray, depth: int, kind: str) -> jnp.ndarray:
        """``values`` (``[..., batch, pos, d_model]``) written by block ``i`` (``kind``:
        ``attn``, ``mlp`` or ``extra``; ``i = -1`` for the embedding) as they arrive in the
        stream at ``depth``. Additive streams: unchanged."""
        return values.astype(F32)

    def block_writes(self, i: int, mode: str, detail: bool) -> list[tuple[str, str, jnp.ndarray]]:
        """``(label, kind, value)`` for what block ``i`` adds to its stream (before
        transport): its attention and MLP outputs (after their post-norms), split into
        parts with ``detail``."""
        writes = []
        if mode in ("all", "attn"):
            if detail and self.is_merged(i):
                for part, value in self.attention_parts(i).items():
                    writes.append((f"{self.p}blocks.{i}.hook_attn_out[{part}]", "attn", value))
            else:
                name = f"blocks.{i}.hook_attn_out"
                writes.append((self.p + name, "attn", self.need(name, purpose="decompose_resid")))
        if mode in ("all", "mlp"):
            writes.extend(self.mlp_writes(i, detail))
        return writes

    def mlp_writes(self, i: int, detail: bool) -> list[tuple[str, str, jnp.ndarray]]:
        name = f"blocks.{i}.hook_mlp_out"
        return [(self.p + name, "mlp", self.need(name, purpose="decompose_resid"))]

    def components(
        self, depth: int, mode: str = "all", incl_embeds: bool = True, detail: bool = True
    ) -> tuple[list[jnp.ndarray], list[str]]:
        """The parts of `resid` (``depth``) in forward order, transported to ``depth``."""
        values, labels = [], []
        if incl_embeds:
            values.append(self.transport(-1, self.initial_state(), depth, "embed"))
            labels.append(self.initial_label)
        for i in range(depth):
            for label, kind, value in self.block_writes(i, mode, detail):
                values.append(self.transport(i, value, depth, kind))
                labels.append(label)
        return values, labels

    @property
    def initial_label(self) -> str:
        return self.embed_label

    def initial_state(self) -> jnp.ndarray:
        return self.embedding()

    # ----------------------------------------------------------------- heads

    def head_results(self, i: int, fold_post_norm: bool, part: str | None = None) -> jnp.ndarray:
        """``[batch, pos, head, d_model]``: what each head of block ``i`` writes (see
        `gemmalens.cache.ActivationCache.head_results`). ``part`` (merged attention only):
        ``"self"`` or ``"cross"``, the heads' outputs from that part of the softmax."""
        attention, post_norm = self.attention(i)
        w_o = attention.output.weights.value.unwrap("heads", "head_dim", "embedding")
        z = self.need(f"blocks.{i}.attn.hook_z", purpose="head_results")
        if part is None:
            z_part = z
        elif not self.is_merged(i):
            raise ValueError(
                f"part={part!r} splits merged self+cross attention (T5Gemma 2's decoder); "
                f"block {self.p}blocks.{i} has plain attention: use part=None."
            )
        else:
            z_part = self.attention_z_parts(i)[part]
        raw = jnp.einsum("bphd,hdm->bphm", z_part.astype(F32), w_o.astype(F32))
        if not fold_post_norm or post_norm is None:
            return raw
        # The model normalises o_proj(z) in its own dtype; recompute that divisor.
        total = jnp.einsum("bphd,hdm->bpm", z, w_o)
        divisor = rms(total, post_norm.eps)
        return raw / divisor[:, :, None, :] * norm_gain(post_norm)

    def attention_z_parts(self, i: int) -> dict[str, jnp.ndarray]:
        """``hook_z`` of a merged-attention block split into its self and cross parts
        (``[batch, pos, head, d_head]`` each), from the two pattern parts and values."""
        names = ("self_pattern", "v", "cross_pattern", "cross_v")
        self_p, v, cross_p, cross_v = (
            self.need(f"blocks.{i}.attn.hook_{n}", purpose="The self/cross split of attention")
            for n in names
        )
        heads, kv_heads = self_p.shape[1], v.shape[2]
        group = heads // kv_heads

        def mix(pattern, values):  # [b, h, q, k] x [b, k, g, d] -> [b, q, h, d]
            expanded = jnp.repeat(values.astype(F32), group, axis=2)
            return jnp.einsum("bhqk,bkhd->bqhd", pattern.astype(F32), expanded)

        return {"self": mix(self_p, v), "cross": mix(cross_p, cross_v)}

    def attention_parts(self, i: int) -> dict[str, jnp.ndarray]:
        """``hook_attn_out`` of a merged-attention block split into self and cross parts
        (post-norm divisor frozen), ``[batch, pos, d_model]`` each."""
        return {
            part: self.head_results(i, fold_post_norm=True, part=part).sum(axis=2)
            for part in ("self", "cross")
        }


class ScaledReadout(Readout):
    """Gemma 4: per-layer-input term and ``layer_scalar`` at the end of every block, and
    MoE layers whose post-norm normalises the sum of the dense and routed branches."""

    @functools.cached_property
    def scalars(self) -> list[jnp.ndarray]:
        """Each block's ``layer_scalar`` (1 where a block has none)."""
        from gemmalens.families.gemma4 import LayerScalar

        result = []
        for i in range(self.stack.num_layers):
            found = pz.select(self.block(i)).at_instances_of(LayerScalar).get_sequence()
            result.append(found[0].scalar.value.unwrap().astype(F32) if found else 1.0)
        return result

    def transport(self, i: int, values: jnp.ndarray, depth: int, kind: str) -> jnp.ndarray:
        factor = jnp.ones((), F32)
        for k in range(max(i, 0), depth):
            factor = factor * self.scalars[k]
        return values.astype(F32) * factor

    def mlp_writes(self, i: int, detail: bool) -> list[tuple[str, str, jnp.ndarray]]:
        moe, post_norm = _following(self.block(i), DenseAndExperts)
        if not detail or moe is None:
            return super().mlp_writes(i, detail)
        dense = self.need(f"blocks.{i}.hook_dense_mlp_out", purpose="The MoE split")
        routed = self.need(f"blocks.{i}.moe.hook_out", purpose="The MoE split")
        # post_norm(dense + routed) with this run's divisor held fixed.
        divisor = rms(dense + routed, post_norm.eps)
        gain = norm_gain(post_norm)
        return [
            (f"{self.p}blocks.{i}.hook_dense_mlp_out", "mlp", dense / divisor * gain),
            (f"{self.p}blocks.{i}.moe.hook_out", "mlp", routed / divisor * gain),
        ]

    def block_writes(self, i: int, mode: str, detail: bool) -> list[tuple[str, str, jnp.ndarray]]:
        writes = super().block_writes(i, mode, detail)
        # The per-layer input (E2B/E4B) belongs to neither the attention nor the MLP.
        if mode == "all" and self.root.per_layer_inputs is not None:
            name = f"blocks.{i}.hook_per_layer_out"
            writes.append((self.p + name, "extra", self.need(name, purpose="decompose_resid")))
        return writes


class AltUpReadout(Readout):
    """Gemma 3n: K AltUp streams, read out through the model's collapse.

    With this run's prediction coefficients ``C`` (``altup.hook_prediction_coefs``) and
    correction coefficients ``c`` (``altup.hook_correction_coefs``) fixed, a block maps
    the streams ``S`` linearly::

        P = (I + C) S                       prediction; the layer reads x = P[a]
        y = (x + attn + laurel) / sqrt(2) + mlp                     (hook_resid_post)
        S' = P + c (y - P[a]) + [0, g, .., g]     correction, then the per-layer input g

    so an old part ``V`` of the streams becomes ``(I + C) V`` plus ``c (1/sqrt(2) - 1)``
    times its prediction's active row, and the block adds ``c attn / sqrt(2)``,
    ``c laurel / sqrt(2)``, ``c mlp`` and ``[0, g, .., g]``. The read-out is the collapse
    (stream 0 and the back-projected streams 1..K-1, each rescaled to stream 0's RMS, then
    averaged) with this run's rescaling factors fixed. Parts are carried as
    ``[..., batch, pos, stream, d_model]`` and collapsed at the end.
    """

    def __init__(self, cache: ActivationCache, stack: Stack, root: pz.nn.Layer):
        super().__init__(cache, stack, root)
        self._factors: dict[int, list[jnp.ndarray]] = {}  # the collapse's, per depth

    def collapse_layer(self) -> AltUpCollapse:
        return self.root.collapse

    @property
    def active_index(self) -> int:
        return pz.select(self.root).at_instances_of(AltUpCorrect).get_sequence()[0].active_index

    def streams(self, depth: int) -> jnp.ndarray:
        """All K streams after ``depth`` blocks, ``[batch, pos, stream, d_model]``."""
        if depth == 0:
            return self.need("hook_altup_expanded", purpose="The AltUp read-out").astype(F32)
        return self.need(
            f"blocks.{depth - 1}.hook_streams_post",
            purpose=f"The AltUp streams after block {depth - 1}",
        ).astype(F32)

    def _collapse_factors(self, streams: jnp.ndarray) -> list[jnp.ndarray]:
        """The collapse's per-token factor for each stream (1 for stream 0), ``[b, p, 1]``."""
        collapse = self.collapse_layer()
        first = streams[..., 0, :]
        target = jnp.sqrt(jnp.mean(first * first, axis=-1, keepdims=True))
        factors = [jnp.ones_like(target)]
        for j, proj in enumerate(collapse.projections):
            back = self._project(proj, streams[..., j + 1, :])
            mean_square = jnp.maximum(jnp.mean(back * back, axis=-1, keepdims=True), 1e-5)
            factors.append(target / jnp.sqrt(mean_square))
        return factors

    @staticmethod
    def _project(linear: pz.nn.Linear, x: jnp.ndarray) -> jnp.ndarray:
        weights = linear.weights.value.unwrap("projected", "embedding").astype(F32)
        return jnp.einsum("...m,nm->...n", x.astype(F32), weights)

    def collapse(self, parts: jnp.ndarray, depth: int) -> jnp.ndarray:
        """Stream-space ``parts`` ``[..., b, p, K, d]`` through the collapse with the
        factors of the actual streams at ``depth`` frozen."""
        if depth not in self._factors:
            self._factors[depth] = self._collapse_factors(self.streams(depth))
        factors = self._factors[depth]
        collapse = self.collapse_layer()
        out = parts[..., 0, :] * factors[0]
        for j, proj in enumerate(collapse.projections):
            out = out + self._project(proj, parts[..., j + 1, :]) * factors[j + 1]
        return out / len(factors)

    def resid(self, depth: int) -> jnp.ndarray:
        if depth == self.stack.num_layers and self.has("hook_altup_collapsed"):
            return self.need("hook_altup_collapsed", purpose="The AltUp read-out").astype(F32)
        streams = self.streams(depth)
        return self.collapse(streams, depth)

    def resid_label(self, depth: int) -> str:
        if depth == 0:
            return f"{self.p}hook_altup_expanded"
        return f"{self.p}blocks.{depth - 1}.hook_streams_post"

    def _block_map(self, i: int) -> Callable[[jnp.ndarray], jnp.ndarray]:
        """The frozen linear map of block ``i`` on stream-space parts ``[..., b, p, K, d]``."""
        coefs = self.need(f"blocks.{i}.altup.hook_prediction_coefs", purpose="AltUp").astype(F32)
        correction = self.need(f"blocks.{i}.altup.hook_correction_coefs", purpose="AltUp")
        correction = correction.astype(F32)
        a = self.active_index
        beta = 1.0 / math.sqrt(2.0) - 1.0

        def apply(parts):
            predicted = parts + jnp.einsum("bprc,...bpcd->...bprd", coefs, parts)
            active = predicted[..., a : a + 1, :]  # [..., b, p, 1, d]
            return predicted + correction[..., None] * (beta * active)

        return apply

    def _spread(self, i: int, value: jnp.ndarray, kind: str) -> jnp.ndarray:
        """A write of block ``i``'s layer as its part of the streams after block ``i``."""
        if kind == "extra":  # the per-layer input goes to streams 1..K-1
            k = self.need(f"blocks.{i}.altup.hook_correction_coefs", purpose="AltUp").shape[-1]
            mask = jnp.asarray([0.0] + [1.0] * (k - 1), F32)[:, None]
            return value.astype(F32)[..., None, :] * mask
        correction = self.need(f"blocks.{i}.altup.hook_correction_coefs", purpose="AltUp")
        weight = 1.0 if kind == "mlp" else 1.0 / math.sqrt(2.0)
        return correction.astype(F32)[..., None] * (weight * value.astype(F32))[..., None, :]

    def to_streams(self, i: int, values: jnp.ndarray, depth: int, kind: str) -> jnp.ndarray:
        parts = values.astype(F32) if i < 0 else self._spread(i, values, kind)
        for k in range(i + 1, depth):
            parts = self._block_map(k)(parts)
        return parts

    def transport(self, i: int, values: jnp.ndarray, depth: int, kind: str) -> jnp.ndarray:
        return self.collapse(self.to_streams(i, values, depth, kind), depth)

    @property
    def initial_label(self) -> str:
        return f"{self.p}hook_altup_expanded"

    def initial_state(self) -> jnp.ndarray:
        return self.streams(0)

    # What a block writes, in forward order: (hook, kind, the modes that include it).
    # LAuReL and the per-layer input belong to neither "attn" nor "mlp".
    WRITES = (
        ("hook_attn_out", "attn", ("all", "attn")),
        ("laurel.hook_out", "laurel", ("all",)),
        ("hook_mlp_out", "mlp", ("all", "mlp")),
        ("hook_per_layer_out", "extra", ("all",)),
    )

    def block_writes(self, i: int, mode: str, detail: bool) -> list[tuple[str, str, jnp.ndarray]]:
        writes = []
        for hook, kind, modes in self.WRITES:
            if mode in modes:
                name = f"blocks.{i}.{hook}"
                writes.append((self.p + name, kind, self.need(name, purpose="decompose_resid")))
        return writes


def _stack_root(model: Any, stack: Stack) -> pz.nn.Layer:
    """The Penzai subtree of ``stack`` (the whole model for a decoder-only one)."""
    return getattr(model.model, stack.name) if stack.prefix else model.model


def _readout_class(config: Any) -> type[Readout]:
    """The `Readout` class of a config's family, as the family registry names it."""
    from gemmalens.families import registry

    kinds = {"Readout": Readout, "ScaledReadout": ScaledReadout, "AltUpReadout": AltUpReadout}
    return kinds[registry.family(config).residual]


def lens_hook_names(model: Any, stack: str | None = None) -> list[str]:
    """The hook names (glob patterns) the logit lens and `accumulated_resid` read on the
    `gemmalens.Model` ``model``: the residual stream after the embedding and after every
    block, or, for Gemma 3n, every AltUp stream there."""
    p = find_stack(model.config, stack).prefix
    if issubclass(_readout_class(model.config), AltUpReadout):
        return [f"{p}hook_altup_expanded", f"{p}blocks.*.hook_streams_post"]
    return [f"{p}hook_embed", f"{p}blocks.*.hook_resid_post"]


def readout(cache: ActivationCache, stack: str | None = None) -> Readout:
    """The residual algebra of ``stack`` (None: the stack that reaches the logits)."""
    model = cache._need_model("This analysis")
    chosen = find_stack(model.config, stack)
    return _readout_class(model.config)(cache, chosen, _stack_root(model, chosen))
