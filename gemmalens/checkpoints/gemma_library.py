"""The gemma library's Orbax checkpoints (``from gemma import gm``) read as Hugging Face
checkpoints.

A gemma-library checkpoint holds the Flax parameters of a ``gm.nn`` model and nothing else:
no config, and (on Kaggle) the tokenizer beside it. `open_checkpoint` reads the parameter
tree's metadata, settles the architecture (`infer_config`, or the ``preset`` it is given),
checks every text parameter against it, and presents each one under its Hugging Face name
and layout as a `MappedCheckpoint`; the family loaders then build the model exactly as for
a Hugging Face directory. Each tensor is read from the Orbax (TensorStore) files only when
the builder asks for it, and only the part it needs (one layer of a stacked array, the key
half of ``kv_einsum``), so host memory never holds a second copy of the weights.

Layouts (``gm.ckpts.load_params`` reads all of them; so does this module):

- nested: the ``model.init()`` tree, as ``gm.ckpts.save_params`` writes it
  (``{"layer_0": {"attn": {"q_einsum": {"w": ...}}, "mlp": {"gating_einsum": ...}}}``);
- flat: the released Gemma 3 and Gemma 4 checkpoints
  (``{"transformer/layer_0/attn/q_einsum": {"w": ...}}``, ``.../mlp/gating_einsum: {"w"}``);
- stacked: the released Gemma 3n checkpoints, one array per position in the attention
  pattern with the layers on axis 0
  (``{"transformer/stacked_layers/attention_type_0/attn/q_einsum": {"w": [n, ...]}}``,
  layer ``n * pattern + type``);
- a Kauldron training checkpoint (``params`` beside ``opt_state``), or its ``default/``
  sub-directory.

Parameter names and layouts, from the library's module definitions
(``gemma/gm/nn/_modules.py``, ``gemma/gm/nn/gemma3n/_modules.py``,
``gemma/gm/nn/gemma4/_modules.py`` and ``_moe.py``): ``attn/q_einsum`` (heads, d_model,
head_dim), ``attn/kv_einsum`` (2, kv_heads, d_model, head_dim), ``attn/qkv_einsum`` (3, heads,
d_model, head_dim) when there are as many KV heads as heads (Gemma 3, 3n),
``attn/k_einsum`` on Gemma 4's K=V layers, ``attn/attn_vec_einsum`` (heads, head_dim,
d_model); ``mlp/gating_einsum`` (2, d_ff, d_model), ``mlp/linear`` (d_ff, d_model);
Gemma 3's QK-norms are ``_query_norm`` / ``_key_norm``. Norm scales need no conversion:
Gemma 3 adds 1 to the stored scale as transformers does; Gemma 3n and 4 multiply by it
directly, as transformers does. The released Gemma 3n files spell a few names as
transformers' ``convert_gemma3n_weights.py`` reads them (``laurel_block``,
``embedder/per_layer_embeddings``, per-layer-input parameters directly under the layer);
both spellings are accepted.

What the library hard-codes per model class (windows, RoPE, attention pattern, soft-caps,
activation sparsity, KV sharing; ``gemma/gm/nn/_gemma.py``,
``gemma/gm/nn/gemma3n/_gemma3n.py``, ``gemma/gm/nn/gemma4/_gemma4.py``) is what the
gemmalens preset of the same model holds, with two Gemma 3n differences that
`infer_config` follows: the library's Gemma 3n classes apply no final logit soft-cap
(transformers' config says 30) and their embedding has 262,144 rows (transformers pads it
to 262,400 with copies of the padding row). Passing ``preset="gemma3n_e4b"`` instead gives
the transformers model: soft-cap 30 and the padded vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from gemmalens.checkpoints.load import CheckpointFormat
from gemmalens.checkpoints.mapped import MappedCheckpoint, MappedTensor
from gemmalens.checkpoints.safetensors_files import CheckpointError

FORMAT_NAME = "gemma-library checkpoint"
_INSTALL = "pip install 'gemmalens[gemma]' (or: pip install orbax-checkpoint)"
_FAMILY_NAMES = {"gemma3": "Gemma 3", "gemma3n": "Gemma 3n", "gemma4": "Gemma 4"}
# Names under which the text decoder's parameters live (after the layout is undone);
# everything else (vision and audio towers, their embedder parts) is not read.
_TEXT = re.compile(
    r"^(layer_\d+/|final_norm/|altup_(unembed_)?projection_\d+/|embedder/(input_embedding$"
    r"|per_layer_))"
)
_STACKED = re.compile(r"^stacked_layers/attention_type_(\d+)/(.*)$")
# The released Gemma 3n spelling (transformers' convert_gemma3n_weights.py) and Gemma 3's
# underscored QK-norms -> the names this module uses.
_ALIASES = [
    (re.compile(r"^(layer_\d+)/laurel_block/"), r"\1/laurel/"),
    (
        re.compile(r"^(layer_\d+)/(?:laurel|laurel_block)/post_laurel_norm/"),
        r"\1/post_laurel_norm/",
    ),
    (re.compile(r"^(layer_\d+)/per_layer_mapping/"), r"\1/"),
    (re.compile(r"^(layer_\d+/attn)/_(query_norm|key_norm)/"), r"\1/\2/"),
    (re.compile(r"^embedder/per_layer_input_embedding$"), "embedder/per_layer_embeddings"),
    (re.compile(r"^embedder/per_layer_input_projection$"), "embedder/per_layer_model_projection"),
    # The AltUp projections are Einsum modules named after their one parameter.
    (re.compile(r"^(altup_(?:unembed_)?projection_\d+)$"), r"\1/\1"),
]


def is_checkpoint(path: pathlib.Path) -> bool:
    """An Orbax checkpoint directory (its ``_METADATA`` or ``_CHECKPOINT_METADATA`` file)."""
    return (path / "_METADATA").is_file() or (path / "_CHECKPOINT_METADATA").is_file()


# ------------------------------------------------------------------------- the tree


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One parameter array of the tree, under its canonical name.

    ``source`` is its name as the checkpoint spells it (for messages); ``read(index)``
    returns ``array[index]``, reading only that part where the storage allows."""

    source: str
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[tuple], np.ndarray] | None = None


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _flatten(value, (*prefix, str(key)))
    elif tree is not None:
        yield prefix, tree


