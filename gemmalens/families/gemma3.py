"""Gemma 3 decoder: 5 local : 1 global attention, QK-norm, pre- and post-norms; with the
SigLIP vision tower when the config has one (4B, 12B, 27B).

Only what is particular to Gemma 3 lives here (its config, which layers are local, which
RoPE each layer type uses); every layer comes from `gemmalens.layers`, the image path from
`gemmalens.vision` (`gemmalens.vision.merge` says how images enter the text stream).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from penzai import pz

from gemmalens.families.hf_config import reject_unimplemented, special_token_ids
from gemmalens.layers import (
    DecoderLM,
    GatedMLP,
    ParamBuilder,
    RMSNorm,
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
from gemmalens.layers.params import CountsParameters, ParamSource
from gemmalens.layers.rope import RopeConfig
from gemmalens.vision.merge import EmbedWithImages
from gemmalens.vision.siglip import Gemma3VisionConfig

__all__ = ["FULL", "SLIDING", "Gemma3Config", "build_gemma3"]


@dataclasses.dataclass(frozen=True)
class Gemma3Config(CountsParameters):
    """Architecture of a Gemma 3 text decoder (field names follow transformers).

    ``attn_logit_softcapping`` is kept for completeness but, as in transformers' Gemma 3,
    not applied; ``final_logit_softcapping`` is applied to the logits when set.
    ``use_bidirectional_attention`` (EmbeddingGemma) makes full layers attend everywhere
    and sliding layers attend ``|q - k| <= sliding_window // 2``.

    ``vision`` (None: a text model) adds the SigLIP tower and projector of
    ``Gemma3ForConditionalGeneration``: the model then takes ``pixel_values`` and puts each
    image's ``vision.projector.mm_tokens_per_image`` soft tokens at the ``image_token_id``
    positions, whose runs attend to themselves both ways (`gemmalens.vision.merge`).
    ``num_params()`` then counts the whole multimodal model.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_local: RopeConfig = RopeConfig(theta=10_000.0)
    rope_global: RopeConfig = RopeConfig(theta=1_000_000.0)
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    use_bidirectional_attention: bool = False
    max_position_embeddings: int = 32_768
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | tuple[int, ...] = 1
    vision: Gemma3VisionConfig | None = None
    image_token_id: int = 262_144
    family: str = dataclasses.field(default="gemma3", init=False)

    def __post_init__(self):
        check_layer_types(self.layer_types, self.num_hidden_layers)
        if self.vision is not None and self.vision.projector.text_hidden_size != self.hidden_size:
            raise ValueError(
                f"The vision projector writes width {self.vision.projector.text_hidden_size} "
                f"but hidden_size is {self.hidden_size}; they must match."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )

    @staticmethod
    def default_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
        """Every ``pattern``-th layer global, the others sliding (5 local : 1 global)."""
        return alternating_layer_types(num_layers, pattern)

    def replace(self, **changes: Any) -> Gemma3Config:
        """A copy with some fields changed (``layer_types`` follows a new layer count, the
        vision projector's output width a new ``hidden_size``)."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = self.default_layer_types(changes["num_hidden_layers"])
        vision = changes.get("vision", self.vision)
        if "hidden_size" in changes and vision is not None:
            projector = dataclasses.replace(
                vision.projector, text_hidden_size=changes["hidden_size"]
            )
            changes["vision"] = dataclasses.replace(vision, projector=projector)
        return dataclasses.replace(self, **changes)

    def build(self, source: ParamSource) -> DecoderLM:
        """The Penzai model, every parameter taken from ``source``."""
        return build_gemma3(self, source)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Gemma3Config:
        """Reads a transformers ``gemma3_text`` config dict (new or legacy key spellings).

        Keys a file leaves out take transformers' ``Gemma3TextConfig`` defaults, as they do
        there: the Hub's Gemma 3 4B-27B ``text_config`` entries list only what differs.
        """
        reject_unimplemented(hf, "Gemma 3")
        num_layers = hf.get("num_hidden_layers", 26)
        layer_types = hf.get("layer_types")
        if layer_types is None:
            pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
            layer_types = cls.default_layer_types(num_layers, pattern)
        rope = _rope_from_hf(hf)
        return cls(
            vocab_size=hf.get("vocab_size", 262_208),
            hidden_size=hf.get("hidden_size", 2304),
            intermediate_size=hf.get("intermediate_size", 9216),
            num_hidden_layers=num_layers,
            num_attention_heads=hf.get("num_attention_heads", 8),
            num_key_value_heads=hf.get("num_key_value_heads", 4),
            head_dim=hf.get("head_dim", 256),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
            sliding_window=hf.get("sliding_window", 4096),
            layer_types=tuple(layer_types),
            rope_local=rope[SLIDING],
            rope_global=rope[FULL],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            attn_logit_softcapping=hf.get("attn_logit_softcapping"),
            use_bidirectional_attention=bool(hf.get("use_bidirectional_attention") or False),
            max_position_embeddings=hf.get("max_position_embeddings", 131_072),
            **special_token_ids(hf),
        )


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, RopeConfig]:
    """Both RoPE spellings: ``rope_parameters`` per layer type, or the legacy
    ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling`` (global layers only)."""
    params = hf.get("rope_parameters") or {}
    legacy_scaling = hf.get("rope_scaling") or {}
    defaults = {
        FULL: {"rope_theta": hf.get("rope_theta", 1_000_000.0), **legacy_scaling},
        SLIDING: {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)},
    }
    result = {}
    for layer_type in (SLIDING, FULL):
        entry = {**defaults[layer_type], **(params.get(layer_type) or {})}
        rope_type = entry.get("rope_type", entry.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ValueError(
                f"RoPE type {rope_type!r} on {layer_type} layers is not used by Gemma 3 and not "
                "implemented; expected 'default' or 'linear'."
            )
        factor = float(entry.get("factor", 1.0)) if rope_type == "linear" else 1.0
        result[layer_type] = RopeConfig(float(entry["rope_theta"]), rope_type, factor)
    return result


def attention_spec(config: Gemma3Config, layer_type: str) -> AttentionSpec:
    """A Gemma 3 attention layer: GQA, ``one_plus`` QK-norm, the RoPE of its layer type,
    scores scaled by ``query_pre_attn_scalar ** -0.5``."""
    # transformers' bidirectional Gemma 3 keeps |q - k| <= window // 2.
    reach = config.sliding_window // 2 + 1 if config.use_bidirectional_attention else None
    mask = decoder_mask(layer_type, config.sliding_window, reach)
    if config.vision is not None:
        # transformers' Gemma 3: image blocks are bidirectional on sliding and full layers.
        mask = dataclasses.replace(mask, image_blocks=True)
    return AttentionSpec(
        d_model=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rope=config.rope_global if layer_type == FULL else config.rope_local,
        mask=mask,
        scale=config.query_pre_attn_scalar**-0.5,
        norm_form="one_plus",
        eps=config.rms_norm_eps,
    )


def build_block(config: Gemma3Config, params: ParamBuilder, index: int) -> pz.nn.NamedGroup:
    """norm → attention → norm, then norm → gated MLP → norm, each inside a residual."""
    width, eps = config.hidden_size, config.rms_norm_eps
    block = params.scope(f"blocks.{index}")

    def norm(name):
        return RMSNorm.build(block, name, "embedding", width, eps, "one_plus")

    spec = attention_spec(config, config.layer_types[index])
    mlp = block.scope("mlp")
    return residual_block(
        block,
        attention_branch=[
            norm("input_layernorm"),
            build_attention(block.scope("attn"), spec),
            norm("post_attention_layernorm"),
        ],
        mlp_branch=[
            norm("pre_feedforward_layernorm"),
            GatedMLP.build(mlp, mlp.prefix, width, config.intermediate_size),
            norm("post_feedforward_layernorm"),
        ],
    )


def build_gemma3(config: Gemma3Config, source: ParamSource) -> DecoderLM:
    """Builds the Penzai model, taking every parameter from ``source`` (with a vision tower:
    its parameters under ``vision.``, its embedding an `EmbedWithImages`)."""
    params = ParamBuilder(source)
    table, embed = embedding(params, config.vocab_size, config.hidden_size)
    if config.vision is not None:
        token_embedding, hook_embed = embed
        tower = config.vision.build(source)
        embed = [
            EmbedWithImages.around(token_embedding, tower, params, config.image_token_id),
            hook_embed,
        ]
    return DecoderLM(
        embed=pz.nn.Sequential(embed),
        blocks=pz.nn.Sequential(
            [build_block(config, params, i) for i in range(config.num_hidden_layers)]
        ),
        final_norm=final_norm(params, config.hidden_size, config.rms_norm_eps, "one_plus"),
        unembed=unembedding(table, config.final_logit_softcapping),
    )
