"""KerasHub presets (``backbone.save_to_preset(dir)``) read as Hugging Face checkpoints.

A preset directory holds ``config.json`` (``{"class_name": ..., "config": {constructor
arguments}}``), ``metadata.json``, the weights in ``model.weights.h5`` (or, above 10 GB,
``model.weights.json`` with ``model_NNNNN.weights.h5`` shards) and, when a tokenizer was
saved, ``assets/tokenizer/vocabulary.spm`` (a SentencePiece model, passed on as the
tokenizer). `open_preset` turns the backbone config into the equivalent Hugging Face
``config.json`` dict and presents every weight under its Hugging Face name and layout
(`MappedCheckpoint`): each tensor is read from the HDF5 file and rearranged only when the
builder asks for it. The family loaders then build the model exactly as for a Hugging Face
directory. Reading needs h5py (``pip install h5py`` or ``pip install "gemmalens[keras]"``).

Backbones read: ``Gemma3Backbone``, ``Gemma3nBackbone``, ``Gemma4Backbone`` (dense, MoE,
per-layer inputs, KV sharing) and ``T5Gemma2Backbone``: their **text** parts. gemmalens has
no vision or audio towers yet, so a preset with a vision encoder (Gemma 3, Gemma 4,
T5Gemma 2), an audio encoder (Gemma 4), the Gemma 3n towers with their embedders, or the
pooling head of an embedding model (``is_embedding_model``) loads as its text model; those
weights are left unread. Any other weight the mapping does not account for is an error.

What the mapping does, following what KerasHub 0.32 computes (its source, not its config,
is the reference; names are KerasHub's):

* **Gemma 3 query scaling.** KerasHub's decoder block always scales queries by
  ``1/sqrt(head_dim)`` (it passes ``query_head_dim_normalize=True`` to the attention
  whatever the backbone was given), so the mapped config sets ``query_pre_attn_scalar =
  head_dim`` (and ignores ``query_head_dim_normalize``, as KerasHub does). A preset
  converted from a checkpoint with another scalar (Gemma 3 27B) thus loads with the scaling
  the KerasHub model computes, which differs from transformers'.
* **Final soft-cap.** Gemma 3 / 4 apply ``final_logit_soft_cap`` in the tied embedding's
  reverse projection, Gemma 3n in its text model's ``token_embedding(reverse=True)``,
  T5Gemma 2 in the seq2seq LM after the decoder embedding's reverse projection:
  ``tanh(logits / cap) * cap`` in every case, which is ``final_logit_softcapping``.
* **What the configs do not record:** Gemma 3's RoPE (10k on local layers, 1M on global
  ones, linear ``local_/global_rope_scaling_factor``) and its global layer every 6th
  (``i % 6 == 5``; all global without ``use_sliding_window_attention``); Gemma 4's default
  wavelengths (10k / 1M), its partial RoPE (``global_rope_partial_rotary_factor``, over the
  full ``global_head_dim``: transformers' ``proportional``), attention scale 1.0, K=V on
  global layers whenever ``num_global_key_value_heads`` is set, and the KV source of a
  shared layer (the last unshared layer of its type); Gemma 3n's ``rope_scaling`` (a linear
  factor on both layer types); T5Gemma 2's global RoPE (1M, scaled by
  ``[encoder_]global_rope_scaling_factor``; sliding layers unscaled).
* **Norms** keep their stored scales: Gemma 3 and T5Gemma 2 compute ``x * (1 + w)``,
  Gemma 3n and Gemma 4 ``x * w``, as transformers' files store them.
* **T5Gemma 2** keeps separate encoder and decoder embedding tables (and, with a vision
  encoder, separate end-of-image rows); gemmalens has one of each, so they must be equal
  (released presets tie them) or the load fails. A text-only preset has no end-of-image
  row and embeds that token like any other: the mapped config sets ``eoi_token_index=-1``.
* **Special tokens** (pad 0, BOS 2, EOS 1) are Gemma's; Gemma 3 / 4 configs do not record
  them. Gemma 4 ids at or above ``vocab_size_per_layer_input`` (out of range for KerasHub's
  per-layer table) read per-layer row 0.

KerasHub behaviour a gemmalens config cannot express is refused with a `CheckpointError`
naming it instead of loading a different model: attention logit soft-caps; Gemma 3 without
QK-norm or post-norms, with a ``layer_norm_epsilon`` other than 1e-6 (its blocks ignore
it), or bidirectional with an even sliding window; Gemma 4 with a sliding last layer,
sliding layers without a window, or bidirectional sliding layers; T5Gemma 2 with untied or
different encoder/decoder embeddings, or unequal stack widths; attention biases,
activations other than tanh-GELU, quantized weights, and a task saved beside the backbone
(``task.json``) that soft-caps the logits a second time (``Gemma4CausalLM``'s
``final_logit_cap``). Dropout rates are ignored (inference).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from gemmalens.checkpoints.load import CheckpointFormat
from gemmalens.checkpoints.mapped import MappedCheckpoint, MappedTensor
from gemmalens.checkpoints.safetensors_files import CheckpointError

FORMAT_NAME = "KerasHub preset"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_INDEX = "model.weights.json"
TOKENIZER_ASSET = pathlib.Path("assets/tokenizer/vocabulary.spm")

SLIDING, FULL = "sliding_attention", "full_attention"
_GELU_TANH = "gelu_approximate"
_HF_ACTIVATION = "gelu_pytorch_tanh"


def is_preset(path: pathlib.Path) -> bool:
    """A directory whose ``config.json`` is KerasHub's (it has a ``class_name``). Missing
    weight files are reported by `open_preset`, which says what is missing."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        saved = json.loads(config.read_text())
    except (ValueError, OSError):
        return False
    return isinstance(saved, dict) and "class_name" in saved


# ------------------------------------------------------------------------------ weights


def _snake_case(name: str) -> str:
    """A class name as Keras names its weights group (``Gemma3DecoderBlock`` ->
    ``gemma3_decoder_block``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _nth(name: str, index: int) -> str:
    """Keras' name for the ``index``-th layer of a class within one container."""
    return name if index == 0 else f"{name}_{index}"


@dataclasses.dataclass(frozen=True)
class _Dataset:
    file: pathlib.Path
    shape: tuple[int, ...]
    dtype: np.dtype
    bfloat16: bool