def _canonical(path: str) -> str:
    for pattern, replacement in _ALIASES:
        path = pattern.sub(replacement, path)
    return path


def tree_leaves(
    tree: Mapping[str, Any],
    reader: Callable[[tuple[str, ...], Any], Callable[[tuple], np.ndarray]] | None = None,
) -> dict[str, _Leaf]:
    """The text parameters of a gemma-library parameter tree (any layout), by canonical name.

    ``tree`` holds arrays, ``jax.ShapeDtypeStruct`` or Orbax array metadata (anything with
    ``shape`` and ``dtype``). Canonical names are the nested layout's paths joined by ``/``
    without a trailing ``/w`` (``layer_3/attn/q_einsum``, ``layer_3/pre_ffw_norm/scale``,
    ``embedder/input_embedding``); stacked arrays become one leaf per layer."""
    if {"params", "opt_state", "step"} <= set(tree):  # a Kauldron training state
        tree = tree["params"]
    flat = {keys: leaf for keys, leaf in _flatten(tree) if hasattr(leaf, "shape")}
    joined = {"/".join(keys): (keys, leaf) for keys, leaf in flat.items()}
    pattern = 1 + max(
        (int(m.group(1)) for p in joined if (m := _STACKED.match(p.removeprefix("transformer/")))),
        default=-1,
    )
    leaves: dict[str, _Leaf] = {}

    def add(name: str, leaf: _Leaf) -> None:
        name = _canonical(name.removesuffix("/w"))
        if _TEXT.match(name):
            leaves[name] = leaf

    for path, (keys, meta) in joined.items():
        read = reader(keys, meta) if reader is not None else None
        shape = tuple(int(d) for d in meta.shape)
        dtype = np.dtype(meta.dtype)
        inner = path.removeprefix("transformer/")
        stacked = _STACKED.match(inner)
        if stacked is None:
            add(inner, _Leaf(path, shape, dtype, read))
            continue
        kind, rest = int(stacked.group(1)), stacked.group(2)
        for n in range(shape[0]):
            part = None if read is None else _sliced(read, n)
            add(f"layer_{n * pattern + kind}/{rest}", _Leaf(f"{path}[{n}]", shape[1:], dtype, part))
    return leaves


def _sliced(read: Callable[[tuple], np.ndarray], n: int) -> Callable[[tuple], np.ndarray]:
    return lambda index=(): read((n, *index))


