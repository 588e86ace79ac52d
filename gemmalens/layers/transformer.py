"""The pieces every Gemma decoder shares: the residual block layout and the outer model."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from penzai import pz

from gemmalens.layers.direct import Residual
from gemmalens.layers.embeddings import TanhSoftCap, TiedUnembed
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.norms import RMSNorm
from gemmalens.layers.params import ParamBuilder

RESID_AXES = ("batch", "seq", "embedding")
# The side input that carries every block's per-layer input (Gemma 3n, Gemma 4 E2B/E4B).
PER_LAYER_INPUTS = "per_layer_inputs"
# The side input that restricts the final norm and the unembedding to the positions
# ``start..stop-1`` (a static ``(start, stop)``): a patching sweep whose metric reads one
# position would otherwise hold ``[sites, batch, seq, vocab]`` logits.
LOGIT_WINDOW = "logit_window"


def positions_from_mask(attention_mask: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """Token positions that skip padding: 0, 1, 2, ... over kept tokens, -1 on padding.

    ``attention_mask`` has named axes ``batch`` and ``seq`` (1 = keep). Counting only kept
    tokens makes a left-padded sequence see the same positions as when run alone.
    """

    def count(mask):
        mask = mask.astype(jnp.int32)
        return jnp.where(mask > 0, jnp.cumsum(mask) - 1, -1)

    return pz.nx.nmap(count)(attention_mask.untag("seq")).tag("seq")


def with_positions(tokens: pz.nx.NamedArray, side_inputs: dict[str, Any]) -> dict[str, Any]:
    """Side inputs with ``token_positions`` filled in from ``attention_mask`` if missing.

    Without a mask every token is real: positions are ``0..seq-1`` in every row and
    ``positions_are_arange`` tells attention it may use banded kernels.
    """
    if "token_positions" in side_inputs:
        return side_inputs
    mask = side_inputs.get("attention_mask")
    extra = {}
    if mask is None:
        mask = pz.nx.ones(tokens.named_shape, dtype=jnp.int32)
        extra["positions_are_arange"] = True
    return {**side_inputs, **extra, "token_positions": positions_from_mask(mask)}


def residual_block(
    block: ParamBuilder, attention_branch: list[pz.nn.Layer], mlp_branch: list[pz.nn.Layer]
) -> pz.nn.NamedGroup:
    """``x + attn(x)`` then ``+ mlp(.)``, with the TransformerLens residual hook points.

    ``block`` is the block's parameter scope (``blocks.3``), which also names the group and
    its hooks. Each branch is the list of layers inside the residual connection (norms
    included); the branch outputs pass through ``hook_attn_out`` / ``hook_mlp_out`` before
    the add.
    """
    return pz.nn.NamedGroup(
        name=block.prefix.rstrip("."),
        sublayers=[
            block.hook("hook_resid_pre", RESID_AXES),
            Residual(
                pz.nn.Sequential([*attention_branch, block.hook("hook_attn_out", RESID_AXES)])
            ),
            block.hook("hook_resid_mid", RESID_AXES),
            Residual(pz.nn.Sequential([*mlp_branch, block.hook("hook_mlp_out", RESID_AXES)])),
            block.hook("hook_resid_post", RESID_AXES),
        ],
    )


@pz.pytree_dataclass(kw_only=True)
class DecoderLM(pz.nn.Layer):
    """A decoder-only language model, the outer layer of every Gemma decoder::

        embed -> [per_layer_inputs] -> [expand] -> blocks -> [collapse] -> final_norm -> unembed

    The bracketed parts are what some families add: ``per_layer_inputs`` (Gemma 3n, Gemma 4
    E2B/E4B) computes every block's per-layer input from the tokens and the embedding and
    hands it to the blocks as the side input ``per_layer_inputs``; ``expand`` and
    ``collapse`` (Gemma 3n's AltUp) turn the embedding into several residual streams and
    the streams back into one before the final norm. None where a family has no such part.

    Called with token ids (named axes ``batch``, ``seq``); returns logits (``batch``,
    ``seq``, ``vocab``). Side inputs: ``attention_mask`` (``batch``, ``seq``; 1 = keep)
    and/or ``token_positions``; positions are derived from the mask when not given. Without
    either, positions are ``0..seq-1`` in every row and attention may use banded kernels.
    ``logit_window`` (a static ``(start, stop)``) computes the final norm and the
    unembedding at positions ``start..stop-1`` only: the logits then have ``stop - start``
    positions.
    """

    embed: pz.nn.Sequential
    per_layer_inputs: pz.nn.Layer | None = None
    expand: pz.nn.Layer | None = None
    blocks: pz.nn.Layer
    collapse: pz.nn.Layer | None = None
    final_norm: pz.nn.Sequential
    unembed: pz.nn.Sequential

    def __call__(self, tokens: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        side_inputs = with_positions(tokens, side_inputs)
        h = self.embed(tokens, **side_inputs)
        if self.per_layer_inputs is not None:
            per_layer = self.per_layer_inputs((tokens, h), **side_inputs)
            side_inputs = {**side_inputs, PER_LAYER_INPUTS: per_layer}
        if self.expand is not None:
            h = self.expand(h, **side_inputs)
        h = self.blocks(h, **side_inputs)
        if self.collapse is not None:
            h = self.collapse(h, **side_inputs)
        window = side_inputs.get(LOGIT_WINDOW)
        if window is not None:
            h = h[{"seq": pz.slice[window[0] : window[1]]}]
        h = self.final_norm(h, **side_inputs)
        return self.unembed(h, **side_inputs)


def _acts_on_each_position(layer: Any) -> bool:
    if isinstance(layer, (pz.nn.Sequential, pz.nn.NamedGroup)):
        return all(_acts_on_each_position(sub) for sub in layer.sublayers)
    return isinstance(layer, (HookPoint, RMSNorm, TiedUnembed, TanhSoftCap))


def unembeds_per_token(model: Any) -> bool:
    """Whether the final norm and the unembedding of ``model`` (a `DecoderLM`, or an
    encoder-decoder's ``decoder``) act on each position alone and hold only bare hook
    points (nothing installed, nothing captured there): then ``logit_window`` computes
    some positions' logits without changing them or any hook's view."""
    decoder = getattr(model, "decoder", model)
    if not isinstance(decoder, DecoderLM):
        return False
    parts = (decoder.final_norm, decoder.unembed)
    hooks = [
        hp for part in parts for hp in pz.select(part).at_instances_of(HookPoint).get_sequence()
    ]
    return all(type(hp) is HookPoint for hp in hooks) and all(map(_acts_on_each_position, parts))