class _Weights:
    """The datasets of a preset's weight file(s): where each is, its shape and dtype.

    Nothing is read here; `read` opens the file for one dataset at a time. Keras stores a
    layer's variables as ``<path>/vars/<i>``, the path built from attribute names and, in
    lists and a functional model's layers, the snake-cased class name numbered in order
    (``layers/gemma3_decoder_block_3``); recent Keras versions also record the layer's own
    name on the ``vars`` group, which `group` checks where the mapping knows it.
    """

    def __init__(self, directory: pathlib.Path, h5py: Any):
        self.h5py = h5py
        self.datasets: dict[str, _Dataset] = {}
        self.layer_names: dict[str, str] = {}
        self.used: set[str] = set()
        self.missing: list[str] = []
        for file in self._files(directory):
            self._scan(file)

    @staticmethod
    def _files(directory: pathlib.Path) -> list[pathlib.Path]:
        single = directory / WEIGHTS_FILE
        if single.is_file():
            return [single]
        index = directory / SHARDED_INDEX
        if not index.is_file():
            raise CheckpointError(
                f"The KerasHub preset {directory} has no weights: neither {WEIGHTS_FILE} nor "
                f"{SHARDED_INDEX} (with its model_*.weights.h5 shards) is there. Save the "
                "backbone with backbone.save_to_preset(directory), or copy the weight files "
                "next to config.json."
            )
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{index} is not a Keras sharded-weights index ({error})."
            ) from None
        names: set[str] = set()
        for value in weight_map.values():
            names.update(value if isinstance(value, list) else [value])
        files = [directory / name for name in sorted(names)]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(
                f"{index} lists weight shards that are not in {directory}: {', '.join(absent)}."
            )
        return files

    def _scan(self, file: pathlib.Path) -> None:
        h5py = self.h5py

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                if name in self.datasets:
                    raise CheckpointError(f"{name} is stored twice ({file} and another shard).")
                bfloat16 = _text(obj.attrs.get("dtype")) == "bfloat16"
                dtype = _bfloat16() if bfloat16 else np.dtype(obj.dtype)
                self.datasets[name] = _Dataset(file, tuple(obj.shape), dtype, bfloat16)
            elif name.endswith("/vars") and "name" in obj.attrs:
                self.layer_names[name[: -len("/vars")]] = _text(obj.attrs["name"])

        try:
            with h5py.File(file, "r") as f:
                f.visititems(visit)
        except OSError as error:
            raise CheckpointError(
                f"{file} cannot be read as an HDF5 file ({error}): it is truncated or corrupt. "
                "Copy it again, or save the preset again with backbone.save_to_preset."
            ) from None

    # -------------------------------------------------------------------- lookups

    def group(self, path: str, layer: str) -> str:
        """``path``, after checking that it holds the Keras layer named ``layer`` (where the
        file records layer names)."""
        recorded = self.layer_names.get(path)
        if recorded is not None and recorded != layer:
            raise CheckpointError(
                f"In the preset's weights, {path} holds the layer {recorded!r} where {layer!r} "
                "was expected: this preset's weight layout is not the one gemmalens knows "
                "(KerasHub 0.32). Please report it."
            )
        return path

    def var(self, group: str, index: int = 0) -> str | None:
        """The dataset ``group/vars/index`` (``vars/index`` for the model's own variables),
        marked as used; None, and noted as missing, when the file lacks it."""
        key = f"{group}/vars/{index}" if group else f"vars/{index}"
        if key not in self.datasets:
            self.missing.append(key)
            return None
        self.used.add(key)
        return key

    def tolerate(self, group: str) -> None:
        """Marks every variable under ``group`` as known though unread."""
        self.used.update(k for k in self.datasets if k.startswith(group + "/"))

    def read(self, key: str, rows: slice | None = None) -> np.ndarray:
        """One dataset (or some of its rows) as a NumPy array in its stored dtype."""
        info = self.datasets[key]
        try:
            with self.h5py.File(info.file, "r") as f:
                value = np.asarray(f[key][()] if rows is None else f[key][rows])
        except (OSError, KeyError) as error:
            raise CheckpointError(
                f"{info.file} could not be read at {key} ({error}): the file is truncated or "
                "corrupt."
            ) from None
        return value.view(_bfloat16()) if info.bfloat16 else value


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return None if value is None else str(value)


def _bfloat16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a KerasHub variable becomes a Hugging Face tensor ([out, in] for matrices)."""

    what: str
    ndim: int
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    array: Callable[[np.ndarray], np.ndarray]


_VECTOR = _Layout("a vector", 1, lambda s: s, lambda a: a)
_TABLE = _Layout("an embedding table", 2, lambda s: s, lambda a: a)
# keras.layers.Dense and EinsumDense "btd,df->btf": [in, out].
_DENSE = _Layout("a dense kernel [in, out]", 2, lambda s: (s[1], s[0]), lambda a: a.T)
# EinsumDense "btd,ndh->btnh" (Gemma 3 / 4 query, key, value): [heads, d_model, head_dim].
_HEADS_FIRST = _Layout(
    "a [heads, d_model, head_dim] kernel",
    3,
    lambda s: (s[0] * s[2], s[1]),
    lambda a: a.transpose(0, 2, 1).reshape(a.shape[0] * a.shape[2], a.shape[1]),
)
# EinsumDense "btd,dnh->btnh" (T5Gemma 2 query, key, value): [d_model, heads, head_dim].
_MODEL_FIRST = _Layout(
    "a [d_model, heads, head_dim] kernel",
    3,
    lambda s: (s[1] * s[2], s[0]),
    lambda a: a.reshape(a.shape[0], a.shape[1] * a.shape[2]).T,
)
# EinsumDense "btnh,nhd->btd" (attention output): [heads, head_dim, d_model].
_HEADS_OUT = _Layout(
    "a [heads, head_dim, d_model] kernel",
    3,
    lambda s: (s[2], s[0] * s[1]),
    lambda a: a.reshape(a.shape[0] * a.shape[1], a.shape[2]).T,
)
_SCALAR = _Layout("a scalar", 0, lambda s: (1,), lambda a: np.reshape(a, (1,)))
# Gemma 4 expert bank: down_proj [experts, expert_dim, d_model] -> [experts, d_model, expert_dim].
_EXPERTS_DOWN = _Layout(
    "a [experts, expert_dim, d_model] kernel",
    3,
    lambda s: (s[0], s[2], s[1]),
    lambda a: a.transpose(0, 2, 1),
)


class _Mapping:
    """Hugging Face name -> `MappedTensor`, built from the preset's datasets."""

    def __init__(self, weights: _Weights):
        self.weights = weights
        self.tensors: dict[str, MappedTensor] = {}

    def _shape(self, key: str, layout: _Layout) -> tuple[int, ...]:
        shape = self.weights.datasets[key].shape
        if len(shape) != layout.ndim:
            raise CheckpointError(
                f"The preset's {key} has shape {shape}, which is not {layout.what}: the "
                "weights do not belong to this config.json, or the layout is not KerasHub "
                "0.32's."
            )
        return tuple(int(n) for n in layout.shape(shape))

    def add(self, hf_name: str, layout: _Layout, group: str, index: int = 0) -> None:
        key = self.weights.var(group, index)
        if key is None:
            return
        weights = self.weights
        self.tensors[hf_name] = MappedTensor(
            shape=self._shape(key, layout),
            dtype=weights.datasets[key].dtype,
            read=lambda: layout.array(weights.read(key)),
            source=f"{key} in {weights.datasets[key].file.name}",
        )

    def add_custom(self, hf_name: str, tensor: MappedTensor) -> None:
        self.tensors[hf_name] = tensor


