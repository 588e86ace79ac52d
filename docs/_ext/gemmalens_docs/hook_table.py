"""The hook point tables, read off real tiny models of every family at build time.

Each family is a preset shrunk to a few layers (``FAMILIES``): the same builder, the same hook
points, tiny widths. A table lists every hook point of that model with the block index
written as ``{i}``, the axes of its value (``HookPoint.axes``, the order of the array that
``run_with_cache`` returns) and a line on what it holds (``HOOK_DOCS``). The model is also
run abstractly (``jax.eval_shape``) to check that every value has one dimension per axis.

A hook point without a line in ``HOOK_DOCS``, or a line for a hook point no model has, is
a build warning (an error under ``-W``): the table never goes stale silently.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

SLIDING, FULL = "sliding_attention", "full_attention"

# Distinct sizes, none of them 1, so that an axis of size 1 in a value (a broadcast
# divisor) shows as such.
VOCAB = 96
BATCH, SEQ, DECODER_SEQ = 2, 7, 5


def _gemma3() -> Any:
    import gemmalens as gl

    return gl.preset("gemma3_270m").replace(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        layer_types=(SLIDING, FULL),
    )


IMAGE_TOKEN = VOCAB - 1  # the tiny vision model's image placeholder id
TOKENS_PER_IMAGE = 4


def _gemma3_vision() -> Any:
    from gemmalens.vision import siglip

    # As many tower blocks as text blocks, so that "every block" means the same in both.
    tower = siglip.Gemma3VisionConfig(
        siglip.SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        siglip.Gemma3ProjectorConfig(TOKENS_PER_IMAGE, 32),
    )
    return _gemma3().replace(vision=tower, image_token_id=IMAGE_TOKEN)


def _gemma3n() -> Any:
    import gemmalens as gl

    # Layer 0 is sparse (as the first ten of E2B/E4B), layer 2 reuses layer 1's keys.
    return gl.preset("gemma3n_e2b").replace(
        vocab_size=VOCAB,
        vocab_size_per_layer_input=VOCAB,
        hidden_size=32,
        intermediate_size=(48, 48, 48),
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        layer_types=(SLIDING, FULL, FULL),
        activation_sparsity_pattern=(0.95, 0.0, 0.0),
        num_kv_shared_layers=1,
        hidden_size_per_layer_input=8,
        laurel_rank=4,
    )


AUDIO_TOKEN, AUDIO_SOFT_TOKENS, AUDIO_FRAMES, AUDIO_MELS = VOCAB - 6, 2, 32, 16


def _gemma3n_audio() -> Any:
    from gemmalens.audio.gemma3n import Gemma3nAudioConfig, Gemma3nAudioTowerConfig
    from gemmalens.audio.merge import Gemma3nVisionEmbedderConfig

    # The id layout of the released files, shrunk: text, then 16 vision hard tokens, then
    # 16 audio ones up to the vocabulary's end. As many conformer blocks as text blocks.
    audio = Gemma3nAudioConfig(
        vocab_size=16,
        vocab_offset=VOCAB - 16,
        input_feat_size=AUDIO_MELS,
        hidden_size=16,
        conf_attention_chunk_size=4,
        conf_attention_context_left=5,
        conf_attention_context_right=0,
        conf_num_attention_heads=2,
        conf_num_hidden_layers=3,
        sscp_conv_channel_size=(8, 4),
    )
    return _gemma3n().replace(
        audio=Gemma3nAudioTowerConfig(audio, text_hidden_size=32),
        vision_embedder=Gemma3nVisionEmbedderConfig(
            text_hidden_size=32, hidden_size=16, vocab_size=16, vocab_offset=VOCAB - 32
        ),
        audio_token_id=AUDIO_TOKEN,
        image_token_id=VOCAB - 31,
        audio_soft_tokens_per_image=AUDIO_SOFT_TOKENS,
    )


# Gemma 3n's MobileNetV5 in small: three blocks per stage (every kind of block), 64 px
# images fused on stage 2's 4x4 grid and pooled to 2x2: TOKENS_PER_IMAGE soft tokens.
GEMMA3N_STAGES = (
    ("er_r1_k3_s2_e4_c8", "er_r1_k3_s1_e4_c8", "er_r1_k3_s1_e4_c8"),
    ("uir_r1_a3_k5_s2_e6_c16", "uir_r1_a5_k0_s1_e4_c16", "uir_r1_a3_k0_s1_e4_c16"),
    ("uir_r1_a5_k5_s2_e6_c16", "mqa_r1_k3_h2_v2_s1_d8_c16", "uir_r1_a0_k0_s1_e2_c16"),
    ("uir_r1_a5_k5_s2_e6_c16", "mqa_r1_k3_h2_s1_d8_c16", "uir_r1_a0_k0_s1_e2_c16"),
)


def _gemma3n_vision() -> Any:
    from gemmalens.audio.merge import (
        Gemma3nAudioEmbedderConfig,
        Gemma3nImageEncoderConfig,
        Gemma3nVisionEmbedderConfig,
    )
    from gemmalens.vision.mobilenetv5 import MobileNetV5Config

    # The id layout of _gemma3n_audio; the vision tower without the audio one (embed_audio's
    # hard path only).
    tower = MobileNetV5Config(
        stages=GEMMA3N_STAGES,
        stem_size=8,
        hidden_size=16,
        msfa_output_resolution=2,
        image_size=64,
    )
    embedder = Gemma3nVisionEmbedderConfig(
        32, hidden_size=16, vocab_size=16, vocab_offset=VOCAB - 32
    )
    return _gemma3n().replace(
        vision=Gemma3nImageEncoderConfig(tower, embedder),
        audio_embedder=Gemma3nAudioEmbedderConfig(
            32, hidden_size=16, vocab_size=16, vocab_offset=VOCAB - 16
        ),
        audio_token_id=AUDIO_TOKEN,
        image_token_id=VOCAB - 31,
    )


def _gemma4() -> Any:
    import gemmalens as gl

    # E2B's features: per-layer embeddings, KV sharing, a double-wide MLP on sharing layers.
    return gl.preset("gemma4_e2b").replace(
        vocab_size=VOCAB,
        vocab_size_per_layer_input=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        sliding_window=4,
        layer_types=(SLIDING, FULL, FULL),
        num_kv_shared_layers=1,
        hidden_size_per_layer_input=8,
    )


def _gemma4_moe() -> Any:
    import gemmalens as gl

    # 26B-A4B's features: K=V global attention and experts beside the dense MLP.
    return gl.preset("gemma4_26b_a4b").replace(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        num_global_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        sliding_window=4,
        layer_types=(SLIDING, FULL),
        num_experts=6,
        top_k_experts=3,
        moe_intermediate_size=12,
    )


def _t5gemma2() -> Any:
    import gemmalens as gl

    config = gl.preset("t5gemma2_270m_270m")

    def shrink(stack: Any) -> Any:
        return stack.replace(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            layer_types=(SLIDING, FULL),
        )

    return dataclasses.replace(
        config, encoder=shrink(config.encoder), decoder=shrink(config.decoder)
    )


def _t5gemma2_vision() -> Any:
    # The T5Gemma 2 model above with Gemma 3's tiny tower in its encoder.
    tower = _gemma3_vision().vision
    return dataclasses.replace(_t5gemma2(), vision=tower, image_token_index=IMAGE_TOKEN)


GEMMA4_PATCH, GEMMA4_KERNEL = 4, 2  # 4 px patches pooled 2 x 2: a 4 x 4 patch image


def _gemma4_vision() -> Any:
    from gemmalens.vision import gemma4

    # E2B's tower layout (clipped linears) with standardisation (26B/31B) too, so that every
    # hook point of either shows; as many tower blocks as text blocks.
    tower = gemma4.Gemma4ImageEncoderConfig(
        gemma4.Gemma4VisionConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            patch_size=GEMMA4_PATCH,
            pooling_kernel_size=GEMMA4_KERNEL,
            position_embedding_size=8,
            use_clipped_linears=True,
            standardize=True,
        ),
        text_hidden_size=32,
    )
    return _gemma4().replace(
        vision=tower,
        image_token_id=IMAGE_TOKEN,
        video_token_id=IMAGE_TOKEN - 1,
        audio_token_id=IMAGE_TOKEN - 2,
    )


GEMMA4_AUDIO_FRAMES = 8  # 8 frames of 16 mel bins: 2 soft tokens (4x subsampling)


def _gemma4_audio() -> Any:
    from gemmalens.audio import gemma4

    # E2B's conformer layout (clipped linears), shrunk; as many blocks as text blocks.
    tower = gemma4.Gemma4AudioEncoderConfig(
        gemma4.Gemma4AudioConfig(
            hidden_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            subsampling_conv_channels=(AUDIO_MELS, 4),
            attention_chunk_size=4,
            attention_context_left=5,
            output_proj_dims=24,
        ),
        text_hidden_size=32,
    )
    return _gemma4().replace(audio=tower, audio_token_id=AUDIO_TOKEN)


@dataclasses.dataclass(frozen=True)
class Family:
    title: str
    preset: str  # the preset the tiny model is shrunk from
    config: Callable[[], Any]

    @property
    def encoder_decoder(self) -> bool:
        """Whether the model has two stacks (read off the config, as the analyses do)."""
        from gemmalens import residual

        return len(residual.stacks(self.config())) > 1


FAMILIES = {
    "gemma3": Family("Gemma 3", "gemma3_270m", _gemma3),
    "gemma3_vision": Family("Gemma 3 with images", "gemma3_4b", _gemma3_vision),
    "gemma3n": Family("Gemma 3n", "gemma3n_e2b", _gemma3n),
    "gemma3n_audio": Family("Gemma 3n with audio", "gemma3n_e2b", _gemma3n_audio),
    "gemma3n_vision": Family("Gemma 3n with images", "gemma3n_e2b", _gemma3n_vision),
    "gemma4": Family("Gemma 4 (dense)", "gemma4_e2b", _gemma4),
    "gemma4_vision": Family("Gemma 4 with images", "gemma4_e2b", _gemma4_vision),
    "gemma4_audio": Family("Gemma 4 with audio", "gemma4_e2b", _gemma4_audio),
    "gemma4_moe": Family("Gemma 4 (mixture of experts)", "gemma4_26b_a4b", _gemma4_moe),
    "t5gemma2": Family("T5Gemma 2", "t5gemma2_270m_270m", _t5gemma2),
    "t5gemma2_vision": Family("T5Gemma 2 with images", "t5gemma2_270m_270m", _t5gemma2_vision),
}

# What each hook point holds, by template (``blocks.{i}.``; T5Gemma 2's ``encoder.`` and
# ``decoder.`` prefixes are dropped before the look-up).
HOOK_DOCS = {
    # Every family.
    "hook_embed": "Token embeddings, after the sqrt(d_model) scaling (with images: the "
    "soft tokens, unscaled, at image positions): the stream entering block 0.",
    "blocks.{i}.hook_resid_pre": "The residual stream entering the block.",
    "blocks.{i}.attn.hook_q": "Queries, after QK-norm and RoPE.",
    "blocks.{i}.attn.hook_k": "Keys, after QK-norm and RoPE (on KV-sharing layers: the "
    "keys of the layer they reuse).",
    "blocks.{i}.attn.hook_v": "Values (after the value norm where the family has one).",
    "blocks.{i}.attn.hook_attn_scores": "Attention logits: scaled, masked (-inf), before "
    "the softmax.",
    "blocks.{i}.attn.hook_pattern": "Attention weights (softmax of the scores); rows sum to 1.",
    "blocks.{i}.attn.hook_z": "Per-head attention output, before the output projection.",
    "blocks.{i}.hook_attn_out": "The attention branch's contribution to the residual "
    "stream, after the post-attention norm.",
    "blocks.{i}.hook_resid_mid": "The residual stream between attention and MLP.",
    "blocks.{i}.mlp.hook_pre": "The MLP's gate projection, before the GELU.",
    "blocks.{i}.mlp.hook_pre_linear": "The MLP's up projection (the linear half of the "
    "gated unit).",
    "blocks.{i}.mlp.hook_post": "GELU(gate) * up: the input of the down projection.",
    "blocks.{i}.hook_mlp_out": "The MLP branch's contribution to the residual stream, "
    "after the post-feedforward norm.",
    "blocks.{i}.hook_resid_post": "The residual stream leaving the block.",
    "ln_final.hook_scale": "The final norm's divisor sqrt(mean(x²) + eps), one number per "
    "position (used to freeze the norm in logit attribution).",
    "ln_final.hook_normalized": "The final norm's output, which the unembedding reads.",
    # Gemma 3n.
    "hook_altup_expanded": "The AltUp streams made from the embedding: stream 0 is the "
    "embedding, the others magnitude-matched projections of it.",
    "blocks.{i}.altup.hook_prediction_modalities": "AltUp router output for the "
    "prediction: tanh of a projection of the normed active stream.",
    "blocks.{i}.altup.hook_prediction_coefs": "Per-token mixing coefficients C of the "
    "prediction: pred[s] = stream[s] + sum_t C[s, t] stream[t].",
    "blocks.{i}.altup.hook_predictions": "Every stream's prediction. The active one is "
    "what the transformer layer runs on (hook_resid_pre).",
    "blocks.{i}.laurel.hook_out": "LAuReL: x + norm(right(left(x))), a low-rank branch "
    "beside attention, added to the residual.",
    "blocks.{i}.mlp.hook_pre_sparse": "Only on layers with activation sparsity: the gate "
    "after Gaussian top-k, relu(gate - (mean + z * std)).",
    "blocks.{i}.altup.hook_correction_modalities": "AltUp router output for the "
    "correction, from the layer's output.",
    "blocks.{i}.altup.hook_correction_coefs": "Per-stream weight of the innovation "
    "(correction coefficients + 1).",
    "blocks.{i}.altup.hook_innovation": "The layer's output minus the active prediction.",
    "blocks.{i}.altup.hook_corrected": "Every stream corrected: prediction + coefficient "
    "* innovation.",
    "blocks.{i}.hook_per_layer_input": "This layer's per-layer embedding (token part plus "
    "projected context part).",
    "blocks.{i}.hook_streams_post": "Every stream at the block's output, after the "
    "per-layer input is added to the non-active streams: the next block's input.",
    "hook_altup_collapsed": "The streams merged back into one: the mean of stream 0 and "
    "the magnitude-matched unembedded others.",
    # Gemma 4.
    "blocks.{i}.hook_per_layer_out": "The per-layer-input branch's contribution to the "
    "residual stream.",
    "blocks.{i}.hook_dense_mlp_out": "MoE layers: the dense MLP's output (first "
    "post-norm), one of the two summands of the feedforward branch.",
    "blocks.{i}.moe.hook_router_logits": "Router logits per expert. Changing them "
    "changes which experts are chosen.",
    "blocks.{i}.moe.hook_expert_indices": "The k experts each token is routed to. "
    "Replacing them reroutes the token.",
    "blocks.{i}.moe.hook_expert_weights": "Each expert's weight for each token: the "
    "renormalised top-k probabilities times the per-expert scale, 0 off the chosen ones.",
    "blocks.{i}.moe.hook_out": "The experts' weighted sum after its post-norm, the other "
    "summand of the feedforward branch.",
    # Gemma 3 with images (the SigLIP tower and projector; its batch axis counts images).
    "vision.hook_patch_embed": "Each 14x14 patch (8x8 in the tiny model) through the patch "
    "embedding (a convolution with stride = kernel), patches row by row.",
    "vision.hook_pos_embed": "The learned position embedding of each patch, added to it.",
    "vision.blocks.{i}.hook_resid_pre": "The tower's residual stream entering the block.",
    "vision.blocks.{i}.attn.hook_q": "Queries (with bias; no RoPE: positions are learned).",
    "vision.blocks.{i}.attn.hook_k": "Keys (with bias).",
    "vision.blocks.{i}.attn.hook_v": "Values (with bias).",
    "vision.blocks.{i}.attn.hook_attn_scores": "Attention logits between patches, scaled "
    "by head_dim^-0.5; nothing is masked (bidirectional).",
    "vision.blocks.{i}.attn.hook_pattern": "Attention weights between patches: [image, "
    "head, patch, patch] (4096 patches per image at 896 px).",
    "vision.blocks.{i}.attn.hook_z": "Per-head attention output, before out_proj.",
    "vision.blocks.{i}.hook_attn_out": "The attention branch's contribution (LayerNorm "
    "before, no norm after).",
    "vision.blocks.{i}.hook_resid_mid": "The tower's residual stream between attention and MLP.",
    "vision.blocks.{i}.mlp.hook_pre": "fc1's output, before the GELU.",
    "vision.blocks.{i}.mlp.hook_post": "GELU(fc1(x)): the input of fc2.",
    "vision.blocks.{i}.hook_mlp_out": "The MLP branch's contribution.",
    "vision.blocks.{i}.hook_resid_post": "The tower's residual stream leaving the block.",
    "vision.hook_post_layernorm": "The tower's output: its last LayerNorm.",
    "vision.hook_pooled": "The patch grid average-pooled to the soft-token grid (4x4 "
    "windows: 64x64 patches -> 16x16 = 256 tokens per image).",
    "vision.hook_soft_emb_norm": "The pooled tokens after the projector's RMSNorm (1 + w).",
    "vision.hook_projected": "The image's soft tokens: projected to d_model, one row per "
    "image-token position it fills.",
    "hook_image_embed": "The soft tokens at their positions in the text stream (T5Gemma 2: "
    "the encoder's; zero at text positions); replacing it changes what the image positions "
    "receive.",
    # Gemma 3n's audio tower (USM conformer) and its embedder.
    "audio.subsample.conv_0.hook_out": "The first subsampling convolution (3x3, stride 2) "
    "after its cumulative group norm and ReLU: [clip, channel, time, frequency].",
    "audio.subsample.conv_1.hook_out": "The second one: time and frequency down 4x in all.",
    "audio.hook_subsampled": "The subsampled frames, flattened and projected to the tower's "
    "width: the stream entering conformer block 0.",
    "audio.blocks.{i}.hook_resid_pre": "The conformer's stream entering the block.",
    "audio.blocks.{i}.ffw_start.hook_pre": "The first half-step feed-forward's hidden layer, "
    "before the SiLU.",
    "audio.blocks.{i}.ffw_start.hook_post": "After the SiLU: the input of its down projection.",
    "audio.blocks.{i}.ffw_start.hook_out": "What the first feed-forward adds (its 0.5 weight "
    "included).",
    "audio.blocks.{i}.hook_resid_after_ffw_start": "The stream after the first feed-forward.",
    "audio.blocks.{i}.attn.hook_q": "Queries (scaled), per head.",
    "audio.blocks.{i}.attn.hook_k": "Keys, per head.",
    "audio.blocks.{i}.attn.hook_v": "Values, per head.",
    "audio.blocks.{i}.attn.hook_attn_scores": "Local attention logits in transformers' chunked "
    "layout [clip, heads, chunk, query in chunk, context]: content plus relative-position "
    "terms, soft-capped, masked.",
    "audio.blocks.{i}.attn.hook_pattern": "Local attention weights, same chunked layout "
    "(`gemmalens.audio.gemma3n.dense_pattern` spreads them over [frame, frame]).",
    "audio.blocks.{i}.attn.hook_z": "Per-head attention output, before the output projection.",
    "audio.blocks.{i}.hook_attn_out": "The attention branch's contribution (after its post-norm).",
    "audio.blocks.{i}.hook_resid_after_attn": "The stream after attention (before padded "
    "frames are zeroed).",
    "audio.blocks.{i}.lconv.hook_glu": "The light convolution module's gated linear unit output.",
    "audio.blocks.{i}.lconv.hook_conv": "After the causal depthwise convolution.",
    "audio.blocks.{i}.lconv.hook_out": "What the convolution module adds.",
    "audio.blocks.{i}.hook_resid_after_lconv": "The stream after the convolution module.",
    "audio.blocks.{i}.ffw_end.hook_pre": "The second feed-forward's hidden layer, before the SiLU.",
    "audio.blocks.{i}.ffw_end.hook_post": "After the SiLU.",
    "audio.blocks.{i}.ffw_end.hook_out": "What the second feed-forward adds (0.5 included).",
    "audio.blocks.{i}.hook_resid_after_ffw_end": "The stream before the block's final norm.",
    "audio.blocks.{i}.hook_resid_post": "The block's output (after its norm).",
    "audio.hook_encoded": "The conformer's output, one row per subsampled frame.",
    "audio.hook_soft_tokens": "Every conf_reduction_factor-th frame, padded ones zeroed: the "
    "clip's soft tokens.",
    "audio.hook_soft_emb_norm": "embed_audio's soft-embedding norm of the soft tokens.",
    "audio.hook_projected": "The soft tokens projected to d_model and normed: what the audio "
    "placeholders receive.",
    "hook_audio_embed": "The audio soft tokens at their positions in the text stream (zero "
    "elsewhere); replacing it changes what the audio positions receive.",
    # T5Gemma 2's decoder.
    "blocks.{i}.attn.hook_cross_k": "Keys computed from the encoder output (QK-norm, no RoPE).",
    "blocks.{i}.attn.hook_cross_v": "Values computed from the encoder output.",
    "blocks.{i}.attn.hook_self_pattern": "The part of the merged softmax over the "
    "decoder's own keys.",
    "blocks.{i}.attn.hook_cross_pattern": "The part of the merged softmax over the "
    "encoder's tokens.",
}

# Where a family's hook point of the same name holds something else (Gemma 4's tower beside
# SigLIP): these lines win for that family.
FAMILY_HOOK_DOCS = {
    "gemma3n_vision": {
        "vision.conv_stem.hook_out": "The stem: 3x3 convolution, stride 2 (with bias), RMS "
        "norm over channels, GELU. [image, channel, height, width] from here on.",
        "vision.stages.0.blocks.{i}.hook_out": "Stage 0 (edge residual blocks: a 3x3 "
        "expanding convolution, then a 1x1 projection): each block's output.",
        "vision.stages.1.blocks.{i}.hook_out": "Stage 1 (universal inverted residual blocks: "
        "depthwise, 1x1 expand, depthwise, 1x1 project, layer scale).",
        "vision.stages.2.blocks.{i}.hook_out": "Stage 2: inverted residual and attention "
        "blocks, 1/16 of the image's side (48x48 at 768 px); fused with stage 3.",
        "vision.stages.2.blocks.{i}.attn.hook_pattern": "Multi-query attention weights: each "
        "pixel (query, row-major) over the keys of a grid strided 2x2 (one key and value "
        "head shared by all query heads).",
        "vision.stages.3.blocks.{i}.hook_out": "Stage 3: inverted residual and attention "
        "blocks at 1/32 of the image's side.",
        "vision.stages.3.blocks.{i}.attn.hook_pattern": "Multi-query attention weights over "
        "every pixel of the stage's grid.",
        "vision.hook_fused": "The multi-scale fusion adapter's output: stages 2 and 3 "
        "concatenated at stage 2's grid, a 1x1 feed-forward, average-pooled to "
        "msfa_output_resolution (16x16 released; 2x2 here), RMS-normed.",
        "vision.hook_soft_tokens": "The image's soft tokens: the fused grid row by row, times "
        "sqrt(2048), through embed_vision's soft path (norm, projection to d_model, norm): "
        "what the image placeholders receive.",
    },
    "gemma4_vision": {
        "vision.hook_patch_embed": "Each patch's 3 * patch_size² pixels (rescaled to "
        "[-1, 1]) through the input projection; padding patches included.",
        "vision.hook_pos_embed": "The patch's learned x and y embeddings, summed (zero on "
        "padding patches), added to it.",
        "vision.blocks.{i}.attn.hook_q": "Queries, after QK-norm and the 2-D RoPE (the "
        "first half of each head turned by the patch's x, the second by its y).",
        "vision.blocks.{i}.attn.hook_k": "Keys, after QK-norm and the 2-D RoPE.",
        "vision.blocks.{i}.attn.hook_v": "Values, after the value norm.",
        "vision.blocks.{i}.attn.hook_attn_scores": "Attention logits between patches "
        "(scale 1; padding keys masked).",
        "vision.blocks.{i}.attn.hook_pattern": "Attention weights between an image's patches, "
        "both ways: [image, heads, patch, patch].",
        "vision.blocks.{i}.hook_attn_out": "The attention branch's contribution (after its "
        "post-norm).",
        "vision.blocks.{i}.mlp.hook_pre": "The gate projection (clipped where the tower "
        "clips its linears), before the GELU.",
        "vision.blocks.{i}.mlp.hook_pre_linear": "The up projection (clipped likewise).",
        "vision.blocks.{i}.mlp.hook_post": "GELU(gate) * up: the input of the down projection.",
        "vision.blocks.{i}.attn.hook_z": "Per-head attention output, before the output projection.",
        "vision.hook_pooled": "Patches averaged over k x k cells of the image's grid, times "
        "sqrt(width), in float32: one row per soft token (cells with no patch dropped).",
        "vision.hook_standardized": "26B / 31B: the pooled tokens standardised, (h - bias) * "
        "scale.",
        "vision.hook_soft_emb_norm": "embed_vision's RMS norm (no weight) of the pooled tokens.",
        "vision.hook_projected": "The image's soft tokens: projected to d_model.",
    },
    "gemma4_audio": {
        "audio.subsample.conv_0.hook_out": "The first subsampling convolution (3x3, stride "
        "2, padded frames zeroed before it) after its LayerNorm over channels and ReLU: "
        "[clip, time, frequency, channel].",
        "audio.blocks.{i}.attn.hook_k": "Keys, per head, scaled by ln(1 + e) / ln 2.",
        "audio.blocks.{i}.attn.hook_attn_scores": "Local attention logits in transformers' "
        "chunked layout [clip, heads, chunk, query in chunk, context]: content plus "
        "relative-position terms, soft-capped; keys 0 <= q - k < L seen, others masked.",
        "audio.blocks.{i}.hook_resid_after_attn": "The stream after attention.",
        "audio.hook_soft_tokens": "The tower's output (output_proj, with bias): one soft token "
        "per subsampled frame; those of padded frames are dropped in the text stream.",
        "audio.hook_soft_emb_norm": "embed_audio's RMS norm (no weight) of the soft tokens.",
        "audio.hook_projected": "The soft tokens projected to d_model: what the audio "
        "placeholders receive.",
    },
}

_BLOCK = re.compile(r"(^|\.)blocks\.(\d+)\.")
_STACK = re.compile(r"^(encoder|decoder)\.")


def template(name: str) -> str:
    """A hook name with its block index written ``{i}``: ``blocks.3.hook_z`` ->
    ``blocks.{i}.hook_z``."""
    return _BLOCK.sub(r"\1blocks.{i}.", name)


def doc_key(name: str) -> str:
    """The ``HOOK_DOCS`` key of a hook name or template (no stack prefix, ``{i}``)."""
    return _STACK.sub("", template(name))


def describe(family: str, key: str) -> str | None:
    """The line for hook template ``key`` (a `doc_key`) in ``family``'s table."""
    return FAMILY_HOOK_DOCS.get(family, {}).get(key, HOOK_DOCS.get(key))


