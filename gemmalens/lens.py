"""The model surface: call, capture, intervene.

`Model` wraps a Penzai model with plain batch-first arrays at its edge::

    logits = m(tokens)                                   # [batch, seq] -> [batch, seq, vocab]
    logits, cache = m.run_with_cache(tokens, names="blocks.*.hook_resid_post")
    logits = m.run_with_hooks(tokens, hooks={"blocks.0.hook_resid_pre": fn})
    logits = m(tokens, pixel_values=pixels)              # Gemma 3 loaded with vision=True

All three run compiled (``jax.jit``); calling again with the same shapes and the same
hooks does not retrace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens import compiling, residual, sampling
from gemmalens.cache import ActivationCache, unknown_name_message, warn_if_patterns_are_large
from gemmalens.compiling import Distinct
from gemmalens.layers import stacking
from gemmalens.layers.embeddings import EmbedTokens, activation_dtype_of
from gemmalens.layers.hooks import HookFn, hook_points, intervene, stateless_call
from gemmalens.layers.hooks import capture as capture_hooks
from gemmalens.layers.params import cast_parameters
from gemmalens.layers.transformer import LOGIT_WINDOW

NameSelector = Union[None, str, Iterable[str], Callable[[str], bool]]

_CACHE_LABEL = "gemmalens.cache:"


# Parts of hook names that only some families (or towers) have, and what to say when a
# model without them is asked for one ({family}: that model's).
_NONE_HERE = "; this {family} model has none"
_NO_TOWER = "; gl.load(path, {tower}=True) builds the one a multimodal checkpoint holds"
_ABSENT_PARTS = (
    (("altup.", "hook_altup_"), "AltUp's hook points belong to Gemma 3n" + _NONE_HERE),
    (("laurel.",), "LAuReL's hook points belong to Gemma 3n" + _NONE_HERE),
    (
        ("hook_per_layer_",),
        "per-layer input hook points belong to Gemma 3n and Gemma 4 E2B / E4B" + _NONE_HERE,
    ),
    (
        ("moe.", "hook_dense_mlp_out"),
        "mixture-of-experts hook points belong to Gemma 4 26B-A4B" + _NONE_HERE,
    ),
    (
        ("encoder.", "decoder.", "hook_cross_"),
        "encoder and decoder hook points belong to T5Gemma 2" + _NONE_HERE,
    ),
    (
        ("vision.", "hook_image_embed"),
        "this model was loaded without a vision tower" + _NO_TOWER.format(tower="vision"),
    ),
    (("audio.",), "this model was loaded without an audio tower" + _NO_TOWER.format(tower="audio")),
)


def _unknown_hook_message(name: str, valid: list[str], family: str) -> str:
    """`unknown_name_message` for a model; when the name belongs to another family (an
    AltUp hook asked of Gemma 3, say) or to a tower this model was loaded without, says
    so instead of listing near names that are not what was meant."""
    for parts, reason in _ABSENT_PARTS:
        if any(part in name for part in parts) and not any(p in n for n in valid for p in parts):
            return (
                f"No hook point named {name!r} in this model: {reason.format(family=family)}. "
                f"(`m.hook_names` lists all {len(valid)}.)"
            )
    if any(c in name for c in "*?["):
        # Near names of a pattern are patterns: every layer number becomes '*'.
        shapes = list(dict.fromkeys(re.sub(r"(?<=blocks\.)\d+", "*", n) for n in valid))
        close = difflib.get_close_matches(name, shapes, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return (
            f"The pattern {name!r} matches no hook point of this model.{hint} "
            f"(`m.hook_names` lists all {len(valid)}.)"
        )
    return unknown_name_message(name, valid, "in this model")


def _side_inputs(
    attention_mask: jax.Array | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The side inputs of a call: the mask (when given) and ``extra``, the named arrays a
    call with images adds (`gemmalens.vision.merge.image_side_inputs`)."""
    # No mask (None) means every token is real: the model may then use banded kernels.
    side = dict(extra or {})
    if attention_mask is not None:
        side["attention_mask"] = pz.nx.wrap(attention_mask).tag("batch", "seq")
    return side


def decoder_logits(
    model: Any,
    tokens: jax.Array,
    attention_mask: jax.Array | None,
    extra: dict[str, Any] | None = None,
    *,
    logit_window: tuple[int, int] | None = None,
) -> jax.Array:
    """Logits ``[batch, seq, vocab]`` of a decoder-only Penzai tree (not compiled: callable
    inside a traced function, e.g. `gemmalens.patching`'s vmapped sweep). ``extra``: further
    named side inputs (images); ``logit_window=(start, stop)``: only positions
    ``start..stop-1`` (`DecoderLM`)."""
    side = _side_inputs(attention_mask, extra)
    if logit_window is not None:
        side[LOGIT_WINDOW] = logit_window
    logits = model(pz.nx.wrap(tokens).tag("batch", "seq"), **side)
    return logits.unwrap("batch", "seq", "vocab")


