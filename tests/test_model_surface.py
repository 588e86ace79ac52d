"""The public surface from DESIGN.md: presets, build, call, hooks, errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from penzai import pz

import gemmalens as gl
from gemmalens import lens
from gemmalens.layers import ApplyRoPE, AttentionMask, RMSNorm, TanhSoftCap
from gemmalens.testing import make_tiny_sentencepiece
from tests import hf_reference as ref

PUBLISHED_COUNTS = {
    "gemma3_270m": 268_098_176,
    "gemma3_1b": 999_885_952,
    "gemma3_4b_text": 3_880_099_328,
    "gemma3_12b_text": 11_765_788_416,
    "gemma3_27b_text": 27_009_002_240,
}


def tiny_config(**changes) -> gl.Gemma3Config:
    base = dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        layer_types=gl.Gemma3Config.default_layer_types(7),
        final_logit_softcapping=30.0,
    )
    return gl.Gemma3Config(**{**base, **changes})


@pytest.fixture(scope="module")
def model():
    return gl.build(tiny_config(), seed=0)


TOKENS = np.random.RandomState(0).randint(3, 256, (2, 10))


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_preset_parameter_counts(name):
    assert gl.preset(name).num_params() == PUBLISHED_COUNTS[name]


def test_presets_listed_and_unknown_preset():
    assert set(PUBLISHED_COUNTS) <= set(gl.presets())
    assert gl.presets() == sorted(gl.presets())
    with pytest.raises(KeyError, match="Did you mean gemma3_1b"):
        gl.preset("gemma3-1b")


def test_num_params_equals_built_model():
    config = tiny_config()
    built = gl.build(config)
    _, params = pz.unbind_params(built.model)
    assert sum(p.value.data_array.size for p in params) == config.num_params()


def test_seeded_build_is_deterministic():
    config = tiny_config()
    a, b, c = gl.build(config, seed=0), gl.build(config, seed=0), gl.build(config, seed=1)
    assert np.array_equal(a(TOKENS), b(TOKENS))
    assert not np.allclose(a(TOKENS), c(TOKENS))


def test_model_tree_shows_named_layers(model):
    config = model.config
    layers = config.num_hidden_layers
    # 4 residual norms + q_norm + k_norm per layer, then the final norm.
    assert pz.select(model.model).at_instances_of(RMSNorm).count() == 6 * layers + 1
    assert pz.select(model.model).at_instances_of(ApplyRoPE).count() == 2 * layers
    assert pz.select(model.model).at_instances_of(TanhSoftCap).count() == 1
    masks = list(pz.select(model.model).at_instances_of(AttentionMask).get_sequence())
    assert [m.window_before for m in masks] == [4, 4, 4, 4, 4, None, 4]
    text = treescope.render_to_text(model.model)
    assert "blocks.5" in text and "hook_resid_pre" in text


def test_hook_names_in_forward_order(model):
    names = model.hook_names
    assert names[0] == "hook_embed" and names[-1] == "ln_final.hook_normalized"
    block = [n for n in names if n.startswith("blocks.0.")]
    assert block == [
        "blocks.0.hook_resid_pre",
        "blocks.0.attn.hook_q",
        "blocks.0.attn.hook_k",
        "blocks.0.attn.hook_v",
        "blocks.0.attn.hook_attn_scores",
        "blocks.0.attn.hook_pattern",
        "blocks.0.attn.hook_z",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_resid_mid",
        "blocks.0.mlp.hook_pre",
        "blocks.0.mlp.hook_pre_linear",
        "blocks.0.mlp.hook_post",
        "blocks.0.hook_mlp_out",
        "blocks.0.hook_resid_post",
    ]


def test_cache_shapes_and_selection(model):
    logits, cache = model.run_with_cache(TOKENS, names=["hook_embed", "blocks.*.attn.hook_pattern"])
    assert logits.shape == (2, 10, 256)
    assert list(cache) == ["hook_embed"] + [f"blocks.{i}.attn.hook_pattern" for i in range(7)]
    assert cache["hook_embed"].shape == (2, 10, 32)
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, 4, 10, 10)
    _, by_predicate = model.run_with_cache(TOKENS, names=lambda n: n.endswith("hook_k"))
    assert by_predicate["blocks.3.attn.hook_k"].shape == (2, 10, 2, 8)
    assert len(by_predicate) == 7


def test_sliding_window_pattern_edges(model):
    _, cache = model.run_with_cache(TOKENS[:1], names="blocks.*.attn.hook_pattern")
    local = np.asarray(cache["blocks.0.attn.hook_pattern"][0, 0])
    glob = np.asarray(cache["blocks.5.attn.hook_pattern"][0, 0])
    q, k = np.indices(local.shape)
    # W = 4 keys including the query itself; the global layer sees every earlier key.
    assert np.all(local[(q - k >= 4) | (k > q)] == 0) and np.all(local[(q - k < 4) & (k <= q)] > 0)
    assert np.all(glob[k > q] == 0) and np.all(glob[k <= q] > 0)


def test_plain_call_does_not_retrace(model):
    model(TOKENS)
    before = lens._run_distinct._cache_size()
    model(TOKENS + 1)
    model(np.asarray(TOKENS, np.int64))
    assert lens._run_distinct._cache_size() == before


def test_hooks_replace_values(model):
    clean = model(TOKENS)
    kept = model.run_with_hooks(TOKENS, hooks={"blocks.2.hook_resid_post": lambda v, name: None})
    zeroed = model.run_with_hooks(TOKENS, hooks={"blocks.2.hook_resid_post": lambda v, name: v * 0})
    assert np.array_equal(clean, kept)
    assert np.abs(zeroed - clean).max() > 1e-3
    with model.hooks({"blocks.*.hook_resid_post": lambda v, name: v * 0}):
        inside = model(TOKENS)
    assert np.abs(inside - clean).max() > 1e-3
    assert np.array_equal(model(TOKENS), clean)


def test_to_tokens_takes_text_only():
    model = gl.teaching_model("gemma3")
    with pytest.raises(TypeError, match="to_tokens encodes text.*got 3. Token ids need no"):
        model.to_tokens(3)
    with pytest.raises(TypeError, match=r"got \['a', 2\]"):
        model.to_tokens(["a", 2])
    assert model.to_tokens(t for t in ("a b", "c"))[0].shape[0] == 2


def test_unknown_hook_name_suggests_nearest(model):
    with pytest.raises(KeyError, match="Did you mean: blocks.1.hook_resid_post"):
        model.run_with_cache(TOKENS, names="blocks.1.hook_resid_pos")
    with pytest.raises(KeyError, match="attn.hook_pattern"):
        model.run_with_hooks(TOKENS, hooks={"blocks.0.attn.pattern": lambda v, n: v})
    # A pattern that matches nothing is answered with patterns (layer numbers as '*').
    with pytest.raises(
        KeyError, match=r"pattern 'blocks.\*.hook_resid_pos' matches no .* blocks.\*.hook_resid_pos"
    ):
        model.run_with_cache(TOKENS, names="blocks.*.hook_resid_pos")


@pytest.mark.parametrize(
    "name, says",
    [
        ("blocks.0.altup.hook_predictions", "AltUp's hook points belong to Gemma 3n; this gemma3"),
        ("blocks.*.moe.hook_router_logits", "belong to Gemma 4 26B-A4B; this gemma3 model has"),
        ("encoder.blocks.0.hook_resid_post", "belong to T5Gemma 2; this gemma3 model has none"),
        ("vision.hook_pooled", r"without a vision tower; gl.load\(path, vision=True\) builds"),
        ("audio.hook_out", r"without an audio tower; gl.load\(path, audio=True\) builds"),
    ],
)
def test_hook_name_of_another_family_or_tower_says_whose_it_is(model, name, says):
    with pytest.raises(KeyError, match=says) as raised:
        model.run_with_cache(TOKENS, names=name)
    assert "Did you mean" not in str(raised.value)  # near names of this model mislead here


def test_hook_name_of_its_own_family_part_still_suggests_nearest():
    gemma3n = gl.teaching_model("gemma3n")
    with pytest.raises(KeyError, match="Did you mean: blocks.0.altup.hook_predictions"):
        gemma3n.run_with_cache(TOKENS, names="blocks.0.altup.hook_prediction")


def test_hook_returning_wrong_shape_or_dtype(model):
    with pytest.raises(ValueError, match=r"blocks.0.hook_resid_pre.*returned shape \(2, 10\)"):
        model.run_with_hooks(TOKENS, hooks={"blocks.0.hook_resid_pre": lambda v, n: v[..., 0]})
    with pytest.raises(ValueError, match="returned dtype bfloat16, expected float32"):
        model.run_with_hooks(
            TOKENS, hooks={"blocks.0.hook_resid_pre": lambda v, n: v.astype(jnp.bfloat16)}
        )


@pytest.mark.parametrize(
    "tokens, message",
    [
        (np.arange(5), r"expects \[batch, seq\].*tokens\[None\]"),
        (np.ones((1, 4), np.float32), "integer ids"),
        (
            np.array([[5, 300, 7]]),
            r"Token id 300 at position \(0, 1\) is outside the vocabulary \[0, 256\)",
        ),
        (np.array([[5, -1, 7]]), "outside the vocabulary"),
    ],
)
def test_bad_tokens(model, tokens, message):
    with pytest.raises((ValueError, TypeError), match=message):
        model(tokens)


def test_attention_mask_shape_mismatch(model):
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(TOKENS, attention_mask=np.ones((2, 3)))


def test_text_needs_a_tokenizer(model):
    with pytest.raises(ValueError, match="no tokenizer"):
        model("hello")
    with pytest.raises(ValueError, match="contains tokenizer.model"):
        model.generate("hello", max_new_tokens=2)


def test_checkpoint_with_tokenizer(tmp_path):
    make_tiny_sentencepiece(tmp_path)
    tokenizer = gl.Tokenizer.from_file(tmp_path / "tokenizer.model")
    ref.gemma3_text(tmp_path, vocab_size=tokenizer.vocab_size)
    model = gl.load(tmp_path)
    assert model.tokenizer.vocab_size == tokenizer.vocab_size
    logits = model(["The cat sat on the mat.", "Hi"])
    ids = tokenizer.encode("Hi")
    assert logits.shape[0] == 2 and logits.shape[-1] == tokenizer.vocab_size
    np.testing.assert_allclose(logits[1, : len(ids)], model([ids])[0], atol=1e-5)
    chat = tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    assert chat[0] == tokenizer.bos_id and tokenizer.start_of_turn_id in chat
