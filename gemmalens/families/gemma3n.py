"""Gemma 3n text decoder: AltUp streams, LAuReL, per-layer embeddings, sparse gates, shared KV.

What a block does (``a`` = ``altup_active_idx``, K = ``altup_num_inputs`` streams):

    streams ──AltUp router + predict──> predictions
       predictions[a] ──hook_resid_pre──> x
          x + post_attn_norm(attention(norm(x))) + laurel(norm(x)), all / sqrt(2)  ──hook_resid_mid
          + post_ffw_norm(MLP(pre_ffw_norm(.)))  (Gaussian top-k gate on sparse layers)
       ──hook_resid_post──> y
    AltUp correct(predictions, y) ──> corrected
    corrected[1:] += per-layer-input gate(corrected[a] * correct_output_scale)  ──hook_streams_post

The standard TransformerLens points (``hook_resid_pre/mid/post``, ``attn.*``,
``hook_attn_out``, ``mlp.*``, ``hook_mlp_out``) therefore show the **active stream** only:
``hook_resid_pre`` is the active *prediction* (the layer's input) and ``hook_resid_post``
the layer's output before the correction spreads it. The whole stream tensor is visible at
``blocks.{i}.altup.hook_predictions`` / ``hook_corrected`` and ``blocks.{i}.hook_streams_post``
(``[batch, pos, stream, d_model]``).

Gemma 3n-only hook points, per block ``i``:

* ``altup.hook_prediction_modalities`` / ``hook_correction_modalities`` ``[batch, pos, K]``:
  the router output (tanh) before the prediction and before the correction;
* ``altup.hook_prediction_coefs`` ``[batch, pos, K, K]``: ``C[r, c]`` in
  ``pred[r] = s[r] + sum_c C[r, c] s[c]``; ``altup.hook_predictions``;
* ``altup.hook_correction_coefs`` ``[batch, pos, K]`` (the ``+1`` included),
  ``altup.hook_innovation`` ``[batch, pos, d_model]`` (= resid_post - predictions[a]),
  ``altup.hook_corrected`` (``predictions + coefs * innovation``, before the per-layer input);
* ``laurel.hook_out``: LAuReL's output ``x + norm(right(left(x)))``;
* ``hook_per_layer_input`` ``[batch, pos, P]``: this layer's per-layer input;
  ``hook_per_layer_out`` ``[batch, pos, d_model]``: what it adds to streams 1..K-1;
* ``mlp.hook_pre`` is the gate *before* sparsification; on layers with
  ``activation_sparsity_pattern[i] > 0``, ``mlp.hook_pre_sparse`` is the gate after it
  (``relu(gate - cutoff)``), which feeds the GELU;
* ``hook_streams_post``: all streams at the block's output (the next block's input).

Model-level: ``hook_embed``, ``hook_altup_expanded`` (the K initial streams),
``hook_altup_collapsed`` (their magnitude-matched mean), ``ln_final.hook_scale``,
``ln_final.hook_normalized``.

KV sharing: the last ``num_kv_shared_layers`` layers have no key/value projections; their
``attn.hook_k`` / ``hook_v`` show the keys and values borrowed from their producer
(`gemmalens.layers.kv_sharing`).

MatFormer: `matformer_config` / `matformer_submodel` cut a smaller Gemma 3n (fewer layers,
narrower MLPs) out of a bigger one as a model of its own.

Images and audio (``vision`` / ``audio`` set, ``gl.load(path, vision=True, audio=True)``):
the embedding is a `gemmalens.audio.merge.Gemma3nMultimodalEmbedding`: hard vision and
audio tokens through ``embed_vision`` / ``embed_audio``, each image's soft tokens
(MobileNetV5, `gemmalens.vision.mobilenetv5`, hook points ``vision.*``, then
``vision.hook_soft_tokens``) at its run of image placeholders (``hook_image_embed``), each
clip's (the conformer, `gemmalens.audio.gemma3n`, ``audio.*``) at its run of audio
placeholders (``hook_audio_embed``). Attention stays causal around both.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.audio.gemma3n import Gemma3nAudioTowerConfig
from gemmalens.audio.merge import (
    Gemma3nAudioEmbedderConfig,
    Gemma3nImageEncoderConfig,
    Gemma3nVisionEmbedderConfig,
)
from gemmalens.audio.merge import build_embedding as build_multimodal_embedding
from gemmalens.families.gemma3 import RopeConfig, _rope_from_hf
from gemmalens.families.hf_config import reject_unimplemented, special_token_ids
from gemmalens.layers import (
    GatedMLP,
    HookPoint,
    ParamBuilder,
    RMSNorm,
    direct,
    stacking,
)
from gemmalens.layers.altup import STREAM_AXES, AltUpBlock, AltUpCollapse, AltUpExpand
from gemmalens.layers.builders import (
    FULL,
    SLIDING,
    AttentionSpec,
    alternating_layer_types,
    build_attention,
    check_layer_types,
    decoder_mask,
    embedding,
    final_norm,
    unembedding,
)
from gemmalens.layers.direct import Residual
from gemmalens.layers.kv_sharing import (
    KVSharingScope,
    kv_sharing_sources,
)
from gemmalens.layers.laurel import Laurel
from gemmalens.layers.params import CountsParameters, ParamSource
from gemmalens.layers.per_layer_embeddings import (
    PerLayerInputGate,
    PerLayerInputs,
)
from gemmalens.layers.transformer import RESID_AXES, DecoderLM
from gemmalens.lens import Model

MLP_AXES = ("batch", "seq", "neurons")


@dataclasses.dataclass(frozen=True)
class Gemma3nConfig(CountsParameters):
    """Architecture of a Gemma 3n text decoder (field names follow transformers).

    Per-layer fields (``intermediate_size``, ``activation_sparsity_pattern``,
    ``layer_types``) are tuples with one entry per layer; a single number is repeated for
    every layer. ``altup_coef_clip`` is kept for completeness: transformers clips the
    prediction coefficients only while training, so it is never applied here.

    ``audio`` (None: no audio tower) adds the audio tower and ``embed_audio`` of
    ``Gemma3nForConditionalGeneration``: the model then takes ``input_features`` and puts
    each clip's soft tokens in its run of ``audio_soft_tokens_per_image`` placeholders
    ``audio_token_id``. ``vision`` (None: no vision tower) adds the MobileNetV5 tower and
    ``embed_vision``: the model takes ``pixel_values`` and puts each image's soft tokens in
    its run of ``vision.soft_tokens_per_image`` placeholders ``image_token_id``
    (`gemmalens.audio.merge`). ``vision_embedder`` is ``embed_vision`` (set from
    ``vision`` when that is given; alone, beside the audio tower, it embeds the hard vision
    tokens only), ``audio_embedder`` ``embed_audio``'s hard path for a model with vision
    but no audio tower (transformers embeds the audio ids through it either way).
    ``num_params()`` counts the towers and the embedders too.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: tuple[int, ...]
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    sliding_window: int
    layer_types: tuple[str, ...]
    activation_sparsity_pattern: tuple[float, ...]
    num_kv_shared_layers: int
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_correct_scale: bool = True
    altup_coef_clip: float | None = 120.0
    laurel_rank: int = 64
    rope_local: RopeConfig = RopeConfig(theta=10_000.0)
    rope_global: RopeConfig = RopeConfig(theta=1_000_000.0)
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 32_768
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | tuple[int, ...] = 1
    audio: Gemma3nAudioTowerConfig | None = None
    vision_embedder: Gemma3nVisionEmbedderConfig | None = None
    vision: Gemma3nImageEncoderConfig | None = None
    audio_embedder: Gemma3nAudioEmbedderConfig | None = None
    audio_token_id: int = 262_273
    image_token_id: int = 262_145
    audio_soft_tokens_per_image: int = 188
    family: str = dataclasses.field(default="gemma3n", init=False)

    def __post_init__(self):
        layers = self.num_hidden_layers
        for name in ("intermediate_size", "activation_sparsity_pattern", "layer_types"):
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                value = (value,) * layers
            object.__setattr__(self, name, tuple(value))
            if len(getattr(self, name)) != layers:
                raise ValueError(
                    f"{name} has {len(value)} entries but num_hidden_layers is {layers}; give "
                    "one value per layer (or a single number for all layers)."
                )
        check_layer_types(self.layer_types, layers)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        bad = [s for s in self.activation_sparsity_pattern if not 0 <= s < 1]
        if bad:
            raise ValueError(
                f"activation_sparsity_pattern values must be in [0, 1) (a target fraction of "
                f"zero gates), got {bad}."
            )
        if not 0 <= self.altup_active_idx < self.altup_num_inputs:
            raise ValueError(
                f"altup_active_idx is {self.altup_active_idx}, but there are only "
                f"{self.altup_num_inputs} AltUp streams (altup_num_inputs)."
            )
        kv_sharing_sources(self.layer_types, self.num_kv_shared_layers)  # raises if invalid
        self._check_multimodal()

    def _check_multimodal(self) -> None:
        """The embedders write the text width, and the id ranges fit transformers' layout:
        vision hard tokens below the audio ones, the audio ones up to ``vocab_size``, whose
        last id (the padding of audio soft tokens) is an audio row."""
        if self.vision is not None:
            if self.vision_embedder is None:
                object.__setattr__(self, "vision_embedder", self.vision.embedder)
            elif self.vision_embedder != self.vision.embedder:
                raise ValueError(
                    "vision_embedder differs from vision.embedder; with the vision tower, "
                    "embed_vision is vision.embedder (leave vision_embedder out)."
                )
            if self.audio is None and self.audio_embedder is None:
                raise ValueError(
                    "A Gemma 3n model with its vision tower embeds the hard audio ids through "
                    "embed_audio, as transformers does: set audio (the tower) or "
                    "audio_embedder (its hard path alone)."
                )
        if self.audio is not None and self.audio_embedder is not None:
            raise ValueError("audio_embedder is for models without the audio tower; drop it.")
        if self.vision_embedder is not None and self.audio is None and self.vision is None:
            raise ValueError(
                "vision_embedder embeds Gemma 3n's hard vision tokens beside a tower; set "
                "audio or vision too."
            )
        if self.audio is None and self.vision is None:
            return
        embedders = []
        if self.audio is not None:
            embedders.append(("audio", self.audio.text_hidden_size))
        else:
            embedders.append(("audio", self.audio_embedder.text_hidden_size))
        if self.vision_embedder is not None:
            embedders.append(("vision", self.vision_embedder.text_hidden_size))
        for name, width in embedders:
            if width != self.hidden_size:
                raise ValueError(
                    f"The {name} embedder writes width {width} but hidden_size is "
                    f"{self.hidden_size}; they must match."
                )
        audio = self.audio.audio if self.audio is not None else self.audio_embedder
        low, high = audio.vocab_offset, audio.vocab_offset + audio.vocab_size
        if not low < self.vocab_size <= high:
            raise ValueError(
                f"The audio hard tokens are ids [{low}, {high}) (audio vocab_offset, "
                f"vocab_size) and must end the text vocabulary (vocab_size {self.vocab_size}): "
                "transformers embeds every id from vocab_offset on as audio and pads soft "
                "tokens with the last id."
            )
        if not low <= self.audio_token_id < self.vocab_size:
            raise ValueError(
                f"audio_token_id {self.audio_token_id} is not an audio hard token "
                f"([{low}, {self.vocab_size}))."
            )
        if self.audio_soft_tokens_per_image < 1:
            raise ValueError("audio_soft_tokens_per_image must be >= 1.")
        vision = self.vision_embedder
        if vision is not None and not (
            vision.vocab_offset < low <= vision.vocab_offset + vision.vocab_size
        ):
            raise ValueError(
                f"The vision hard tokens are ids [{vision.vocab_offset}, {low}) (up to the "
                f"audio ones); the vision table has {vision.vocab_size} rows from "
                f"{vision.vocab_offset}, which must cover them."
            )

    @property
    def kv_sources(self) -> tuple[int | None, ...]:
        """Per layer: the layer whose keys and values it reuses, or None."""
        return kv_sharing_sources(self.layer_types, self.num_kv_shared_layers)

    @staticmethod
    def default_layer_types(num_layers: int, pattern: int = 5) -> tuple[str, ...]:
        """Every ``pattern``-th layer global, the others sliding (4 local : 1 global)."""
        return alternating_layer_types(num_layers, pattern)

    @staticmethod
    def default_sparsity(num_layers: int) -> tuple[float, ...]:
        """transformers' default: 0.95 on the first 10 layers when there are more than 10."""
        sparse = 10 if num_layers > 10 else 0
        return (0.95,) * sparse + (0.0,) * (num_layers - sparse)

    def replace(self, **changes: Any) -> Gemma3nConfig:
        """A copy with some fields changed. A new ``num_hidden_layers`` gives default
        ``layer_types`` and sparsity, and repeats a uniform ``intermediate_size``, unless
        those are given too; the embedders follow a new ``hidden_size``."""
        if "hidden_size" in changes:
            width = changes["hidden_size"]
            audio = changes.get("audio", self.audio)
            if audio is not None:
                changes["audio"] = dataclasses.replace(audio, text_hidden_size=width)
            tower = changes.get("vision", self.vision)
            if tower is not None:
                embedder = dataclasses.replace(tower.embedder, text_hidden_size=width)
                changes["vision"] = dataclasses.replace(tower, embedder=embedder)
                changes["vision_embedder"] = embedder
            else:
                vision = changes.get("vision_embedder", self.vision_embedder)
                if vision is not None:
                    changes["vision_embedder"] = dataclasses.replace(vision, text_hidden_size=width)
            hard_audio = changes.get("audio_embedder", self.audio_embedder)
            if hard_audio is not None:
                changes["audio_embedder"] = dataclasses.replace(hard_audio, text_hidden_size=width)
        if "vision" in changes and "vision_embedder" not in changes:
            tower = changes["vision"]
            if tower is not None:  # a new tower brings its embedder
                changes["vision_embedder"] = tower.embedder
            elif changes.get("audio", self.audio) is None:  # no tower left: a text model
                changes["vision_embedder"] = None
                changes.setdefault("audio_embedder", None)
            # (Beside the audio tower, the hard vision tokens keep their embedder.)
        if "num_hidden_layers" in changes:
            layers = changes["num_hidden_layers"]
            changes.setdefault("layer_types", self.default_layer_types(layers))
            changes.setdefault("activation_sparsity_pattern", self.default_sparsity(layers))
            if "intermediate_size" not in changes:
                if len(set(self.intermediate_size)) != 1:
                    raise ValueError(
                        "This config has per-layer MLP widths; pass intermediate_size for the "
                        "new number of layers."
                    )
                changes["intermediate_size"] = self.intermediate_size[0]
        return dataclasses.replace(self, **changes)

    def build(self, source: ParamSource) -> DecoderLM:
        """The Penzai model, every parameter taken from ``source``."""
        return build_gemma3n(self, source)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Gemma3nConfig:
        """Reads a transformers ``gemma3n_text`` config dict (defaults as in transformers)."""
        reject_unimplemented(hf, "Gemma 3n")
        layers = hf.get("num_hidden_layers", 35)
        sparsity = hf.get("activation_sparsity_pattern")
        rope = _rope_from_hf(hf)
        return cls(
            vocab_size=hf.get("vocab_size", 262_400),
            hidden_size=hf.get("hidden_size", 2048),
            intermediate_size=hf.get("intermediate_size", 16_384),
            num_hidden_layers=layers,
            num_attention_heads=hf.get("num_attention_heads", 8),
            num_key_value_heads=hf.get("num_key_value_heads", 2),
            head_dim=hf.get("head_dim", 256),
            sliding_window=hf.get("sliding_window", 512),
            layer_types=tuple(hf.get("layer_types") or cls.default_layer_types(layers)),
            activation_sparsity_pattern=(
                cls.default_sparsity(layers) if sparsity is None else sparsity
            ),
            num_kv_shared_layers=hf.get("num_kv_shared_layers", 15),
            vocab_size_per_layer_input=hf.get("vocab_size_per_layer_input", 262_144),
            hidden_size_per_layer_input=hf.get("hidden_size_per_layer_input", 256),
            altup_num_inputs=hf.get("altup_num_inputs", 4),
            altup_active_idx=hf.get("altup_active_idx", 0),
            altup_correct_scale=bool(hf.get("altup_correct_scale", True)),
            altup_coef_clip=hf.get("altup_coef_clip", 120.0),
            laurel_rank=hf.get("laurel_rank", 64),
            rope_local=rope[SLIDING],
            rope_global=rope[FULL],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            final_logit_softcapping=hf.get("final_logit_softcapping", 30.0),
            max_position_embeddings=hf.get("max_position_embeddings", 32_768),
            **special_token_ids(hf),
        )


