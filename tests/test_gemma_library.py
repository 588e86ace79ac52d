"""``gl.load`` reads the gemma library's Orbax checkpoints (Gemma 3, 3n, 4).

The gemma library itself is not the reference here: on this Python (3.11) PyPI offers
gemma 3.3.0 at most (4.x needs 3.12 and has Gemma 4), its kauldron dependency pulls in
TensorFlow, and even then ``gm.nn`` does not import (kauldron 1.4.2:
``kd.ckpts.AbstractPartialLoader`` is gone; kauldron 1.3.0 does not run on jax 0.10). So the
library's parameter tree is reproduced in `to_library` below, written from its module
definitions in google-deepmind/gemma, independently of the loader:

- Gemma 3: ``gemma/gm/nn/_modules.py`` (Embedder, Attention, FeedForward, Block),
  ``gemma/gm/nn/_layers.py`` (Einsum, RMSNorm), ``gemma/gm/nn/_transformer.py``;
- Gemma 3n: ``gemma/gm/nn/gemma3n/_modules.py`` (Embedder, Attention, FeedForward,
  PerLayerMapping, AltUp, Laurel, Block), ``gemma/gm/nn/gemma3n/_transformer.py``
  (``altup_projection_{i}``), ``gemma/gm/nn/gemma3n/_config.py`` (KV sharing);
- Gemma 4: ``gemma/gm/nn/gemma4/_modules.py`` (Embedder, Attention, Block with
  ``skip_scale``, ``mlp2`` beside the experts), ``gemma/gm/nn/gemma4/_moe.py``
  (MoERagged), ``gemma/gm/nn/gemma4/_transformer.py``, ``gemma/gm/nn/gemma4/_config.py``;
- layouts: ``gemma/gm/ckpts/_checkpoint.py`` (``save_params``: StandardCheckpointer on the
  nested tree) and ``gemma/gm/ckpts/_compat.py`` (flat and stacked layouts).

Tiny transformers models (every weight perturbed) are converted into that tree, saved with
Orbax as ``gm.ckpts.save_params`` does, loaded with ``gl.load`` and compared with
transformers. Their configs stay within what the library can express: one MLP width for
all layers, ``altup_active_idx`` 0, a per-layer-input table as large as the vocabulary, and
KV sharing from the layers ``num_unshared - 1`` (global) and ``num_unshared - 2`` (local).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import gemmalens as gl
from gemmalens.checkpoints import gemma_library
from gemmalens.checkpoints.safetensors_files import CheckpointError
from gemmalens.families import gemma3, gemma3n, gemma4
from gemmalens.families.hf_config import to_hf
from tests import hf_reference as ref

ocp = pytest.importorskip("orbax.checkpoint")

TOLERANCE = 1e-4
SEQ = 10

# ----------------------------------------------------------------- the library's tree


def _w(x):
    return {"w": x}


def _scale(x):
    return {"scale": x}


def _heads(w, n, h):
    """transformers' [n * h, d] projection -> the library's (n, d, h) einsum."""
    return jnp.transpose(jnp.reshape(w, (n, h, -1)), (0, 2, 1))


def to_library(sd: dict, hf: dict, *, extra_kv_seed: int = 0) -> dict:
    """A transformers text decoder's state dict -> the gemma library's nested parameter
    tree (``model.init()['params']``), from the module definitions named above.

    ``hf`` is the transformers config dict. Layers that reuse another layer's keys and
    values still carry their own ``kv_einsum`` in the library (it builds one for every
    layer); they get random values here, which the loader must ignore."""
    family = hf["model_type"]
    get = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
    d, n, kv, h = (hf[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"))  # fmt: skip
    layers = hf["num_hidden_layers"]
    rng = np.random.RandomState(extra_kv_seed)
    tree: dict = {"embedder": {"input_embedding": get["embed_tokens.weight"]}}
    tree["final_norm"] = _scale(get["norm.weight"])
    if "embed_tokens_per_layer.weight" in get:
        p = hf["hidden_size_per_layer_input"]
        table = get["embed_tokens_per_layer.weight"]
        names = (
            ("per_layer_input_embedding", "per_layer_input_projection")
            if family == "gemma3n_text"
            else ("per_layer_embeddings", "per_layer_model_projection")
        )
        tree["embedder"][names[0]] = jnp.reshape(table, (table.shape[0], layers, p))
        tree["embedder"][names[1]] = _w(jnp.reshape(jnp.transpose(get["per_layer_model_projection.weight"]), (d, layers, p)))  # fmt: skip
        tree["embedder"]["per_layer_projection_norm"] = _scale(get["per_layer_projection_norm.weight"])  # fmt: skip
    if family == "gemma3n_text":
        k = hf["altup_num_inputs"]
        # A list of Einsum modules named after their parameter (Flax names list members
        # attribute_{i}): altup_projection_0/altup_projection_0.
        for i in range(k - 1):
            for name, hf_name in (("altup_projection", "altup_projections"), ("altup_unembed_projection", "altup_unembed_projections")):  # fmt: skip
                tree[f"{name}_{i}"] = {f"{name}_{i}": jnp.transpose(get[f"{hf_name}.{i}.weight"])}
    for i in range(layers):
        g = {
            k.removeprefix(f"layers.{i}."): v
            for k, v in get.items()
            if k.startswith(f"layers.{i}.")
        }
        full = hf["layer_types"][i] == "full_attention"
        head_dim = hf.get("global_head_dim", h) if family == "gemma4_text" and full else h
        kv_heads = kv
        k_eq_v = family == "gemma4_text" and full and hf.get("attention_k_eq_v")
        if k_eq_v and hf.get("num_global_key_value_heads"):
            kv_heads = hf["num_global_key_value_heads"]
        attn = {
            "q_einsum": _w(_heads(g["self_attn.q_proj.weight"], n, head_dim)),
            "attn_vec_einsum": _w(
                jnp.reshape(jnp.transpose(g["self_attn.o_proj.weight"]), (n, head_dim, d))
            ),  # fmt: skip
        }
        norms = ("_query_norm", "_key_norm") if family == "gemma3_text" else ("query_norm", "key_norm")  # fmt: skip
        attn[norms[0]] = _scale(g["self_attn.q_norm.weight"])
        fused = family != "gemma4_text" and kv == n  # Attention.use_qkv_einsum
        if "self_attn.k_proj.weight" in g:
            key = _heads(g["self_attn.k_proj.weight"], kv_heads, head_dim)
            if fused:
                value = _heads(g["self_attn.v_proj.weight"], kv_heads, head_dim)
                attn["qkv_einsum"] = _w(jnp.stack([attn.pop("q_einsum")["w"], key, value]))
            elif k_eq_v:
                attn["k_einsum"] = _w(key)
            else:
                value = _heads(g["self_attn.v_proj.weight"], kv_heads, head_dim)
                attn["kv_einsum"] = _w(jnp.stack([key, value]))
            attn[norms[1]] = _scale(g["self_attn.k_norm.weight"])
        else:  # a KV-sharing layer: stored, never used
            shape = (kv_heads, d, head_dim) if k_eq_v else (2, kv_heads, d, head_dim)
            attn["k_einsum" if k_eq_v else "kv_einsum"] = _w(
                jnp.asarray(rng.randn(*shape), jnp.float32)
            )
            attn[norms[1]] = _scale(jnp.asarray(rng.randn(head_dim), jnp.float32))
        dense = {
            "gating_einsum": jnp.stack([g["mlp.gate_proj.weight"], g["mlp.up_proj.weight"]]),
            "linear": jnp.transpose(g["mlp.down_proj.weight"]),
        }
        layer = {
            "pre_attention_norm": _scale(g["input_layernorm.weight"]),
            "attn": attn,
            "post_attention_norm": _scale(g["post_attention_layernorm.weight"]),
            "post_ffw_norm": _scale(g["post_feedforward_layernorm.weight"]),
        }
        if "router.proj.weight" in g:  # Gemma 4 MoE: mlp2 dense, mlp the experts
            e = g["router.per_expert_scale"].shape[0]
            gate_up = g["experts.gate_up_proj"]
            layer |= {
                "mlp2": dense,
                "pre_ffw2_norm": _scale(g["pre_feedforward_layernorm.weight"]),
                "post_ffw2_norm": _scale(g["post_feedforward_layernorm_1.weight"]),
                "pre_ffw_norm": _scale(g["pre_feedforward_layernorm_2.weight"]),
                "post_ffw1_norm": _scale(g["post_feedforward_layernorm_2.weight"]),
                "mlp": {
                    "router_logits": _w(jnp.transpose(g["router.proj.weight"])),
                    "gating_einsum": _w(jnp.reshape(gate_up, (e, 2, gate_up.shape[1] // 2, d))),
                    "linear": _w(jnp.transpose(g["experts.down_proj"], (0, 2, 1))),
                    "per_expert_scale": g["router.per_expert_scale"],
                    "router_scale": g["router.scale"],
                },
            }
        else:
            layer |= {"mlp": dense, "pre_ffw_norm": _scale(g["pre_feedforward_layernorm.weight"])}
        if "layer_scalar" in g:
            layer["skip_scale"] = g["layer_scalar"]
        if "per_layer_input_gate.weight" in g:
            mapping = {
                "per_layer_input_gate": _w(jnp.transpose(g["per_layer_input_gate.weight"])),
                "per_layer_projection": _w(jnp.transpose(g["per_layer_projection.weight"])),
                "post_per_layer_input_norm": _scale(g["post_per_layer_input_norm.weight"]),
            }
            if family == "gemma3n_text":
                layer["per_layer_mapping"] = mapping
            else:
                layer |= mapping
        if family == "gemma3n_text":
            k = hf["altup_num_inputs"]
            layer["altup"] = {
                "correction_coefs": jnp.transpose(g["altup.correction_coefs.weight"]),
                "prediction_coefs": jnp.reshape(
                    jnp.transpose(g["altup.prediction_coefs.weight"]), (k, k, k)
                ),  # fmt: skip
                "correct_output_scale": g["altup.correct_output_scale"],
                "modality_router": _w(jnp.transpose(g["altup.modality_router.weight"])),
                "router_norm_layer": _scale(g["altup.router_norm.weight"]),
            }
            layer["laurel"] = {
                "linear_left": _w(jnp.transpose(g["laurel.linear_left.weight"])),
                "linear_right": _w(jnp.transpose(g["laurel.linear_right.weight"])),
            }
            layer["post_laurel_norm"] = _scale(g["laurel.post_laurel_norm.weight"])
        tree[f"layer_{i}"] = layer
    return tree


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield prefix + key, value


def to_flat(nested: dict) -> dict:
    """The released layout (``_compat.flatten_and_remap_params``): one entry per module,
    ``transformer/<module path>: {param: array}``; the MLP einsums get their ``w`` back."""
    flat: dict = {}
    for path, value in _flatten(nested):
        if path.endswith(("/mlp/linear", "/mlp/gating_einsum")):
            path += "/w"
        module, param = path.rsplit("/", 1)
        flat.setdefault(f"transformer/{module}", {})[param] = value
    return flat


def to_stacked(flat: dict, pattern: int) -> dict:
    """The stacked layout (``_compat.stack_params``): layer ``n * pattern + t`` is slice n of
    ``transformer/stacked_layers/attention_type_t/...``."""
    slices: dict = {}
    out: dict = {}
    for key, params in flat.items():
        if not key.startswith("transformer/layer_"):
            out[key] = params
            continue
        number, _, suffix = key.removeprefix("transformer/layer_").partition("/")
        target = f"transformer/stacked_layers/attention_type_{int(number) % pattern}"
        target += f"/{suffix}" if suffix else ""
        for param, value in params.items():
            slices.setdefault((target, param), {})[int(number) // pattern] = value
    for (target, param), by_slice in slices.items():
        out.setdefault(target, {})[param] = jnp.stack([by_slice[s] for s in sorted(by_slice)])
    return out


def save(tree: dict, directory: pathlib.Path) -> pathlib.Path:
    """As ``gm.ckpts.save_params``: ``ocp.StandardCheckpointer().save(path, params)``."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, tree)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return directory


