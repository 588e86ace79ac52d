"""Gemma 4's audio encoder and ``embed_audio`` as Penzai layers, and how its soft tokens
enter Gemma 4's text stream.

Gemma 4's tower (transformers 5.23 ``Gemma4AudioModel``, E2B and E4B) is a close relative
of Gemma 3n's USM conformer (`gemmalens.audio.gemma3n`), whose layers it reuses; only what
differs lives here. The forward pass, with the hook point that names each value::

    input_features [batch, frame, mel]   log-mel (`gemmalens.audio.gemma4_audio_features`)
    input_features_mask [batch, frame]   True = real audio
      -> 2 x (zero padded frames -> Conv2d 3x3 stride 2, padding 1 on both axes
         -> LayerNorm over channels (no bias) -> ReLU)      audio.subsample.conv_{0,1}.hook_out
         the frame mask keeps every 2nd flag per convolution
      -> flatten (frequency x channel) -> input_proj_linear  audio.hook_subsampled
      -> conformer blocks                                    audio.blocks.{i}.*
         as Gemma 3n's, but: every projection clips its input and output to bounds
         stored in the checkpoint; keys are scaled by ln(1 + e) / ln 2; a query sees the
         keys 0 <= q - k < L (and 0 < k - q < R), one fewer on each side than Gemma 3n;
         the relative embeddings encode distances C // 2 .. 0; padded frames are not
         zeroed before the light convolution
      -> output_proj (with bias, to ``output_proj_dims``)    audio.hook_soft_tokens
         (transformers' ``last_hidden_state``; one soft token per subsampled frame)
      -> RMS norm without a weight (``embed_audio``)         audio.hook_soft_emb_norm
      -> embedding_projection (to the text width)            audio.hook_projected
    soft tokens [batch, audio_token, embedding], mask [batch, audio_token]

Block hook points have Gemma 3n's names and shapes (``audio.blocks.{i}.hook_resid_pre``,
``ffw_start.hook_pre``, ``attn.hook_q``, ``attn.hook_pattern`` in the chunked layout
``[batch, heads, chunk, chunk_pos, context]``, ``lconv.hook_conv``, ``hook_resid_post``,
...); `gemmalens.audio.gemma3n.dense_pattern(pattern, config.audio.audio, frames)`
spreads a pattern over ``[seq, kv_seq]``.

In the text stream (transformers' ``Gemma4Model.forward``): the soft tokens of padded
frames are dropped and the rest fill the ``audio_token_id`` placeholders in order, clip
after clip (`Gemma4EmbedWithAudio`, ``hook_audio_embed``); each clip's run of
placeholders is exactly as long as its real soft tokens (the processor writes them so).
The per-layer inputs read the pad row there; attention stays causal around audio.
`audio_side_inputs` checks a call's clips against its placeholders (`gemmalens.Model` calls
it through `gemmalens.audio.merge.audio_side_inputs`, which serves both families).

Parameter labels sit under ``audio.``; `hf_name` turns them into transformers' names
(``model.audio_tower.*``, ``model.embed_audio.*``).
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

from gemmalens.audio.gemma3n import (
    CHUNK_AXES,
    CONFORMER_NORM_EPS,
    CONV_AXES,
    FEATURE_AXES,
    FEATURE_MASK_AXES,
    FRAME_VALID,
    TOKEN_AXES,
    ChunkedAttentionMixer,
    Clamp,
    FeaturesAsImage,
    LocalAttention,
    MaskPaddedFrames,
    PerDimScale,
    SubsampleConv2d,
    conformer_feed_forward,
    conformer_light_conv,
    subsample_mask,
)
from gemmalens.audio.merge import _no_tower_message, feature_arrays
from gemmalens.families.hf_config import expect_model_type
from gemmalens.layers.attention import QKV_AXES
from gemmalens.layers.embeddings import TanhSoftCap
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.norms import LayerNorm, RMSNorm
from gemmalens.layers.params import CountsParameters, ParamBuilder, ParamSource
from gemmalens.layers.transformer import RESID_AXES
from gemmalens.vision.gemma4 import ClippedLinear
from gemmalens.vision.merge import describe_runs, image_runs, place_soft_tokens

__all__ = [
    "EMBEDDER_PREFIX",
    "INPUT_FEATURES",
    "INPUT_FEATURES_MASK",
    "TOWER_PREFIX",
    "Gemma4AudioConfig",
    "Gemma4AudioEncoderConfig",
    "Gemma4AudioTower",
    "Gemma4EmbedWithAudio",
    "audio_side_inputs",
    "build_audio_tower",
    "hf_name",
    "soft_token_counts",
]

# Where Gemma4ForConditionalGeneration files (Hub and transformers 5.23) keep the tower
# and its embedder.
TOWER_PREFIX = "model.audio_tower."
EMBEDDER_PREFIX = "model.embed_audio."
# The side inputs of a call with audio: the feature extractor's names.
INPUT_FEATURES = "input_features"
INPUT_FEATURES_MASK = "input_features_mask"
# The frame masks at the input of each subsampling convolution ([batch, seq] bool): each
# convolution zeroes its padded input frames first.
CONV_VALID = ("audio_conv_valid_0", "audio_conv_valid_1")
# The 0-d bounds of the clipped linears: checkpoint buffers, not parameters.
_BUFFERS = re.compile(r"\.(input_min|input_max|output_min|output_max)$")


# ---------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Gemma4AudioConfig:
    """Architecture of Gemma 4's audio tower (field names and defaults as transformers'
    ``Gemma4AudioConfig``, the E2B and E4B tower: 1024 wide, 12 conformer blocks of 8
    heads, chunks of 12 frames, clipped linears, output 1536 wide).

    ``attention_invalid_logits_value`` is what transformers writes into masked scores; a
    softmax gives the same weights with gemmalens' most negative float, which it uses."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    def __post_init__(self):
        channels = tuple(int(c) for c in self.subsampling_conv_channels)
        if len(channels) != 2:
            raise ValueError(
                "Gemma 4 audio subsampling_conv_channels must have two entries (one per "
                f"subsampling convolution); got {self.subsampling_conv_channels!r}."
            )
        object.__setattr__(self, "subsampling_conv_channels", channels)
        if self.hidden_act != "silu":
            raise ValueError(
                f"Gemma 4 audio hidden_act {self.hidden_act!r} is not implemented; the "
                "released tower uses 'silu'."
            )
        if self.hidden_size % self.num_attention_heads or self.hidden_size % 2:
            raise ValueError(
                f"Gemma 4 audio hidden_size ({self.hidden_size}) must be even and a multiple "
                f"of num_attention_heads ({self.num_attention_heads})."
            )
        if self.attention_chunk_size < 1 or self.attention_context_left < 1:
            raise ValueError(
                "Gemma 4 audio attention_chunk_size and attention_context_left must be >= 1; "
                f"got {self.attention_chunk_size}, {self.attention_context_left}."
            )
        if self.attention_context_right < 0:
            raise ValueError(
                f"attention_context_right must be >= 0; got {self.attention_context_right}."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_past(self) -> int:
        """L = ``attention_context_left - 1``: the chunk windows reach L frames back."""
        return self.attention_context_left - 1

    @property
    def context_size(self) -> int:
        """C = W + L + R: the key frames one chunk of W queries reads."""
        return self.attention_chunk_size + self.max_past + self.attention_context_right

    # Gemma 3n's names for W and L, so that `gemmalens.audio.gemma3n.dense_pattern` spreads
    # this tower's chunked patterns too.
    @property
    def conf_attention_chunk_size(self) -> int:
        return self.attention_chunk_size

    @property
    def max_past_horizon(self) -> int:
        return self.max_past

    @property
    def input_feat_size(self) -> int:
        """Mel bins the tower reads: transformers sizes ``input_proj_linear`` for
        ``subsampling_conv_channels[0]`` bins (128, the feature extractor's)."""
        return self.subsampling_conv_channels[0]

    @property
    def freq_sizes(self) -> tuple[int, int, int]:
        """The frequency size before, between and after the two convolutions (3x3, stride
        2, one bin of padding on each side: ``ceil(n / 2)``)."""
        sizes = [self.input_feat_size]
        for _ in range(2):
            sizes.append((sizes[-1] - 1) // 2 + 1)
        return tuple(sizes)  # type: ignore[return-value]

    @property
    def time_stride(self) -> int:
        """Input frames per encoder frame: the two stride-2 convolutions."""
        return 4

    @staticmethod
    def subsampled_frames(frames: int) -> int:
        """Soft tokens of ``frames`` input frames, padded or not: ``ceil(ceil(frames/2)/2)``."""
        for _ in range(2):
            frames = (frames - 1) // 2 + 1
        return frames

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Gemma4AudioConfig:
        """Reads a transformers ``gemma4_audio`` config dict (a Gemma 4 config's
        ``audio_config``); keys it leaves out take transformers' defaults."""
        expect_model_type(hf, "gemma4_audio", "a Gemma 4 audio config")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})


