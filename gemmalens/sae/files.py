"""Reading sparse autoencoder and transcoder files, and checking them against a model.

File layouts read (nothing is downloaded; pickle files are never opened)
-------------------------------------------------------------------------

**Gemma Scope 2** (Hugging Face repositories ``google/gemma-scope-2-{270m,1b,4b,12b,27b}-
{pt,it}``), one directory per dictionary, e.g. ``resid_post/layer_12_width_16k_l0_medium/``
or ``transcoder_all/layer_5_width_16k_l0_big_affine/``:

* ``params.safetensors`` (Gemma Scope 1's ``params.npz``, same keys, is read too):
  ``w_enc`` [d_in, width], ``w_dec`` [width, d_out], ``b_enc`` [width], ``b_dec``
  [d_out], ``threshold`` [width] (float32); affine-skip transcoders add
  ``affine_skip_connection`` stored [d_in, d_out], applied as ``x @ affine_skip_connection``.
* ``config.json``: ``hf_hook_point_in`` (and ``hf_hook_point_out`` for transcoders),
  ``architecture`` (``"jump_relu"``), ``width``, ``l0``, ``model_name``,
  ``affine_connection`` (transcoders). Where it is missing the site is inferred from the
  folder names (``resid_post``, ``attn_out``, ``mlp_out``, ``transcoder``; ``layer_N``).

Hook points, transformers module names -> gemmalens:

* ``model.layers.N.output`` -> ``blocks.N.hook_resid_post``;
* ``model.layers.N.post_feedforward_layernorm.output`` -> ``blocks.N.hook_mlp_out``;
* ``model.layers.N.self_attn.o_proj.input`` -> ``blocks.N.attn.hook_z`` (heads x head_dim
  flattened, head-major: the "attn_out" SAEs read o_proj's input);
* ``model.layers.N.post_attention_layernorm.output`` -> ``blocks.N.hook_attn_out``;
* transcoders: ``model.layers.N.pre_feedforward_layernorm.output`` -> input
  ``blocks.N.mlp.hook_in``, ``...post_feedforward_layernorm.output`` -> output
  ``blocks.N.hook_mlp_out``.

(``model.language_model.layers.N...`` as in the multimodal checkpoints is accepted too.)
Sources: sae-lens 6.54.12 on PyPI, ``sae_lens/loading/pretrained_sae_loaders.py``
(``gemma_3_sae_huggingface_loader``, ``get_gemma_3_config_from_hf``,
``_infer_gemma_3_raw_cfg_dict``: keys, the transposed skip matrix, the folder-name
fallback) and its tests ``tests/loading/test_pretrained_sae_loaders.py`` (the
``hf_hook_point_in`` / ``hf_hook_point_out`` values of the published configs, e.g.
``google/gemma-scope-2-4b-it`` ``transcoder_all/layer_5_width_16k_l0_big_affine``);
github.com/decoderesearch/SAELens.

**SAELens' own format** (``SAE.save_model``): ``cfg.json`` + ``sae_weights.safetensors``
with ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_out], ``b_enc``, ``b_dec``,
``threshold`` (JumpReLU; ``log_threshold`` is read too), ``W_skip`` [d_out, d_in] (skip
transcoders). ``cfg.json`` holds ``architecture`` (``jumprelu``, ``standard`` (ReLU),
``jumprelu_transcoder``, ``jumprelu_skip_transcoder``, ``transcoder``,
``skip_transcoder``), ``d_in``, ``d_sae``, ``apply_b_dec_to_input``,
``normalize_activations`` (only ``"none"`` is supported) and the hook name, in
``metadata.hook_name`` (SAELens >= 6) or top-level ``hook_name`` / ``hook_point`` (older),
``hook_name_out`` for transcoders. Hook names are TransformerLens names
(``blocks.N.hook_resid_post``, ``blocks.N.attn.hook_z``, transcoders
``blocks.N.ln2.hook_normalized`` / ``blocks.N.hook_mlp_in`` -> ``blocks.N.hook_mlp_out``)
or transformers module names as above.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.checkpoints.safetensors_files import CheckpointError
from gemmalens.lens import Model

FEATURES = "features"
_LAYER = re.compile(r"^blocks\.(\d+)\.")
_TL_TRANSCODER_IN = ("ln2.hook_normalized", "hook_mlp_in", "mlp.hook_in")


# ----------------------------------------------------------------------------- the dictionary


@dataclasses.dataclass(frozen=True, eq=False)
class SAE:
    """A JumpReLU sparse autoencoder or transcoder, as plain arrays.

    Attributes:
      w_enc: ``[d_in, d_sae]``; ``w_dec``: ``[d_sae, d_out]``; ``b_enc``, ``threshold``:
        ``[d_sae]``; ``b_dec``: ``[d_out]``.
      hook_in: the gemmalens hook point whose value it reads (a transcoder's is
        ``blocks.{i}.mlp.hook_in``, which exists once it is spliced).
      hook_out: the hook point whose value it reconstructs (an SAE's is ``hook_in``).
      w_skip: an affine-skip transcoder's ``[d_in, d_out]`` matrix (``x @ w_skip``), else None.
      apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding (some SAELens
        files; never Gemma Scope).
      source: the format read (``"Gemma Scope"`` or ``"SAELens"``) and ``config`` its
        configuration as read.
    """

    w_enc: np.ndarray
    w_dec: np.ndarray
    b_enc: np.ndarray
    b_dec: np.ndarray
    threshold: np.ndarray
    hook_in: str
    hook_out: str
    w_skip: np.ndarray | None = None
    apply_b_dec_to_input: bool = False
    source: str = ""
    config: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        d_in, d_sae = np.shape(self.w_enc)
        parts = {
            "w_dec": (np.shape(self.w_dec)[:1], (d_sae,)),
            "b_enc": (np.shape(self.b_enc), (d_sae,)),
            "threshold": (np.shape(self.threshold), (d_sae,)),
        }
        for name, (shape, want) in parts.items():
            if tuple(shape) != want:
                raise CheckpointError(
                    f"Width mismatch in {self.describe()}: w_enc {tuple(np.shape(self.w_enc))} "
                    f"has {d_sae} features but {name} has shape {tuple(np.shape(getattr(self, name)))}."
                    " The file is damaged or mixes two dictionaries; copy it again."
                )
        d_out = np.shape(self.w_dec)[1]
        if np.shape(self.b_dec) != (d_out,):
            raise CheckpointError(
                f"{self.describe()}: b_dec has shape {np.shape(self.b_dec)}, expected ({d_out},) "
                "to match w_dec's output width."
            )
        if self.w_skip is not None and np.shape(self.w_skip) != (d_in, d_out):
            raise CheckpointError(
                f"{self.describe()}: the skip matrix has shape {np.shape(self.w_skip)}, "
                f"expected ({d_in}, {d_out})."
            )
        if self.hook_in == self.hook_out and d_in != d_out:
            raise CheckpointError(
                f"{self.describe()} reads {d_in}-wide and writes {d_out}-wide vectors, but an "
                "SAE reconstructs its own input; only transcoders change width."
            )

    def describe(self) -> str:
        kind = "transcoder" if self.is_transcoder else "SAE"
        where = self.config.get("_path", "")
        return f"the {kind} at {self.hook_in}" + (f" ({where})" if where else "")

    def __repr__(self) -> str:
        kind = "transcoder" if self.is_transcoder else "SAE"
        skip = ", affine skip" if self.w_skip is not None else ""
        return (
            f"gemmalens.sae.SAE({kind} at {self.site}, d_in={self.d_in}, width={self.d_sae}{skip})"
        )

    @property
    def is_transcoder(self) -> bool:
        return self.hook_in != self.hook_out

    @property
    def d_in(self) -> int:
        return int(np.shape(self.w_enc)[0])

    @property
    def d_sae(self) -> int:
        return int(np.shape(self.w_enc)[1])

    @property
    def d_out(self) -> int:
        return int(np.shape(self.w_dec)[1])

    @property
    def layer(self) -> int:
        return int(_LAYER.match(self.hook_out).group(1))

    @property
    def site(self) -> str:
        """The prefix of its hook points: ``hook_in`` for an SAE, ``blocks.{i}.mlp`` for a
        transcoder (``<site>.sae.hook_features``)."""
        return f"blocks.{self.layer}.mlp" if self.is_transcoder else self.hook_in

    def hook_name(self, part: str) -> str:
        """``<site>.sae.hook_<part>`` for ``part`` in features / reconstruction / error."""
        return f"{self.site}.sae.hook_{part}"

    def encode(self, x: Any) -> jax.Array:
        """Feature activations ``[..., d_sae]`` of inputs ``[..., d_in]`` (``hook_z`` values
        ``[..., heads, head_dim]`` are flattened head-major)."""
        x = self._flat(x)
        if self.apply_b_dec_to_input:
            x = x - jnp.asarray(self.b_dec)
        pre = x @ jnp.asarray(self.w_enc) + jnp.asarray(self.b_enc)
        return jnp.where(pre > jnp.asarray(self.threshold), jnp.maximum(pre, 0), 0).astype(
            pre.dtype
        )

    def decode(self, features: Any, x: Any = None) -> jax.Array:
        """``features @ w_dec + b_dec`` (plus ``x @ w_skip`` for an affine-skip transcoder,
        which then needs the input ``x``)."""
        out = jnp.asarray(features) @ jnp.asarray(self.w_dec) + jnp.asarray(self.b_dec)
        if self.w_skip is not None:
            if x is None:
                raise ValueError(
                    "An affine-skip transcoder's output needs its input: decode(f, x)."
                )
            out = out + self._flat(x) @ jnp.asarray(self.w_skip)
        return out

    def __call__(self, x: Any) -> jax.Array:
        """The reconstruction of ``x`` (flat ``[..., d_out]``)."""
        return self.decode(self.encode(x), x)

    def _flat(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        if x.shape[-1] != self.d_in and x.ndim >= 2 and x.shape[-2] * x.shape[-1] == self.d_in:
            x = x.reshape(*x.shape[:-2], self.d_in)
        return x


# ----------------------------------------------------------------------------- reading files


def _hook_from_hf(name: str) -> tuple[int, str] | None:
    """``(layer, gemmalens hook)`` of a transformers module name, None when unknown."""
    match = re.fullmatch(
        r"(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.(.+)", name.strip()
    )
    if match is None:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    kinds = {
        "output": "hook_resid_post",
        "post_feedforward_layernorm.output": "hook_mlp_out",
        "post_attention_layernorm.output": "hook_attn_out",
        "self_attn.o_proj.input": "attn.hook_z",
        "pre_feedforward_layernorm.output": "mlp.hook_in",
        "mlp.input": "mlp.hook_in",
        "input": "hook_resid_pre",
    }
    kind = kinds.get(rest)
    return None if kind is None else (layer, f"blocks.{layer}.{kind}")


def _hook_from_tl(name: str) -> str | None:
    """A TransformerLens-style hook name (``blocks.3.hook_resid_post``) as gemmalens's."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name.strip())
    if match is None:
        return None
    layer, rest = match.group(1), match.group(2)
    if rest in _TL_TRANSCODER_IN:
        return f"blocks.{layer}.mlp.hook_in"
    known = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out")
    if rest in (*known, "hook_mlp_out", "attn.hook_z"):
        return f"blocks.{layer}.{rest}"
    return None


def _resolve_hook(name: str, where: str) -> str:
    resolved = _hook_from_tl(name)
    if resolved is None:
        found = _hook_from_hf(name)
        resolved = None if found is None else found[1]
    if resolved is None:
        raise CheckpointError(
            f"Unknown hook point {name!r} in {where}. gemmalens maps transformers module names "
            "(model.layers.N.output, model.layers.N.post_feedforward_layernorm.output, "
            "model.layers.N.self_attn.o_proj.input, model.layers.N.pre_feedforward_layernorm."
            "output) and TransformerLens names (blocks.N.hook_resid_post, blocks.N.hook_mlp_out, "
            "blocks.N.hook_attn_out, blocks.N.attn.hook_z, blocks.N.ln2.hook_normalized). Fix the "
            "hook name in the config file if it was edited."
        )
    return resolved


def _infer_from_folder(directory: pathlib.Path) -> dict[str, Any]:
    """Gemma Scope 2's folder-name convention when config.json is missing."""
    text = "/".join(directory.parts[-2:])
    layer = re.search(r"layer_(\d+)", directory.name)
    if layer is None:
        raise CheckpointError(
            f"{directory} has no config.json and its name has no layer_N: cannot tell which "
            "hook point it was trained on. Copy the release's config.json next to params."
        )
    i = int(layer.group(1))
    if "transcoder" in text:
        return {
            "hf_hook_point_in": f"model.layers.{i}.pre_feedforward_layernorm.output",
            "hf_hook_point_out": f"model.layers.{i}.post_feedforward_layernorm.output",
        }
    for key, point in (
        ("resid_post", "output"),
        ("attn_out", "self_attn.o_proj.input"),
        ("mlp_out", "post_feedforward_layernorm.output"),
    ):
        if key in text:
            return {"hf_hook_point_in": f"model.layers.{i}.{point}"}
    raise CheckpointError(
        f"{directory} has no config.json and its folder names say no site (resid_post, "
        "attn_out, mlp_out, transcoder): copy the release's config.json next to params."
    )


def _read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: np.asarray(data[k]) for k in data.files}
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path} cannot be read ({error}); copy it again.") from error
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, TypeError) as error:
        raise CheckpointError(
            f"{path} cannot be read ({error}): truncated, not safetensors, or a dtype NumPy "
            "lacks (store float32)."
        ) from error


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}).") from error


