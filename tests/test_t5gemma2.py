"""T5Gemma 2 (text path) against transformers (eager, float32) on a tiny perturbed checkpoint.

The reference model (`hf_reference.t5gemma2`) has stacks that differ on purpose (3 encoder
layers with window 4, 2 decoder layers with window 3, other KV-head counts and MLP widths),
global and sliding layers in both, a final soft-cap, and every weight perturbed (norms and
the ``eoi_embedding`` row included). The inputs are longer than both windows, encoder and
decoder lengths differ, rows are padded, and the end-of-image token occurs in both stacks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from penzai import pz
from transformers.models.t5gemma2 import modeling_t5gemma2

import gemmalens as gl
from gemmalens import sampling
from gemmalens.encdec import EncoderDecoderModel
from gemmalens.families.gemma3 import FULL, SLIDING
from gemmalens.families.t5gemma2 import encoder_mask
from gemmalens.kernels import decode_attention, decode_mlp
from gemmalens.layers.transformer import positions_from_mask
from tests import hf_reference as ref

TOLERANCE = 1e-4
EOI = ref.T5GEMMA2_EOI
RS = np.random.RandomState(0)


def _batch():
    """Encoder [3, 10] (row 1 right-padded, row 2 left-padded) and decoder [3, 7] (row 2
    right-padded), both with the eoi token somewhere."""
    tokens = RS.randint(3, 490, (3, 10))
    mask = np.ones_like(tokens)
    mask[1, 6:] = 0
    mask[2, :3] = 0
    tokens[0, 4] = tokens[2, 8] = EOI
    decoder_tokens = RS.randint(3, 490, (3, 7))
    decoder_tokens[:, 0] = 2  # decoder start token
    decoder_tokens[1, 3] = EOI
    decoder_mask = np.ones_like(decoder_tokens)
    decoder_mask[2, 5:] = 0
    return tokens * mask, mask, decoder_tokens * decoder_mask, decoder_mask


TOKENS, MASK, DECODER_TOKENS, DECODER_MASK = _batch()
REAL = DECODER_MASK.astype(bool)  # decoder positions compared with the reference
# Encoder prompts for generation; the longest has TOKENS' width, so encoding them reuses the
# compiled encoder of `test_encode_once_decode_many` (compiling dominates this file's time).
_PROMPT_RS = np.random.RandomState(1)
PROMPTS = [list(_PROMPT_RS.randint(3, 490, n)) for n in (10, 6, 2)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("t5gemma2")
    # The post-norm gain lets the blocks outweigh the embedding: greedy output then varies.
    hf_model = ref.t5gemma2(directory, perturbation=0.05, post_norm_gain=8.0)
    return hf_model, gl.load(directory)


@pytest.fixture(scope="module")
def reference(pair):
    hf_model, _ = pair
    with torch.no_grad():
        return hf_model(
            input_ids=torch.as_tensor(TOKENS),
            attention_mask=torch.as_tensor(MASK),
            decoder_input_ids=torch.as_tensor(DECODER_TOKENS),
            decoder_attention_mask=torch.as_tensor(DECODER_MASK),
            output_attentions=True,
        )


@pytest.fixture(scope="module")
def run(pair):
    _, model = pair
    return model.run_with_cache(
        TOKENS,
        attention_mask=MASK,
        decoder_tokens=DECODER_TOKENS,
        decoder_attention_mask=DECODER_MASK,
    )


def test_logits_match_transformers(pair, reference, run):
    _, model = pair
    expected = reference.logits.numpy()
    fused = np.asarray(model(TOKENS, DECODER_TOKENS, MASK, DECODER_MASK))
    explicit = np.asarray(run[0])  # every pattern captured: the explicit attention path
    assert isinstance(model, EncoderDecoderModel)
    assert np.abs(fused[REAL] - expected[REAL]).max() <= TOLERANCE
    assert np.abs(explicit[REAL] - expected[REAL]).max() <= TOLERANCE
    assert np.abs(expected).max() > 100 * TOLERANCE  # a wrong model would fail


def test_encoder_output_and_split_patterns_match_transformers(reference, run):
    _, cache = run
    encoder_real = MASK.astype(bool)
    ours = np.asarray(cache["encoder.ln_final.hook_normalized"])
    theirs = reference.encoder_last_hidden_state.numpy()
    assert np.abs(ours[encoder_real] - theirs[encoder_real]).max() <= TOLERANCE
    for i, (self_part, cross_part) in enumerate(
        zip(reference.decoder_attentions, reference.cross_attentions, strict=True)
    ):
        for name, theirs in (("self", self_part), ("cross", cross_part)):
            ours = np.asarray(cache[f"decoder.blocks.{i}.attn.hook_{name}_pattern"])
            rows = REAL[:, None, :].repeat(ours.shape[1], axis=1)  # [batch, head, q]
            assert np.abs(ours[rows] - theirs.numpy()[rows]).max() <= 1e-5, (i, name)


def test_self_and_cross_patterns_sum_to_one(run):
    _, cache = run
    for i in range(2):
        prefix = f"decoder.blocks.{i}.attn."
        self_part = np.asarray(cache[prefix + "hook_self_pattern"])
        cross_part = np.asarray(cache[prefix + "hook_cross_pattern"])
        assert self_part.shape == (3, 4, 7, 7) and cross_part.shape == (3, 4, 7, 10)
        total = self_part.sum(-1) + cross_part.sum(-1)
        np.testing.assert_allclose(total, 1.0, atol=1e-5)
        # Neither part alone is a distribution: the softmax really spans both.
        assert 0.05 < cross_part.sum(-1).mean() < 0.95
        np.testing.assert_array_equal(
            np.asarray(cache[prefix + "hook_pattern"]),
            np.concatenate([self_part, cross_part], axis=-1),
        )
        # Padded encoder tokens get no attention; the window limits only the self part.
        padding = ~MASK.astype(bool)[:, None, None, :]  # [batch, 1, 1, enc_pos]
        assert np.all(np.where(padding, cross_part, 0) == 0)
    local = np.asarray(cache["decoder.blocks.0.attn.hook_self_pattern"])[0, :, 6]
    assert np.all(local[:, :4] == 0) and np.all(local[:, 4:] > 0)  # window 3


def test_encoder_masks_are_transformers_masks():
    """The encoder's lopsided bidirectional window, for even and odd widths."""
    positions = positions_from_mask(pz.nx.ones({"batch": 1, "seq": 12}))
    for window in (4, 5):
        config = gl.Gemma3Config(
            vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
            num_attention_heads=1, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
            sliding_window=window, layer_types=(SLIDING, FULL),
        )  # fmt: skip
        ours = np.asarray(
            encoder_mask(config, SLIDING)
            .visible(token_positions=positions)
            .unwrap("batch", "seq", "kv_seq")[0]
        )
        rule = modeling_t5gemma2.sliding_window_mask_function(window, is_causal=False)
        q, k = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
        np.testing.assert_array_equal(ours, rule(0, 0, q, k).numpy(), err_msg=f"window {window}")
        assert np.asarray(
            encoder_mask(config, FULL)
            .visible(token_positions=positions)
            .unwrap("batch", "seq", "kv_seq")
        ).all()