# ----------------------------------------------------------------- tiny checkpoints


_S, _F = "sliding_attention", "full_attention"
# Each family: the transformers builder, config overrides, the stacked pattern length, the
# gemmalens config class.
FAMILIES = {
    # query_pre_attn_scalar: the library can only scale by head_dim or d_model / heads.
    "gemma3": (ref.gemma3_text, dict(query_pre_attn_scalar=16), 3, gemma3.Gemma3Config),
    "gemma3n": (
        ref.gemma3n_text,
        dict(
            intermediate_size=128,
            vocab_size_per_layer_input=512,
            altup_active_idx=0,
            layer_types=[_S, _S, _F, _S, _F],  # 3 reuses 1, 4 reuses 2
        ),
        2,
        gemma3n.Gemma3nConfig,
    ),
    # E2B-like (per-layer inputs, KV sharing, double-wide MLP) with 31B's K=V full layers;
    # layer 5 reuses the K=V layer 3.
    "gemma4": (
        lambda d, **o: ref.gemma4_text(d, **o),
        dict(attention_k_eq_v=True, num_global_key_value_heads=1),
        None,
        gemma4.Gemma4Config,
    ),
    "gemma4_moe": (lambda d, **o: ref.gemma4_text(d, moe=True, **o), {}, 3, gemma4.Gemma4Config),
}


