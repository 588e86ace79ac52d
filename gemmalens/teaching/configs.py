"""The teaching models' architectures, as the ``config.json`` dicts they ship with.

Each is a real configuration of its family, shrunk: the features that make the family
what it is stay switched on (local and global layers; AltUp, LAuReL, per-layer embeddings,
activation sparsity and KV sharing; experts beside the dense MLP), the widths are small
enough that the decoder-only three fit in about 28 MB of bfloat16; the T5Gemma 2
encoder-decoder adds about 3 MB. ``gemma3_vision`` is Gemma 3 with its image path (a
SigLIP tower and the projector before a 4-layer text decoder), about 3 MB, trained on the
synthetic picture questions of `gemmalens.teaching.images`.
"""

from __future__ import annotations

import copy
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"
VOCAB_SIZE = 4096
# Long enough for a repeated span of 48 tokens three times over, short enough to train fast.
SEQ_LEN = 256

# What every teaching model (and each T5Gemma 2 stack) shares.
_SHARED = dict(
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "default", "rope_theta": 1_000_000.0},
}

GEMMA3 = dict(
    architectures=["Gemma3ForCausalLM"],
    model_type="gemma3_text",
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=6,
    # Two global layers among local ones (the real models have one in six).
    layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL],
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    query_pre_attn_scalar=64,
    sliding_window=32,
    max_position_embeddings=1024,
    rope_parameters=_DEFAULT_ROPE,
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
    use_bidirectional_attention=False,
    torch_dtype="bfloat16",
    **_SHARED,
)

GEMMA3N = dict(
    architectures=["Gemma3nForCausalLM"],
    model_type="gemma3n_text",
    vocab_size=VOCAB_SIZE,
    vocab_size_per_layer_input=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=384,
    num_hidden_layers=6,
    layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL],
    # Layers 4 and 5 reuse the keys and values of the last local and global layers (3, 2).
    num_kv_shared_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=64,
    sliding_window=32,
    max_position_embeddings=1024,
    hidden_size_per_layer_input=16,
    laurel_rank=16,
    altup_num_inputs=4,
    altup_active_idx=0,
    altup_coef_clip=120.0,
    altup_correct_scale=True,
    activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0],
    rope_parameters=_DEFAULT_ROPE,
    final_logit_softcapping=30.0,
    torch_dtype="bfloat16",
    **_SHARED,
)

GEMMA4_MOE = dict(
    architectures=["Gemma4ForCausalLM"],
    model_type="gemma4_text",
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=256,
    num_hidden_layers=4,
    layer_types=[SLIDING, FULL, SLIDING, FULL],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    global_head_dim=128,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    hidden_size_per_layer_input=0,
    enable_moe_block=True,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=96,
    sliding_window=32,
    max_position_embeddings=1024,
    rope_parameters={
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {
            "rope_type": "proportional",
            "partial_rotary_factor": 0.25,
            "rope_theta": 1_000_000.0,
        },
    },
    final_logit_softcapping=30.0,
    torch_dtype="bfloat16",
    **_SHARED,
)

