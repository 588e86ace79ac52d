"""Gemma 4 text decoder: per-layer head shapes, K=V global attention, MoE beside the dense MLP.

A block, as transformers computes it (``res`` = the residual stream)::

    hook_resid_pre
    res += post_attn_norm(attention(input_norm(res)))                     ──hook_attn_out
    hook_resid_mid
    res += post_ffw_norm(ffw(res))                                        ──hook_mlp_out
        ffw = post_ffw_norm_1(MLP(pre_ffw_norm(res)))  ──hook_dense_mlp_out   (MoE layers)
            + MoE(res)                                 ──moe.hook_out
        ffw = MLP(pre_ffw_norm(res))                                          (other layers)
    res += per_layer_input_gate(res)      (E2B/E4B)                       ──hook_per_layer_out
    res *= layer_scalar
    hook_resid_post

What is new against Gemma 3 (every other layer comes from `gemmalens.layers`):

* Attention: scaling 1.0 (QK-norm instead of 1/sqrt(d)), weighted RMS norms (``w``, not
  ``1 + w``), a weightless value norm. Global (full) layers have their own head dim
  (``global_head_dim``) and proportional, partial RoPE; with ``attention_k_eq_v`` they
  also have their own KV head count and no value projection: the *raw* key projection
  is the value (``attn.value`` holds the same ``k_proj`` as ``attn.key``), then the
  value norm.
* KV sharing and per-layer embeddings exactly as Gemma 3n (`gemmalens.layers.kv_sharing`,
  `gemmalens.layers.per_layer_embeddings`), without AltUp; with ``use_double_wide_mlp``
  the KV-sharing layers have an MLP twice as wide.
* Mixture of experts beside the dense MLP (`gemmalens.layers.moe`): hook points
  ``blocks.{i}.moe.hook_router_logits`` / ``hook_expert_weights`` ``[batch, pos, expert]``
  (weights dense over experts, zero off the chosen ones), ``hook_expert_indices``
  ``[batch, pos, k]``, ``moe.hook_out`` and ``hook_dense_mlp_out`` (the two summands).
* ``layer_scalar``: one number per layer that multiplies the whole residual stream at the
  end of the block (``hook_resid_post`` is after it).
* ``use_bidirectional_attention="all"`` (embedding models): every layer attends both ways,
  sliding layers to ``|q - k| <= sliding_window // 2 + 1``; `sentence_embeddings` mean-pools.
* Images (``vision`` set, ``gl.load(path, vision=True)``): the embedding is an
  `EmbedWithImages` around Gemma 4's tower (`gemmalens.vision.gemma4`, hook points
  ``vision.*`` and ``hook_image_embed``); the per-layer inputs read the pad row at the
  image, video and audio placeholders (their context part sees the soft tokens); with
  ``use_bidirectional_attention="vision"`` (26B, 31B) each image's tokens see each other
  both ways on sliding layers (`gemmalens.vision.merge`).
* Audio (``audio`` set, ``gl.load(path, audio=True)``, E2B and E4B): the embedding
  is a `gemmalens.audio.gemma4.Gemma4EmbedWithAudio` around it (hook points ``audio.*`` and
  ``hook_audio_embed``): each clip's soft tokens of real audio fill its run of audio
  placeholders; attention stays causal there. Video is not built.

Interventions on the routing: `force_expert`, `forbid_expert`, `ablate_expert` return
hook dicts for ``Model.run_with_hooks`` / ``Model.hooks``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.audio.gemma4 import Gemma4AudioEncoderConfig, Gemma4EmbedWithAudio
from gemmalens.families.hf_config import reject_unimplemented, special_token_ids
from gemmalens.layers import (
    GatedMLP,
    ParamBuilder,
    RMSNorm,
    direct,
    residual_block,
)
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
from gemmalens.layers.moe import DenseAndExperts
from gemmalens.layers.params import CountsParameters, ParamSource
from gemmalens.layers.per_layer_embeddings import (
    PerLayerInputGate,
    PerLayerInputs,
)
from gemmalens.layers.rope import RopeConfig
from gemmalens.layers.transformer import RESID_AXES, DecoderLM
from gemmalens.vision.gemma4 import Gemma4ImageEncoderConfig
from gemmalens.vision.merge import EmbedWithImages

BIDIRECTIONAL_MODES = (None, "vision", "all")


@dataclasses.dataclass(frozen=True)
class Gemma4Config(CountsParameters):
    """Architecture of a Gemma 4 text decoder (field names follow transformers).

    Full-attention layers use ``global_head_dim`` and, when ``num_global_key_value_heads``
    is set, that many KV heads (transformers applies the Hub key only with
    ``attention_k_eq_v``; `from_hf` follows it). ``hidden_size_per_layer_input = 0``
    disables per-layer embeddings; ``enable_moe_block`` adds the expert branch to every
    layer. ``use_bidirectional_attention``: None or ``"vision"`` (bidirectional only
    around image tokens, so causal for text) or ``"all"`` (embedding mode).

    ``vision`` (None: a text model) adds the image encoder of
    ``Gemma4ForConditionalGeneration``: the model then takes ``pixel_values`` and
    ``image_position_ids`` and puts each image's soft tokens at its run of
    ``image_token_id`` placeholders (`gemmalens.vision.merge`); ``num_params()`` counts the
    tower too. ``audio`` (None: no audio) adds the audio tower and ``embed_audio``:
    the model then takes ``input_features`` and ``input_features_mask`` and fills the
    ``audio_token_id`` placeholders (`gemmalens.audio.gemma4`). ``video_token_id`` is the
    other placeholder; a multimodal model's per-layer inputs read all three as the pad token.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    sliding_window: int
    layer_types: tuple[str, ...]
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 262_144
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    rope_local: RopeConfig = RopeConfig(theta=10_000.0)
    rope_global: RopeConfig = RopeConfig(
        theta=1_000_000.0, rope_type="proportional", partial_rotary_factor=0.25
    )
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    use_bidirectional_attention: str | None = None
    max_position_embeddings: int = 131_072
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | tuple[int, ...] = 1
    vision: Gemma4ImageEncoderConfig | None = None
    audio: Gemma4AudioEncoderConfig | None = None
    image_token_id: int = 258_880
    video_token_id: int = 258_884
    audio_token_id: int = 258_881
    family: str = dataclasses.field(default="gemma4", init=False)

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        check_layer_types(self.layer_types, self.num_hidden_layers)
        for name, tower in (("vision", self.vision), ("audio", self.audio)):
            if tower is not None and tower.text_hidden_size != self.hidden_size:
                raise ValueError(
                    f"The {name} embedder writes width {tower.text_hidden_size} but "
                    f"hidden_size is {self.hidden_size}; they must match."
                )
        for i in range(self.num_hidden_layers):
            if self.num_attention_heads % self.layer_kv_heads(i):
                raise ValueError(
                    f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                    f"the KV head count of layer {i} ({self.layer_kv_heads(i)})."
                )
        if self.use_bidirectional_attention not in BIDIRECTIONAL_MODES:
            raise ValueError(
                f"use_bidirectional_attention is {self.use_bidirectional_attention!r}; use one "
                f"of {BIDIRECTIONAL_MODES}."
            )
        if self.enable_moe_block and not (
            self.num_experts and self.top_k_experts and self.moe_intermediate_size
        ):
            raise ValueError(
                "enable_moe_block=True needs num_experts, top_k_experts and moe_intermediate_size."
            )
        if self.enable_moe_block and not 0 < self.top_k_experts <= self.num_experts:
            raise ValueError(
                f"top_k_experts ({self.top_k_experts}) must be between 1 and num_experts "
                f"({self.num_experts})."
            )
        kv_sharing_sources(self.layer_types, self.num_kv_shared_layers)  # raises if unproduced

    # -------------------------------------------------------------------- per-layer shapes

    def layer_head_dim(self, index: int) -> int:
        """Head dim of layer ``index``: ``global_head_dim`` on full-attention layers."""
        return self.global_head_dim if self.layer_types[index] == FULL else self.head_dim

    def layer_kv_heads(self, index: int) -> int:
        """KV heads of layer ``index``: ``num_global_key_value_heads`` (if set) on full layers."""
        if self.layer_types[index] == FULL and self.num_global_key_value_heads is not None:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def layer_values_are_keys(self, index: int) -> bool:
        """True where the raw key projection doubles as the value (K=V, full layers)."""
        return self.attention_k_eq_v and self.layer_types[index] == FULL

    def layer_intermediate_size(self, index: int) -> int:
        """Dense MLP width of layer ``index`` (doubled on KV-sharing layers if double-wide)."""
        doubled = self.use_double_wide_mlp and self.kv_sources[index] is not None
        return self.intermediate_size * (2 if doubled else 1)

    @property
    def kv_sources(self) -> tuple[int | None, ...]:
        """Per layer: the layer whose keys and values it reuses, or None."""
        return kv_sharing_sources(self.layer_types, self.num_kv_shared_layers)

    # -------------------------------------------------------------------------- building

    @staticmethod
    def default_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
        """``pattern - 1`` sliding layers then a full one, and the last layer always full
        (transformers forces it)."""
        return alternating_layer_types(num_layers, pattern, last_full=True)

    def replace(self, **changes: Any) -> Gemma4Config:
        """A copy with some fields changed (``layer_types`` follows a new layer count, the
        vision embedder's output width a new ``hidden_size``)."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = self.default_layer_types(changes["num_hidden_layers"])
        for name in ("vision", "audio"):
            tower = changes.get(name, getattr(self, name))
            if "hidden_size" in changes and tower is not None:
                changes[name] = dataclasses.replace(tower, text_hidden_size=changes["hidden_size"])
        return dataclasses.replace(self, **changes)

    def build(self, source: ParamSource) -> DecoderLM:
        """The Penzai model, every parameter taken from ``source``."""
        return build_gemma4(self, source)

    def counts_as_parameter(self, label: str) -> bool:
        # As in transformers, where they are buffers, the per-layer scalar and the vision
        # tower's clipping bounds and standardisation vectors are not counted.
        if label.startswith("vision.") and self.vision is not None:
            return self.vision.counts_as_parameter(label)
        if label.startswith("audio.") and self.audio is not None:
            return self.audio.counts_as_parameter(label)
        return not label.endswith(".layer_scalar")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Gemma4Config:
        """Reads a transformers ``gemma4_text`` config dict.

        Accepts both spellings of the global-layer shapes: the Hub's ``global_head_dim`` /
        ``num_global_key_value_heads`` and the ``per_layer_config`` that transformers 5.23
        writes (``{"5": {"head_dim": 512, "num_key_value_heads": 2}}``).
        """
        reject_unimplemented(hf, "Gemma 4")
        layers = hf.get("num_hidden_layers", 30)
        layer_types = list(hf.get("layer_types") or cls.default_layer_types(layers))
        layer_types[-1] = FULL  # as transformers' __post_init__
        k_eq_v = bool(hf.get("attention_k_eq_v", False))
        global_head_dim, global_kv_heads = _global_shapes(hf, layer_types, k_eq_v)
        rope = _rope_from_hf(hf)
        return cls(
            vocab_size=hf.get("vocab_size", 262_144),
            hidden_size=hf.get("hidden_size", 2304),
            intermediate_size=hf.get("intermediate_size", 9216),
            num_hidden_layers=layers,
            num_attention_heads=hf.get("num_attention_heads", 8),
            num_key_value_heads=hf.get("num_key_value_heads", 4),
            head_dim=hf.get("head_dim", 256),
            sliding_window=hf.get("sliding_window", 512),
            layer_types=tuple(layer_types),
            global_head_dim=global_head_dim,
            num_global_key_value_heads=global_kv_heads,
            attention_k_eq_v=k_eq_v,
            num_kv_shared_layers=hf.get("num_kv_shared_layers", 0) or 0,
            use_double_wide_mlp=bool(hf.get("use_double_wide_mlp", False)),
            hidden_size_per_layer_input=hf.get("hidden_size_per_layer_input", 256) or 0,
            vocab_size_per_layer_input=hf.get("vocab_size_per_layer_input", 262_144),
            enable_moe_block=bool(hf.get("enable_moe_block", False)),
            num_experts=hf.get("num_experts"),
            top_k_experts=hf.get("top_k_experts"),
            moe_intermediate_size=hf.get("moe_intermediate_size"),
            rope_local=rope[SLIDING],
            rope_global=rope[FULL],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            use_bidirectional_attention=hf.get("use_bidirectional_attention"),
            max_position_embeddings=hf.get("max_position_embeddings", 131_072),
            **special_token_ids(hf),
        )


def _global_shapes(
    hf: dict[str, Any], layer_types: Sequence[str], k_eq_v: bool
) -> tuple[int, int | None]:
    """``(global_head_dim, num_global_key_value_heads)`` from either config spelling."""
    per_layer = hf.get("per_layer_config")
    if per_layer is None:
        kv_heads = hf.get("num_global_key_value_heads")
        # transformers applies the global KV head count only to K=V models.
        return hf.get("global_head_dim", 512), kv_heads if k_eq_v else None
    overrides = {int(i): dict(entry) for i, entry in per_layer.items()}
    full = [i for i, t in enumerate(layer_types) if t == FULL]
    supported = {"head_dim", "num_key_value_heads"}
    distinct = {tuple(sorted(overrides.get(i, {}).items())) for i in full}
    sliding_overridden = sorted(set(overrides) - set(full))
    unknown = {k for entry in overrides.values() for k in entry} - supported
    if len(distinct) > 1 or sliding_overridden or unknown:
        raise ValueError(
            "This Gemma 4 config's per_layer_config gives layers shapes other than one global "
            f"head dim / KV head count on the full-attention layers ({per_layer}); gemmalens "
            "supports the layout of the released models only."
        )
    entry = dict(next(iter(distinct), ()))
    return entry.get("head_dim", hf.get("head_dim", 256)), entry.get("num_key_value_heads")


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, RopeConfig]:
    defaults = {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
    }
    params = hf.get("rope_parameters") or {}
    result = {}
    for layer_type in (SLIDING, FULL):
        entry = params.get(layer_type) or defaults[layer_type]
        rope_type = entry.get("rope_type", "default")
        if rope_type not in ("default", "linear", "proportional"):
            raise ValueError(
                f"RoPE type {rope_type!r} on {layer_type} layers is not used by Gemma 4 and not "
                "implemented; expected 'default', 'linear' or 'proportional'."
            )
        result[layer_type] = RopeConfig(
            theta=float(entry["rope_theta"]),
            rope_type=rope_type,
            factor=float(entry.get("factor", 1.0)) if rope_type != "default" else 1.0,
            partial_rotary_factor=float(entry.get("partial_rotary_factor", 1.0)),
        )
    return result


# ---------------------------------------------------------------------------- new layers


@pz.pytree_dataclass
class LayerScalar(pz.nn.Layer):
    """Multiplies the residual stream by the layer's learned scalar (``layer_scalar``)."""

    scalar: pz.nn.ParameterLike[pz.nx.NamedArray]

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return direct.multiply(x, self.scalar.value.astype(x.dtype))


