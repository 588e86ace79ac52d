"""Gemma 3n's audio encoder (USM conformer) and its soft-token embedder against transformers
(float32), on a tiny random tower with every weight and norm scale perturbed: several
attention chunks, a frame count that is not a multiple of the chunk, padded frames."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from penzai import pz
from transformers.models.gemma3n import modeling_gemma3n as hf_gemma3n

from gemmalens.audio import gemma3n as audio
from gemmalens.checkpoints import CheckpointError
from gemmalens.layers.hooks import capture, hook_points, intervene
from gemmalens.layers.params import RandomInit, ShapeOnly
from tests import hf_reference as ref

TOLERANCE = 1e-5  # on max |diff| / max(1, max |reference|)
AUDIO = dict(
    vocab_size=8,
    vocab_offset=300,
    input_feat_size=16,  # frequency 16 -> 8 -> 4
    hidden_size=32,
    rms_norm_eps=1e-5,  # != the conformer norms' fixed 1e-6, so mixing them up shows
    gradient_clipping=2.5,  # small enough that the clamps act
    conf_attention_chunk_size=3,
    conf_attention_context_left=4,  # 3 frames back
    conf_attention_context_right=1,  # and 1 ahead (the released config has 0)
    conf_attention_logit_cap=4.0,
    conf_num_attention_heads=4,
    conf_num_hidden_layers=2,
    conf_conv_kernel_size=3,
    conf_reduction_factor=2,
    conf_residual_weight=0.7,
    sscp_conv_channel_size=(6, 4),
    sscp_conv_group_norm_eps=2e-3,
)
TEXT_WIDTH = 48
LAYERS = AUDIO["conf_num_hidden_layers"]
FRAMES = 37  # -> 19 -> 10 subsampled frames: chunks of 3 give 4, the last one short
REAL_FRAMES = (37, 22)  # row 1: the last 15 frames are padding
SEQ = 10
TOKENS = 5
BATCH = 2


def _hf_configs():
    audio_config = transformers.Gemma3nAudioConfig(**AUDIO)
    text_config = transformers.Gemma3nTextConfig(
        hidden_size=TEXT_WIDTH, vocab_size=320, vocab_size_per_layer_input=320
    )
    return audio_config, text_config


def _inputs():
    rng = np.random.RandomState(0)
    features = rng.normal(0, 1, (BATCH, FRAMES, AUDIO["input_feat_size"])).astype(np.float32)
    mask = np.arange(FRAMES)[None, :] < np.array(REAL_FRAMES)[:, None]  # True = real
    return features, mask


@pytest.fixture(scope="module")
def reference():
    """transformers' encoder and embedder, perturbed; their tensors under the names of a
    ``Gemma3nForConditionalGeneration``; the inputs; every reference value."""
    torch.manual_seed(0)
    audio_config, text_config = _hf_configs()
    encoder = transformers.Gemma3nAudioEncoder(audio_config).eval()
    embedder = hf_gemma3n.Gemma3nMultimodalEmbedder(audio_config, text_config).eval()
    ref.perturb_(encoder, seed=1)
    ref.perturb_(embedder, seed=2)
    arrays = {
        **{audio.HUB_AUDIO_PREFIX + k: v.numpy() for k, v in encoder.state_dict().items()},
        **{audio.HUB_EMBEDDER_PREFIX + k: v.numpy() for k, v in embedder.state_dict().items()},
    }
    features, mask = _inputs()

    seen: dict[str, np.ndarray] = {}

    def keep(name, fn=lambda out: out):
        def hook(module, args, output):
            seen[name] = fn(output).detach().numpy()

        return hook

    def keep_input(name):
        def hook(module, args):
            seen[name] = args[0].detach().numpy()

        return hook

    weight = AUDIO["conf_residual_weight"]

    def split(o):  # [batch, seq, heads * head_dim] -> [batch, seq, heads, head_dim]
        return o.reshape(*o.shape[:2], AUDIO["conf_num_attention_heads"], -1)

    sub = encoder.subsample_conv_projection
    for i, conv in enumerate((sub.conv_0, sub.conv_1)):
        conv.register_forward_hook(
            keep(f"audio.subsample.conv_{i}.hook_out", lambda o: o.permute(0, 2, 3, 1))
        )
    sub.register_forward_hook(keep("audio.hook_subsampled"))
    for i, block in enumerate(encoder.conformer):
        p = f"audio.blocks.{i}."
        block.register_forward_pre_hook(keep_input(p + "hook_resid_pre"))
        for part, module in (
            ("ffw_start", block.ffw_layer_start),
            ("ffw_end", block.ffw_layer_end),
        ):
            module.ffw_layer_1.register_forward_hook(keep(f"{p}{part}.hook_pre"))
            module.ffw_layer_1.register_forward_hook(
                keep(f"{p}{part}.hook_post", torch.nn.functional.silu)
            )
            module.post_layer_norm.register_forward_hook(
                keep(f"{p}{part}.hook_out", lambda o: o * weight)
            )
        block.ffw_layer_start.register_forward_hook(keep(p + "hook_resid_after_ffw_start"))
        attn = block.attention.attn

        def scaled_q(o, attn=attn):
            return split(o) * attn.q_scale * torch.nn.functional.softplus(attn.per_dim_scale)

        attn.q_proj.register_forward_hook(keep(p + "attn.hook_q", scaled_q))
        attn.k_proj.register_forward_hook(keep(p + "attn.hook_k", split))
        attn.v_proj.register_forward_hook(keep(p + "attn.hook_v", split))
        attn.register_forward_hook(keep(p + "attn.hook_z"))
        block.attention.post_norm.register_forward_hook(keep(p + "hook_attn_out"))
        block.attention.register_forward_hook(keep(p + "hook_resid_after_attn"))
        lconv = block.lconv1d
        lconv.linear_start.register_forward_hook(
            keep(p + "lconv.hook_glu", lambda o: torch.nn.functional.glu(o, dim=-1))
        )
        lconv.depthwise_conv1d.register_forward_hook(
            keep(p + "lconv.hook_conv", lambda o: o.permute(0, 2, 1))
        )
        lconv.linear_end.register_forward_hook(keep(p + "lconv.hook_out"))
        lconv.register_forward_hook(keep(p + "hook_resid_after_lconv"))
        block.ffw_layer_end.register_forward_hook(keep(p + "hook_resid_after_ffw_end"))
        block.register_forward_hook(keep(p + "hook_resid_post"))
    encoder.conformer[-1].register_forward_hook(keep("audio.hook_encoded"))
    embedder.soft_embedding_norm.register_forward_hook(keep("audio.hook_soft_emb_norm"))

    # The attention's scores and weights are not module outputs: record what the one
    # softmax of each attention layer takes and gives.
    softmax = torch.nn.functional.softmax
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def recording_softmax(x, *args, **kwargs):
        out = softmax(x, *args, **kwargs)
        calls.append((x.detach().numpy(), out.detach().numpy()))
        return out

    torch.nn.functional.softmax = recording_softmax
    try:
        with torch.no_grad():
            out = encoder(torch.as_tensor(features), torch.as_tensor(~mask))
            soft = embedder(inputs_embeds=out.last_hidden_state)
            ids = torch.tensor([[300, 307, 303], [301, 301, 306]])
            hard = embedder(input_ids=ids)
    finally:
        torch.nn.functional.softmax = softmax
    assert len(calls) == LAYERS
    for i, (scores, pattern) in enumerate(calls):
        seen[f"audio.blocks.{i}.attn.hook_attn_scores"] = scores
        seen[f"audio.blocks.{i}.attn.hook_pattern"] = pattern
    seen["audio.hook_soft_tokens"] = out.last_hidden_state.numpy()
    seen["audio.hook_projected"] = soft.numpy()
    extra = {
        "token_valid": ~out.audio_mel_mask.numpy(),
        "hard_ids": ids.numpy(),
        "hard": hard.numpy(),
    }
    return arrays, (features, mask), seen, extra


@pytest.fixture(scope="module")
def config():
    audio_config, text_config = _hf_configs()
    hf = transformers.Gemma3nConfig(
        audio_config=audio_config.to_dict(), text_config=text_config.to_dict()
    ).to_dict()
    return audio.Gemma3nAudioTowerConfig.from_hf(hf)


@pytest.fixture(scope="module")
def tower(reference, config):
    arrays, _, _, _ = reference
    return audio.from_state_dict(config, arrays)


def run_capturing(model, features, mask, names):
    """The output and ``{name: value}`` of one run capturing ``names``."""
    unbound, state = pz.unbind_state_vars(capture(model, set(names), "cache/"))
    out, new_state = unbound.stateless_call(
        [v.freeze() for v in state], features, input_features_mask=mask
    )
    return out, {v.label.removeprefix("cache/"): np.asarray(v.value) for v in new_state}


def _soft(out) -> np.ndarray:
    return np.asarray(out[0].unwrap("batch", "audio_token", "embedding"))


def test_config_from_hf(config):
    a = config.audio
    assert config.text_hidden_size == TEXT_WIDTH
    assert (a.hidden_size, a.head_dim, a.rms_norm_eps) == (32, 8, 1e-5)
    assert a.sscp_conv_kernel_size == ((3, 3), (3, 3))
    assert a.sscp_conv_channel_size == (6, 4)
    assert (a.max_past_horizon, a.max_future_horizon, a.context_size) == (3, 1, 7)
    assert a.freq_sizes == (16, 8, 4)
    assert (a.subsampled_frames(FRAMES), a.num_soft_tokens(FRAMES)) == (SEQ, TOKENS)
    # The released E2B / E4B tower.
    real = audio.Gemma3nAudioConfig.from_hf(transformers.Gemma3nAudioConfig().to_dict())
    assert real == audio.Gemma3nAudioConfig()
    assert real.num_soft_tokens(3000) == 188  # 30 s of audio


def test_encoder_and_soft_tokens_match_transformers(reference, tower):
    """Every hook point against transformers, all frames (padded ones included)."""
    _, (features, mask), expected, extra = reference
    names = [hp.name for hp in hook_points(tower)]
    assert set(expected) <= set(names)
    out, values = run_capturing(tower, features, mask, names)
    soft = _soft(out)
    assert soft.shape == (BATCH, TOKENS, TEXT_WIDTH)
    token_valid = np.asarray(out[1].unwrap("batch", "audio_token"))
    np.testing.assert_array_equal(token_valid, extra["token_valid"])
    assert token_valid.sum(axis=1).tolist() == [5, 3]  # padding in row 1 reaches the tokens

    rows = {"soft tokens (output)": (soft, expected["audio.hook_projected"])}
    for name, value in expected.items():
        got = values[name]
        assert got.shape == value.shape, (name, got.shape, value.shape)
        if name.endswith("hook_attn_scores"):
            # Masked scores are the most negative float on both sides; compare the rest.
            masked = value == np.finfo(np.float32).min
            np.testing.assert_array_equal(got == np.finfo(np.float32).min, masked)
            got, value = got[~masked], value[~masked]
        rows[name] = (got, value)
    print("\nmax |diff| vs transformers (scale = max(1, max |reference|)):")
    worst = 0.0
    for name, (got, value) in rows.items():
        diff = np.abs(got - value).max()
        scale = max(1.0, np.abs(value).max())
        worst = max(worst, diff / scale)
        print(f"  {name}: {diff:.2e} (scale {scale:.2f})")
    assert worst <= TOLERANCE
    # A wrong tower would not be within tolerance: the values are far from zero.
    assert np.abs(expected["audio.hook_projected"]).max() > 1000 * TOLERANCE
    # The clamps act (values beyond gradient_clipping reach them), so they are checked too.
    assert np.abs(expected["audio.blocks.0.hook_resid_after_ffw_start"]).max() > 2.5
    # Every row sees several chunks, the last one partly padding.
    assert values["audio.blocks.0.attn.hook_pattern"].shape == (BATCH, 4, 4, 3, 7)


def test_hard_tokens_match_transformers(reference, tower):
    _, _, _, extra = reference
    hard = np.asarray(
        tower.embedder.embed_ids(extra["hard_ids"]).unwrap("batch", "seq", "embedding")
    )
    diff = np.abs(hard - extra["hard"]).max()
    print(f"\nhard audio tokens: max |diff| {diff:.2e}")
    assert diff <= TOLERANCE * max(1.0, np.abs(extra["hard"]).max())
    with pytest.raises(ValueError, match=r"\[300, 308\)"):
        tower.embedder.embed_ids(np.array([[299, 300]]))


def test_hook_names_and_axes(reference, tower):
    _, (features, mask), _, _ = reference
    names = [hp.name for hp in hook_points(tower)]
    ffw = ["hook_pre", "hook_post", "hook_out"]
    per_block = [
        "hook_resid_pre",
        *[f"ffw_start.{n}" for n in ffw],
        "hook_resid_after_ffw_start",
        "attn.hook_q",
        "attn.hook_k",
        "attn.hook_v",
        "attn.hook_attn_scores",
        "attn.hook_pattern",
        "attn.hook_z",
        "hook_attn_out",
        "hook_resid_after_attn",
        "lconv.hook_glu",
        "lconv.hook_conv",
        "lconv.hook_out",
        "hook_resid_after_lconv",
        *[f"ffw_end.{n}" for n in ffw],
        "hook_resid_after_ffw_end",
        "hook_resid_post",
    ]
    assert names == [
        "audio.subsample.conv_0.hook_out",
        "audio.subsample.conv_1.hook_out",
        "audio.hook_subsampled",
        *[f"audio.blocks.{i}.{n}" for i in range(LAYERS) for n in per_block],
        "audio.hook_encoded",
        "audio.hook_soft_tokens",
        "audio.hook_soft_emb_norm",
        "audio.hook_projected",
    ]
    _, values = run_capturing(tower, features, mask, names)
    shapes = {name: values[name].shape for name in names}
    assert shapes["audio.subsample.conv_0.hook_out"] == (BATCH, 19, 8, 6)  # seq, freq, channel
    assert shapes["audio.blocks.0.attn.hook_q"] == (BATCH, SEQ, 4, 8)
    assert shapes["audio.blocks.1.ffw_end.hook_post"] == (BATCH, SEQ, 128)
    assert shapes["audio.blocks.1.lconv.hook_glu"] == (BATCH, SEQ, 32)
    assert shapes["audio.hook_encoded"] == (BATCH, SEQ, 32)
    assert shapes["audio.hook_soft_tokens"] == (BATCH, TOKENS, 32)
    # The residual algebra of a block, on real frames (padded ones are zeroed before lconv).
    b = "audio.blocks.1."
    resid = values[b + "hook_resid_pre"]
    for part in ("ffw_start.hook_out", "hook_attn_out", "lconv.hook_out", "ffw_end.hook_out"):
        resid = resid + values[b + part]
    np.testing.assert_allclose(
        values[b + "hook_resid_after_ffw_end"][0], resid[0], atol=1e-5, rtol=1e-5
    )
    # The dense pattern reproduces z, and rows of real queries sum to one.
    pattern = values[b + "attn.hook_pattern"]
    dense = np.asarray(audio.dense_pattern(pattern, audio.Gemma3nAudioConfig(**AUDIO), SEQ))
    assert dense.shape == (BATCH, 4, SEQ, SEQ)
    z = np.einsum("bnqk,bknh->bqnh", dense, values[b + "attn.hook_v"])
    np.testing.assert_allclose(z, values[b + "attn.hook_z"], atol=1e-5)
    np.testing.assert_allclose(dense[0].sum(-1), 1.0, atol=1e-5)
    # Query 4 sees frames 1..5 (3 back, 1 ahead) and nothing else.
    assert np.flatnonzero(dense[0, 0, 4]).tolist() == [1, 2, 3, 4, 5]


def test_interventions(reference, tower):
    _, (features, mask), _, _ = reference
    clean = _soft(tower(features, input_features_mask=mask))
    name = "audio.blocks.0.hook_resid_post"
    same = _soft(intervene(tower, {name: lambda v, n: v})(features, input_features_mask=mask))
    assert np.array_equal(same, clean)
    zeroed = intervene(tower, {name: lambda v, n: v * 0})
    changed = _soft(zeroed(features, input_features_mask=mask))
    assert np.abs(changed - clean).max() > 0.1
    # Patching a pattern reaches the output.
    uniform = intervene(
        tower, {"audio.blocks.1.attn.hook_pattern": lambda v, n: v * 0 + 1 / v.shape[-1]}
    )
    assert np.abs(_soft(uniform(features, input_features_mask=mask)) - clean).max() > 1e-3
    # Under jit too, with the mask given as 0/1 integers.
    jitted = jax.jit(
        lambda m, x, k: m(x, input_features_mask=k)[0].unwrap("batch", "audio_token", "embedding")
    )
    np.testing.assert_allclose(
        np.asarray(jitted(pz.freeze_params(tower), features, mask.astype(np.int32))),
        clean,
        atol=1e-5,
    )


def test_what_padding_reaches(reference, tower):
    """Padded tokens are zeros whatever the padded features hold; the first real tokens
    do not read the padding. (The last real ones do, in transformers too: the subsampling
    convolutions read frames ahead of the one whose flag a subsampled frame takes, and the
    right context reads one frame ahead per layer.)"""
    _, (features, mask), _, _ = reference
    soft, valid = tower(features, input_features_mask=mask)
    garbage = features.copy()
    garbage[1, REAL_FRAMES[1] :] = 100.0
    soft2, _ = tower(garbage, input_features_mask=mask)
    keep = np.asarray(valid.unwrap("batch", "audio_token"))
    a = np.asarray(soft.unwrap("batch", "audio_token", "embedding"))
    b = np.asarray(soft2.unwrap("batch", "audio_token", "embedding"))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1, 0], b[1, 0])
    np.testing.assert_array_equal(b[~keep], 0.0)


@pytest.mark.parametrize(
    "shape, mask_shape, words",
    [
        ((BATCH, FRAMES), None, ["[batch, frames, 16]", f"({BATCH}, {FRAMES})"]),
        ((BATCH, FRAMES, 12), None, ["12 mel", "input_feat_size 16"]),
        ((BATCH, FRAMES, 16), (BATCH, FRAMES - 1), ["input_features_mask", f"[{BATCH}, {FRAMES}]"]),
        ((BATCH, 0, 16), None, ["with frames"]),
    ],
)
def test_wrong_inputs_are_clear_errors(tower, shape, mask_shape, words):
    mask = None if mask_shape is None else np.ones(mask_shape, bool)
    with pytest.raises(ValueError) as error:
        tower(np.zeros(shape, np.float32), input_features_mask=mask)
    for word in words:
        assert word in str(error.value)


def test_named_inputs_must_have_the_feature_axes(tower):
    wrong = pz.nx.wrap(np.zeros((2, 9, 16), np.float32)).tag("batch", "time", "mel")
    with pytest.raises(ValueError, match="named axes"):
        tower(wrong)


def test_state_dict_names(reference, config):
    """Every label maps to a tensor of ``Gemma3nForConditionalGeneration`` (built on the meta
    device; its timm vision tower, not installed here, replaced by an empty module), and
    a missing or mis-shaped tensor is reported."""
    audio_config, text_config = _hf_configs()
    full = transformers.Gemma3nConfig(
        audio_config=audio_config.to_dict(), text_config=text_config.to_dict()
    )
    from_config = hf_gemma3n.AutoModel.from_config

    def no_timm(cfg, **kwargs):
        if isinstance(cfg, transformers.Gemma3nVisionConfig):
            return torch.nn.Module()
        return from_config(cfg, **kwargs)

    hf_gemma3n.AutoModel.from_config = no_timm
    try:
        with torch.device("meta"):
            model = transformers.Gemma3nForConditionalGeneration(full)
    finally:
        hf_gemma3n.AutoModel.from_config = from_config
    names = {
        k
        for k in model.state_dict()
        if k.startswith((audio.HUB_AUDIO_PREFIX, audio.HUB_EMBEDDER_PREFIX))
    }
    shapes = ShapeOnly()
    config.build(shapes)
    assert {audio.hf_name(r.label) for r in shapes.requests} == names
    assert audio.hf_name("audio.blocks.3.attn.pos_proj.weights") == (
        "model.audio_tower.conformer.3.attention.attn.relative_position_embedding.pos_proj.weight"
    )
    assert audio.hf_name("audio.blocks.0.lconv.depthwise_conv1d.weights") == (
        "model.audio_tower.conformer.0.lconv1d.depthwise_conv1d.weight"
    )

    arrays, _, _, _ = reference
    broken = dict(arrays)
    del broken["model.audio_tower.conformer.1.attention.attn.per_dim_scale"]
    broken["model.embed_audio.soft_embedding_norm.weight"] = np.zeros(7, np.float32)
    broken["model.language_model.norm.weight"] = np.zeros(3, np.float32)  # ignored
    with pytest.raises(CheckpointError) as error:
        audio.from_state_dict(config, broken)
    message = str(error.value)
    assert "per_dim_scale" in message and "soft_embedding_norm" in message


def test_parameter_counts(config):
    """The released E2B / E4B audio path (transformers' defaults; both use text width 2048)
    against transformers' modules built on the meta device."""
    audio_config, text_config = transformers.Gemma3nAudioConfig(), transformers.Gemma3nTextConfig()
    with torch.device("meta"):
        encoder = transformers.Gemma3nAudioEncoder(audio_config)
        embedder = hf_gemma3n.Gemma3nMultimodalEmbedder(audio_config, text_config)
    hf_encoder = sum(p.numel() for p in encoder.parameters())
    hf_embedder = sum(p.numel() for p in embedder.parameters())
    real = audio.Gemma3nAudioTowerConfig(
        audio.Gemma3nAudioConfig.from_hf(audio_config.to_dict()), text_config.hidden_size
    )
    shapes = ShapeOnly()
    real.build(shapes)
    ours_encoder = sum(r.size for r in shapes.requests if not r.label.startswith("audio.embed."))
    print(
        f"\nE2B/E4B audio encoder {ours_encoder:,}, embedder {real.num_params() - ours_encoder:,}"
    )
    assert ours_encoder == hf_encoder == 681_348_640  # ARCHITECTURES.md section 5
    assert real.num_params() == hf_encoder + hf_embedder
    # The tiny tower too.
    audio_config, text_config = _hf_configs()
    tiny = transformers.Gemma3nAudioEncoder(audio_config)
    tiny_embedder = hf_gemma3n.Gemma3nMultimodalEmbedder(audio_config, text_config)
    assert config.num_params() == sum(
        p.numel() for m in (tiny, tiny_embedder) for p in m.parameters()
    )


def test_random_tower_runs(config):
    model = config.build(RandomInit(seed=0))
    features, mask = _inputs()  # the shapes of the other tests: their compiled ops serve
    soft, valid = model(features, input_features_mask=mask)
    assert soft.named_shape == {"batch": BATCH, "audio_token": TOKENS, "embedding": TEXT_WIDTH}
    assert valid.named_shape == {"batch": BATCH, "audio_token": TOKENS}


@pytest.mark.parametrize("left, right, chunk, reduction", [(13, 0, 4, 4), (1, 0, 3, 3)])
def test_other_attention_contexts(left, right, chunk, reduction):
    """The released layout (no right context, 4x reduction) and a context without the
    past (``conf_attention_context_left = 1``): soft tokens against transformers."""
    torch.manual_seed(0)
    changes = dict(
        conf_attention_context_left=left,
        conf_attention_context_right=right,
        conf_attention_chunk_size=chunk,
        conf_reduction_factor=reduction,
        conf_num_hidden_layers=1,
    )
    audio_config, text_config = _hf_configs()
    audio_config = transformers.Gemma3nAudioConfig(**{**AUDIO, **changes})
    encoder = transformers.Gemma3nAudioEncoder(audio_config).eval()
    embedder = hf_gemma3n.Gemma3nMultimodalEmbedder(audio_config, text_config).eval()
    ref.perturb_(encoder, seed=3)
    ref.perturb_(embedder, seed=4)
    features, mask = _inputs()
    with torch.no_grad():
        out = encoder(torch.as_tensor(features), torch.as_tensor(~mask))
        expected = embedder(inputs_embeds=out.last_hidden_state).numpy()
    arrays = {
        **{k: v.numpy() for k, v in encoder.state_dict().items()},
        **{k: v.numpy() for k, v in embedder.state_dict().items()},
    }
    config = audio.Gemma3nAudioTowerConfig(
        audio.Gemma3nAudioConfig(**{**AUDIO, **changes}), TEXT_WIDTH
    )
    tower = audio.from_state_dict(config, arrays)  # bare modules: no prefixes, found as such
    soft, valid = tower(features, input_features_mask=mask)
    np.testing.assert_array_equal(
        np.asarray(valid.unwrap("batch", "audio_token")), ~out.audio_mel_mask.numpy()
    )
    diff = np.abs(_soft((soft, valid)) - expected).max()
    print(f"\ncontext left {left}, right {right}, chunk {chunk}: max |diff| {diff:.2e}")
    assert diff <= TOLERANCE * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(hidden_size=30), "multiple of"),
        (dict(sscp_conv_channel_size=[4, 4, 4]), "two entries"),
        (dict(sscp_conv_stride_size=[[2, 2]]), "two \\(time, frequency\\) pairs"),
        (dict(conf_attention_chunk_size=0), "chunk_size"),
        (dict(model_type="gemma4_audio"), "gemma3n_audio"),
    ],
)
def test_config_errors(changes, words):
    with pytest.raises(ValueError, match=words):
        audio.Gemma3nAudioConfig.from_hf({**AUDIO, **changes})
