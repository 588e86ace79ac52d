"""Gemma 3's image encoder: the SigLIP vision tower and the multimodal projector.

The forward pass, with the hook point that names each value::

    pixel_values [batch, channel, height, width]
      -> patches (conv with stride = patch size, as patchify + affine)  vision.hook_patch_embed
      +  learned position embedding                                     vision.hook_pos_embed
      -> pre-norm encoder blocks: LayerNorm -> bidirectional attention, LayerNorm -> MLP
                                                                        vision.blocks.{i}.*
      -> post_layernorm                                                 vision.hook_post_layernorm
      -> average pooling of the patch grid to mm_tokens_per_image       vision.hook_pooled
      -> RMSNorm (1 + w)                                                vision.hook_soft_emb_norm
      -> @ mm_input_projection_weight (to the text width)               vision.hook_projected
    soft tokens [batch, image_token, embedding]

Named axes: ``batch``, ``channel``, ``height``, ``width`` (pixels); ``seq`` (patches,
row-major over the grid) and, inside a patch, ``channel``, ``pixel_row``, ``pixel_col``;
``embedding`` (the vision width inside the tower, the text width after the projection);
``heads``, ``kv_heads`` (= ``heads``), ``head_dim``; ``neurons``; ``image_token``. Each
block's hook points have the text tower's names and axes (``vision.blocks.0.attn.hook_pattern``
is ``[batch, heads, seq, kv_seq]``).

Parameter labels follow the text tower's conventions (``blocks.{i}``, ``attn``, ``.weights``
for projections, ``.scale`` for norms, ``.embeddings`` for tables) under ``vision.``;
`hf_name` turns them into transformers' tensor names. The same SigLIP tower and projector
serve T5Gemma 2's encoder under other prefixes.
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

from gemmalens.checkpoints.mapped import MappedCheckpoint
from gemmalens.checkpoints.parameters import build_from_checkpoint, find_prefix
from gemmalens.checkpoints.safetensors_files import TensorIndex
from gemmalens.families.hf_config import expect_model_type
from gemmalens.layers.attention import KV_AXES, QKV_AXES, Attention, AttentionMask, attention_mixer
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.mlp import ACTIVATIONS, MLP
from gemmalens.layers.norms import LayerNorm, RMSNorm
from gemmalens.layers.params import CountsParameters, ParamBuilder, ParamSource
from gemmalens.layers.transformer import RESID_AXES, residual_block

__all__ = [
    "HUB_PROJECTOR_PREFIX",
    "HUB_VISION_PREFIX",
    "PROJECTOR_PREFIXES",
    "VISION_PREFIXES",
    "AddPositionEmbedding",
    "AveragePool",
    "Gemma3ProjectorConfig",
    "Gemma3VisionConfig",
    "PatchEmbedding",
    "SiglipVisionConfig",
    "VisionTower",
    "build_vision_tower",
    "from_checkpoint",
    "from_state_dict",
    "hf_name",
]

PIXEL_AXES = ("batch", "channel", "height", "width")
TOKEN_AXES = ("batch", "image_token", "embedding")

# Where Hub checkpoints of Gemma 3 keep the tower and the projector. transformers 5.23 drops
# ``vision_model.`` in memory (``model.vision_tower.``) and when saving (``vision_tower.``);
# a bare ``SiglipVisionModel`` or ``Gemma3MultiModalProjector`` has no prefix at all.
HUB_VISION_PREFIX = "vision_tower.vision_model."
HUB_PROJECTOR_PREFIX = "multi_modal_projector."
VISION_PREFIXES = (
    HUB_VISION_PREFIX,
    "vision_tower.",
    "model.vision_tower.vision_model.",
    "model.vision_tower.",
    "",
)
PROJECTOR_PREFIXES = (HUB_PROJECTOR_PREFIX, "model.multi_modal_projector.", "")


# ---------------------------------------------------------------------------------- config


def _square(value: Any, name: str) -> int:
    """An int from transformers' ``int | [h, w]`` size fields; only square sizes."""
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(
                f"SigLIP {name} {list(value)} is not square; Gemma 3's tower takes square "
                "images and patches."
            )
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    """Architecture of a SigLIP vision tower (field names as transformers'
    ``SiglipVisionConfig``). Gemma 3 4B-27B use SigLIP-So400m/14 at 896 pixels: hidden 1152,
    MLP 4304, 27 layers, 16 heads, patch 14 (4096 patches)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"SigLIP hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})."
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"SigLIP image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"SigLIP hidden_act {self.hidden_act!r} is not implemented; expected one of "
                f"{sorted(ACTIVATIONS)}."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> SiglipVisionConfig:
        """Reads a transformers ``siglip_vision_model`` config dict (a Gemma 3 config's
        ``vision_config``); keys it leaves out take ``SiglipVisionConfig``'s defaults.

        ``vision_use_head`` is not read: Gemma 3 and T5Gemma 2 use the tower's last hidden
        state, never the attention-pooling head.
        """
        expect_model_type(hf, "siglip_vision_model", "a SigLIP vision config")
        return cls(
            hidden_size=hf.get("hidden_size", 768),
            intermediate_size=hf.get("intermediate_size", 3072),
            num_hidden_layers=hf.get("num_hidden_layers", 12),
            num_attention_heads=hf.get("num_attention_heads", 12),
            image_size=_square(hf.get("image_size", 224), "image_size"),
            patch_size=_square(hf.get("patch_size", 16), "patch_size"),
            num_channels=hf.get("num_channels", 3),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_act", "gelu_pytorch_tanh"),
        )


@dataclasses.dataclass(frozen=True)
class Gemma3ProjectorConfig:
    """Gemma 3's multimodal projector: average pooling to ``mm_tokens_per_image`` tokens (a
    square grid), RMSNorm (1 + w) with ``soft_emb_norm_eps`` (transformers uses the vision
    ``layer_norm_eps``), then a projection to ``text_hidden_size``."""

    mm_tokens_per_image: int
    text_hidden_size: int
    soft_emb_norm_eps: float = 1e-6

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)


@dataclasses.dataclass(frozen=True)
class Gemma3VisionConfig(CountsParameters):
    """The image encoder of Gemma 3 (and T5Gemma 2): a SigLIP tower and the projector."""

    vision: SiglipVisionConfig
    projector: Gemma3ProjectorConfig

    def __post_init__(self):
        tokens, side = self.projector.mm_tokens_per_image, self.projector.tokens_per_side
        if side * side != tokens:
            raise ValueError(f"mm_tokens_per_image ({tokens}) must be a square number.")
        if self.vision.patches_per_side % side:
            raise ValueError(
                f"The {self.vision.patches_per_side}x{self.vision.patches_per_side} patch grid "
                f"cannot be average-pooled to {side}x{side} tokens (mm_tokens_per_image "
                f"{tokens}): {self.vision.patches_per_side} is not a multiple of {side}."
            )

    def build(self, source: ParamSource, scope: str = "") -> VisionTower:
        """The Penzai tower, every parameter taken from ``source`` (labels and hook names
        under ``{scope}vision.``; T5Gemma 2 puts it under ``encoder.``)."""
        return build_vision_tower(self, source, scope)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Gemma3VisionConfig:
        """Reads a transformers ``gemma3`` config dict (for T5Gemma 2: its ``encoder``
        entry): ``vision_config``, ``text_config.hidden_size``, ``mm_tokens_per_image``;
        keys it leaves out take ``Gemma3Config``'s defaults."""
        vision = SiglipVisionConfig.from_hf(hf.get("vision_config") or {})
        text = hf.get("text_config") or {}
        projector = Gemma3ProjectorConfig(
            mm_tokens_per_image=hf.get("mm_tokens_per_image", 256),
            text_hidden_size=text.get("hidden_size", 2304),
            soft_emb_norm_eps=vision.layer_norm_eps,
        )
        return cls(vision, projector)