# ---------------------------------------------------------------------------- builders


def attention_spec(config: Gemma4Config, index: int) -> AttentionSpec:
    """Layer ``index``'s attention: its head shapes, RoPE and K/V source; scaling 1.0
    (QK-norm instead of 1/sqrt(d)), ``plain`` QK-norms and a weightless value norm."""
    layer_type = config.layer_types[index]
    # transformers keeps |q - k| <= window // 2 + 1 (one more than Gemma 3's rule).
    reach = config.sliding_window // 2 + 2 if config.use_bidirectional_attention == "all" else None
    mask = decoder_mask(layer_type, config.sliding_window, reach)
    if (
        config.vision is not None
        and config.use_bidirectional_attention == "vision"
        and layer_type == SLIDING
    ):
        # transformers' Gemma 4: image blocks are bidirectional on sliding layers only.
        mask = dataclasses.replace(mask, image_blocks=True)
    return AttentionSpec(
        d_model=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.layer_kv_heads(index),
        head_dim=config.layer_head_dim(index),
        rope=config.rope_global if layer_type == FULL else config.rope_local,
        mask=mask,
        scale=1.0,
        norm_form="plain",
        eps=config.rms_norm_eps,
        value_norm=True,
        values_are_keys=config.layer_values_are_keys(index),
        kv_source=config.kv_sources[index],
        publishes_kv=index in config.kv_sources,
    )


