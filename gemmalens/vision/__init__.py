"""The image path: preprocessing and prompt building (towers to come, issue 17)."""

from gemmalens.vision.preprocess import (
    GEMMA3_IMAGE_MEAN,
    GEMMA3_IMAGE_STD,
    Gemma3Images,
    Gemma4Images,
    expand_gemma3_image_ids,
    expand_gemma3_image_text,
    gemma3_image_sequence,
    gemma4_target_size,
    load_image,
    pillow_resize,
    preprocess_gemma3,
    preprocess_gemma4,
)

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