# ------------------------------------------------------------------------------ configs


class _Config:
    """A backbone's ``config`` entry with the constructor defaults and precise errors."""

    def __init__(self, path: pathlib.Path, class_name: str, config: dict[str, Any]):
        self.path = path
        self.class_name = class_name
        self.config = config

    def __call__(self, key: str, *default: Any) -> Any:
        if key in self.config and self.config[key] is not None:
            return self.config[key]
        if key in self.config or default:
            return default[0] if default else None
        raise CheckpointError(
            f"{self.path}/config.json ({self.class_name}) has no {key!r}, which KerasHub's "
            f"{self.class_name} requires."
        )

    def refuse(self, behaviour: str) -> CheckpointError:
        return CheckpointError(
            f"The KerasHub preset {self.path} ({self.class_name}) {behaviour}. gemmalens cannot "
            "compute that behaviour, so it does not load the preset as a different model."
        )

    def tower_groups(self, *keys: str) -> list[str]:
        """Top-level weight groups of the towers named in the config (text part only)."""
        groups = []
        for key in keys:
            tower = self.config.get(key)
            if isinstance(tower, dict) and "class_name" in tower:
                groups.append("layers/" + _snake_case(tower["class_name"]))
        return groups


def _rope(theta: float, factor: float = 1.0, partial: float = 1.0) -> dict[str, Any]:
    """A ``rope_parameters`` entry: positions divided by ``factor``; ``partial`` < 1 rotates
    that fraction of the pairs with frequencies over the full head dim (``proportional``)."""
    if partial != 1.0:
        return {
            "rope_type": "proportional",
            "rope_theta": float(theta),
            "factor": float(factor),
            "partial_rotary_factor": float(partial),
        }
    if factor != 1.0:
        return {"rope_type": "linear", "rope_theta": float(theta), "factor": float(factor)}
    return {"rope_type": "default", "rope_theta": float(theta)}


_TOKENS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}


def _check_activation(c: _Config, key: str) -> None:
    activation = c(key, _GELU_TANH)
    if activation != _GELU_TANH:
        raise c.refuse(
            f"uses {key}={activation!r}; gemmalens implements {_GELU_TANH!r} (tanh GELU) only"
        )


def _check_no_bias(c: _Config) -> None:
    if c("attention_bias", False):
        raise c.refuse("has attention biases (attention_bias=True)")


def _check_no_attention_soft_cap(c: _Config, key: str) -> None:
    cap = c(key, None)
    if cap is not None:
        raise c.refuse(
            f"soft-caps attention logits ({key}={cap}), which gemmalens' model of this family "
            "(as transformers') does not"
        )


def _kv_sources(types: list[str], shared: int) -> list[int | None]:
    """KerasHub's KV sharing: each of the last ``shared`` layers reads the keys and values
    of the last unshared layer of its type (none found: it computes its own)."""
    first = len(types) - shared
    sources: list[int | None] = [None] * len(types)
    for j in range(first, len(types)):
        producers = [k for k in range(first) if types[k] == types[j]]
        sources[j] = producers[-1] if producers else None
    return sources


def _einsum_attention(m: _Mapping, attn: str, hf: str, *, keys: bool, values: bool) -> None:
    """Gemma 3 / 4 attention (EinsumDense kernels, [heads, d_model, head_dim])."""
    m.add(hf + "q_proj.weight", _HEADS_FIRST, attn + "/query_dense")
    m.add(hf + "q_norm.weight", _VECTOR, attn + "/query_norm")
    if keys:
        m.add(hf + "k_proj.weight", _HEADS_FIRST, attn + "/key_dense")
        m.add(hf + "k_norm.weight", _VECTOR, attn + "/key_norm")
    if values:
        m.add(hf + "v_proj.weight", _HEADS_FIRST, attn + "/value_dense")
    m.add(hf + "o_proj.weight", _HEADS_OUT, attn + "/output_dense")


def _einsum_mlp(m: _Mapping, block: str, hf: str) -> None:
    """``gelu(x @ ffw_gating) * (x @ ffw_gating_2) @ ffw_linear`` = gate, up, down."""
    m.add(hf + "gate_proj.weight", _DENSE, block + "/gating_ffw")
    m.add(hf + "up_proj.weight", _DENSE, block + "/gating_ffw_2")
    m.add(hf + "down_proj.weight", _DENSE, block + "/ffw_linear")


def _dense_mlp(m: _Mapping, mlp: str, hf: str) -> None:
    for name in ("gate_proj", "up_proj", "down_proj"):
        m.add(hf + name + ".weight", _DENSE, f"{mlp}/{name}")


# ------------------------------------------------------------------------------ Gemma 3


