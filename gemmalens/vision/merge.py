"""How images enter Gemma 3's and Gemma 4's text stream (and T5Gemma 2's encoder stream):
soft tokens in place of the image placeholders, and the image blocks that attention reads.

A model loaded with its tower (``gl.load(path, vision=True)``) embeds like this::

    tokens [batch, seq]
      -> E[ids] * sqrt(d_model)                          (the text embedding)
      -> pixel_values -> the tower                        vision.*  [image, image_token, d]
         (Gemma 3: SigLIP + projector; Gemma 4: `gemmalens.vision.gemma4`, which also
         reads image_position_ids)
      -> the soft tokens at the image-token positions     hook_image_embed  [batch, seq, d]
         (image after image, row-major over the batch; zero at text positions)
      -> at image positions the soft tokens replace the (scaled) token embedding,
         unscaled, as transformers' ``masked_scatter`` does
      -> hook_embed: what enters block 0

Each run of image tokens is one image's block. Gemma 3: its tokens attend to each other
both ways on every layer (within the sliding window on local layers), causally to
everything else. Gemma 4: the same on sliding layers only, and only where the config says
``use_bidirectional_attention="vision"`` (26B, 31B); E2B and E4B stay causal. Gemma 4's
images have their own numbers of soft tokens (``n_patches / k**2``), and its per-layer
inputs read the pad row at image positions (`gemmalens.layers.per_layer_embeddings`).
(T5Gemma 2's encoder, bidirectional everywhere, reads no image blocks: its hook points
carry the ``encoder.`` prefix, ``encoder.vision.*`` and ``encoder.hook_image_embed``, and
its token embedding is `gemmalens.families.t5gemma2.EmbedTokensWithEOI`.)
`image_side_inputs` checks a call's images against its tokens and makes the side inputs
the model reads: ``pixel_values``, ``image_blocks`` and, for Gemma 4,
``image_position_ids``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.layers.attention import IMAGE_BLOCKS
from gemmalens.layers.embeddings import EmbedTokens
from gemmalens.layers.hooks import HookPoint
from gemmalens.vision.gemma4 import (
    IMAGE_POSITION_IDS,
    PATCH_AXES,
    POSITION_AXES,
    Gemma4ImageEncoderConfig,
    soft_token_counts,
)
from gemmalens.vision.mobilenetv5 import pixel_array
from gemmalens.vision.siglip import PIXEL_AXES, TOKEN_AXES

__all__ = [
    "IMAGE_BLOCKS",
    "IMAGE_POSITION_IDS",
    "PIXEL_VALUES",
    "EmbedWithImages",
    "block_ids",
    "gemma4_side_inputs",
    "image_runs",
    "image_side_inputs",
    "place_soft_tokens",
    "without_images",
]

# The side input that carries the pixel values (Gemma 3: [image, channel, height, width];
# Gemma 4: patchified, [image, seq, patch_pixel]).
PIXEL_VALUES = "pixel_values"
# Side inputs besides the pixels that a tower reads (Gemma 4's patch positions).
TOWER_INPUTS = (IMAGE_POSITION_IDS,)


def place_soft_tokens(
    is_image: jax.Array, soft_tokens: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
    """The soft tokens at their sequence positions, zero elsewhere.

    Args:
      is_image: ``[batch, seq]`` bool, True at image-token positions.
      soft_tokens: ``[image, image_token, d_model]``; their count (of valid ones) must
        equal the number of image positions (checked before the call, by
        `image_side_inputs`).
      valid: ``[image, image_token]`` bool, or None (all valid): the tokens that exist
        (Gemma 4 drops pooled cells without patches); the others are skipped.

    Returns:
      ``[batch, seq, d_model]``: the ``n``-th image position (row-major over the batch) holds
      valid soft token ``n`` of the flattened ``[image * image_token, d_model]`` list, as
      ``torch.masked_scatter`` fills it.
    """
    flat = soft_tokens.reshape(-1, soft_tokens.shape[-1])
    if valid is not None:
        # The valid tokens first, in order (a stable sort on "is not valid").
        flat = flat[jnp.argsort(jnp.logical_not(valid.reshape(-1)), stable=True)]
    order = jnp.cumsum(is_image.reshape(-1).astype(jnp.int32)) - 1
    gathered = jnp.take(flat, jnp.clip(order, 0, flat.shape[0] - 1), axis=0)
    placed = jnp.where(is_image.reshape(-1, 1), gathered, jnp.zeros_like(gathered))
    return placed.reshape(*is_image.shape, flat.shape[-1])


@pz.pytree_dataclass
class EmbedWithImages(pz.nn.Layer):
    """The token embedding, with the soft tokens of images at the image-token positions.

    Input: token ids (named axes ``batch``, ``seq``). Side input ``pixel_values`` (named
    axes ``batch`` (one per image), ``channel``, ``height``, ``width``; Gemma 4: ``batch``,
    ``seq``, ``patch_pixel`` and the side input ``image_position_ids``); without it the
    layer is the token embedding alone. Output: ``[batch, seq, embedding]``.

    Attributes:
      embed: the scaled token embedding (an `EmbedTokens`, or a layer holding one, such as
        T5Gemma 2's `EmbedTokensWithEOI`).
      vision: the image encoder (hook points ``vision.*``): SigLIP and the projector
        (`gemmalens.vision.siglip.VisionTower`) or Gemma 4's tower
        (`gemmalens.vision.gemma4.Gemma4VisionTower`). Its ``soft_token_mask`` says which
        of its soft tokens exist.
      hook_image_embed: the soft tokens at their positions in the text stream (zero at
        text positions); what it holds at image positions is what the stream gets there.
      image_token_id: the placeholder id (262144 in the released Gemma 3 checkpoints,
        258880 in Gemma 4's; a T5Gemma 2 checkpoint's ``image_token_index``).
    """

    embed: pz.nn.Layer
    vision: pz.nn.Layer
    hook_image_embed: HookPoint
    image_token_id: int = dataclasses.field(metadata={"pytree_node": False})

    @classmethod
    def around(
        cls, embed: pz.nn.Layer, vision: pz.nn.Layer, scope: Any, image_token_id: int
    ) -> EmbedWithImages:
        """``embed`` with the image tower ``vision``; ``hook_image_embed`` is named in the
        parameter scope ``scope`` (a `gemmalens.layers.params.ParamBuilder`: the model's,
        or T5Gemma 2's ``encoder.``)."""
        hook = scope.hook("hook_image_embed", ("batch", "seq", "embedding"))
        return cls(embed=embed, vision=vision, hook_image_embed=hook, image_token_id=image_token_id)

    def __call__(self, tokens: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        is_image = tokens == self.image_token_id
        table = pz.select(self.embed).at_instances_of(EmbedTokens).get_sequence()[0].table
        vocab = table.value.named_shape["vocab"]
        ids = tokens
        if self.image_token_id >= vocab:
            # As transformers: an out-of-table placeholder reads row 0 (then replaced).
            ids = pz.nx.nmap(jnp.where)(is_image, 0, tokens)
        embedded = self.embed(ids, **side_inputs)
        pixels = side_inputs.get(PIXEL_VALUES)
        if pixels is None:
            return embedded
        # The tower sees only its own inputs: the text's masks and positions are not its own.
        tower_inputs = {k: side_inputs[k] for k in TOWER_INPUTS if k in side_inputs}
        soft = self.vision(pixels, **tower_inputs).unwrap(*TOKEN_AXES)
        placed = place_soft_tokens(
            is_image.unwrap("batch", "seq"),
            soft.astype(embedded.dtype),
            self.vision.soft_token_mask(**tower_inputs),
        )
        placed = self.hook_image_embed(
            pz.nx.wrap(placed).tag("batch", "seq", "embedding"), **side_inputs
        )
        return pz.nx.nmap(jnp.where)(is_image, placed, embedded)


def without_images(tree: Any) -> Any:
    """``tree`` with every `EmbedWithImages` replaced by its token embedding: the text model
    alone (generation runs it, having no image inputs)."""
    return pz.select(tree).at_instances_of(EmbedWithImages).apply(lambda layer: layer.embed)


# ------------------------------------------------------------------------ the call's inputs


def image_runs(tokens: np.ndarray, image_token_id: int) -> list[tuple[int, int, int]]:
    """The runs of consecutive image tokens, row-major: ``(row, start, stop)`` with the run
    at ``tokens[row, start:stop]``. Each image is one run in a processor-built prompt."""
    runs = []
    for row, ids in enumerate(np.asarray(tokens)):
        is_image = np.concatenate([[False], ids == image_token_id, [False]])
        edges = np.flatnonzero(is_image[1:] != is_image[:-1])
        runs.extend((row, int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]))
    return runs


def block_ids(token_type_ids: np.ndarray) -> np.ndarray:
    """``[batch, seq]`` image-block numbers from token types (1 = image): each contiguous run
    of image tokens gets the next number in its row (0, 1, ...), text gets -1, as
    transformers' ``get_block_sequence_ids_for_mask``."""
    is_image = np.asarray(token_type_ids) == 1
    previous = np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    starts = is_image & ~previous
    return np.where(is_image, np.cumsum(starts, axis=1) - 1, -1).astype(np.int32)


def _no_tower_message(config: Any) -> str:
    family = getattr(config, "family", None)
    if family == "gemma3":
        return (
            "This model has no vision tower (it was loaded text-only, the default, or built "
            "without one), so it takes no pixel_values. Load a Gemma 3 checkpoint with its "
            "SigLIP tower with gl.load(path, vision=True) (Gemma 3 4B, 12B and 27B have one), "
            "or build from a config with vision (gl.preset('gemma3_4b'))."
        )
    if family == "t5gemma2":
        return (
            "This T5Gemma 2 model has no vision tower (it was loaded text-only, the default, "
            "or built without one), so it takes no pixel_values. Load the checkpoint with its "
            "encoder's SigLIP tower with gl.load(path, vision=True), or build from a config "
            "with vision (T5Gemma2Config(..., vision=Gemma3VisionConfig(...)))."
        )
    if family == "gemma3n":
        return (
            "This Gemma 3n model has no vision tower (it was loaded without it, or built "
            "without one), so it takes no pixel_values or image tokens. Load a Gemma 3n "
            "checkpoint with its MobileNetV5 tower with gl.load(path, vision=True) (and "
            "audio=True for sound too; Gemma3nForConditionalGeneration files, model_type "
            "'gemma3n'), or build from a config with vision "
            "(gemmalens.presets.gemma3n_multimodal('gemma3n_e2b'))."
        )
    if family == "gemma4":
        return (
            "This Gemma 4 model has no vision tower (it was loaded text-only, the default, or "
            "built without one), so it takes no pixel_values. Load a Gemma 4 checkpoint with "
            "its vision tower with gl.load(path, vision=True) (Gemma4ForConditionalGeneration "
            "files, model_type 'gemma4'), or build from a config with vision "
            "(Gemma4Config(..., vision=Gemma4ImageEncoderConfig(...)))."
        )
    family = family or type(config).__name__
    return (
        f"This {family} model takes no pixel_values: gemmalens implements image input for "
        "Gemma 3, Gemma 3n, Gemma 4 and T5Gemma 2 (gl.load(path, vision=True)) only so far."
    )


def _pixel_array(pixel_values: Any, config: Any) -> np.ndarray:
    """The pixel values as a float32 ``[image, channel, size, size]`` array, checked."""
    if isinstance(pixel_values, Mapping) and "pixel_values" in pixel_values:
        pixel_values = pixel_values["pixel_values"]  # preprocess_gemma3's output
    pixels = np.asarray(pixel_values)
    siglip = config.vision.vision
    size, channels = siglip.image_size, siglip.num_channels
    expected = f"[num_images, {channels}, {size}, {size}]"
    if pixels.ndim != 4 or pixels.shape[1:] != (channels, size, size):
        raise ValueError(
            f"pixel_values must be {expected} (channels first, {size}x{size}: the tower's "
            f"image_size), as gemmalens.vision.preprocess_gemma3(images, {size}, {size}) "
            f"makes them; got shape {pixels.shape}."
        )
    if not np.issubdtype(pixels.dtype, np.floating):
        raise TypeError(
            f"pixel_values must be floats (normalised to [-1, 1] by preprocess_gemma3), got "
            f"dtype {pixels.dtype}."
        )
    return pixels.astype(np.float32)


def describe_runs(runs: list[tuple[int, int, int]]) -> str:
    """``row 0 [3:7] (4 tokens), ...``: placeholder runs (`image_runs`) for a message."""
    shown = ", ".join(f"row {r} [{a}:{b}] ({b - a} tokens)" for r, a, b in runs[:6])
    return shown + (", ..." if len(runs) > 6 else "")


def image_side_inputs(
    config: Any,
    tokens: np.ndarray,
    pixel_values: Any = None,
    token_type_ids: Any = None,
    image_position_ids: Any = None,
) -> dict[str, pz.nx.NamedArray] | None:
    """Checks one call's images against its tokens and returns the side inputs the model
    reads (``pixel_values``, ``image_blocks``; Gemma 4 also ``image_position_ids``), or
    None for a call without images.

    Gemma 3n (MobileNetV5) takes whole images too (``[num_images, 3, 768, 768]`` as
    Gemma3nProcessor makes them, checked by `gemmalens.vision.mobilenetv5.pixel_array`),
    ``vision_soft_tokens_per_image`` placeholders each, and no image blocks (its attention
    is causal; its token types are checked by `gemmalens.audio.merge.audio_side_inputs`).

    Gemma 4 (`gemma4_side_inputs`) takes its processor's arrays instead: patchified
    ``pixel_values`` with ``image_position_ids`` (or `preprocess_gemma4`'s result, which
    holds both, as ``pixel_values``), and ``mm_token_type_ids`` as ``token_type_ids``.

    Args:
      config: the model's config; ``config.vision`` is its tower (None: no tower).
      tokens: ``[batch, seq]`` ids, with ``mm_tokens_per_image`` placeholder ids
        (``config.image_token_id``) for each image, as Gemma 3's processor expands them
        (`gemmalens.vision.expand_gemma3_image_ids`).
      pixel_values: ``[num_images, 3, image_size, image_size]`` floats
        (`gemmalens.vision.preprocess_gemma3`), images in the order of their runs,
        row-major over the batch; or None.
      token_type_ids: ``[batch, seq]``, 1 at image tokens, as the processor returns them;
        they decide the bidirectional blocks. Derived from the placeholder ids when None;
        all zeros give plain causal attention (as transformers without them).

    Raises:
      ValueError: pixel values for a model without a tower, image tokens without pixel
        values, a number of image-token runs other than the number of images, a run whose
        length is not ``mm_tokens_per_image``, a wrong pixel or token-type shape.
    """
    tokens = np.asarray(tokens)
    vision = getattr(config, "vision", None)
    types = None
    if token_type_ids is not None:
        types = np.asarray(token_type_ids)
        if types.shape != tokens.shape:
            raise ValueError(
                f"token_type_ids has shape {types.shape} but tokens have shape "
                f"{tokens.shape}; they must match (1 = image token, 0 = text)."
            )
    if vision is None:
        given = pixel_values is not None or image_position_ids is not None
        # Gemma 4's types also mark audio (3), which its audio path checks.
        image_types = (1, 2) if getattr(config, "family", None) == "gemma4" else (1,)
        if given or (types is not None and np.isin(types, image_types).any()):
            raise ValueError(_no_tower_message(config))
        return None
    if isinstance(vision, Gemma4ImageEncoderConfig):
        return gemma4_side_inputs(config, tokens, pixel_values, types, image_position_ids)
    gemma3n = getattr(config, "family", None) == "gemma3n"
    if image_position_ids is not None:
        raise ValueError(
            "image_position_ids are Gemma 4's patch positions; this model's tower takes "
            "whole images in pixel_values only."
        )
    if types is not None and not np.isin(types, (0, 1)).all():
        raise ValueError("token_type_ids must hold 0 (text) and 1 (image token) only.")
    image_id = config.image_token_id
    runs = image_runs(tokens, image_id)
    if pixel_values is None:
        if runs:
            count = sum(b - a for _, a, b in runs)
            made_by = (
                "as Gemma3nProcessor makes them"
                if gemma3n
                else "(gemmalens.vision.preprocess_gemma3)"
            )
            raise ValueError(
                f"tokens hold {count} image token(s) (id {image_id}) in {len(runs)} run(s) but "
                f"no pixel_values were given: pass pixel_values=[num_images, 3, H, W] "
                f"{made_by}, one image per run, or take the image tokens out of the prompt."
            )
        if types is not None and types.any():
            raise ValueError(
                "token_type_ids mark image tokens but no pixel_values were given: pass the "
                "images, or leave token_type_ids out for a text-only call."
            )
        return None
    if gemma3n:  # MobileNetV5: whole images of a multiple of its grid, no image blocks
        pixels = pixel_array(pixel_values, vision.vision)
        per_image = vision.soft_tokens_per_image
        name, made = "vision_soft_tokens_per_image", "Gemma3nProcessor writes them"
    else:
        pixels = _pixel_array(pixel_values, config)
        per_image = config.vision.projector.mm_tokens_per_image
        name, made = "mm_tokens_per_image", "gemmalens.vision.expand_gemma3_image_ids writes them"
    if len(runs) != len(pixels):
        raise ValueError(
            f"tokens hold {len(runs)} run(s) of image tokens (id {image_id}) but pixel_values "
            f"has {len(pixels)} image(s); each image needs its own run of {per_image} image "
            f"tokens ({made}, between its start- and end-of-image tokens). Runs: "
            f"{describe_runs(runs) or 'none'}."
        )
    wrong = [run for run in runs if run[2] - run[1] != per_image]
    if wrong:
        raise ValueError(
            f"Each image takes {name} = {per_image} consecutive image tokens (id "
            f"{image_id}); these runs differ: {describe_runs(wrong)}. Two images need text "
            "between their runs (the processor puts end- and start-of-image tokens there)."
        )
    if gemma3n:  # attention stays causal around images: no blocks
        return {PIXEL_VALUES: pz.nx.wrap(jnp.asarray(pixels)).tag(*PIXEL_AXES)}
    if types is None:
        types = (tokens == image_id).astype(np.int32)
    return {
        PIXEL_VALUES: pz.nx.wrap(jnp.asarray(pixels)).tag(*PIXEL_AXES),
        IMAGE_BLOCKS: pz.nx.wrap(jnp.asarray(block_ids(types))).tag("batch", "seq"),
    }


# ------------------------------------------------------------------------------- Gemma 4

# Gemma 4's mm_token_type_ids: 0 text, 1 image, 2 video, 3 audio.
_GEMMA4_TYPES = {0: "text", 1: "image", 2: "video", 3: "audio"}


def _gemma4_arrays(
    pixel_values: Any, image_position_ids: Any, config: Gemma4ImageEncoderConfig
) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels [image, max_patches, 3 p²] float32, positions [image, max_patches, 2]
    int32)``, checked against the tower."""
    if isinstance(pixel_values, Mapping):  # preprocess_gemma4's result (or a processor's)
        if "pixel_values" not in pixel_values:
            raise ValueError(
                f"pixel_values is a mapping without a 'pixel_values' entry (keys "
                f"{sorted(pixel_values)}); pass preprocess_gemma4's result or the array."
            )
        if "image_position_ids" in pixel_values:
            if image_position_ids is not None:
                raise ValueError(
                    "image_position_ids were given twice: in the pixel_values mapping and "
                    "on their own; give them once."
                )
            image_position_ids = pixel_values["image_position_ids"]
        pixel_values = pixel_values["pixel_values"]
    tower = config.vision
    pixels = np.asarray(pixel_values)
    p, values = tower.patch_size, tower.patch_pixels
    expected = (
        f"[num_images, max_patches, {values}] (patches of {p}x{p} pixels x 3 channels, "
        f"row by row), as gemmalens.vision.preprocess_gemma4(images, patch_size={p}, "
        f"pooling_kernel_size={tower.pooling_kernel_size}) makes them"
    )
    if pixels.ndim == 4:
        raise ValueError(
            f"pixel_values has shape {pixels.shape}, whole images; Gemma 4's tower takes "
            f"patchified pixel_values {expected}, beside their image_position_ids."
        )
    if pixels.ndim != 3 or pixels.shape[-1] != values:
        channels = ""
        if pixels.ndim == 3 and pixels.shape[-1] % (p * p) == 0:
            channels = (
                f": {pixels.shape[-1]} values per patch are {p}x{p} pixels x "
                f"{pixels.shape[-1] // (p * p)} channel(s), and the tower reads 3 (RGB)"
            )
        raise ValueError(f"pixel_values must be {expected}; got shape {pixels.shape}{channels}.")
    if not np.issubdtype(pixels.dtype, np.floating):
        raise TypeError(
            f"pixel_values must be floats in [0, 1] (preprocess_gemma4 rescales them), got "
            f"dtype {pixels.dtype}."
        )
    if image_position_ids is None:
        raise ValueError(
            "Gemma 4's pixel_values need their image_position_ids [num_images, max_patches, "
            "2] ((x, y) per patch, (-1, -1) for padding): pass preprocess_gemma4's result as "
            "pixel_values (it holds both), or the two arrays."
        )
    positions = np.asarray(image_position_ids)
    if positions.shape != (*pixels.shape[:2], 2):
        raise ValueError(
            f"image_position_ids has shape {positions.shape}; for pixel_values of shape "
            f"{pixels.shape} it must be {(*pixels.shape[:2], 2)}."
        )
    if not np.issubdtype(positions.dtype, np.integer):
        raise TypeError(f"image_position_ids must be integers, got dtype {positions.dtype}.")
    padding = (positions == -1).all(-1)
    if ((positions < 0).any(-1) & ~padding).any():
        raise ValueError("image_position_ids hold negative values other than (-1, -1) padding.")
    if positions.max(initial=-1) >= tower.position_embedding_size:
        raise ValueError(
            f"image_position_ids reach {positions.max()}, past the tower's "
            f"position_embedding_size ({tower.position_embedding_size})."
        )
    k = tower.pooling_kernel_size
    max_patches = pixels.shape[1]
    if max_patches % (k * k):
        raise ValueError(
            f"pixel_values hold {max_patches} patches per image, not a multiple of "
            f"pooling_kernel_size**2 = {k * k}; preprocess_gemma4 pads to "
            "max_soft_tokens * pooling_kernel_size**2."
        )
    empty = [i for i, row in enumerate(padding) if row.all()]
    if empty:
        raise ValueError(f"image(s) {empty} of pixel_values have no patch (all padding).")
    return pixels.astype(np.float32), positions.astype(np.int32)


def gemma4_side_inputs(
    config: Any,
    tokens: np.ndarray,
    pixel_values: Any,
    types: np.ndarray | None,
    image_position_ids: Any,
) -> dict[str, pz.nx.NamedArray] | None:
    """`image_side_inputs` for Gemma 4: each run of ``config.image_token_id`` takes one
    image's soft tokens, as many as its grid has pooled cells (``n_patches / k**2``; the
    processor writes that many placeholders). ``types`` are the processor's
    ``mm_token_type_ids`` (image and video tokens form the bidirectional blocks); derived
    from the image placeholders when None.

    Raises:
      NotImplementedError: video placeholders (the video path is not built).
      ValueError: as `image_side_inputs`, with Gemma 4's shapes.
    """
    image_id = config.image_token_id
    if types is not None and not np.isin(types, tuple(_GEMMA4_TYPES)).all():
        raise ValueError(
            "token_type_ids (Gemma 4's mm_token_type_ids) must hold 0 (text), 1 (image), 2 "
            "(video) or 3 (audio) only."
        )
    if (tokens == config.video_token_id).any() or (types is not None and (types == 2).any()):
        raise NotImplementedError(
            f"The tokens hold video placeholders (id {config.video_token_id}, or token type "
            "2): gemmalens runs Gemma 4's vision tower on images only; video input is not "
            "implemented. Take them out of the prompt."
        )
    # Audio placeholders are the audio path's (`gemmalens.audio.gemma4.audio_side_inputs`)
    # where the model has its audio tower.
    audio_id = config.audio_token_id
    if getattr(config, "audio", None) is None and (
        (tokens == audio_id).any() or (types is not None and (types == 3).any())
    ):
        raise ValueError(
            f"The tokens hold audio placeholders (id {audio_id}, or token type 3) but this "
            "model was loaded without its audio tower: load the checkpoint with "
            "gl.load(path, vision=True, audio=True) and pass input_features, or take them "
            "out of the prompt."
        )
    runs = image_runs(tokens, image_id)
    if pixel_values is None:
        if image_position_ids is not None:
            raise ValueError("image_position_ids were given without pixel_values.")
        if runs:
            count = sum(b - a for _, a, b in runs)
            raise ValueError(
                f"tokens hold {count} image token(s) (id {image_id}) in {len(runs)} run(s) but "
                "no pixel_values were given: pass pixel_values=preprocess_gemma4(images) (or "
                "the arrays pixel_values and image_position_ids), one image per run, or take "
                "the image tokens out of the prompt."
            )
        if types is not None and types.any():
            raise ValueError(
                "token_type_ids mark image tokens but no pixel_values were given: pass the "
                "images, or leave token_type_ids out for a text-only call."
            )
        return None
    pixels, positions = _gemma4_arrays(pixel_values, image_position_ids, config.vision)
    k = config.vision.vision.pooling_kernel_size
    counts = soft_token_counts(positions, k)
    per_image = ", ".join(f"image {i}: {c}" for i, c in enumerate(counts))
    if len(runs) != len(pixels):
        raise ValueError(
            f"tokens hold {len(runs)} run(s) of image tokens (id {image_id}) but pixel_values "
            f"has {len(pixels)} image(s); each image needs its own run of as many image "
            f"tokens as it has soft tokens ({per_image}), between its start- and "
            f"end-of-image tokens. Runs: {describe_runs(runs) or 'none'}."
        )
    cells = pixels.shape[1] // k**2
    wrong = [
        f"image {i} has {c} soft tokens but its run row {r} [{a}:{b}] holds {b - a} image tokens"
        for i, (c, (r, a, b)) in enumerate(zip(counts, runs))
        if c != b - a
    ]
    if wrong or max(counts) > cells:
        raise ValueError(
            "Each image's run of image tokens must be as long as its soft tokens "
            f"(n_patches / {k * k}, at most {cells} here): "
            + "; ".join(wrong or [per_image])
            + ". Build the prompt from the same preprocess_gemma4 call (its "
            "num_soft_tokens_per_image)."
        )
    if types is None:
        types = (tokens == image_id).astype(np.int32)
    vision_blocks = np.isin(types, (1, 2)).astype(np.int32)
    return {
        PIXEL_VALUES: pz.nx.wrap(jnp.asarray(pixels)).tag(*PATCH_AXES),
        IMAGE_POSITION_IDS: pz.nx.wrap(jnp.asarray(positions)).tag(*POSITION_AXES),
        IMAGE_BLOCKS: pz.nx.wrap(jnp.asarray(block_ids(vision_blocks))).tag("batch", "seq"),
    }
