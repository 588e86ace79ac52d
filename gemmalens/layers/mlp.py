"""Feed-forward blocks: Gemma's gated MLP and the plain two-layer MLP of SigLIP."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from gemmalens.layers import stacking
from gemmalens.layers.direct import elementwise, plain
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.params import ParamBuilder

_MLP_AXES = ("batch", "seq", "neurons")

# Whether a gated block computes ``gelu(gate) * up`` of a prompt as one kernel
# (`gemmalens.kernels.gated_product`) instead of XLA's three. "off" (the default) never;
# "auto" on a single Hopper GPU (H100, H200) in bfloat16 or float16 where the sizes tile
# and neither ``hook_pre`` nor ``hook_pre_linear`` is hooked; "on" also with several
# devices; "reference" takes the kernel's path with XLA's arithmetic in place of the
# kernel, on any backend (for tests). Off by default because it does not pay yet: at Gemma
# 3 27B's sizes on an H100 the kernel saves 1 % of the forward's device time, and its
# launches cost the host more than that (docs/benchmarks.md, "A fused gated product").
# Read when a program is traced: a program already compiled keeps its choice until
# `jax.clear_caches()`. The environment variable GEMMALENS_PROMPT_MLP_KERNEL sets it at
# import.
PROMPT_MLP_KERNEL = os.environ.get("GEMMALENS_PROMPT_MLP_KERNEL", "off").strip().lower()
_PROMPT_MLP_CHOICES = ("auto", "on", "off", "reference")

# Where an MLP's activation reads its input from behind an optimization barrier, which
# keeps XLA:GPU from computing the activation in cuBLASLt's epilogue of the product before
# it: "gpu loops" (the default) inside loops over stacked layers on a GPU, "loops" inside
# such loops on any backend (for tests), "never". There the epilogue costs a copy of the
# layer's weights: XLA:GPU's dynamic-slice fusion reads a stacked weight in place only for
# a product without an epilogue, and copies it out of its stack first otherwise (Gemma 3
# 27B: the 231 MB gate weights of each layer, 9.4 ms of a 0.38 s forward on an H100).
# Behind the barrier the activation joins the elementwise fusion after the product, which
# reads and writes the same bytes as before. Per layer the epilogue costs nothing, so
# per-layer models keep it (docs/stacking.md, "How a loop reads its weights").
ACTIVATION_BARRIER = "gpu loops"


def activation_input(x: jax.Array) -> jax.Array:
    """``x`` as an MLP's activation should read it (`ACTIVATION_BARRIER`)."""
    if ACTIVATION_BARRIER == "never" or not stacking.in_layer_loop():
        return x
    if ACTIVATION_BARRIER == "gpu loops" and jax.default_backend() != "gpu":
        return x
    return jax.lax.optimization_barrier(x)