@dataclasses.dataclass
class Tiny:
    hf_model: transformers.PreTrainedModel
    config: object  # the gemmalens config
    dirs: dict  # layout -> checkpoint directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Every family in every layout it can be stored in, built once."""
    out = {}
    for name, (build, overrides, pattern, config_class) in FAMILIES.items():
        root = tmp_path_factory.mktemp(name)
        hf_model = build(root / "hf", **overrides)
        hf = {"model_type": hf_model.config.model_type, **hf_model.config.to_dict()}
        config = config_class.from_hf(hf)
        hf = to_hf(config)
        sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
        nested = to_library(sd, hf)
        dirs = {
            "nested": save(nested, root / "nested"),
            "flat": save(to_flat(nested), root / "flat"),
        }
        if pattern:
            dirs["stacked"] = save(to_stacked(to_flat(nested), pattern), root / "stacked")
        out[name] = Tiny(hf_model, config, dirs)
    return out


def _tokens(vocab: int) -> np.ndarray:
    return np.random.RandomState(0).randint(3, vocab, (2, SEQ))


# Gemma 3n in the released (stacked) layout, Gemma 3 and Gemma 4 dense in the released
# (flat) one, the MoE model as gm.ckpts.save_params writes it (nested).
RELEASED_LAYOUTS = [
    ("gemma3", "flat"),
    ("gemma3n", "stacked"),
    ("gemma4", "flat"),
    ("gemma4_moe", "nested"),
]