@dataclasses.dataclass(frozen=True)
class Gemma4AudioEncoderConfig(CountsParameters):
    """The audio encoder of a Gemma 4 model: the tower and ``embed_audio`` (a weightless
    RMS norm with the tower's ``rms_norm_eps``, then a projection from ``output_proj_dims``
    to ``text_hidden_size``). ``num_params()`` counts as transformers does (the clipping
    bounds are buffers)."""

    audio: Gemma4AudioConfig
    text_hidden_size: int

    def build(self, source: ParamSource, scope: str = "") -> Gemma4AudioTower:
        """The Penzai tower, every parameter taken from ``source`` (labels and hook names
        under ``{scope}audio.``)."""
        return build_audio_tower(self, source, scope)

    def counts_as_parameter(self, label: str) -> bool:
        return not _BUFFERS.search(label)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Gemma4AudioEncoderConfig:
        """Reads a transformers ``gemma4`` config dict: ``audio_config`` and
        ``text_config.hidden_size``."""
        audio = Gemma4AudioConfig.from_hf(hf.get("audio_config") or {})
        text = hf.get("text_config") or {}
        return cls(audio, text.get("hidden_size", 2304))


# ---------------------------------------------------------------------------------- layers


@pz.pytree_dataclass(kw_only=True)
class Gemma4AudioTower(pz.nn.Layer):
    """Log-mel features -> Gemma 4 audio soft tokens in the text width, and their mask.

    Called as ``tower(input_features, input_features_mask)``: ``[batch, frame, mel]`` and
    ``[batch, frame]`` (True = real audio; None: all real), plain or named arrays. Returns
    ``(soft_tokens, mask)``: ``[batch, audio_token, embedding]`` (text width) for every
    subsampled frame, and ``[batch, audio_token]`` bool, True for the tokens of real audio
    (transformers keeps only those). Other side inputs are not read.
    """

    subsample: pz.nn.Sequential
    blocks: pz.nn.Sequential
    output: pz.nn.Sequential
    input_feat_size: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(
        self, input_features: Any, input_features_mask: Any = None, **side_inputs: Any
    ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
        features = _named(input_features, FEATURE_AXES, "input_features")
        frames = features.named_shape["frame"]
        if features.named_shape["mel"] != self.input_feat_size:
            raise ValueError(
                f"input_features must be [batch, frames, {self.input_feat_size}] (the tower's "
                f"mel bins); got named shape {dict(features.named_shape)}. Compute them with "
                "gemmalens.audio.gemma4_audio_features."
            )
        if input_features_mask is None:
            valid = pz.nx.wrap(jnp.ones((features.named_shape["batch"], frames), bool))
            valid = valid.tag(*FEATURE_MASK_AXES)
        else:
            valid = _named(input_features_mask, FEATURE_MASK_AXES, "input_features_mask") != 0
        # Each convolution zeroes its padded input frames; its output frame t takes the
        # flag of input frame 2t. Composed: input frame 2t, then 4t.
        half = (frames - 1) // 2 + 1
        quarter = (half - 1) // 2 + 1
        side = {
            CONV_VALID[0]: subsample_mask(valid, frames, 1),
            CONV_VALID[1]: subsample_mask(valid, half, 2),
        }
        h = self.subsample(features, **side)
        side = {FRAME_VALID: subsample_mask(valid, quarter, 4)}
        h = self.blocks(h, **side)
        tokens = self.output(h, **side)
        mask = side[FRAME_VALID].untag("seq").tag("audio_token")
        return tokens, mask


def _named(value: Any, axes: tuple[str, ...], name: str) -> pz.nx.NamedArray:
    """``value`` as a named array with ``axes`` (a plain array is read in that order)."""
    if isinstance(value, pz.nx.NamedArrayBase):
        if value.positional_shape or set(value.named_shape) != set(axes):
            raise ValueError(
                f"{name} must have exactly the named axes {list(axes)}; got named axes "
                f"{dict(value.named_shape)} and positional shape {value.positional_shape}."
            )
        return value
    array = jnp.asarray(value)
    if array.ndim != len(axes) or 0 in array.shape:
        raise ValueError(f"{name} must be [{', '.join(axes)}]; got shape {array.shape}.")
    return pz.nx.wrap(array).tag(*axes)


# -------------------------------------------------------------------------------- builders


def _linear_factory(params: ParamBuilder, clipped: bool):
    """The tower's projections: `ClippedLinear` with its four bounds, or plain."""
    if not clipped:
        return params.linear
    return lambda name, out_axes, in_axes: ClippedLinear.build(params, name, out_axes, in_axes)


def build_subsample(params: ParamBuilder, audio: Gemma4AudioConfig) -> pz.nn.Sequential:
    """The two subsampling convolutions and the input projection (``params`` is
    ``audio``): ``[batch, frame, mel]`` -> ``[batch, seq, embedding]``."""
    sub = params.scope("subsample")
    layers: list[pz.nn.Layer] = [FeaturesAsImage()]
    in_channels = 1
    for i, out_channels in enumerate(audio.subsampling_conv_channels):
        conv = sub.scope(f"conv_{i}")
        kernel_axes = {"channel": in_channels, "kernel_time": 3, "kernel_freq": 3}
        layers.append(
            pz.nn.NamedGroup(
                name=conv.prefix.rstrip("."),
                sublayers=[
                    MaskPaddedFrames(valid_input=CONV_VALID[i]),
                    SubsampleConv2d(
                        conv(
                            "conv.weights",
                            {"out_channel": out_channels},
                            kernel_axes,
                            layout="conv",
                        ),
                        stride=(2, 2),
                        padding=((1, 1), (1, 1)),
                    ),
                    LayerNorm.build(
                        conv, "norm", "channel", out_channels, audio.rms_norm_eps, bias=False
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


def build_attention(params: ParamBuilder, audio: Gemma4AudioConfig) -> LocalAttention:
    """The chunked local self-attention (``params`` is ``audio.blocks.3.attn``): Gemma 3n's
    mixer with Gemma 4's key scaling, visible band and relative distances."""
    heads = {"heads": audio.num_attention_heads, "head_dim": audio.head_dim}
    embedding = {"embedding": audio.hidden_size}
    linear = _linear_factory(params, audio.use_clipped_linears)
    left, right = audio.max_past, audio.attention_context_right
    # float32, as torch multiplies a float32 tensor by a Python scalar.
    q_scale = float(np.float32(audio.head_dim**-0.5 / math.log(2.0)))
    k_scale = float(np.float32(math.log(1.0 + math.e) / math.log(2.0)))
    half = audio.context_size // 2
    return LocalAttention(
        query=pz.nn.Sequential(
            [
                linear("q_proj", heads, embedding),
                PerDimScale(
                    params("per_dim_scale", {"head_dim": audio.head_dim}, init="zeros"), q_scale
                ),
                params.hook("hook_q", QKV_AXES),
            ]
        ),
        key=pz.nn.Sequential(
            [
                linear("k_proj", heads, embedding),
                pz.nn.ConstantRescale(by=k_scale),
                params.hook("hook_k", QKV_AXES),
            ]
        ),
        value=pz.nn.Sequential(
            [linear("v_proj", heads, embedding), params.hook("hook_v", QKV_AXES)]
        ),
        mixer=ChunkedAttentionMixer(
            pos_proj=params.linear("relative_k_proj", heads, embedding),
            softcap=TanhSoftCap(audio.attention_logit_cap),
            hook_attn_scores=params.hook("hook_attn_scores", CHUNK_AXES),
            hook_pattern=params.hook("hook_pattern", CHUNK_AXES),
            chunk_size=audio.attention_chunk_size,
            max_past=left,
            max_future=right,
            # transformers' window: 0 <= q - k < L, or 0 < k - q < R.
            visible_distances=(-max(right - 1, 0), left - 1),
            # Sinusoids of C // 2, ..., 0, laid from the query's own position on.
            relative_start=half,
            relative_count=half + 1,
        ),
        hook_z=params.hook("hook_z", QKV_AXES),
        output=linear("post", embedding, heads),
    )


def build_block(params: ParamBuilder, audio: Gemma4AudioConfig, index: int) -> pz.nn.NamedGroup:
    """One conformer block: feed-forward half, attention, light convolution, feed-forward
    half, then clamp and RMS norm, with Gemma 3n's hook points."""
    block = params.scope(f"blocks.{index}")
    width, clip = audio.hidden_size, audio.gradient_clipping
    attn = block.scope("attn")

    def feed_forward(name: str) -> pz.nn.NamedGroup:
        scope = block.scope(name)
        linear = _linear_factory(scope, audio.use_clipped_linears)
        return conformer_feed_forward(scope, width, clip, audio.residual_weight, linear)

    def norm(name: str) -> RMSNorm:
        return RMSNorm.build(block, name, "embedding", width, CONFORMER_NORM_EPS, "plain")

    lconv = block.scope("lconv")
    return pz.nn.NamedGroup(
        name=block.prefix.rstrip("."),
        sublayers=[
            block.hook("hook_resid_pre", RESID_AXES),
            feed_forward("ffw_start"),
            block.hook("hook_resid_after_ffw_start", RESID_AXES),
            pz.nn.NamedGroup(
                name=attn.prefix.rstrip("."),
                sublayers=[
                    pz.nn.Residual(
                        pz.nn.Sequential(
                            [
                                Clamp(clip),
                                norm("norm_pre_attn"),
                                build_attention(attn, audio),
                                Clamp(clip),
                                norm("norm_post_attn"),
                                block.hook("hook_attn_out", RESID_AXES),
                            ]
                        )
                    )
                ],
            ),
            block.hook("hook_resid_after_attn", RESID_AXES),
            conformer_light_conv(
                lconv,
                width,
                audio.rms_norm_eps,
                clip,
                audio.conv_kernel_size,
                _linear_factory(lconv, audio.use_clipped_linears),
            ),
            block.hook("hook_resid_after_lconv", RESID_AXES),
            feed_forward("ffw_end"),
            block.hook("hook_resid_after_ffw_end", RESID_AXES),
            Clamp(clip),
            norm("norm_out"),
            block.hook("hook_resid_post", RESID_AXES),
        ],
    )


def build_audio_tower(
    config: Gemma4AudioEncoderConfig, source: ParamSource, scope: str = ""
) -> Gemma4AudioTower:
    """Builds the tower and ``embed_audio``, every parameter from ``source`` (labels under
    ``{scope}audio.``)."""
    audio = config.audio
    params = ParamBuilder(source, scope).scope("audio")
    output = pz.nn.Sequential(
        [
            pz.nn.RenameAxes("seq", "audio_token"),
            params.affine(
                "output_proj",
                {"audio_embedding": audio.output_proj_dims},
                {"embedding": audio.hidden_size},
            ),
            pz.nn.RenameAxes("audio_embedding", "embedding"),
            params.hook("hook_soft_tokens", TOKEN_AXES),
            RMSNorm(scale=None, axis="embedding", eps=audio.rms_norm_eps, form="none"),
            params.hook("hook_soft_emb_norm", TOKEN_AXES),
            # The audio and text widths both go by ``embedding``; rename the input so the
            # projection's two axes differ.
            pz.nn.RenameAxes("embedding", "audio_embedding"),
            params.linear(
                "embedding_projection",
                {"embedding": config.text_hidden_size},
                {"audio_embedding": audio.output_proj_dims},
            ),
            params.hook("hook_projected", TOKEN_AXES),
        ]
    )
    return Gemma4AudioTower(
        subsample=build_subsample(params, audio),
        blocks=pz.nn.Sequential(
            [build_block(params, audio, i) for i in range(audio.num_hidden_layers)]
        ),
        output=output,
        input_feat_size=audio.input_feat_size,
    )


# ----------------------------------------------------------------------- checkpoint names

_BLOCK_PARTS = (
    (r"^ffw_start\.", "feed_forward1."),
    (r"^ffw_end\.", "feed_forward2."),
    (r"^lconv\.", "lconv1d."),
    (r"^attn\.", "self_attn."),
)
# Projections that sit in a Gemma4ClippableLinear (``.linear.weight``), clipping or not.
_CLIPPABLE = re.compile(
    r"\.(q_proj|k_proj|v_proj|post|ffw_layer_1|ffw_layer_2|linear_start|linear_end)\.weights$"
)


def hf_name(
    label: str, tower_prefix: str = TOWER_PREFIX, embedder_prefix: str = EMBEDDER_PREFIX
) -> str:
    """A parameter label as transformers names the tensor, e.g.
    ``audio.blocks.3.ffw_start.ffw_layer_1.weights`` ->
    ``model.audio_tower.layers.3.feed_forward1.ffw_layer_1.linear.weight``,
    ``audio.blocks.3.attn.q_proj.input_min`` -> ``...layers.3.self_attn.q_proj.input_min``
    and ``audio.embedding_projection.weights`` ->
    ``model.embed_audio.embedding_projection.weight``."""
    if not label.startswith("audio."):
        raise ValueError(f"{label!r} is not an audio tower parameter label (audio.*).")
    name = label.removeprefix("audio.")
    if name == "embedding_projection.weights":
        return embedder_prefix + "embedding_projection.weight"
    if name.startswith("subsample."):
        name = "subsample_conv_projection." + name.removeprefix("subsample.")
        name = re.sub(r"\.conv_(\d)\.", r".layer\1.", name)
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match is not None:
        index, rest = match.groups()
        for pattern, replacement in _BLOCK_PARTS:
            rest, done = re.subn(pattern, replacement, rest)
            if done:
                break
        name = f"layers.{index}.{rest}"
    name = _CLIPPABLE.sub(r".\1.linear.weight", name)
    name = re.sub(r"\.(weights|scale)$", ".weight", name)
    return tower_prefix + name


# ---------------------------------------------------------------------- the text stream


@pz.pytree_dataclass
class Gemma4EmbedWithAudio(pz.nn.Layer):
    """Gemma 4's embedding with audio: the inner embedding (the token embedding, or an
    `EmbedWithImages` around it), then each clip's soft tokens of real audio at the
    ``audio_token_id`` placeholders, in order (as transformers' ``masked_scatter``).

    Input: token ids (named ``batch``, ``seq``). Side inputs ``input_features`` (named
    ``batch`` (one per clip), ``frame``, ``mel``) and ``input_features_mask`` (``batch``,
    ``frame``); without them the layer is the inner embedding. Output
    ``[batch, seq, embedding]``.

    Attributes:
      embed: the inner embedding.
      audio: the tower and ``embed_audio`` (hook points ``audio.*``).
      hook_audio_embed: the soft tokens at their positions in the text stream (zero
        elsewhere); what it holds at placeholders is what the stream gets there.
      audio_token_id: the placeholder id (258 881 in the released checkpoints).
    """

    embed: pz.nn.Layer
    audio: Gemma4AudioTower
    hook_audio_embed: HookPoint
    audio_token_id: int = dataclasses.field(metadata={"pytree_node": False})

    @classmethod
    def around(
        cls, embed: pz.nn.Layer, audio: Gemma4AudioTower, scope: ParamBuilder, audio_token_id: int
    ) -> Gemma4EmbedWithAudio:
        """``embed`` with the tower ``audio``; ``hook_audio_embed`` named in ``scope``."""
        hook = scope.hook("hook_audio_embed", ("batch", "seq", "embedding"))
        return cls(embed=embed, audio=audio, hook_audio_embed=hook, audio_token_id=audio_token_id)

    def __call__(self, tokens: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        embedded = self.embed(tokens, **side_inputs)
        features = side_inputs.get(INPUT_FEATURES)
        if features is None:
            return embedded
        # The tower sees only its own inputs: the text's masks and positions are not its own.
        soft, valid = self.audio(features, side_inputs.get(INPUT_FEATURES_MASK))
        is_audio = tokens == self.audio_token_id
        placed = place_soft_tokens(
            is_audio.unwrap("batch", "seq"),
            soft.unwrap(*TOKEN_AXES).astype(embedded.dtype),
            valid.unwrap("batch", "audio_token"),
        )
        placed = self.hook_audio_embed(
            pz.nx.wrap(placed).tag("batch", "seq", "embedding"), **side_inputs
        )
        return pz.nx.nmap(jnp.where)(is_audio, placed, embedded)


# ------------------------------------------------------------------------ the call's inputs


def soft_token_counts(input_features_mask: np.ndarray) -> list[int]:
    """Soft tokens of real audio per clip (the encoder's output mask, on the host):
    ``[clip, frame]`` bool -> the number of subsampled frames ``t`` whose input frame
    ``4t`` is real."""
    mask = np.asarray(input_features_mask, bool)
    frames = mask.shape[1]
    index = np.arange(Gemma4AudioConfig.subsampled_frames(frames)) * 4
    return [int(n) for n in mask[:, index].sum(axis=1)]


def audio_side_inputs(
    config: Any,
    tokens: np.ndarray,
    input_features: Any = None,
    input_features_mask: Any = None,
    token_type_ids: Any = None,
) -> dict[str, pz.nx.NamedArray] | None:
    """Checks one call's audio against its tokens (Gemma 4) and returns the side inputs
    the model reads (``input_features``, ``input_features_mask``), or None for a call
    without audio.

    Args:
      config: a `gemmalens.families.gemma4.Gemma4Config`; ``config.audio`` is its
        tower (None: no tower).
      tokens: ``[batch, seq]`` ids with one run of ``config.audio_token_id`` placeholders
        per clip, as long as the clip's soft tokens of real audio (`soft_token_counts`),
        between start- and end-of-audio tokens, as Gemma 4's processor writes them.
      input_features: ``[num_clips, frames, mel]`` log-mels, clips in the order of their
        runs, row-major over the batch: `gemmalens.audio.gemma4_audio_features`' result
        (which holds the mask), the feature extractor's output (a mapping), or the array.
      input_features_mask: ``[num_clips, frames]``, True for real audio; None: all real.
      token_type_ids: the processor's ``mm_token_type_ids`` (3 = audio), checked against
        the placeholders.

    Raises:
      ValueError: input_features for a model without an audio tower, audio tokens without
        input_features, input_features without audio tokens, a number of runs other than
        the number of clips, a run whose length is not its clip's soft-token count, a wrong
        feature, mask or token-type shape.
    """
    tokens = np.asarray(tokens)
    encoder = getattr(config, "audio", None)
    audio_id = config.audio_token_id
    runs = image_runs(tokens, audio_id)
    if token_type_ids is not None:
        types = np.asarray(token_type_ids)
        if types.shape == tokens.shape and not np.array_equal(types == 3, tokens == audio_id):
            raise ValueError(
                f"mm_token_type_ids mark audio (3) elsewhere than the audio tokens (id "
                f"{audio_id}); pass the processor's mm_token_type_ids with its input_ids, or "
                "leave them out."
            )
    if encoder is None:
        # A text model reads placeholders as tokens (as Gemma4ForCausalLM); one with a
        # vision tower refuses them (`gemmalens.vision.merge.gemma4_side_inputs`).
        if input_features is not None or input_features_mask is not None:
            raise ValueError(_no_tower_message(config))
        return None
    if input_features is None:
        if input_features_mask is not None:
            raise ValueError("input_features_mask was given without input_features.")
        if runs:
            count = sum(b - a for _, a, b in runs)
            raise ValueError(
                f"tokens hold {count} audio token(s) (id {audio_id}) in {len(runs)} run(s) but "
                "no input_features were given: pass input_features=gemma4_audio_features("
                "waveforms) (gemmalens.audio; or the feature extractor's input_features and "
                "input_features_mask), one clip per run, or take the audio tokens out of the "
                "prompt."
            )
        return None
    features, mask = feature_arrays(
        input_features,
        input_features_mask,
        encoder.audio.input_feat_size,
        "gemma4_audio_features",
    )
    counts = soft_token_counts(mask)
    per_clip = ", ".join(f"clip {i}: {n}" for i, n in enumerate(counts))
    if not runs:
        raise ValueError(
            f"input_features hold {len(features)} clip(s) but the tokens have no audio tokens "
            f"(id {audio_id}): each clip needs its own run of as many audio tokens as its soft "
            f"tokens of real audio ({per_clip}), between start- and end-of-audio tokens, as "
            "Gemma 4's processor writes them."
        )
    if len(runs) != len(features):
        raise ValueError(
            f"tokens hold {len(runs)} run(s) of audio tokens (id {audio_id}) but input_features "
            f"has {len(features)} clip(s); each clip needs its own run of audio tokens "
            f"({per_clip}), between start- and end-of-audio tokens. Runs: "
            f"{describe_runs(runs)}."
        )
    wrong = [
        f"clip {i} has {c} soft tokens but its run row {r} [{a}:{b}] holds {b - a} audio tokens"
        for i, (c, (r, a, b)) in enumerate(zip(counts, runs))
        if c != b - a
    ]
    if wrong:
        raise ValueError(
            "Each clip's run of audio tokens must be as long as its soft tokens of real audio "
            "(one per 4 frames of real audio, rounded up): " + "; ".join(wrong) + ". Build "
            "the prompt from the same features (gemmalens.audio.gemma4.soft_token_counts)."
        )
    return {
        INPUT_FEATURES: pz.nx.wrap(jnp.asarray(features)).tag(*FEATURE_AXES),
        INPUT_FEATURES_MASK: pz.nx.wrap(jnp.asarray(mask)).tag(*FEATURE_MASK_AXES),
    }