def build_block(config: Gemma4Config, params: ParamBuilder, index: int) -> pz.nn.NamedGroup:
    """Attention and feed-forward residual branches, the per-layer input, ``layer_scalar``."""
    width, eps = config.hidden_size, config.rms_norm_eps
    block = params.scope(f"blocks.{index}")
    prefix = block.prefix

    def norm(name):
        return RMSNorm.build(block, name, "embedding", width, eps, "plain")

    if config.enable_moe_block:
        feed_forward = [
            DenseAndExperts.build(
                block,
                prefix,
                width,
                config.layer_intermediate_size(index),
                config.num_experts,
                config.top_k_experts,
                config.moe_intermediate_size,
                eps,
            )
        ]
    else:
        mlp = block.scope("mlp")
        feed_forward = [
            norm("pre_feedforward_layernorm"),
            GatedMLP.build(mlp, mlp.prefix, width, config.layer_intermediate_size(index)),
        ]
    group = residual_block(
        block,
        attention_branch=[
            norm("input_layernorm"),
            build_attention(block.scope("attn"), attention_spec(config, index)),
            norm("post_attention_layernorm"),
        ],
        mlp_branch=[*feed_forward, norm("post_feedforward_layernorm")],
    )
    *body, hook_resid_post = group.sublayers
    after: list[pz.nn.Layer] = []
    if config.hidden_size_per_layer_input:
        gate = PerLayerInputGate.build(
            block, prefix, index, width, config.hidden_size_per_layer_input, eps
        )
        after.append(
            Residual(pz.nn.Sequential([gate, block.hook("hook_per_layer_out", RESID_AXES)]))
        )
    after.append(LayerScalar(block("layer_scalar", {}, init="ones")))
    return dataclasses.replace(group, sublayers=[*body, *after, hook_resid_post])