@pytest.mark.parametrize("name, layout", RELEASED_LAYOUTS)
def test_logits_match_transformers(tiny, name, layout):
    t = tiny[name]
    m = gl.load(t.dirs[layout], preset=t.config)
    assert m.checkpoint_format == "gemma-library checkpoint"
    assert m.config == t.config
    tokens = _tokens(t.config.vocab_size)
    expected = ref.logits(t.hf_model, tokens)
    got = np.asarray(m(tokens))
    diff = float(np.max(np.abs(got - expected)))
    print(f"{name} ({layout}): max |dlogit| = {diff:.2e}")
    assert diff <= TOLERANCE


def test_every_family_loads_stacked(tiny):
    """``gl.load(path, stack_layers=True)`` reads a library checkpoint (each family in its
    released layout) into stacked layers, off a mesh and on a (one-device) one, with
    transformers' logits as the per-layer load has them."""
    mesh = gl.sharding.make_mesh()
    for name, layout in RELEASED_LAYOUTS:
        t = tiny[name]
        tokens = _tokens(t.config.vocab_size)
        expected = ref.logits(t.hf_model, tokens)
        for on in (None, mesh):
            m = gl.load(t.dirs[layout], preset=t.config, mesh=on, stack_layers=True)
            assert m.is_stacked and m.mesh is on, name
            diff = float(np.max(np.abs(np.asarray(m(tokens)) - expected)))
            assert diff <= TOLERANCE, (name, on, diff)


def test_every_layout_gives_the_same_tensors(tiny):
    """Flat and stacked checkpoints present the nested one's tensors, bit for bit."""
    for name, t in tiny.items():
        reference = gemma_library.open_checkpoint(t.dirs["nested"], t.config)
        for layout, directory in t.dirs.items():
            ckpt = gemma_library.open_checkpoint(directory, t.config)
            assert ckpt.keys() == reference.keys(), (name, layout)
            for key in ckpt.keys():
                np.testing.assert_array_equal(ckpt.array(key), reference.array(key), f"{name} {layout} {key}")  # fmt: skip