# ---------------------------------------------------------------------------------- layers


@pz.pytree_dataclass
class PatchEmbedding(pz.nn.Layer):
    """A convolution with kernel = stride = ``patch_size``, computed as cutting the image into
    patches and one affine map per patch: ``[batch, channel, height, width]`` ->
    ``[batch, seq, embedding]``, patches numbered row by row.

    ``projection`` contracts ``channel``, ``pixel_row`` and ``pixel_col``; its weights are
    torch's conv kernel ``[embedding, channel, pixel_row, pixel_col]`` unchanged.
    """

    projection: pz.nn.Layer
    patch_size: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, pixels: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        p = self.patch_size

        def patchify(image: jax.Array) -> jax.Array:
            channels, height, width = image.shape
            grid = image.reshape(channels, height // p, p, width // p, p)
            return grid.transpose(1, 3, 0, 2, 4).reshape(-1, channels, p, p)

        # transformers casts the pixels to the kernel's dtype first (bfloat16 models).
        kernel = pz.select(self.projection).at_instances_of(pz.nn.Linear).get_sequence()[0]
        patches = pz.nx.nmap(patchify)(pixels.untag("channel", "height", "width"))
        patches = patches.tag("seq", "channel", "pixel_row", "pixel_col")
        return self.projection(patches.astype(kernel.weights.value.dtype), **side_inputs)


@pz.pytree_dataclass
class AddPositionEmbedding(pz.nn.Layer):
    """Adds the learned position embedding (one row per patch), named ``hook_pos_embed``
    (broadcast over the batch, as TransformerLens' ``hook_pos_embed``)."""

    table: pz.nn.ParameterLike[pz.nx.NamedArray]
    hook_pos_embed: HookPoint

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        position = self.table.value.astype(x.dtype).broadcast_like(x)
        return x + self.hook_pos_embed(position, **side_inputs)


@pz.pytree_dataclass
class AveragePool(pz.nn.Layer):
    """Averages the ``patches_per_side``² patch grid over square windows down to
    ``tokens_per_side``² tokens (torch's ``AvgPool2d(k, stride=k)``), row-major:
    ``[batch, seq, embedding]`` -> ``[batch, image_token, embedding]``."""

    patches_per_side: int = dataclasses.field(metadata={"pytree_node": False})
    tokens_per_side: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        side = self.tokens_per_side
        k = self.patches_per_side // side

        def pool(patches: jax.Array) -> jax.Array:
            windows = patches.reshape(side, k, side, k)
            return windows.mean(axis=(1, 3)).reshape(side * side)

        return pz.nx.nmap(pool)(x.untag("seq")).tag("image_token")


@pz.pytree_dataclass(kw_only=True)
class VisionTower(pz.nn.Layer):
    """Pixel values -> Gemma 3 soft tokens: SigLIP, then the multimodal projector.

    Called with pixel values (named axes ``batch``, ``channel``, ``height``, ``width``, or a
    plain ``[batch, channel, height, width]`` array), as Gemma 3's image processor gives
    them (resized to ``image_size``², scaled to [-1, 1]). Returns the soft tokens, named
    ``batch``, ``image_token``, ``embedding`` (the text width).
    """

    embed: pz.nn.Sequential
    blocks: pz.nn.Sequential
    post_layernorm: pz.nn.Sequential
    projector: pz.nn.Sequential
    image_size: int = dataclasses.field(metadata={"pytree_node": False})
    num_channels: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, pixel_values: Any, **side_inputs: Any) -> pz.nx.NamedArray:
        pixels = self.named_pixels(pixel_values)
        h = self.embed(pixels, **side_inputs)
        batch, patches = h.named_shape["batch"], h.named_shape["seq"]
        # Attention is bidirectional and nothing is padded: every patch sees every patch.
        positions = jnp.broadcast_to(jnp.arange(patches, dtype=jnp.int32), (batch, patches))
        side_inputs = {
            **side_inputs,
            "token_positions": pz.nx.wrap(positions).tag("batch", "seq"),
            "positions_are_arange": True,
        }
        h = self.blocks(h, **side_inputs)
        h = self.post_layernorm(h, **side_inputs)
        return self.projector(h, **side_inputs)

    def soft_token_mask(self, **side_inputs: Any) -> None:
        """Which soft tokens are real: all of them (None). Gemma 4's tower drops pooled
        cells that no patch falls in (`gemmalens.vision.gemma4`)."""
        return None

    def named_pixels(self, pixel_values: Any) -> pz.nx.NamedArray:
        """The pixel values as a named array, after checking their shape."""
        if isinstance(pixel_values, pz.nx.NamedArrayBase):
            if pixel_values.positional_shape or set(pixel_values.named_shape) != set(PIXEL_AXES):
                raise ValueError(
                    f"pixel_values must have exactly the named axes {list(PIXEL_AXES)}; got "
                    f"named axes {dict(pixel_values.named_shape)} and positional shape "
                    f"{pixel_values.positional_shape}."
                )
            shape = tuple(pixel_values.named_shape[a] for a in PIXEL_AXES)
        else:
            shape = tuple(np.shape(pixel_values))
        s, c = self.image_size, self.num_channels
        expected = f"[batch, {c}, {s}, {s}] (channels first, {s}x{s} pixels: image_size {s})"
        if len(shape) != 4:
            raise ValueError(f"pixel_values must be {expected}; got shape {shape}.")
        if shape[1:] != (c, s, s):
            kind = "a non-square" if shape[2] != shape[3] else "a wrong-size"
            raise ValueError(
                f"pixel_values must be {expected}; got shape {shape}, {kind} "
                f"{shape[2]}x{shape[3]} image with {shape[1]} channel(s). Resize images to "
                f"{s}x{s} first (gemmalens.vision.preprocess_gemma3 does)."
            )
        if isinstance(pixel_values, pz.nx.NamedArrayBase):
            return pixel_values
        return pz.nx.wrap(jnp.asarray(pixel_values)).tag(*PIXEL_AXES)