@dataclasses.dataclass(frozen=True)
class HookRow:
    template: str  # blocks.{i}.attn.hook_pattern
    axes: tuple[str, ...]  # as HookPoint.axes, a size-1 axis written "1"
    blocks: tuple[int, ...]  # the tiny model's blocks that have it (() for model-level)
    block_count: int  # blocks in the tiny model's stack

    @property
    def in_every_block(self) -> bool:
        return not self.blocks or len(self.blocks) == self.block_count


@functools.cache
def tiny_model(family: str) -> Any:
    """The tiny model of ``family``, built once per process by the family's own builder.

    Its weights are zeros: the tables read only the tree (hook points) and the shapes of
    an abstract run, and drawing random weights would compile a kernel per weight shape
    (seconds per family on a CI box)."""
    import gemmalens as gl
    from gemmalens.layers.params import ShapeOnly

    config = FAMILIES[family].config()
    tree = config.build(ShapeOnly())
    zeros = jax.tree.map(
        lambda leaf: (
            np.zeros(leaf.shape, leaf.dtype) if isinstance(leaf, jax.ShapeDtypeStruct) else leaf
        ),
        tree,
    )
    surface = getattr(config, "surface_class", gl.Model)
    return surface(zeros, config, None)


def _abstract_cache(family: str) -> dict[str, jax.ShapeDtypeStruct]:
    m = tiny_model(family)
    tokens = np.full((BATCH, SEQ), 3, np.int32)
    streams: dict[str, Any] = {}
    if getattr(m.config, "vision", None) is not None:
        # One image per row: a run of image tokens between text tokens (in the encoder's
        # input, for T5Gemma 2).
        # (Gemma 3n's placeholder lies in its vision id range, below the audio one.)
        tokens[:, 1 : 1 + TOKENS_PER_IMAGE] = getattr(m.config, "image_token_id", IMAGE_TOKEN)
        tower = m.config.vision.vision
        if hasattr(tower, "image_size"):  # SigLIP: whole images
            size = tower.image_size
            streams["pixel_values"] = np.zeros((BATCH, 3, size, size), np.float32)
        else:  # Gemma 4: patches and their (x, y) places, 4 x 4 patches pooled 2 x 2
            side = 2 * GEMMA4_KERNEL
            x, y = np.meshgrid(np.arange(side), np.arange(side))
            places = np.stack([x.ravel(), y.ravel()], axis=-1)
            streams["pixel_values"] = {
                "pixel_values": np.zeros((BATCH, side * side, 3 * GEMMA4_PATCH**2), np.float32),
                "image_position_ids": np.broadcast_to(places, (BATCH, side * side, 2)).copy(),
            }
    if getattr(m.config, "audio", None) is not None:
        # One clip per row, 2 soft tokens each: Gemma 3n makes them of 32 frames (4x
        # subsampling, then every 4th), Gemma 4 of 8.
        frames = GEMMA4_AUDIO_FRAMES if m.config.family == "gemma4" else AUDIO_FRAMES
        tokens[:, 1 : 1 + AUDIO_SOFT_TOKENS] = AUDIO_TOKEN
        streams["input_features"] = np.zeros((BATCH, frames, AUDIO_MELS), np.float32)
        streams["input_features_mask"] = np.ones((BATCH, frames), bool)
    if FAMILIES[family].encoder_decoder:
        streams["decoder_tokens"] = np.full((BATCH, DECODER_SEQ), 3, np.int32)
    return jax.eval_shape(lambda: dict(m.run_with_cache(tokens, **streams)[1]))