def build_gemma4(config: Gemma4Config, source: ParamSource) -> DecoderLM:
    """Builds the Penzai model, taking every parameter from ``source`` (with a vision tower:
    its parameters under ``vision.``, its embedding an `EmbedWithImages`; with an audio
    tower: under ``audio.``, wrapped in a `Gemma4EmbedWithAudio`)."""
    params = ParamBuilder(source)
    width = config.hidden_size
    table, embed = embedding(params, config.vocab_size, width)
    if config.vision is not None:
        token_embedding, hook_embed = embed
        tower = config.vision.build(source)
        embed = [
            EmbedWithImages.around(token_embedding, tower, params, config.image_token_id),
            hook_embed,
        ]
    if config.audio is not None:
        inner, hook_embed = embed
        tower = config.audio.build(source)
        embed = [
            Gemma4EmbedWithAudio.around(inner, tower, params, config.audio_token_id),
            hook_embed,
        ]
    blocks: pz.nn.Layer = pz.nn.Sequential(
        [build_block(config, params, i) for i in range(config.num_hidden_layers)]
    )
    if any(s is not None for s in config.kv_sources):
        blocks = KVSharingScope(blocks)
    per_layer_inputs = None
    if config.hidden_size_per_layer_input:
        per_layer_inputs = PerLayerInputs.build(
            params.scope("per_layer_inputs"),
            config.num_hidden_layers,
            width,
            config.hidden_size_per_layer_input,
            config.vocab_size_per_layer_input,
            config.rms_norm_eps,
            constants_in_activation_dtype=False,
        )
        if config.vision is not None or config.audio is not None:
            # transformers' Gemma4Model reads the placeholders' rows as the pad token's.
            placeholders = (config.image_token_id, config.video_token_id, config.audio_token_id)
            per_layer_inputs = dataclasses.replace(
                per_layer_inputs, placeholder_ids=placeholders, placeholder_row=config.pad_token_id
            )
    return DecoderLM(
        embed=pz.nn.Sequential(embed),
        per_layer_inputs=per_layer_inputs,
        blocks=blocks,
        final_norm=final_norm(params, width, config.rms_norm_eps, "plain"),
        unembed=unembedding(table, config.final_logit_softcapping),
    )


