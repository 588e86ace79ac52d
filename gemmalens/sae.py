"""Sparse autoencoders and transcoders: Gemma Scope 2 files, splicing, feature tools.

A JumpReLU sparse autoencoder (SAE) reads a value ``x`` at a hook point and writes it as
a sparse sum of decoder directions::

    pre = x @ w_enc + b_enc                     # [..., features]
    f = where(pre > threshold, relu(pre), 0)    # JumpReLU: hook_features
    x_hat = f @ w_dec + b_dec                   # hook_reconstruction
    error = x - x_hat                           # hook_error

A transcoder reads the MLP's input and reconstructs the MLP's output instead (an
*affine-skip* transcoder adds ``x @ w_skip`` to ``x_hat``). `splice` places them in a
model as visible Penzai layers; the reconstruction error is added back by default, so the
logits do not change until a feature is edited::

    m = gl.teaching_model("gemma3")
    sae = gl.sae.load("gemma-scope-2-270m-pt/resid_post/layer_3_width_16k_l0_small", m)
    ms = gl.sae.splice(m, [sae])                      # m itself is unchanged
    logits, cache = ms.run_with_cache(tokens, names="*.sae.*")
    cache["blocks.3.hook_resid_post.sae.hook_features"]          # [batch, seq, features]
    ms.run_with_hooks(tokens, gl.sae.ablate(sae, [12, 40]))      # minus their decoder terms
    m.run_with_hooks(tokens, gl.sae.steer(sae, 12, 8.0))         # + 8 * w_dec[12]
    patching.sweep(ms, clean, corrupted, metric, site="features")   # [sae, feature]
    gl.sae.top_activations(ms, sae, [12, 40], corpus_tokens, k=20)
    gl.sae.logit_effects(m, sae, 12)                              # [vocab]
    gl.sae.attribute(ms, tokens, metric)                          # gradient x activation

Hook points of a spliced dictionary (``site`` below is `SAE.site`):

* ``<site>.sae.hook_features``: JumpReLU activations, ``[batch, seq, features]``;
* ``<site>.sae.hook_reconstruction``: ``x_hat`` from the (possibly edited) features;
* ``<site>.sae.hook_error``: target minus the reconstruction from the *unedited* features
  (as SAELens' ``use_error_term``), so editing a feature changes the output by exactly
  its change times its decoder row;
* transcoders also get ``blocks.{i}.mlp.hook_in``, the MLP input after the
  pre-feedforward norm (gain included: what the gate and up projections read).

An SAE's site is the gemmalens hook it reads (``blocks.3.hook_resid_post``,
``blocks.3.hook_mlp_out``, ``blocks.3.attn.hook_z``); a transcoder's is ``blocks.3.mlp``.

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
import functools
import json
import pathlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.checkpoints.safetensors_files import CheckpointError
from gemmalens.layers.attention import Attention
from gemmalens.layers.embeddings import EmbedTokens, TiedUnembed
from gemmalens.layers.hooks import HookFn, HookPoint
from gemmalens.layers.norms import RMSNorm
from gemmalens.lens import Model

__all__ = [
    "SAE",
    "FeatureAttribution",
    "SAESplice",
    "SparseCoder",
    "TopActivations",
    "TranscoderSplice",
    "ablate",
    "attribute",
    "check_fits",
    "load",
    "logit_effects",
    "splice",
    "steer",
    "top_activations",
]

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


def _width_at(m: Model, hook: str) -> int:
    cfg = m.config
    if hook.endswith("attn.hook_z"):
        return int(cfg.num_attention_heads * cfg.head_dim)
    return int(cfg.hidden_size)


def check_fits(sae: SAE, m: Model) -> None:
    """Raises `CheckpointError` when ``sae`` cannot run on ``m``: its layer is out of range,
    its hook point is not in the model, or its input / output width is not the model's."""
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


# ----------------------------------------------------------------------------- Penzai layers


@pz.pytree_dataclass
class JumpReLU(pz.nn.Layer):
    """``where(x > threshold, relu(x), 0)`` per feature."""

    threshold: pz.nn.ParameterLike[pz.nx.NamedArray]

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        def jump(p, t):
            return jnp.where(p > t, jnp.maximum(p, 0), 0).astype(p.dtype)

        return pz.nx.nmap(jump)(x, self.threshold.value)


