"""Gemma 3n's audio encoder (USM conformer) and its soft-token embedder, as Penzai layers.

The forward pass, with the hook point that names each value (transformers 5.23:
``Gemma3nAudioEncoder`` then ``Gemma3nMultimodalEmbedder``'s soft path)::

    input_features [batch, frame, mel] (log-mel, gemmalens.audio.gemma3n_audio_features)
    input_features_mask [batch, frame] (True = real audio, the processor's convention)
      -> subsampling: 2 x (Conv2d 3x3 stride 2, time padded (0, 2), frequency (1, 1)
         -> cumulative group norm -> ReLU)               audio.subsample.conv_{0,1}.hook_out
      -> flatten (frequency x channel) -> input_proj_linear  audio.hook_subsampled
         the frame mask is subsampled too (every 4th frame's flag)
      -> conformer blocks                                   audio.blocks.{i}.*
         ffw_start:  x + 0.5 * post_norm(clamp(W2 silu(W1 pre_norm(clamp(x)))))
         attention:  x + post_norm(clamp(post(chunked local attention(pre_norm(clamp(x))))))
         (padded frames zeroed)
         lconv:      x + W_end silu(norm(clamp(causal depthwise conv(GLU(W_start norm(x))))))
         ffw_end:    as ffw_start
         norm(clamp(x))
                                                            audio.hook_encoded
      -> keep every conf_reduction_factor-th frame, zero padded ones  audio.hook_soft_tokens
      -> soft_embedding_norm                                audio.hook_soft_emb_norm
      -> embedding_projection (to the text width) -> RMS norm without scale
                                                            audio.hook_projected
    soft tokens [batch, audio_token, embedding] and their mask [batch, audio_token]

Block hook points (``audio.blocks.{i}.`` + name), in forward order::

    hook_resid_pre                       [batch, seq, embedding]
    ffw_start.hook_pre, .hook_post       [batch, seq, neurons]   (before / after SiLU)
    ffw_start.hook_out                   [batch, seq, embedding] (what is added: x 0.5 included)
    hook_resid_after_ffw_start           [batch, seq, embedding]
    attn.hook_q, .hook_k, .hook_v        [batch, seq, heads, head_dim] (q after its scaling)
    attn.hook_attn_scores, .hook_pattern [batch, heads, chunk, chunk_pos, context]
    attn.hook_z                          [batch, seq, heads, head_dim]
    hook_attn_out                        [batch, seq, embedding] (after post_norm)
    hook_resid_after_attn                [batch, seq, embedding] (before padded frames are zeroed)
    lconv.hook_glu, .hook_conv           [batch, seq, conv_channel]
    lconv.hook_out                       [batch, seq, embedding]
    hook_resid_after_lconv               [batch, seq, embedding]
    ffw_end.hook_pre, .hook_post, .hook_out
    hook_resid_after_ffw_end             [batch, seq, embedding] (before the block's norm)
    hook_resid_post                      [batch, seq, embedding] (the block's output)

The attention is local: frames are cut into chunks of ``conf_attention_chunk_size`` (W)
queries, and the queries of chunk ``u`` see the ``context`` window of C = W + L + R key
frames starting at frame ``u * W - L`` (L = ``conf_attention_context_left - 1`` frames of
the past, R = ``conf_attention_context_right`` of the future), of which each query uses
the keys ``q - L <= k <= q + R``. Scores and patterns are kept in that chunked layout,
``[batch, heads, chunk, chunk_pos, context]`` (query frame ``chunk * W + chunk_pos``, key
frame ``chunk * W - L + context``), exactly transformers' own; `dense_pattern` spreads
them over ``[batch, heads, seq, kv_seq]`` for plotting. Scores are the content term
``q . k`` plus the Transformer-XL relative term ``q . pos_proj(sinusoid(q - k))``,
soft-capped, then masked (padded keys and keys outside the band get the most negative
float, so a row with no visible key becomes uniform, as in transformers).

Named axes: ``batch``; ``frame``, ``mel`` (input features); ``seq``, ``freq``,
``channel`` (subsampling); ``seq`` (subsampled frames), ``embedding`` (the audio width,
the text width after the projection), ``neurons``, ``heads``, ``head_dim``,
``conv_channel``; ``audio_token`` (after the reduction).

Parameter labels sit under ``audio.`` (the embedder's under ``audio.embed.``), named after
transformers' modules (``.weights`` for projections, ``.scale`` for norms); `hf_name`
turns them into transformers' tensor names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.checkpoints.mapped import MappedCheckpoint
from gemmalens.checkpoints.parameters import build_from_checkpoint, find_prefix
from gemmalens.checkpoints.safetensors_files import TensorIndex
from gemmalens.families.hf_config import expect_model_type
from gemmalens.layers.attention import QKV_AXES
from gemmalens.layers.embeddings import TanhSoftCap, take_rows
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.norms import RMSNorm
from gemmalens.layers.params import CountsParameters, ParamBuilder, ParamSource
from gemmalens.layers.transformer import RESID_AXES

__all__ = [
    "AUDIO_PREFIXES",
    "EMBEDDER_PREFIXES",
    "FRAME_VALID",
    "HUB_AUDIO_PREFIX",
    "HUB_EMBEDDER_PREFIX",
    "AudioEmbedder",
    "AudioTower",
    "ChunkedAttentionMixer",
    "Clamp",
    "CumulativeGroupNorm",
    "DepthwiseCausalConv",
    "FeaturesAsImage",
    "GatedLinearUnit",
    "Gemma3nAudioConfig",
    "Gemma3nAudioTowerConfig",
    "LocalAttention",
    "MaskPaddedFrames",
    "PerDimScale",
    "ReduceFrames",
    "SubsampleConv2d",
    "build_audio_tower",
    "conformer_feed_forward",
    "conformer_light_conv",
    "dense_pattern",
    "from_checkpoint",
    "from_state_dict",
    "hf_name",
    "reduce_mask",
    "subsample_mask",
]

FEATURE_AXES = ("batch", "frame", "mel")
FEATURE_MASK_AXES = ("batch", "frame")
CONV_AXES = ("batch", "seq", "freq", "channel")
NEURON_AXES = ("batch", "seq", "neurons")
LCONV_AXES = ("batch", "seq", "conv_channel")
CHUNK_AXES = ("batch", "heads", "chunk", "chunk_pos", "context")
TOKEN_AXES = ("batch", "audio_token", "embedding")
TOKEN_MASK_AXES = ("batch", "audio_token")
# The side input the blocks read: which subsampled frames are real audio, [batch, seq]
# bool (True = real).
FRAME_VALID = "audio_frame_valid"
# transformers builds the conformer's feed-forward, attention and block norms with
# Gemma3nRMSNorm's default eps, not ``rms_norm_eps`` (which only the light conv and the
# embedder read). Both are 1e-6 in the released config, so the difference hides there.
CONFORMER_NORM_EPS = 1e-6

# Where checkpoints keep the tower and the embedder: ``Gemma3nForConditionalGeneration``
# (Hub files and 5.23 in memory) under ``model.``; a bare ``Gemma3nModel`` without it; a
# bare ``Gemma3nAudioEncoder`` or ``Gemma3nMultimodalEmbedder`` with no prefix at all.
HUB_AUDIO_PREFIX = "model.audio_tower."
HUB_EMBEDDER_PREFIX = "model.embed_audio."
AUDIO_PREFIXES = (HUB_AUDIO_PREFIX, "audio_tower.", "")
EMBEDDER_PREFIXES = (HUB_EMBEDDER_PREFIX, "embed_audio.", "")


# ---------------------------------------------------------------------------------- config


def _pairs(value: Any, name: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two (time, frequency) pairs from transformers' nested lists."""
    pairs = tuple(tuple(int(v) for v in pair) for pair in value)
    if len(pairs) != 2 or any(len(p) != 2 for p in pairs):
        raise ValueError(
            f"Gemma 3n audio {name} must be two (time, frequency) pairs, one per subsampling "
            f"convolution (transformers builds exactly two); got {value!r}."
        )
    return pairs  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Gemma3nAudioConfig:
    """Architecture of Gemma 3n's audio encoder (field names and defaults as transformers'
    ``Gemma3nAudioConfig``; the defaults are E2B's and E4B's tower: 1536 wide, 12 conformer
    blocks of 8 heads, chunks of 12 frames seeing 12 frames back, 4x reduction).

    ``vocab_size`` and ``vocab_offset`` describe the embedder's table of hard audio tokens.
    """

    vocab_size: int = 128
    vocab_offset: int = 262_144 + 128
    input_feat_size: int = 128
    hidden_size: int = 1536
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5
    conf_reduction_factor: int = 4
    conf_residual_weight: float = 0.5
    sscp_conv_channel_size: tuple[int, int] = (128, 32)
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: tuple[tuple[int, int], tuple[int, int]] = ((3, 3), (3, 3))
    sscp_conv_stride_size: tuple[tuple[int, int], tuple[int, int]] = ((2, 2), (2, 2))

    def __post_init__(self):
        channels = tuple(int(c) for c in self.sscp_conv_channel_size)
        if len(channels) != 2:
            raise ValueError(
                f"Gemma 3n audio sscp_conv_channel_size must have two entries (one per "
                f"subsampling convolution); got {self.sscp_conv_channel_size!r}."
            )
        # Frozen: normalise the JSON lists to tuples through object.__setattr__.
        object.__setattr__(self, "sscp_conv_channel_size", channels)
        for name in ("sscp_conv_kernel_size", "sscp_conv_stride_size"):
            object.__setattr__(self, name, _pairs(getattr(self, name), name))
        if self.hidden_size % self.conf_num_attention_heads:
            raise ValueError(
                f"Gemma 3n audio hidden_size ({self.hidden_size}) must be a multiple of "
                f"conf_num_attention_heads ({self.conf_num_attention_heads})."
            )
        if self.hidden_size % 2:
            raise ValueError(
                f"Gemma 3n audio hidden_size ({self.hidden_size}) must be even: the relative "
                "position embedding is half sines, half cosines."
            )
        for name in ("conf_attention_chunk_size", "conf_conv_kernel_size", "conf_reduction_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"Gemma 3n audio {name} must be >= 1; got {getattr(self, name)}.")
        if self.conf_attention_context_left < 0 or self.conf_attention_context_right < 0:
            raise ValueError(
                "Gemma 3n audio attention contexts must be >= 0; got left "
                f"{self.conf_attention_context_left}, right {self.conf_attention_context_right}."
            )
        if min(self.freq_sizes) < 1:
            raise ValueError(
                f"input_feat_size {self.input_feat_size} is too small for the subsampling "
                f"convolutions (frequency sizes {self.freq_sizes})."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.conf_num_attention_heads

    @property
    def max_past_horizon(self) -> int:
        """L: how many earlier frames a query sees (the left context counts the query)."""
        return max(0, self.conf_attention_context_left - 1)

    @property
    def max_future_horizon(self) -> int:
        """R: how many later frames a query sees."""
        return self.conf_attention_context_right

    @property
    def context_size(self) -> int:
        """C = W + L + R: the key frames one chunk of W queries reads."""
        return self.conf_attention_chunk_size + self.max_past_horizon + self.max_future_horizon

    @property
    def freq_sizes(self) -> tuple[int, int, int]:
        """The frequency size before, between and after the two convolutions (frequency is
        padded by one bin on each side)."""
        sizes = [self.input_feat_size]
        for (_, kernel), (_, stride) in zip(
            self.sscp_conv_kernel_size, self.sscp_conv_stride_size, strict=True
        ):
            sizes.append((sizes[-1] + 2 - kernel) // stride + 1)
        return tuple(sizes)  # type: ignore[return-value]

    @property
    def time_stride(self) -> int:
        """How many input frames one subsampled frame stands for."""
        return math.prod(stride for stride, _ in self.sscp_conv_stride_size)

    def subsampled_frames(self, frames: int) -> int:
        """The number of frames after the two convolutions (time is padded by kernel - 1
        at the end, so each stride-s convolution gives ceil(frames / s))."""
        for stride, _ in self.sscp_conv_stride_size:
            frames = (frames - 1) // stride + 1
        return frames

    def num_soft_tokens(self, frames: int) -> int:
        """The number of soft tokens ``frames`` input frames give (padded or not)."""
        return (self.subsampled_frames(frames) - 1) // self.conf_reduction_factor + 1

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Gemma3nAudioConfig:
        """Reads a transformers ``gemma3n_audio`` config dict (a Gemma 3n config's
        ``audio_config``); keys it leaves out take transformers' defaults."""
        expect_model_type(hf, "gemma3n_audio", "a Gemma 3n audio config")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})


@dataclasses.dataclass(frozen=True)
class Gemma3nAudioTowerConfig(CountsParameters):
    """The audio path of Gemma 3n: the encoder and the embedder into ``text_hidden_size``."""

    audio: Gemma3nAudioConfig
    text_hidden_size: int

    def build(self, source: ParamSource) -> AudioTower:
        """The Penzai tower, every parameter taken from ``source``."""
        return build_audio_tower(self, source)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Gemma3nAudioTowerConfig:
        """Reads a transformers ``gemma3n`` config dict: ``audio_config`` and
        ``text_config.hidden_size``; keys it leaves out take transformers' defaults."""
        expect_model_type(hf, "gemma3n", "a Gemma 3n multimodal config")
        audio = Gemma3nAudioConfig.from_hf(hf.get("audio_config") or {})
        text = hf.get("text_config") or {}
        return cls(audio, text_hidden_size=text.get("hidden_size", 2048))


# ------------------------------------------------------------------------- small layers


@pz.pytree_dataclass
class Clamp(pz.nn.Layer):
    """Clips every value to ``[-limit, limit]`` (transformers' ``gradient_clipping``, applied
    in the forward pass; 1e10 in the released config, so a no-op there)."""

    limit: float = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        limit = jnp.asarray(self.limit, x.dtype)
        return pz.nx.nmap(jnp.clip)(x, -limit, limit)


@pz.pytree_dataclass
class FeaturesAsImage(pz.nn.Layer):
    """``[batch, frame, mel]`` -> ``[batch, seq, freq, channel=1]``: the log-mel features
    as a one-channel image for the first convolution (time is the image height)."""

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        image = pz.nx.nmap(lambda a: a[:, :, None])(x.untag("frame", "mel"))
        return image.tag("seq", "freq", "channel")


@pz.pytree_dataclass
class SubsampleConv2d(pz.nn.Layer):
    """A bias-free 2-D convolution over (time, frequency): ``[batch, seq, freq, channel]``
    -> the same axes at the strided sizes.

    Time is padded by ``kernel - 1`` zero frames at the end only ("reverse causal"), so an
    output frame reads its own input frame and the next ones; frequency by one bin on each
    side. ``kernel`` is torch's ``[out_channel, channel, kernel_time, kernel_freq]``.
    """

    kernel: pz.nn.ParameterLike[pz.nx.NamedArray]
    stride: tuple[int, int] = dataclasses.field(metadata={"pytree_node": False})
    padding: tuple[tuple[int, int], tuple[int, int]] = dataclasses.field(
        metadata={"pytree_node": False}
    )

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        kernel = self.kernel.value.unwrap("out_channel", "channel", "kernel_time", "kernel_freq")

        def conv(image: jax.Array) -> jax.Array:
            # transformers casts the padded input to the kernel's dtype (bfloat16 models).
            lhs = image.astype(kernel.dtype).transpose(2, 0, 1)[None]  # [1, C, T, F]
            out = jax.lax.conv_general_dilated(lhs, kernel, self.stride, self.padding)
            return out[0].transpose(1, 2, 0)  # [T', F', C']

        return pz.nx.nmap(conv)(x.untag("seq", "freq", "channel")).tag("seq", "freq", "channel")


@pz.pytree_dataclass
class CumulativeGroupNorm(pz.nn.Layer):
    """Group normalisation with one group, its statistics accumulated over time (float32):
    frame ``t`` is normalised by the mean and variance of every (frequency, channel) value
    of frames ``0..t``, then scaled per channel. No bias.

    The variance is transformers': at each frame the squared distances to *that frame's*
    running mean are summed, and these sums accumulate (not the exact running variance).
    Every frame counts, padding included: padding is at the end, and causality keeps it
    out of the real frames' statistics.
    """

    scale: pz.nn.ParameterLike[pz.nx.NamedArray]
    eps: float = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        dtype = x.dtype

        def normalise(v: jax.Array) -> jax.Array:  # [seq, freq, channel]
            v = v.astype(jnp.float32)
            count = jnp.cumsum(jnp.full(v.shape[:1], v.shape[1] * v.shape[2], jnp.float32))
            count = jnp.maximum(count, 1.0)[:, None, None]
            mean = jnp.cumsum(v.sum(axis=(1, 2), keepdims=True), axis=0) / count
            squares = ((v - mean) ** 2).sum(axis=(1, 2), keepdims=True)
            variance = jnp.cumsum(squares, axis=0) / count
            return (v - mean) * jax.lax.rsqrt(variance + self.eps)

        y = pz.nx.nmap(normalise)(x.untag("seq", "freq", "channel")).tag("seq", "freq", "channel")
        return (y * self.scale.value.astype(jnp.float32)).astype(dtype)


@pz.pytree_dataclass
class MaskPaddedFrames(pz.nn.Layer):
    """Zeroes the frames that are padding (reads the side input ``valid_input``, [batch,
    seq] bool), as transformers does before the light convolution. Padding sits at the
    end and the kernel is causal, so this changes only the padded frames (their residual
    stream restarts from zero)."""

    valid_input: str = dataclasses.field(default=FRAME_VALID, metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return x * side_inputs[self.valid_input].astype(x.dtype)


@pz.pytree_dataclass
class GatedLinearUnit(pz.nn.Layer):
    """``a * sigmoid(b)`` where ``a``, ``b`` are the two entries of the ``glu`` axis (torch's
    ``glu`` over the first and second halves of the projection)."""

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return pz.nx.nmap(lambda v: v[0] * jax.nn.sigmoid(v[1]))(x.untag("glu"))


@pz.pytree_dataclass
class DepthwiseCausalConv(pz.nn.Layer):
    """One kernel per channel along time, causal: output frame ``t`` reads frames
    ``t - K + 1 .. t`` (zeros before the start). ``kernel`` is torch's depthwise Conv1d
    weight ``[conv_channel, group_channel=1, kernel]``."""

    kernel: pz.nn.ParameterLike[pz.nx.NamedArray]

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        weights = self.kernel.value[{"group_channel": 0}].astype(x.dtype)

        def conv(v: jax.Array, w: jax.Array) -> jax.Array:  # [seq], [kernel]
            size, frames = w.shape[0], v.shape[0]
            padded = jnp.pad(v, (size - 1, 0))
            windows = jnp.stack([padded[k : k + frames] for k in range(size)])
            return jnp.dot(w, windows)

        return pz.nx.nmap(conv)(x.untag("seq"), weights.untag("kernel")).tag("seq")


@pz.pytree_dataclass
class PerDimScale(pz.nn.Layer):
    """``q * q_scale * softplus(per_dim_scale)``: the query scaling of USM attention, one
    learned factor per head dimension (``q_scale = head_dim**-0.5 / softplus(0)``, so a
    zero ``per_dim_scale`` is plain ``head_dim**-0.5``)."""

    per_dim_scale: pz.nn.ParameterLike[pz.nx.NamedArray]
    q_scale: float = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, q: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        factor = pz.nx.nmap(jax.nn.softplus)(self.per_dim_scale.value).astype(q.dtype)
        return q * jnp.asarray(self.q_scale, q.dtype) * factor


def _chunk_indices(chunk_size: int, chunks: int, context: int) -> np.ndarray:
    """``[chunk, context]`` indices into a sequence padded by L frames in front: chunk
    ``u``'s window starts at padded index ``u * W`` (frame ``u * W - L``)."""
    return np.arange(chunks)[:, None] * chunk_size + np.arange(context)[None, :]


@pz.pytree_dataclass
class ChunkedAttentionMixer(pz.nn.Layer):
    """Chunked local attention with relative positions: ``(q, k, v)`` (``QKV_AXES``) ->
    ``z`` (``QKV_AXES``), through scores and pattern in the chunked layout
    ``[batch, heads, chunk, chunk_pos, context]`` (see the module docstring).

    ``scores = softcap(q . k + q . pos_proj(sinusoid(q - k)))``, masked where the key is
    padding (side input ``valid_input``; frames outside the sequence too) or outside
    ``-R <= q - k <= L``; softmax in float32. The weights are always explicit: a chunk
    sees only C keys, so they cost ``seq * C`` per head, not ``seq**2``.

    Attributes:
      pos_proj: projects the ``[rel_pos, embedding]`` sinusoids of the distances
        ``L, L-1, ..., -R`` to ``[rel_pos, heads, head_dim]``.
      softcap: ``cap * tanh(scores / cap)``.
      chunk_size, max_past, max_future: W, L, R.
    """

    pos_proj: pz.nn.Linear
    softcap: TanhSoftCap
    hook_attn_scores: HookPoint
    hook_pattern: HookPoint
    chunk_size: int = dataclasses.field(metadata={"pytree_node": False})
    max_past: int = dataclasses.field(metadata={"pytree_node": False})
    max_future: int = dataclasses.field(metadata={"pytree_node": False})
    valid_input: str = dataclasses.field(default=FRAME_VALID, metadata={"pytree_node": False})
    # Gemma 4's variant (`gemmalens.audio.gemma4`); None keeps Gemma 3n's rule. The keys a
    # query sees, as distances q - k (inclusive): Gemma 3n ``(-R, L)``.
    visible_distances: tuple[int, int] | None = dataclasses.field(
        default=None, metadata={"pytree_node": False}
    )
    # The relative embeddings: the distance the first one encodes and how many there are
    # (Gemma 3n: ``L`` and ``L + R + 1``). Embedding ``f`` scores the context key ``f``
    # places after the query's own chunk position, whatever distance it encodes.
    relative_start: int | None = dataclasses.field(default=None, metadata={"pytree_node": False})
    relative_count: int | None = dataclasses.field(default=None, metadata={"pytree_node": False})

    @property
    def context_size(self) -> int:
        return self.chunk_size + self.max_past + self.max_future

    @property
    def _visible(self) -> tuple[int, int]:
        if self.visible_distances is None:
            return (-self.max_future, self.max_past)
        return self.visible_distances

    @property
    def _relative(self) -> tuple[int, int]:
        start = self.max_past if self.relative_start is None else self.relative_start
        count = self.max_past + self.max_future + 1
        return start, count if self.relative_count is None else self.relative_count

    def _to_chunks(self, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
        """``seq`` -> ``chunk``, ``chunk_pos`` (zero-padded at the end)."""
        w = self.chunk_size
        frames = x.named_shape["seq"]
        chunks = -(-frames // w)
        return pz.nx.nmap(lambda a: jnp.pad(a, (0, chunks * w - frames)).reshape(chunks, w))(
            x.untag("seq")
        ).tag("chunk", "chunk_pos")

    def _to_context(self, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
        """``seq`` -> ``chunk``, ``context``: each chunk's key window, zero (or False)
        outside the sequence."""
        w, frames = self.chunk_size, x.named_shape["seq"]
        index = _chunk_indices(w, -(-frames // w), self.context_size)
        pad = (self.max_past, self.max_future + w - 1)
        return pz.nx.nmap(lambda a: jnp.pad(a, pad)[index])(x.untag("seq")).tag("chunk", "context")

    def relative_embeddings(self, dtype: jnp.dtype) -> pz.nx.NamedArray:
        """``pos_proj`` of the sinusoids of the distances ``q - k = L, L-1, ..., -R``:
        ``[rel_pos, heads, head_dim]``, entry ``f`` for distance ``L - f`` (with
        ``relative_start`` / ``relative_count`` set: ``start - f`` for ``count`` entries)."""
        width = self.pos_proj.weights.value.named_shape["embedding"]
        timescales = width // 2
        # float32 as transformers computes it (a float32 arange times the increment).
        increment = np.float32(-math.log(1.0e4) / max(timescales - 1, 1))
        inv_timescales = jnp.exp(jnp.arange(timescales, dtype=jnp.float32) * increment)
        start, count = self._relative
        distances = jnp.arange(start, start - count, -1, dtype=jnp.float32)
        scaled = distances[:, None] * inv_timescales[None, :]
        signal = jnp.concatenate([jnp.sin(scaled), jnp.cos(scaled)], axis=-1).astype(dtype)
        return self.pos_proj(pz.nx.wrap(signal).tag("rel_pos", "embedding"))

    def __call__(
        self, qkv: tuple[pz.nx.NamedArray, pz.nx.NamedArray, pz.nx.NamedArray], **side_inputs: Any
    ) -> pz.nx.NamedArray:
        q, k, v = qkv
        frames = q.named_shape["seq"]
        w, context = self.chunk_size, self.context_size
        _, count = self._relative
        nearest, farthest = self._visible
        q_chunks = self._to_chunks(q)
        k_context, v_context = self._to_context(k), self._to_context(v)
        valid = self._to_context(side_inputs[self.valid_input])

        content = pz.nx.nmap(jnp.dot)(q_chunks.untag("head_dim"), k_context.untag("head_dim"))
        # The relative term of query w and context key c is q . E[c - w]: the key's distance
        # q - k = L - (c - w). Where c - w has no embedding it is 0; outside the visible
        # band (Gemma 3n: 0 <= c - w <= L + R) it is masked.
        relative = pz.nx.nmap(jnp.dot)(
            q_chunks.untag("head_dim"), self.relative_embeddings(q.dtype).untag("head_dim")
        )
        offset = np.arange(context)[None, :] - np.arange(w)[:, None]  # [chunk_pos, context]
        distance = self.max_past - offset
        band = (distance >= nearest) & (distance <= farthest)
        has_embedding = (offset >= 0) & (offset < count)
        shift = np.clip(offset, 0, count - 1)
        relative = pz.nx.nmap(
            lambda r: jnp.where(has_embedding, r[np.arange(w)[:, None], shift], 0)
        )(relative.untag("chunk_pos", "rel_pos")).tag("chunk_pos", "context")

        scores = self.softcap(content + relative)
        visible = pz.nx.nmap(lambda ok: ok[None, :] & band)(valid.untag("context")).tag(
            "chunk_pos", "context"
        )
        scores = pz.nx.nmap(jnp.where)(visible, scores, jnp.finfo(scores.dtype).min)
        scores = self.hook_attn_scores(scores, **side_inputs)
        pattern = pz.nx.nmap(lambda s: jax.nn.softmax(s.astype(jnp.float32)).astype(v.dtype))(
            scores.untag("context")
        ).tag("context")
        pattern = self.hook_pattern(pattern, **side_inputs)
        z = pz.nx.nmap(jnp.dot)(pattern.untag("context"), v_context.untag("context"))
        # Chunks back to frames; the padded queries of the last chunk are dropped.
        return pz.nx.nmap(lambda a: a.reshape(-1)[:frames])(z.untag("chunk", "chunk_pos")).tag(
            "seq"
        )


@pz.pytree_dataclass
class LocalAttention(pz.nn.Layer):
    """Gemma 3n audio self-attention: the query, key and value paths, the chunked mixer,
    ``hook_z``, the output projection (``post``).

    The same four-path shape as `gemmalens.layers.attention.Attention`, but its own class:
    code that selects `Attention` layers (KV caches, sharding checks, head patching)
    assumes a decoder's `DotProductAttention` mixer, which this is not.
    """

    query: pz.nn.Sequential
    key: pz.nn.Sequential
    value: pz.nn.Sequential
    mixer: ChunkedAttentionMixer
    hook_z: HookPoint
    output: pz.nn.Linear

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        q = self.query(x, **side_inputs)
        k = self.key(x, **side_inputs)
        v = self.value(x, **side_inputs)
        z = self.hook_z(self.mixer((q, k, v), **side_inputs), **side_inputs)
        return self.output(z, **side_inputs)


@pz.pytree_dataclass
class ReduceFrames(pz.nn.Layer):
    """Keeps every ``factor``-th frame (``seq`` -> ``audio_token``) and zeroes the padded
    ones (side input ``valid_input``), as the encoder's output."""

    factor: int = dataclasses.field(metadata={"pytree_node": False})
    valid_input: str = dataclasses.field(default=FRAME_VALID, metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        valid = reduce_mask(side_inputs[self.valid_input], self.factor)
        kept = pz.nx.nmap(lambda a: a[:: self.factor])(x.untag("seq")).tag("audio_token")
        return pz.nx.nmap(jnp.where)(valid, kept, jnp.zeros((), x.dtype))


def _shape_in(value: Any, axes: tuple[str, ...], name: str) -> tuple[int, ...]:
    """``value``'s shape in ``axes`` order: a named array must carry exactly ``axes``; an
    array-like is taken positionally."""
    if not isinstance(value, pz.nx.NamedArrayBase):
        return tuple(np.shape(value))
    named = dict(value.named_shape)
    if value.positional_shape or set(named) != set(axes):
        raise ValueError(
            f"{name} must have exactly the named axes {list(axes)}; got named axes {named} "
            f"and positional shape {value.positional_shape}."
        )
    return tuple(named[a] for a in axes)


def reduce_mask(valid: pz.nx.NamedArray, factor: int) -> pz.nx.NamedArray:
    """``[batch, seq]`` -> ``[batch, audio_token]``: the flags of the frames kept."""
    return pz.nx.nmap(lambda a: a[::factor])(valid.untag("seq")).tag("audio_token")


@pz.pytree_dataclass
class AudioEmbedder(pz.nn.Layer):
    """``Gemma3nMultimodalEmbedder`` for audio: soft tokens (the encoder's output) or hard
    audio token ids into the text width.

    Called with soft tokens ``[batch, audio_token, embedding]`` (audio width): RMS norm,
    ``hook_soft_emb_norm``, then `project`, ``hook_projected``. `embed_ids` is the hard
    path (table row, its own RMS norm, then `project`).
    """

    embedding: pz.nn.ParameterLike[pz.nx.NamedArray]
    hard_embedding_norm: RMSNorm
    soft_embedding_norm: RMSNorm
    hook_soft_emb_norm: HookPoint
    project: pz.nn.Sequential
    hook_projected: HookPoint
    vocab_offset: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, soft: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        h = self.hook_soft_emb_norm(self.soft_embedding_norm(soft), **side_inputs)
        return self.hook_projected(self.project(h, **side_inputs), **side_inputs)

    def embed_ids(self, ids: Any) -> pz.nx.NamedArray:
        """Hard audio tokens: ids in ``[vocab_offset, vocab_offset + vocab_size)`` (named
        ``batch``, ``seq``, or a plain ``[batch, seq]`` array) -> ``[batch, seq, embedding]``
        in the text width. Gemma 3n uses the last row for padded soft tokens."""
        table = self.embedding.value
        vocab = table.named_shape["vocab"]
        if isinstance(ids, np.ndarray | list | tuple):
            # Checked where the ids are on the host: a jax gather would clamp silently.
            host = np.asarray(ids)
            if host.size and (
                host.min() < self.vocab_offset or host.max() >= self.vocab_offset + vocab
            ):
                raise ValueError(
                    f"Hard audio token ids must lie in [{self.vocab_offset}, "
                    f"{self.vocab_offset + vocab}); got ids from {host.min()} to {host.max()}."
                )
        if not isinstance(ids, pz.nx.NamedArrayBase):
            ids = pz.nx.wrap(jnp.asarray(ids)).tag("batch", "seq")
        rows = take_rows(table, ids, lambda i: i - self.vocab_offset)
        return self.project(self.hard_embedding_norm(rows))


@pz.pytree_dataclass(kw_only=True)
class AudioTower(pz.nn.Layer):
    """Log-mel features -> Gemma 3n audio soft tokens in the text width, and their mask.

    Called as ``tower(input_features, input_features_mask=mask)`` with the arrays
    transformers' ``Gemma3nAudioFeatureExtractor`` (or `gemma3n_audio_features`) gives:
    ``input_features`` ``[batch, frame, mel]`` (or named ``batch``, ``frame``, ``mel``),
    ``input_features_mask`` ``[batch, frame]``, True for real audio (None: all real).
    transformers' encoder takes the negation (True = padding); ``Gemma3nModel`` negates it.

    Returns ``(soft_tokens, mask)``: soft tokens named ``batch``, ``audio_token``,
    ``embedding`` (text width), and a bool mask named ``batch``, ``audio_token``, True for
    tokens of real audio (the negation of transformers' ``audio_mel_mask``). Padded tokens
    are the projection of zeros, i.e. zeros; Gemma 3n's merge replaces them by
    ``embedder.embed_ids(vocab_offset + vocab_size - 1)``.
    """

    subsample: pz.nn.Sequential
    blocks: pz.nn.Sequential
    reduce: pz.nn.Sequential
    embedder: AudioEmbedder
    input_feat_size: int = dataclasses.field(metadata={"pytree_node": False})
    time_stride: int = dataclasses.field(metadata={"pytree_node": False})
    reduction_factor: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(
        self, input_features: Any, input_features_mask: Any = None, **side_inputs: Any
    ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
        features, frame_valid = self.named_inputs(input_features, input_features_mask)
        h = self.subsample(features, **side_inputs)
        valid = subsample_mask(frame_valid, h.named_shape["seq"], self.time_stride)
        side_inputs = {**side_inputs, FRAME_VALID: valid}
        h = self.blocks(h, **side_inputs)
        h = self.reduce(h, **side_inputs)
        return self.embedder(h, **side_inputs), reduce_mask(valid, self.reduction_factor)

    def named_inputs(
        self, input_features: Any, input_features_mask: Any = None
    ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
        """The features (``batch``, ``frame``, ``mel``) and the frame mask (``batch``,
        ``frame``, bool, True = real audio) as named arrays, after checking their shapes."""
        mel = self.input_feat_size
        expected = f"[batch, frames, {mel}] (input_feat_size {mel} mel bins)"
        shape = _shape_in(input_features, FEATURE_AXES, "input_features")
        if len(shape) != 3:
            raise ValueError(f"input_features must be {expected}; got shape {shape}.")
        if shape[2] != mel:
            raise ValueError(
                f"input_features must be {expected}; got shape {shape}, with {shape[2]} mel "
                "bins. Compute them with gemmalens.audio.gemma3n_audio_features."
            )
        if shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"input_features must be {expected} with frames; got shape {shape}.")
        if not isinstance(input_features, pz.nx.NamedArrayBase):
            input_features = pz.nx.wrap(jnp.asarray(input_features)).tag(*FEATURE_AXES)
        if input_features_mask is None:
            return input_features, pz.nx.wrap(jnp.ones(shape[:2], bool)).tag(*FEATURE_MASK_AXES)
        mask_shape = _shape_in(input_features_mask, FEATURE_MASK_AXES, "input_features_mask")
        if mask_shape != shape[:2]:
            raise ValueError(
                f"input_features_mask must be [batch, frames] = {list(shape[:2])} like "
                f"input_features {shape}; got shape {mask_shape}."
            )
        mask = input_features_mask
        if not isinstance(mask, pz.nx.NamedArrayBase):
            mask = pz.nx.wrap(jnp.asarray(mask)).tag(*FEATURE_MASK_AXES)
        return input_features, mask != 0


def subsample_mask(frame_valid: pz.nx.NamedArray, frames: int, stride: int) -> pz.nx.NamedArray:
    """``[batch, frame]`` -> ``[batch, seq]``: subsampled frame ``t`` takes the flag of input
    frame ``t * stride`` (the first its convolutions read), clipped to the last frame, as
    transformers does."""
    last = frame_valid.named_shape["frame"] - 1
    index = np.minimum(np.arange(frames) * stride, last)
    return pz.nx.nmap(lambda a: a[index])(frame_valid.untag("frame")).tag("seq")


def dense_pattern(pattern: Any, config: Gemma3nAudioConfig, frames: int) -> jax.Array:
    """A chunked pattern (``audio.blocks.{i}.attn.hook_pattern``, ``[batch, heads, chunk,
    chunk_pos, context]``) as a dense ``[batch, heads, seq, kv_seq]`` one over ``frames``
    subsampled frames: zero outside each query's window. Weights on positions outside the
    sequence (which carry zero values) are dropped, so ``dense @ v`` is still ``z``."""
    w, left = config.conf_attention_chunk_size, config.max_past_horizon
    pattern = jnp.asarray(pattern)
    q = np.arange(frames)[:, None]
    k = np.arange(frames)[None, :]
    context = k - (q // w) * w + left
    inside = (context >= 0) & (context < config.context_size)
    dense = pattern[:, :, q // w, q % w, np.clip(context, 0, config.context_size - 1)]
    return jnp.where(inside, dense, jnp.zeros((), pattern.dtype))


# -------------------------------------------------------------------------------- builders


def _residual(name: str, branch: list[pz.nn.Layer]) -> pz.nn.NamedGroup:
    return pz.nn.NamedGroup(name=name, sublayers=[pz.nn.Residual(pz.nn.Sequential(branch))])


def build_feed_forward(params: ParamBuilder, audio: Gemma3nAudioConfig) -> pz.nn.NamedGroup:
    """Half of the macaron feed-forward: ``x + w * post_norm(clamp(W2 silu(W1
    pre_norm(clamp(x)))))`` with ``w = conf_residual_weight``. ``params`` is its scope
    (``audio.blocks.3.ffw_start``), which also names its hooks."""
    return conformer_feed_forward(
        params, audio.hidden_size, audio.gradient_clipping, audio.conf_residual_weight
    )


def conformer_feed_forward(
    params: ParamBuilder,
    width: int,
    clip: float,
    residual_weight: float,
    linear: Any = None,
) -> pz.nn.NamedGroup:
    """`build_feed_forward` from plain numbers, shared with Gemma 4's conformer.
    ``linear(name, out_axes, in_axes)`` makes the two projections (default
    ``params.linear``; Gemma 4 passes clipped ones)."""
    linear = linear or params.linear
    return _residual(
        params.prefix.rstrip("."),
        [
            Clamp(clip),
            RMSNorm.build(
                params, "pre_layer_norm", "embedding", width, CONFORMER_NORM_EPS, "plain"
            ),
            linear("ffw_layer_1", {"neurons": 4 * width}, {"embedding": width}),
            params.hook("hook_pre", NEURON_AXES),
            pz.nn.Elementwise(jax.nn.silu),
            params.hook("hook_post", NEURON_AXES),
            linear("ffw_layer_2", {"embedding": width}, {"neurons": 4 * width}),
            Clamp(clip),
            RMSNorm.build(
                params, "post_layer_norm", "embedding", width, CONFORMER_NORM_EPS, "plain"
            ),
            pz.nn.ConstantRescale(by=residual_weight),
            params.hook("hook_out", RESID_AXES),
        ],
    )


def build_attention(params: ParamBuilder, audio: Gemma3nAudioConfig) -> LocalAttention:
    """The chunked local self-attention (``params`` is ``audio.blocks.3.attn``)."""
    heads = {"heads": audio.conf_num_attention_heads, "head_dim": audio.head_dim}
    embedding = {"embedding": audio.hidden_size}
    # float32 as transformers' buffer: head_dim**-0.5 times 1 / softplus(0) = 1 / ln 2.
    q_scale = float(np.float32(audio.head_dim**-0.5) * (np.float32(1.0) / np.float32(np.log(2.0))))
    return LocalAttention(
        query=pz.nn.Sequential(
            [
                params.linear("q_proj", heads, embedding),
                PerDimScale(
                    params("per_dim_scale", {"head_dim": audio.head_dim}, init="zeros"), q_scale
                ),
                params.hook("hook_q", QKV_AXES),
            ]
        ),
        key=pz.nn.Sequential(
            [params.linear("k_proj", heads, embedding), params.hook("hook_k", QKV_AXES)]
        ),
        value=pz.nn.Sequential(
            [params.linear("v_proj", heads, embedding), params.hook("hook_v", QKV_AXES)]
        ),
        mixer=ChunkedAttentionMixer(
            pos_proj=params.linear("pos_proj", heads, embedding),
            softcap=TanhSoftCap(audio.conf_attention_logit_cap),
            hook_attn_scores=params.hook("hook_attn_scores", CHUNK_AXES),
            hook_pattern=params.hook("hook_pattern", CHUNK_AXES),
            chunk_size=audio.conf_attention_chunk_size,
            max_past=audio.max_past_horizon,
            max_future=audio.max_future_horizon,
        ),
        hook_z=params.hook("hook_z", QKV_AXES),
        output=params.linear("post", embedding, heads),
    )


def build_light_conv(params: ParamBuilder, audio: Gemma3nAudioConfig) -> pz.nn.NamedGroup:
    """The light convolution module (``params`` is ``audio.blocks.3.lconv``): RMS norm,
    GLU projection, causal depthwise convolution, clamp, RMS norm, SiLU, projection."""
    return conformer_light_conv(
        params,
        audio.hidden_size,
        audio.rms_norm_eps,
        audio.gradient_clipping,
        audio.conf_conv_kernel_size,
    )


def conformer_light_conv(
    params: ParamBuilder,
    width: int,
    eps: float,
    clip: float,
    kernel_size: int,
    linear: Any = None,
) -> pz.nn.NamedGroup:
    """`build_light_conv` from plain numbers, shared with Gemma 4's conformer (``linear``
    as in `conformer_feed_forward`)."""
    linear = linear or params.linear
    channels = {"conv_channel": width}
    kernel_axes = {"group_channel": 1, "kernel": kernel_size}
    return _residual(
        params.prefix.rstrip("."),
        [
            RMSNorm.build(params, "pre_layer_norm", "embedding", width, eps, "plain"),
            linear("linear_start", {"glu": 2, **channels}, {"embedding": width}),
            GatedLinearUnit(),
            params.hook("hook_glu", LCONV_AXES),
            DepthwiseCausalConv(
                params("depthwise_conv1d.weights", channels, kernel_axes, layout="conv")
            ),
            params.hook("hook_conv", LCONV_AXES),
            Clamp(clip),
            RMSNorm.build(params, "conv_norm", "conv_channel", width, eps, "plain"),
            pz.nn.Elementwise(jax.nn.silu),
            linear("linear_end", {"embedding": width}, channels),
            params.hook("hook_out", RESID_AXES),
        ],
    )


def build_block(params: ParamBuilder, audio: Gemma3nAudioConfig, index: int) -> pz.nn.NamedGroup:
    """One conformer block: feed-forward half, attention, light convolution, feed-forward
    half, then clamp and RMS norm; residual hook points between the modules."""
    block = params.scope(f"blocks.{index}")
    width, clip = audio.hidden_size, audio.gradient_clipping
    attn = block.scope("attn")
    return pz.nn.NamedGroup(
        name=block.prefix.rstrip("."),
        sublayers=[
            block.hook("hook_resid_pre", RESID_AXES),
            build_feed_forward(block.scope("ffw_start"), audio),
            block.hook("hook_resid_after_ffw_start", RESID_AXES),
            _residual(
                attn.prefix.rstrip("."),
                [
                    Clamp(clip),
                    RMSNorm.build(
                        attn, "pre_attn_norm", "embedding", width, CONFORMER_NORM_EPS, "plain"
                    ),
                    build_attention(attn, audio),
                    Clamp(clip),
                    RMSNorm.build(
                        attn, "post_norm", "embedding", width, CONFORMER_NORM_EPS, "plain"
                    ),
                    block.hook("hook_attn_out", RESID_AXES),
                ],
            ),
            block.hook("hook_resid_after_attn", RESID_AXES),
            MaskPaddedFrames(),
            build_light_conv(block.scope("lconv"), audio),
            block.hook("hook_resid_after_lconv", RESID_AXES),
            build_feed_forward(block.scope("ffw_end"), audio),
            block.hook("hook_resid_after_ffw_end", RESID_AXES),
            Clamp(clip),
            RMSNorm.build(block, "norm", "embedding", width, CONFORMER_NORM_EPS, "plain"),
            block.hook("hook_resid_post", RESID_AXES),
        ],
    )


def build_subsample(params: ParamBuilder, audio: Gemma3nAudioConfig) -> pz.nn.Sequential:
    """The two subsampling convolutions and the input projection (``params`` is
    ``audio``): ``[batch, frame, mel]`` -> ``[batch, seq, embedding]``."""
    sub = params.scope("subsample")
    layers: list[pz.nn.Layer] = [FeaturesAsImage()]
    in_channels = 1
    for i, out_channels in enumerate(audio.sscp_conv_channel_size):
        conv = sub.scope(f"conv_{i}")
        (kernel_t, kernel_f), stride = (
            audio.sscp_conv_kernel_size[i],
            audio.sscp_conv_stride_size[i],
        )
        kernel_axes = {"channel": in_channels, "kernel_time": kernel_t, "kernel_freq": kernel_f}
        layers.append(
            pz.nn.NamedGroup(
                name=conv.prefix.rstrip("."),
                sublayers=[
                    SubsampleConv2d(
                        conv(
                            "conv.weights",
                            {"out_channel": out_channels},
                            kernel_axes,
                            layout="conv",
                        ),
                        stride=stride,
                        # Time: kernel - 1 frames after the end; frequency: one bin each side.
                        padding=((0, kernel_t - 1), (1, 1)),
                    ),
                    CumulativeGroupNorm(
                        conv("norm.scale", {"channel": out_channels}, init="ones"),
                        audio.sscp_conv_group_norm_eps,
                    ),
                    pz.nn.Elementwise(jax.nn.relu),
                    conv.hook("hook_out", CONV_AXES),
                ],
            )
        )
        in_channels = out_channels
    flat = {"freq": audio.freq_sizes[-1], "channel": in_channels}
    layers += [
        sub.linear("input_proj_linear", {"embedding": audio.hidden_size}, flat),
        params.hook("hook_subsampled", RESID_AXES),
    ]
    return pz.nn.Sequential(layers)


def build_embedder(params: ParamBuilder, config: Gemma3nAudioTowerConfig) -> AudioEmbedder:
    """The soft-token embedder (parameters under ``audio.embed``, hooks under ``audio``)."""
    audio = config.audio
    embed = params.scope("embed")
    width, eps = audio.hidden_size, audio.rms_norm_eps
    return AudioEmbedder(
        embedding=embed("embedding.embeddings", {"vocab": audio.vocab_size}, {"embedding": width}),
        hard_embedding_norm=RMSNorm.build(
            embed, "hard_embedding_norm", "embedding", width, eps, "plain"
        ),
        soft_embedding_norm=RMSNorm.build(
            embed, "soft_embedding_norm", "embedding", width, eps, "plain"
        ),
        hook_soft_emb_norm=params.hook("hook_soft_emb_norm", TOKEN_AXES),
        project=pz.nn.Sequential(
            [
                # The audio and text widths both go by ``embedding``; rename the input so
                # the projection's two axes differ.
                pz.nn.RenameAxes("embedding", "audio_embedding"),
                embed.linear(
                    "embedding_projection",
                    {"embedding": config.text_hidden_size},
                    {"audio_embedding": width},
                ),
                RMSNorm.build(
                    embed,
                    "embedding_post_projection_norm",
                    "embedding",
                    config.text_hidden_size,
                    eps,
                    "none",
                ),
            ]
        ),
        hook_projected=params.hook("hook_projected", TOKEN_AXES),
        vocab_offset=audio.vocab_offset,
    )


def build_audio_tower(config: Gemma3nAudioTowerConfig, source: ParamSource) -> AudioTower:
    """Builds the tower, taking every parameter from ``source`` (labels under ``audio.``)."""
    audio = config.audio
    params = ParamBuilder(source).scope("audio")
    return AudioTower(
        subsample=build_subsample(params, audio),
        blocks=pz.nn.Sequential(
            [build_block(params, audio, i) for i in range(audio.conf_num_hidden_layers)]
        ),
        reduce=pz.nn.Sequential(
            [
                params.hook("hook_encoded", RESID_AXES),
                ReduceFrames(audio.conf_reduction_factor),
                params.hook("hook_soft_tokens", TOKEN_AXES),
            ]
        ),
        embedder=build_embedder(params, config),
        input_feat_size=audio.input_feat_size,
        time_stride=audio.time_stride,
        reduction_factor=audio.conf_reduction_factor,
    )


# ----------------------------------------------------------------------- checkpoint names

_BLOCK_PARTS = (
    (r"^ffw_start\.", "ffw_layer_start."),
    (r"^ffw_end\.", "ffw_layer_end."),
    (r"^lconv\.", "lconv1d."),
    (r"^attn\.(q_proj|k_proj|v_proj|per_dim_scale)", r"attention.attn.\1"),
    (r"^attn\.pos_proj\.", "attention.attn.relative_position_embedding.pos_proj."),
    (r"^attn\.", "attention."),
)


def hf_name(
    label: str, audio_prefix: str = HUB_AUDIO_PREFIX, embedder_prefix: str = HUB_EMBEDDER_PREFIX
) -> str:
    """A parameter label as transformers names the tensor, e.g.
    ``audio.blocks.3.attn.pos_proj.weights`` ->
    ``model.audio_tower.conformer.3.attention.attn.relative_position_embedding.pos_proj.weight``
    and ``audio.embed.embedding_projection.weights`` ->
    ``model.embed_audio.embedding_projection.weight``."""
    if not label.startswith("audio."):
        raise ValueError(f"{label!r} is not an audio tower parameter label (audio.*).")
    name = re.sub(r"\.(weights|scale|embeddings)$", ".weight", label.removeprefix("audio."))
    if name.startswith("embed."):
        return embedder_prefix + name.removeprefix("embed.")
    if name.startswith("subsample."):
        return audio_prefix + "subsample_conv_projection." + name.removeprefix("subsample.")
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match is None:
        raise ValueError(f"{label!r} is not an audio tower parameter label.")
    index, rest = match.groups()
    for pattern, replacement in _BLOCK_PARTS:
        rest, done = re.subn(pattern, replacement, rest)
        if done:
            break
    return f"{audio_prefix}conformer.{index}.{rest}"


def from_checkpoint(
    ckpt: TensorIndex,
    config: Gemma3nAudioTowerConfig,
    dtype: Any = jnp.float32,
    audio_prefix: str | None = None,
    embedder_prefix: str | None = None,
) -> AudioTower:
    """The tower with its parameters read from an open checkpoint (a `CheckpointDir`, or
    any `TensorIndex`) by transformers tensor name.

    Prefixes left as None are found in the checkpoint (`AUDIO_PREFIXES`,
    `EMBEDDER_PREFIXES`). Tensors outside the two prefixes (the language model, the vision
    tower) are ignored; every missing, unexpected or mis-shaped tensor is reported at once,
    before anything is read.
    """
    if audio_prefix is None:
        audio_prefix = find_prefix(
            ckpt,
            AUDIO_PREFIXES,
            "subsample_conv_projection.input_proj_linear.weight",
            "Gemma 3n audio",
        )
    if embedder_prefix is None:
        embedder_prefix = find_prefix(
            ckpt, EMBEDDER_PREFIXES, "embedding_projection.weight", "Gemma 3n audio embedder"
        )

    def ignore(key: str) -> bool:
        return not (key.startswith(audio_prefix) or key.startswith(embedder_prefix))

    return build_from_checkpoint(
        ckpt,
        config.build,
        lambda label: hf_name(label, audio_prefix, embedder_prefix),
        dtype,
        ignore=ignore,
        show_progress=False,
    )


def from_state_dict(
    config: Gemma3nAudioTowerConfig,
    arrays: Mapping[str, np.ndarray],
    dtype: Any = jnp.float32,
    audio_prefix: str | None = None,
    embedder_prefix: str | None = None,
) -> AudioTower:
    """`from_checkpoint` on tensors held in memory: ``arrays`` maps transformers tensor
    names to numpy arrays, e.g. a ``Gemma3nForConditionalGeneration`` state dict as
    ``{k: v.float().numpy() for k, v in model.state_dict().items()}`` (``model.audio_tower.``
    and ``model.embed_audio.``; other tensors are ignored)."""
    ckpt = MappedCheckpoint.from_arrays(arrays)
    return from_checkpoint(ckpt, config, dtype, audio_prefix, embedder_prefix)
