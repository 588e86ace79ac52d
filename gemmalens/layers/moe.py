"""Mixture of experts as Gemma 4 (26B-A4B) runs it: a routed expert block beside the dense MLP.

Per token ``x`` (the feed-forward block's input, i.e. the residual stream after attention)::

    router:  logits = W_router (norm(x) * scale * H^-0.5)         ──hook_router_logits [.., expert]
             p = softmax(logits);  indices = top_k(p)               ──hook_expert_indices [.., k]
             w = p[indices] / sum(p[indices]) * per_expert_scale[indices]
                                                                    ──hook_expert_weights [.., expert]
    experts: y = sum_j w_j * down_e(gelu(gate_e(x')) * up_e(x')),   e = indices[j],  x' = norm_2(x)
    output:  post_norm_2(y)                                         ──hook_out

``hook_expert_weights`` is dense over experts (zero for experts a token does not use), so
``weights[..., e]`` reads "how much expert e contributes here" without a gather.
``hook_expert_indices`` comes first: replacing the indices there reroutes the tokens and
the weights are recomputed from the router probabilities of the new experts. Changing the
logits at ``hook_router_logits`` changes the routing the same way (the top-k runs after
that hook); changing ``hook_expert_weights`` rescales (or zeroes) the experts a token
already uses.

The experts run as grouped matrix products: every (token, chosen expert) pair is sorted by
expert and each expert multiplies only its own rows, so the work is ``tokens * k``
expert-MLPs, not ``tokens * experts``. The grouped product is `jax.lax.ragged_dot_general`
(native on TPU, a masked loop on CPU, which is fine for tiny models) except on Hopper GPUs,
where XLA would expand it into a dense product over every expert; there JAX's Mosaic GPU
grouped-matmul kernel runs instead (`grouped_matmul`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from penzai import pz

from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.mlp import GatedMLP
from gemmalens.layers.norms import RMSNorm
from gemmalens.layers.params import ParamBuilder

ROUTER_AXES = ("batch", "seq", "expert")
INDEX_AXES = ("batch", "seq", "top_k")
RESID_AXES = ("batch", "seq", "embedding")

Implementation = Literal["auto", "xla", "mosaic_gpu"]

# [rows, in] x [expert, out, in] -> [rows, out]: rows are grouped by expert, the weight keeps
# the checkpoint's [out, in] layout (no transpose of the expert tensors at run time).
_GROUPED = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)


@pz.pytree_dataclass
class Router(pz.nn.Layer):
    """Chooses ``top_k`` experts per token and their weights.

    Input ``[batch, seq, embedding]``; output ``(indices, weights)``: indices
    ``[batch, seq, top_k]`` (int32, most probable first) and weights ``[batch, seq, expert]``
    (float32, zero off the chosen experts).

    Attributes:
      norm: RMS norm without weight.
      scale: per-channel input scale ``[embedding]``; the input is also multiplied by
        ``H ** -0.5``.
      proj: ``embedding -> expert`` logits.
      per_expert_scale: ``[expert]``, multiplies each chosen expert's renormalised weight.
    """

    norm: RMSNorm
    scale: pz.nn.ParameterLike[pz.nx.NamedArray]
    proj: pz.nn.Linear
    hook_router_logits: HookPoint
    hook_expert_indices: HookPoint
    per_expert_scale: pz.nn.ParameterLike[pz.nx.NamedArray]
    hook_expert_weights: HookPoint
    top_k: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any):
        dtype = x.dtype
        width = x.named_shape["embedding"]
        scaled = self.norm(x) * self.scale.value.astype(dtype)
        scaled = scaled * jnp.asarray(width**-0.5, dtype)
        logits = self.hook_router_logits(self.proj(scaled), **side_inputs)
        probabilities = pz.nx.nmap(lambda s: jax.nn.softmax(s.astype(jnp.float32)))(
            logits.untag("expert")
        ).tag("expert")
        indices = pz.nx.nmap(lambda p: jax.lax.top_k(p, self.top_k)[1].astype(jnp.int32))(
            probabilities.untag("expert")
        ).tag("top_k")
        indices = self.hook_expert_indices(indices, **side_inputs)
        expert_scale = self.per_expert_scale.value.astype(jnp.float32).untag("expert")

        def weigh(p, chosen, scale):
            picked = p[chosen]
            picked = picked / jnp.sum(picked) * scale[chosen]
            return jnp.zeros_like(p).at[chosen].add(picked)

        weights = pz.nx.nmap(weigh)(
            probabilities.untag("expert"), indices.untag("top_k"), expert_scale
        ).tag("expert")
        weights = self.hook_expert_weights(weights, **side_inputs)
        return indices, weights

    @classmethod
    def build(
        cls,
        params: ParamBuilder,
        hook_prefix: str,
        d_model: int,
        num_experts: int,
        top_k: int,
        eps: float,
    ) -> Router:
        """Asks ``params`` for ``scale``, ``proj.weights`` and ``per_expert_scale``."""
        return cls(
            norm=RMSNorm.build(params, "norm", "embedding", d_model, eps, "none"),
            scale=params("scale", {"embedding": d_model}, init="ones"),
            proj=params.linear("proj", {"expert": num_experts}, {"embedding": d_model}),
            hook_router_logits=HookPoint(f"{hook_prefix}hook_router_logits", ROUTER_AXES),
            hook_expert_indices=HookPoint(f"{hook_prefix}hook_expert_indices", INDEX_AXES),
            per_expert_scale=params("per_expert_scale", {"expert": num_experts}, init="ones"),
            hook_expert_weights=HookPoint(f"{hook_prefix}hook_expert_weights", ROUTER_AXES),
            top_k=top_k,
        )


@pz.pytree_dataclass
class Experts(pz.nn.Layer):
    """``E`` gated GELU MLPs; each token runs through its chosen experts only.

    Input ``(x, indices, weights)`` as produced by `Router` (x ``[batch, seq, embedding]``),
    output ``sum_j weights[e_j] * expert_{e_j}(x)``, ``[batch, seq, embedding]``.

    Attributes:
      gate_up: ``[expert, gate_up=2, expert_neurons, embedding]``; ``gate_up=0`` is the gate
        (the checkpoint's fused ``[E, 2 * I, H]`` tensor, gate rows first).
      down: ``[expert, embedding, expert_neurons]``.
      implementation: how the grouped products run (see `grouped_matmul`).
    """

    gate_up: pz.nn.ParameterLike[pz.nx.NamedArray]
    down: pz.nn.ParameterLike[pz.nx.NamedArray]
    implementation: Implementation = dataclasses.field(
        default="auto", metadata={"pytree_node": False}
    )

    def __call__(self, inputs, **side_inputs: Any) -> pz.nx.NamedArray:
        x, indices, weights = inputs
        gate_up = self.gate_up.value.unwrap("expert", "gate_up", "expert_neurons", "embedding")
        down = self.down.value.unwrap("expert", "embedding", "expert_neurons")
        num_experts, _, width, d_model = gate_up.shape
        gate_up = gate_up.reshape(num_experts, 2 * width, d_model)
        out = grouped_experts(
            x.unwrap(*RESID_AXES),
            indices.unwrap(*INDEX_AXES),
            weights.unwrap(*ROUTER_AXES),
            gate_up,
            down,
            self.implementation,
        )
        return pz.nx.wrap(out).tag(*RESID_AXES)

    @classmethod
    def build(cls, params: ParamBuilder, d_model: int, num_experts: int, d_expert: int) -> Experts:
        """Asks ``params`` for ``gate_up_proj`` and ``down_proj`` (transformers' names)."""
        return cls(
            gate_up=params(
                "gate_up_proj",
                {"expert": num_experts, "gate_up": 2, "expert_neurons": d_expert},
                {"embedding": d_model},
            ),
            down=params(
                "down_proj",
                {"expert": num_experts, "embedding": d_model},
                {"expert_neurons": d_expert},
            ),
        )


# Tiles of the Mosaic GPU kernel, the fastest of a sweep on an H100 at 26B-A4B shapes
# (`python benchmarks/moe_layer.py --tune 8192`).
_MOSAIC_TILES = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def _mosaic_gpu_fits(lhs: jax.Array, rhs: jax.Array) -> bool:
    """Whether the Mosaic GPU kernel applies: a Hopper GPU, 16-bit floats, tile-sized dims."""
    if jax.default_backend() != "gpu" or lhs.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    if lhs.dtype != rhs.dtype or rhs.shape[1] % _MOSAIC_TILES["block_n"]:
        return False
    if rhs.shape[2] % _MOSAIC_TILES["block_k"]:
        return False
    capability = getattr(jax.devices()[0], "compute_capability", "")
    return str(capability).startswith("9")


def grouped_matmul(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, implementation: Implementation = "auto"
) -> jax.Array:
    """``[rows, in] x [groups, out, in] -> [rows, out]``: consecutive runs of rows
    (``group_sizes[g]`` of them) multiply group ``g``'s ``[out, in]`` matrix.

    ``implementation``: ``"xla"`` (`jax.lax.ragged_dot_general`), ``"mosaic_gpu"`` (JAX's
    Hopper kernel, `jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`) or ``"auto"`` (the
    kernel where it applies, else XLA).
    """
    use_kernel = implementation == "mosaic_gpu" or (
        implementation == "auto" and _mosaic_gpu_fits(lhs, rhs)
    )
    if use_kernel:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

        return ragged_dot_mgpu.ragged_dot(
            lhs, rhs, group_sizes=group_sizes, transpose_rhs=True, **_MOSAIC_TILES
        )
    return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, _GROUPED)


def grouped_experts(
    x: jax.Array,
    indices: jax.Array,
    weights: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    implementation: Implementation = "auto",
) -> jax.Array:
    """The expert mixture on plain arrays, grouped by expert.

    Args:
      x: ``[..., H]`` expert inputs.
      indices: ``[..., k]`` chosen experts per token.
      weights: ``[..., E]`` weight of every expert per token (read at ``indices``).
      gate_up: ``[E, 2 * I, H]`` fused gate (first ``I`` rows) and up projections.
      down: ``[E, H, I]``.
      implementation: how the grouped products run (see `grouped_matmul`).

    Returns:
      ``[..., H]`` in x's dtype: ``sum_j weights[e_j] * down_e(gelu(gate_e x) * up_e x)``.
    """
    lead, d_model = x.shape[:-1], x.shape[-1]
    top_k, num_experts = indices.shape[-1], gate_up.shape[0]
    tokens = x.reshape(-1, d_model)
    chosen = indices.reshape(-1)  # [tokens * k], token-major
    picked = jnp.take_along_axis(
        weights.reshape(-1, weights.shape[-1]), indices.reshape(-1, top_k), axis=-1
    ).reshape(-1)
    # Sort the (token, expert) pairs by expert so each expert's rows are contiguous.
    order = jnp.argsort(chosen, stable=True)
    rows = tokens[order // top_k]
    group_sizes = jnp.bincount(chosen, length=num_experts).astype(jnp.int32)
    fused = grouped_matmul(rows, gate_up, group_sizes, implementation)
    gate, up = jnp.split(fused, 2, axis=-1)
    hidden = jax.nn.gelu(gate, approximate=True) * up
    out = grouped_matmul(hidden, down, group_sizes, implementation)
    # Back to token-major order, then the weighted sum over each token's k experts.
    out = jnp.zeros_like(out).at[order].set(out)
    out = out.astype(jnp.float32) * picked[:, None]
    out = out.reshape(-1, top_k, d_model).sum(axis=1)
    return out.astype(x.dtype).reshape(*lead, d_model)


@pz.pytree_dataclass
class MixtureOfExperts(pz.nn.Layer):
    """The routed expert branch: router on the block input, experts on its second
    pre-norm, then the second post-norm. ``[batch, seq, embedding]`` in and out."""

    router: Router
    pre_norm: RMSNorm
    experts: Experts
    post_norm: RMSNorm
    hook_out: HookPoint

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        indices, weights = self.router(x, **side_inputs)
        mixed = self.experts((self.pre_norm(x), indices, weights), **side_inputs)
        return self.hook_out(self.post_norm(mixed), **side_inputs)

    @classmethod
    def build(
        cls,
        params: ParamBuilder,
        hook_prefix: str,
        d_model: int,
        num_experts: int,
        top_k: int,
        d_expert: int,
        eps: float,
    ) -> MixtureOfExperts:
        """Labels: ``router.*``, ``experts.*``, ``pre_feedforward_layernorm_2.scale``,
        ``post_feedforward_layernorm_2.scale``; hooks under ``hook_prefix`` (``blocks.i.moe.``)."""
        return cls(
            router=Router.build(
                params.scope("router"), hook_prefix, d_model, num_experts, top_k, eps
            ),
            pre_norm=RMSNorm.build(
                params, "pre_feedforward_layernorm_2", "embedding", d_model, eps, "plain"
            ),
            experts=Experts.build(params.scope("experts"), d_model, num_experts, d_expert),
            post_norm=RMSNorm.build(
                params, "post_feedforward_layernorm_2", "embedding", d_model, eps, "plain"
            ),
            hook_out=HookPoint(f"{hook_prefix}hook_out", RESID_AXES),
        )


@pz.pytree_dataclass
class DenseAndExperts(pz.nn.Layer):
    """The feed-forward branch of a Gemma 4 MoE layer: ``dense(x) + moe(x)``.

    ``dense`` is pre-norm -> gated MLP -> first post-norm -> ``hook_dense_mlp_out``;
    ``moe`` is a `MixtureOfExperts` (ending in ``moe.hook_out``). Both read the same block
    input. ``[batch, seq, embedding]`` in and out.
    """

    dense: pz.nn.Sequential
    moe: MixtureOfExperts

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return self.dense(x, **side_inputs) + self.moe(x, **side_inputs)

    @classmethod
    def build(
        cls,
        params: ParamBuilder,
        block_prefix: str,
        d_model: int,
        d_mlp: int,
        num_experts: int,
        top_k: int,
        d_expert: int,
        eps: float,
    ) -> DenseAndExperts:
        """``params`` is the block's scope; hooks are named under ``block_prefix``
        (``blocks.i.``)."""

        def norm(name):
            return RMSNorm.build(params, name, "embedding", d_model, eps, "plain")

        return cls(
            dense=pz.nn.Sequential(
                [
                    norm("pre_feedforward_layernorm"),
                    GatedMLP.build(params.scope("mlp"), f"{block_prefix}mlp.", d_model, d_mlp),
                    norm("post_feedforward_layernorm_1"),
                    HookPoint(f"{block_prefix}hook_dense_mlp_out", RESID_AXES),
                ]
            ),
            moe=MixtureOfExperts.build(
                params.scope("moe"),
                f"{block_prefix}moe.",
                d_model,
                num_experts,
                top_k,
                d_expert,
                eps,
            ),
        )
