"""`gemmalens.layers.direct`: penzai's named arithmetic written on the arrays must give
penzai's results, fall back to penzai where it does not apply, and keep penzai's errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from gemmalens.layers import direct

RNG = np.random.RandomState(0)


def _named(shape: dict[str, int], dtype=jnp.float32) -> pz.nx.NamedArray:
    return pz.nx.wrap(jnp.asarray(RNG.randn(*shape.values()), dtype)).tag(*shape)


def _same(a: pz.nx.NamedArray, b: pz.nx.NamedArray, **tolerance) -> None:
    assert dict(a.named_shape) == dict(b.named_shape)
    names = tuple(a.named_shape)
    np.testing.assert_allclose(
        np.asarray(a.unwrap(*names)), np.asarray(b.unwrap(*names)), **tolerance
    )


@pytest.mark.parametrize(
    "x_axes, w_axes, contracted, out",
    [
        (
            {"batch": 2, "seq": 3, "embedding": 8},
            {"neurons": 5, "embedding": 8},
            ("embedding",),
            ("neurons",),
        ),
        # the weights' axes in another order, two output axes
        (
            {"seq": 3, "embedding": 8, "batch": 2},
            {"embedding": 8, "heads": 2, "head_dim": 4},
            ("embedding",),
            ("heads", "head_dim"),
        ),
        # an axis the input and the weights share is kept element by element (per head)
        (
            {"batch": 2, "heads": 3, "head_dim": 4},
            {"heads": 3, "head_dim": 4, "embedding": 6},
            ("head_dim",),
            ("embedding",),
        ),
        # two contracted axes
        (
            {"batch": 2, "heads": 3, "head_dim": 4},
            {"embedding": 6, "heads": 3, "head_dim": 4},
            ("heads", "head_dim"),
            ("embedding",),
        ),
    ],
)
def test_linear_equals_penzais(x_axes, w_axes, contracted, out):
    x, w = _named(x_axes), _named(w_axes)
    fields = dict(
        weights=pz.Parameter(value=w, label="w"), in_axis_names=contracted, out_axis_names=out
    )
    theirs = pz.nn.Linear(**fields)(x)
    ours = direct.Linear(**fields)(x)
    assert isinstance(ours, pz.nx.NamedArray) and not ours.positional_shape
    _same(ours, theirs, rtol=1e-6, atol=1e-6)
    # bfloat16 weights and float32 input promote as penzai's do
    w16 = pz.nx.nmap(lambda v: v.astype(jnp.bfloat16))(w)
    fields16 = dict(fields, weights=pz.Parameter(value=w16, label="w"))
    _same(direct.Linear(**fields16)(x), pz.nn.Linear(**fields16)(x), rtol=1e-6, atol=1e-6)


def test_linear_falls_back_for_views_and_keeps_penzais_errors():
    w = _named({"neurons": 5, "embedding": 8})
    layer = direct.Linear(
        weights=pz.Parameter(value=w, label="mlp.up_proj.weights"),
        in_axis_names=("embedding",),
        out_axis_names=("neurons",),
    )
    x = _named({"batch": 2, "embedding": 8})
    view = x.untag("batch").tag("batch")  # same values, through a view
    _same(layer(x.as_namedarrayview()), pz.nn.Linear(**_fields(layer))(x), rtol=1e-6)
    _same(layer(view), layer(x), rtol=1e-6)
    with pytest.raises(Exception, match="mlp.up_proj") as ours:
        layer(_named({"batch": 2, "embedding": 7}))
    with pytest.raises(Exception) as theirs:
        pz.nn.Linear(**_fields(layer))(_named({"batch": 2, "embedding": 7}))
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


def _fields(layer):
    return dict(
        weights=layer.weights,
        in_axis_names=layer.in_axis_names,
        out_axis_names=layer.out_axis_names,
    )


def test_residual_and_elementwise_equal_penzais():
    double = pz.nn.Sequential([])  # identity delta: value + value

    x = _named({"batch": 2, "seq": 3, "embedding": 4})
    _same(direct.Residual(double)(x), pz.nn.Residual(double)(x))
    # the delta's axes in another order
    reordered = pz.nx.wrap(x.unwrap("embedding", "batch", "seq")).tag("embedding", "batch", "seq")
    summed = direct.elementwise(jnp.add, x, reordered)
    _same(summed, x + reordered)
    assert tuple(summed.named_axes) == ("batch", "seq", "embedding")
    # different axes broadcast through nmap, as penzai does
    bias = _named({"embedding": 4})
    _same(direct.elementwise(jnp.add, x, bias), x + bias)
    with pytest.raises(ValueError, match="Inconsistent named axes"):
        direct.elementwise(jnp.add, x, _named({"batch": 2, "seq": 3, "embedding": 5}))


def test_direct_layers_trace_without_vmap():
    """The point of the module: the traced program has no batching left to do."""
    x = _named({"batch": 2, "seq": 3, "embedding": 8})
    layer = direct.Linear(
        weights=pz.Parameter(value=_named({"neurons": 5, "embedding": 8}), label="w"),
        in_axis_names=("embedding",),
        out_axis_names=("neurons",),
    )
    jaxpr = jax.make_jaxpr(
        lambda v: layer(pz.nx.wrap(v).tag("batch", "seq", "embedding")).data_array
    )(x.data_array)
    assert [e.primitive.name for e in jaxpr.jaxpr.eqns] == ["dot_general"]