class _OrbaxReader:
    """Reads single arrays (or parts of them) of an Orbax checkpoint through TensorStore."""

    def __init__(self, path: pathlib.Path, ocp: Any, ts: Any):
        self.path = path
        self._ocp = ocp
        self._ts = ts
        settings = {}
        if (path / "_METADATA").is_file():
            try:
                settings = json.loads((path / "_METADATA").read_text())
            except (OSError, ValueError):
                settings = {}
        self._use_ocdbt = bool(settings.get("use_ocdbt", (path / "manifest.ocdbt").exists()))
        self._use_zarr3 = bool(settings.get("use_zarr3", False))
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)
        self._stores: dict[str, Any] = {}

    def __call__(self, keys: tuple[str, ...], meta: Any) -> Callable[[tuple], np.ndarray]:
        name = getattr(meta, "name", None) or ".".join(keys)
        source = "/".join(keys)

        def read(index: tuple = ()) -> np.ndarray:
            try:
                store = self._stores.get(name)
                if store is None:
                    info = self._ocp.type_handlers.ParamInfo(
                        name=name,
                        parent_dir=self._ocp_path(),
                        use_zarr3=self._use_zarr3,
                        ts_context=self._context,
                    )
                    spec = self._ocp.type_handlers.get_json_tspec_read(
                        info, use_ocdbt=self._use_ocdbt
                    )
                    store = self._ts.open(spec, context=self._context, read=True).result()
                    self._stores[name] = store
                return np.asarray(store[index].read().result())
            except Exception as error:  # TensorStore reports missing / corrupt data variously
                raise CheckpointError(
                    f"Could not read {source} from the {FORMAT_NAME} at {self.path}: "
                    f"{type(error).__name__}: {error}. The checkpoint is incomplete or corrupt "
                    "(a data file under d/ or ocdbt.process_*/d/ is missing or truncated); "
                    "copy or download it again."
                ) from None

        return read

    def _ocp_path(self):
        from etils import epath

        return epath.Path(self.path)


def _import_orbax() -> tuple[Any, Any]:
    try:
        import orbax.checkpoint as ocp
        import tensorstore as ts
    except ImportError as error:
        raise CheckpointError(
            f"Reading a {FORMAT_NAME} (Orbax) needs the orbax-checkpoint package, which is not "
            f"installed ({error}). Install it with: {_INSTALL}."
        ) from None
    return ocp, ts


def _read_metadata(path: pathlib.Path, ocp: Any) -> tuple[pathlib.Path, Mapping[str, Any]]:
    """The parameter tree's metadata (shapes, dtypes, array names), and the directory it
    describes (a Kauldron checkpoint keeps the parameters in ``default/``)."""
    checkpointer = ocp.StandardCheckpointer()
    for candidate in (path, path / "default"):
        if not (candidate / "_METADATA").is_file():
            continue
        try:
            metadata = checkpointer.metadata(candidate)
        except Exception as error:
            raise CheckpointError(
                f"The Orbax metadata of {candidate} cannot be read ({type(error).__name__}: "
                f"{error}): the checkpoint is incomplete or corrupt."
            ) from None
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        if isinstance(tree, Mapping) and tree:
            return candidate, tree
    raise CheckpointError(
        f"{path} is an Orbax checkpoint directory without a parameter tree (no _METADATA "
        "with array metadata here or in default/): it is incomplete, or not a gemma-library "
        "checkpoint."
    )


# ------------------------------------------------------------------------- the families


def detect_family(leaves: Mapping[str, _Leaf]) -> str:
    """``gemma3``, ``gemma3n`` or ``gemma4`` from the parameter names, or an error."""
    names = list(leaves)
    if any(re.fullmatch(r"layer_\d+/skip_scale", n) for n in names):
        return "gemma4"
    if any(re.match(r"(altup_projection_\d+/|layer_\d+/(altup|laurel)/)", n) for n in names):
        return "gemma3n"
    if any(re.fullmatch(r"layer_\d+/attn/query_norm/scale", n) for n in names):
        return "gemma3"
    if any(re.fullmatch(r"layer_\d+/attn/(q|qkv)_einsum", n) for n in names):
        hint = (
            "it has attention layers but no QK-norm (layer_*/attn/_query_norm), as Gemma 1 "
            "and Gemma 2 do, which gemmalens does not implement"
        )
    else:
        shown = ", ".join(sorted(names)[:8]) or "no text-decoder parameters at all"
        hint = f"none of its parameters is a Gemma decoder's (it holds {shown})"
    raise CheckpointError(
        f"This {FORMAT_NAME} fits none of the Gemma text decoders gemmalens reads (Gemma 3, "
        f"Gemma 3n, Gemma 4): {hint}."
    )


