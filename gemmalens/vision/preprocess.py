"""Image preprocessing and prompt building for Gemma 3 and Gemma 4, in numpy.

The outputs equal those of transformers' PIL/numpy image processors
(``Gemma3ImageProcessorPil`` and ``Gemma4ImageProcessorPil``): transformers resizes
through Pillow on uint8 images, and so does this module (``pillow_resize``); everything
else (RGB conversion of arrays, pan-and-scan crops, rescale, normalise, patchify,
position ids) is numpy. Pillow also decodes files and reads PIL images.

Inputs (one image or a non-empty list of them): a file path, a ``PIL.Image.Image``, or a
numpy array ``[H, W]`` (grayscale), ``[H, W, 1]``, ``[H, W, 3]`` or ``[H, W, 4]`` (RGBA,
composited onto white as transformers does), uint8 or float. Float arrays holding whole
numbers in [0, 255] are read as 0..255; other float arrays must lie in [0, 1] and are
mapped to uint8 as transformers maps them before its Pillow resize (``x * 255``,
truncated). (transformers would then rescale such arrays by 1/255 a second time; this
module does not.)
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "GEMMA3_IMAGE_MEAN",
    "GEMMA3_IMAGE_STD",
    "Gemma3Images",
    "Gemma4Images",
    "expand_gemma3_image_ids",
    "expand_gemma3_image_text",
    "gemma3_image_sequence",
    "gemma4_target_size",
    "load_image",
    "pillow_resize",
    "preprocess_gemma3",
    "preprocess_gemma4",
]

GEMMA3_IMAGE_MEAN = (0.5, 0.5, 0.5)
GEMMA3_IMAGE_STD = (0.5, 0.5, 0.5)
GEMMA4_SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)

# ---------------------------------------------------------------------------------------
# Loading


def _is_pil(x: Any) -> bool:
    try:
        import PIL.Image
    except ImportError:  # pragma: no cover - Pillow is a dependency of the vision path
        return False
    return isinstance(x, PIL.Image.Image)


def _pil_to_rgb(img: Any) -> np.ndarray:
    """A PIL image as ``[H, W, 3]`` uint8, alpha composited onto white (as transformers)."""
    import PIL.Image

    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = PIL.Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = img.convert("RGB")
    return np.array(rgb)


def _array_to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_ or not (
        np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
    ):
        raise TypeError(f"image arrays must be uint8, integer or float, got dtype {a.dtype}")
    if a.size == 0:
        raise ValueError(f"image array is empty (shape {a.shape})")
    if not np.all(np.isfinite(a)):
        raise ValueError("image array contains NaN or infinite values")
    if np.allclose(a, a.astype(np.int64)):
        if a.min() < 0 or a.max() > 255:
            raise ValueError(
                f"integer-valued image must lie in [0, 255], got [{a.min()}, {a.max()}]"
            )
        return a.astype(np.uint8)
    if a.min() < 0 or a.max() > 1:
        raise ValueError(
            f"float image must lie in [0, 1] (or hold whole numbers in [0, 255]), got [{a.min()}, {a.max()}]"
        )
    return (a.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(
            f"image arrays must be [H, W] or [H, W, C] (channels last) with C in (1, 3, 4), got shape {a.shape}"
        )
    channels = a.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(
            f"image has {channels} channels; expected 1 (grayscale), 3 (RGB) or 4 (RGBA) in the last axis "
            f"(shape {a.shape}; arrays must be channels-last [H, W, C])"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image has zero size (shape {a.shape})")
    if channels == 4:
        if np.issubdtype(a.dtype, np.floating) and not np.allclose(a, a.astype(np.int64)):
            if a.min() < 0 or a.max() > 1:
                raise ValueError(f"float RGBA image must lie in [0, 1], got [{a.min()}, {a.max()}]")
            alpha = a[..., 3:4]
            a = (alpha * a[..., :3] + (1 - alpha) * 1.0).astype(a.dtype)
        else:
            u = _array_to_uint8(a)
            alpha = u[..., 3:4] / 255
            a = np.round(alpha * u[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    elif channels == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(_array_to_uint8(a))


def load_image(image: Any) -> np.ndarray:
    """One image (path, PIL image or array) as an ``[H, W, 3]`` uint8 RGB array."""
    if isinstance(image, (str, os.PathLike)):
        import PIL.Image

        path = os.fspath(image)
        if not os.path.exists(path):
            raise FileNotFoundError(f"image file not found: {path!r}")
        try:
            with PIL.Image.open(path) as img:
                img.load()
                return _pil_to_rgb(img)
        except PIL.UnidentifiedImageError as e:
            raise ValueError(f"could not decode {path!r} as an image: {e}") from e
    if _is_pil(image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(
        f"expected an image as a file path, a PIL.Image.Image or a numpy array, got {type(image).__name__}"
    )


def _load_images(images: Any) -> list[np.ndarray]:
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("no images given: the list of images is empty")
        return [load_image(im) for im in images]
    return [load_image(images)]


# ---------------------------------------------------------------------------------------
# Resampling: through Pillow, as transformers does (exact by construction)

_RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling.BILINEAR / BICUBIC


def pillow_resize(
    image: np.ndarray, height: int, width: int, resample: str = "bilinear"
) -> np.ndarray:
    """Resize an ``[H, W, C]`` uint8 image with ``PIL.Image.resize`` (as transformers does).

    Pillow's uint8 resampler is fixed-point, separable and (in Pillow 13) picks the order of
    its two passes itself; a numpy port that always runs the horizontal pass first differs by
    one grey level in some shapes, so Pillow does the resampling here.

    Args:
      image: ``[H, W, C]`` uint8.
      height, width: output size.
      resample: ``"bilinear"`` or ``"bicubic"``.
    """
    import PIL.Image

    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(
            f"pillow_resize needs an [H, W, C] uint8 image, got {image.dtype} {image.shape}"
        )
    if height <= 0 or width <= 0:
        raise ValueError(f"output size must be positive, got {height}x{width}")
    img = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.array(img.resize((width, height), resample=_RESAMPLE[resample]))
    return out[..., None] if out.ndim == 2 else out


def _rescale(image: np.ndarray, factor: float) -> np.ndarray:
    return (image.astype(np.float64) * factor).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Gemma 3


class Gemma3Images(dict):
    """``pixel_values`` ``[n, 3, H, W]`` float32 (originals and their crops, image by image) and
    ``num_crops`` (pan-and-scan crops per input image; 0 without pan and scan)."""

    @property
    def pixel_values(self) -> np.ndarray:
        return self["pixel_values"]

    @property
    def num_crops(self) -> list[int]:
        return self["num_crops"]


def _pan_and_scan(
    image: np.ndarray, min_crop_size: int, max_num_crops: int, min_ratio: float
) -> list[np.ndarray]:
    """Crops of an ``[H, W, C]`` image as Gemma 3's processor makes them (possibly none)."""
    height, width = image.shape[:2]
    if width >= height:
        if width / height < min_ratio:
            return []
        num_w = int(math.floor(width / height + 0.5))
        num_w = min(int(math.floor(width / min_crop_size)), num_w)
        num_w = min(max_num_crops, max(2, num_w))
        num_h = 1
    else:
        if height / width < min_ratio:
            return []
        num_h = int(math.floor(height / width + 0.5))
        num_h = min(int(math.floor(height / min_crop_size)), num_h)
        num_h = min(max_num_crops, max(2, num_h))
        num_w = 1
    crop_w = int(math.ceil(width / num_w))
    crop_h = int(math.ceil(height / num_h))
    if min(crop_w, crop_h) < min_crop_size:
        return []
    pos_w = [crop_w * i for i in range(num_w)]
    pos_h = [crop_h * i for i in range(num_h)]
    return [image[h : h + crop_h, w : w + crop_w] for h, w in itertools.product(pos_h, pos_w)]