def _gemma3(c: _Config, w: _Weights, m: _Mapping) -> dict[str, Any]:
    layers = c("num_layers")
    head_dim = c("head_dim")
    if not c("use_query_key_norm", True):
        raise c.refuse("has no query/key norms (use_query_key_norm=False)")
    if not (c("use_post_attention_norm", False) and c("use_post_ffw_norm", False)):
        raise c.refuse(
            "has no post-attention or post-feedforward norm (use_post_attention_norm or "
            "use_post_ffw_norm False), which every Gemma 3 has"
        )
    _check_no_attention_soft_cap(c, "attention_logit_soft_cap")
    eps = c("layer_norm_epsilon", 1e-6)
    if eps != 1e-6:
        raise c.refuse(
            f"has layer_norm_epsilon={eps}: KerasHub applies it to the final norm only (its "
            "decoder blocks keep 1e-6), while gemmalens has one epsilon for all norms"
        )
    windowed = c("use_sliding_window_attention", False)
    types = [SLIDING if windowed and i % 6 < 5 else FULL for i in range(layers)]
    window = c("sliding_window_size", 1024)
    bidirectional = bool(c("use_bidirectional_attention", False))
    if bidirectional and SLIDING in types and window % 2 == 0:
        raise c.refuse(
            f"is bidirectional with an even sliding window ({window}): KerasHub's window then "
            f"reaches {(window - 1) // 2} tokens back and {window // 2} ahead, gemmalens' "
            f"{window // 2} both ways"
        )
    hf = dict(
        model_type="gemma3_text",
        vocab_size=c("vocabulary_size"),
        hidden_size=c("hidden_dim"),
        intermediate_size=c("intermediate_dim"),
        num_hidden_layers=layers,
        num_attention_heads=c("num_query_heads"),
        num_key_value_heads=c("num_key_value_heads"),
        head_dim=head_dim,
        # KerasHub's Gemma3DecoderBlock always scales queries by 1/sqrt(head_dim).
        query_pre_attn_scalar=head_dim,
        sliding_window=window,
        layer_types=types,
        rope_parameters={
            SLIDING: _rope(10_000.0, c("local_rope_scaling_factor", 1.0)),
            FULL: _rope(1_000_000.0, c("global_rope_scaling_factor", 1.0)),
        },
        rms_norm_eps=eps,
        final_logit_softcapping=c("final_logit_soft_cap", None),
        attn_logit_softcapping=None,
        use_bidirectional_attention=bidirectional,
        hidden_activation=_HF_ACTIVATION,
        max_position_embeddings=131_072,
        tie_word_embeddings=True,
        **_TOKENS,
    )
    m.add(
        "model.embed_tokens.weight",
        _TABLE,
        w.group("layers/reversible_embedding", "token_embedding"),
    )
    for i in range(layers):
        block = w.group("layers/" + _nth("gemma3_decoder_block", i), f"decoder_block_{i}")
        hf_block = f"model.layers.{i}."
        _einsum_attention(m, block + "/attention", hf_block + "self_attn.", keys=True, values=True)
        m.add(hf_block + "input_layernorm.weight", _VECTOR, block + "/pre_attention_norm")
        m.add(hf_block + "post_attention_layernorm.weight", _VECTOR, block + "/post_attention_norm")
        m.add(hf_block + "pre_feedforward_layernorm.weight", _VECTOR, block + "/pre_ffw_norm")
        m.add(hf_block + "post_feedforward_layernorm.weight", _VECTOR, block + "/post_ffw_norm")
        _einsum_mlp(m, block, hf_block + "mlp.")
    m.add(
        "model.norm.weight",
        _VECTOR,
        w.group("layers/rms_normalization", "final_normalization"),
    )
    if c("is_embedding_model", False):
        for n in range(2):  # the pooling head: pooling_dense_1, embedding_projection
            w.tolerate("layers/" + _nth("dense", n))
    for tower in c.tower_groups("vision_encoder"):
        w.tolerate(tower)
    return hf


# ------------------------------------------------------------------------------ Gemma 3n


def _per_layer(value: Any, layers: int) -> list[Any]:
    return [value] * layers if isinstance(value, (int, float)) else list(value)


def _gemma3n_text_group(c: _Config, w: _Weights) -> str:
    """The Gemma3nTextModel's group: stored where Keras first met it (inside the embedding
    processor in KerasHub 0.32), so found by what it holds."""
    suffix = "/embed_tokens/embedding/vars/0"
    found = sorted(
        key[: -len(suffix)]
        for key in w.datasets
        if key.endswith(suffix)
        and any(k.startswith(key[: -len(suffix)] + "/transformer_layers/") for k in w.datasets)
    )
    if len(found) != 1:
        raise CheckpointError(
            f"The weights of the KerasHub preset {c.path} hold "
            + ("no" if not found else f"{len(found)}")
            + " Gemma 3n text model"
            + (f" ({', '.join(found)})" if found else "")
            + ": the file is incomplete, or its layout is not KerasHub 0.32's."
        )
    return found[0]


