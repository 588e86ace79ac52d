"""Gemma 4's image encoder: the vision tower and ``embed_vision``.

The forward pass, with the hook point that names each value::

    pixel_values [image, seq, patch_pixel]   patchified, in [0, 1]; padding patches zero
    image_position_ids [image, seq, xy]      (x, y) = (column, row); padding (-1, -1)
      -> 2 (p - 0.5) @ input_proj                                 vision.hook_patch_embed
      +  position_table[0][x] + position_table[1][y] (0 on padding) vision.hook_pos_embed
      -> blocks: RMSNorm -> attention -> RMSNorm, RMSNorm -> gated MLP -> RMSNorm, each
         inside a residual; attention both ways over the image's patches (padding keys
         masked), QK-norm, value norm, scale 1, 2-D RoPE (theta 100: the first half of
         each head turns by x, the second by y)                   vision.blocks.{i}.*
      -> mean over each k x k cell of the patch grid, * sqrt(width), in float32
                                                                  vision.hook_pooled
      -> (h - std_bias) * std_scale  (standardize: 26B, 31B)      vision.hook_standardized
      -> RMSNorm without a weight (``embed_vision``)              vision.hook_soft_emb_norm
      -> @ embedding_projection (to the text width)               vision.hook_projected
    soft tokens [image, image_token, embedding]

``k`` is ``pooling_kernel_size`` (3); an image of ``n`` real patches gives ``n / k**2`` soft
tokens, pooled cells that no patch falls in are dropped (`soft_token_mask`), and the image
processor (`gemmalens.vision.preprocess_gemma4`) pads every image to the same
``max_patches = max_soft_tokens * k**2``. With ``use_clipped_linears`` (E2B, E4B) every
projection in the blocks clamps its input and its output to four scalars stored in the
checkpoint (`ClippedLinear`).

Named axes: ``batch`` (one per image), ``seq`` (patches, row-major over each image's grid,
then padding), ``patch_pixel`` (the ``3 * patch_size**2`` values of a patch, ordered row,
column, channel), ``xy``; ``embedding`` (the vision width inside the tower, the text width
after the projection); ``heads``, ``kv_heads``, ``head_dim``; ``neurons``; ``image_token``.
Each block's hook points have the text tower's names and axes
(``vision.blocks.0.attn.hook_pattern`` is ``[image, heads, seq, kv_seq]``).

Parameter labels follow the text tower's conventions under ``vision.``; `hf_name` turns
them into transformers' tensor names (``model.vision_tower.*``, ``model.embed_vision.*``).
How the soft tokens enter the text stream is `gemmalens.vision.merge`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.families.hf_config import expect_model_type
from gemmalens.layers.attention import AttentionMask
from gemmalens.layers.builders import AttentionSpec, build_attention
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.mlp import GatedMLP
from gemmalens.layers.norms import RMSNorm
from gemmalens.layers.params import CountsParameters, ParamBuilder, ParamSource
from gemmalens.layers.rope import GRID_POSITIONS, AxialRopeConfig
from gemmalens.layers.transformer import RESID_AXES, residual_block
from gemmalens.vision.siglip import TOKEN_AXES

__all__ = [
    "EMBEDDER_PREFIX",
    "IMAGE_POSITION_IDS",
    "PATCH_AXES",
    "POSITION_AXES",
    "TOWER_PREFIX",
    "ClippedLinear",
    "Gemma4ImageEncoderConfig",
    "Gemma4VisionConfig",
    "Gemma4VisionTower",
    "PatchEmbedder",
    "PoolByPosition",
    "Standardize",
    "build_vision_tower",
    "hf_name",
    "soft_token_counts",
    "soft_token_mask",
]

# The side input that carries the patches' (x, y) positions ([image, seq, xy]; padding -1).
IMAGE_POSITION_IDS = "image_position_ids"
PATCH_AXES = ("batch", "seq", "patch_pixel")
POSITION_AXES = ("batch", "seq", "xy")

# Where Gemma4ForConditionalGeneration files (Hub and transformers 5.23) keep the tower
# and its embedder.
TOWER_PREFIX = "model.vision_tower."
EMBEDDER_PREFIX = "model.embed_vision."

# The 0-d buffers of a clipped linear and the standardisation vectors: stored in the
# checkpoint, not counted as parameters (transformers registers them as buffers).
_BUFFERS = re.compile(r"\.(input_min|input_max|output_min|output_max|std_bias|std_scale)$")
# The processor's default soft-token budget per image (max_soft_tokens).
DEFAULT_SOFT_TOKENS = 280


# ---------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Gemma4VisionConfig:
    """Architecture of Gemma 4's vision tower (field names as transformers'
    ``Gemma4VisionConfig``). E2B/E4B: width 768, MLP 3072, 16 layers, 12 heads of 64,
    clipped linears; 26B-A4B/31B: 1152, 4304, 27 layers, 16 heads of 72, standardize.
    Both: patch 16, pooling kernel 3, a 10 240-row position table per axis, theta 100."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10 * 1024
    rope_theta: float = 100.0
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    use_clipped_linears: bool = False
    standardize: bool = False

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Gemma 4 vision num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.head_dim % 4:
            raise ValueError(
                f"Gemma 4 vision head_dim ({self.head_dim}) must be a multiple of 4: 2-D RoPE "
                "turns each half of a head by rotating half of that half."
            )
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ValueError(
                f"Gemma 4 vision hidden_activation {self.hidden_activation!r} is not "
                "implemented; the released towers use 'gelu_pytorch_tanh'."
            )

    @property
    def num_channels(self) -> int:
        """Colour channels per pixel: transformers' tower takes RGB (3) only."""
        return 3

    @property
    def patch_pixels(self) -> int:
        """Values per patch: ``3 * patch_size**2`` (768 at patch 16)."""
        return self.num_channels * self.patch_size**2

    @property
    def num_patches(self) -> int:
        """Patches per image at the processor's default budget of 280 soft tokens
        (``280 * k**2``, 2520 at k = 3): what memory estimates assume. A call may use
        another ``max_soft_tokens`` (`gemmalens.vision.preprocess_gemma4`)."""
        return DEFAULT_SOFT_TOKENS * self.pooling_kernel_size**2

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Gemma4VisionConfig:
        """Reads a transformers ``gemma4_vision`` config dict (a Gemma 4 config's
        ``vision_config``); keys it leaves out take transformers' defaults."""
        expect_model_type(hf, "gemma4_vision", "a Gemma 4 vision config")
        if hf.get("attention_bias"):
            raise ValueError("Gemma 4 vision attention with biases is not implemented.")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(
                f"Gemma 4's vision tower uses axial (2-D) RoPE; this config asks for "
                f"{rope.get('rope_type')!r}."
            )
        defaults = cls()
        return cls(
            **{
                field.name: hf.get(field.name, getattr(defaults, field.name))
                for field in dataclasses.fields(cls)
                if field.name != "rope_theta"
            },
            rope_theta=float(rope.get("rope_theta", defaults.rope_theta)),
        )