def test_encode_once_decode_many(pair, reference):
    _, model = pair
    encoded = model.encode(TOKENS, attention_mask=MASK)
    assert encoded.hidden_states.shape == (3, 10, 64)
    # Row 0 alone has no padding: the encoder then runs banded attention kernels.
    alone = np.asarray(model.encode(TOKENS[:1]).hidden_states)[0]
    assert np.abs(alone - reference.encoder_last_hidden_state.numpy()[0]).max() <= TOLERANCE
    full = np.asarray(model(TOKENS, DECODER_TOKENS, MASK, DECODER_MASK))
    # The decoder is causal: its first three tokens give the first three rows of logits.
    prefix = np.asarray(model(decoder_tokens=DECODER_TOKENS[:, :3], encoder_output=encoded))
    assert np.abs(prefix - full[:, :3]).max() <= 1e-5


def _hf_generate(hf_model, prompts, max_new_tokens):
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):  # right padding, as gemmalens pads encoder prompts
        ids[i, : len(prompt)] = torch.tensor(prompt)
        mask[i, : len(prompt)] = 1
    out = hf_model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert np.all(out[:, 0].numpy() == 2)  # transformers starts the decoder with BOS
    return out[:, 1:].numpy()


def test_greedy_generation_matches_transformers(pair):
    hf_model, model = pair
    captured = "decoder.blocks.1.attn.hook_cross_pattern"
    result = model.generate(PROMPTS, max_new_tokens=10, stop_at_eos=False, capture=captured)
    ours = np.asarray(result.tokens)
    np.testing.assert_array_equal(ours, _hf_generate(hf_model, PROMPTS, 10))
    assert all(len(set(row)) > 3 for row in ours.tolist()), "degenerate output proves little"
    # Every step attends to the same encoder tokens (the cross part is fixed), never padding.
    steps = np.asarray(result.step_cache[captured])
    assert steps.shape == (10, 3, 4, 1, 10)
    padding = ~np.asarray(result.prompt_mask).astype(bool)  # [batch, enc_pos]
    assert np.all(np.where(padding[None, :, None, None, :], steps, 0) == 0)
    assert np.all(steps.sum(-1) < 1)  # the rest of each row went to the decoder's own keys