# ---------------------------------------------------------------------------- routing tools

Where = None | Sequence[int] | np.ndarray | jax.Array


def _token_mask(where: Where, shape: tuple[int, int]) -> jax.Array:
    """Boolean ``[batch, pos]`` from None (every token), positions (in every row) or a mask."""
    if where is None:
        return jnp.ones(shape, bool)
    array = np.asarray(where)
    if array.dtype == bool:
        if array.shape != shape:
            raise ValueError(
                f"The token mask has shape {array.shape}; it must be [batch, pos] = {shape}."
            )
        return jnp.asarray(array)
    positions = array.reshape(-1).astype(int)
    if positions.size and (positions.min() < -shape[1] or positions.max() >= shape[1]):
        raise ValueError(f"Positions {positions.tolist()} are outside a sequence of {shape[1]}.")
    mask = np.zeros(shape, bool)
    mask[:, positions] = True
    return jnp.asarray(mask)


def _check_expert(model_or_config: Any, layer: int, expert: int) -> None:
    config = getattr(model_or_config, "config", model_or_config)
    if not getattr(config, "enable_moe_block", False):
        raise ValueError("This model has no mixture-of-experts block (enable_moe_block=False).")
    if not 0 <= layer < config.num_hidden_layers:
        raise ValueError(f"Layer {layer} does not exist; the model has {config.num_hidden_layers}.")
    if not 0 <= expert < config.num_experts:
        raise ValueError(f"Expert {expert} does not exist; layer {layer} has {config.num_experts}.")