def preprocess_gemma3(
    images: Any,
    height: int = 896,
    width: int = 896,
    resample: str = "bilinear",
    rescale_factor: float = 1 / 255,
    image_mean: Sequence[float] = GEMMA3_IMAGE_MEAN,
    image_std: Sequence[float] = GEMMA3_IMAGE_STD,
    do_pan_and_scan: bool = False,
    pan_and_scan_min_crop_size: int = 256,
    pan_and_scan_max_num_crops: int = 4,
    pan_and_scan_min_ratio_to_activate: float = 1.2,
) -> Gemma3Images:
    """Gemma 3's image preprocessing (SigLIP input), equal to ``Gemma3ImageProcessorPil``.

    Each image becomes RGB, is resized to ``height x width`` (Pillow bilinear), rescaled
    by ``rescale_factor`` and normalised with ``image_mean``/``image_std``. With
    ``do_pan_and_scan`` an image whose aspect ratio is at least
    ``pan_and_scan_min_ratio_to_activate`` is followed by its crops, as ``Gemma3Processor``
    does; the defaults are those the processor passes.

    Returns:
      ``Gemma3Images`` with ``pixel_values`` ``[n, 3, height, width]`` float32 and ``num_crops``.
    """
    arrays = _load_images(images)
    mean = np.asarray(image_mean, np.float32)
    std = np.asarray(image_std, np.float32)
    if mean.shape != (3,) or std.shape != (3,):
        raise ValueError(
            f"image_mean and image_std need 3 values, got {mean.shape} and {std.shape}"
        )
    out, num_crops = [], []
    for arr in arrays:
        crops = (
            _pan_and_scan(
                arr,
                pan_and_scan_min_crop_size,
                pan_and_scan_max_num_crops,
                pan_and_scan_min_ratio_to_activate,
            )
            if do_pan_and_scan
            else []
        )
        num_crops.append(len(crops))
        for img in [arr, *crops]:
            x = pillow_resize(img, height, width, resample)
            x = _rescale(x, rescale_factor).transpose(2, 0, 1)
            x = ((x.T - mean) / std).T
            out.append(x)
    return Gemma3Images(pixel_values=np.stack(out).astype(np.float32), num_crops=num_crops)