def _layer_count(leaves: Mapping[str, _Leaf]) -> int:
    layers = {int(m.group(1)) for n in leaves if (m := re.match(r"layer_(\d+)/", n))}
    return max(layers) + 1 if layers else 0


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one Hugging Face tensor comes from: ``convert(array[index])`` of the library
    array ``name``, whose shape must be ``shape``."""

    name: str
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    index: tuple = ()
    convert: Callable[[np.ndarray], np.ndarray] | None = None


def _same(name: str, shape: tuple[int, ...]) -> _Source:
    return _Source(name, shape, shape)


def _transposed(name: str, shape: tuple[int, int]) -> _Source:
    return _Source(name, shape, shape[::-1], convert=np.transpose)


def _heads_in(name: str, shape: tuple[int, ...], index: tuple = ()) -> _Source:
    """(heads, d_model, head_dim) -> the [heads * head_dim, d_model] projection."""
    n, d, h = shape[len(index) :]
    return _Source(
        name, shape, (n * h, d), index, lambda x: np.transpose(x, (0, 2, 1)).reshape(n * h, d)
    )


class _Layout:
    """Hugging Face tensor name -> `_Source`, and the library arrays the text model may
    carry without using them (key/value projections of KV-sharing layers)."""

    def __init__(self) -> None:
        self.tensors: dict[str, _Source] = {}
        self.unused: set[str] = set()

    def add(self, hf: str, source: _Source) -> None:
        self.tensors["model." + hf] = source

    def norm(self, hf: str, name: str, width: int) -> None:
        self.add(hf + ".weight", _same(name + "/scale", (width,)))

    def attention(
        self, i: int, *, d: int, heads: int, kv_heads: int, head_dim: int, reads_kv: bool,
        fused: bool = False, k_eq_v: bool = False,
    ) -> None:  # fmt: skip
        a, h = f"layer_{i}/attn/", f"layers.{i}.self_attn."
        q_shape, kv_shape = (heads, d, head_dim), (2, kv_heads, d, head_dim)
        if fused:  # num_kv_heads == num_heads in Gemma 3 / 3n: one (3, heads, ...) array
            qkv = (3, heads, d, head_dim)
            self.add(h + "q_proj.weight", _heads_in(a + "qkv_einsum", qkv, (0,)))
            if reads_kv:
                self.add(h + "k_proj.weight", _heads_in(a + "qkv_einsum", qkv, (1,)))
                self.add(h + "v_proj.weight", _heads_in(a + "qkv_einsum", qkv, (2,)))
        else:
            self.add(h + "q_proj.weight", _heads_in(a + "q_einsum", q_shape))
            if reads_kv and k_eq_v:
                k_shape = (kv_heads, d, head_dim)
                self.add(h + "k_proj.weight", _heads_in(a + "k_einsum", k_shape))
            elif reads_kv:
                self.add(h + "k_proj.weight", _heads_in(a + "kv_einsum", kv_shape, (0,)))
                self.add(h + "v_proj.weight", _heads_in(a + "kv_einsum", kv_shape, (1,)))
            else:
                self.unused |= {a + "kv_einsum", a + "k_einsum"}
        self.add(
            h + "o_proj.weight",
            _Source(
                a + "attn_vec_einsum",
                (heads, head_dim, d),
                (d, heads * head_dim),
                convert=lambda x: x.reshape(heads * head_dim, d).T,
            ),
        )
        self.norm(h + "q_norm", a + "query_norm", head_dim)
        if reads_kv:
            self.norm(h + "k_norm", a + "key_norm", head_dim)
        else:
            self.unused.add(a + "key_norm/scale")

    def mlp(self, hf: str, name: str, d: int, d_ff: int) -> None:
        """``gating_einsum`` (2, d_ff, d_model) and ``linear`` (d_ff, d_model)."""
        gating = (2, d_ff, d)
        self.add(
            hf + ".gate_proj.weight", _Source(name + "/gating_einsum", gating, (d_ff, d), (0,))
        )
        self.add(hf + ".up_proj.weight", _Source(name + "/gating_einsum", gating, (d_ff, d), (1,)))
        self.add(hf + ".down_proj.weight", _transposed(name + "/linear", (d_ff, d)))

    def per_layer_inputs(self, config: Any, vocab: int) -> None:
        """The per-layer-input table and projection (Gemma 3n, Gemma 4 E2B/E4B)."""
        n, p, d = config.num_hidden_layers, config.hidden_size_per_layer_input, config.hidden_size
        self.add(
            "embed_tokens_per_layer.weight",
            _Source(
                "embedder/per_layer_embeddings",
                (vocab, n, p),
                (vocab, n * p),
                convert=lambda x: x.reshape(vocab, n * p),
            ),
        )
        self.add(
            "per_layer_model_projection.weight",
            _Source(
                "embedder/per_layer_model_projection",
                (d, n, p),
                (n * p, d),
                convert=lambda x: x.reshape(d, n * p).T,
            ),
        )
        self.norm("per_layer_projection_norm", "embedder/per_layer_projection_norm", p)

    def per_layer_gate(self, i: int, d: int, p: int) -> None:
        self.add(
            f"layers.{i}.per_layer_input_gate.weight",
            _transposed(f"layer_{i}/per_layer_input_gate", (d, p)),
        )
        self.add(
            f"layers.{i}.per_layer_projection.weight",
            _transposed(f"layer_{i}/per_layer_projection", (p, d)),
        )
        self.norm(f"layers.{i}.post_per_layer_input_norm", f"layer_{i}/post_per_layer_input_norm", d)  # fmt: skip


def _gemma3_layout(c: Any) -> _Layout:
    out = _Layout()
    d = c.hidden_size
    out.add("embed_tokens.weight", _same("embedder/input_embedding", (c.vocab_size, d)))
    out.norm("norm", "final_norm", d)
    for i in range(c.num_hidden_layers):
        layer, hf = f"layer_{i}/", f"layers.{i}."
        out.attention(
            i, d=d, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, reads_kv=True,
            fused=c.num_key_value_heads == c.num_attention_heads,
        )  # fmt: skip
        out.mlp(hf + "mlp", layer + "mlp", d, c.intermediate_size)
        out.norm(hf + "input_layernorm", layer + "pre_attention_norm", d)
        out.norm(hf + "post_attention_layernorm", layer + "post_attention_norm", d)
        out.norm(hf + "pre_feedforward_layernorm", layer + "pre_ffw_norm", d)
        out.norm(hf + "post_feedforward_layernorm", layer + "post_ffw_norm", d)
    return out


def _gemma3n_layout(c: Any) -> _Layout:
    out = _Layout()
    d, k, clip = c.hidden_size, c.altup_num_inputs, c.altup_coef_clip
    # The library clips the AltUp coefficients at run time (coef_clip=120); transformers
    # does not, so the clip is applied here (a no-op on released weights).
    clipped = (lambda x: x) if clip is None else (lambda x: np.clip(x, -clip, clip))
    out.add("embed_tokens.weight", _same("embedder/input_embedding", (c.vocab_size, d)))
    out.norm("norm", "final_norm", d)
    out.per_layer_inputs(c, c.vocab_size_per_layer_input)
    for j in range(k - 1):
        for hf, name in (("altup_projections", "altup_projection"), ("altup_unembed_projections", "altup_unembed_projection")):  # fmt: skip
            out.add(f"{hf}.{j}.weight", _transposed(f"{name}_{j}/{name}_{j}", (d, d)))
    kv_sources = c.kv_sources
    for i in range(c.num_hidden_layers):
        layer, hf = f"layer_{i}/", f"layers.{i}."
        out.attention(
            i, d=d, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, reads_kv=kv_sources[i] is None,
            fused=c.num_key_value_heads == c.num_attention_heads,
        )  # fmt: skip
        out.mlp(hf + "mlp", layer + "mlp", d, c.intermediate_size[i])
        out.norm(hf + "input_layernorm", layer + "pre_attention_norm", d)
        out.norm(hf + "post_attention_layernorm", layer + "post_attention_norm", d)
        out.norm(hf + "pre_feedforward_layernorm", layer + "pre_ffw_norm", d)
        out.norm(hf + "post_feedforward_layernorm", layer + "post_ffw_norm", d)
        altup = layer + "altup/"
        out.add(hf + "altup.correct_output_scale", _same(altup + "correct_output_scale", (d,)))
        out.add(
            hf + "altup.correction_coefs.weight",
            _Source(altup + "correction_coefs", (k, k), (k, k), convert=lambda x: clipped(x.T)),
        )
        out.add(
            hf + "altup.prediction_coefs.weight",
            _Source(
                altup + "prediction_coefs",
                (k, k, k),
                (k * k, k),
                convert=lambda x: clipped(x.reshape(k, k * k).T),
            ),
        )
        out.add(hf + "altup.modality_router.weight", _transposed(altup + "modality_router", (d, k)))
        out.norm(hf + "altup.router_norm", altup + "router_norm_layer", d)
        out.add(hf + "laurel.linear_left.weight", _transposed(layer + "laurel/linear_left", (d, c.laurel_rank)))  # fmt: skip
        out.add(hf + "laurel.linear_right.weight", _transposed(layer + "laurel/linear_right", (c.laurel_rank, d)))  # fmt: skip
        out.norm(hf + "laurel.post_laurel_norm", layer + "post_laurel_norm", d)
        out.per_layer_gate(i, d, c.hidden_size_per_layer_input)
    return out


def _gemma4_layout(c: Any) -> _Layout:
    out = _Layout()
    d = c.hidden_size
    out.add("embed_tokens.weight", _same("embedder/input_embedding", (c.vocab_size, d)))
    out.norm("norm", "final_norm", d)
    if c.hidden_size_per_layer_input:
        out.per_layer_inputs(c, c.vocab_size_per_layer_input)
    kv_sources = c.kv_sources
    for i in range(c.num_hidden_layers):
        layer, hf = f"layer_{i}/", f"layers.{i}."
        full = c.layer_types[i] == "full_attention"
        out.attention(
            i, d=d, heads=c.num_attention_heads, kv_heads=c.layer_kv_heads(i),
            head_dim=c.layer_head_dim(i), reads_kv=kv_sources[i] is None,
            k_eq_v=full and c.attention_k_eq_v,
        )  # fmt: skip
        out.add(hf + "layer_scalar", _same(layer + "skip_scale", (1,)))
        out.norm(hf + "input_layernorm", layer + "pre_attention_norm", d)
        out.norm(hf + "post_attention_layernorm", layer + "post_attention_norm", d)
        wide = c.use_double_wide_mlp and kv_sources[i] is not None
        d_ff = c.intermediate_size * (2 if wide else 1)
        if c.enable_moe_block:
            # The library's dense branch is mlp2 (pre_ffw2_norm, post_ffw2_norm) and its
            # experts mlp (pre_ffw_norm, post_ffw1_norm); post_ffw_norm takes their sum.
            out.mlp(hf + "mlp", layer + "mlp2", d, d_ff)
            out.norm(hf + "pre_feedforward_layernorm", layer + "pre_ffw2_norm", d)
            out.norm(hf + "post_feedforward_layernorm_1", layer + "post_ffw2_norm", d)
            out.norm(hf + "pre_feedforward_layernorm_2", layer + "pre_ffw_norm", d)
            out.norm(hf + "post_feedforward_layernorm_2", layer + "post_ffw1_norm", d)
            e, h = c.num_experts, c.moe_intermediate_size
            moe = layer + "mlp/"
            out.add(hf + "router.proj.weight", _transposed(moe + "router_logits", (d, e)))
            out.add(hf + "router.scale", _same(moe + "router_scale", (d,)))
            out.add(hf + "router.per_expert_scale", _same(moe + "per_expert_scale", (e,)))
            out.add(
                hf + "experts.gate_up_proj",
                _Source(
                    moe + "gating_einsum",
                    (e, 2, h, d),
                    (e, 2 * h, d),
                    convert=lambda x, e=e, h=h: x.reshape(e, 2 * h, d),
                ),
            )
            out.add(
                hf + "experts.down_proj",
                _Source(
                    moe + "linear",
                    (e, h, d),
                    (e, d, h),
                    convert=lambda x: np.transpose(x, (0, 2, 1)),
                ),
            )
        else:
            out.mlp(hf + "mlp", layer + "mlp", d, d_ff)
            out.norm(hf + "pre_feedforward_layernorm", layer + "pre_ffw_norm", d)
        out.norm(hf + "post_feedforward_layernorm", layer + "post_ffw_norm", d)
        if c.hidden_size_per_layer_input:
            out.per_layer_gate(i, d, c.hidden_size_per_layer_input)
    return out


_LAYOUTS = {"gemma3": _gemma3_layout, "gemma3n": _gemma3n_layout, "gemma4": _gemma4_layout}


def _padded_vocabulary(layout: _Layout, config: Any, leaves: Mapping[str, _Leaf]) -> None:
    """A Gemma 3n config with transformers' 262,400-token vocabulary over the library's
    262,144-row embedding: the extra rows are copies of the padding row, as transformers'
    ``convert_gemma3n_weights.py`` makes them."""
    embedding = leaves.get("embedder/input_embedding")
    rows, extra = (
        config.vocab_size_per_layer_input,
        config.vocab_size - config.vocab_size_per_layer_input,
    )
    if embedding is None or extra <= 0 or embedding.shape != (rows, config.hidden_size):
        return
    pad = config.pad_token_id

    def convert(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x, np.repeat(x[pad : pad + 1], extra, axis=0)])

    layout.tensors["model.embed_tokens.weight"] = _Source(
        "embedder/input_embedding", embedding.shape, (config.vocab_size, config.hidden_size), convert=convert
    )  # fmt: skip


def _layout(config: Any, leaves: Mapping[str, _Leaf]) -> _Layout:
    layout = _LAYOUTS[config.family](config)
    if config.family == "gemma3n":
        _padded_vocabulary(layout, config, leaves)
    return layout


def _problems(layout: _Layout, leaves: Mapping[str, _Leaf]) -> list[str]:
    """Every parameter the config needs that the tree lacks or holds in another shape, and
    every text parameter of the tree the config does not use."""
    required: dict[str, tuple[int, ...]] = {}
    for source in layout.tensors.values():
        required[source.name] = source.shape
    missing, misshaped = [], []
    for name, shape in required.items():
        leaf = leaves.get(name)
        if leaf is None:
            missing.append(f"missing {name} {shape}")
        elif leaf.shape != shape:
            misshaped.append(f"{leaf.source} has shape {leaf.shape} where {shape} was expected")
    unexpected = [
        f"unexpected {leaf.source} {leaf.shape}"
        for name, leaf in leaves.items()
        if name not in required and name not in layout.unused
    ]
    return misshaped + missing + sorted(unexpected, key=_natural)


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# ------------------------------------------------------------------------- the config


def _library_config(name: str, family: str, leaves: Mapping[str, _Leaf]) -> Any:
    """The gemmalens preset ``name`` as the gemma library runs that model: Gemma 3n without
    the final soft-cap and with the checkpoint's own vocabulary."""
    from gemmalens.presets import preset

    config = preset(name)
    if family == "gemma3n":
        embedding = leaves.get("embedder/input_embedding")
        table = leaves.get("embedder/per_layer_embeddings")
        changes: dict[str, Any] = {"final_logit_softcapping": None}
        if embedding is not None:
            changes["vocab_size"] = embedding.shape[0]
        if table is not None:
            changes["vocab_size_per_layer_input"] = table.shape[0]
        config = dataclasses.replace(config, **changes)
    return config