def force_expert(
    model: Any, layer: int, expert: int, where: Where = None, margin: float = 1.0
) -> dict[str, Any]:
    """Hooks that route the chosen tokens of ``layer`` to ``expert``.

    The expert's router logit becomes ``max(logits) + margin`` at those tokens, so it is
    chosen first and the top-k, renormalisation and per-expert scale proceed as usual
    (the other experts keep their order). The forced routing shows in a cache of
    ``blocks.{layer}.moe.hook_expert_indices`` / ``hook_expert_weights``.

    Args:
      model: a `gemmalens.Model` (or its config) with an MoE block.
      layer, expert: where to force.
      where: the tokens: None (all), positions (in every row) or a bool ``[batch, pos]``.
      margin: how far above the best logit the forced one is put.

    Returns:
      ``{hook name: fn}`` for ``Model.run_with_hooks`` (merge dicts to combine).
    """
    _check_expert(model, layer, expert)

    def hook(logits: jax.Array, name: str) -> jax.Array:
        chosen = _token_mask(where, logits.shape[:2])
        forced = jnp.max(logits, axis=-1) + jnp.asarray(margin, logits.dtype)
        new = jnp.where(chosen, forced, logits[..., expert])
        return logits.at[..., expert].set(new)

    return {f"blocks.{layer}.moe.hook_router_logits": hook}