def test_fused_qkv_and_kauldron_state(tmp_path):
    """Gemma 3 with as many KV heads as heads stores ``qkv_einsum`` (3, heads, d, h); a
    Kauldron training checkpoint keeps the parameters under ``params``."""
    hf_model = ref.gemma3_text(tmp_path / "hf", num_key_value_heads=4, query_pre_attn_scalar=16)
    config = gemma3.Gemma3Config.from_hf(hf_model.config.to_dict())
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    nested = to_library(sd, to_hf(config))
    assert nested["layer_0"]["attn"]["qkv_einsum"]["w"].shape == (3, 4, 64, 16)
    state = {"params": nested, "opt_state": {"mu": jnp.zeros(3)}, "step": jnp.asarray(7)}
    for tree, name in ((nested, "fused"), (state, "kauldron")):
        ckpt = gemma_library.open_checkpoint(save(tree, tmp_path / name), config)
        assert set(ckpt.keys()) == {k for k in sd if k != "lm_head.weight"}
        for key in ckpt.keys():
            np.testing.assert_array_equal(ckpt.array(key), sd[key], key)


def test_detect_format(tiny):
    from gemmalens.checkpoints.load import detect_format

    assert detect_format(tiny["gemma3"].dirs["nested"]).name == "gemma-library checkpoint"


# ----------------------------------------------------------------- bad input


def test_tiny_tree_needs_a_preset(tiny):
    with pytest.raises(CheckpointError) as error:
        gl.load(tiny["gemma3"].dirs["flat"])
    message = str(error.value)
    assert "Gemma 3 decoder with 7 layers" in message
    assert "none of the gemma library's Gemma 3 models" in message
    assert "preset=" in message


def test_preset_that_does_not_match_names_the_parameter(tiny):
    t = tiny["gemma4"]
    wider = dataclasses.replace(t.config, intermediate_size=t.config.intermediate_size + 8)
    with pytest.raises(CheckpointError) as error:
        gl.load(t.dirs["flat"], preset=wider)
    message = str(error.value)
    assert "does not match" in message
    assert "transformer/layer_0/mlp/gating_einsum/w has shape (2, 96, 64) where (2, 104, 64)" in message  # fmt: skip
    with pytest.raises(CheckpointError, match="Gemma 3 architecture, but .* holds a Gemma 4"):
        gl.load(t.dirs["flat"], preset="gemma3_1b")
    with pytest.raises(CheckpointError, match="gemma4_e2b"):  # suggests close preset names
        gl.load(t.dirs["flat"], preset="gemma4_e2")


def test_tree_that_fits_no_family(tmp_path):
    save({"encoder": {"dense": {"kernel": jnp.ones((4, 4))}}}, tmp_path / "other")
    with pytest.raises(CheckpointError, match="fits none of the Gemma text decoders"):
        gl.load(tmp_path / "other")
    gemma2 = {"layer_0": {"attn": {"q_einsum": {"w": jnp.ones((2, 8, 4))}}}}
    save(gemma2, tmp_path / "gemma2")
    with pytest.raises(CheckpointError, match="no QK-norm"):
        gl.load(tmp_path / "gemma2")


def test_corrupt_checkpoint(tiny, tmp_path):
    t = tiny["gemma3"]
    broken = shutil.copytree(t.dirs["nested"], tmp_path / "missing")
    for data in sorted(broken.glob("ocdbt.process_*/d/*")):
        data.unlink()
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        gl.load(broken, preset=t.config)

    truncated = shutil.copytree(t.dirs["nested"], tmp_path / "truncated")
    for data in sorted(truncated.glob("ocdbt.process_*/d/*")):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        gl.load(truncated, preset=t.config)


