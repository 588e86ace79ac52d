"""Gemma 3n's MobileNetV5 image encoder against timm's ``mobilenetv5_300m_enc`` (float32,
every weight perturbed; MobileNetV5 has no BatchNorm: every norm is an RMS norm, whose
weights are perturbed too) and its soft tokens against transformers'
``Gemma3nMultimodalEmbedder``.

The architecture is the released one, block for block (84 blocks, 14 + 19 attention
blocks), made small through timm's model arguments: ``channel_multiplier=0.05`` (every
block's channels / 20; the 64-channel stem and the 2048-wide fusion output stay) and
``msfa_output_resolution=2``, on 64x64 images: the fused 4x4 grid is average-pooled to
2x2, four soft tokens per image (the released 768-pixel images take the same path: 48x48
pooled to 16x16). timm is imported through `tests.torchvision_shim`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from penzai import pz
from transformers.models.gemma3n import modeling_gemma3n as hf_gemma3n

from gemmalens.audio.merge import Gemma3nVisionEmbedderConfig
from gemmalens.layers.hooks import hook_points, intervene
from gemmalens.layers.params import RandomInit
from gemmalens.vision import mobilenetv5 as mnv5
from tests import hf_reference as ref

try:
    from tests.torchvision_shim import import_timm

    timm = import_timm()
except ImportError:  # pragma: no cover
    pytest.skip(
        "timm is not installed (the test command installs it: pip install --no-deps timm==1.0.31)",
        allow_module_level=True,
    )

TOLERANCE = 1e-5  # relative to the largest magnitude of each compared value
MODEL_ARGS = {"channel_multiplier": 0.05, "msfa_output_resolution": 2}
SIZE = 64
TEXT_WIDTH = 32


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    tower = timm.create_model("mobilenetv5_300m_enc", **MODEL_ARGS).eval()
    vision = transformers.Gemma3nVisionConfig(model_args=MODEL_ARGS, rms_norm_eps=1e-5)
    text = transformers.Gemma3nTextConfig(hidden_size=TEXT_WIDTH)
    embedder = hf_gemma3n.Gemma3nMultimodalEmbedder(vision, text).eval()
    ref.perturb_(tower, seed=0)
    ref.perturb_(embedder, seed=1)
    return tower, embedder, vision


@pytest.fixture(scope="module")
def pixels():
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (2, 3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def config(reference):
    _, _, vision = reference
    return mnv5.MobileNetV5Config.from_hf(vision.to_dict())


@pytest.fixture(scope="module")
def ours(reference, config):
    tower, embedder, vision = reference
    arrays = {k: v.numpy() for k, v in tower.state_dict().items()}
    encoder = mnv5.from_state_dict(config, arrays)
    embedder_config = Gemma3nVisionEmbedderConfig.from_hf(
        {"vision_config": vision.to_dict(), "text_config": {"hidden_size": TEXT_WIDTH}}
    )
    soft = embedder_config.build(_Arrays(embedder.state_dict()))
    return encoder, soft


class _Arrays(RandomInit):
    """A parameter source reading ``embed_vision.*`` labels from a torch state dict."""

    def __init__(self, state):
        super().__init__()
        self.state = {k: v.numpy() for k, v in state.items()}

    def __call__(self, request):
        import re

        from gemmalens.layers.params import from_numpy

        name = re.sub(r"\.(weights|scale|embeddings)$", ".weight", request.label)
        return from_numpy(request, self.state[name.removeprefix("embed_vision.")], self.dtype)


def _run(encoder, soft, pixels, keep=(), fns=None):
    """(fused [image, channel, h, w], soft tokens [image, token, d], {hook: value})."""

    def forward(encoder, soft, x):
        store = {}

        def keep_fn(value, name):
            store[name] = value

        model = intervene(encoder, {**{n: keep_fn for n in keep}, **(fns or {})})
        fused = model(pz.nx.wrap(x).tag(*mnv5.PIXEL_AXES))
        tokens = mnv5.tokens_from_fused(fused, fused.named_shape["channel"])
        out = soft.embed_soft(tokens)
        return (
            fused.unwrap(*mnv5.PIXEL_AXES),
            out.unwrap("batch", "image_token", "embedding"),
            store,
        )

    return pz.variable_jit(forward)(encoder, soft, pixels)


@pytest.fixture(scope="module")
def run(ours, pixels):
    encoder, soft = ours
    stages = mnv5.stage_outputs([hp.name for hp in hook_points(encoder)])
    names = ["vision.conv_stem.hook_out", *stages, "vision.stages.2.blocks.9.attn.hook_pattern"]
    return _run(encoder, soft, pixels, keep=names)


def _relative(actual, expected) -> float:
    expected = np.asarray(expected)
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def test_parameter_count(reference, config):
    tower, _, _ = reference
    assert config.num_params() == sum(p.numel() for p in tower.parameters())
    # The released tower, as timm builds it (on the meta device: nothing allocated).
    # keras-hub's preset metadata states 294 284 096, 157 184 more than timm's tower.
    with torch.device("meta"):
        full = timm.create_model("mobilenetv5_300m_enc")
    count = sum(p.numel() for p in full.parameters())
    assert mnv5.MobileNetV5Config().num_params() == count == 294_126_912


def test_stages_fused_and_soft_tokens_match(reference, run, pixels):
    tower, embedder, vision = reference
    fused, soft, store = run
    x = torch.as_tensor(pixels)
    with torch.no_grad():
        expected = [tower.conv_stem(x)]
        for stage in tower.blocks:
            expected.append(stage(expected[-1]))
        theirs_fused = tower(x)
        tokens = theirs_fused.reshape(2, vision.hidden_size, -1).permute(0, 2, 1)
        theirs_soft = embedder(inputs_embeds=tokens * vision.hidden_size**0.5)
    names = ["vision.conv_stem.hook_out"] + [f"vision.stages.{j}.blocks.{k}.hook_out" for j, k in (
        (0, 2), (1, 4), (2, 36), (3, 38))]  # fmt: skip
    diffs = {n: _relative(store[n], e.numpy()) for n, e in zip(names, expected)}
    fused_diff = _relative(fused, theirs_fused.numpy())
    soft_diff = _relative(soft, theirs_soft.numpy())
    print(
        "\nstem and stage outputs (max |diff| / max |value|): "
        + ", ".join(f"{d:.1e}" for d in diffs.values())
        + f"; fused {fused_diff:.1e} (scale {np.abs(theirs_fused.numpy()).max():.2f}); "
        f"soft tokens {soft_diff:.1e} (scale {np.abs(theirs_soft.numpy()).max():.2f})"
    )
    assert max(diffs.values()) <= TOLERANCE and fused_diff <= TOLERANCE
    assert soft_diff <= TOLERANCE
    assert soft.shape == (2, 4, TEXT_WIDTH)
    # Negative control: the images swapped are far off.
    assert _relative(fused[::-1], theirs_fused.numpy()) > 0.1


def test_hooks_capture_and_intervene(ours, run, pixels):
    encoder, soft = ours
    fused, soft_tokens, store = run
    pattern = np.asarray(store["vision.stages.2.blocks.9.attn.hook_pattern"])
    # 64 px -> 4x4 queries at stage 2, keys on the 2x2 grid (kv stride 2), 12 heads.
    assert pattern.shape == (2, 12, 16, 4)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
    names = [hp.name for hp in hook_points(encoder)]
    assert names[0] == "vision.conv_stem.hook_out" and names[-1] == "vision.hook_fused"
    assert sum(n.endswith("attn.hook_pattern") for n in names) == 14 + 19
    # Uniform attention in one block changes the output (the captures above ran the
    # identity hook and matched timm).
    uniform = lambda value, name: value * 0 + 0.25  # noqa: E731
    name = "vision.stages.3.blocks.1.attn.hook_pattern"
    patched, _, _ = _run(encoder, soft, pixels, fns={name: uniform})
    assert np.abs(np.asarray(patched) - np.asarray(fused)).max() > 1e-3


def test_bad_pixels(config):
    with pytest.raises(ValueError, match=r"multiple of 32 pixels.*got shape \(1, 3, 60, 60\)"):
        mnv5.pixel_array(np.zeros((1, 3, 60, 60), np.float32), config)
    with pytest.raises(ValueError, match=r"pixel_values\[None\]"):
        mnv5.pixel_array(np.zeros((3, 64, 64), np.float32), config)
    with pytest.raises(ValueError, match="channels first"):
        mnv5.pixel_array(np.zeros((1, 64, 64, 3), np.float32), config)
    with pytest.raises(TypeError, match="floats"):
        mnv5.pixel_array(np.zeros((1, 3, 64, 64), np.uint8), config)
    assert mnv5.pixel_array({"pixel_values": np.zeros((1, 3, 64, 64))}, config).shape == (
        1,
        3,
        64,
        64,
    )


def test_config_checks():
    with pytest.raises(ValueError, match="mobilenetv5_300m_enc"):
        mnv5.MobileNetV5Config.from_hf({"architecture": "resnet50"})
    with pytest.raises(ValueError, match="model_args.*drop_rate"):
        mnv5.MobileNetV5Config.from_hf({"model_args": {"drop_rate": 0.1}})
    with pytest.raises(ValueError, match="not supported"):
        mnv5.MobileNetV5Config(stages=(("uir_r1_a3_k5_s2_e6_c256_se0.25",),))
    assert mnv5.hf_name("vision.stages.2.blocks.9.attn.key.proj.kernel") == (
        "model.vision_tower.timm_model.blocks.2.9.attn.key.proj.weight"
    )