def decoder_stateful(
    model: Any, state: list, tokens: jax.Array, attention_mask: Any, extra: Any = None
) -> Any:
    """``model.stateless_call`` on token ids: ``(logits, new state)`` of a capturing tree."""
    return stateless_call(
        model, state, pz.nx.wrap(tokens).tag("batch", "seq"), **_side_inputs(attention_mask, extra)
    )


def refuse_multimodal_prompts(config: Any, prompt_ids: np.ndarray, call: str) -> None:
    """Generation reads text: a clear error when ``prompt_ids`` (the prompts' real tokens)
    hold a tower's placeholders. ``call`` shows the call that gives such a prompt's
    logits, with ``{keyword}`` for the tower's input (``pixel_values``, ``input_features``)."""
    towers = (
        ("vision", "image_token_id", "images", "pixel_values"),
        ("audio", "audio_token_id", "audio", "input_features"),
    )
    for tower, id_field, what, keyword in towers:
        if getattr(config, tower, None) is None:
            continue
        token = getattr(config, id_field)
        if (np.asarray(prompt_ids) == token).any():
            raise NotImplementedError(
                f"The prompts hold {what.rstrip('s')} tokens (id {token}): generation with "
                f"{what} is not implemented yet. {call.format(keyword=keyword)} gives the "
                f"logits of a prompt with {what}; generate takes text prompts."
            )


def _run(forward, treedef, leaves, inputs):
    # The model comes as its leaves (flattened once per model): flattening a Penzai tree
    # on every call costs about a millisecond, a tenth of a small model's forward pass.
    return _run_distinct(forward, Distinct(treedef, leaves), inputs)


@compiling.jit(static_argnums=0)
def _run_distinct(forward, model, inputs):
    return forward(model.tree(), *inputs)


def _run_stateful(forward_stateful, treedef, leaves, inputs):
    return _run_stateful_distinct(forward_stateful, Distinct(treedef, leaves), inputs)


@compiling.jit(static_argnums=0)
def _run_stateful_distinct(forward_stateful, plan, inputs):
    model, state = plan.tree()
    return forward_stateful(model, state, *inputs)


def _until_eos(tokens: np.ndarray, eos_ids: tuple[int, ...]) -> list[list[int]]:
    rows = []
    for row in tokens.tolist():
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        rows.append(row[: ends[0]] if ends else row)
    return rows


# Label scopes of the vision and audio towers and of Gemma 3n's multimodal embedder, whose
# parameters `Model.with_activation_dtype` converts whole.
_TOWER_SCOPES = frozenset({"vision", "audio", "embed_vision"})