def _need(tensors: dict[str, np.ndarray], key: str, path: pathlib.Path) -> np.ndarray:
    if key not in tensors:
        raise CheckpointError(
            f"{path} has no tensor {key!r} (it has {sorted(tensors)}): not a JumpReLU SAE file "
            "of this format."
        )
    return np.asarray(tensors[key], np.float32)


def _load_gemma_scope(directory: pathlib.Path, params: pathlib.Path) -> SAE:
    config_path = directory / "config.json"
    config = _read_json(config_path) if config_path.is_file() else _infer_from_folder(directory)
    architecture = config.get("architecture", "jump_relu")
    if architecture != "jump_relu":
        raise CheckpointError(
            f"{config_path} says architecture {architecture!r}; gemmalens reads JumpReLU "
            "dictionaries ('jump_relu')."
        )
    tensors = _read_tensors(params)
    if "hf_hook_point_in" not in config:
        raise CheckpointError(f"{config_path} has no 'hf_hook_point_in': which hook point?")
    hook_in = _resolve_hook(config["hf_hook_point_in"], str(config_path))
    hook_out = hook_in
    if config.get("hf_hook_point_out") not in (None, config["hf_hook_point_in"]):
        hook_out = _resolve_hook(config["hf_hook_point_out"], str(config_path))
    w_skip = tensors.get("affine_skip_connection")
    sae = _checked(
        SAE(
            w_enc=_need(tensors, "w_enc", params),
            w_dec=_need(tensors, "w_dec", params),
            b_enc=_need(tensors, "b_enc", params),
            b_dec=_need(tensors, "b_dec", params),
            threshold=_need(tensors, "threshold", params),
            hook_in=hook_in,
            hook_out=hook_out,
            w_skip=None if w_skip is None else np.asarray(w_skip, np.float32),
            source="Gemma Scope",
            config={**config, "_path": str(directory)},
        )
    )
    width = config.get("width")
    if width is not None and int(width) != sae.d_sae:
        raise CheckpointError(
            f"Width mismatch: {config_path} says width {width} but {params.name} holds "
            f"{sae.d_sae} features. The two files come from different dictionaries; copy the "
            "folder again as one piece."
        )
    return sae