_T5GEMMA2_TEXT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    layer_types=[SLIDING, FULL],
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    query_pre_attn_scalar=32,
    sliding_window=16,
    max_position_embeddings=512,
    rope_parameters=_DEFAULT_ROPE,
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
    **_SHARED,
)
# Image markers on unused pieces, which text never produces (<unused96..98>): the
# end-of-image id reads a learned embedding row instead of its token's.
_BOI, _EOI, _IMAGE = 102, 103, 104
T5GEMMA2 = dict(
    architectures=["T5Gemma2ForConditionalGeneration"],
    model_type="t5gemma2",
    is_encoder_decoder=True,
    encoder=dict(
        model_type="t5gemma2_encoder",
        text_config={**_T5GEMMA2_TEXT, "model_type": "t5gemma2_text"},
        # transformers always builds a vision tower; the teaching model has only this tiny
        # placeholder config, and the checkpoint holds no vision weights (text only).
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=1,
        boi_token_index=_BOI,
        eoi_token_index=_EOI,
        image_token_index=_IMAGE,
        tie_word_embeddings=True,
    ),
    decoder={**_T5GEMMA2_TEXT, "model_type": "t5gemma2_decoder"},
    image_token_index=_IMAGE,
    eoi_token_index=_EOI,
    vocab_size=VOCAB_SIZE,
    torch_dtype="bfloat16",
    tie_word_embeddings=True,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

# Gemma 3 with images (Gemma3ForConditionalGeneration). The image markers take the same
# unused pieces as T5Gemma 2's; the tokenizer is the text models' own.
GEMMA3_VISION = dict(
    architectures=["Gemma3ForConditionalGeneration"],
    model_type="gemma3",
    text_config=dict(
        model_type="gemma3_text",
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        # A window of 16 keeps the local layers' view from the question short of the
        # image's first rows: reading the picture is the global layers' job.
        layer_types=[SLIDING, FULL, SLIDING, FULL],
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=16,
        max_position_embeddings=512,
        rope_parameters=_DEFAULT_ROPE,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        **_SHARED,
    ),
    # 32 x 32 pixels in 16 x 16 patches: a 2 x 2 grid, one soft token per patch (no
    # pooling), and each patch is one cell of the picture, so a shape lies in one patch
    # (with 8 x 8 patches each shape is cut in four, and after 1,500 steps the model named
    # the colour of the right shape in only 41 % of the pictures).
    vision_config=dict(
        model_type="siglip_vision_model",
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=16,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
        vision_use_head=False,
    ),
    mm_tokens_per_image=4,
    boi_token_index=_BOI,
    eoi_token_index=_EOI,
    image_token_index=_IMAGE,
    torch_dtype="bfloat16",
    tie_word_embeddings=True,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

TEACHING_CONFIGS: dict[str, dict[str, Any]] = {
    "gemma3": GEMMA3,
    "gemma3n": GEMMA3N,
    "gemma4_moe": GEMMA4_MOE,
    "t5gemma2": T5GEMMA2,
    "gemma3_vision": GEMMA3_VISION,
}
# The teaching models that read images (their training data is `gemmalens.teaching.images`).
VISION_MODELS = ("gemma3_vision",)


def hf_config(name: str, tiny: bool = False) -> dict[str, Any]:
    """A copy of the ``config.json`` dict of teaching model ``name``.

    ``tiny=True`` shrinks every width (not the features) so that a few training steps run
    in seconds on a CPU: the setting the test suite trains.
    """
    if name not in TEACHING_CONFIGS:
        raise KeyError(f"No teaching model {name!r}; choose one of {sorted(TEACHING_CONFIGS)}.")
    config = copy.deepcopy(TEACHING_CONFIGS[name])
    if tiny and name == "t5gemma2":
        for stack in (config["encoder"]["text_config"], config["decoder"]):
            stack.update(hidden_size=32, head_dim=8, query_pre_attn_scalar=8)
            stack.update(intermediate_size=64, sliding_window=8, num_attention_heads=2)
    elif tiny and name == "gemma3_vision":
        config["text_config"].update(hidden_size=32, head_dim=8, query_pre_attn_scalar=8)
        config["text_config"].update(intermediate_size=64, num_attention_heads=2)
        config["vision_config"].update(hidden_size=16, intermediate_size=32, num_attention_heads=2)
    elif tiny:
        config.update(hidden_size=32, head_dim=8, num_attention_heads=2, sliding_window=8)
        if "query_pre_attn_scalar" in config:
            config["query_pre_attn_scalar"] = 8
        if "global_head_dim" in config:
            config["global_head_dim"] = 16
        if name == "gemma3n":
            config.update(intermediate_size=48, hidden_size_per_layer_input=4, laurel_rank=4)
        elif name == "gemma4_moe":
            config.update(intermediate_size=32, moe_intermediate_size=16)
        else:
            config.update(intermediate_size=64)
    return config
