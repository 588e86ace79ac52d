"""Image preprocessing and Gemma 3 prompt building against transformers' PIL/numpy processors."""

import numpy as np
import PIL.Image
import pytest
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.gemma3.processing_gemma3 import Gemma3Processor
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from gemmalens.vision import (
    expand_gemma3_image_ids,
    expand_gemma3_image_text,
    gemma3_image_sequence,
    load_image,
    pillow_resize,
    preprocess_gemma3,
    preprocess_gemma4,
)

TOL = 1e-5  # Both resize with Pillow on uint8, so the float results agree to the bit.


def _smooth(h, w, c, seed):
    """A smooth-plus-noise uint8 image, so resampling sees structure and edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (k + 3) + yy * (7 - k)) % 256 for k in range(c)], axis=-1)
    return np.clip(base + rng.integers(-40, 40, (h, w, c)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images():
    rgb_wide = PIL.Image.fromarray(_smooth(120, 410, 3, 0))  # landscape, > 3:1
    gray_tall = PIL.Image.fromarray(_smooth(333, 97, 1, 1)[..., 0], mode="L")  # portrait grayscale
    rgba = _smooth(64, 64, 4, 2)
    rgba[..., 3] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]
    rgba_pil = PIL.Image.fromarray(rgba, mode="RGBA")
    square_arr = _smooth(900, 900, 3, 3)  # numpy HWC, near the target size
    return [rgb_wide, gray_tall, rgba_pil, square_arr]


def _hf_gemma3(**kw):
    return Gemma3ImageProcessorPil(
        size={"height": kw.pop("h", 896), "width": kw.pop("w", 896)},
        resample=PIL.Image.Resampling.BILINEAR,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        **kw,
    )


def test_pillow_resize_matches_pillow():
    a = _smooth(37, 91, 3, 4)
    for kind, flag in [("bilinear", PIL.Image.BILINEAR), ("bicubic", PIL.Image.BICUBIC)]:
        for oh, ow in [(200, 64), (12, 300), (37, 91), (5, 5)]:
            ref = np.array(PIL.Image.fromarray(a).resize((ow, oh), flag))
            np.testing.assert_array_equal(pillow_resize(a, oh, ow, kind), ref)


def test_gemma3_matches_transformers(images):
    ref = _hf_gemma3()(images, return_tensors="np")["pixel_values"]
    ours = preprocess_gemma3(images)
    assert ours.pixel_values.shape == (4, 3, 896, 896) == ref.shape
    assert ours.pixel_values.dtype == np.float32
    assert np.abs(ours.pixel_values - ref).max() <= TOL
    assert ours.num_crops == [0, 0, 0, 0]


def test_gemma3_pan_and_scan_matches_transformers(images):
    pas = dict(
        do_pan_and_scan=True,
        pan_and_scan_min_crop_size=32,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    out = _hf_gemma3(h=56, w=56)(images, return_tensors="np", **pas)
    ours = preprocess_gemma3(images, height=56, width=56, **pas)
    assert ours.num_crops == list(out["num_crops"]) and sum(ours.num_crops) > 0
    assert ours.pixel_values.shape == out["pixel_values"].shape
    assert np.abs(ours.pixel_values - out["pixel_values"]).max() <= TOL


def test_gemma3_paths_and_arrays(tmp_path, images):
    path = tmp_path / "wide.png"
    images[0].save(path)
    a = preprocess_gemma3(str(path), height=64, width=64).pixel_values
    b = preprocess_gemma3(np.array(images[0]), height=64, width=64).pixel_values
    c = preprocess_gemma3(
        np.array(images[0]).astype(np.float32) / 255, height=64, width=64
    ).pixel_values
    np.testing.assert_array_equal(a, b)
    assert (
        np.abs(a - b).max() == 0 and np.abs(c - a).max() <= 2 / 255 * 2
    )  # float -> uint8 truncates
    # Arrays with 1 channel, 2-D grayscale and numpy RGBA follow transformers' numpy path.
    gray = np.array(images[1])
    rgba = np.array(images[2])
    for arr in [gray, gray[..., None], rgba]:
        ref = _hf_gemma3(h=64, w=64)(arr if arr.ndim == 3 else arr[..., None], return_tensors="np")
        assert (
            np.abs(
                preprocess_gemma3(arr, height=64, width=64).pixel_values - ref["pixel_values"]
            ).max()
            <= TOL
        )


def test_gemma4_matches_transformers(images):
    proc = Gemma4ImageProcessorPil()
    for imgs in [images, [images[3]], [PIL.Image.fromarray(_smooth(48, 48 * 4, 3, 5))]]:
        ref = proc(imgs, return_tensors="np")
        ours = preprocess_gemma4(imgs)
        assert ours.pixel_values.shape == ref["pixel_values"].shape
        assert np.abs(ours.pixel_values - ref["pixel_values"]).max() <= TOL
        np.testing.assert_array_equal(ours.image_position_ids, ref["image_position_ids"])
        assert ours.num_soft_tokens_per_image == list(ref["num_soft_tokens_per_image"])
    # A smaller budget changes the resize target.
    ref = proc(images[:2], return_tensors="np", max_soft_tokens=70)
    ours = preprocess_gemma4(images[:2], max_soft_tokens=70)
    assert np.abs(ours.pixel_values - ref["pixel_values"]).max() <= TOL
    np.testing.assert_array_equal(ours.image_position_ids, ref["image_position_ids"])


class _Tok:
    boi_token, eoi_token, image_token = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
    boi_token_id, image_token_id = 255999, 262144


def _hf_processor(n):
    p = Gemma3Processor.__new__(Gemma3Processor)
    try:
        Gemma3Processor.__init__(p, _hf_gemma3(), _Tok(), image_seq_length=n)
    except Exception:  # full_image_sequence is set before the base class validates
        pass
    return p


def test_gemma3_prompt_text_matches_processor():
    p = _hf_processor(5)
    assert gemma3_image_sequence(5) == p.full_image_sequence
    text = "<start_of_turn>user\nA<start_of_image>B<start_of_image><end_of_turn>"
    expected = (
        "<start_of_turn>user\nA"
        + p.replace_image_token({"num_crops": [0, 2]}, 0)
        + "B"
        + p.replace_image_token({"num_crops": [0, 2]}, 1)
        + "<end_of_turn>"
    )
    assert expand_gemma3_image_text(text, 2, num_crops=[0, 2], mm_tokens_per_image=5) == expected


def test_gemma3_prompt_ids():
    ids = [2, 10, 7, 11, 7]
    out = expand_gemma3_image_ids(
        ids, 2, boi_id=7, eoi_id=8, image_id=9, mm_tokens_per_image=3, newline_ids=[108]
    )
    block = [108, 7, 9, 9, 9, 8, 108]
    assert out == [2, 10, *block, 11, *block]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="4 placeholder|2 <start_of_image> placeholder"):
        expand_gemma3_image_text("<start_of_image><start_of_image>", 1)
    with pytest.raises(ValueError, match="0 <start_of_image> placeholder.*1 image"):
        expand_gemma3_image_text("no image here", 1)
    with pytest.raises(ValueError, match="1 image placeholder id.*0 image"):
        expand_gemma3_image_ids([1, 7], 0, boi_id=7, eoi_id=8, image_id=9)
    with pytest.raises(ValueError, match="list of images is empty"):
        preprocess_gemma3([])
    with pytest.raises(ValueError, match="has 2 channels"):
        preprocess_gemma3(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="has 5 channels"):
        preprocess_gemma4(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\[H, W\] or \[H, W, C\]"):
        load_image(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(TypeError, match="file path, a PIL.Image.Image or a numpy array"):
        preprocess_gemma3(42)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="could not decode"):
        load_image(bad)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        load_image(np.full((4, 4, 3), 1.5, np.float32))
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        preprocess_gemma4(np.zeros((8, 8, 3), np.uint8), max_soft_tokens=100)