@pz.pytree_dataclass
class SkipLinear(pz.nn.Layer):
    """An affine-skip transcoder's ``x @ w_skip`` over the ``embedding`` axis."""

    weights: pz.nn.ParameterLike[pz.nx.NamedArray]  # [skip_in, embedding]

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        w = self.weights.value.untag("skip_in", "embedding")
        return pz.nx.nmap(jnp.dot)(x.untag("embedding"), w).tag("embedding")


@pz.pytree_dataclass
class SparseCoder(pz.nn.Layer):
    """An SAE or transcoder as layers: ``encoder`` (shift, projection, bias, JumpReLU) ->
    ``hook_features`` -> ``decoder`` (+ ``skip``) -> ``hook_reconstruction``; the error
    (target minus the reconstruction of the unedited features) passes ``hook_error`` and is
    added back when ``include_error``: then the output is ``target`` exactly until a hook
    edits the features, the reconstruction or the error."""

    encoder: pz.nn.Sequential
    hook_features: HookPoint
    decoder: pz.nn.Sequential
    skip: SkipLinear | None
    hook_reconstruction: HookPoint
    hook_error: HookPoint
    include_error: bool = dataclasses.field(metadata={"pytree_node": False})

    def reconstruct(
        self, x: pz.nx.NamedArray, target: pz.nx.NamedArray, **side_inputs: Any
    ) -> pz.nx.NamedArray:
        clean = self.encoder(x, **side_inputs)
        features = self.hook_features(clean, **side_inputs)
        recon = self.decoder(features, **side_inputs)
        clean_recon = self.decoder(clean, **side_inputs)
        if self.skip is not None:
            skipped = self.skip(x, **side_inputs)
            recon, clean_recon = recon + skipped, clean_recon + skipped
        hooked_recon = self.hook_reconstruction(recon, **side_inputs)
        error = target - clean_recon
        hooked_error = self.hook_error(error, **side_inputs)
        if not self.include_error:
            return hooked_recon
        # reconstruction + error, written so that without edits it is ``target`` exactly
        # (each difference is then 0) and with edits it moves by exactly what they change.
        return target + (hooked_recon - clean_recon) + (hooked_error - error)

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return self.reconstruct(x, x, **side_inputs)

    def treescope_color(self) -> str:
        return "#8ecae6"


@pz.pytree_dataclass
class SAESplice(pz.nn.Layer):
    """A hook point followed by the SAE that rewrites its value."""

    hook: HookPoint
    sae: SparseCoder

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return self.sae(self.hook(x, **side_inputs), **side_inputs)


@pz.pytree_dataclass
class TranscoderSplice(pz.nn.Layer):
    """The MLP (and its post-norm) beside a transcoder that reads the same input: the
    output is the transcoder's reconstruction plus the MLP's error (``mlp(x) - x_hat``)."""

    hook_in: HookPoint
    mlp: pz.nn.Sequential
    transcoder: SparseCoder

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        x = self.hook_in(x, **side_inputs)
        target = self.mlp(x, **side_inputs)
        return self.transcoder.reconstruct(x, target, **side_inputs)


def _param(label: str, array: np.ndarray, axes: tuple[str, ...], dtype: Any) -> pz.Parameter:
    return pz.Parameter(value=pz.nx.wrap(jnp.asarray(array, dtype)).tag(*axes), label=label)