# transformers' ACT2FN names of the activations a plain `MLP` supports.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@pz.pytree_dataclass
class GatedMLP(pz.nn.Layer):
    """``down(act(gate(x)) * up(x))`` with GELU (tanh approximation), no biases.

    Hook points follow TransformerLens: ``mlp.hook_pre`` is the gate before the
    activation, ``mlp.hook_pre_linear`` the up projection, ``mlp.hook_post`` their product.

    ``gate_sparsity`` (optional) rewrites the gate between ``hook_pre`` and the activation
    (Gemma 3n's Gaussian top-k); it carries its own hook point for the sparse gate.
    """

    gate_proj: pz.nn.Layer
    up_proj: pz.nn.Layer
    hook_pre: HookPoint
    # Declared here so that tree order (and so hook order) follows the forward pass.
    gate_sparsity: pz.nn.Layer | None = dataclasses.field(default=None, kw_only=True)
    hook_pre_linear: HookPoint
    hook_post: HookPoint
    down_proj: pz.nn.Layer

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        fused = _fused_gated_product(self, x)
        if fused is not None:
            return self.down_proj(self.hook_post(fused, **side_inputs))
        gate = self.hook_pre(self.gate_proj(x), **side_inputs)
        if self.gate_sparsity is not None:
            gate = self.gate_sparsity(gate, **side_inputs)
        up = self.hook_pre_linear(self.up_proj(x), **side_inputs)
        hidden = elementwise(
            lambda g, u: jax.nn.gelu(activation_input(g), approximate=True) * u, gate, up
        )
        hidden = self.hook_post(hidden, **side_inputs)
        return self.down_proj(hidden)

    @classmethod
    def build(
        cls,
        params: ParamBuilder,
        hook_prefix: str,
        d_model: int,
        d_mlp: int,
        linear: Callable[[str, dict[str, int], dict[str, int]], pz.nn.Layer] | None = None,
    ) -> GatedMLP:
        """Asks ``params`` for ``gate_proj``, ``up_proj`` and ``down_proj``, each made by
        ``linear(name, out_axes, in_axes)`` (default ``params.linear``; Gemma 4's vision
        tower clips them)."""
        linear = linear or params.linear
        return cls(
            gate_proj=linear("gate_proj", {"neurons": d_mlp}, {"embedding": d_model}),
            up_proj=linear("up_proj", {"neurons": d_mlp}, {"embedding": d_model}),
            hook_pre=HookPoint(f"{hook_prefix}hook_pre", _MLP_AXES),
            hook_pre_linear=HookPoint(f"{hook_prefix}hook_pre_linear", _MLP_AXES),
            hook_post=HookPoint(f"{hook_prefix}hook_post", _MLP_AXES),
            down_proj=linear("down_proj", {"embedding": d_model}, {"neurons": d_mlp}),
        )


def _gated_reference(x: jax.Array, gate: jax.Array, up: jax.Array) -> jax.Array:
    """``gelu(x @ gate.T) * (x @ up.T)`` as XLA computes it, for ``x`` [..., d_model]."""
    gated = jax.nn.gelu(jnp.einsum("...d,hd->...h", x, gate), approximate=True)
    return gated * jnp.einsum("...d,hd->...h", x, up)


def _kernel_or_reference(x: jax.Array, gate: jax.Array, up: jax.Array) -> jax.Array:
    from gemmalens.kernels import gated_product

    rows = math.prod(x.shape[:-1])
    if PROMPT_MLP_KERNEL == "reference" or not gated_product.supported(rows, *gate.shape[::-1]):
        return _gated_reference(x, gate, up)
    flat = gated_product.gated_product(x.reshape(rows, x.shape[-1]), gate, up)
    return flat.reshape(*x.shape[:-1], gate.shape[0])


@jax.custom_batching.custom_vmap
def _batched_as_rows(x: jax.Array, gate: jax.Array, up: jax.Array) -> jax.Array:
    """`_kernel_or_reference`, whose batch of inputs against shared weights is more rows
    for the kernel (which has no batching rule of its own); other batches run XLA's."""
    return _kernel_or_reference(x, gate, up)


@_batched_as_rows.def_vmap
def _batched_as_rows_rule(axis_size, in_batched, x, gate, up):
    x_batched, gate_batched, up_batched = in_batched
    if x_batched and not gate_batched and not up_batched:
        return _batched_as_rows(x, gate, up), True
    axes = tuple(0 if batched else None for batched in in_batched)
    return jax.vmap(_gated_reference, in_axes=axes)(x, gate, up), True


@jax.custom_jvp
def _gated_product(x: jax.Array, gate: jax.Array, up: jax.Array) -> jax.Array:
    """The kernel where it applies, XLA's arithmetic elsewhere; differentiated through
    XLA's formula (the kernel has no derivative of its own)."""
    return _batched_as_rows(x, gate, up)


@_gated_product.defjvp
def _gated_product_jvp(primals, tangents):
    return jax.jvp(_gated_reference, primals, tangents)


