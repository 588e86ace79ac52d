"""RMS normalisation in the two forms the Gemma family uses, and SigLIP's LayerNorm."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from penzai import pz

from gemmalens.layers.direct import plain
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.params import ParamBuilder

ScaleForm = Literal["one_plus", "plain", "none"]


@pz.pytree_dataclass
class RMSNorm(pz.nn.Layer):
    """Root-mean-square normalisation over one named axis, computed in float32.

    ``y = x * rsqrt(mean(x**2) + eps) * s`` where ``s`` depends on ``form``:

    * ``"one_plus"``: ``s = 1 + w`` (Gemma 3, T5Gemma 2; checkpoints store ``w`` near 0),
    * ``"plain"``: ``s = w`` (Gemma 3n, Gemma 4; ``w`` near 1),
    * ``"none"``: no weight (Gemma 3n / Gemma 4 value norm, router norm).

    The scale multiplies in float32 *before* the cast back to the input dtype, as
    transformers does; casting first would lose precision in bfloat16.

    ``hook_scale`` (optional, e.g. ``ln_final.hook_scale``) names the divisor
    ``sqrt(mean(x**2) + eps)`` as a float32 ``[batch, pos, 1]`` value, so analysis can
    reuse a run's normalisation scale (direct logit attribution) or freeze it by patching.
    """

    scale: pz.nn.ParameterLike[pz.nx.NamedArray] | None
    axis: str = dataclasses.field(metadata={"pytree_node": False})
    eps: float = dataclasses.field(metadata={"pytree_node": False})
    form: ScaleForm = dataclasses.field(metadata={"pytree_node": False})
    hook_scale: HookPoint | None = None

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        dtype = x.dtype
        if self.hook_scale is not None:
            return self._with_scale_hook(x, **side_inputs).astype(dtype)

        fast = self._on_the_data(x)
        if fast is not None:
            return fast

        y = pz.nx.nmap(self._normalise)(x.untag(self.axis)).tag(self.axis)
        if self.form == "one_plus":
            y = y * (1.0 + self.scale.value.astype(jnp.float32))
        elif self.form == "plain":
            y = y * self.scale.value.astype(jnp.float32)
        return y.astype(dtype)

    def _normalise(self, v: jax.Array, axis: int = -1) -> jax.Array:
        v = v.astype(jnp.float32)
        mean_square = jnp.mean(v * v, axis=axis, keepdims=True)
        if self.form == "one_plus":
            return v * jax.lax.rsqrt(mean_square + self.eps)
        return v * jnp.power(mean_square + self.eps, -0.5)

    def _on_the_data(self, x: pz.nx.NamedArray) -> pz.nx.NamedArray | None:
        """The same arithmetic on ``x``'s array, the scale broadcast along the normalised
        axis (`gemmalens.layers.direct` says why); None where that does not apply
        (positional axes, a view, a scale with other axes)."""
        if not plain(x):
            return None
        scale = None if self.scale is None else self.scale.value
        if scale is not None and (not plain(scale) or tuple(scale.named_axes) != (self.axis,)):
            return None
        axis = list(x.named_axes).index(self.axis)
        y = self._normalise(x.data_array, axis)
        if self.form != "none":
            weight = scale.data_array.astype(jnp.float32)
            weight = weight.reshape([-1 if i == axis else 1 for i in range(y.ndim)])
            y = y * (1.0 + weight if self.form == "one_plus" else weight)
        return pz.nx.NamedArray(named_axes=x.named_axes, data_array=y.astype(x.dtype))

    def _with_scale_hook(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        # The divisor keeps ``self.axis`` with size 1 so the hook shows [batch, pos, 1]; it
        # goes through the hook point before use, so patching it changes the output.
        x = x.astype(jnp.float32)
        rms = pz.nx.nmap(lambda v: jnp.sqrt(jnp.mean(v * v, keepdims=True) + self.eps))(
            x.untag(self.axis)
        ).tag(self.axis)
        rms = self.hook_scale(rms, **side_inputs)
        y = pz.nx.nmap(lambda v, r: v / r)(x.untag(self.axis), rms.untag(self.axis)).tag(self.axis)
        if self.form == "one_plus":
            return y * (1.0 + self.scale.value.astype(jnp.float32))
        if self.form == "plain":
            return y * self.scale.value.astype(jnp.float32)
        return y

    @classmethod
    def build(
        cls,
        params: ParamBuilder,
        name: str,
        axis: str,
        size: int,
        eps: float,
        form: ScaleForm,
        hook_scale: HookPoint | None = None,
    ) -> RMSNorm:
        """Builds the norm, asking ``params`` for ``{name}.scale`` unless form is ``none``."""
        scale = None
        if form != "none":
            init = "zeros" if form == "one_plus" else "ones"
            scale = params(f"{name}.scale", {axis: size}, init=init)
        return cls(scale=scale, axis=axis, eps=eps, form=form, hook_scale=hook_scale)


@pz.pytree_dataclass
class LayerNorm(pz.nn.Layer):
    """Layer normalisation over one named axis, with a weight and a bias (SigLIP; no bias in
    Gemma 4's audio subsampling), in float32.

    ``y = (x - mean(x)) * rsqrt(var(x) + eps) * w + b`` with the biased variance, as torch's
    ``nn.LayerNorm``; the weight and bias apply in float32 before the cast back.
    """

    scale: pz.nn.ParameterLike[pz.nx.NamedArray]
    bias: pz.nn.ParameterLike[pz.nx.NamedArray] | None
    axis: str = dataclasses.field(metadata={"pytree_node": False})
    eps: float = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        def normalise(v: jax.Array) -> jax.Array:
            v = v.astype(jnp.float32)
            centred = v - jnp.mean(v)
            return centred * jax.lax.rsqrt(jnp.mean(centred * centred) + self.eps)

        y = pz.nx.nmap(normalise)(x.untag(self.axis)).tag(self.axis)
        y = y * self.scale.value.astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias.value.astype(jnp.float32)
        return y.astype(x.dtype)

    @classmethod
    def build(
        cls, params: ParamBuilder, name: str, axis: str, size: int, eps: float, bias: bool = True
    ) -> LayerNorm:
        """Builds the norm, asking ``params`` for ``{name}.scale`` (ones) and ``{name}.bias``
        (zeros; none with ``bias=False``, as Gemma 4's audio subsampling)."""
        return cls(
            scale=params(f"{name}.scale", {axis: size}, init="ones"),
            bias=params(f"{name}.bias", {axis: size}, init="zeros") if bias else None,
            axis=axis,
            eps=eps,
        )