def _summary(family: str, leaves: Mapping[str, _Leaf]) -> str:
    parts = [f"{_layer_count(leaves)} layers"]
    embedding = leaves.get("embedder/input_embedding")
    if embedding is not None:
        parts.append(f"vocabulary {embedding.shape[0]}, d_model {embedding.shape[1]}")
    q = leaves.get("layer_0/attn/q_einsum") or leaves.get("layer_0/attn/qkv_einsum")
    if q is not None:
        parts.append(f"{q.shape[-3]} heads of {q.shape[-1]}")
    gating = leaves.get("layer_0/mlp2/gating_einsum") or leaves.get("layer_0/mlp/gating_einsum")
    if gating is not None:
        parts.append(f"MLP width {gating.shape[-2]}")
    experts = leaves.get("layer_0/mlp/router_logits")
    if experts is not None:
        parts.append(f"{experts.shape[-1]} experts")
    return f"a {_FAMILY_NAMES[family]} decoder with " + ", ".join(parts)


def infer_config(leaves: Mapping[str, _Leaf]) -> Any:
    """The gemmalens config of a gemma-library parameter tree (`tree_leaves`).

    The checkpoint records shapes only; the behaviour the library hard-codes per model
    class (sliding window, RoPE, attention pattern, soft-caps, activation sparsity, KV
    sharing) comes from the model class the shapes identify. Every released class is
    recognised (``Gemma3_270M`` ... ``Gemma3_27B``, ``Gemma3n_E2B`` / ``E4B``,
    ``Gemma4_E2B`` / ``E4B`` / ``26B_A4B`` / ``31B``): the tree must match one of them in
    every text parameter. Other architectures need ``preset=`` (a gemmalens config).
    """
    from gemmalens.presets import PRESETS

    family = detect_family(leaves)
    # Text decoders only: the vision towers of the library's checkpoints are not read.
    candidates = [
        name
        for name, c in PRESETS.items()
        if c.family == family and getattr(c, "vision", None) is None
    ]
    scored = []
    for name in candidates:
        config = _library_config(name, family, leaves)
        problems = _problems(_layout(config, leaves), leaves)
        if not problems:
            return config
        scored.append((len(problems), name, problems))
    _, closest, problems = min(scored)
    raise CheckpointError(
        f"This {FORMAT_NAME} holds {_summary(family, leaves)}, which is none of the gemma "
        f"library's {_FAMILY_NAMES[family]} models (gemmalens presets "
        f"{', '.join(candidates)}). The closest, {closest!r}, differs in: "
        + "; ".join(problems[:4])
        + ("; ..." if len(problems) > 4 else "")
        + ". The checkpoint holds parameters only, so pass its architecture: "
        "gl.load(path, preset=<a gemmalens config>) (or a preset name)."
    )


