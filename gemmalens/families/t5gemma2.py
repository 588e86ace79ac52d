"""T5Gemma 2: a Gemma 3 encoder and a Gemma 3 decoder that attends to it; the encoder reads
images through Gemma 3's SigLIP tower when the config has one.

    encoder tokens ─ embed ─ Gemma 3 blocks, bidirectional ─ norm ──────────────┐ encoder output
    decoder tokens ─ embed ─ Gemma 3 blocks whose attention is *merged*: ─ norm ─ unembed ─> logits
                             one softmax over [own keys (RoPE, causal) ++ encoder keys (no RoPE)]

What is new next to Gemma 3 (everything else is `gemmalens.families.gemma3`'s block):

* **Embedding.** One table (scaled by ``sqrt(d_model)``) serves the encoder, the decoder and
  the tied unembedding. The end-of-image token (``eoi_token_index``) reads a learned row
  ``eoi_embedding`` instead, *not* scaled.
* **Encoder attention** is bidirectional. Sliding layers see, for ``d = q - k``,
  ``0 <= d < (W + 1) // 2`` behind and ``0 < -d <= W // 2`` ahead: with W = 512, 255 tokens
  back, itself and 256 ahead.
* **Decoder attention** is `gemmalens.layers.merged_attention`: the sliding window limits only
  the decoder's own keys; every real encoder token is always visible. Its hook points add
  ``attn.hook_self_pattern``, ``attn.hook_cross_pattern`` (the two parts of one softmax) and
  ``attn.hook_cross_k`` / ``hook_cross_v``.
* Hook names carry the stack: ``encoder.hook_embed``, ``encoder.blocks.{i}.*``,
  ``encoder.ln_final.hook_normalized``, ``decoder.hook_embed``, ``decoder.blocks.{i}.*``,
  ``decoder.ln_final.hook_normalized``.

* **Images** (``vision`` set, ``gl.load(path, vision=True)``): the encoder's embedding is a
  `gemmalens.vision.merge.EmbedWithImages` around the one above. Each image's
  ``mm_tokens_per_image`` soft tokens (SigLIP + Gemma 3's projector,
  ``encoder.vision.*``) replace the scaled embeddings at the ``image_token_index``
  placeholders, unscaled, as transformers' ``T5Gemma2Encoder`` does
  (``encoder.hook_image_embed``, then ``encoder.hook_embed``). The encoder's mask does not
  change: it is bidirectional already (image tokens get no blocks of their own).

The two stacks may differ in depth, heads and MLP width; they share ``hidden_size`` and the
vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from penzai import pz

from gemmalens.encdec import Encoder, EncoderDecoder, EncoderDecoderModel
from gemmalens.families.gemma3 import FULL, Gemma3Config, build_block
from gemmalens.layers import (
    Attention,
    AttentionMask,
    DecoderLM,
    EmbedTokens,
    ParamBuilder,
)
from gemmalens.layers.builders import final_norm, unembedding
from gemmalens.layers.merged_attention import merge_with_encoder
from gemmalens.layers.params import CountsParameters, ParamSource
from gemmalens.layers.transformer import RESID_AXES
from gemmalens.vision.merge import EmbedWithImages
from gemmalens.vision.siglip import Gemma3VisionConfig


@dataclasses.dataclass(frozen=True)
class T5Gemma2Config(CountsParameters):
    """Architecture of T5Gemma 2's text path: two Gemma 3 text configs and the special ids.

    ``encoder`` and ``decoder`` are `Gemma3Config`s (transformers' ``t5gemma2_text`` and
    ``t5gemma2_decoder`` have Gemma 3's fields). Their ``use_bidirectional_attention`` is
    unused: the encoder always has T5Gemma 2's bidirectional mask, the decoder a causal one.
    As in transformers, ``attn_logit_softcapping`` is ignored and the decoder's
    ``final_logit_softcapping`` (None in released configs) applies to the logits.

    ``vision`` (None: text only) adds the encoder's SigLIP tower and projector: the model
    then takes ``pixel_values`` and puts each image's ``mm_tokens_per_image`` soft tokens at
    the ``image_token_index`` positions of the encoder input. ``num_params()`` then counts
    the tower too.
    """

    encoder: Gemma3Config
    decoder: Gemma3Config
    eoi_token_index: int = 256_000
    image_token_index: int = 256_001
    boi_token_index: int = 255_999
    vision: Gemma3VisionConfig | None = None
    family: str = dataclasses.field(default="t5gemma2", init=False)

    def __post_init__(self):
        width = self.encoder.hidden_size
        if self.vision is not None and self.vision.projector.text_hidden_size != width:
            raise ValueError(
                f"The vision projector writes width {self.vision.projector.text_hidden_size} "
                f"but the encoder's hidden_size is {width}; they must match."
            )
        for field in ("hidden_size", "vocab_size"):
            ours, theirs = getattr(self.encoder, field), getattr(self.decoder, field)
            if ours != theirs:
                raise ValueError(
                    f"T5Gemma 2 shares embeddings between its stacks, so the encoder's {field} "
                    f"({ours}) must equal the decoder's ({theirs})."
                )

    # Fields the model surface reads, as for the decoder-only families.
    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.decoder.hidden_size

    @property
    def pad_token_id(self) -> int:
        return self.decoder.pad_token_id

    @property
    def eos_token_id(self) -> int | tuple[int, ...]:
        return self.decoder.eos_token_id

    @property
    def image_token_id(self) -> int:
        """The image placeholder id (``image_token_index``; the name Gemma 3's config uses)."""
        return self.image_token_index

    @property
    def decoder_start_token_id(self) -> int:
        """The first decoder token (transformers uses the decoder's BOS)."""
        return self.decoder.bos_token_id

    @property
    def surface_class(self) -> type[EncoderDecoderModel]:
        """The `gemmalens.Model` class that `gl.load` and `gl.build` wrap this model in."""
        return EncoderDecoderModel

    def build(self, source: ParamSource) -> EncoderDecoder:
        """The Penzai model, every parameter taken from ``source``."""
        return build_t5gemma2(self, source)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> T5Gemma2Config:
        """Reads a transformers ``t5gemma2`` config dict (``encoder.text_config``, ``decoder``)."""
        encoder = hf.get("encoder") or {}
        if "text_config" not in encoder or "decoder" not in hf:
            raise ValueError(
                "A T5Gemma 2 config.json needs 'encoder' (with 'text_config') and 'decoder' "
                "entries; this one has " + ", ".join(sorted(hf)) + "."
            )
        return cls(
            encoder=Gemma3Config.from_hf(encoder["text_config"]),
            decoder=Gemma3Config.from_hf(hf["decoder"]),
            eoi_token_index=hf.get("eoi_token_index") or encoder.get("eoi_token_index", 256_000),
            image_token_index=hf.get("image_token_index", 256_001),
            boi_token_index=encoder.get("boi_token_index", 255_999),
        )


@pz.pytree_dataclass
class EmbedTokensWithEOI(pz.nn.Layer):
    """Scaled token embedding where ``eoi_token_id`` reads the learned, unscaled row
    ``eoi_embedding`` (``[embedding]``). Input ``[batch, seq]`` ids, output ``[batch, seq,
    embedding]``."""

    embed: EmbedTokens
    eoi_embedding: pz.nn.ParameterLike[pz.nx.NamedArray]
    eoi_token_id: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, tokens: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        embedded = self.embed(tokens, **side_inputs)
        eoi = self.eoi_embedding.value.astype(embedded.dtype)
        return pz.nx.nmap(jnp.where)(tokens == self.eoi_token_id, eoi, embedded)


def encoder_mask(config: Gemma3Config, layer_type: str) -> AttentionMask:
    """Bidirectional; sliding layers keep ``(W+1)//2`` keys back (self included), ``W//2`` ahead."""
    if layer_type == FULL:
        return AttentionMask(causal=False)
    window = config.sliding_window
    return AttentionMask(
        causal=False, window_before=(window + 1) // 2, window_after=window // 2 + 1
    )


def build_encoder_block(config: Gemma3Config, params: ParamBuilder, index: int) -> pz.nn.NamedGroup:
    """A Gemma 3 block with the encoder's bidirectional mask."""
    mask = encoder_mask(config, config.layer_types[index])
    block = build_block(config, params, index)
    return pz.select(block).at_instances_of(AttentionMask).set(mask)


def build_decoder_block(config: Gemma3Config, params: ParamBuilder, index: int) -> pz.nn.NamedGroup:
    """A Gemma 3 block whose attention also reads the encoder output (merged attention)."""
    block = build_block(config, params, index)
    return pz.select(block).at_instances_of(Attention).apply(merge_with_encoder)


def build_t5gemma2(config: T5Gemma2Config, source: ParamSource) -> EncoderDecoder:
    """Builds the Penzai model, taking every parameter from ``source``. Hook names and
    block names carry the stack (``encoder.``, ``decoder.``) from the parameter scopes."""
    params = ParamBuilder(source)
    width = config.hidden_size
    table = params("embed.embeddings", {"vocab": config.vocab_size}, {"embedding": width})
    eoi = params("embed.eoi_embedding", {"embedding": width}, init="zeros")

    def embed(stack: ParamBuilder, images: bool = False) -> pz.nn.Sequential:
        tokens = EmbedTokensWithEOI(
            EmbedTokens.with_model_width(table, width), eoi, config.eoi_token_index
        )
        if images:
            tower = config.vision.build(source, scope=stack.prefix)
            tokens = EmbedWithImages.around(tokens, tower, stack, config.image_token_index)
        return pz.nn.Sequential([tokens, stack.hook("hook_embed", RESID_AXES)])

    def norm(stack: ParamBuilder, stack_config: Gemma3Config) -> pz.nn.Sequential:
        return final_norm(stack, width, stack_config.rms_norm_eps, "one_plus")

    encoder_params, decoder_params = params.scope("encoder"), params.scope("decoder")
    encoder = Encoder(
        embed=embed(encoder_params, images=config.vision is not None),
        blocks=pz.nn.Sequential(
            [
                build_encoder_block(config.encoder, encoder_params, i)
                for i in range(config.encoder.num_hidden_layers)
            ]
        ),
        final_norm=norm(encoder_params, config.encoder),
    )
    decoder = DecoderLM(
        embed=embed(decoder_params),
        blocks=pz.nn.Sequential(
            [
                build_decoder_block(config.decoder, decoder_params, i)
                for i in range(config.decoder.num_hidden_layers)
            ]
        ),
        final_norm=norm(decoder_params, config.decoder),
        unembed=unembedding(table, config.decoder.final_logit_softcapping),
    )
    return EncoderDecoder(encoder=encoder, decoder=decoder)
