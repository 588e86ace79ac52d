"""Feed-forward blocks: Gemma's gated MLP and the plain two-layer MLP of SigLIP."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from penzai import pz

from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.params import ParamBuilder

_MLP_AXES = ("batch", "seq", "neurons")

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
        gate = self.hook_pre(self.gate_proj(x), **side_inputs)
        if self.gate_sparsity is not None:
            gate = self.gate_sparsity(gate, **side_inputs)
        up = self.hook_pre_linear(self.up_proj(x), **side_inputs)
        hidden = pz.nx.nmap(lambda g: jax.nn.gelu(g, approximate=True))(gate) * up
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
        hidden = pz.nx.nmap(ACTIVATIONS[self.activation])(hidden)
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