def _config_of(preset: Any, family: str) -> tuple[Any, str]:
    """The config ``preset`` names or is, checked to be of the tree's family, and how to
    call it in messages."""
    if isinstance(preset, str):
        from gemmalens.presets import preset as named

        try:
            config = named(preset)
        except KeyError as error:
            raise CheckpointError(error.args[0]) from None
        label = f"Preset {preset!r}"
    else:
        config, label = preset, f"The {type(preset).__name__} given as preset"
    config_family = getattr(config, "family", None)
    if config_family not in _LAYOUTS:
        raise CheckpointError(
            f"{label} is of family {config_family!r}; for a {FORMAT_NAME}, preset must be a "
            "gemmalens preset name or config of a Gemma 3, 3n or 4 text decoder."
        )
    if config_family != family:
        raise CheckpointError(
            f"{label} is a {_FAMILY_NAMES[config_family]} architecture, but this "
            f"{FORMAT_NAME} holds a {_FAMILY_NAMES[family]} decoder."
        )
    return config, label


# ------------------------------------------------------------------------- opening


class _LastRead:
    """The last library array read whole, for the Hugging Face tensors that are parts of
    one array (``gating_einsum`` -> gate and up, ``kv_einsum`` -> key and value), which the
    builders ask for one after the other: Orbax stores an array as one chunk per shard, so
    reading a part decodes the whole chunk anyway. Holds one array at most."""

    def __init__(self) -> None:
        self._leaf: _Leaf | None = None
        self._array: np.ndarray | None = None

    def __call__(self, leaf: _Leaf) -> np.ndarray:
        if self._leaf is not leaf:
            self._leaf, self._array = None, None  # release the previous one first
            self._array, self._leaf = leaf.read(()), leaf
        return self._array


