"""LAuReL: a learned, low-rank augmentation of the residual connection.

Gemma 3n runs it beside attention on the same normed input ``x``:
``laurel(x) = x + norm(right(left(x)))`` with ``left: embedding -> rank`` and
``right: rank -> embedding`` (rank 64 in the released models, no activation in between).
"""

from __future__ import annotations

from typing import Any

from penzai import pz

from gemmalens.layers import direct
from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.norms import RMSNorm, ScaleForm
from gemmalens.layers.params import ParamBuilder
from gemmalens.layers.transformer import RESID_AXES


@pz.pytree_dataclass
class Laurel(pz.nn.Layer):
    """``x + norm(right(left(x)))``, ``[batch, seq, embedding]`` in and out; the result
    passes through ``hook_out``."""

    linear_left: pz.nn.Linear
    linear_right: pz.nn.Linear
    post_laurel_norm: RMSNorm
    hook_out: HookPoint

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        low_rank = self.linear_right(self.linear_left(x))
        return self.hook_out(direct.add(x, self.post_laurel_norm(low_rank)), **side_inputs)

    @classmethod
    def build(
        cls,
        params: ParamBuilder,
        hook_prefix: str,
        d_model: int,
        rank: int,
        eps: float,
        norm_form: ScaleForm = "plain",
    ) -> Laurel:
        """Asks ``params`` for ``linear_left.weights``, ``linear_right.weights`` and
        ``post_laurel_norm.scale``; the hook is ``{hook_prefix}hook_out``."""
        return cls(
            linear_left=params.linear("linear_left", {"laurel_rank": rank}, {"embedding": d_model}),
            linear_right=params.linear(
                "linear_right", {"embedding": d_model}, {"laurel_rank": rank}
            ),
            post_laurel_norm=RMSNorm.build(
                params, "post_laurel_norm", "embedding", d_model, eps, norm_form
            ),
            hook_out=HookPoint(f"{hook_prefix}hook_out", RESID_AXES),
        )