def _gemma3n(c: _Config, w: _Weights, m: _Mapping) -> dict[str, Any]:
    layers = c("num_hidden_layers")
    _check_activation(c, "hidden_activation")
    _check_no_bias(c)
    types = list(c("layer_types"))
    scaling = c("rope_scaling", None)
    if scaling is None:
        scaling = 1.0
    if not isinstance(scaling, (int, float)):
        raise c.refuse(f"has rope_scaling={scaling!r}; KerasHub's Gemma 3n takes one number")
    shared = c("num_kv_shared_layers", 0)
    if layers - shared <= 0:
        shared = 0  # KerasHub shares nothing when every layer would be shared
    streams = c("altup_num_inputs")
    correct_scale = bool(c("altup_correct_scale", True))
    sparsity = c("activation_sparsity_pattern", None)
    hf = dict(
        model_type="gemma3n_text",
        vocab_size=c("text_vocab_size"),
        hidden_size=c("text_hidden_size"),
        intermediate_size=_per_layer(c("intermediate_size"), layers),
        num_hidden_layers=layers,
        num_attention_heads=c("num_attention_heads"),
        num_key_value_heads=c("num_key_value_heads"),
        head_dim=c("head_dim"),
        sliding_window=c("sliding_window"),
        layer_types=types,
        activation_sparsity_pattern=[0.0] * layers if sparsity is None else list(sparsity),
        num_kv_shared_layers=shared,
        vocab_size_per_layer_input=c("vocab_size_per_layer_input"),
        hidden_size_per_layer_input=c("hidden_size_per_layer_input"),
        altup_num_inputs=streams,
        altup_active_idx=c("altup_active_idx", 0),
        altup_correct_scale=correct_scale,
        altup_coef_clip=c("altup_coef_clip", None),
        laurel_rank=c("laurel_rank"),
        rope_parameters={
            SLIDING: _rope(c("rope_local_base_freq", 10_000.0), scaling),
            FULL: _rope(c("rope_theta"), scaling),
        },
        rms_norm_eps=c("rms_norm_eps", 1e-6),
        final_logit_softcapping=c("final_logit_soft_cap", None),
        max_position_embeddings=c("max_position_embeddings"),
        hidden_activation=_HF_ACTIVATION,
        tie_word_embeddings=True,
        **{**_TOKENS, "pad_token_id": c("pad_token_id", 0)},
    )
    text = _gemma3n_text_group(c, w)
    m.add("model.embed_tokens.weight", _TABLE, text + "/embed_tokens/embedding")
    m.add("model.embed_tokens_per_layer.weight", _TABLE, text + "/embed_tokens_per_layer/embedding")
    m.add("model.per_layer_model_projection.weight", _DENSE, text + "/per_layer_model_projection")
    m.add("model.per_layer_projection_norm.weight", _VECTOR, text + "/per_layer_projection_norm")
    for j in range(streams - 1):
        dense = _nth("dense", j)
        m.add(f"model.altup_projections.{j}.weight", _DENSE, f"{text}/altup_projections/{dense}")
        m.add(
            f"model.altup_unembed_projections.{j}.weight",
            _DENSE,
            f"{text}/altup_unembed_projections/{dense}",
        )
    sources = _kv_sources(types, shared)
    for i in range(layers):
        block = w.group(
            f"{text}/transformer_layers/" + _nth("gemma3n_text_decoder_block", i),
            f"decoder_block_{i}",
        )
        hf_block = f"model.layers.{i}."
        attn, hf_attn = block + "/attention", hf_block + "self_attn."
        for name in ("q_proj", "o_proj"):
            m.add(hf_attn + name + ".weight", _DENSE, f"{attn}/{name}")
        m.add(hf_attn + "q_norm.weight", _VECTOR, attn + "/q_norm")
        if sources[i] is None:
            for name in ("k_proj", "v_proj"):
                m.add(hf_attn + name + ".weight", _DENSE, f"{attn}/{name}")
            m.add(hf_attn + "k_norm.weight", _VECTOR, attn + "/k_norm")
        else:  # KerasHub builds them but never uses them on KV-sharing layers.
            for name in ("k_proj", "v_proj", "k_norm"):
                w.tolerate(f"{attn}/{name}")
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "post_per_layer_input_norm",
        ):
            m.add(hf_block + norm + ".weight", _VECTOR, f"{block}/{norm}")
        for name in ("linear_left", "linear_right"):
            m.add(hf_block + f"laurel.{name}.weight", _DENSE, f"{block}/laurel/{name}")
        m.add(
            hf_block + "laurel.post_laurel_norm.weight", _VECTOR, block + "/laurel/post_laurel_norm"
        )
        _dense_mlp(m, block + "/mlp", hf_block + "mlp.")
        altup = block + "/altup"
        m.add(hf_block + "altup.router_norm.weight", _VECTOR, altup + "/router_norm")
        for name in ("modality_router", "prediction_coefs", "correction_coefs"):
            m.add(hf_block + f"altup.{name}.weight", _DENSE, f"{altup}/{name}")
        if correct_scale:
            m.add(hf_block + "altup.correct_output_scale", _VECTOR, altup)
        m.add(hf_block + "per_layer_input_gate.weight", _DENSE, block + "/per_layer_input_gate")
        m.add(hf_block + "per_layer_projection.weight", _DENSE, block + "/per_layer_projection")
    m.add("model.norm.weight", _VECTOR, text + "/final_normalization")
    if c("vision_encoder_config", None) or c("audio_encoder_config", None):
        # The towers and their embedders, wherever Keras stored them.
        w.used.update(k for k in w.datasets if not k.startswith(text + "/"))
    return hf


# ------------------------------------------------------------------------------ Gemma 4