# -------------------------------------------------------------------------------- builders


def build_attention(params: ParamBuilder, vision: SiglipVisionConfig) -> Attention:
    """Bidirectional multi-head attention with biases on q, k, v and out, scores scaled by
    ``head_dim ** -0.5``: the shared `Attention` with affine projections and a mask that
    sees every patch. ``params`` is the layer's scope (``vision.blocks.3.attn``)."""
    heads = {"heads": vision.num_attention_heads, "head_dim": vision.head_dim}
    kv_heads = {"kv_heads": vision.num_attention_heads, "head_dim": vision.head_dim}
    embedding = {"embedding": vision.hidden_size}
    return Attention(
        query=pz.nn.Sequential(
            [params.affine("q_proj", heads, embedding), params.hook("hook_q", QKV_AXES)]
        ),
        key=pz.nn.Sequential(
            [params.affine("k_proj", kv_heads, embedding), params.hook("hook_k", KV_AXES)]
        ),
        value=pz.nn.Sequential(
            [params.affine("v_proj", kv_heads, embedding), params.hook("hook_v", KV_AXES)]
        ),
        mixer=attention_mixer(
            params.prefix, AttentionMask(causal=False), scale=vision.head_dim**-0.5
        ),
        hook_z=params.hook("hook_z", QKV_AXES),
        output=params.affine("out_proj", embedding, heads),
    )