@functools.cache
def hook_rows(family: str) -> tuple[HookRow, ...]:
    """One row per hook template of ``family``'s tiny model, in forward order."""
    from gemmalens.layers.hooks import hook_points

    m = tiny_model(family)
    shapes = _abstract_cache(family)
    config = m.config
    rows: dict[str, dict[str, Any]] = {}
    for point in hook_points(m.model):
        shape = shapes[point.name].shape
        if len(shape) != len(point.axes):
            raise ValueError(
                f"{point.name}: value of shape {shape} for axes {point.axes} in the tiny "
                f"{family} model; the hook point's axes are wrong."
            )
        axes = tuple("1" if size == 1 else axis for axis, size in zip(point.axes, shape))
        key = template(point.name)
        row = rows.setdefault(key, {"axes": axes, "blocks": []})
        if row["axes"] != axes:
            raise ValueError(f"{key}: axes differ between blocks: {row['axes']} vs {axes}.")
        block = _BLOCK.search(point.name)
        if block:
            row["blocks"].append(int(block.group(2)))
    stack = config.decoder if FAMILIES[family].encoder_decoder else config
    return tuple(
        HookRow(key, row["axes"], tuple(row["blocks"]), stack.num_hidden_layers)
        for key, row in rows.items()
    )


def base_templates() -> set[str]:
    """The doc keys of Gemma 3's hook points: what every family starts from."""
    return {doc_key(row.template) for row in hook_rows("gemma3")}