@dataclasses.dataclass(frozen=True)
class Gemma4ImageEncoderConfig(CountsParameters):
    """The image encoder of a Gemma 4 model: the tower and ``embed_vision`` (a weightless
    RMSNorm with the tower's ``rms_norm_eps``, then a projection to ``text_hidden_size``).
    ``num_params()`` counts parameters as transformers does (the clipping bounds and
    standardisation vectors are buffers)."""

    vision: Gemma4VisionConfig
    text_hidden_size: int

    def build(self, source: ParamSource, scope: str = "") -> Gemma4VisionTower:
        """The Penzai tower, every parameter taken from ``source`` (labels and hook names
        under ``{scope}vision.``)."""
        return build_vision_tower(self, source, scope)

    def counts_as_parameter(self, label: str) -> bool:
        return not _BUFFERS.search(label)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Gemma4ImageEncoderConfig:
        """Reads a transformers ``gemma4`` config dict: ``vision_config`` and
        ``text_config.hidden_size``."""
        vision = Gemma4VisionConfig.from_hf(hf.get("vision_config") or {})
        text = hf.get("text_config") or {}
        return cls(vision, text.get("hidden_size", 2304))


# ---------------------------------------------------------------------------------- layers


@pz.pytree_dataclass
class ClippedLinear(pz.nn.Layer):
    """``clamp(linear(clamp(x, input_min, input_max)), output_min, output_max)``:
    transformers' ``Gemma4ClippableLinear`` with ``use_clipped_linears``. The four bounds
    are 0-d values from the checkpoint (infinite where a bound is unused), cast to the
    activation dtype."""

    input_min: pz.nn.ParameterLike[pz.nx.NamedArray]
    input_max: pz.nn.ParameterLike[pz.nx.NamedArray]
    linear: pz.nn.Linear
    output_min: pz.nn.ParameterLike[pz.nx.NamedArray]
    output_max: pz.nn.ParameterLike[pz.nx.NamedArray]

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        def clip(v, low, high):
            return pz.nx.nmap(jnp.clip)(v, low.value.astype(v.dtype), high.value.astype(v.dtype))

        y = self.linear(clip(x, self.input_min, self.input_max))
        return clip(y, self.output_min, self.output_max)

    @classmethod
    def build(
        cls, params: ParamBuilder, name: str, out_axes: dict[str, int], in_axes: dict[str, int]
    ) -> ClippedLinear:
        """Asks ``params`` for ``{name}.weights`` and the bounds ``{name}.input_min`` etc.
        (random models start with infinite bounds, as transformers)."""

        def bound(which: str, init: str) -> pz.nn.ParameterLike:
            return params(f"{name}.{which}", {}, init=init, layout="raw")

        return cls(
            input_min=bound("input_min", "-inf"),
            input_max=bound("input_max", "inf"),
            linear=params.linear(name, out_axes, in_axes),
            output_min=bound("output_min", "-inf"),
            output_max=bound("output_max", "inf"),
        )