def test_orbax_missing(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(CheckpointError, match=r"pip install 'gemmalens\[gemma\]'"):
        gl.load(tiny["gemma3"].dirs["nested"], preset=tiny["gemma3"].config)


# ----------------------------------------------------------------- the released classes

# What the library hard-codes per class, read from gemma/gm/nn/_gemma.py,
# gemma/gm/nn/gemma3n/_gemma3n.py and gemma/gm/nn/gemma4/_gemma4.py: the gemmalens preset
# the tree must be recognised as, the sliding window, the attention pattern length
# (global every n-th layer), the linear RoPE factor on global layers, the query scale's
# denominator squared (Gemma 3), the number of KV-sharing layers (layers - unshared).
LIBRARY_CLASSES = {
    "Gemma3_270M": ("gemma3_270m", 512, 6, 1.0, dict(query_pre_attn_scalar=256)),
    "Gemma3_1B": ("gemma3_1b", 512, 6, 1.0, dict(query_pre_attn_scalar=256)),
    "Gemma3_4B": ("gemma3_4b_text", 1024, 6, 8.0, dict(query_pre_attn_scalar=256)),
    "Gemma3_12B": ("gemma3_12b_text", 1024, 6, 8.0, dict(query_pre_attn_scalar=256)),
    "Gemma3_27B": ("gemma3_27b_text", 1024, 6, 8.0, dict(query_pre_attn_scalar=5376 // 32)),
    "Gemma3n_E2B": ("gemma3n_e2b", 512, 5, 1.0, dict(num_kv_shared_layers=10)),
    "Gemma3n_E4B": ("gemma3n_e4b", 512, 5, 1.0, dict(num_kv_shared_layers=15)),
    "Gemma4_E2B": (
        "gemma4_e2b",
        512,
        5,
        1.0,
        dict(num_kv_shared_layers=20, use_double_wide_mlp=True),
    ),  # fmt: skip
    "Gemma4_E4B": ("gemma4_e4b", 512, 6, 1.0, dict(num_kv_shared_layers=18)),
    "Gemma4_31B": (
        "gemma4_31b",
        1024,
        6,
        1.0,
        dict(attention_k_eq_v=True, num_global_key_value_heads=4),
    ),  # fmt: skip
    "Gemma4_26B_A4B": (
        "gemma4_26b_a4b",
        1024,
        6,
        1.0,
        dict(num_experts=128, top_k_experts=8, moe_intermediate_size=704),
    ),  # fmt: skip
}
_HF_CLASSES = {
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    "gemma3n": (transformers.Gemma3nTextConfig, transformers.Gemma3nForCausalLM),
    "gemma4": (transformers.Gemma4TextConfig, transformers.Gemma4ForCausalLM),
}


def _library_shapes(config) -> dict:
    """The library's parameter tree of a released model, as shapes only: transformers'
    model on the meta device, converted abstractly (nothing is allocated)."""
    hf = to_hf(config)
    config_class, model_class = _HF_CLASSES[config.family]
    with torch.device("meta"):
        model = model_class(config_class(**{k: v for k, v in hf.items() if k != "model_type"}))
    shapes = {k: jax.ShapeDtypeStruct(tuple(v.shape), jnp.bfloat16) for k, v in model.state_dict().items()}  # fmt: skip
    if config.family == "gemma3n":  # the library's table has no rows past 262,144
        rows = hf["vocab_size_per_layer_input"]
        shapes["model.embed_tokens.weight"] = jax.ShapeDtypeStruct((rows, hf["hidden_size"]), jnp.bfloat16)  # fmt: skip
    return jax.eval_shape(lambda sd: to_library(sd, hf), shapes)


@pytest.mark.parametrize("library_class", sorted(LIBRARY_CLASSES))
def test_released_classes_are_recognised(library_class):
    preset, window, pattern, rope_factor, fields = LIBRARY_CLASSES[library_class]
    expected = gl.preset(preset)
    tree = to_flat(_library_shapes(expected))
    config = gemma_library.infer_config(gemma_library.tree_leaves(tree))
    assert config.sliding_window == window
    layers = config.num_hidden_layers
    assert config.layer_types == tuple(
        _F if i % pattern == pattern - 1 else _S for i in range(layers)
    )
    assert config.rope_local.theta == 10_000 and config.rope_global.theta == 1_000_000
    assert config.rope_global.factor == rope_factor
    for field, value in fields.items():
        assert getattr(config, field) == value, field
    if config.family == "gemma3":
        assert config == expected and config.final_logit_softcapping is None
    elif config.family == "gemma3n":
        # The library's Gemma 3n: no final soft-cap, its own 262,144-token vocabulary;
        # sparsity 0.95 on the first 10 layers.
        assert config == dataclasses.replace(
            expected, final_logit_softcapping=None, vocab_size=262_144
        )
        assert config.activation_sparsity_pattern == (0.95,) * 10 + (0.0,) * (layers - 10)
    else:
        assert config == expected and config.final_logit_softcapping == 30.0
        assert config.rope_global.partial_rotary_factor == 0.25


def test_gemma3n_preset_gives_the_transformers_vocabulary(tiny):
    """With a preset of transformers' padded vocabulary, the extra rows are the pad row."""
    t = tiny["gemma3n"]
    padded = dataclasses.replace(t.config, vocab_size=t.config.vocab_size + 32)
    ckpt = gemma_library.open_checkpoint(t.dirs["stacked"], padded)
    embedding = ckpt.array("model.embed_tokens.weight")
    assert embedding.shape == (544, 64)
    np.testing.assert_array_equal(embedding[512:], np.repeat(embedding[:1], 32, axis=0))