def _tensors(layout: _Layout, leaves: Mapping[str, _Leaf]) -> dict[str, MappedTensor]:
    tensors = {}
    last = _LastRead()
    for hf, source in layout.tensors.items():
        leaf = leaves[source.name]

        def read(leaf: _Leaf = leaf, source: _Source = source) -> np.ndarray:
            array = last(leaf)[source.index] if source.index else leaf.read(())
            return array if source.convert is None else source.convert(array)

        where = leaf.source + "".join(f"[{i}]" for i in source.index)
        tensors[hf] = MappedTensor(source.hf_shape, leaf.dtype, read, where)
    return tensors


def _tokenizer(path: pathlib.Path) -> pathlib.Path | None:
    """``tokenizer.model`` in the checkpoint directory or beside it (Kaggle's layout)."""
    for candidate in (path / "tokenizer.model", path.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def open_checkpoint(path: pathlib.Path, preset: Any = None) -> MappedCheckpoint:
    """A gemma-library (Orbax) checkpoint under Hugging Face names and layouts.

    Args:
      path: the checkpoint directory (``_METADATA``, ``manifest.ocdbt``, ``d/``, ...).
      preset: None to infer the architecture from the parameter tree (`infer_config`), a
        gemmalens preset name (``gl.presets()``), or a gemmalens config (``Gemma3Config``,
        ``Gemma3nConfig``, ``Gemma4Config``) for an architecture that is no preset.

    Returns:
      a `MappedCheckpoint` whose config is the equivalent Hugging Face ``config.json``.
    """
    from gemmalens.families.hf_config import to_hf

    ocp, ts = _import_orbax()
    path = pathlib.Path(path)
    directory, tree = _read_metadata(path, ocp)
    leaves = tree_leaves(tree, _OrbaxReader(directory, ocp, ts))
    family = detect_family(leaves)
    if preset is None:
        config = infer_config(leaves)
    else:
        config, label = _config_of(preset, family)
        problems = _problems(_layout(config, leaves), leaves)
        if problems:
            raise CheckpointError(
                f"{label} does not match the {FORMAT_NAME} at {path} "
                f"({_summary(family, leaves)}): "
                + "; ".join(problems[:6])
                + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
                + "."
            )
    layout = _layout(config, leaves)
    return MappedCheckpoint(
        path, to_hf(config), _tensors(layout, leaves), FORMAT_NAME, _tokenizer(path)
    )


FORMAT = CheckpointFormat(
    FORMAT_NAME,
    "an Orbax checkpoint directory (_METADATA, manifest.ocdbt, d/...) as on Kaggle or as "
    "written by gm.ckpts.save_params; pass preset= when the tree does not settle the model",
    is_checkpoint,
    open_checkpoint,
)