def forbid_expert(model: Any, layer: int, expert: int, where: Where = None) -> dict[str, Any]:
    """Hooks that keep ``expert`` of ``layer`` from being chosen at the given tokens.

    Its router logit becomes the most negative finite value, so the router picks the next
    best expert and renormalises over the experts it picks. ``where`` as in `force_expert`.
    """
    _check_expert(model, layer, expert)

    def hook(logits: jax.Array, name: str) -> jax.Array:
        chosen = _token_mask(where, logits.shape[:2])
        lowest = jnp.finfo(logits.dtype).min
        return logits.at[..., expert].set(jnp.where(chosen, lowest, logits[..., expert]))

    return {f"blocks.{layer}.moe.hook_router_logits": hook}


def ablate_expert(model: Any, layer: int, expert: int, where: Where = None) -> dict[str, Any]:
    """Hooks that remove ``expert``'s contribution in ``layer`` at the given tokens.

    Routing is unchanged; the expert's weight is set to 0 (the other chosen experts keep
    their weights, nothing is renormalised). ``where`` as in `force_expert`.
    """
    _check_expert(model, layer, expert)

    def hook(weights: jax.Array, name: str) -> jax.Array:
        chosen = _token_mask(where, weights.shape[:2])
        return weights.at[..., expert].set(jnp.where(chosen, 0.0, weights[..., expert]))

    return {f"blocks.{layer}.moe.hook_expert_weights": hook}


def routing_table(
    cache: Mapping[str, Any], layer: int, row: int = 0
) -> list[list[tuple[int, float]]]:
    """The experts and weights of ``layer`` at each position of batch row ``row``.

    ``cache`` comes from ``run_with_cache`` with (at least) ``blocks.{layer}.moe.hook_expert_indices``
    and ``hook_expert_weights``. Returns ``[[(expert, weight), ...] per position]``, highest
    weight first.
    """
    indices = np.asarray(cache[f"blocks.{layer}.moe.hook_expert_indices"])[row]
    weights = np.asarray(cache[f"blocks.{layer}.moe.hook_expert_weights"])[row]
    table = []
    for chosen, weight_row in zip(indices, weights, strict=True):
        pairs = [(int(e), float(weight_row[e])) for e in chosen]
        table.append(sorted(pairs, key=lambda p: -p[1]))
    return table


def sentence_embeddings(
    model: Any, tokens: Any, attention_mask: Any = None, normalize: bool = True
) -> jax.Array:
    """Mean-pooled sentence embeddings ``[batch, d_model]`` from the final norm's output.

    For embedding checkpoints (``use_bidirectional_attention="all"``). Padding tokens
    (``attention_mask == 0``, by default the pad id) are left out of the mean;
    ``normalize`` scales each embedding to unit length.
    """
    tokens, mask = model._inputs(tokens, attention_mask)
    if mask is None:
        mask = jnp.ones(tokens.shape, jnp.int32)
    _, cache = model.run_with_cache(tokens, names="ln_final.hook_normalized", attention_mask=mask)
    hidden = cache["ln_final.hook_normalized"].astype(jnp.float32)
    weights = mask.astype(jnp.float32)[..., None]
    pooled = (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
    if normalize:
        pooled = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled


def merge_hooks(*hook_dicts: Mapping[str, Any]) -> dict[str, Any]:
    """Combines hook dicts; two functions on one hook point run one after the other."""
    merged: dict[str, Any] = {}
    for hooks in hook_dicts:
        for name, fn in hooks.items():
            if name in merged:
                first = merged[name]

                def chained(value, hook_name, first=first, second=fn):
                    changed = first(value, hook_name)
                    value = value if changed is None else changed
                    changed = second(value, hook_name)
                    return value if changed is None else changed

                merged[name] = chained
            else:
                merged[name] = fn
    return merged