# ---------------------------------------------------------------------------- new layers


@pz.pytree_dataclass
class GaussianTopK(pz.nn.Layer):
    """Activation sparsity: ``relu(gate - (mean + z * std))`` over the ``neurons`` axis.

    ``z = Phi^-1(sparsity)`` (standard normal quantile; 1.6448536 for 0.95), rounded to
    float32 and then to the activation dtype as transformers does; mean and (population)
    std are per token. For Gaussian gate values, about a fraction ``sparsity`` of the
    neurons end at exactly 0 -- a top-k without sorting.
    """

    sparsity: float = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, gate: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        z = np.float32(statistics.NormalDist().inv_cdf(self.sparsity))

        def shift(g):  # g: [..., neurons]
            mean, std = jnp.mean(g, -1, keepdims=True), jnp.std(g, -1, keepdims=True)
            return jax.nn.relu(g - (mean + std * jnp.asarray(z).astype(g.dtype)))

        return direct.along(shift, gate, "neurons")


@pz.pytree_dataclass
class AttentionWithLaurel(pz.nn.Layer):
    """``(x + attention(norm(x)) + laurel(norm(x))) / sqrt(2)``, ``[batch, seq, embedding]``.

    Attention and LAuReL read the same normed input; the residual adds the *un-normed* x.
    ``attention`` holds the attention layer, its post-norm and ``hook_attn_out``.
    """

    input_layernorm: RMSNorm
    attention: pz.nn.Sequential
    laurel: Laurel

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        normed = self.input_layernorm(x, **side_inputs)
        attended = direct.add(x, self.attention(normed, **side_inputs))
        laurel = self.laurel(normed, **side_inputs)
        return direct.elementwise(lambda a, b: (a + b) / math.sqrt(2.0), attended, laurel)