def test_generation_with_the_decode_kernels_matches_transformers(pair, monkeypatch):
    """In Pallas' interpreter: the decoder's feed-forward blocks run the decode kernel; its
    merged self+cross attention keeps the plain path."""
    hf_model, model = pair
    traced = []
    for module, name in [(decode_attention, "decode_attention"), (decode_mlp, "gated_mlp")]:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            traced.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    monkeypatch.setattr(sampling, "DECODE_ATTENTION_KERNEL", "interpret")
    monkeypatch.setattr(sampling, "DECODE_MLP_KERNEL", "interpret")
    ours = np.asarray(model.generate(PROMPTS, max_new_tokens=10, stop_at_eos=False).tokens)
    np.testing.assert_array_equal(ours, _hf_generate(hf_model, PROMPTS, 10))
    # Traced for the first step (the decoder's prompt is its one start token) and the loop.
    assert traced == ["gated_mlp"] * (2 * model.config.decoder.num_hidden_layers)


def test_patching_an_encoder_position_changes_the_decoder(pair, run):
    """Encoder hooks change the decoder in the same call. One call, three experiments (one
    per row): corrupt encoder position 5 of every row, then patch the clean value back in
    row 0 at the embedding, row 1 at the embedding of another position, and row 2 after
    encoder block 1 (once attention has spread the corruption)."""
    _, model = pair
    _, clean = run
    clean_logits = np.asarray(model(TOKENS, DECODER_TOKENS, MASK, DECODER_MASK))
    corrupted = TOKENS.copy()
    corrupted[:, 5] = 7
    corrupted_logits = np.asarray(model(corrupted, DECODER_TOKENS, MASK, DECODER_MASK))

    def patch(name, row, position):
        def fn(value, _):
            return value.at[row, position].set(clean[name][row, position])

        return fn

    def embed_patches(value, name):
        value = patch(name, 0, 5)(value, name)
        value = patch(name, 1, 3)(value, name)
        return value.at[1, 8].set(100.0)  # a padded position of row 1: never read

    patched = model.run_with_hooks(
        corrupted,
        {
            "encoder.hook_embed": embed_patches,
            "encoder.blocks.1.hook_resid_post": patch("encoder.blocks.1.hook_resid_post", 2, 5),
        },
        attention_mask=MASK,
        decoder_tokens=DECODER_TOKENS,
        decoder_attention_mask=DECODER_MASK,
    )
    patched = np.asarray(patched)

    def gap(a, b, row):
        return np.abs(a[row][REAL[row]] - b[row][REAL[row]]).max()

    assert all(gap(corrupted_logits, clean_logits, row) > 0.1 for row in range(3))
    assert gap(patched, clean_logits, 0) <= 1e-5  # the only difference, undone
    assert gap(patched, corrupted_logits, 1) <= 1e-5  # the wrong position: nothing undone
    assert 0 < gap(patched, clean_logits, 2) < gap(corrupted_logits, clean_logits, 2)


def test_hook_names_and_errors(pair):
    _, model = pair
    names = model.hook_names
    for name in (
        "encoder.hook_embed",
        "encoder.blocks.0.attn.hook_pattern",
        "encoder.blocks.2.hook_resid_post",
        "encoder.ln_final.hook_normalized",
        "decoder.hook_embed",
        "decoder.blocks.1.attn.hook_cross_k",
        "decoder.blocks.1.attn.hook_self_pattern",
        "decoder.blocks.1.attn.hook_cross_pattern",
        "decoder.ln_final.hook_normalized",
    ):
        assert name in names, name
    assert all(n.startswith(("encoder.", "decoder.")) for n in names)
    assert names.index("encoder.ln_final.hook_normalized") < names.index("decoder.hook_embed")
    with pytest.raises(TypeError, match="decoder_tokens"):
        model(TOKENS)
    with pytest.raises(TypeError, match="by keyword"):
        model.run_with_cache(TOKENS, DECODER_TOKENS)


# Released shapes (ARCHITECTURES.md section 8) written out for transformers independently of
# gemmalens' presets.
HF_PRESETS = {
    "t5gemma2_270m_270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                               num_attention_heads=4, num_key_value_heads=1),
    "t5gemma2_1b_1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                           num_attention_heads=4, num_key_value_heads=1),
    "t5gemma2_4b_4b": dict(hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
                           num_attention_heads=8, num_key_value_heads=4),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HF_PRESETS))
def test_preset_counts_match_transformers(name):
    """Counted on the transformers side: every parameter of ``T5Gemma2ForConditionalGeneration``
    (tied embedding, ``eoi_embedding``, both text stacks) except those of the vision tower
    and the multimodal projector, which gemmalens does not build yet."""
    text = dict(vocab_size=262_144, head_dim=256, **HF_PRESETS[name])
    with torch.device("meta"):
        config = transformers.T5Gemma2Config(
            encoder=dict(text_config=text, vision_config=ref.TINY_T5GEMMA2_VISION),
            decoder=text,
        )
        hf_model = transformers.T5Gemma2ForConditionalGeneration(config)
    text_params = sum(
        p.numel()
        for n, p in hf_model.named_parameters()
        if ".vision_tower." not in n and ".multi_modal_projector." not in n
    )
    assert gl.preset(name).num_params() == text_params