def build_block(params: ParamBuilder, vision: SiglipVisionConfig, index: int) -> pz.nn.NamedGroup:
    """LayerNorm -> attention and LayerNorm -> MLP, each inside a residual (pre-norm)."""
    width, eps = vision.hidden_size, vision.layer_norm_eps
    block = params.scope(f"blocks.{index}")
    return residual_block(
        block,
        attention_branch=[
            LayerNorm.build(block, "layer_norm1", "embedding", width, eps),
            build_attention(block.scope("attn"), vision),
        ],
        mlp_branch=[
            LayerNorm.build(block, "layer_norm2", "embedding", width, eps),
            MLP.build(block.scope("mlp"), width, vision.intermediate_size, vision.hidden_act),
        ],
    )


def build_projector(
    params: ParamBuilder, vision: SiglipVisionConfig, projector: Gemma3ProjectorConfig
) -> pz.nn.Sequential:
    """Pool, normalise, project: ``[batch, seq, embedding]`` (vision width) ->
    ``[batch, image_token, embedding]`` (text width)."""
    width = vision.hidden_size
    # transformers stores this weight [vision width, text width] for a plain matmul; the
    # request lists the vision axis first so that the stored layout is read unchanged.
    weights = params(
        "mm_input_projection.weights",
        {"vision_embedding": width},
        {"embedding": projector.text_hidden_size},
    )
    return pz.nn.Sequential(
        [
            AveragePool(vision.patches_per_side, projector.tokens_per_side),
            params.hook("hook_pooled", TOKEN_AXES),
            RMSNorm.build(
                params,
                "mm_soft_emb_norm",
                "embedding",
                width,
                projector.soft_emb_norm_eps,
                "one_plus",
            ),
            params.hook("hook_soft_emb_norm", TOKEN_AXES),
            pz.nn.RenameAxes("embedding", "vision_embedding"),
            pz.nn.Linear(
                weights=weights, in_axis_names=("vision_embedding",), out_axis_names=("embedding",)
            ),
            params.hook("hook_projected", TOKEN_AXES),
        ]
    )