_SAELENS_ARCHITECTURES = {
    "jumprelu",
    "standard",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
    "transcoder",
    "skip_transcoder",
}


def _load_saelens(directory: pathlib.Path) -> SAE:
    cfg_path, weights = directory / "cfg.json", directory / "sae_weights.safetensors"
    config = _read_json(cfg_path)
    architecture = config.get("architecture", "standard")
    if architecture not in _SAELENS_ARCHITECTURES:
        raise CheckpointError(
            f"{cfg_path}: architecture {architecture!r} is not supported; gemmalens reads "
            f"{sorted(_SAELENS_ARCHITECTURES)} (JumpReLU and ReLU dictionaries)."
        )
    if config.get("normalize_activations") not in (None, "none"):
        raise CheckpointError(
            f"{cfg_path}: normalize_activations={config['normalize_activations']!r} is not "
            "supported; fold the normalisation into the weights with SAELens "
            "(sae.fold_activation_norm_scaling_factor) and save again."
        )
    metadata = config.get("metadata") or {}
    hook = metadata.get("hook_name") or config.get("hook_name") or config.get("hook_point")
    if hook is None:
        raise CheckpointError(f"{cfg_path} names no hook point (metadata.hook_name).")
    if (metadata.get("hook_head_index") or config.get("hook_head_index")) is not None:
        raise CheckpointError(
            f"{cfg_path}: SAEs on a single head (hook_head_index) are not supported."
        )
    hook_in = _resolve_hook(hook, str(cfg_path))
    hook_out = hook_in
    out = metadata.get("hook_name_out") or config.get("hook_name_out")
    if "transcoder" in architecture:
        if out is None:
            raise CheckpointError(f"{cfg_path}: a transcoder config needs hook_name_out.")
        hook_out = _resolve_hook(out, str(cfg_path))
    tensors = _read_tensors(weights)
    if "threshold" in tensors:
        threshold = np.asarray(tensors["threshold"], np.float32)
    elif "log_threshold" in tensors:
        threshold = np.exp(np.asarray(tensors["log_threshold"], np.float32))
    elif architecture in ("standard", "transcoder", "skip_transcoder"):
        threshold = np.zeros(np.shape(tensors["b_enc"]), np.float32)  # ReLU
    else:
        raise CheckpointError(f"{weights} has no 'threshold' for its JumpReLU.")
    w_skip = tensors.get("W_skip")
    return _checked(
        SAE(
            w_enc=_need(tensors, "W_enc", weights),
            w_dec=_need(tensors, "W_dec", weights),
            b_enc=_need(tensors, "b_enc", weights),
            b_dec=_need(tensors, "b_dec", weights),
            threshold=threshold,
            hook_in=hook_in,
            hook_out=hook_out,
            w_skip=None if w_skip is None else np.asarray(w_skip, np.float32).T,
            apply_b_dec_to_input=bool(config.get("apply_b_dec_to_input", False)),
            source="SAELens",
            config={**config, "_path": str(directory)},
        )
    )


