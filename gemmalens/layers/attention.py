"""Grouped-query attention with named steps, masks from token positions, and a fused path.

Tensors inside attention carry the named axes ``batch``, ``seq`` (queries), ``kv_seq``
(keys), ``heads`` (query heads), ``kv_heads`` and ``head_dim``. Padding is expressed by
position -1: a key with a negative position is never attended to.

Image blocks (Gemma 3): the side input ``image_blocks`` (`IMAGE_BLOCKS`, named axes
``batch``, ``seq``) numbers each run of image tokens (-1 on text); a mask built with
``image_blocks=True`` lets the tokens of one run see each other both ways.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from penzai import pz

from gemmalens.layers import direct
from gemmalens.layers.hooks import HookPoint

QKV_AXES = ("batch", "seq", "heads", "head_dim")
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")
PATTERN_AXES = ("batch", "heads", "seq", "kv_seq")
# The side input that numbers the image-token runs of each row (-1 on text tokens).
IMAGE_BLOCKS = "image_blocks"


@pz.pytree_dataclass
class AttentionMask(pz.nn.Layer):
    """Which keys each query may see, decided from absolute token positions.

    A key at position ``k`` is visible from a query at ``q`` when ``k >= 0`` (not padding)
    and:

    * ``causal``: ``k <= q``;
    * ``window_before``: ``q - k < window_before`` (a causal sliding window of W keys,
      the query itself included, is ``causal=True, window_before=W``);
    * ``window_after``: ``k - q < window_after`` (for bidirectional sliding windows).

    With ``image_blocks`` (Gemma 3 with images) and the side input ``image_blocks`` given, a
    causal mask also shows a query the later keys of its own image block: ``k <= q`` becomes
    ``k <= q or same block``, the window still applying (transformers' ``(causal OR block)
    AND window``). Without the side input (text only, decoding steps) the mask is causal.

    Masked scores are replaced by the dtype's most negative finite value, so a row with no
    visible key becomes a uniform distribution rather than NaN, as in transformers.
    """

    causal: bool = dataclasses.field(metadata={"pytree_node": False})
    window_before: int | None = dataclasses.field(default=None, metadata={"pytree_node": False})
    window_after: int | None = dataclasses.field(default=None, metadata={"pytree_node": False})
    image_blocks: bool = dataclasses.field(default=False, metadata={"pytree_node": False})

    @classmethod
    def for_layer(
        cls, is_global: bool, window: int, bidirectional_reach: int | None = None
    ) -> AttentionMask:
        """The mask of a decoder layer: causal, over a sliding ``window`` unless global.

        With ``bidirectional_reach`` (embedding models) attention sees both ways: global
        layers everywhere, sliding layers ``|q - k| < bidirectional_reach``.
        """
        if bidirectional_reach is not None:
            if is_global:
                return cls(causal=False)
            return cls(
                causal=False, window_before=bidirectional_reach, window_after=bidirectional_reach
            )
        return cls(causal=True) if is_global else cls(causal=True, window_before=window)

    def visible(self, **side_inputs: Any) -> pz.nx.NamedArray:
        """Boolean mask with named axes ``batch``, ``seq``, ``kv_seq``."""
        q = side_inputs["token_positions"]
        k = direct.renamed(side_inputs.get("kv_positions", q), "seq", "kv_seq")
        blocks = ()
        if self.causal and self.reads_image_blocks(side_inputs):
            image_blocks = side_inputs[IMAGE_BLOCKS]
            blocks = (image_blocks, direct.renamed(image_blocks, "seq", "kv_seq"))
        causal, before, after = self.causal, self.window_before, self.window_after

        def rule(k, q, *blocks):
            # Every (query, key) pair starts visible; padding keys (position < 0) never are.
            allowed = jnp.logical_and(k >= 0, jnp.ones_like(q).astype(bool))
            if causal:
                earlier = k <= q
                if blocks:  # a query sees every key of its own image
                    query_block, key_block = blocks
                    earlier = earlier | ((query_block == key_block) & (query_block >= 0))
                allowed = allowed & earlier
            if before is not None:
                allowed = allowed & (q - k < before)
            if after is not None:
                allowed = allowed & (k - q < after)
            return allowed

        return direct.elementwise(rule, k, q, *blocks)

    def reads_image_blocks(self, side_inputs: dict[str, Any]) -> bool:
        """Whether this call's mask has image blocks: the mask takes them, the side input
        is there, and queries and keys are the same tokens (no KV cache)."""
        return (
            self.image_blocks
            and side_inputs.get(IMAGE_BLOCKS) is not None
            and "kv_positions" not in side_inputs
        )

    def __call__(self, scores: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        masked_value = jnp.finfo(scores.dtype).min
        return direct.elementwise(
            lambda visible, s: jnp.where(visible, s, masked_value),
            self.visible(**side_inputs),
            scores,
        )

    def band(self, length: int) -> tuple[int, int] | None:
        """The window as ``(keys before, keys after)`` the query, for kernels that take a
        band (``jax.nn.dot_product_attention``'s ``local_window_size``); None if global."""
        if self.window_before is None and self.window_after is None:
            return None
        before = length if self.window_before is None else self.window_before - 1
        after = length if self.window_after is None else self.window_after - 1
        return (before, 0 if self.causal else after)

    def describe(self) -> str:
        kind = "causal" if self.causal else "bidirectional"
        if self.image_blocks:
            kind += ", bidirectional within image blocks"
        if self.window_before is None and self.window_after is None:
            return f"global {kind}"
        return f"sliding {kind} (before < {self.window_before}, after < {self.window_after})"


@pz.pytree_dataclass
class DotProductAttention(pz.nn.Layer):
    """``softmax(mask(softcap(q k^T * scale))) v`` for grouped-query attention.

    Input ``(q, k, v)``: q has axes ``QKV_AXES``, k and v ``KV_AXES``; output has
    ``QKV_AXES``. Query head ``h`` reads kv head ``h // (heads / kv_heads)``.

    The weights are materialised (and pass through ``hook_attn_scores`` and
    ``hook_pattern``) only when ``implementation == "explicit"`` or when one of those two
    hook points has been replaced by a capture or intervention. Otherwise a fused kernel
    (`jax.nn.dot_product_attention`) runs and the hook system costs nothing.

    Attributes:
      scale: multiplies the scores (Gemma 3: ``query_pre_attn_scalar ** -0.5``).
      softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before masking.
      mask: the `AttentionMask` of this layer (global or sliding window).
      implementation: ``"auto"``, ``"explicit"`` or ``"fused"``.
    """

    scale: float = dataclasses.field(metadata={"pytree_node": False})
    softcap: float | None = dataclasses.field(metadata={"pytree_node": False})
    mask: AttentionMask
    hook_attn_scores: HookPoint
    hook_pattern: HookPoint
    implementation: Literal["auto", "explicit", "fused"] = dataclasses.field(
        default="auto", metadata={"pytree_node": False}
    )

    def uses_explicit_weights(self) -> bool:
        if self.implementation != "auto":
            return self.implementation == "explicit"
        hooked = (
            type(self.hook_attn_scores) is not HookPoint or type(self.hook_pattern) is not HookPoint
        )
        return hooked or self.softcap is not None

    def __call__(self, qkv, **side_inputs: Any) -> pz.nx.NamedArray:
        q, k, v = qkv
        if self.uses_explicit_weights():
            return self._explicit(q, k, v, **side_inputs)
        return self._fused(q, k, v, **side_inputs)

    def _explicit(self, q, k, v, **side_inputs):
        groups = q.named_shape["heads"] // k.named_shape["kv_heads"]

        def repeat_heads(x):  # [.., seq, kv_heads, ..] -> [.., kv_seq, heads, ..]
            x = direct.along(lambda a: jnp.repeat(a, groups, axis=-1), x, "kv_heads", "heads")
            return direct.renamed(x, "seq", "kv_seq")

        k, v = repeat_heads(k), repeat_heads(v)
        scores = direct.contract(q, k, "head_dim")
        scores = direct.multiply(scores, jnp.asarray(self.scale, scores.dtype))
        if self.softcap is not None:
            cap = jnp.asarray(self.softcap, scores.dtype)
            scores = direct.elementwise(lambda s: jnp.tanh(s / cap) * cap, scores)
        scores = self.mask(scores, **side_inputs)
        scores = self.hook_attn_scores(scores, **side_inputs)
        pattern = direct.along(
            lambda s: jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(q.dtype),
            scores,
            "kv_seq",
        )
        pattern = self.hook_pattern(pattern, **side_inputs)
        return direct.contract(pattern, v, "kv_seq")

    def _fused(self, q, k, v, **side_inputs):
        arrays = dict(
            query=q.unwrap(*QKV_AXES),
            key=k.unwrap(*KV_AXES),
            value=v.unwrap(*KV_AXES),
            scale=self.scale,
        )
        band_only = not self.mask.reads_image_blocks(side_inputs)
        if (
            band_only
            and side_inputs.get("positions_are_arange")
            and "kv_positions" not in side_inputs
        ):
            # No padding, no cache and no image blocks: the mask is a band, which flash
            # kernels build themselves instead of reading a [seq, seq] mask from memory.
            band = self.mask.band(q.named_shape["seq"])
            out = None
            if _cudnn_can_run(arrays["query"], self.mask.causal, band):
                try:
                    out = jax.nn.dot_product_attention(
                        **arrays,
                        is_causal=self.mask.causal,
                        local_window_size=band,
                        implementation="cudnn",
                    )
                except (ValueError, NotImplementedError, RuntimeError):
                    out = None  # an older cuDNN or an unsupported shape: XLA below
            if out is None:
                out = jax.nn.dot_product_attention(
                    **arrays, is_causal=self.mask.causal, local_window_size=band
                )
        else:
            visible = self.mask.visible(**side_inputs).unwrap("batch", "seq", "kv_seq")
            out = jax.nn.dot_product_attention(**arrays, mask=visible[:, None, :, :])
        return pz.nx.wrap(out).tag(*QKV_AXES)


def attention_mixer(
    prefix: str, mask: AttentionMask, scale: float, softcap: float | None = None
) -> DotProductAttention:
    """The mixing step of the attention layer whose hook names start with ``prefix``
    (e.g. ``blocks.3.attn.``), with its score and pattern hook points."""
    return DotProductAttention(
        scale=scale,
        softcap=softcap,
        mask=mask,
        hook_attn_scores=HookPoint(prefix + "hook_attn_scores", PATTERN_AXES),
        hook_pattern=HookPoint(prefix + "hook_pattern", PATTERN_AXES),
    )


def _cudnn_can_run(query: jax.Array, causal: bool, band: tuple[int, int] | None) -> bool:
    """Whether cuDNN's flash attention applies: a GPU, 16-bit activations, head dim <= 256,
    and a window only on the left of causal attention."""
    return (
        jax.default_backend() == "gpu"
        and query.dtype in (jnp.bfloat16, jnp.float16)
        and query.shape[-1] <= 256
        and query.shape[-1] % 8 == 0
        and (band is None or causal)
    )


@pz.pytree_dataclass
class Attention(pz.nn.Layer):
    """Multi-head attention read as four paths: query, key, value, then mix and project.

    ``query``, ``key`` and ``value`` are `pz.nn.Sequential` stacks (projection, optional
    QK-norm, RoPE, hook point), so a family can add or drop a step by editing the list.
    ``output`` is a `pz.nn.Linear` in Gemma, a `pz.nn.Affine` (with bias) in SigLIP.
    """

    query: pz.nn.Sequential
    key: pz.nn.Sequential
    value: pz.nn.Sequential
    mixer: DotProductAttention
    hook_z: HookPoint
    output: pz.nn.Layer

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        q = self.query(x, **side_inputs)
        k = self.key(x, **side_inputs)
        v = self.value(x, **side_inputs)
        z = self.mixer((q, k, v), **side_inputs)
        z = self.hook_z(z, **side_inputs)
        return self.output(z, **side_inputs)