def _coder(sae: SAE, m: Model, dtype: Any, include_error: bool) -> SparseCoder:
    z = sae.hook_in.endswith("attn.hook_z")
    heads, head_dim = m.config.num_attention_heads, m.config.head_dim
    in_axes = ("heads", "head_dim") if z else ("embedding",)
    out_axes = in_axes if not sae.is_transcoder else ("embedding",)
    w_enc = sae.w_enc.reshape(heads, head_dim, sae.d_sae) if z else sae.w_enc
    w_dec = (
        sae.w_dec.reshape(sae.d_sae, heads, head_dim) if z and not sae.is_transcoder else sae.w_dec
    )
    b_dec = sae.b_dec.reshape(heads, head_dim) if z and not sae.is_transcoder else sae.b_dec
    prefix = f"{sae.site}.sae"
    encoder = []
    if sae.apply_b_dec_to_input:
        encoder.append(
            pz.nn.AddBias(
                bias=_param(f"{prefix}.b_dec_in", -b_dec, in_axes, dtype), new_axis_names=()
            )
        )
    encoder += [
        pz.nn.Linear(
            weights=_param(f"{prefix}.w_enc", w_enc, (*in_axes, FEATURES), dtype),
            in_axis_names=in_axes,
            out_axis_names=(FEATURES,),
        ),
        pz.nn.AddBias(
            bias=_param(f"{prefix}.b_enc", sae.b_enc, (FEATURES,), dtype), new_axis_names=()
        ),
        JumpReLU(threshold=_param(f"{prefix}.threshold", sae.threshold, (FEATURES,), dtype)),
    ]
    decoder = [
        pz.nn.Linear(
            weights=_param(f"{prefix}.w_dec", w_dec, (FEATURES, *out_axes), dtype),
            in_axis_names=(FEATURES,),
            out_axis_names=out_axes,
        ),
        pz.nn.AddBias(bias=_param(f"{prefix}.b_dec", b_dec, out_axes, dtype), new_axis_names=()),
    ]
    skip = None
    if sae.w_skip is not None:
        skip = SkipLinear(
            weights=_param(f"{prefix}.w_skip", sae.w_skip, ("skip_in", "embedding"), dtype)
        )
    value_axes = ("batch", "seq", *out_axes)
    return SparseCoder(
        encoder=pz.nn.Sequential(encoder),
        hook_features=HookPoint(f"{prefix}.hook_features", ("batch", "seq", FEATURES)),
        decoder=pz.nn.Sequential(decoder),
        skip=skip,
        hook_reconstruction=HookPoint(f"{prefix}.hook_reconstruction", value_axes),
        hook_error=HookPoint(f"{prefix}.hook_error", value_axes),
        include_error=include_error,
    )


def _hook_of(layer: Any) -> str | None:
    if isinstance(layer, HookPoint):
        return layer.name
    if isinstance(layer, SAESplice):
        return layer.hook.name
    return None


def _splice_transcoder(tree: Any, sae: SAE, coder: SparseCoder) -> Any:
    out_name = sae.hook_out

    def is_branch(layer: Any) -> bool:
        return (
            isinstance(layer, pz.nn.Sequential)
            and bool(layer.sublayers)
            and _hook_of(layer.sublayers[-1]) == out_name
        )

    branches = pz.select(tree).at_subtrees_where(is_branch)
    found = branches.get_sequence()
    if len(found) != 1 or not isinstance(found[0].sublayers[0], RMSNorm):
        raise CheckpointError(
            f"Cannot splice {sae.describe()}: transcoders need the Gemma 3 MLP branch (pre-norm, "
            f"MLP, post-norm, {out_name}) and this model's differs."
        )

    def rewrite(branch: pz.nn.Sequential) -> pz.nn.Sequential:
        pre, *mlp, hook = branch.sublayers
        splice_layer = TranscoderSplice(
            hook_in=HookPoint(sae.hook_in, ("batch", "seq", "embedding")),
            mlp=pz.nn.Sequential(mlp),
            transcoder=coder,
        )
        return pz.nn.Sequential([pre, splice_layer, hook])

    return branches.apply(rewrite)


