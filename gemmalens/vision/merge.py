"""How images enter Gemma 3's text stream (and T5Gemma 2's encoder stream): soft tokens in
place of the image placeholders, and the image blocks that attention reads.

A model loaded with its tower (``gl.load(path, vision=True)``) embeds like this::

    tokens [batch, seq]
      -> E[ids] * sqrt(d_model)                          (the text embedding)
      -> pixel_values -> SigLIP + projector               vision.*  [image, image_token, d]
      -> the soft tokens at the image-token positions     hook_image_embed  [batch, seq, d]
         (image after image, row-major over the batch; zero at text positions)
      -> at image positions the soft tokens replace the (scaled) token embedding,
         unscaled, as transformers' ``masked_scatter`` does
      -> hook_embed: what enters block 0

Each run of image tokens is one image's block: its tokens attend to each other both ways
on every layer (within the sliding window on local layers), causally to everything else.
(T5Gemma 2's encoder, bidirectional everywhere, reads no image blocks: its hook points
carry the ``encoder.`` prefix, ``encoder.vision.*`` and ``encoder.hook_image_embed``, and
its token embedding is `gemmalens.families.t5gemma2.EmbedTokensWithEOI`.)
`image_side_inputs` checks a call's images against its tokens and makes the two side
inputs the model reads: ``pixel_values`` and ``image_blocks``.
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
from gemmalens.vision.siglip import PIXEL_AXES, TOKEN_AXES, VisionTower

__all__ = [
    "IMAGE_BLOCKS",
    "PIXEL_VALUES",
    "EmbedWithImages",
    "block_ids",
    "image_runs",
    "image_side_inputs",
    "place_soft_tokens",
    "without_images",
]

# The side input that carries the pixel values ([image, channel, height, width]).
PIXEL_VALUES = "pixel_values"


def place_soft_tokens(is_image: jax.Array, soft_tokens: jax.Array) -> jax.Array:
    """The soft tokens at their sequence positions, zero elsewhere.

    Args:
      is_image: ``[batch, seq]`` bool, True at image-token positions.
      soft_tokens: ``[image, image_token, d_model]``; their count must equal the number of
        image positions (checked before the call, by `image_side_inputs`).

    Returns:
      ``[batch, seq, d_model]``: the ``n``-th image position (row-major over the batch) holds
      soft token ``n`` of the flattened ``[image * image_token, d_model]`` list, as
      ``torch.masked_scatter`` fills it.
    """
    flat = soft_tokens.reshape(-1, soft_tokens.shape[-1])
    order = jnp.cumsum(is_image.reshape(-1).astype(jnp.int32)) - 1
    gathered = jnp.take(flat, jnp.clip(order, 0, flat.shape[0] - 1), axis=0)
    placed = jnp.where(is_image.reshape(-1, 1), gathered, jnp.zeros_like(gathered))
    return placed.reshape(*is_image.shape, flat.shape[-1])


@pz.pytree_dataclass
class EmbedWithImages(pz.nn.Layer):
    """The token embedding, with the soft tokens of images at the image-token positions.

    Input: token ids (named axes ``batch``, ``seq``). Side input ``pixel_values`` (named
    axes ``batch`` (one per image), ``channel``, ``height``, ``width``); without it the
    layer is the token embedding alone. Output: ``[batch, seq, embedding]``.

    Attributes:
      embed: the scaled token embedding (an `EmbedTokens`, or a layer holding one, such as
        T5Gemma 2's `EmbedTokensWithEOI`).
      vision: the SigLIP tower and projector (hook points ``vision.*``).
      hook_image_embed: the soft tokens at their positions in the text stream (zero at
        text positions); what it holds at image positions is what the stream gets there.
      image_token_id: the placeholder id (262144 in the released Gemma 3 checkpoints; a
        T5Gemma 2 checkpoint's ``image_token_index``).
    """

    embed: pz.nn.Layer
    vision: VisionTower
    hook_image_embed: HookPoint
    image_token_id: int = dataclasses.field(metadata={"pytree_node": False})

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
        # The tower sees only the pixels: the text's masks and positions are not its own.
        soft = self.vision(pixels).unwrap(*TOKEN_AXES)
        placed = place_soft_tokens(is_image.unwrap("batch", "seq"), soft.astype(embedded.dtype))
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
    family = family or type(config).__name__
    return (
        f"This {family} model takes no pixel_values: gemmalens implements image input for "
        "Gemma 3 and T5Gemma 2 (gl.load(path, vision=True)) only so far."
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


def _describe_runs(runs: list[tuple[int, int, int]]) -> str:
    shown = ", ".join(f"row {r} [{a}:{b}] ({b - a} tokens)" for r, a, b in runs[:6])
    return shown + (", ..." if len(runs) > 6 else "")


def image_side_inputs(
    config: Any, tokens: np.ndarray, pixel_values: Any = None, token_type_ids: Any = None
) -> dict[str, pz.nx.NamedArray] | None:
    """Checks one call's images against its tokens and returns the side inputs the model
    reads (``pixel_values``, ``image_blocks``), or None for a call without images.

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
        if not np.isin(types, (0, 1)).all():
            raise ValueError("token_type_ids must hold 0 (text) and 1 (image token) only.")
    if vision is None:
        if pixel_values is not None or (types is not None and types.any()):
            raise ValueError(_no_tower_message(config))
        return None
    image_id = config.image_token_id
    runs = image_runs(tokens, image_id)
    if pixel_values is None:
        if runs:
            count = sum(b - a for _, a, b in runs)
            raise ValueError(
                f"tokens hold {count} image token(s) (id {image_id}) in {len(runs)} run(s) but "
                "no pixel_values were given: pass pixel_values=[num_images, 3, H, W] "
                "(gemmalens.vision.preprocess_gemma3), one image per run, or take the image "
                "tokens out of the prompt."
            )
        if types is not None and types.any():
            raise ValueError(
                "token_type_ids mark image tokens but no pixel_values were given: pass the "
                "images, or leave token_type_ids out for a text-only call."
            )
        return None
    pixels = _pixel_array(pixel_values, config)
    per_image = config.vision.projector.mm_tokens_per_image
    if len(runs) != len(pixels):
        raise ValueError(
            f"tokens hold {len(runs)} run(s) of image tokens (id {image_id}) but pixel_values "
            f"has {len(pixels)} image(s); each image needs its own run of {per_image} image "
            "tokens (gemmalens.vision.expand_gemma3_image_ids writes them, between its "
            f"start- and end-of-image tokens). Runs: {_describe_runs(runs) or 'none'}."
        )
    wrong = [run for run in runs if run[2] - run[1] != per_image]
    if wrong:
        raise ValueError(
            f"Each image takes mm_tokens_per_image = {per_image} consecutive image tokens (id "
            f"{image_id}); these runs differ: {_describe_runs(wrong)}. Two images need text "
            "between their runs (the processor puts end- and start-of-image tokens there)."
        )
    if types is None:
        types = (tokens == image_id).astype(np.int32)
    return {
        PIXEL_VALUES: pz.nx.wrap(jnp.asarray(pixels)).tag(*PIXEL_AXES),
        IMAGE_BLOCKS: pz.nx.wrap(jnp.asarray(block_ids(types))).tag("batch", "seq"),
    }