@pz.pytree_dataclass
class PatchEmbedder(pz.nn.Layer):
    """Patches to the tower's width: ``2 (p - 0.5) @ input_proj`` plus the position
    embedding ``table[0][x] + table[1][y]`` (zero for padding patches).

    Input ``[batch, seq, patch_pixel]`` in [0, 1]; side input ``grid_positions`` (the
    patches' (x, y), -1 for padding). The scaling runs in the pixels' dtype and the result
    is cast to the weights' dtype, as transformers does.
    """

    input_proj: pz.nn.Linear
    hook_patch_embed: HookPoint
    position_table: pz.nn.ParameterLike[pz.nx.NamedArray]
    hook_pos_embed: HookPoint

    def __call__(self, pixels: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        weights = self.input_proj.weights.value
        x = ((pixels - 0.5) * 2).astype(weights.dtype)
        h = self.hook_patch_embed(self.input_proj(x), **side_inputs)
        positions = side_inputs[GRID_POSITIONS]
        table = self.position_table.value.untag("xy", "position", "embedding")

        def lookup(rows, xy):  # rows [2, position, embedding] -> [embedding]
            clamped = jnp.maximum(xy, 0)
            found = rows[0, clamped[0]] + rows[1, clamped[1]]
            return jnp.where(jnp.all(xy == -1), jnp.zeros_like(found), found)

        embedded = pz.nx.nmap(lookup)(table, positions.untag("xy"))
        embedded = embedded.tag("embedding").astype(h.dtype)
        return h + self.hook_pos_embed(embedded, **side_inputs)


def _cells(positions: jax.Array, k: int) -> jax.Array:
    """Each patch's pooled cell ``x // k + (width // k) * (y // k)`` (``width`` = the image's
    largest x + 1); padding patches count as (0, 0). ``positions`` is ``[..., seq, 2]``."""
    clamped = jnp.maximum(positions, 0)
    width = clamped[..., 0].max(axis=-1, keepdims=True) + 1
    cell = clamped // k
    return cell[..., 0] + (width // k) * cell[..., 1]


@pz.pytree_dataclass
class PoolByPosition(pz.nn.Layer):
    """Averages the patches of each ``kernel x kernel`` cell of an image's grid, by their
    positions, then multiplies by ``sqrt(width)``: ``[batch, seq, embedding]`` ->
    ``[batch, image_token, embedding]`` with ``seq / kernel**2`` tokens, row-major over
    the cells, in float32 (transformers keeps the pooled tokens in float32 until they are
    standardised). Padding patches are zeroed first; cells no patch falls in stay zero
    (`soft_token_mask` drops them). Reads the side input ``grid_positions``."""

    kernel: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        k, width = self.kernel, x.named_shape["embedding"]
        length = x.named_shape["seq"] // k**2

        def pool(h, positions):  # [seq, embedding], [seq, 2] -> [image_token, embedding]
            padding = jnp.all(positions == -1, axis=-1)
            h = jnp.where(padding[:, None], jnp.zeros_like(h), h)
            weights = jax.nn.one_hot(_cells(positions, k), length, dtype=jnp.float32) / k**2
            pooled = (weights.T @ h.astype(jnp.float32)).astype(h.dtype)
            return pooled.astype(jnp.float32) * jnp.float32(math.sqrt(width))

        positions = side_inputs[GRID_POSITIONS].untag("seq", "xy")
        pooled = pz.nx.nmap(pool)(x.untag("seq", "embedding"), positions)
        return pooled.tag("image_token", "embedding")


@pz.pytree_dataclass
class Standardize(pz.nn.Layer):
    """``(x - bias) * scale`` in float32 (the 26B and 31B towers' ``standardize``)."""

    bias: pz.nn.ParameterLike[pz.nx.NamedArray]
    scale: pz.nn.ParameterLike[pz.nx.NamedArray]

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        bias = self.bias.value.astype(jnp.float32)
        return (x.astype(jnp.float32) - bias) * self.scale.value.astype(jnp.float32)


def soft_token_mask(positions: jax.Array, kernel: int) -> jax.Array:
    """``[image, seq // kernel**2]`` bool: which pooled cells hold a patch (padding patches
    count for cell 0, as in transformers). Only these become soft tokens."""
    length = positions.shape[-2] // kernel**2
    cells = jax.nn.one_hot(_cells(positions, kernel), length, dtype=jnp.int32)
    return cells.sum(axis=-2) > 0


def soft_token_counts(image_position_ids: np.ndarray, kernel: int) -> list[int]:
    """Soft tokens of each image (the host-side count of `soft_token_mask`)."""
    positions = np.asarray(image_position_ids)
    clamped = np.maximum(positions, 0)
    width = clamped[..., 0].max(axis=-1, keepdims=True) + 1
    cells = (clamped[..., 0] // kernel) + (width // kernel) * (clamped[..., 1] // kernel)
    return [len(np.unique(row)) for row in cells]


@pz.pytree_dataclass(kw_only=True)
class Gemma4VisionTower(pz.nn.Layer):
    """Patchified pixels -> Gemma 4 soft tokens: the tower, then ``embed_vision``.

    Called with ``pixel_values`` (named axes ``batch``, ``seq``, ``patch_pixel``) and the
    side input ``image_position_ids`` (``batch``, ``seq``, ``xy``), as Gemma 4's image
    processor gives them (`gemmalens.vision.preprocess_gemma4`). Returns
    ``[batch, image_token, embedding]`` (the text width) for every pooled cell;
    `soft_token_mask` says which are real tokens. Other side inputs are not read: the
    tower makes its own positions and mask.
    """

    embed: PatchEmbedder
    blocks: pz.nn.Sequential
    pool: pz.nn.Sequential
    embedder: pz.nn.Sequential
    pooling_kernel_size: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, pixel_values: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        if IMAGE_POSITION_IDS not in side_inputs:
            raise ValueError(
                f"Gemma 4's vision tower needs the side input {IMAGE_POSITION_IDS!r}: the "
                "patches' (x, y) positions, named axes batch, seq, xy (preprocess_gemma4 "
                "returns them beside pixel_values)."
            )
        pixel_values = _named(pixel_values, PATCH_AXES, "pixel_values")
        positions = _named(side_inputs[IMAGE_POSITION_IDS], POSITION_AXES, IMAGE_POSITION_IDS)
        padding = pz.nx.nmap(lambda xy: jnp.all(xy == -1))(positions.untag("xy"))
        index = pz.nx.wrap(jnp.arange(positions.named_shape["seq"], dtype=jnp.int32)).tag("seq")
        side = {
            GRID_POSITIONS: positions,
            # Every patch sees every real patch; padding keys (position -1) are masked.
            "token_positions": pz.nx.nmap(jnp.where)(padding, -1, index),
        }
        h = self.embed(pixel_values, **side)
        dtype = h.dtype
        h = self.blocks(h, **side)
        h = self.pool(h, **side)
        return self.embedder(h.astype(dtype), **side)

    def soft_token_mask(self, **side_inputs: Any) -> jax.Array:
        """``[image, image_token]`` bool from the side input ``image_position_ids``: the
        pooled cells that are soft tokens (transformers drops the others)."""
        positions = _named(side_inputs[IMAGE_POSITION_IDS], POSITION_AXES, IMAGE_POSITION_IDS)
        return soft_token_mask(positions.unwrap(*POSITION_AXES), self.pooling_kernel_size)


def _named(value: Any, axes: tuple[str, ...], name: str) -> pz.nx.NamedArray:
    """``value`` as a named array with ``axes`` (a plain array is read in that order)."""
    if isinstance(value, pz.nx.NamedArrayBase):
        if value.positional_shape or set(value.named_shape) != set(axes):
            raise ValueError(
                f"{name} must have exactly the named axes {list(axes)}; got named axes "
                f"{dict(value.named_shape)} and positional shape {value.positional_shape}."
            )
        return value
    array = jnp.asarray(value)
    if array.ndim != len(axes):
        raise ValueError(f"{name} must be [{', '.join(axes)}]; got shape {array.shape}.")
    return pz.nx.wrap(array).tag(*axes)


# -------------------------------------------------------------------------------- builders


def _linear_factory(params: ParamBuilder, clipped: bool):
    """Makes the blocks' projections: plain, or `ClippedLinear` with its four bounds."""
    if not clipped:
        return params.linear
    return lambda name, out_axes, in_axes: ClippedLinear.build(params, name, out_axes, in_axes)


def build_block(params: ParamBuilder, vision: Gemma4VisionConfig, index: int) -> pz.nn.NamedGroup:
    """A Gemma 4 block over patches: the text tower's layout (plain RMS norms before and
    after attention and MLP), bidirectional attention with 2-D RoPE."""
    width, eps = vision.hidden_size, vision.rms_norm_eps
    block = params.scope(f"blocks.{index}")
    attn, mlp = block.scope("attn"), block.scope("mlp")

    def norm(name: str) -> RMSNorm:
        return RMSNorm.build(block, name, "embedding", width, eps, "plain")

    spec = AttentionSpec(
        d_model=width,
        num_heads=vision.num_attention_heads,
        num_kv_heads=vision.num_key_value_heads,
        head_dim=vision.head_dim,
        rope=AxialRopeConfig(vision.rope_theta),
        mask=AttentionMask(causal=False),
        scale=1.0,
        norm_form="plain",
        eps=eps,
        value_norm=True,
    )
    clipped = vision.use_clipped_linears
    return residual_block(
        block,
        attention_branch=[
            norm("input_layernorm"),
            build_attention(attn, spec, _linear_factory(attn, clipped)),
            norm("post_attention_layernorm"),
        ],
        mlp_branch=[
            norm("pre_feedforward_layernorm"),
            GatedMLP.build(
                mlp, mlp.prefix, width, vision.intermediate_size, _linear_factory(mlp, clipped)
            ),
            norm("post_feedforward_layernorm"),
        ],
    )


def build_vision_tower(
    config: Gemma4ImageEncoderConfig, source: ParamSource, scope: str = ""
) -> Gemma4VisionTower:
    """Builds the tower and ``embed_vision``, taking every parameter from ``source``
    (labels under ``{scope}vision.``)."""
    vision = config.vision
    params = ParamBuilder(source, scope).scope("vision")
    embedder = params.scope("patch_embedder")
    width = vision.hidden_size
    embed = PatchEmbedder(
        input_proj=embedder.linear(
            "input_proj", {"embedding": width}, {"patch_pixel": vision.patch_pixels}
        ),
        hook_patch_embed=params.hook("hook_patch_embed", RESID_AXES),
        position_table=embedder(
            "position_embedding_table",
            {"xy": 2, "position": vision.position_embedding_size},
            {"embedding": width},
            init="ones",
            layout="raw",
        ),
        hook_pos_embed=params.hook("hook_pos_embed", RESID_AXES),
    )
    pool: list[pz.nn.Layer] = [
        PoolByPosition(vision.pooling_kernel_size),
        params.hook("hook_pooled", TOKEN_AXES),
    ]
    if vision.standardize:
        pool += [
            Standardize(
                bias=params("std_bias", {"embedding": width}, init="zeros"),
                scale=params("std_scale", {"embedding": width}, init="ones"),
            ),
            params.hook("hook_standardized", TOKEN_AXES),
        ]
    embedding_projection = params.linear(
        "embedding_projection",
        {"embedding": config.text_hidden_size},
        {"vision_embedding": width},
    )
    return Gemma4VisionTower(
        embed=embed,
        blocks=pz.nn.Sequential(
            [build_block(params, vision, i) for i in range(vision.num_hidden_layers)]
        ),
        pool=pz.nn.Sequential(pool),
        embedder=pz.nn.Sequential(
            [
                RMSNorm(scale=None, axis="embedding", eps=vision.rms_norm_eps, form="none"),
                params.hook("hook_soft_emb_norm", TOKEN_AXES),
                pz.nn.RenameAxes("embedding", "vision_embedding"),
                embedding_projection,
                params.hook("hook_projected", TOKEN_AXES),
            ]
        ),
        pooling_kernel_size=vision.pooling_kernel_size,
    )


# ----------------------------------------------------------------------- checkpoint names


def hf_name(
    label: str, tower_prefix: str = TOWER_PREFIX, embedder_prefix: str = EMBEDDER_PREFIX
) -> str:
    """A parameter label as transformers names the tensor, e.g.
    ``vision.blocks.3.attn.q_proj.weights`` ->
    ``model.vision_tower.encoder.layers.3.self_attn.q_proj.linear.weight`` (every
    projection of the tower sits in a ``Gemma4ClippableLinear``, clipping or not),
    ``vision.blocks.3.attn.q_proj.input_min`` -> ``...self_attn.q_proj.input_min`` and
    ``vision.embedding_projection.weights`` ->
    ``model.embed_vision.embedding_projection.weight``."""
    if not label.startswith("vision."):
        raise ValueError(f"{label!r} is not a vision tower parameter label (vision.*).")
    name = label.removeprefix("vision.")
    if name == "embedding_projection.weights":
        return embedder_prefix + "embedding_projection.weight"
    name = re.sub(r"^blocks\.(\d+)\.attn\.", r"encoder.layers.\1.self_attn.", name)
    name = re.sub(r"^blocks\.(\d+)\.", r"encoder.layers.\1.", name)
    # The blocks' projections live in a Gemma4ClippableLinear's ``linear``.
    name = re.sub(r"\.(q|k|v|o|gate|up|down)_proj\.weights$", r".\1_proj.linear.weight", name)
    name = re.sub(r"\.(weights|scale)$", ".weight", name)
    return tower_prefix + name