def splice(m: Model, saes: SAE | Sequence[SAE], include_error: bool = True) -> Model:
    """A new model with each SAE / transcoder spliced in at its hook point (``m`` is left
    as it was).

    Each SAE follows its hook point (hooks installed there run before it); a transcoder
    sits beside the MLP and its post-norm, reading the MLP input through the new hook point
    ``blocks.{i}.mlp.hook_in``. With ``include_error`` (default) the spliced value is the
    reconstruction plus the error, equal to the original up to float rounding, so logits
    only change when features are edited; without it the model runs on the reconstructions.
    Splicing a spliced model adds to it. The result's ``saes`` maps each site to its SAE.
    """
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    present = dict(getattr(m, "saes", {}) or {})
    for sae in saes:
        if not isinstance(sae, SAE):
            raise TypeError(
                f"splice takes gemmalens.sae.SAE objects (from gl.sae.load), got {sae!r}."
            )
        check_fits(sae, m)
        if sae.site in present:
            raise ValueError(f"Two dictionaries at {sae.site}: splice one per site.")
        present[sae.site] = sae
    tables = pz.select(m.model).at_instances_of(EmbedTokens).get_sequence()
    dtype = tables[0].table.value.dtype if tables else jnp.float32
    tree = m.model
    # Transcoders first: they look for the MLP branch ending in the bare hook_mlp_out.
    for sae in sorted(saes, key=lambda s: not s.is_transcoder):
        coder = _coder(sae, m, dtype, include_error)
        if sae.is_transcoder:
            tree = _splice_transcoder(tree, sae, coder)
        else:
            tree = (
                pz.select(tree)
                .at_instances_of(HookPoint)
                .where(lambda hp, name=sae.hook_in: hp.name == name)
                .apply(lambda hp, coder=coder: SAESplice(hook=hp, sae=coder))
            )
    out = type(m)(tree, m.config, m.tokenizer)
    out.checkpoint_format = m.checkpoint_format
    out.adapter_config = m.adapter_config
    out.saes = present
    return out


def _spliced(m: Model, sae: SAE | str | None = None) -> list[SAE]:
    saes = getattr(m, "saes", None) or {}
    if not saes:
        raise ValueError("This model has no spliced SAEs: use gl.sae.splice(m, [sae]) first.")
    if sae is None:
        return list(saes.values())
    site = sae.site if isinstance(sae, SAE) else sae
    if site not in saes:
        raise ValueError(f"No SAE is spliced at {site!r}; this model has them at {sorted(saes)}.")
    return [saes[site]]


# ----------------------------------------------------------------------------- interventions


def _indices(features: int | Iterable[int]) -> np.ndarray:
    return np.asarray(
        [features] if isinstance(features, (int, np.integer)) else list(features), np.int32
    )


def ablate(sae: SAE, features: int | Iterable[int], value: float = 0.0) -> dict[str, HookFn]:
    """Hooks for `Model.run_with_hooks` on a spliced model: set ``features`` to ``value``
    (0: zero-ablation) at every position. With the error term, the site's value then drops
    by ``(activation - value) * w_dec[feature]`` for each of them."""
    index = _indices(features)

    def fn(f: jax.Array, name: str) -> jax.Array:
        return f.at[..., index].set(jnp.asarray(value, f.dtype))

    return {sae.hook_name("features"): fn}


def steer(
    sae: SAE, feature: int, value: float, positions: int | Sequence[int] | None = None
) -> dict[str, HookFn]:
    """Hooks that add ``value * w_dec[feature]`` to the value the dictionary reconstructs
    (``sae.hook_out``), at every position or the given ones. Works with or without
    splicing (on a spliced model the SAE then sees the steered value)."""
    direction = np.asarray(sae.w_dec[int(feature)], np.float32)
    chosen = None if positions is None else _indices(positions)

    def fn(x: jax.Array, name: str) -> jax.Array:
        add = (jnp.asarray(direction) * value).reshape(x.shape[2:]).astype(x.dtype)
        if chosen is None:
            return x + add
        return x.at[:, chosen].add(add)

    return {sae.hook_out: fn}


# ----------------------------------------------------------------------------- feature tools


@dataclasses.dataclass(frozen=True)
class TopActivations:
    """The ``k`` strongest activations of each feature over a corpus.

    ``values``, ``sequence`` (corpus row) and ``position`` are ``[feature, k]``, strongest
    first; entries past the number of real tokens are ``-inf`` (sequence and position -1).
    """

    features: np.ndarray
    values: np.ndarray
    sequence: np.ndarray
    position: np.ndarray

    def examples(self, feature: int) -> list[tuple[int, int, float]]:
        """``(sequence, position, activation)`` of one feature, strongest first."""
        row = int(np.flatnonzero(self.features == feature)[0])
        return [
            (int(s), int(p), float(v))
            for s, p, v in zip(self.sequence[row], self.position[row], self.values[row])
            if s >= 0
        ]