# ----------------------------------------------------------------------------- docutils


def _code(text: str) -> nodes.paragraph:
    return nodes.paragraph("", "", nodes.literal(text, text))


def _entry(*children: nodes.Node) -> nodes.entry:
    entry = nodes.entry()
    entry.extend(children)
    return entry


def _table(family: str, rows: list[HookRow], headers: tuple[str, ...]) -> nodes.table:
    table = nodes.table(classes=["gemmalens-hook-table"])
    group = nodes.tgroup(cols=len(headers))
    table += group
    for width in (40, 22, 38)[: len(headers)]:
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    header = nodes.row()
    for text in headers:
        header += _entry(nodes.paragraph(text, text))
    head += header
    body = nodes.tbody()
    group += body
    for row in rows:
        line = nodes.row()
        axes = "[" + ", ".join(row.axes) + "]"
        description = describe(family, doc_key(row.template)) or ""
        if not row.in_every_block:
            which = ", ".join(str(b) for b in row.blocks)
            plural = "s" if len(row.blocks) > 1 else ""
            description += f" (In the tiny model, block{plural} {which} of its {row.block_count}.)"
        line += _entry(_code(row.template))
        line += _entry(_code(axes))
        line += _entry(nodes.paragraph(description, description))
        body += line
    return table


class HookTable(SphinxDirective):
    """``{hook-table} family``: the hook points of that family's tiny model.

    Options: ``:only-new:`` lists only the hook points Gemma 3 does not have;
    ``:new-over: other`` only those the family ``other`` does not have (``t5gemma2_vision``
    over ``t5gemma2``: what images add).
    """

    required_arguments = 1
    option_spec = {"only-new": directives.flag, "new-over": directives.unchanged_required}

    def run(self) -> list[nodes.Node]:
        family = self.arguments[0]
        if family not in FAMILIES:
            raise self.error(f"Unknown family {family!r}; one of {sorted(FAMILIES)}.")
        package = pathlib.Path(__import__("gemmalens").__file__).parent
        for path in sorted(package.glob("**/*.py")):  # rebuild when the package changes
            self.env.note_dependency(str(path))
        try:
            rows = list(hook_rows(family))
        except Exception as error:  # the build should say which table, not crash
            raise self.error(
                f"Reading the hook points of the tiny {family} model failed: {error!r}"
            ) from error
        for row in rows:
            if describe(family, doc_key(row.template)) is None:
                logger.warning(
                    "Hook point %s of %s has no description: add one to HOOK_DOCS in "
                    "docs/_ext/gemmalens_docs/hook_table.py.",
                    row.template,
                    family,
                    location=self.get_location(),
                )
        if "only-new" in self.options:
            base = base_templates()
            rows = [row for row in rows if doc_key(row.template) not in base]
        if "new-over" in self.options:
            other = self.options["new-over"]
            if other not in FAMILIES:
                raise self.error(f"Unknown family {other!r}; one of {sorted(FAMILIES)}.")
            base = {row.template for row in hook_rows(other)}
            rows = [row for row in rows if row.template not in base]
        return [_table(family, rows, ("hook point", "axes", "value"))]


def check_descriptions(app: Any, env: Any) -> None:
    """Warns about ``HOOK_DOCS`` lines that no family's hook point uses (stale text)."""
    used = {doc_key(row.template) for family in FAMILIES for row in hook_rows(family)}
    for family, lines in FAMILY_HOOK_DOCS.items():
        own = {doc_key(row.template) for row in hook_rows(family)}
        for key in sorted(set(lines) - own):
            logger.warning(
                "FAMILY_HOOK_DOCS[%r] in docs/_ext/gemmalens_docs/hook_table.py describes "
                "%s, which that family's tiny model does not have.",
                family,
                key,
            )
    for key in sorted(set(HOOK_DOCS) - used):
        logger.warning(
            "HOOK_DOCS in docs/_ext/gemmalens_docs/hook_table.py describes %s, which no "
            "family's tiny model has: remove or rename it.",
            key,
        )