def _gemma4(c: _Config, w: _Weights, m: _Mapping) -> dict[str, Any]:
    layers = c("num_layers")
    head_dim = c("head_dim")
    global_head_dim = c("global_head_dim", None) or head_dim
    _check_no_attention_soft_cap(c, "attention_logit_soft_cap")
    types = c("layer_types", None)
    if types is None:
        pattern = c("sliding_window_pattern", 6)
        types = [FULL if i % pattern == pattern - 1 else SLIDING for i in range(layers)]
    types = list(types)
    if len(types) != layers:
        raise c.refuse(f"lists {len(types)} layer_types for {layers} layers")
    if types[-1] != FULL:
        raise c.refuse(
            "has a sliding-window last layer; transformers' and gemmalens' Gemma 4 always make "
            "the last layer global"
        )
    if SLIDING in types and not c("use_sliding_window_attention", True):
        raise c.refuse(
            "has local layers without a sliding window (use_sliding_window_attention=False)"
        )
    bidirectional = c("use_bidirectional_attention", False)
    if bidirectional and SLIDING in types:
        raise c.refuse(
            "is bidirectional with sliding-window layers, which KerasHub then lets attend "
            "everywhere (gemmalens keeps their window)"
        )
    global_kv_heads = c("num_global_key_value_heads", None)
    partial = float(c("global_rope_partial_rotary_factor", 1.0))
    raw = int(partial * global_head_dim)
    if partial != 1.0 and max(2, raw - raw % 2) // 2 != int(partial * global_head_dim // 2):
        raise c.refuse(
            f"rotates {max(2, raw - raw % 2) // 2} RoPE pairs on global layers "
            f"(global_rope_partial_rotary_factor={partial}), not "
            f"{int(partial * global_head_dim // 2)} as transformers' proportional RoPE does"
        )
    shared = c("num_kv_shared_layers", 0)
    if shared and shared >= layers:
        raise c.refuse(f"shares keys and values on all {layers} layers (num_kv_shared_layers)")
    per_layer = c("hidden_size_per_layer_input", 0)
    moe = bool(c("enable_moe_block", False))
    hf = dict(
        model_type="gemma4_text",
        vocab_size=c("vocabulary_size"),
        hidden_size=c("hidden_dim"),
        intermediate_size=c("intermediate_dim"),
        num_hidden_layers=layers,
        num_attention_heads=c("num_query_heads"),
        num_key_value_heads=c("num_key_value_heads"),
        head_dim=head_dim,
        global_head_dim=global_head_dim,
        # KerasHub turns K=V on for global layers exactly when this is set.
        num_global_key_value_heads=global_kv_heads,
        attention_k_eq_v=global_kv_heads is not None,
        sliding_window=c("sliding_window_size", 512),
        layer_types=types,
        num_kv_shared_layers=shared,
        use_double_wide_mlp=bool(c("use_double_wide_mlp", False)),
        hidden_size_per_layer_input=per_layer,
        vocab_size_per_layer_input=c("vocab_size_per_layer_input", None) or c("vocabulary_size"),
        enable_moe_block=moe,
        num_experts=c("num_experts", None),
        top_k_experts=c("num_experts_per_token", 8) if moe else None,
        moe_intermediate_size=c("expert_intermediate_dim", None),
        rope_parameters={
            SLIDING: _rope(
                c("local_rope_wavelength", None) or 10_000.0, c("local_rope_scaling_factor", 1.0)
            ),
            FULL: _rope(
                c("global_rope_wavelength", None) or 1_000_000.0,
                c("global_rope_scaling_factor", 1.0),
                partial,
            ),
        },
        rms_norm_eps=c("layer_norm_epsilon", 1e-6),
        final_logit_softcapping=c("final_logit_soft_cap", None),
        use_bidirectional_attention=(
            "all"
            if bidirectional
            else "vision"
            if c("use_vision_bidirectional_attention", False)
            else None
        ),
        hidden_activation=_HF_ACTIVATION,
        max_position_embeddings=131_072,
        tie_word_embeddings=True,
        **_TOKENS,
    )
    m.add(
        "model.embed_tokens.weight",
        _TABLE,
        w.group("layers/reversible_embedding", "token_embedding"),
    )
    if per_layer:
        m.add(
            "model.embed_tokens_per_layer.weight",
            _TABLE,
            w.group("layers/embedding", "per_layer_token_embedding"),
        )
        m.add(
            "model.per_layer_model_projection.weight",
            _DENSE,
            w.group("layers/dense", "per_layer_model_projection"),
        )
        m.add(
            "model.per_layer_projection_norm.weight",
            _VECTOR,
            w.group("layers/rms_normalization", "per_layer_projection_norm"),
        )
    sources = _kv_sources(types, shared)
    for i in range(layers):
        block = w.group("layers/" + _nth("gemma4_text_decoder_block", i), f"decoder_block_{i}")
        hf_block = f"model.layers.{i}."
        unshared = sources[i] is None
        k_eq_v = types[i] == FULL and global_kv_heads is not None
        _einsum_attention(
            m,
            block + "/attention",
            hf_block + "self_attn.",
            keys=unshared,
            values=unshared and not k_eq_v,
        )
        m.add(hf_block + "input_layernorm.weight", _VECTOR, block + "/pre_attention_norm")
        m.add(hf_block + "post_attention_layernorm.weight", _VECTOR, block + "/post_attention_norm")
        m.add(hf_block + "pre_feedforward_layernorm.weight", _VECTOR, block + "/pre_ffw_norm")
        m.add(hf_block + "post_feedforward_layernorm.weight", _VECTOR, block + "/post_ffw_norm")
        _einsum_mlp(m, block, hf_block + "mlp.")
        if moe:
            _gemma4_experts(m, w, block, hf_block)
        if per_layer:
            m.add(hf_block + "per_layer_input_gate.weight", _DENSE, block + "/per_layer_input_gate")
            m.add(hf_block + "per_layer_projection.weight", _DENSE, block + "/per_layer_up_proj")
            m.add(
                hf_block + "post_per_layer_input_norm.weight",
                _VECTOR,
                block + "/post_per_layer_input_norm",
            )
        m.add(hf_block + "layer_scalar", _SCALAR, block)
    m.add(
        "model.norm.weight",
        _VECTOR,
        w.group(
            "layers/" + _nth("rms_normalization", 1 if per_layer else 0), "final_normalization"
        ),
    )
    if c("is_embedding_model", False):
        for n in range(2):  # the pooling head, after the per-layer projection's Dense
            w.tolerate("layers/" + _nth("dense", n + (1 if per_layer else 0)))
    for tower in c.tower_groups("vision_encoder", "audio_encoder"):
        w.tolerate(tower)
    return hf


def _gemma4_experts(m: _Mapping, w: _Weights, block: str, hf_block: str) -> None:
    """The MoE branch. KerasHub's expert bank holds gate [E, d, f], up [E, d, f], down
    [E, f, d] and the per-expert scale (applied to each expert's output, which equals
    transformers' scaling of the routing weights)."""
    m.add(hf_block + "post_feedforward_layernorm_1.weight", _VECTOR, block + "/post_ffw_norm_dense")
    m.add(hf_block + "pre_feedforward_layernorm_2.weight", _VECTOR, block + "/pre_ffw_norm_moe")
    m.add(
        hf_block + "post_feedforward_layernorm_2.weight", _VECTOR, block + "/post_ffw_norm_moe_path"
    )
    m.add(hf_block + "router.proj.weight", _DENSE, block + "/moe_router/proj")
    m.add(hf_block + "router.scale", _VECTOR, block + "/moe_router")
    bank = block + "/moe_expert_bank"
    gate, up = w.var(bank, 0), w.var(bank, 1)
    if gate is not None and up is not None:
        shapes = [w.datasets[k].shape for k in (gate, up)]
        if any(len(s) != 3 for s in shapes) or shapes[0] != shapes[1]:
            raise CheckpointError(
                f"The preset's expert kernels {gate} and {up} have shapes {shapes[0]} and "
                f"{shapes[1]}, not two [experts, d_model, expert_dim] kernels."
            )
        experts, width, hidden = shapes[0]

        def gate_up() -> np.ndarray:
            pair = [w.read(gate).transpose(0, 2, 1), w.read(up).transpose(0, 2, 1)]
            return np.concatenate(pair, axis=1)

        m.add_custom(
            hf_block + "experts.gate_up_proj",
            MappedTensor(
                (experts, 2 * hidden, width), w.datasets[gate].dtype, gate_up, f"{gate}, {up}"
            ),
        )
    m.add(hf_block + "experts.down_proj", _EXPERTS_DOWN, bank, 2)
    m.add(hf_block + "router.per_expert_scale", _VECTOR, bank, 3)


# ------------------------------------------------------------------------------ T5Gemma 2


