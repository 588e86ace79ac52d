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
    # different axes broadcast by name, as penzai's nmap does, and give its axis order
    bias = _named({"embedding": 4})
    _same(direct.elementwise(jnp.add, x, bias), x + bias)
    with pytest.raises(ValueError, match="Inconsistent named axes"):
        direct.elementwise(jnp.add, x, _named({"batch": 2, "seq": 3, "embedding": 5}))


@pytest.mark.parametrize(
    "axes",
    [
        # one argument lacks an axis; another has the first's axes in another order
        [
            {"batch": 2, "seq": 3, "stream": 4, "embedding": 5},
            {"embedding": 5, "seq": 3, "batch": 2},
        ],
        # each lacks an axis the other has (an outer product over them)
        [{"batch": 2, "stream": 4}, {"batch": 2, "embedding": 5}, {"stream": 4}],
        # an argument without axes (a scalar parameter)
        [{"batch": 2, "embedding": 5}, {}],
    ],
)
def test_broadcast_elementwise_equals_nmap(axes):
    arrays = [_named(shape) for shape in axes]

    def fn(*values):
        out = values[0]
        for value in values[1:]:
            out = out * 0.5 + value
        return jnp.tanh(out)

    ours, theirs = direct.elementwise(fn, *arrays), pz.nx.nmap(fn)(*arrays)
    assert isinstance(ours, pz.nx.NamedArray) and not ours.positional_shape
    assert tuple(ours.named_axes) == tuple(theirs.named_shape)
    _same(ours, theirs, rtol=1e-6, atol=1e-7)
    # Python numbers and 0-d arrays ride along as nmap passes them
    for scalar in (2.0, 3, jnp.asarray(1.5, jnp.bfloat16)):
        _same(direct.multiply(arrays[0], scalar), arrays[0] * scalar)
        _same(direct.subtract(scalar, arrays[0]), pz.nx.nmap(jnp.subtract)(scalar, arrays[0]))
    # bfloat16 against float32 promotes as penzai's does
    low = pz.nx.nmap(lambda v: v.astype(jnp.bfloat16))(arrays[0])
    assert direct.add(low, arrays[-1]).dtype == (low + arrays[-1]).dtype
    # anything else (a view, an array with shape) goes through nmap
    view = arrays[0].untag(next(iter(axes[0]))).tag(next(iter(axes[0])))
    _same(direct.elementwise(fn, view, *arrays[1:]), theirs, rtol=1e-6, atol=1e-7)
    _same(direct.add(arrays[0], jnp.ones(())), arrays[0] + 1.0)


def test_take_along_and_dot_equal_penzais():
    streams = _named({"batch": 2, "seq": 3, "stream": 4, "embedding": 5})
    for index in (0, 3, -1, jnp.asarray(2), jnp.asarray(7)):  # numpy's rules, clamped past the end
        _same(direct.take(streams, "stream", index), streams[{"stream": index}])
    layer = jax.jit(lambda s, i: direct.take(s, "stream", i).data_array)
    np.testing.assert_array_equal(
        layer(streams, 1), streams[{"stream": 1}].unwrap("batch", "seq", "embedding")
    )
    view = streams.untag("seq").tag("seq")
    _same(direct.take(view, "stream", 1), streams[{"stream": 1}])

    # kept axis (a softmax) and reduced axis (a mean); a view through nmap
    softmax = direct.along(lambda v: jax.nn.softmax(v, axis=-1), streams, "stream")
    _same(softmax, pz.nx.nmap(jax.nn.softmax)(streams.untag("stream")).tag("stream"), rtol=1e-6)
    mean = direct.along(lambda v: jnp.mean(v, -1), streams, "embedding")
    _same(mean, pz.nx.nmap(jnp.mean)(streams.untag("embedding")), rtol=1e-6)
    _same(direct.along(lambda v: jnp.mean(v, -1), view, "embedding"), mean, rtol=1e-6)
    _same(direct.along(lambda v: jax.nn.softmax(v, axis=-1), view, "stream"), softmax, rtol=1e-6)

    # an axis of another length under a new name (each head repeated, as grouped queries do)
    repeated = direct.along(lambda v: jnp.repeat(v, 2, axis=-1), streams, "stream", "heads")
    theirs = pz.nx.nmap(lambda v: jnp.repeat(v, 2))(streams.untag("stream")).tag("heads")
    _same(repeated, theirs)
    _same(direct.along(lambda v: jnp.repeat(v, 2, axis=-1), view, "stream", "heads"), theirs)
    with pytest.raises(ValueError, match="a function of the last axis \\('stream'\\)"):
        direct.along(lambda v: v[0], streams, "stream")
    named_index = pz.nx.wrap(jnp.asarray([1, 3])).tag("batch")  # one index per row: penzai's path
    _same(direct.take(streams, "stream", named_index), streams[{"stream": named_index}])

    # a contraction over one axis, shared axes element by element
    coefs = _named({"batch": 2, "seq": 3, "stream": 4, "from_stream": 4})
    renamed = pz.nx.wrap(streams.unwrap("batch", "seq", "stream", "embedding")).tag(
        "batch", "seq", "from_stream", "embedding"
    )
    mixed = direct.dot(coefs, renamed, ("from_stream",))
    theirs = pz.nx.nmap(jnp.dot)(coefs.untag("from_stream"), streams.untag("stream"))
    assert tuple(mixed.named_axes) == ("batch", "seq", "stream", "embedding")
    _same(mixed, theirs, rtol=1e-6, atol=1e-6)
    # contract: the same, and penzai's nmap(jnp.dot) for a view
    _same(direct.contract(coefs, renamed, "from_stream"), theirs, rtol=1e-6, atol=1e-6)
    _same(direct.contract(coefs.as_namedarrayview(), renamed, "from_stream"), theirs, rtol=1e-6)
    # where it does not apply it says so (None) and the caller takes penzai's path
    assert direct.dot(coefs, renamed, ("stream",)) is None  # "stream" not in both
    assert direct.dot(coefs.as_namedarrayview(), renamed, ("from_stream",)) is None
    assert direct.dot(coefs, _named({"batch": 3, "from_stream": 4}), ("from_stream",)) is None


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