def _checked(sae: SAE) -> SAE:
    """Transcoders must read an MLP input and write that block's MLP output."""
    if not sae.is_transcoder:
        if sae.hook_in.endswith("mlp.hook_in"):
            raise CheckpointError(
                f"{sae.describe()} reads the MLP input but names no output hook: a transcoder "
                "needs hf_hook_point_out / hook_name_out (blocks.N.hook_mlp_out)."
            )
        return sae
    layer_in, layer_out = _LAYER.match(sae.hook_in), _LAYER.match(sae.hook_out)
    if (
        not sae.hook_in.endswith(".mlp.hook_in")
        or not sae.hook_out.endswith(".hook_mlp_out")
        or layer_in.group(1) != layer_out.group(1)
    ):
        raise CheckpointError(
            f"Unknown hook point pair {sae.hook_in} -> {sae.hook_out}: gemmalens splices "
            "transcoders that read one block's MLP input and write the same block's MLP output."
        )
    return sae


def load(path: str | pathlib.Path, model: Model | None = None) -> SAE:
    """Reads one SAE or transcoder directory (Gemma Scope 2 layout or SAELens' saved
    format; see the module docstring) and, given ``model``, checks that it fits it
    (`check_fits`)."""
    directory = pathlib.Path(path).expanduser()
    if directory.is_file():
        directory = directory.parent
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory.")
    if (directory / "cfg.json").is_file() and (directory / "sae_weights.safetensors").is_file():
        sae = _load_saelens(directory)
    elif (directory / "params.safetensors").is_file():
        sae = _load_gemma_scope(directory, directory / "params.safetensors")
    elif (directory / "params.npz").is_file():
        sae = _load_gemma_scope(directory, directory / "params.npz")
    else:
        present = sorted(p.name for p in directory.iterdir())[:10]
        raise CheckpointError(
            f"{directory} holds no SAE: expected params.safetensors (+ config.json, Gemma Scope "
            f"2) or cfg.json + sae_weights.safetensors (SAELens); it has {present}."
        )
    if model is not None:
        check_fits(sae, model)
    return sae