@pz.pytree_dataclass
class PerLayerInputIntoStreams(pz.nn.Layer):
    """``streams[1:] += gate(streams[a] * correct_output_scale)`` (stream 0 is left alone,
    whatever ``a`` is, as in transformers). ``[batch, seq, stream, embedding]`` in and out;
    the added term passes ``hook_out`` (``blocks.{i}.hook_per_layer_out``, as in Gemma 4).

    ``correct_output_scale`` multiplies only when ``apply_output_scale``
    (``altup_correct_scale``); checkpoints store it either way.
    """

    active_index: int = dataclasses.field(metadata={"pytree_node": False})
    apply_output_scale: bool = dataclasses.field(metadata={"pytree_node": False})
    correct_output_scale: pz.nn.ParameterLike[pz.nx.NamedArray]
    gate: PerLayerInputGate
    hook_out: HookPoint

    def __call__(self, streams: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        active = direct.take(streams, "stream", self.active_index)
        if self.apply_output_scale:
            scale = self.correct_output_scale.value.astype(active.dtype)
            active = direct.multiply(active, scale)
        added = self.hook_out(self.gate(active, **side_inputs), **side_inputs)
        first = pz.nx.wrap(jnp.arange(streams.named_shape["stream"]) == 0).tag("stream")
        return direct.elementwise(lambda s, a, f: jnp.where(f, s, s + a), streams, added, first)


# ---------------------------------------------------------------------------- builders


def attention_spec(config: Gemma3nConfig, index: int) -> AttentionSpec:
    """Scaling 1.0 (the QK-norm replaces 1/sqrt(d)), ``plain`` QK-norm, value norm without
    weight; the last ``num_kv_shared_layers`` layers read an earlier layer's keys and
    values (`gemmalens.layers.kv_sharing`)."""
    layer_type = config.layer_types[index]
    return AttentionSpec(
        d_model=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rope=config.rope_global if layer_type == FULL else config.rope_local,
        mask=decoder_mask(layer_type, config.sliding_window),
        scale=1.0,
        norm_form="plain",
        eps=config.rms_norm_eps,
        value_norm=True,
        kv_source=config.kv_sources[index],
        publishes_kv=index in config.kv_sources,
    )


def build_mlp(config: Gemma3nConfig, params: ParamBuilder, index: int) -> GatedMLP:
    """The gated MLP of width ``intermediate_size[index]``, Gaussian top-k on sparse layers."""
    mlp = GatedMLP.build(params, params.prefix, config.hidden_size, config.intermediate_size[index])
    sparsity = config.activation_sparsity_pattern[index]
    if sparsity > 0:
        sparsify = pz.nn.Sequential(
            [GaussianTopK(sparsity), params.hook("hook_pre_sparse", MLP_AXES)]
        )
        mlp = dataclasses.replace(mlp, gate_sparsity=sparsify)
    return mlp


def build_block(config: Gemma3nConfig, params: ParamBuilder, index: int) -> pz.nn.NamedGroup:
    """AltUp(predict → attention ∥ LAuReL → MLP on the active stream → correct), then the
    per-layer input into streams 1..K-1."""
    width, eps = config.hidden_size, config.rms_norm_eps
    block = params.scope(f"blocks.{index}")
    prefix = block.prefix

    def norm(name):
        return RMSNorm.build(block, name, "embedding", width, eps, "plain")

    attention = build_attention(block.scope("attn"), attention_spec(config, index))
    active_layer = pz.nn.Sequential(
        [
            block.hook("hook_resid_pre", RESID_AXES),
            AttentionWithLaurel(
                input_layernorm=norm("input_layernorm"),
                attention=pz.nn.Sequential(
                    [
                        attention,
                        norm("post_attention_layernorm"),
                        block.hook("hook_attn_out", RESID_AXES),
                    ]
                ),
                laurel=Laurel.build(
                    block.scope("laurel"), prefix + "laurel.", width, config.laurel_rank, eps
                ),
            ),
            block.hook("hook_resid_mid", RESID_AXES),
            Residual(
                pz.nn.Sequential(
                    [
                        norm("pre_feedforward_layernorm"),
                        build_mlp(config, block.scope("mlp"), index),
                        norm("post_feedforward_layernorm"),
                        block.hook("hook_mlp_out", RESID_AXES),
                    ]
                )
            ),
            block.hook("hook_resid_post", RESID_AXES),
        ]
    )
    altup_params = block.scope("altup")
    return pz.nn.NamedGroup(
        name=f"blocks.{index}",
        sublayers=[
            AltUpBlock.build(
                altup_params,
                prefix + "altup.",
                active_layer,
                config.altup_num_inputs,
                config.altup_active_idx,
                width,
                eps,
            ),
            PerLayerInputIntoStreams(
                active_index=config.altup_active_idx,
                apply_output_scale=config.altup_correct_scale,
                correct_output_scale=altup_params(
                    "correct_output_scale", {"embedding": width}, init="zeros"
                ),
                gate=PerLayerInputGate.build(
                    block, prefix, index, width, config.hidden_size_per_layer_input, eps
                ),
                hook_out=block.hook("hook_per_layer_out", RESID_AXES),
            ),
            HookPoint(prefix + "hook_streams_post", STREAM_AXES),
        ],
    )


def build_gemma3n(config: Gemma3nConfig, source: ParamSource) -> DecoderLM:
    """Builds the Penzai model, taking every parameter from ``source`` (with towers:
    their parameters under ``vision.`` / ``audio.``, ``embed_vision``'s under
    ``embed_vision.``, the embedding a `Gemma3nMultimodalEmbedding`)."""
    params = ParamBuilder(source)
    width, streams = config.hidden_size, config.altup_num_inputs
    table, embed = embedding(params, config.vocab_size, width)
    if config.audio is not None or config.vision is not None:
        token_embedding, hook_embed = embed
        merged = build_multimodal_embedding(
            params,
            source,
            token_embedding,
            config.audio,
            config.vision_embedder,
            audio_token_id=config.audio_token_id,
            padding_id=config.vocab_size - 1,
            soft_tokens_per_clip=config.audio_soft_tokens_per_image,
            vision=config.vision,
            audio_embedder=config.audio_embedder,
            image_token_id=config.image_token_id,
        )
        embed = [merged, hook_embed]
    blocks: pz.nn.Layer = pz.nn.Sequential(
        [build_block(config, params, i) for i in range(config.num_hidden_layers)]
    )
    if config.num_kv_shared_layers:
        blocks = KVSharingScope(blocks)
    return DecoderLM(
        embed=pz.nn.Sequential(embed),
        per_layer_inputs=PerLayerInputs.build(
            params.scope("per_layer_inputs"),
            config.num_hidden_layers,
            width,
            config.hidden_size_per_layer_input,
            config.vocab_size_per_layer_input,
            config.rms_norm_eps,
        ),
        expand=AltUpExpand.build(
            params.scope("altup_expand"), "hook_altup_expanded", streams, width
        ),
        blocks=blocks,
        collapse=AltUpCollapse.build(
            params.scope("altup_collapse"), "hook_altup_collapsed", streams, width
        ),
        final_norm=final_norm(params, width, config.rms_norm_eps, "plain"),
        unembed=unembedding(table, config.final_logit_softcapping),
    )


# ---------------------------------------------------------------------------- MatFormer


def matformer_config(
    config: Gemma3nConfig, layers: Sequence[int], intermediate_size: int | Sequence[int]
) -> Gemma3nConfig:
    """The config of a MatFormer sub-model: ``layers`` of ``config`` (in order) with MLP
    widths ``intermediate_size`` (one number, or one per kept layer).

    Gemma 3n is trained nested ("MatFormer"): the first ``n`` neurons of each MLP, and
    some subsets of layers, form smaller models. Example: E4B without layers 20-24
    (KV-sharing layers) and with width 8192 has exactly E2B's architecture::

        matformer_config(gl.preset("gemma3n_e4b"), [*range(20), *range(25, 35)], 8192)

    Raises:
      ValueError: for layers out of range or repeated, a width larger than the original, or
        a cut that would make a KV-sharing layer read another producer than before (keep
        its producer, and no other layer of that type after it and before the first
        KV-sharing layer, in the sub-model).
    """
    layers = [int(i) for i in layers]
    if (
        sorted(set(layers)) != layers
        or not layers
        or not 0 <= layers[0] <= layers[-1] < (config.num_hidden_layers)
    ):
        raise ValueError(
            f"layers must be increasing, distinct indices in [0, {config.num_hidden_layers}); "
            f"got {layers}."
        )
    widths = (
        (intermediate_size,) * len(layers)
        if isinstance(intermediate_size, int)
        else tuple(intermediate_size)
    )
    if len(widths) != len(layers):
        raise ValueError(
            f"intermediate_size has {len(widths)} entries for {len(layers)} kept layers."
        )
    too_wide = [(i, w) for i, w in zip(layers, widths) if w > config.intermediate_size[i]]
    if too_wide:
        raise ValueError(
            "A sub-model's MLP can only keep neurons the original has: "
            + ", ".join(
                f"layer {i} has {config.intermediate_size[i]}, not {w}" for i, w in too_wide
            )
        )
    old_sources = config.kv_sources
    sub = dataclasses.replace(
        config,
        num_hidden_layers=len(layers),
        layer_types=tuple(config.layer_types[i] for i in layers),
        intermediate_size=widths,
        activation_sparsity_pattern=tuple(config.activation_sparsity_pattern[i] for i in layers),
        num_kv_shared_layers=sum(old_sources[i] is not None for i in layers),
    )
    for old, source in zip(layers, sub.kv_sources, strict=True):
        expected = old_sources[old]
        if source is not None and layers[source] != expected:
            raise ValueError(
                f"In this sub-model layer {old} would reuse the keys and values of layer "
                f"{layers[source]}, but it was trained with those of layer {expected}: keep "
                f"layer {expected} and drop the later {config.layer_types[old]} layers before "
                "the KV-sharing ones."
            )
    return sub


class _SlicedParams:
    """A `ParamSource` that reads a sub-model's parameters out of a bigger model's: layer
    ``j`` of the sub-model is layer ``layers[j]``, the ``layer`` axis (per-layer
    embeddings) is indexed by ``layers``, and ``neurons`` keeps its first entries."""

    def __init__(self, parameters: dict[str, pz.nx.NamedArray], layers: Sequence[int]):
        self.parameters = parameters
        self.layers = jnp.asarray(layers)
        self.dtype = next(iter(parameters.values())).dtype

    def __call__(self, request) -> pz.Parameter:
        label = re.sub(
            r"^blocks\.(\d+)\.",
            lambda m: f"blocks.{int(self.layers[int(m.group(1))])}.",
            request.label,
        )
        array = self.parameters[label].unwrap(*request.axes)
        for position, (axis, size) in enumerate(request.axes.items()):
            if axis == "layer":
                array = jnp.take(array, self.layers, axis=position)
            elif axis == "neurons":
                array = jax.lax.slice_in_dim(array, 0, size, axis=position)
            if array.shape[position] != size:
                raise ValueError(f"Cannot cut {label} ({axis}: {array.shape[position]} -> {size}).")
        return pz.Parameter(value=pz.nx.wrap(array).tag(*request.axes), label=request.label)


def matformer_submodel(
    model: Model, layers: Sequence[int], intermediate_size: int | Sequence[int]
) -> Model:
    """A MatFormer sub-model cut out of a loaded Gemma 3n (see `matformer_config`), as a
    model of its own: its weights are copies of the kept layers and neurons.

    Example: ``small = matformer_submodel(m, [*range(20), *range(25, 35)], 8192)``.
    """
    if not isinstance(model.config, Gemma3nConfig):
        raise TypeError(f"MatFormer sub-models are cut from Gemma 3n models, not {model!r}.")
    config = matformer_config(model.config, layers, intermediate_size)
    by_label = stacking.parameter_values(model.model)
    return Model(config.build(_SlicedParams(by_label, layers)), config, model.tokenizer)