def gemma3_image_sequence(
    mm_tokens_per_image: int = 256,
    boi_token: str = "<start_of_image>",
    eoi_token: str = "<end_of_image>",
    image_token: str = "<image_soft_token>",
) -> str:
    """The text one image becomes in a Gemma 3 prompt (as ``Gemma3Processor.full_image_sequence``)."""
    return f"\n\n{boi_token}{image_token * mm_tokens_per_image}{eoi_token}\n\n"


def expand_gemma3_image_text(
    text: str,
    num_images: int,
    num_crops: Sequence[int] | None = None,
    mm_tokens_per_image: int = 256,
    boi_token: str = "<start_of_image>",
    eoi_token: str = "<end_of_image>",
    image_token: str = "<image_soft_token>",
) -> str:
    """Replace each ``boi_token`` placeholder in ``text`` by its image's token run, as ``Gemma3Processor``.

    Args:
      text: a prompt with one ``boi_token`` per image (e.g. from the chat template).
      num_images: images given for this prompt; must equal the number of placeholders.
      num_crops: pan-and-scan crops per image (``Gemma3Images.num_crops``); None for none.
      mm_tokens_per_image: soft tokens per image (256 for the released models).
    """
    n_placeholders = text.count(boi_token)
    if n_placeholders != num_images:
        raise ValueError(
            f"the prompt has {n_placeholders} {boi_token} placeholder(s) but {num_images} image(s) were given; "
            "they must match"
        )
    crops = [0] * num_images if num_crops is None else list(num_crops)
    if len(crops) != num_images:
        raise ValueError(f"num_crops has {len(crops)} entries for {num_images} image(s)")
    seq = gemma3_image_sequence(mm_tokens_per_image, boi_token, eoi_token, image_token)
    pieces = text.split(boi_token)
    out = [pieces[0]]
    for i, piece in enumerate(pieces[1:]):
        if crops[i]:
            out.append(
                f"Here is the original image {seq} and here are some crops to help you see better "
                + " ".join([seq] * crops[i])
            )
        else:
            out.append(seq)
        out.append(piece)
    return "".join(out)


def expand_gemma3_image_ids(
    ids: Sequence[int],
    num_images: int,
    boi_id: int,
    eoi_id: int,
    image_id: int,
    mm_tokens_per_image: int = 256,
    newline_ids: Sequence[int] = (),
) -> list[int]:
    """Token-id form of the expansion: each ``boi_id`` becomes
    ``newline_ids + [boi_id] + [image_id] * mm_tokens_per_image + [eoi_id] + newline_ids``.

    ``newline_ids`` are the ids of ``"\\n\\n"`` (``[108]`` in Gemma's tokenizer). Tokenizing the
    expanded text (``expand_gemma3_image_text``) can merge these newlines with neighbouring
    ones; use the text form when the ids must equal ``Gemma3Processor``'s exactly.
    No pan-and-scan crops here.
    """
    ids = [int(i) for i in ids]
    n_placeholders = ids.count(boi_id)
    if n_placeholders != num_images:
        raise ValueError(
            f"the prompt has {n_placeholders} image placeholder id(s) ({boi_id}) but {num_images} image(s) "
            "were given; they must match"
        )
    block = [*newline_ids, boi_id, *([image_id] * mm_tokens_per_image), eoi_id, *newline_ids]
    out: list[int] = []
    for t in ids:
        out.extend(block if t == boi_id else [t])
    return out