def _t5gemma2(c: _Config, w: _Weights, m: _Mapping) -> dict[str, Any]:
    _check_activation(c, "hidden_activation")
    _check_no_bias(c)
    _check_no_attention_soft_cap(c, "attn_logit_softcapping")
    if not c("use_query_key_norm", True):
        raise c.refuse("has no query/key norms (use_query_key_norm=False)")
    if not c("tie_word_embeddings", True):
        raise c.refuse("has an output projection apart from the decoder embedding")
    width = c("encoder_hidden_dim")
    if (
        c("decoder_hidden_dim") != width
        or (c("cross_attention_hidden_size", None) or width) != width
    ):
        raise c.refuse(
            "has encoder and decoder stacks of different widths; gemmalens' T5Gemma 2 shares "
            "one embedding between them"
        )
    window = c("sliding_window", None)
    global_factor = c("global_rope_scaling_factor", 1.0)
    local_theta = c("rope_max_wavelength", 10_000.0)
    vision = bool(c.tower_groups("vision_encoder"))

    def stack(name: str, theta: float, factor: float, final_cap: float | None) -> dict[str, Any]:
        types = list(c(f"{name}_layer_types"))
        if SLIDING in types and window is None:
            raise c.refuse(f"has sliding {name} layers but no sliding_window")
        return dict(
            model_type="t5gemma2_text" if name == "encoder" else "t5gemma2_decoder",
            vocab_size=c("vocabulary_size"),
            hidden_size=c(f"{name}_hidden_dim"),
            intermediate_size=c(f"{name}_intermediate_dim"),
            num_hidden_layers=c(f"{name}_num_layers"),
            num_attention_heads=c(f"{name}_num_attention_heads"),
            num_key_value_heads=c(f"{name}_num_key_value_heads"),
            head_dim=c(f"{name}_head_dim"),
            query_pre_attn_scalar=c("query_pre_attn_scalar", 1.0),
            sliding_window=window or 4096,
            layer_types=types,
            rope_parameters={SLIDING: _rope(theta), FULL: _rope(1_000_000.0, factor)},
            rms_norm_eps=c("rms_norm_eps", 1e-6),
            final_logit_softcapping=final_cap,
            attn_logit_softcapping=None,
            hidden_activation=_HF_ACTIVATION,
            tie_word_embeddings=True,
            **_TOKENS,
        )

    # Without a vision encoder KerasHub embeds the end-of-image token like any other.
    eoi = c("eoi_token_index", 256_000) if vision else -1
    hf = dict(
        model_type="t5gemma2",
        encoder=dict(
            text_config=stack(
                "encoder",
                c("encoder_rope_max_wavelength", None) or local_theta,
                c("encoder_global_rope_scaling_factor", None) or global_factor,
                None,
            ),
            eoi_token_index=eoi,
        ),
        decoder=stack("decoder", local_theta, global_factor, c("final_logit_softcapping", None)),
        eoi_token_index=eoi,
        tie_word_embeddings=True,
    )
    encoder_table = w.var(w.group("layers/embedding", "encoder_token_embedding"))
    decoder_table = w.var(w.group("layers/reversible_embedding", "decoder_token_embedding"))
    if encoder_table and decoder_table:
        _add_tied_table(c, w, m, encoder_table, decoder_table)
    if vision:
        encoder_eoi, decoder_eoi = w.var("", 0), w.var("", 1)
        if encoder_eoi and decoder_eoi:
            _add_tied_eoi(c, w, m, encoder_eoi, decoder_eoi)
    else:
        m.add_custom(
            "model.encoder.embed_tokens.eoi_embedding",
            MappedTensor((width,), np.dtype(np.float32), lambda: np.zeros(width, np.float32)),
        )
    for name, attn_name in (("encoder", "self_attn"), ("decoder", "merged_attn")):
        for i in range(c(f"{name}_num_layers")):
            layer = w.group("layers/" + _nth(f"t5_gemma2_{name}_layer", i), f"{name}_layer_{i}")
            hf_layer = f"model.{name}.layers.{i}."
            attn, hf_attn = f"{layer}/{attn_name}", hf_layer + "self_attn."
            for proj, part in (("q", "query"), ("k", "key"), ("v", "value")):
                m.add(hf_attn + f"{proj}_proj.weight", _MODEL_FIRST, f"{attn}/{part}_dense")
            m.add(hf_attn + "o_proj.weight", _HEADS_OUT, attn + "/output_dense")
            m.add(hf_attn + "q_norm.weight", _VECTOR, attn + "/query_norm")
            m.add(hf_attn + "k_norm.weight", _VECTOR, attn + "/key_norm")
            for norm in (
                "pre_self_attn_layernorm",
                "post_self_attn_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ):
                m.add(hf_layer + norm + ".weight", _VECTOR, f"{layer}/{norm}")
            _dense_mlp(m, layer + "/mlp", hf_layer + "mlp.")
    # The encoder's final norm is made (and stored) before the decoder's.
    m.add("model.encoder.norm.weight", _VECTOR, "layers/rms_normalization")
    m.add("model.decoder.norm.weight", _VECTOR, "layers/rms_normalization_1")
    for tower in c.tower_groups("vision_encoder"):
        w.tolerate(tower)
    return hf


def _add_tied_table(
    c: _Config, w: _Weights, m: _Mapping, encoder_table: str, decoder_table: str
) -> None:
    """gemmalens' one embedding table: KerasHub's encoder table, read after checking (a
    block of rows at a time) that the decoder's is the same."""
    shape = w.datasets[encoder_table].shape
    if w.datasets[decoder_table].shape != shape or len(shape) != 2:
        raise c.refuse(
            f"has encoder and decoder embedding tables of shapes {shape} and "
            f"{w.datasets[decoder_table].shape}"
        )

    def read() -> np.ndarray:
        table = w.read(encoder_table)
        step = max(1, 2**22 // max(1, shape[1]))
        for start in range(0, shape[0], step):
            rows = slice(start, start + step)
            if not np.array_equal(table[rows], w.read(decoder_table, rows)):
                raise c.refuse(
                    f"has different encoder and decoder embedding tables (first difference in "
                    f"rows {start}..{min(start + step, shape[0]) - 1}); gemmalens' T5Gemma 2 "
                    "has one table, as the released checkpoints tie them"
                )
        return table

    m.add_custom(
        "model.encoder.embed_tokens.weight",
        MappedTensor(shape, w.datasets[encoder_table].dtype, read, encoder_table),
    )


def _add_tied_eoi(c: _Config, w: _Weights, m: _Mapping, encoder_eoi: str, decoder_eoi: str) -> None:
    """The end-of-image row: KerasHub keeps one per stack, gemmalens one for both."""

    def read() -> np.ndarray:
        row = w.read(encoder_eoi)
        if not np.array_equal(row, w.read(decoder_eoi)):
            raise c.refuse(
                "has different encoder and decoder end-of-image embeddings; gemmalens' "
                "T5Gemma 2 has one"
            )
        return row

    m.add_custom(
        "model.encoder.embed_tokens.eoi_embedding",
        MappedTensor(
            w.datasets[encoder_eoi].shape, w.datasets[encoder_eoi].dtype, read, encoder_eoi
        ),
    )


# ------------------------------------------------------------------------------ reading

_FAMILIES: dict[str, Callable[[_Config, _Weights, _Mapping], dict[str, Any]]] = {
    "Gemma3Backbone": _gemma3,
    "Gemma3nBackbone": _gemma3n,
    "Gemma4Backbone": _gemma4,
    "T5Gemma2Backbone": _t5gemma2,
}
SUPPORTED = tuple(_FAMILIES)


def _read_config(path: pathlib.Path, preset: str | None) -> _Config:
    if preset is not None:
        raise CheckpointError(
            f"{path} is a KerasHub preset: its config.json says what it is, so leave "
            f"preset={preset!r} out."
        )
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}/config.json cannot be read as JSON ({error}).") from None
    class_name = saved.get("class_name") if isinstance(saved, dict) else None
    if class_name not in _FAMILIES:
        raise CheckpointError(
            f"{path}/config.json is a KerasHub {class_name!r}; gemmalens reads the KerasHub "
            f"backbones {', '.join(SUPPORTED)} (text parts)."
        )
    config = saved.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}/config.json has no 'config' entry for its {class_name}.")
    c = _Config(path, class_name, config)
    _check_task(c)
    dtype = json.dumps(config.get("dtype")).lower()
    if any(word in dtype for word in ("quantiz", "int8", "int4", "float8", "gptq", "awq")):
        raise c.refuse(f"has quantized weights (dtype {config.get('dtype')})")
    return c