def _fused_gated_product(mlp: GatedMLP, x: pz.nx.NamedArray) -> pz.nx.NamedArray | None:
    """``gelu(gate(x)) * up(x)`` through `_gated_product` when `PROMPT_MLP_KERNEL` lets it
    and nothing needs the gate or the up projection on its own; else None."""
    if PROMPT_MLP_KERNEL not in _PROMPT_MLP_CHOICES:
        raise ValueError(
            f"Unknown PROMPT_MLP_KERNEL {PROMPT_MLP_KERNEL!r}; choose one of "
            f"{', '.join(map(repr, _PROMPT_MLP_CHOICES))} (gemmalens.layers.mlp)."
        )
    if PROMPT_MLP_KERNEL == "off" or mlp.gate_sparsity is not None:
        return None
    if not all(type(hook) is HookPoint for hook in (mlp.hook_pre, mlp.hook_pre_linear)):
        return None
    if PROMPT_MLP_KERNEL != "reference" and not _on_hopper(PROMPT_MLP_KERNEL == "on"):
        return None
    weights = [_stored_matrix(linear) for linear in (mlp.gate_proj, mlp.up_proj)]
    if any(w is None for w in weights) or not plain(x):
        return None
    if "embedding" not in x.named_shape or "neurons" in x.named_shape:
        return None
    if PROMPT_MLP_KERNEL != "reference" and not (
        x.dtype == weights[0].dtype == weights[1].dtype and x.dtype in (jnp.bfloat16, jnp.float16)
    ):
        return None
    others = tuple(name for name in x.named_shape if name != "embedding")
    hidden = _gated_product(x.unwrap(*others, "embedding"), *weights)
    return pz.nx.wrap(hidden).tag(*others, "neurons")


def _stored_matrix(linear: pz.nn.Layer) -> jax.Array | None:
    """A plain linear's weights as stored, ``[neurons, embedding]``, or None (any other
    layer, or another storage order, which the kernel would have to transpose)."""
    if not isinstance(linear, pz.nn.Linear):
        return None
    value = getattr(linear.weights, "value", None)
    if not plain(value) or tuple(value.named_axes) != ("neurons", "embedding"):
        return None
    return value.data_array


def _on_hopper(several_devices_ok: bool) -> bool:
    devices = jax.devices()
    if devices[0].platform != "gpu" or (len(devices) > 1 and not several_devices_ok):
        return False
    return str(getattr(devices[0], "compute_capability", "")).startswith("9.")


@pz.pytree_dataclass
class MLP(pz.nn.Layer):
    """``fc2(act(fc1(x)))``: the plain two-layer feed-forward block of SigLIP, with biases.

    ``mlp.hook_pre`` is ``fc1(x)`` before the activation, ``mlp.hook_post`` after it.
    ``activation`` is a transformers name (a key of ``ACTIVATIONS``).
    """

    fc1: pz.nn.Layer
    hook_pre: HookPoint
    hook_post: HookPoint
    fc2: pz.nn.Layer
    activation: str = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        hidden = self.hook_pre(self.fc1(x, **side_inputs), **side_inputs)
        activation = ACTIVATIONS[self.activation]
        hidden = pz.nx.nmap(lambda h: activation(activation_input(h)))(hidden)
        hidden = self.hook_post(hidden, **side_inputs)
        return self.fc2(hidden, **side_inputs)

    @classmethod
    def build(
        cls, params: ParamBuilder, d_model: int, d_mlp: int, activation: str = "gelu_pytorch_tanh"
    ) -> MLP:
        """Asks ``params`` (the MLP's scope, e.g. ``vision.blocks.3.mlp``) for ``fc1`` and
        ``fc2``, weights and biases; hook points are named in the same scope."""
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"Activation {activation!r} is not implemented; expected one of {sorted(ACTIVATIONS)}."
            )
        return cls(
            fc1=params.affine("fc1", {"neurons": d_mlp}, {"embedding": d_model}),
            hook_pre=params.hook("hook_pre", _MLP_AXES),
            hook_post=params.hook("hook_post", _MLP_AXES),
            fc2=params.affine("fc2", {"embedding": d_model}, {"neurons": d_mlp}),
            activation=activation,
        )