# ---------------------------------------------------------------------------------------
# Gemma 4


class Gemma4Images(dict):
    """``pixel_values`` ``[n, max_patches, 3 * patch_size**2]`` float32 (patchified, zero padded),
    ``image_position_ids`` ``[n, max_patches, 2]`` int64 ((x, y) = (column, row); padding -1)
    and ``num_soft_tokens_per_image``."""

    @property
    def pixel_values(self) -> np.ndarray:
        return self["pixel_values"]

    @property
    def image_position_ids(self) -> np.ndarray:
        return self["image_position_ids"]

    @property
    def num_soft_tokens_per_image(self) -> list[int]:
        return self["num_soft_tokens_per_image"]


def gemma4_target_size(
    height: int,
    width: int,
    patch_size: int = 16,
    max_patches: int = 2520,
    pooling_kernel_size: int = 3,
) -> tuple[int, int]:
    """Gemma 4's aspect-preserving target size: the largest whose sides are multiples of
    ``pooling_kernel_size * patch_size`` with at most ``max_patches`` patches."""
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling_kernel_size * patch_size
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise ValueError(f"cannot resize a {height}x{width} image: both sides would round to 0")
    max_side = (max_patches // pooling_kernel_size**2) * side
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, max_side)
    elif tw == 0:
        tw, th = side, min(int(math.floor(height / width)) * side, max_side)
    if th * tw > target_px:
        raise ValueError(
            f"resizing {height}x{width} to {th}x{tw} exceeds {max_patches} patches of {patch_size}"
        )
    return th, tw


def preprocess_gemma4(
    images: Any,
    patch_size: int = 16,
    max_soft_tokens: int = 280,
    pooling_kernel_size: int = 3,
    resample: str = "bicubic",
    rescale_factor: float = 1 / 255,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> Gemma4Images:
    """Gemma 4's image preprocessing, equal to ``Gemma4ImageProcessorPil``.

    Each image is resized preserving its aspect ratio (Pillow bicubic; skipped when the
    size already fits), rescaled to [0, 1] (no normalisation unless ``image_mean``/``image_std``
    are given), cut into ``patch_size`` patches (row-major; each patch flattened as
    ``[row, col, channel]``) and zero padded to ``max_soft_tokens * pooling_kernel_size**2``
    patches; position ids are (column, row) per patch and (-1, -1) for padding.
    """
    if max_soft_tokens not in GEMMA4_SUPPORTED_SOFT_TOKENS:
        raise ValueError(
            f"max_soft_tokens must be one of {GEMMA4_SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens}"
        )
    arrays = _load_images(images)
    max_patches = max_soft_tokens * pooling_kernel_size**2
    pixel_values, positions, soft = [], [], []
    for arr in arrays:
        h, w = arr.shape[:2]
        th, tw = gemma4_target_size(h, w, patch_size, max_patches, pooling_kernel_size)
        if (th, tw) != (h, w):
            arr = pillow_resize(arr, th, tw, resample)
        x = _rescale(arr, rescale_factor)  # [H, W, C]
        if image_mean is not None or image_std is not None:
            mean = np.asarray(image_mean if image_mean is not None else (0.0,) * 3, np.float32)
            std = np.asarray(image_std if image_std is not None else (1.0,) * 3, np.float32)
            x = (x - mean) / std
        ph, pw = x.shape[0] // patch_size, x.shape[1] // patch_size
        patches = (
            x.reshape(ph, patch_size, pw, patch_size, 3)
            .transpose(0, 2, 1, 3, 4)
            .reshape(ph * pw, -1)
        )
        gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
        pos = np.stack([gx, gy], axis=-1).reshape(ph * pw, 2).astype(np.int64)
        soft.append(patches.shape[0] // pooling_kernel_size**2)
        pad = max_patches - patches.shape[0]
        if pad > 0:
            patches = np.pad(patches, [(0, pad), (0, 0)])
            pos = np.pad(pos, [(0, pad), (0, 0)], constant_values=-1)
        pixel_values.append(patches)
        positions.append(pos)
    return Gemma4Images(
        pixel_values=np.stack(pixel_values).astype(np.float32),
        image_position_ids=np.stack(positions),
        num_soft_tokens_per_image=soft,
    )
