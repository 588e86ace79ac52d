"""The gated feed-forward block."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from penzai import pz

from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.params import ParamBuilder

_MLP_AXES = ("batch", "seq", "neurons")


@pz.pytree_dataclass
class GatedMLP(pz.nn.Layer):
    """``down(act(gate(x)) * up(x))`` with GELU (tanh approximation), no biases.

    Hook points follow TransformerLens: ``mlp.hook_pre`` is the gate before the
    activation, ``mlp.hook_pre_linear`` the up projection, ``mlp.hook_post`` their product.

    ``gate_sparsity`` (optional) rewrites the gate between ``hook_pre`` and the activation
    (Gemma 3n's Gaussian top-k); it carries its own hook point for the sparse gate.
    """

    gate_proj: pz.nn.Linear
    up_proj: pz.nn.Linear
    hook_pre: HookPoint
    # Declared here so that tree order (and so hook order) follows the forward pass.
    gate_sparsity: pz.nn.Layer | None = dataclasses.field(default=None, kw_only=True)
    hook_pre_linear: HookPoint
    hook_post: HookPoint
    down_proj: pz.nn.Linear

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        gate = self.hook_pre(self.gate_proj(x), **side_inputs)
        if self.gate_sparsity is not None:
            gate = self.gate_sparsity(gate, **side_inputs)
        up = self.hook_pre_linear(self.up_proj(x), **side_inputs)
        hidden = pz.nx.nmap(lambda g: jax.nn.gelu(g, approximate=True))(gate) * up
        hidden = self.hook_post(hidden, **side_inputs)
        return self.down_proj(hidden)

    @classmethod
    def build(cls, params: ParamBuilder, hook_prefix: str, d_model: int, d_mlp: int) -> GatedMLP:
        return cls(
            gate_proj=params.linear("gate_proj", {"neurons": d_mlp}, {"embedding": d_model}),
            up_proj=params.linear("up_proj", {"neurons": d_mlp}, {"embedding": d_model}),
            hook_pre=HookPoint(f"{hook_prefix}hook_pre", _MLP_AXES),
            hook_pre_linear=HookPoint(f"{hook_prefix}hook_pre_linear", _MLP_AXES),
            hook_post=HookPoint(f"{hook_prefix}hook_post", _MLP_AXES),
            down_proj=params.linear("down_proj", {"embedding": d_model}, {"neurons": d_mlp}),
        )