def build_vision_tower(
    config: Gemma3VisionConfig, source: ParamSource, scope: str = ""
) -> VisionTower:
    """Builds the tower, taking every parameter from ``source`` (labels under
    ``{scope}vision.``, e.g. ``scope="encoder."``)."""
    vision = config.vision
    params = ParamBuilder(source, scope).scope("vision")
    embeddings = params.scope("embeddings")
    width = vision.hidden_size
    patch_axes = {
        "channel": vision.num_channels,
        "pixel_row": vision.patch_size,
        "pixel_col": vision.patch_size,
    }
    embed = pz.nn.Sequential(
        [
            PatchEmbedding(
                projection=embeddings.affine(
                    "patch_embedding", {"embedding": width}, patch_axes, layout="conv"
                ),
                patch_size=vision.patch_size,
            ),
            params.hook("hook_patch_embed", RESID_AXES),
            AddPositionEmbedding(
                table=embeddings(
                    "position_embedding.embeddings",
                    {"seq": vision.num_patches},
                    {"embedding": width},
                ),
                hook_pos_embed=params.hook("hook_pos_embed", RESID_AXES),
            ),
        ]
    )
    return VisionTower(
        embed=embed,
        blocks=pz.nn.Sequential(
            [build_block(params, vision, i) for i in range(vision.num_hidden_layers)]
        ),
        post_layernorm=pz.nn.Sequential(
            [
                LayerNorm.build(
                    params, "post_layernorm", "embedding", width, vision.layer_norm_eps
                ),
                params.hook("hook_post_layernorm", RESID_AXES),
            ]
        ),
        projector=build_projector(params, vision, config.projector),
        image_size=vision.image_size,
        num_channels=vision.num_channels,
    )


# ----------------------------------------------------------------------- checkpoint names


def hf_name(
    label: str,
    vision_prefix: str = HUB_VISION_PREFIX,
    projector_prefix: str = HUB_PROJECTOR_PREFIX,
) -> str:
    """A parameter label as transformers names the tensor, e.g.
    ``vision.blocks.3.attn.q_proj.weights`` ->
    ``vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.weight`` and
    ``vision.mm_soft_emb_norm.scale`` -> ``multi_modal_projector.mm_soft_emb_norm.weight``.
    """
    if not label.startswith("vision."):
        raise ValueError(f"{label!r} is not a vision tower parameter label (vision.*).")
    name = label.removeprefix("vision.")
    if name == "mm_input_projection.weights":
        return projector_prefix + "mm_input_projection_weight"  # a bare nn.Parameter
    name = re.sub(r"\.(weights|scale|embeddings)$", ".weight", name)
    if name.startswith("mm_"):
        return projector_prefix + name
    name = re.sub(r"^blocks\.(\d+)\.attn\.", r"encoder.layers.\1.self_attn.", name)
    name = re.sub(r"^blocks\.(\d+)\.", r"encoder.layers.\1.", name)
    return vision_prefix + name


def from_checkpoint(
    ckpt: TensorIndex,
    config: Gemma3VisionConfig,
    dtype: Any = jnp.float32,
    vision_prefix: str | None = None,
    projector_prefix: str | None = None,
) -> VisionTower:
    """The tower with its parameters read from an open checkpoint (a `CheckpointDir`, or
    any `TensorIndex`) by transformers tensor name.

    Prefixes left as None are found in the checkpoint (`VISION_PREFIXES`,
    `PROJECTOR_PREFIXES`). Tensors outside the two prefixes (the language model) and the
    SigLIP attention-pooling head, which Gemma 3 never runs (``{vision_prefix}head.*``), are
    ignored; every missing, unexpected or mis-shaped tensor is reported at once, before
    anything is read.
    """
    if vision_prefix is None:
        vision_prefix = find_prefix(
            ckpt, VISION_PREFIXES, "embeddings.patch_embedding.weight", "SigLIP vision"
        )
    if projector_prefix is None:
        projector_prefix = find_prefix(
            ckpt, PROJECTOR_PREFIXES, "mm_input_projection_weight", "Gemma 3 multimodal"
        )

    def ignore(key: str) -> bool:
        if key.startswith(vision_prefix + "head."):
            return True
        return not (key.startswith(vision_prefix) or key.startswith(projector_prefix))

    return build_from_checkpoint(
        ckpt,
        config.build,
        lambda label: hf_name(label, vision_prefix, projector_prefix),
        dtype,
        ignore=ignore,
        show_progress=False,
    )


def from_state_dict(
    config: Gemma3VisionConfig,
    arrays: Mapping[str, np.ndarray],
    dtype: Any = jnp.float32,
    vision_prefix: str | None = None,
    projector_prefix: str | None = None,
) -> VisionTower:
    """`from_checkpoint` on tensors held in memory: ``arrays`` maps transformers tensor
    names to numpy arrays, e.g. a torch state dict as
    ``{k: v.float().numpy() for k, v in model.state_dict().items()}`` (a bare
    ``SiglipVisionModel``'s names have no prefix; pass ``vision_prefix=""`` beside a
    projector's, or let the prefixes be found)."""
    ckpt = MappedCheckpoint.from_arrays(arrays)
    return from_checkpoint(ckpt, config, dtype, vision_prefix, projector_prefix)