@functools.partial(jax.jit, static_argnames=("treedef", "forward", "k"))
def _batch_top(leaves, inputs, valid, features, *, treedef, forward, k):
    model, state = jax.tree.unflatten(treedef, leaves)
    _, values = forward(model, state, *inputs)
    acts = values[0].value[..., features].astype(jnp.float32)  # [batch, seq, F]
    acts = jnp.where(valid[..., None], acts, -jnp.inf)
    flat = acts.reshape(-1, acts.shape[-1]).T
    return jax.lax.top_k(flat, k)


def top_activations(
    m: Model,
    sae: SAE | str,
    features: int | Iterable[int],
    corpus_tokens: Any,
    k: int = 10,
    batch_size: int = 8,
    show_progress: bool = True,
) -> TopActivations:
    """The top-``k`` (sequence, position) activations of ``features`` of a spliced SAE
    (or its site) over ``corpus_tokens`` ``[n, seq]`` (pad ids mark padding), run in
    compiled batches of ``batch_size`` rows with a progress bar."""
    (sae,) = _spliced(m, sae)
    index = jnp.asarray(_indices(features))
    tokens = np.asarray(corpus_tokens)
    if tokens.ndim != 2:
        raise ValueError(f"corpus_tokens must be [n, seq] ids; got shape {tokens.shape}.")
    n, seq = tokens.shape
    unbound, state = m._capture_plan([sae.hook_name("features")])
    treedef, leaves = m._flat_plan(unbound, state)
    kk = min(k, batch_size * seq)
    best_v = np.full((len(index), 0), -np.inf, np.float32)
    best_s = np.zeros((len(index), 0), np.int64)
    best_p = np.zeros((len(index), 0), np.int64)
    starts = range(0, n, batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"top activations at {sae.site}", unit="batch")
    for start in starts:
        rows = tokens[start : start + batch_size]
        real = len(rows)
        if real < batch_size:  # same shapes every batch: repeat a row, never count it
            rows = np.concatenate([rows, np.repeat(rows[:1], batch_size - real, 0)])
        inputs = m._prepare(rows, None, {})
        valid = rows != m.config.pad_token_id
        valid[real:] = False
        vals, idx = _batch_top(
            leaves, inputs, jnp.asarray(valid), index, treedef=treedef, forward=m.captured_run, k=kk
        )
        vals, idx = np.asarray(vals), np.asarray(idx)
        best_v = np.concatenate([best_v, vals], 1)
        best_s = np.concatenate([best_s, start + idx // seq], 1)
        best_p = np.concatenate([best_p, idx % seq], 1)
        order = np.argsort(-best_v, axis=1, kind="stable")[:, :k]
        best_v, best_s, best_p = (np.take_along_axis(a, order, 1) for a in (best_v, best_s, best_p))
    missing = ~np.isfinite(best_v)
    best_s[missing], best_p[missing] = -1, -1
    return TopActivations(np.asarray(index), best_v, best_s, best_p)


def _block_attention_output(m: Model, layer: int) -> tuple[pz.nn.Linear, RMSNorm | None]:
    blocks = [
        b
        for b in pz.select(m.model).at_instances_of(pz.nn.NamedGroup).get_sequence()
        if b.name == f"blocks.{layer}"
    ]
    for branch in pz.select(blocks[:1]).at_instances_of(pz.nn.Sequential).get_sequence():
        parts = branch.sublayers
        for i, part in enumerate(parts):
            if isinstance(part, Attention):
                post = next((p for p in parts[i + 1 :] if isinstance(p, RMSNorm)), None)
                return part.output, post
    raise NotImplementedError(f"Could not find block {layer}'s attention output projection.")


def _gain(norm: RMSNorm | None) -> jax.Array | float:
    if norm is None or norm.form == "none":
        return 1.0
    scale = norm.scale.value.unwrap("embedding").astype(jnp.float32)
    return 1.0 + scale if norm.form == "one_plus" else scale


def logit_effects(
    m: Model, sae: SAE, features: int | Iterable[int] | None = None, final_norm_gain: bool = True
) -> jax.Array:
    """Direct logit effects: each feature's decoder row, as a residual-stream direction,
    through the unembedding, ``[feature, vocab]`` (``[vocab]`` for one int; all features
    when None).

    The final RMSNorm's division by the token's rms is left out (it depends on the token:
    this is the effect per unit of normalised residual, as TransformerLens reads ``W_U``
    with the norm folded in); its gain is applied unless ``final_norm_gain=False``. For
    ``attn.hook_z`` SAEs the row goes through the block's output projection and the gain of
    its post-attention norm first (that norm's rms division likewise left out). With
    final-logit soft-capping (Gemma 2 style ``cap * tanh(logit / cap)``) these are
    pre-cap logits: the cap keeps their order but squeezes large ones.
    """
    single = isinstance(features, (int, np.integer))
    chosen = np.arange(sae.d_sae) if features is None else _indices(features)
    rows = jnp.asarray(sae.w_dec[chosen], jnp.float32)  # [F, d_out]
    if sae.hook_out.endswith("attn.hook_z"):
        output, post = _block_attention_output(m, sae.layer)
        w = output.weights.value.unwrap("embedding", "heads", "head_dim").astype(jnp.float32)
        rows = (rows @ w.reshape(w.shape[0], -1).T) * _gain(post)
    if final_norm_gain:
        rows = rows * _gain(
            pz.select(m.model.final_norm).at_instances_of(RMSNorm).get_sequence()[0]
        )
    (unembed,) = pz.select(m.model.unembed).at_instances_of(TiedUnembed).get_sequence()[:1]
    table = unembed.table.value.unwrap("vocab", "embedding").astype(jnp.float32)
    effects = rows @ table.T
    return effects[0] if single else effects


@dataclasses.dataclass(frozen=True)
class FeatureAttribution:
    """Gradient x activation attribution of a metric to the features of spliced SAEs.

    ``features[site]`` is ``[d_sae]``: ``sum over batch and positions of activation *
    d metric / d activation``; ``error[site]`` the same for the error term (its dot product
    with the gradient). ``metric`` is the metric's value on the run.
    """

    metric: float
    features: dict[str, np.ndarray]
    error: dict[str, float]

    def error_share(self, site: str) -> float:
        """``|error| / (sum |features| + |error|)`` at ``site``: how much of the first-order
        attribution the SAE does not explain."""
        e = abs(self.error[site])
        total = float(np.abs(self.features[site]).sum()) + e
        return e / total if total else 0.0


def attribute(
    m: Model,
    tokens: Any,
    metric: Callable[[jax.Array], jax.Array],
    saes: SAE | str | None = None,
    attention_mask: Any = None,
) -> FeatureAttribution:
    """Attributes ``metric(logits)`` (a scalar jax function) to the features of the spliced
    SAEs (all, or one given by SAE or site) and to their error terms, by gradient x
    activation in one forward and backward pass."""
    from gemmalens import patching

    chosen = _spliced(m, saes)
    names = tuple(n for s in chosen for n in (s.hook_name("features"), s.hook_name("error")))
    inputs = m._prepare(tokens, attention_mask, {})
    _, values = m._captured(inputs, list(names))
    zeros = [jnp.zeros_like(values[n]) for n in names]
    value, grads = patching._metric_and_grads(
        m._frozen, zeros, inputs, names=names, metric=metric, forward=m.logits_of
    )
    features, error = {}, {}
    for i, sae in enumerate(chosen):
        f_name, e_name = names[2 * i], names[2 * i + 1]
        f_attr = (values[f_name].astype(jnp.float32) * grads[2 * i].astype(jnp.float32)).sum((0, 1))
        e_attr = (values[e_name].astype(jnp.float32) * grads[2 * i + 1].astype(jnp.float32)).sum()
        features[sae.site] = np.asarray(f_attr)
        error[sae.site] = float(e_attr)
    return FeatureAttribution(float(value), features, error)
