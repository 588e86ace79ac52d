"""Hook values against transformers, and the ActivationCache analyses (exact identities)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from penzai import pz

import gemmalens as gl
from gemmalens.layers import TanhSoftCap, TiedUnembed
from tests import hf_reference as ref

TOLERANCE = 1e-5
LAYERS = 7  # sliding layers 0-4 and 6, global layer 5
TOKENS = np.random.RandomState(1).randint(3, 256, (2, 9))  # longer than the window (4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A perturbed transformers model without soft-cap, its gemmalens twin, and a cache."""
    directory = tmp_path_factory.mktemp("gemma3_nocap")
    hf_model = ref.gemma3_text(directory, final_logit_softcapping=None)
    model = gl.load(directory)
    logits, cache = model.run_with_cache(TOKENS)
    return hf_model, model, np.asarray(logits), cache


def _hf_outputs(hf_model):
    with torch.no_grad():
        out = hf_model(
            input_ids=torch.as_tensor(TOKENS),
            output_hidden_states=True,
            output_attentions=True,
        )
    return out


def test_hooks_match_transformers_hidden_states_and_attentions(reference):
    hf_model, model, logits, cache = reference
    out = _hf_outputs(hf_model)
    hidden = [h.numpy() for h in out.hidden_states]
    assert len(hidden) == LAYERS + 1
    np.testing.assert_allclose(cache["hook_embed"], hidden[0], atol=TOLERANCE)
    for i in range(LAYERS - 1):
        np.testing.assert_allclose(
            cache[f"blocks.{i}.hook_resid_post"], hidden[i + 1], atol=TOLERANCE, err_msg=str(i)
        )
    # transformers 5 replaces the last entry with the output of the final norm.
    np.testing.assert_allclose(cache["ln_final.hook_normalized"], hidden[LAYERS], atol=TOLERANCE)
    assert np.abs(cache[f"blocks.{LAYERS - 1}.hook_resid_post"] - hidden[LAYERS]).max() > 0.1
    for i in range(LAYERS):
        np.testing.assert_allclose(
            cache[f"blocks.{i}.attn.hook_pattern"],
            out.attentions[i].numpy(),
            atol=TOLERANCE,
            err_msg=str(i),
        )
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=1e-4)