class Model:
    """A Gemma model with named hook points, ready for interpretability work.

    Attributes:
      model: the Penzai model (renders in Treescope; edit it with ``pz.select``).
      config: the architecture config (e.g. `gemmalens.families.gemma3.Gemma3Config`).
      tokenizer: a `gemmalens.tokenizer.Tokenizer`, or None when the checkpoint had none.
      checkpoint_format: the format `gemmalens.load` read (``"Hugging Face checkpoint"``,
        ``"KerasHub preset"``, ``"gemma-library checkpoint"``); None for built models.
    """

    checkpoint_format: str | None = None
    # Where the parameters live when the model is on a mesh (`gemmalens.sharding`).
    placement: Any = None
    # The LoRA settings of attached adapters (`gemmalens.lora`), else None.
    adapter_config: dict[str, Any] | None = None
    # The sparse autoencoders spliced in (`gemmalens.sae.splice`), by site, else None.
    saes: dict[str, Any] | None = None
    # What a model says of its source and its additions: `with_tree` carries these over.
    _CARRIED = ("checkpoint_format", "placement", "adapter_config", "saes")

    # How the Penzai tree is called on the prepared inputs (`_prepare`): plain logits, and
    # logits with the captured values. An encoder-decoder surface swaps both.
    logits_of = staticmethod(decoder_logits)
    captured_run = staticmethod(decoder_stateful)

    def __init__(self, model: pz.nn.Layer, config: Any, tokenizer: Any = None):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer

    def with_tree(self, tree: pz.nn.Layer, **changes: Any) -> Model:
        """A model of the same kind, config and tokenizer around ``tree`` (an edited copy of
        ``self.model``), ``self`` unchanged. What ``self`` says of its source and additions
        (``checkpoint_format``, ``placement``, ``adapter_config``, ``saes``) carries over,
        except where ``changes`` gives new values."""
        unknown = set(changes) - set(self._CARRIED)
        if unknown:
            raise TypeError(f"with_tree sets {list(self._CARRIED)}, not {sorted(unknown)}.")
        out = type(self)(tree, self.config, self.tokenizer)
        for name in self._CARRIED:
            setattr(out, name, changes.get(name, getattr(self, name)))
        return out

    def stacked(self, donate: bool = False) -> Model:
        """This model with its layers stacked (`gemmalens.layers.stacking`): each block
        parameter of one name and shape stored in one array with a layer axis, and blocks
        that repeat run as one compiled loop, so compile time no longer grows with depth.

        Everything else is as before: per-layer hook names, captures, interventions,
        patching, Treescope's per-block view; values agree with the unstacked model to
        float rounding. ``donate=True`` frees this model's per-layer arrays as they are
        copied (``self`` is unusable afterwards), so the peak memory is the model plus one
        stack; ``gl.load(path, stack_layers=True)`` does this.

        On a mesh (``self.placement``), each stack is placed with the layer axis whole on
        every device and its named axes split as each layer's parameter was
        (`gemmalens.sharding.Placement.stack_spec`: ``q_proj``'s stack ``[layer, heads,
        head_dim, embedding]`` is ``P(None, "model", None, None)``).
        """
        tree = stacking.stack_tree(self._model, donate=donate, placement=self.placement)
        return self.with_tree(tree)

    def unstacked(self) -> Model:
        """This model with every layer's parameters its own arrays again (a copy; on a mesh,
        placed as a per-layer model's are)."""
        return self.with_tree(stacking.unstack_tree(self._model, self.placement))

    def with_activation_dtype(self, dtype: Any) -> Model:
        """This model with its residual stream computed in ``dtype`` (``"float32"``), its
        text weights left as they are stored; None goes back to the weights' dtype.

        A bfloat16 model reads its logits to bfloat16's precision: a logit near 20 is a
        multiple of 0.125, and every layer rounds the stream to 8 significant bits, so
        patching metrics of a few hundredths are rounding noise (docs/analyses.md,
        "Precision"). With float32 activations the token embedding emits float32 and every
        layer after it computes in float32 (weights are converted as they are read), so the
        values are those of the float32 model holding the same weights, for the memory of
        the bfloat16 weights, float32 activations and a float32 copy of each weight while it
        is used (the tied unembedding's is the largest: vocab x d_model). Vision and audio
        towers (parameters under ``vision.``, ``audio.``, ``embed_vision.``, a small part
        of the model) are converted to ``dtype`` whole, so they compute as the float32
        model's do. Slower than bfloat16 on a GPU (float32 matrix products), and `generate`
        does not use its fused MLP kernel (`gemmalens.kernels.decode_mlp`), which wants one
        dtype throughout.
        """
        if dtype is not None:
            try:
                floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
            except TypeError:
                floating = False
            if not floating:
                raise ValueError(
                    f"with_activation_dtype takes a floating dtype such as 'float32' (or None "
                    f"for the weights' dtype), not {dtype!r}."
                )
            if jnp.promote_types(dtype, self.weights_dtype) != jnp.dtype(dtype):
                raise ValueError(
                    f"with_activation_dtype({dtype!r}) would be narrower than the weights "
                    f"({self.weights_dtype.name}), and layers would still compute in the "
                    f"weights' dtype. Load the model in {dtype!r} instead "
                    f"(gl.load(path, dtype={dtype!r}))."
                )
            dtype = jnp.dtype(dtype).name
        tower_dtype = dtype or self.weights_dtype

        def set_dtype(embed: EmbedTokens) -> EmbedTokens:
            return dataclasses.replace(embed, activation_dtype=dtype)

        def in_a_tower(param: pz.Parameter) -> bool:
            return not _TOWER_SCOPES.isdisjoint(param.label.split("."))

        tree = pz.select(self._model).at_instances_of(EmbedTokens).apply(set_dtype)
        return self.with_tree(cast_parameters(tree, tower_dtype, where=in_a_tower))

    @property
    def weights_dtype(self) -> jnp.dtype:
        """The dtype of the token embedding table (the text weights' dtype)."""
        tables = pz.select(self._model).at_instances_of(EmbedTokens).get_sequence()
        return jnp.dtype(tables[0].table.value.dtype)

    @property
    def activation_dtype(self) -> jnp.dtype:
        """The dtype the residual stream is computed in (`with_activation_dtype`, else the
        token embedding's)."""
        chosen = activation_dtype_of(self._model)
        return self.weights_dtype if chosen is None else chosen

    @property
    def is_stacked(self) -> bool:
        """Whether the layers are stacked (`stacked`)."""
        return stacking.is_stacked(self._model)

    @property
    def model(self) -> pz.nn.Layer:
        return self._model

    @model.setter
    def model(self, value: pz.nn.Layer) -> None:
        self._model = value
        self._frozen = pz.freeze_params(value)
        self._leaves, self._treedef = jax.tree.flatten(self._frozen)
        self._capture_plans: dict[Any, tuple[pz.nn.Layer, list]] = {}
        self._flat_plans: dict[int, tuple[pz.nn.Layer, Any, list]] = {}
        self._generation_programs: dict[Any, sampling.GenerationProgram] = {}
        self._hook_names = [hp.name for hp in hook_points(value)]

    @property
    def _frozen_distinct(self) -> Distinct:
        """The frozen model as compiled programs take it (`compiling.Distinct`), from the
        leaves flattened once per model."""
        return Distinct(self._treedef, self._leaves)

    def __repr__(self) -> str:
        family = getattr(self.config, "family", type(self.config).__name__)
        tower = ", vision tower" if getattr(self.config, "vision", None) is not None else ""
        tower += ", audio tower" if getattr(self.config, "audio", None) is not None else ""
        return (
            f"gemmalens.Model({family}, {self.config.num_hidden_layers} layers, "
            f"d_model={self.config.hidden_size}, vocab={self.config.vocab_size}{tower}, "
            f"{len(self._hook_names)} hook points)"
        )

    # ----------------------------------------------------------------------------- inputs

    @property
    def hook_names(self) -> list[str]:
        """Every hook point name, in forward order."""
        return list(self._hook_names)

    @property
    def stacks(self) -> tuple[residual.Stack, ...]:
        """The model's stacks of blocks, in the order they run: each with its hook prefix,
        block count, the input stream it reads and whether its output reaches the logits
        (one ``decoder`` for decoder-only models; ``encoder`` and ``decoder`` for T5Gemma 2).
        The analyses and patching read this instead of assuming one stack."""
        return residual.stacks(self.config)

    @property
    def input_streams(self) -> tuple[str, ...]:
        """The token inputs a call takes: ``("tokens",)``, or ``("tokens",
        "decoder_tokens")`` for an encoder-decoder."""
        return tuple(dict.fromkeys(stack.reads for stack in self.stacks))

    def to_tokens(self, text: str | list[str]) -> tuple[jax.Array, jax.Array]:
        """Encodes text (with BOS) into ``(tokens, attention_mask)``, right-padded, [batch, seq]."""
        if self.tokenizer is None:
            raise ValueError(
                "This model has no tokenizer: pass token ids, or load a checkpoint directory "
                "that contains tokenizer.model."
            )
        texts = [text] if isinstance(text, str) else text
        texts = list(texts) if isinstance(texts, Iterable) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise TypeError(
                f"to_tokens encodes text, a string or a list of strings; got {text!r:.60}. "
                "Token ids need no encoding: pass them to the model as a [batch, seq] array."
            )
        tokens, mask = self.tokenizer.pad_batch(self.tokenizer.encode(texts), side="right")
        return jnp.asarray(tokens), jnp.asarray(mask)

    def _inputs(self, tokens: Any, attention_mask: Any) -> tuple[jax.Array, jax.Array | None]:
        """Validated ``(tokens, attention_mask)``; the mask is None when nothing is padded."""
        tokens_np, mask_np = self._host_inputs(tokens, attention_mask)
        if mask_np is None:
            return self._on_mesh(tokens_np), None
        return self._on_mesh(tokens_np), self._on_mesh(mask_np)

    def _host_inputs(self, tokens: Any, attention_mask: Any) -> tuple[np.ndarray, Any]:
        """`_inputs` as NumPy arrays (int32 ids, the mask or None), before placement."""
        if isinstance(tokens, str) or (
            isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)
        ):
            tokens, text_mask = self.to_tokens(tokens)
            if attention_mask is None:
                attention_mask = text_mask
        tokens_np = np.asarray(tokens)
        if tokens_np.ndim == 1:
            raise ValueError(
                f"tokens has shape {tokens_np.shape}; gemmalens expects [batch, seq]. "
                "For one sequence, use tokens[None]."
            )
        if tokens_np.ndim != 2:
            raise ValueError(
                f"tokens must be a [batch, seq] array of ids, got shape {tokens_np.shape}."
            )
        if not np.issubdtype(tokens_np.dtype, np.integer):
            raise TypeError(f"tokens must be integer ids, got dtype {tokens_np.dtype}.")
        vocab = self.config.vocab_size
        outside = (tokens_np < 0) | (tokens_np >= vocab)
        if getattr(self.config, "vision", None) is not None:
            outside &= tokens_np != self.config.image_token_id  # may lie past the table
        bad = np.argwhere(outside)
        if bad.size:
            where = tuple(int(i) for i in bad[0])
            raise ValueError(
                f"Token id {int(tokens_np[where])} at position {where} is outside the vocabulary "
                f"[0, {vocab}); {len(bad)} id(s) out of range. Was it encoded with another tokenizer?"
            )
        if attention_mask is None:
            # Gemma never emits its pad id inside text, so pad ids mark padding.
            mask_np = (tokens_np != self.config.pad_token_id).astype(np.int32)
        else:
            mask_np = np.asarray(attention_mask).astype(np.int32)
            if mask_np.shape != tokens_np.shape:
                raise ValueError(
                    f"attention_mask has shape {mask_np.shape} but tokens have shape "
                    f"{tokens_np.shape}; they must match (1 = real token, 0 = padding)."
                )
        if mask_np.all() and not self._splits_sequence():
            return tokens_np.astype(np.int32), None
        return tokens_np.astype(np.int32), mask_np

    def _splits_sequence(self) -> bool:
        """Whether inputs are split along their tokens (`gemmalens.sharding`'s ``seq``
        rule). Such inputs keep their mask even where nothing is padded: without one,
        attention may run cuDNN's flash kernel on a GPU, and JAX's partitioning rule for
        that kernel refuses a query split along the sequence; with one it runs XLA's own
        attention, which XLA splits."""
        return self.placement is not None and self.placement.seq_ways > 1

    def _on_mesh(self, array: np.ndarray) -> jax.Array:
        """An input ``[batch, seq]``, placed as `gemmalens.sharding.Placement.input_sharding`
        says when the model is on a mesh: the batch over the ``data`` axis where it divides
        it, the tokens along the ``seq`` rule when sequence sharding is on (an error names
        the length to pad to); else an ordinary array. XLA's partitioner carries the
        inputs' split through the whole program."""
        placed = None if self.placement is None else self.placement.input_sharding(array.shape)
        return jnp.asarray(array) if placed is None else jax.device_put(array, placed)

    @property
    def mesh(self) -> Any:
        """The `jax.sharding.Mesh` the parameters live on, or None (`gemmalens.sharding`)."""
        return None if self.placement is None else self.placement.mesh

    @property
    def sharding_rules(self) -> dict[str, Any] | None:
        """Parameter axis -> mesh axis, as in force on this model's mesh (None off a mesh)."""
        return None if self.placement is None else dict(self.placement.rules)

    def select_hooks(self, names: NameSelector) -> list[str]:
        """Resolves names, glob patterns (``"blocks.*.attn.hook_pattern"``) or a predicate
        into hook names, in forward order. Unknown names raise with the nearest valid ones."""
        if names is None:
            return self.hook_names
        if callable(names):
            return [n for n in self._hook_names if names(n)]
        patterns = [names] if isinstance(names, str) else list(names)
        chosen: set[str] = set()
        for pattern in patterns:
            matches = [n for n in self._hook_names if fnmatch.fnmatchcase(n, pattern)]
            if not matches:
                raise KeyError(_unknown_hook_message(pattern, self._hook_names, self.config.family))
            chosen.update(matches)
        return [n for n in self._hook_names if n in chosen]

    # ----------------------------------------------------------------------------- running

    def _prepare(self, tokens: Any, attention_mask: Any, streams: dict[str, Any]) -> tuple:
        """The validated inputs of one call, as `logits_of` takes them after the model:
        ``(tokens, mask)`` (mask None when nothing is padded), and for a call with images
        or audio ``(tokens, mask, side inputs)``. ``streams`` holds the keyword inputs
        beyond ``tokens``: ``pixel_values`` and ``token_type_ids`` (a model with its vision
        tower; Gemma 4 also ``image_position_ids``, and ``mm_token_type_ids`` for the
        types), ``input_features`` and ``input_features_mask`` (Gemma 3n and Gemma 4 with
        their audio towers)."""
        from gemmalens.audio.merge import audio_side_inputs
        from gemmalens.vision.merge import image_side_inputs

        streams = dict(streams)
        pixel_values = streams.pop("pixel_values", None)
        token_type_ids = streams.pop("token_type_ids", None)
        # Gemma 4's processor names: patch positions, and its token types.
        image_position_ids = streams.pop("image_position_ids", None)
        mm_token_type_ids = streams.pop("mm_token_type_ids", None)
        # The audio feature extractor's names.
        input_features = streams.pop("input_features", None)
        input_features_mask = streams.pop("input_features_mask", None)
        if mm_token_type_ids is not None:
            if token_type_ids is not None:
                raise TypeError(
                    "Give token_type_ids or mm_token_type_ids (Gemma 4's processor name for "
                    "the same thing), not both."
                )
            token_type_ids = mm_token_type_ids
        if streams:
            if getattr(self.config, "vision", None) is not None:
                reads = (
                    "tokens, and pixel_values and token_type_ids for its vision tower "
                    "(Gemma 4: also image_position_ids)"
                )
            elif getattr(self.config, "audio", None) is not None:
                reads = (
                    "tokens, and input_features and input_features_mask (and the "
                    "processor's token_type_ids) for its audio tower"
                )
            else:
                reads = "one input stream (tokens)"
            raise TypeError(
                f"This model reads {reads}; it got {sorted(streams)} too. decoder_tokens "
                "and decoder_attention_mask are for encoder-decoder models."
            )
        tokens, mask = self._host_inputs(tokens, attention_mask)
        # The image and audio checks read the ids on the host (also under jax.eval_shape).
        # Gemma 3n's token types mark audio (3) too and decide nothing: the audio check
        # takes them. Gemma 4's decide the image blocks and are checked against the audio
        # placeholders as well.
        family = getattr(self.config, "family", None)
        audio_types = token_type_ids if family in ("gemma3n", "gemma4") else None
        image_types = None if family == "gemma3n" else token_type_ids
        images = image_side_inputs(
            self.config, tokens, pixel_values, image_types, image_position_ids
        )
        audio = audio_side_inputs(
            self.config, tokens, input_features, input_features_mask, audio_types
        )
        extra = {**(images or {}), **(audio or {})}
        tokens = self._on_mesh(tokens)
        mask = None if mask is None else self._on_mesh(mask)
        return (tokens, mask, extra) if extra else (tokens, mask)

    def __call__(self, tokens: Any, attention_mask: Any = None, **streams: Any) -> jax.Array:
        """Logits ``[batch, seq, vocab]`` for token ids ``[batch, seq]`` (or text).

        ``attention_mask`` ([batch, seq], 1 = keep) defaults to ``tokens != pad_token_id``.
        Padded sequences give the same logits at their real tokens as when run alone.
        Encoder-decoder models also take ``decoder_tokens`` (and
        ``decoder_attention_mask``): see `input_streams`.

        A Gemma 3 model loaded with its vision tower (``gl.load(path, vision=True)``) takes
        ``pixel_values`` ``[num_images, 3, H, W]`` (`gemmalens.vision.preprocess_gemma3`)
        for the runs of image tokens in ``tokens`` (``mm_tokens_per_image`` each, images in
        run order, row-major), and optionally ``token_type_ids`` [batch, seq] (1 = image;
        derived from the image token ids when left out). See `gemmalens.vision.merge`.

        A Gemma 3n or Gemma 4 (E2B, E4B) model loaded with its audio tower
        (``gl.load(path, audio=True)``) takes ``input_features`` ``[num_clips, frames, 128]``
        and ``input_features_mask`` ``[num_clips, frames]``
        (`gemmalens.audio.gemma3n_audio_features` / `gemma4_audio_features`, whose result can
        also be passed whole as ``input_features``) for the runs of audio tokens in
        ``tokens``: ``audio_soft_tokens_per_image`` each in Gemma 3n, as many as the clip
        makes in Gemma 4. See `gemmalens.audio.merge` and `gemmalens.audio.gemma4`.
        """
        inputs = self._prepare(tokens, attention_mask, streams)
        return _run(self.logits_of, self._treedef, self._leaves, inputs)

    def run_with_cache(
        self, tokens: Any, names: NameSelector = None, attention_mask: Any = None, **streams: Any
    ) -> tuple[jax.Array, ActivationCache]:
        """Logits and the values at the chosen hook points (all of them by default).

        ``names``: None (all), a name, a glob pattern, a list of either, or a predicate on
        the name. Only the chosen values are kept. Further input streams
        (``decoder_tokens=...``, ``pixel_values=...``) by keyword. Hook points that did not
        run (``vision.*``, T5Gemma 2's ``encoder.vision.*``, in a call without images;
        ``audio.*`` and ``hook_audio_embed`` in a call without audio) are left out of the
        cache.
        """
        if isinstance(names, (np.ndarray, jax.Array)):
            raise TypeError(
                "The second argument of run_with_cache is names (hook names or patterns); "
                "pass further inputs by keyword, e.g. m.run_with_cache(tokens, decoder_tokens=...)."
            )
        logits, values = self._captured(self._prepare(tokens, attention_mask, streams), names)
        return logits, ActivationCache(values, self)

    def _captured(self, inputs: tuple, names: NameSelector) -> tuple[jax.Array, dict]:
        """Logits and ``{name: value}`` (forward order) of one run of prepared ``inputs``
        (`_prepare`) capturing ``names``."""
        unbound, state = self._capture_plan(names)
        captured = [v.label[len(_CACHE_LABEL) :] for v in state]
        # The tower's names: vision.* (Gemma 3), encoder.vision.* (T5Gemma 2), audio.*
        # (Gemma 3n, whose chunked patterns are small: seq x context per head).
        in_tower = [n.startswith(("vision.", "audio.")) or ".vision." in n for n in captured]
        text = [n for n, tower in zip(captured, in_tower) if not tower]
        warn_if_patterns_are_large(self, text, *inputs[0].shape)
        # A call with images carries their side inputs as its last prepared input.
        extra = inputs[-1] if isinstance(inputs[-1], dict) else None
        if extra is not None and "pixel_values" in extra:
            # The tower's patterns are [image, heads, patch, patch]: 4096 patches at 896 px.
            siglip = self.config.vision.vision
            images = extra["pixel_values"].named_shape["batch"]
            warn_if_patterns_are_large(
                self,
                [n for n, tower in zip(captured, in_tower) if tower and n.startswith("vision.")],
                images,
                siglip.num_patches,
                heads=siglip.num_attention_heads,
            )
        treedef, leaves = self._flat_plan(unbound, state)
        logits, values = _run_stateful(self.captured_run, treedef, leaves, inputs)
        # A hook point that did not run (a tower without its input) stored nothing.
        by_name = {v.label[len(_CACHE_LABEL) :]: v.value for v in values if v.value is not None}
        ordered = {n: by_name[n] for n in self._hook_names if n in by_name}
        return logits.unwrap("batch", "seq", "vocab"), ordered

    def _capture_plan(self, names: NameSelector) -> tuple[pz.nn.Layer, list]:
        """The model rewritten to capture ``names``, split from its (empty) state.

        Rewriting a large Penzai tree takes long next to a forward pass, so plans are kept
        per selection until the model changes."""
        key = tuple(names) if isinstance(names, (list, set, frozenset)) else names
        try:
            return self._capture_plans[key]
        except TypeError:  # an unhashable selector: build the plan every time
            pass
        except KeyError:
            pass
        capturing = capture_hooks(self._frozen, set(self.select_hooks(names)), _CACHE_LABEL)
        unbound, state = pz.unbind_state_vars(capturing)
        plan = (unbound, [v.freeze() for v in state])
        try:
            self._capture_plans[key] = plan
        except TypeError:
            pass
        return plan

    def _flat_plan(self, unbound: pz.nn.Layer, state: list) -> tuple[Any, list]:
        """``(treedef, leaves)`` of a capture plan, kept while the plan is: flattening the
        tree on every call would cost about a millisecond."""
        cached = self._flat_plans.get(id(unbound))
        if cached is None or cached[0] is not unbound:
            leaves, treedef = jax.tree.flatten((unbound, state))
            if len(self._flat_plans) >= 32:  # plans of unhashable selectors are not kept
                self._flat_plans.clear()
            cached = self._flat_plans[id(unbound)] = (unbound, treedef, leaves)
        return cached[1], cached[2]

    def with_hooks(self, hooks: Mapping[str, HookFn]) -> pz.nn.Layer:
        """The Penzai model with ``hooks`` installed (keys are names or glob patterns)."""
        return self._install(self._model, hooks)

    def _install(self, tree: Any, hooks: Mapping[str, HookFn]) -> Any:
        """``tree`` (this model, with parameters or frozen) with ``hooks`` installed."""
        fns: dict[str, HookFn] = {}
        for pattern, fn in hooks.items():
            if not callable(fn):
                raise TypeError(
                    f"The hook for {pattern!r} is {fn!r}; it must be a function fn(value, name)."
                )
            for name in self.select_hooks(pattern):
                if name in fns:
                    raise ValueError(
                        f"Hook point {name!r} is matched by two hook patterns; give it one."
                    )
                fns[name] = fn
        return intervene(tree, fns)

    def run_with_hooks(
        self, tokens: Any, hooks: Mapping[str, HookFn], attention_mask: Any = None, **streams: Any
    ) -> jax.Array:
        """Logits with interventions: ``hooks`` maps a hook name (or glob pattern) to
        ``fn(value, name)``, which returns the replacement value or None to keep it.

        A pure function of the model and the hooks: the hooked tree is built beside
        ``m.model`` and run once; the model itself (and what it keeps compiled) is left
        as it was. Passing the same function objects again reuses the compiled program.
        """
        inputs = self._prepare(tokens, attention_mask, streams)
        leaves, treedef = jax.tree.flatten(self._install(self._frozen, hooks))
        return _run(self.logits_of, treedef, leaves, inputs)

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
        """Samples continuations with a KV cache, in one compiled call.

        Args:
          prompts: text (a string or list of strings, encoded with BOS), a ragged list of
            token-id lists, or a [batch, seq] array (with ``attention_mask`` for padding;
            left or right padding both work).
          max_new_tokens: tokens generated per prompt.
          temperature: 0 is greedy; otherwise logits are divided by it before sampling.
          top_k, top_p: with a temperature above 0, restrict sampling to the k most likely
            tokens / the nucleus p (greedy decoding ignores them).
          seed: the sampling seed (same seed, same output).
          stop_at_eos: after an end-of-sequence token a row emits only pad tokens.
          eos_ids: overrides the end tokens (default: the config's eos ids and, with a
            tokenizer, ``<end_of_turn>``).
          capture: hook names to record at every step (``Generation.step_cache``: arrays
            with a leading [step] axis) and on the prompt (``Generation.prompt_cache``).
          hooks: interventions ``{name: fn(value, name)}`` applied during the prompt and
            every step (for example a steering vector added to the residual stream).

        Returns:
          a `gemmalens.sampling.Generation`.
        """
        sampler = sampling.Sampler(temperature, top_k, top_p)  # checks its options
        max_new_tokens = sampling.check_max_new_tokens(max_new_tokens)
        rows = self._prompt_rows(prompts, attention_mask)
        width = max(len(r) for r in rows)
        tokens = np.full((len(rows), width), self.config.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, row in enumerate(rows):  # left padding: every row ends at the last column
            tokens[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
        self._inputs(tokens, mask)  # validates ids
        refuse_multimodal_prompts(self.config, tokens[mask > 0], "m(tokens, {keyword}=...)")
        if eos_ids is None:
            configured = self.config.eos_token_id
            eos_ids = list(configured) if isinstance(configured, (tuple, list)) else [configured]
            if self.tokenizer is not None and self.tokenizer.end_of_turn_id is not None:
                eos_ids.append(self.tokenizer.end_of_turn_id)
        eos_ids = tuple(int(e) for e in eos_ids) if stop_at_eos else ()

        captured = set(self.select_hooks(capture)) if capture != () else set()
        program = self._generation_program(hooks, captured, len(rows), width + max_new_tokens)
        new_tokens, prompt_values, step_values = sampling.generate_tokens(
            program,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            jax.random.key(seed),
            max_new_tokens=max_new_tokens,
            sampler=sampler,
            eos_ids=eos_ids or (-1,),
            pad_id=int(self.config.pad_token_id),
            unroll=sampling.DECODE_UNROLL,
        )

        def as_cache(values):
            by_name = {v.label[len(_CACHE_LABEL) :]: v.value for v in values}
            return ActivationCache({n: by_name[n] for n in self._hook_names if n in by_name}, self)

        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(_until_eos(np.asarray(new_tokens), eos_ids))
        return sampling.Generation(
            tokens=new_tokens,
            prompt_tokens=jnp.asarray(tokens),
            prompt_mask=jnp.asarray(mask),
            text=text,
            prompt_cache=as_cache(prompt_values) if captured else None,
            step_cache=as_cache(step_values) if captured else None,
        )

    def _generation_program(
        self, hooks: Mapping[str, HookFn] | None, captured: set[str], batch: int, length: int
    ) -> sampling.GenerationProgram:
        """The model prepared for generation. Preparing rewrites the whole tree, which
        costs several decode steps' worth of time, so programs without interventions are
        kept until the model changes (hook functions may change between calls: not kept)."""
        from gemmalens.vision.merge import without_images

        if hooks:
            model = capture_hooks(self.with_hooks(hooks), captured, _CACHE_LABEL)
            model = without_images(model)  # generation reads no images (yet)
            return sampling.prepare(pz.freeze_params(model), batch, length, self.placement)
        # Kernel settings are read while preparing: a program made under others is stale.
        kernels = (sampling.DECODE_ATTENTION_KERNEL, sampling.DECODE_MLP_KERNEL)
        key = (frozenset(captured), batch, length, kernels)
        program = self._generation_programs.get(key)
        if program is None:
            if len(self._generation_programs) >= 16:
                self._generation_programs.clear()
            model = without_images(capture_hooks(self._frozen, captured, _CACHE_LABEL))
            program = sampling.prepare(model, batch, length, self.placement)
            self._generation_programs[key] = program
        return program

    def _prompt_rows(self, prompts: Any, attention_mask: Any) -> list[list[int]]:
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str)
        ):
            if self.tokenizer is None:
                raise ValueError(
                    "Text prompts need a tokenizer and this model has none: pass token ids, or "
                    "load a checkpoint directory that contains tokenizer.model."
                )
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            return self.tokenizer.encode(texts)
        if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (list, tuple)):
            return [list(map(int, row)) for row in prompts]
        array = np.asarray(prompts)
        if array.ndim != 2:
            raise ValueError(
                f"prompts must be text, a list of id lists or a [batch, seq] array; got shape {array.shape}."
            )
        keep = (
            np.ones(array.shape, bool)
            if attention_mask is None
            else np.asarray(attention_mask).astype(bool)
        )
        return [list(map(int, row[k])) for row, k in zip(array, keep, strict=True)]

    @contextlib.contextmanager
    def hooks(self, hooks: Mapping[str, HookFn]) -> Iterator[Model]:
        """Context manager: inside it, every call of this model runs with ``hooks``.

        It sets ``m.model`` to the hooked tree and back (which drops what the model keeps
        compiled); for one hooked call, `run_with_hooks` leaves the model untouched."""
        original = self._model
        self.model = self.with_hooks(hooks)
        try:
            yield self
        finally:
            self.model = original