def _check_task(c: _Config) -> None:
    """A task saved beside the backbone (``task.json``) may add its own logit soft-cap
    (``Gemma4CausalLM(final_logit_cap=...)``) on top of the backbone's: refused, as
    gemmalens applies one."""
    task = c.path / "task.json"
    if not task.is_file():
        return
    try:
        cap = json.loads(task.read_text()).get("config", {}).get("final_logit_cap")
    except (OSError, ValueError, AttributeError):
        return
    if cap is not None:
        raise c.refuse(
            f"was saved with a task ({task.name}) that soft-caps the logits a second time "
            f"(final_logit_cap={cap})"
        )


def _validate(c: _Config, hf: dict[str, Any]) -> None:
    """Builds the gemmalens config now, so that a preset it cannot describe fails here with
    its name; checks that KV sharing is the same as KerasHub's."""
    from gemmalens.families.gemma3 import Gemma3Config
    from gemmalens.families.gemma3n import Gemma3nConfig
    from gemmalens.families.gemma4 import Gemma4Config
    from gemmalens.families.t5gemma2 import T5Gemma2Config

    family = {
        "gemma3_text": Gemma3Config,
        "gemma3n_text": Gemma3nConfig,
        "gemma4_text": Gemma4Config,
        "t5gemma2": T5Gemma2Config,
    }[hf["model_type"]]
    try:
        config = family.from_hf(hf)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"The KerasHub preset {c.path} ({c.class_name}) does not describe a model "
            f"gemmalens can build: {error}"
        ) from None
    if hasattr(config, "kv_sources"):
        keras = tuple(_kv_sources(list(hf["layer_types"]), hf["num_kv_shared_layers"]))
        if tuple(config.kv_sources) != keras:
            raise c.refuse(
                f"shares keys and values from layers {keras}, not as gemmalens would "
                f"({tuple(config.kv_sources)})"
            )


def open_preset(path: pathlib.Path, preset: str | None = None) -> MappedCheckpoint:
    """A KerasHub preset directory as a Hugging Face checkpoint (see the module docstring).

    Args:
      path: the preset directory (``backbone.save_to_preset(path)``).
      preset: must be None: the preset's config.json says what it is.

    Returns:
      a `MappedCheckpoint` whose tensors are read from the HDF5 file only when asked for.

    Raises:
      CheckpointError: h5py missing; an unknown backbone; a behaviour gemmalens cannot
        compute; weights missing, unexpected, truncated or shaped unlike the config.
    """
    path = pathlib.Path(path)
    c = _read_config(path, preset)
    try:
        import h5py
    except ImportError:
        raise CheckpointError(
            "Reading KerasHub presets needs h5py, which is not installed: "
            'pip install h5py (or pip install "gemmalens[keras]").'
        ) from None
    weights = _Weights(path, h5py)
    mapping = _Mapping(weights)
    hf = _FAMILIES[c.class_name](c, weights, mapping)
    if weights.missing:
        shown = weights.missing[:10]
        raise CheckpointError(
            f"The weights of the KerasHub preset {path} lack {len(weights.missing)} variable(s) "
            f"its {c.class_name} config needs: {', '.join(shown)}"
            + (" ..." if len(weights.missing) > 10 else "")
            + ". The weight file is incomplete, or config.json does not belong to it."
        )
    unread = sorted(k for k in weights.datasets if k not in weights.used)
    if unread:
        raise CheckpointError(
            f"The weights of the KerasHub preset {path} hold {len(unread)} variable(s) its "
            f"{c.class_name} config does not account for: {', '.join(unread[:10])}"
            + (" ..." if len(unread) > 10 else "")
            + ". config.json does not belong to these weights, or the layout is not "
            "KerasHub 0.32's."
        )
    _validate(c, hf)
    tokenizer = path / TOKENIZER_ASSET
    return MappedCheckpoint(
        path,
        hf,
        mapping.tensors,
        FORMAT_NAME,
        tokenizer_path=tokenizer if tokenizer.is_file() else None,
    )


FORMAT = CheckpointFormat(
    FORMAT_NAME,
    "config.json (with class_name) and model.weights.h5 (or model.weights.json with its "
    "model_*.weights.h5 shards), as written by backbone.save_to_preset(dir)",
    is_preset,
    open_preset,
)