def test_short_names_and_final_scale(reference):
    _, model, _, cache = reference
    assert cache["resid_pre", 3] is cache["blocks.3.hook_resid_pre"]
    assert cache["pattern", 5].shape == (2, 4, 9, 9)
    assert cache["ln_final.hook_scale"].shape == (2, 9, 1)
    resid = np.asarray(cache[f"blocks.{LAYERS - 1}.hook_resid_post"], np.float64)
    rms = np.sqrt((resid**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(cache.final_scale(), rms, rtol=1e-5)
    # Without the captured scale, the same divisor is recomputed from the residual.
    partial = gl.ActivationCache({f"blocks.{LAYERS - 1}.hook_resid_post": resid}, model)
    np.testing.assert_allclose(partial.final_scale(), rms, rtol=1e-5)
    with pytest.raises(KeyError, match="hook_embed"):
        partial.accumulated_resid()


def test_accumulated_resid(reference):
    _, _, _, cache = reference
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert stack.shape == (LAYERS + 1, 2, 9, 64)
    assert labels[0] == "hook_embed" and labels[-1] == f"blocks.{LAYERS - 1}.hook_resid_post"
    for i in range(LAYERS):
        np.testing.assert_array_equal(stack[i], cache[f"blocks.{i}.hook_resid_pre"])
    upto3 = cache.accumulated_resid(layer=3, pos_slice=-1)
    assert upto3.shape == (4, 2, 64)
    np.testing.assert_array_equal(upto3[-1], cache["blocks.2.hook_resid_post"][:, -1])
    normed = cache.accumulated_resid(apply_ln=True)
    np.testing.assert_allclose(normed[-1], cache["ln_final.hook_normalized"], atol=TOLERANCE)


def test_decompose_resid_sums_to_final_residual(reference):
    _, _, _, cache = reference
    parts, labels = cache.decompose_resid(return_labels=True)
    assert parts.shape == (1 + 2 * LAYERS, 2, 9, 64)
    assert labels[:3] == ["hook_embed", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]
    final = cache[f"blocks.{LAYERS - 1}.hook_resid_post"]
    np.testing.assert_allclose(parts.sum(0), final, atol=1e-4 * np.abs(final).max())
    np.testing.assert_allclose(
        cache.decompose_resid(layer=2).sum(0), cache["blocks.2.hook_resid_pre"], atol=1e-5
    )
    assert cache.decompose_resid(mode="mlp", incl_embeds=False).shape[0] == LAYERS


def test_head_results_sum_to_attention_output(reference):
    _, _, _, cache = reference
    for layer in (0, 5):
        heads = cache.head_results(layer)
        assert heads.shape == (2, 9, 4, 64)
        np.testing.assert_allclose(
            heads.sum(2), cache[f"blocks.{layer}.hook_attn_out"], atol=TOLERANCE
        )
    stack, labels = cache.stack_head_results(return_labels=True)
    assert stack.shape == (4 * LAYERS, 2, 9, 64) and labels[5] == "L1H1"
    # Heads in place of attention outputs still decompose the residual stream exactly.
    mlps = cache.decompose_resid(mode="mlp", incl_embeds=False)
    total = stack.sum(0) + mlps.sum(0) + cache["hook_embed"]
    np.testing.assert_allclose(total, cache[f"blocks.{LAYERS - 1}.hook_resid_post"], atol=1e-4)


def test_direct_logit_attribution_sums_to_logit_difference(reference):
    _, _, logits, cache = reference
    parts = cache.decompose_resid()
    correct, wrong = TOKENS[:, -1], np.array([7, 11])
    attrs = cache.logit_attrs(parts, correct, wrong)  # last position by default
    assert attrs.shape == (1 + 2 * LAYERS, 2)
    rows = np.arange(2)
    expected = logits[rows, -1, correct] - logits[rows, -1, wrong]
    np.testing.assert_allclose(attrs.sum(0), expected, atol=1e-4)
    assert np.abs(expected).min() > 0.05  # a difference worth explaining
    heads = cache.logit_attrs(cache.stack_head_results(), 5, pos_slice=slice(None))
    assert heads.shape == (4 * LAYERS, 2, 9)
    # Per-row positions: the logit of token 5 at position 3 of row 0 and 6 of row 1.
    one_each = cache.logit_attrs(parts, 5, pos_slice=np.array([3, 6]))
    np.testing.assert_allclose(one_each.sum(0), logits[rows, [3, 6], 5], atol=1e-4)


def test_direct_logit_attribution_with_soft_cap(reference):
    """With a final soft-cap the attributions sum to the pre-cap logit."""
    _, model, _, _ = reference
    cap = 2.0
    capped = gl.Model(
        pz.select(model.model)
        .at_instances_of(TiedUnembed)
        .apply(lambda unembed: pz.nn.Sequential([unembed, TanhSoftCap(cap)])),
        model.config.replace(final_logit_softcapping=cap),
    )
    logits, cache = capped.run_with_cache(TOKENS)
    attrs = cache.logit_attrs(cache.decompose_resid(), 5)
    pre_cap = np.asarray(attrs.sum(0))
    np.testing.assert_allclose(cap * np.tanh(pre_cap / cap), logits[:, -1, 5], atol=1e-5)


def test_logit_lens(reference):
    _, _, logits, cache = reference
    lens = cache.logit_lens(top_k=3, targets=TOKENS[:, 1:], pos_slice=slice(0, -1))
    assert lens.logits.shape == (LAYERS + 1, 2, 8, 256)
    assert lens.top_tokens.shape == (LAYERS + 1, 2, 8, 3)
    assert lens.labels[-1] == f"blocks.{LAYERS - 1}.hook_resid_post"
    # The last layer, renormalised, is the model's own output.
    np.testing.assert_allclose(lens.logits[-1], logits[:, :-1], atol=1e-4)
    np.testing.assert_array_equal(lens.top_tokens[-1, :, :, 0], logits[:, :-1].argmax(-1))
    logprobs = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
    expected = np.take_along_axis(logprobs, TOKENS[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(lens.target_logprobs[-1], expected, atol=1e-4)
    cached = cache.logit_lens(norm="cached")
    np.testing.assert_allclose(cached.logits[-1], logits, atol=1e-4)


def test_capturing_long_attention_patterns_warns_with_the_memory_needed(reference, monkeypatch):
    _, model, _, _ = reference
    batch, seq = TOKENS.shape
    heads = model.config.num_attention_heads
    one_layer = batch * heads * seq * seq * 4  # float32
    monkeypatch.setattr(gl.cache, "PATTERN_WARNING_BYTES", 3 * one_layer)
    with pytest.warns(gl.cache.PatternMemoryWarning, match=f"{LAYERS * one_layer} bytes"):
        model.run_with_cache(TOKENS, names="blocks.*.attn.hook_pattern")
    both = ["blocks.[0-3].attn.hook_pattern", "blocks.[0-3].attn.hook_attn_scores"]
    with pytest.warns(gl.cache.PatternMemoryWarning, match=f"{8 * one_layer} bytes"):
        model.run_with_cache(TOKENS, names=both)  # scores count as much as patterns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # under the threshold, or no pattern: no warning
        model.run_with_cache(
            TOKENS, names=["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"]
        )
        model.run_with_cache(TOKENS, names="blocks.*.hook_resid_post")


def test_positions_and_token_ids_out_of_range_are_refused(reference):
    """JAX's indexing clamps an index past the end to the last entry: a position 99 read
    the last position and a token id past the vocabulary the last unembedding row, with no
    error. The cache analyses now name the range (negative positions still count from the
    end); a hook point the model has but the cache did not capture says how to capture it."""
    _, model, _, cache = reference
    seq = TOKENS.shape[1]
    outside = f"position {seq} is outside the cached sequence, which has {seq} positions"
    for read in (
        lambda: cache.logit_lens(pos_slice=seq),
        lambda: cache.logit_lens(pos_slice=[0, seq]),
        lambda: cache.logit_lens(pos_slice=np.array([1, seq])),  # one position per row
        lambda: cache.accumulated_resid(pos_slice=seq),
        lambda: cache.logit_attrs(cache.decompose_resid(), 5, pos_slice=seq),
    ):
        with pytest.raises(IndexError, match=outside):
            read()
    last = np.asarray(cache.logit_lens(pos_slice=-1).logits)
    np.testing.assert_array_equal(
        np.asarray(cache.logit_lens(pos_slice=np.array([-1, seq - 1])).logits), last
    )
    stack = cache.decompose_resid()
    vocab = model.config.vocab_size
    with pytest.raises(
        ValueError, match=rf"tokens holds token id {vocab}, outside .*\[0, {vocab}\)"
    ):
        cache.logit_attrs(stack, vocab)
    with pytest.raises(ValueError, match="incorrect_tokens holds token id -1"):
        cache.logit_attrs(stack, np.array([3, 4]), incorrect_tokens=-1)
    with pytest.raises(ValueError, match="targets holds token id"):
        cache.logit_lens(targets=np.full(TOKENS.shape, vocab))
    _, partial = model.run_with_cache(TOKENS, names=["blocks.0.hook_resid_post"])
    with pytest.raises(KeyError, match="is a hook point of this model but was not captured"):
        partial["blocks.1.hook_resid_post"]
