"""Sparse autoencoders and transcoders as Penzai layers, and splicing them into a model."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.checkpoints.safetensors_files import CheckpointError
from gemmalens.layers.embeddings import EmbedTokens
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.norms import RMSNorm
from gemmalens.lens import Model
from gemmalens.sae.files import FEATURES, SAE, check_fits, z_shape

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
    heads, head_dim = z_shape(m, sae.hook_in) if z else (0, 0)
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
    return m.with_tree(tree, saes=present)


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