# ----------------------------------------------------------------------------- fitting a model


def z_shape(m: Model, hook: str) -> tuple[int, ...] | None:
    """``(heads, head_dim)`` of the ``attn.hook_z`` named ``hook``, read off that layer's own
    output projection (Gemma 4's full-attention layers have a wider head_dim than its
    sliding ones); None when the model has no such hook."""
    from gemmalens.layers.attention import Attention

    found = (
        pz.select(m.model)
        .at_instances_of(Attention)
        .where(lambda attention: attention.hook_z.name == hook)
        .get_sequence()
    )
    if not found:
        return None
    output = found[0].output
    shape = output.weights.value.named_shape
    return tuple(int(shape[axis]) for axis in output.in_axis_names)


def _width_at(m: Model, hook: str) -> int:
    if hook.endswith("attn.hook_z"):
        shape = z_shape(m, hook)
        return -1 if shape is None else int(np.prod(shape))  # -1: check_fits names the hook
    return int(m.config.hidden_size)


def check_fits(sae: SAE, m: Model) -> None:
    """Raises `CheckpointError` when ``sae`` cannot run on ``m``: its layer is out of range,
    its hook point is not in the model, or its input / output width is not the model's."""
    if not hasattr(m.config, "num_hidden_layers"):
        raise CheckpointError(
            f"{sae.describe()} cannot be spliced into a {type(m.config).__name__} model: "
            "gemmalens splices dictionaries into decoder-only models (Gemma 3, Gemma 3n, "
            "Gemma 4), whose hook names (blocks.N...) the files use. Encoder-decoder models "
            "(T5Gemma 2) have two stacks and no published dictionaries; run your own "
            "encoding on captured values instead (sae.encode(cache['decoder.blocks.N...']))."
        )
    layers = m.config.num_hidden_layers
    if sae.layer >= layers:
        raise CheckpointError(
            f"Layer out of range: {sae.describe()} is for layer {sae.layer}, but this model has "
            f"{layers} layers (0-{layers - 1}). It was trained on a deeper model "
            f"({sae.config.get('model_name', 'see its config')}); load one for this model."
        )
    names = set(m.hook_names)
    for hook in (sae.hook_out,) if sae.is_transcoder else (sae.hook_in,):
        if hook not in names:
            close = difflib.get_close_matches(hook, sorted(names), n=3, cutoff=0.5)
            raise CheckpointError(
                f"Unknown hook point: this model has no {hook!r} for {sae.describe()}."
                + (f" Close: {', '.join(close)}." if close else "")
            )
    for what, hook, width in (
        ("reads", sae.hook_in, sae.d_in),
        ("writes", sae.hook_out, sae.d_out),
    ):
        want = _width_at(m, hook)
        if width != want:
            raise CheckpointError(
                f"d_model mismatch: {sae.describe()} {what} {width}-wide vectors, but {hook} in "
                f"this model is {want} wide (d_model={m.config.hidden_size}). The file was "
                f"trained on another model ({sae.config.get('model_name', 'see its config')})."
            )
