"""Encoder-decoder models: the Penzai container and the model surface.

`EncoderDecoderModel` is `gemmalens.Model` for a model that reads an input with an encoder
and writes with a decoder that attends to the encoder output (T5Gemma 2)::

    logits = m(tokens, decoder_tokens)                 # [batch, dec_seq, vocab]
    enc = m.encode(tokens)                             # reuse across decoding steps:
    logits = m.decode(decoder_tokens, enc)             #   same logits as m(tokens, ...)
    logits, cache = m.run_with_cache(tokens, decoder_tokens=decoder_tokens)
    logits = m.run_with_hooks(tokens, hooks, decoder_tokens=decoder_tokens)
    result = m.generate(prompts, max_new_tokens=16)    # encode once, decode with a KV cache
    logits = m(tokens, decoder_tokens, pixel_values=pixels)  # loaded with vision=True

Hook names start with ``encoder.`` or ``decoder.`` (``encoder.blocks.3.hook_resid_post``,
``decoder.blocks.0.attn.hook_cross_pattern``); one call runs both stacks, so a hook on the
encoder changes what the decoder reads in the same call.

Positions are column indices in both stacks, as in transformers: padding (mask 0, or the
pad id) is masked out as keys but does not shift the positions of later tokens, so pad on
the right (`generate` does) for a padded row to match the same row alone.

A T5Gemma 2 model loaded with its tower (``gl.load(path, vision=True)``) reads images in its
encoder: ``pixel_values`` ``[num_images, 3, H, W]`` for the runs of image tokens in
``tokens`` (`gemmalens.vision.merge`; hook points ``encoder.vision.*`` and
``encoder.hook_image_embed``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens import compiling, sampling
from gemmalens.cache import ActivationCache
from gemmalens.compiling import Distinct
from gemmalens.layers.hooks import HookFn, stateless_call
from gemmalens.layers.hooks import capture as capture_hooks
from gemmalens.layers.merged_attention import (
    ENCODER_OUTPUT,
    ENCODER_POSITIONS,
    fix_encoder_keys_values,
)
from gemmalens.layers.transformer import (
    LOGIT_WINDOW,
    RESID_AXES,
    DecoderLM,
    positions_from_mask,
)
from gemmalens.lens import _CACHE_LABEL, Model, NameSelector, _until_eos, refuse_multimodal_prompts
from gemmalens.vision.merge import PIXEL_VALUES, image_side_inputs, without_images


@pz.pytree_dataclass
class Encoder(pz.nn.Layer):
    """A bidirectional text encoder: embed, blocks, final norm (no unembedding).

    Called with token ids (``batch``, ``seq``) and the side input ``token_positions``
    (-1 on padding); returns the encoder output (``batch``, ``seq``, ``embedding``).
    """

    embed: pz.nn.Sequential
    blocks: pz.nn.Sequential
    final_norm: pz.nn.Sequential

    def __call__(self, tokens: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        h = self.embed(tokens, **side_inputs)
        h = self.blocks(h, **side_inputs)
        return self.final_norm(h, **side_inputs)


@pz.pytree_dataclass
class EncoderDecoder(pz.nn.Layer):
    """An encoder and a decoder whose attention reads the encoder output.

    Input: ``(encoder_tokens, decoder_tokens)``, each with named axes ``batch``, ``seq``.
    Side inputs: ``encoder_positions`` and ``decoder_positions`` (``batch``, ``seq``; -1 on
    padding), each ``0..seq-1`` (nothing padded) when not given; ``pixel_values`` (the
    encoder's images, when it has a tower); ``logit_window`` (the decoder's, `DecoderLM`).
    Returns decoder logits (``batch``, ``seq``, ``vocab``).
    """

    encoder: Encoder
    decoder: DecoderLM

    def __call__(self, tokens: tuple[pz.nx.NamedArray, pz.nx.NamedArray], **side_inputs: Any):
        encoder_tokens, decoder_tokens = tokens
        encoder_positions = side_inputs.get("encoder_positions")
        unpadded = encoder_positions is None or side_inputs.get("encoder_unpadded", False)
        if encoder_positions is None:
            encoder_positions = _arange_like(encoder_tokens)
        encoder_side = {"token_positions": encoder_positions}
        if unpadded:
            encoder_side["positions_are_arange"] = True  # lets attention use banded kernels
        if side_inputs.get(PIXEL_VALUES) is not None:
            encoder_side[PIXEL_VALUES] = side_inputs[PIXEL_VALUES]
        encoder_output = self.encoder(encoder_tokens, **encoder_side)
        decoder_positions = side_inputs.get("decoder_positions")
        return self.decoder(
            decoder_tokens,
            token_positions=(
                _arange_like(decoder_tokens) if decoder_positions is None else decoder_positions
            ),
            **{
                ENCODER_OUTPUT: encoder_output,
                ENCODER_POSITIONS: encoder_positions,
                LOGIT_WINDOW: side_inputs.get(LOGIT_WINDOW),
            },
        )


def _arange_like(tokens: pz.nx.NamedArray) -> pz.nx.NamedArray:
    return positions_from_mask(pz.nx.ones(tokens.named_shape, dtype=jnp.int32))


@dataclasses.dataclass(frozen=True)
class EncoderOutput:
    """What `EncoderDecoderModel.encode` returns; pass it to ``decode`` or ``m(...)``.

    Attributes:
      hidden_states: the encoder's final normed hidden states, [batch, enc_seq, d_model].
      attention_mask: [batch, enc_seq] (1 = real token), or None when nothing is padded.
    """

    hidden_states: jax.Array
    attention_mask: jax.Array | None = None


def named_tokens(tokens: jax.Array) -> pz.nx.NamedArray:
    """``[batch, seq]`` ids as a named array (the encoder-decoder's input form)."""
    return pz.nx.wrap(tokens).tag("batch", "seq")


def column_positions(tokens: jax.Array, mask: jax.Array | None) -> pz.nx.NamedArray:
    """Positions ``0..seq-1`` in every row (transformers' default), -1 where masked."""
    columns = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if mask is not None:
        columns = jnp.where(mask > 0, columns, -1)
    return named_tokens(columns)


def seq2seq_side_inputs(
    encoder_tokens, encoder_mask, decoder_tokens, decoder_mask, images=None
) -> dict[str, Any]:
    """The positions `EncoderDecoder` takes beside its tokens (masks: [batch, seq] or None),
    and ``images``: the encoder's image side inputs (``{"pixel_values": ...}``) or None."""
    return {
        "encoder_positions": column_positions(encoder_tokens, encoder_mask),
        "decoder_positions": column_positions(decoder_tokens, decoder_mask),
        "encoder_unpadded": encoder_mask is None,
        **(images or {}),
    }


def seq2seq_logits(
    model,
    encoder_tokens,
    encoder_mask,
    decoder_tokens,
    decoder_mask,
    images=None,
    *,
    logit_window: tuple[int, int] | None = None,
) -> jax.Array:
    """Decoder logits ``[batch, dec_seq, vocab]`` of an `EncoderDecoder` tree (not compiled:
    callable inside a traced function, e.g. `gemmalens.patching`'s vmapped sweep); with
    ``logit_window=(start, stop)``, only decoder positions ``start..stop-1``."""
    side = seq2seq_side_inputs(encoder_tokens, encoder_mask, decoder_tokens, decoder_mask, images)
    side[LOGIT_WINDOW] = logit_window
    logits = model((named_tokens(encoder_tokens), named_tokens(decoder_tokens)), **side)
    return logits.unwrap("batch", "seq", "vocab")


def seq2seq_stateful(
    model, state, encoder_tokens, encoder_mask, decoder_tokens, decoder_mask, images=None
) -> tuple[Any, tuple]:
    """``model.stateless_call`` of an `EncoderDecoder` tree: ``(logits, new state)``."""
    side = seq2seq_side_inputs(encoder_tokens, encoder_mask, decoder_tokens, decoder_mask, images)
    return stateless_call(
        model, state, (named_tokens(encoder_tokens), named_tokens(decoder_tokens)), **side
    )


@compiling.jit
def _encode(plan: Distinct, tokens, mask, images=None):
    encoder, state = plan.tree()  # ``Distinct.of((encoder, state))``
    side = {"token_positions": column_positions(tokens, mask), **(images or {})}
    if mask is None:
        side["positions_are_arange"] = True
    hidden, values = stateless_call(encoder, state, named_tokens(tokens), **side)
    return hidden.unwrap("batch", "seq", "embedding"), values


@compiling.jit
def _decode(plan: Distinct, decoder_tokens, decoder_mask, hidden_states, encoder_mask):
    decoder = plan.tree()  # ``Distinct.of(decoder)``
    encoder_output = pz.nx.wrap(hidden_states).tag(*RESID_AXES)
    logits = decoder(
        named_tokens(decoder_tokens),
        token_positions=column_positions(decoder_tokens, decoder_mask),
        **{
            ENCODER_OUTPUT: encoder_output,
            ENCODER_POSITIONS: column_positions(hidden_states[..., 0], encoder_mask),
        },
    )
    return logits.unwrap("batch", "seq", "vocab")


def _cache_values(values: Iterable[Any]) -> dict[str, jax.Array]:
    return {v.label[len(_CACHE_LABEL) :]: v.value for v in values}


class EncoderDecoderModel(Model):
    """`gemmalens.Model` for encoder-decoder checkpoints (T5Gemma 2).

    ``m.model`` is an `EncoderDecoder` (``m.model.encoder``, ``m.model.decoder``); hook
    names start with ``encoder.`` or ``decoder.``. Token arrays are [batch, seq] ids (or
    text, with a tokenizer); masks default to ``tokens != pad_token_id``. With a vision tower
    (``config.vision``), the encoder also reads ``pixel_values``.
    """

    logits_of = staticmethod(seq2seq_logits)
    captured_run = staticmethod(seq2seq_stateful)

    def __repr__(self) -> str:
        config = self.config
        tower = ", vision tower" if getattr(config, "vision", None) is not None else ""
        return (
            f"gemmalens.EncoderDecoderModel({config.family}, "
            f"{config.encoder.num_hidden_layers} encoder + {config.decoder.num_hidden_layers} "
            f"decoder layers, d_model={config.hidden_size}, vocab={config.vocab_size}{tower}, "
            f"{len(self._hook_names)} hook points)"
        )

    def _both(
        self,
        tokens,
        decoder_tokens,
        attention_mask,
        decoder_attention_mask,
        pixel_values=None,
        token_type_ids=None,
    ):
        if decoder_tokens is None:
            raise TypeError(
                "An encoder-decoder model needs decoder_tokens as well: the tokens the decoder "
                "reads, starting with the decoder start token "
                f"({self.config.decoder_start_token_id}), e.g. m(tokens, decoder_tokens=...)."
            )
        if isinstance(decoder_tokens, EncoderOutput):
            raise TypeError(
                "decoder_tokens is an EncoderOutput; to reuse an encoding, call "
                "m.decode(decoder_tokens, encoder_output) or m(decoder_tokens=..., "
                "encoder_output=...)."
            )
        tokens, mask, images = self._encoder_inputs(
            tokens, attention_mask, pixel_values, token_type_ids
        )
        decoder_tokens, decoder_mask = self._inputs(decoder_tokens, decoder_attention_mask)
        if tokens.shape[0] != decoder_tokens.shape[0]:
            raise ValueError(
                f"tokens have batch size {tokens.shape[0]} but decoder_tokens have "
                f"{decoder_tokens.shape[0]}; give one decoder row per encoder row."
            )
        inputs = (tokens, mask, decoder_tokens, decoder_mask)
        return inputs if images is None else (*inputs, images)

    def _encoder_inputs(
        self, tokens: Any, attention_mask: Any, pixel_values: Any, token_type_ids: Any
    ) -> tuple[jax.Array, jax.Array | None, dict[str, Any] | None]:
        """The encoder's validated ``(tokens, mask, images)``: ``images`` is
        ``{"pixel_values": ...}`` for a call with images, else None. ``token_type_ids`` are
        checked and then unused, as in transformers: the encoder is bidirectional already."""
        tokens, mask = self._host_inputs(tokens, attention_mask)
        # The image checks read the ids on the host (also under jax.eval_shape).
        images = image_side_inputs(self.config, tokens, pixel_values, token_type_ids)
        if images is not None:
            images = {PIXEL_VALUES: images[PIXEL_VALUES]}
        tokens = self._on_mesh(tokens)
        mask = None if mask is None else self._on_mesh(mask)
        return tokens, mask, images

    def _prepare(self, tokens: Any, attention_mask: Any, streams: dict[str, Any]) -> tuple:
        """``(tokens, mask, decoder_tokens, decoder_mask)``, as `seq2seq_logits` takes them,
        and the encoder's image side inputs last for a call with images."""
        streams = dict(streams)
        decoder_tokens = streams.pop("decoder_tokens", None)
        decoder_mask = streams.pop("decoder_attention_mask", None)
        pixel_values = streams.pop("pixel_values", None)
        token_type_ids = streams.pop("token_type_ids", None)
        if streams:
            raise TypeError(
                f"Unknown inputs {sorted(streams)}: an encoder-decoder model takes tokens, "
                "attention_mask, decoder_tokens and decoder_attention_mask (and, with a "
                "vision tower, pixel_values and token_type_ids)."
            )
        return self._both(
            tokens, decoder_tokens, attention_mask, decoder_mask, pixel_values, token_type_ids
        )

    # ----------------------------------------------------------------------------- running

    def __call__(
        self,
        tokens: Any = None,
        decoder_tokens: Any = None,
        attention_mask: Any = None,
        decoder_attention_mask: Any = None,
        *,
        encoder_output: EncoderOutput | None = None,
        pixel_values: Any = None,
        token_type_ids: Any = None,
    ) -> jax.Array:
        """Decoder logits ``[batch, dec_seq, vocab]``.

        Args:
          tokens: encoder input ids [batch, enc_seq] (or text); omit when passing
            ``encoder_output``.
          decoder_tokens: decoder input ids [batch, dec_seq], starting with the decoder
            start token (``config.decoder_start_token_id``).
          attention_mask, decoder_attention_mask: [batch, seq], 1 = real token.
          encoder_output: a previous ``m.encode(tokens)``, reused instead of encoding again.
          pixel_values: with a vision tower (``gl.load(path, vision=True)``), the images
            ``[num_images, 3, H, W]`` (`gemmalens.vision.preprocess_gemma3`) for the runs of
            ``mm_tokens_per_image`` image tokens (``config.image_token_index``) in
            ``tokens``, in run order, row-major; their soft tokens replace the encoder's
            embeddings there (`gemmalens.vision.merge`).
          token_type_ids: [batch, enc_seq], as T5Gemma 2's processor returns them; checked
            and unused, as in transformers (the encoder is bidirectional already).
        """
        if encoder_output is not None:
            if tokens is not None:
                raise TypeError("Pass either tokens or encoder_output, not both.")
            if pixel_values is not None or token_type_ids is not None:
                raise TypeError(
                    "Images enter the encoder: pass pixel_values to m.encode(tokens, "
                    "pixel_values=...), and its output here as encoder_output."
                )
            return self.decode(decoder_tokens, encoder_output, decoder_attention_mask)
        images = {"pixel_values": pixel_values, "token_type_ids": token_type_ids}
        return super().__call__(
            tokens,
            attention_mask,
            decoder_tokens=decoder_tokens,
            decoder_attention_mask=decoder_attention_mask,
            **{name: value for name, value in images.items() if value is not None},
        )

    def encode(
        self,
        tokens: Any,
        attention_mask: Any = None,
        *,
        pixel_values: Any = None,
        token_type_ids: Any = None,
    ) -> EncoderOutput:
        """Runs the encoder alone: its output, to decode from any number of times
        (``pixel_values``, ``token_type_ids``: the images, as for ``m(...)``)."""
        tokens, mask, images = self._encoder_inputs(
            tokens, attention_mask, pixel_values, token_type_ids
        )
        hidden, _ = _encode(Distinct.of((self._frozen.encoder, [])), tokens, mask, images)
        return EncoderOutput(hidden, mask)

    def decode(
        self,
        decoder_tokens: Any,
        encoder_output: EncoderOutput,
        decoder_attention_mask: Any = None,
    ) -> jax.Array:
        """Decoder logits ``[batch, dec_seq, vocab]`` given a stored ``m.encode(...)``."""
        if not isinstance(encoder_output, EncoderOutput):
            raise TypeError(
                f"encoder_output must be what m.encode(tokens) returns, got "
                f"{type(encoder_output).__name__}."
            )
        decoder_tokens, decoder_mask = self._inputs(decoder_tokens, decoder_attention_mask)
        hidden = encoder_output.hidden_states
        if hidden.shape[0] != decoder_tokens.shape[0]:
            raise ValueError(
                f"The encoder output has batch size {hidden.shape[0]} but decoder_tokens "
                f"have {decoder_tokens.shape[0]}."
            )
        return _decode(
            Distinct.of(self._frozen.decoder),
            decoder_tokens,
            decoder_mask,
            hidden,
            encoder_output.attention_mask,
        )

    # ----------------------------------------------------------------------------- generation

    def generate(
        self,
        prompts: Any,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop_at_eos: bool = True,
        eos_ids: Iterable[int] | None = None,
        attention_mask: Any = None,
        capture: NameSelector = (),
        hooks: Mapping[str, HookFn] | None = None,
    ) -> sampling.Generation:
        """Encodes the prompts once, then decodes from the start token with a KV cache.

        The decoder's self part is cached as in any decoder; each layer's cross part (the
        encoder's keys and values) is computed once and reused at every step. Arguments as
        `gemmalens.Model.generate`; ``prompts`` are the encoder inputs (right-padded here).

        Returns:
          a `gemmalens.sampling.Generation` whose ``prompt_tokens`` / ``prompt_mask`` are the
          encoder inputs. ``prompt_cache`` holds encoder captures and the decoder's captures
          at the start token; ``step_cache`` the decoder's captures at each new token.
        """
        sampler = sampling.Sampler(temperature, top_k, top_p)  # checks its options
        max_new_tokens = sampling.check_max_new_tokens(max_new_tokens)
        rows = self._prompt_rows(prompts, attention_mask)
        width = max(len(r) for r in rows)
        tokens = np.full((len(rows), width), self.config.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, row in enumerate(rows):
            tokens[i, : len(row)], mask[i, : len(row)] = row, 1
        self._inputs(tokens, mask)  # validates ids
        refuse_multimodal_prompts(
            self.config, tokens[mask > 0], "m(tokens, decoder_tokens, {keyword}=...)"
        )
        if eos_ids is None:
            configured = self.config.eos_token_id
            eos_ids = list(configured) if isinstance(configured, (tuple, list)) else [configured]
            if self.tokenizer is not None and self.tokenizer.end_of_turn_id is not None:
                eos_ids.append(self.tokenizer.end_of_turn_id)
        eos_ids = tuple(int(e) for e in eos_ids) if stop_at_eos else ()

        model = self.with_hooks(hooks) if hooks else self._model
        captured = set(self.select_hooks(capture)) if capture != () else set()
        # Generation reads no images (yet): the tower is left out of its program.
        model = pz.freeze_params(without_images(capture_hooks(model, captured, _CACHE_LABEL)))

        encoder, encoder_state = pz.unbind_state_vars(model.encoder)
        encoder_mask = None if mask.all() else jnp.asarray(mask)
        hidden, encoder_values = _encode(
            Distinct.of((encoder, [v.freeze() for v in encoder_state])),
            jnp.asarray(tokens),
            encoder_mask,
        )
        decoder = fix_encoder_keys_values(
            model.decoder,
            pz.nx.wrap(hidden).tag(*RESID_AXES),
            column_positions(jnp.asarray(tokens), jnp.asarray(mask)),
        )
        # The decoder's merged self+cross attention keeps the plain path; its feed-forward
        # blocks may run the decode kernel.
        decoder = sampling.with_kv_cache(
            decoder,
            len(rows),
            1 + max_new_tokens,
            sampling.DECODE_ATTENTION_KERNEL,
            sampling.DECODE_MLP_KERNEL,
        )
        unbound, state = pz.unbind_state_vars(decoder)
        start = np.full((len(rows), 1), self.config.decoder_start_token_id, np.int32)
        new_tokens, prompt_values, step_values = sampling._generate(
            Distinct.of((unbound, [v.freeze() for v in state])),
            jnp.asarray(start),
            jnp.ones_like(jnp.asarray(start)),
            jax.random.key(seed),
            max_new_tokens=max_new_tokens,
            sampler=sampler,
            eos_ids=eos_ids or (-1,),
            pad_id=int(self.config.pad_token_id),
            unroll=sampling.DECODE_UNROLL,
        )

        def as_cache(by_name):
            return ActivationCache({n: by_name[n] for n in self._hook_names if n in by_name}, self)

        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(_until_eos(np.asarray(new_tokens), eos_ids))
        prompt_cache = {**_cache_values(encoder_values), **_cache_values(prompt_values)}
        return sampling.Generation(
            tokens=new_tokens,
            prompt_tokens=jnp.asarray(tokens),
            prompt_mask=jnp.asarray(mask),
            text=text,
            prompt_cache=as_cache(prompt_cache) if captured else None,
            step_cache=as_cache(_cache_values(step_values)) if captured else None,
        )
