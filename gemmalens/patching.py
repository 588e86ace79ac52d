"""Activation patching sweeps and attribution patching, each one compiled computation.

Convention (as in TransformerLens): run the *corrupted* prompt, and at one site at a time
put back the value that site had in the *clean* run; record ``metric(logits)``. A site is
one (layer, position) of a residual-stream-shaped hook, or one (layer, head) of a per-head
hook (``z``, ``q``, ``k``, ``v``, ``pattern``), patched at every position.

`sweep` does every site in one ``jax.jit``-compiled program that shares what the patched
runs have in common. A patch in block L leaves blocks 0..L-1 as in the corrupted run;
attention being causal, a patch at position p leaves the positions before p as they were,
and no value before the first position where the two prompts differ (`first_difference`)
differs between the runs. So the runs of the sites patched in block L form one *group*:
it starts at block L as copies of the corrupted run (with the clean and corrupted runs
alongside), each run is patched at the site's hook with the clean run's value, and only
the rows that can differ from the corrupted run are carried: run (L, p) from position p on.
Per-token layers (norms, projections, MLPs) run on that flat list of rows; attention
gathers each run's whole sequence (the rows it does not carry from the corrupted run),
mixes, and scatters back. Logits are computed only at the positions the metric reads
(`metric_positions` reads them off the metric; otherwise every position), and after the
last attention layer only those rows go on. Every group has the same layout and each block
runs over the groups begun so far in a loop, so each kind of block (local or global
attention) is traced once and its kernels are compiled once: the first call costs about
what compiling two forward passes costs. The compiled program depends on the prompt
length, the site, the metric and the first position where the prompts differ.

Models with blocks this program does not know (AltUp streams, shared KV caches, ...), and
chunked sweeps, use the general form: the whole forward ``jax.vmap``-ed over the site
index, each hook blending clean and corrupted values with a one-hot mask computed from it.
It too runs the final norm and the unembedding at the metric's positions only (the
``logit_window`` side input of `DecoderLM`), where those layers act on each position alone.
`attribution_patching` replaces the sweep by its first-order estimate
``(clean - corrupted) . d metric / d value`` at the corrupted run, from one forward and
one backward pass (``jax.grad``).

`path_patching` (Wang et al. 2022) scores each attention head by its effect along paths:
the corrupted run with the head's clean output and every other head's output held at its
corrupted value, read at the logits or at chosen receivers (then patched into a plain
corrupted run), every head in one ``vmap``-ed program of the general form.

Encoder-decoder models (T5Gemma 2) use the general form. Their sites name the stack
(``encoder.resid_pre``: ``[layer, encoder pos]``; ``decoder.resid_pre``: ``[layer, decoder
pos]``; ``decoder.z``, ``decoder.cross_pattern``: ``[layer, head]``), the tokens are the
encoder inputs, ``decoder_tokens=`` the decoder's (``corrupted_decoder_tokens=`` corrupts
the decoder input), and the metric reads the decoder logits. `available_sites` lists a
model's sites.

Models with per-layer embeddings (Gemma 3n, Gemma 4 E2B / E4B) feed each token's identity
to every layer through ``blocks.{i}.hook_per_layer_input``, the ``per_layer_input`` site
(``[layer, pos]``). So patching ``resid_pre`` at layer 0 at a corrupted position does not
restore the clean run there: the clean token comes back only when that position's
``resid_pre`` at layer 0 *and* its per-layer input at every layer are patched. (In Gemma 3n
the other AltUp streams are made from the embedding too: patch ``hook_embed`` there
instead of ``resid_pre`` at layer 0.)
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens import compiling
from gemmalens.layers import stacking
from gemmalens.layers.attention import Attention, DotProductAttention
from gemmalens.layers.embeddings import EmbedTokens, TanhSoftCap, TiedUnembed
from gemmalens.layers.hooks import HookPoint, InterveneHook, checked_indices, intervene
from gemmalens.layers.hooks import capture as capture_hooks
from gemmalens.layers.mlp import GatedMLP
from gemmalens.layers.norms import RMSNorm
from gemmalens.layers.rope import ApplyRoPE
from gemmalens.layers.stacking import LayerSlice
from gemmalens.layers.transformer import DecoderLM, positions_from_mask, unembeds_per_token

if TYPE_CHECKING:
    from gemmalens.lens import Model

Metric = Callable[[jax.Array], jax.Array]
# "auto" (read off the metric), "all", or the positions the metric reads: an int, a slice
# or a list of ints.
LogitPositions = Union[str, int, slice, Sequence[int], None]


@dataclasses.dataclass(frozen=True)
class Site:
    """A kind of patch site: the hook name pattern and which axis indexes its units.

    ``unit_axis`` is the axis of the user-facing (batch-first) value that a site patches
    one entry of: 1 is ``pos`` for ``[batch, pos, ...]`` values; heads are axis 2 of
    ``[batch, pos, head, d_head]`` and axis 1 of ``[batch, head, q_pos, k_pos]``.
    """

    hook: str
    unit_axis: int
    unit: str


SITES: dict[str, Site] = {
    "resid_pre": Site("blocks.{}.hook_resid_pre", 1, "pos"),
    "resid_mid": Site("blocks.{}.hook_resid_mid", 1, "pos"),
    "resid_post": Site("blocks.{}.hook_resid_post", 1, "pos"),
    "attn_out": Site("blocks.{}.hook_attn_out", 1, "pos"),
    "mlp_out": Site("blocks.{}.hook_mlp_out", 1, "pos"),
    "z": Site("blocks.{}.attn.hook_z", 2, "head"),
    "q": Site("blocks.{}.attn.hook_q", 2, "head"),
    "k": Site("blocks.{}.attn.hook_k", 2, "kv_head"),
    "v": Site("blocks.{}.attn.hook_v", 2, "kv_head"),
    "pattern": Site("blocks.{}.attn.hook_pattern", 1, "head"),
}

# Sites that only some models have: per-layer inputs (models with per-layer embeddings)
# and the parts of T5Gemma 2's merged self+cross attention (its decoder).
MODEL_SITES: dict[str, Site] = {
    "per_layer_input": Site("blocks.{}.hook_per_layer_input", 1, "pos"),
    "self_pattern": Site("blocks.{}.attn.hook_self_pattern", 1, "head"),
    "cross_pattern": Site("blocks.{}.attn.hook_cross_pattern", 1, "head"),
    "cross_k": Site("blocks.{}.attn.hook_cross_k", 2, "kv_head"),
    "cross_v": Site("blocks.{}.attn.hook_cross_v", 2, "kv_head"),
}

# The features of spliced sparse autoencoders and transcoders (`gemmalens.sae.splice`):
# one row per spliced dictionary (in forward order) rather than per layer, and the units
# are features, axis 2 of ``[batch, seq, features]``. All must have the same width.
FEATURES_SITE = "features"
_FEATURES = Site("{}.sae.hook_features", 2, "feature")


def _feature_hooks(m: Model) -> tuple[str, ...]:
    return tuple(n for n in m.hook_names if n.endswith(".sae.hook_features"))


def _check_feature_widths(names: Sequence[str], values: Sequence[jax.Array]) -> None:
    widths = {name: int(v.shape[-1]) for name, v in zip(names, values)}
    if len(set(widths.values())) > 1:
        raise ValueError(
            f"Site 'features' patches every spliced SAE, and their widths differ ({widths}): "
            "splice dictionaries of one width, or one at a time."
        )


_MERGED = "the decoder of an encoder-decoder with merged attention (T5Gemma 2: 'decoder.{}')"
_WHO_HAS = {
    "per_layer_input": "models with per-layer embeddings (Gemma 3n E2B / E4B, Gemma 4 E2B / E4B)",
    **{
        kind: _MERGED.format(kind)
        for kind in ("self_pattern", "cross_pattern", "cross_k", "cross_v")
    },
}


def _stacks(m: Model) -> tuple[str, ...]:
    """The hook-name prefixes of the model's stacks (`Model.stacks`): ``("",)`` for a
    decoder, ``("encoder.", "decoder.")`` for an encoder-decoder."""
    return tuple(stack.prefix for stack in m.stacks)


def _layer_count(m: Model, prefix: str) -> int:
    return next(stack.num_layers for stack in m.stacks if stack.prefix == prefix)


def _names_of(m: Model, prefix: str, spec: Site) -> tuple[str, ...]:
    return tuple(prefix + spec.hook.format(i) for i in range(_layer_count(m, prefix)))


def available_sites(m: Model) -> list[str]:
    """The patch sites of ``m``: those whose hook point is in every layer of a stack.

    A decoder's sites are bare (``resid_pre``, ``z``, ...); an encoder-decoder's name their
    stack (``encoder.resid_pre``, ``decoder.z``, ``decoder.cross_pattern``, ...)."""
    hook_names = set(m.hook_names)
    features = [FEATURES_SITE] if _feature_hooks(m) else []
    return features + [
        prefix + kind
        for prefix in _stacks(m)
        for kind, spec in {**SITES, **MODEL_SITES}.items()
        if all(n in hook_names for n in _names_of(m, prefix, spec)) and _layer_count(m, prefix)
    ]


def site_spec(site: str) -> Site:
    """The `Site` of a site name, stack prefix included (``"decoder.z"``: hooks
    ``decoder.blocks.{}.attn.hook_z``, heads on axis 2)."""
    if site == FEATURES_SITE:
        return _FEATURES
    prefix, kind = "", site
    for stack in ("encoder.", "decoder."):
        if site.startswith(stack):
            prefix, kind = stack, site.removeprefix(stack)
    spec = SITES.get(kind) or MODEL_SITES.get(kind)
    if spec is None:
        raise ValueError(
            f"Unknown patch site {site!r}; sites are {sorted(SITES)}, and where a model has "
            f"them {sorted(MODEL_SITES)}."
        )
    return dataclasses.replace(spec, hook=prefix + spec.hook)


def site_names(m: Model, site: str) -> tuple[str, ...]:
    """The hook names of ``site`` for every layer (of its stack), in layer order."""
    valid = available_sites(m)
    listing = f"This model's sites: {', '.join(valid)}."
    if site == FEATURES_SITE:
        if not _feature_hooks(m):
            raise ValueError(
                "Patch site 'features' needs spliced sparse autoencoders "
                f"(gemmalens.sae.splice); this model has none. {listing}"
            )
        return _feature_hooks(m)
    kind = site.removeprefix("encoder.").removeprefix("decoder.")
    if kind not in SITES and kind not in MODEL_SITES:
        raise ValueError(f"Unknown patch site {site!r}. {listing}")
    stacks = _stacks(m)
    if site == kind and stacks != ("",):
        raise ValueError(
            f"Patch site {site!r} does not say which stack: this is an encoder-decoder model, "
            f"so name it 'encoder.{site}' or 'decoder.{site}'. {listing}"
        )
    if site != kind and stacks == ("",):
        raise ValueError(
            f"Patch site {site!r} names a stack, but this model has one (a decoder): use "
            f"{kind!r}. {listing}"
        )
    prefix = site.removesuffix(kind)
    names = _names_of(m, prefix, site_spec(kind))
    hook_names = set(m.hook_names)
    if kind in _WHO_HAS and not any(n in hook_names for n in names):
        family = getattr(m.config, "family", type(m.config).__name__)
        hook = prefix + MODEL_SITES[kind].hook.format("{i}")
        raise ValueError(
            f"Patch site {site!r} ({hook}) exists only in {_WHO_HAS[kind]}; this model "
            f"({family}) has no such hook point. {listing}"
        )
    missing = [n for n in names if n not in hook_names]
    if missing:
        raise ValueError(
            f"This model has no hook point {missing[0]!r} for site {site!r}. {listing}"
        )
    return names


# --------------------------------------------------------------- which logits a metric reads


def metric_positions(
    metric: Metric, shape: tuple[int, ...], dtype: Any = jnp.float32
) -> tuple[int, int] | None:
    """The positions (axis 1) of ``[batch, seq, vocab]`` logits that ``metric`` can read,
    as a half-open range ``(start, stop)``, or None when that cannot be shown.

    Read off the metric's jaxpr: when every use of the logits is a static slice (what
    ``logits[:, -1, token]`` or ``logits[:, -3:]`` trace to), the metric's value cannot
    depend on any other position. Anything else (a gather with an index array, a nested
    ``jit``, the whole array passed on) gives None, and a sweep then computes every position.
    """
    traced = _trace_metric(metric, shape, dtype)
    return None if traced is None else _positions_read(traced[0].jaxpr, shape)


def _trace_metric(metric: Metric, shape: tuple[int, ...], dtype: Any) -> tuple[Any, Any] | None:
    """``(closed jaxpr, what it returns as shapes)`` of ``metric`` on ``[batch, seq, vocab]``
    logits (not run), or None when it cannot be traced on its own (a sweep then reads every
    position, and the run itself raises what is wrong)."""
    try:
        closed, returned = jax.make_jaxpr(metric, return_shape=True)(
            jax.ShapeDtypeStruct(shape, dtype)
        )
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        raise TypeError(
            "The metric turns the logits into numpy values or Python numbers (np.asarray, "
            "float(), an `if` on them); patching runs it inside a compiled JAX program, so "
            "it must use jax.numpy throughout, e.g. (logits[:, -1, a] - logits[:, -1, b])"
            ".mean() and jnp.where instead of an `if`."
        ) from e
    except Exception:  # noqa: BLE001
        return None
    return closed, returned


def _positions_read(jaxpr: Any, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """`metric_positions` from the metric's jaxpr."""
    if len(jaxpr.invars) != 1:
        return None
    (logits,) = jaxpr.invars
    if any(v is logits for v in jaxpr.outvars):
        return None
    start, stop = shape[1], 0
    for eqn in jaxpr.eqns:
        if not any(v is logits for v in eqn.invars):
            continue
        if eqn.primitive.name != "slice":
            return None
        start = min(start, int(eqn.params["start_indices"][1]))
        stop = max(stop, int(eqn.params["limit_indices"][1]))
    if stop <= start:  # the metric never reads the logits: one position is as good as any
        return shape[1] - 1, shape[1]
    return start, stop


_LOGIT_AXES = ("batch", "position", "vocabulary")


def _read_outside(closed: Any, shape: tuple[int, ...]) -> str | None:
    """Where the metric's jaxpr reads the logits at a constant index outside them (a
    ``dynamic_slice`` or ``gather`` whose indices fold to constants), said as an error
    message; None if it does not. JAX clamps such a read to the last entry, so a token id
    of another vocabulary would otherwise read this model's last token, silently."""
    jaxpr = closed.jaxpr
    if len(jaxpr.invars) != 1:
        return None
    (logits,) = jaxpr.invars
    known = dict(zip(jaxpr.constvars, map(np.asarray, closed.consts)))

    def value(var: Any) -> Any:
        if isinstance(var, jax_core.Literal):
            return np.asarray(var.val)
        return known.get(var)

    for eqn in jaxpr.eqns:
        values = [value(v) for v in eqn.invars]
        if eqn.invars and eqn.invars[0] is logits and eqn.primitive.name == "dynamic_slice":
            starts = values[1:]
            for axis, (start, size) in enumerate(zip(starts, eqn.params["slice_sizes"])):
                if start is not None and not 0 <= int(start) <= shape[axis] - size:
                    return _outside_message(int(start), axis, shape)
        if eqn.invars and eqn.invars[0] is logits and eqn.primitive.name == "gather":
            indices, numbers = values[1], eqn.params["dimension_numbers"]
            if indices is not None:
                columns = indices.reshape(-1, indices.shape[-1]) if indices.ndim else indices
                for k, axis in enumerate(numbers.start_index_map):
                    limit = shape[axis] - eqn.params["slice_sizes"][axis]
                    wrong = columns[..., k][(columns[..., k] < 0) | (columns[..., k] > limit)]
                    if wrong.size:
                        return _outside_message(int(wrong.ravel()[0]), axis, shape)
        # Fold small constant expressions (the index arithmetic jnp writes around a read).
        if all(v is not None for v in values) and not eqn.primitive.multiple_results:
            if all(np.size(v) <= 4096 for v in values) and not eqn.params.get("jaxpr"):
                try:
                    known[eqn.outvars[0]] = np.asarray(eqn.primitive.bind(*values, **eqn.params))
                except Exception:  # noqa: BLE001  (not foldable here: leave it unknown)
                    pass
    return None


def _outside_message(index: int, axis: int, shape: tuple[int, ...]) -> str:
    """``index`` as the jaxpr holds it: jnp has already added the size to a negative one."""
    hint = (
        " Index the rows the batch has.",
        " Index the positions the prompts have (negative ones count from the end).",
        " Is the token id from another tokenizer or model?",
    )[axis]
    asked = index - shape[axis] if index < 0 else index
    return (
        f"The metric reads the logits at {_LOGIT_AXES[axis]} index {asked}, but they have "
        f"{shape[axis]} along that axis (logits are {list(shape)}); JAX would read index "
        f"{shape[axis] - 1 if index >= 0 else 0} instead, without an error.{hint}"
    )


@functools.lru_cache(maxsize=64)
def _metric_facts(
    metric: Metric, shape: tuple[int, ...], dtype: str
) -> tuple[Any, Any, str | None]:
    """``(what metric returns as shapes, metric_positions, a read outside the logits)``,
    None each where it cannot be traced: one trace per metric and shape."""
    traced = _trace_metric(metric, shape, jnp.dtype(dtype))
    if traced is None:
        return None, None, None
    closed, returned = traced
    return returned, _positions_read(closed.jaxpr, shape), _read_outside(closed, shape)


def _read_positions(
    m: Model, metric: Metric, shape: tuple[int, int, int], positions: str | tuple[int, int]
) -> tuple[int, int] | None:
    """The positions of ``[batch, seq, vocab]`` logits the sweep computes for ``metric``:
    ``positions`` normalised (`_normalise_positions`), ``"auto"`` read off the metric; None
    for every position. Raises a ValueError naming the fix when ``metric`` does not return
    one number (every analysis with a metric comes here first)."""
    dtype = _model_facts(m._frozen).dtype
    try:
        returned, read, outside = _metric_facts(metric, shape, dtype)
    except TypeError:  # an unhashable metric
        returned, read, outside = _metric_facts.__wrapped__(metric, shape, dtype)
    if outside is not None:
        raise ValueError(outside)
    if returned is not None and getattr(returned, "shape", None) != ():
        what = f"an array of shape {returned.shape}" if hasattr(returned, "shape") else None
        raise ValueError(
            f"The metric returned {what or type(returned).__name__}; patching needs one "
            "number per run. Reduce it, for example average a per-prompt logit difference "
            "over the batch: (logits[:, -1, a] - logits[:, -1, b]).mean()."
        )
    if positions == "all":
        return None
    if positions != "auto":
        return positions
    return read


def _nan_outside(read: jax.Array, start: int, stop: int, seq: int, axis: int) -> jax.Array:
    """Logits of positions ``start..stop-1`` (along ``axis``) as ``seq`` positions, NaN at
    the others: the metric gets the shape it expects, and a read of a position it was
    promised not to read shows."""
    if start == 0 and stop == seq:
        return read
    shape = list(read.shape)
    before, after = list(shape), list(shape)
    before[axis], after[axis] = start, seq - stop
    return jnp.concatenate(
        [jnp.full(before, jnp.nan, read.dtype), read, jnp.full(after, jnp.nan, read.dtype)],
        axis=axis,
    )


def _normalise_positions(positions: LogitPositions, seq: int) -> str | tuple[int, int]:
    """``"auto"``, ``"all"`` or a declared ``(start, stop)`` covering the positions given."""
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return "all"
    if isinstance(positions, str):
        if positions != "auto":
            raise ValueError(
                f"logit_positions={positions!r}: use 'auto', 'all', an int, a slice or a "
                "list of positions."
            )
        return "auto"
    every = range(seq)
    try:
        if isinstance(positions, slice):
            chosen = list(every[positions])
        elif isinstance(positions, (int, np.integer)):
            chosen = [every[int(positions)]]
        else:
            chosen = [every[int(p)] for p in positions]
    except IndexError:
        raise ValueError(
            f"logit_positions={positions!r} is outside the {seq} positions of the prompt."
        ) from None
    if not chosen:
        raise ValueError(f"logit_positions={positions!r} selects no position.")
    return min(chosen), max(chosen) + 1


# --------------------------------------------------------------- the shared-runs sweep

# Layers that act on each token alone (so they run unchanged on a flat list of rows), and
# the containers the sweep walks into. Anything else sends a model to the general form.
_PER_TOKEN = (RMSNorm, pz.nn.Linear, ApplyRoPE, EmbedTokens, TiedUnembed, TanhSoftCap)
_CONTAINERS = (pz.nn.Sequential, pz.nn.NamedGroup)


def _walkable(layer: Any) -> bool:
    if type(layer) is HookPoint or isinstance(layer, _PER_TOKEN):
        return True
    if isinstance(layer, GatedMLP):
        return layer.gate_sparsity is None
    if isinstance(layer, _CONTAINERS):
        return all(_walkable(sub) for sub in layer.sublayers)
    if isinstance(layer, pz.nn.Residual):
        return _walkable(layer.delta)
    if type(layer) is Attention:
        return (
            type(layer.mixer) is DotProductAttention
            and type(layer.hook_z) is HookPoint
            and all(_walkable(part) for part in (layer.query, layer.key, layer.value))
            and isinstance(layer.output, pz.nn.Linear)
        )
    return False


def shares_runs(model: Any) -> bool:
    """Whether `sweep` can run ``model`` with shared runs: a `DecoderLM` whose blocks are
    made of layers it knows (norms, projections, gated MLPs, attention, hook points), each
    with one attention layer, and whose hook points are all bare (no hooks installed)."""
    if not isinstance(model, DecoderLM) or not isinstance(model.blocks, _CONTAINERS):
        return False
    if any(part is not None for part in (model.per_layer_inputs, model.expand, model.collapse)):
        return False  # per-layer inputs and several residual streams: the general path
    hooks = pz.select(model).at_instances_of(HookPoint).get_sequence()
    if any(type(hp) is not HookPoint for hp in hooks):
        return False
    for i, block in enumerate(model.blocks.sublayers):
        if not (isinstance(block, pz.nn.NamedGroup) and block.name == f"blocks.{i}"):
            return False
        if len(pz.select(block).at_instances_of(Attention).get_sequence()) != 1:
            return False
        names = [hp.name for hp in pz.select(block).at_instances_of(HookPoint).get_sequence()]
        if not all(name.startswith(f"blocks.{i}.") for name in names):
            return False
    # The final norm and the unembedding: the test the logit window uses, one definition.
    return _walkable(model.embed) and _walkable(model.blocks) and unembeds_per_token(model)


def first_difference(clean, corrupted, clean_mask=None, corrupted_mask=None) -> int:
    """The first position where the two prompts differ (in a token or in padding) in any
    batch row; the length when they are the same. In a causal model every value before it
    is the same in both runs, so no patch there changes anything."""
    differs = np.asarray(clean) != np.asarray(corrupted)
    if clean_mask is not None or corrupted_mask is not None:
        ones = np.ones(differs.shape, np.int32)
        a = ones if clean_mask is None else np.asarray(clean_mask)
        b = ones if corrupted_mask is None else np.asarray(corrupted_mask)
        differs |= a != b
    columns = np.nonzero(differs.any(axis=0))[0]
    return int(columns[0]) if len(columns) else differs.shape[1]


class _Rows:
    """Which (run, position) each row of a flat activation holds, in (run, position) order.

    Run 0 is the clean prompt, run 1 the corrupted one, runs 2.. the patched runs."""

    def __init__(self, run: np.ndarray, pos: np.ndarray, seq: int, num_runs: int):
        self.run, self.pos = run.astype(np.int32), pos.astype(np.int32)
        self.num_runs = num_runs
        self.table = np.full((self.num_runs, seq), -1, np.int32)
        self.table[self.run, self.pos] = np.arange(len(run), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.run)

    def select(self, keep: np.ndarray) -> _Rows:
        return _Rows(self.run[keep], self.pos[keep], self.table.shape[1], self.num_runs)

    def index_or_corrupted(self, runs: np.ndarray, start: int = 0, stop: int | None = None):
        """``[runs, stop - start]`` row indices; a run's missing rows read the corrupted run's
        (they hold the same values: a patch never reaches earlier positions)."""
        index = self.table[runs, start:stop]
        fallback = np.broadcast_to(self.table[1, start:stop], index.shape)
        index = np.where(index < 0, fallback, index)
        assert (index >= 0).all(), "a row the corrupted run must hold is missing"
        return index


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static layout of a shared-runs sweep; it keys the compiled programs.

    Every start layer gets a *group* of runs with this one layout: the clean run from
    ``first_diff`` on, the whole corrupted run, and one run per live unit (a position at or
    after ``first_diff``, or a head) from its first position that can differ on."""

    site: str
    layers: int
    units: int
    seq: int
    first_diff: int
    causal: bool
    read: tuple[int, int] | None
    arange: bool

    @property
    def spec(self) -> Site:
        return SITES[self.site]

    @property
    def hook(self) -> str:
        """The site's hook name inside a block (``hook_resid_pre``, ``attn.hook_z``)."""
        return self.spec.hook.split(".", 2)[2]

    @functools.cached_property
    def live_units(self) -> np.ndarray:
        if self.spec.unit == "pos" and self.causal:
            return np.arange(self.first_diff, self.units)
        return np.arange(self.units)

    @functools.cached_property
    def unit_run(self) -> np.ndarray:
        """The run of each unit; 1 (the corrupted run) where a patch changes nothing."""
        runs = np.ones(self.units, np.int64)
        runs[self.live_units] = 2 + np.arange(len(self.live_units))
        return runs

    @functools.cached_property
    def run_unit(self) -> np.ndarray:
        return np.concatenate([[-1, -1], self.live_units])

    @functools.cached_property
    def rows(self) -> _Rows:
        if self.spec.unit == "pos" and self.causal:
            first = self.live_units
        else:
            first = np.full(len(self.live_units), self.first_diff)
        starts = np.concatenate([[self.first_diff, 0], first])
        run = np.concatenate([np.full(self.seq - s, u) for u, s in enumerate(starts)])
        pos = np.concatenate([np.arange(s, self.seq) for s in starts])
        return _Rows(run, pos, self.seq, len(starts))

    @functools.cached_property
    def pruned_rows(self) -> _Rows:
        """The rows kept after the last attention layer: the positions the metric reads."""
        start, stop = self.read
        return self.rows.select((self.rows.pos >= start) & (self.rows.pos < stop))

    @functools.cached_property
    def start_index(self) -> np.ndarray:
        """For a new group: which row of a running group each row copies (the clean and
        corrupted rows as they are; a patched run starts as the corrupted run)."""
        rows = self.rows
        return rows.table[np.minimum(rows.run, 1), rows.pos]


def _take_rows(x: pz.nx.NamedArray, index: np.ndarray) -> pz.nx.NamedArray:
    return pz.nx.nmap(lambda a: a[index])(x.untag("seq")).tag("seq")


def _canonical(block: pz.nn.NamedGroup, index: int, keep_slices: bool = False) -> pz.nn.NamedGroup:
    """``block`` with names that do not mention its index, so that blocks of one kind have
    one tree structure and one traced program. A stacked layer's `LayerSlice` becomes its
    slice, or stays a view into its stack (``keep_slices``: a loop indexes the stack)."""
    prefix = f"blocks.{index}."
    block = (
        pz.select(block)
        .at_instances_of(HookPoint)
        .apply(lambda hp: dataclasses.replace(hp, name=hp.name.removeprefix(prefix)))
    )
    if keep_slices:
        block = (
            pz.select(block)
            .at_instances_of(LayerSlice)
            .apply(lambda v: _StackRef(v.stack.value, v.index, v.stack.label))
        )
    block = (
        pz.select(block)
        .at_instances_of((pz.ParameterValue, LayerSlice))
        .apply(lambda p: pz.ParameterValue(value=p.value, label="block"))
    )
    return dataclasses.replace(block, name="block")


@dataclasses.dataclass(frozen=True)
class _StackRef:
    """A stacked layer's parameter inside a sweep's loop: its stack, index and stack label
    (`_canonical` with ``keep_slices``)."""

    stack: Any
    index: int
    label: str


def _patched(value: jax.Array, lead: int, dst: np.ndarray, src: np.ndarray, patch) -> jax.Array:
    """``value`` whose entries ``dst`` of its first ``lead`` axes (flattened; axis 1 alone
    when ``lead`` is 1) take the entries ``src`` where ``patch`` is true. A gather, not a
    scatter: every block of every group then runs the same compiled kernel."""
    if lead == 1:  # along axis 1 (rows of a [batch, rows, ...] value)
        count = value.shape[1]
    else:
        count = int(np.prod(value.shape[:lead]))
    index = np.arange(count)
    index[dst] = src
    index = jnp.where(patch, index, np.arange(count))
    if lead == 1:
        return value[:, index]
    flat = value.reshape(count, *value.shape[lead:])
    return flat[index].reshape(value.shape)


class _Walker:
    """Runs layers on a group's flat rows (see the module docstring); inside a trace."""

    def __init__(self, plan: _Plan, positions: jax.Array, patch: jax.Array | None, prune: bool):
        self.plan, self.positions, self.patch, self.prune = plan, positions, patch, prune
        self._side: dict[int, dict[str, Any]] = {}

    def flat_side(self, rows: _Rows) -> dict[str, Any]:
        if id(rows) not in self._side:
            which = np.minimum(rows.run, 1)
            positions = self.positions[which, :, rows.pos]  # [rows, batch]
            self._side[id(rows)] = {"token_positions": pz.nx.wrap(positions.T).tag("batch", "seq")}
        return self._side[id(rows)]

    def dense_side(self, runs: int) -> dict[str, Any]:
        which = np.minimum(np.arange(runs), 1)
        positions = self.positions[which].reshape(-1, self.plan.seq)
        side = {"token_positions": pz.nx.wrap(positions).tag("batch", "seq")}
        if self.plan.arange:
            side["positions_are_arange"] = True
        return side

    # ------------------------------------------------------------------ patches

    def _patches(self, name: str) -> bool:
        return self.patch is not None and name == self.plan.hook

    def patch_flat(self, hp: HookPoint, x: pz.nx.NamedArray, rows: _Rows) -> pz.nx.NamedArray:
        if not self._patches(hp.name):
            return x
        plan, value = self.plan, hp.to_user(x)
        runs = np.arange(2, rows.num_runs)
        if plan.spec.unit == "pos":  # one row per run: its own position
            dst = rows.table[runs, plan.run_unit[runs]]
            keep = dst >= 0  # a row dropped after the last attention is never read
            src = rows.table[0, plan.run_unit[runs][keep]]
            value = _patched(value, 1, dst[keep], src, self.patch)
        else:  # one unit (a head) of every row of the run: entries (row, unit)
            axis, units = plan.spec.unit_axis, value.shape[plan.spec.unit_axis]
            dst = np.nonzero(rows.run >= 2)[0]
            src, unit = rows.table[0, rows.pos[dst]], plan.run_unit[rows.run[dst]]
            moved = jnp.moveaxis(jnp.moveaxis(value, axis, 0), 2, 0)  # [rows, unit, batch, ...]
            moved = _patched(moved, 2, dst * units + unit, src * units + unit, self.patch)
            value = jnp.moveaxis(jnp.moveaxis(moved, 0, 2), 0, axis)
        return pz.nx.wrap(value).tag(*hp.axes)

    def patch_dense(self, name: str, value: jax.Array, runs: int) -> jax.Array:
        """A patch on a ``[run * batch, ...]`` value (attention internals): entries
        (run, unit) take the clean run's."""
        if not self._patches(name):
            return value
        axis = self.plan.spec.unit_axis + 1
        moved = jnp.moveaxis(value.reshape(runs, -1, *value.shape[1:]), axis, 1)
        units, patched = moved.shape[1], np.arange(2, runs)
        unit = self.plan.run_unit[patched]
        moved = _patched(moved, 2, patched * units + unit, unit, self.patch)
        return jnp.moveaxis(moved, 1, axis).reshape(value.shape)

    # ------------------------------------------------------------------ the walk

    def walk(self, layer: Any, x: pz.nx.NamedArray, rows: _Rows):
        if isinstance(layer, HookPoint):
            return self.patch_flat(layer, x, rows), rows
        if isinstance(layer, _CONTAINERS):
            for sub in layer.sublayers:
                x, rows = self.walk(sub, x, rows)
            return x, rows
        if isinstance(layer, pz.nn.Residual):
            delta, out_rows = self.walk(layer.delta, x, rows)
            if out_rows is not rows:
                x = _take_rows(x, rows.table[out_rows.run, out_rows.pos])
            return delta + x, out_rows
        if isinstance(layer, Attention):
            return self.attention(layer, x, rows)
        return layer(x, **self.flat_side(rows)), rows

    def attention(self, layer: Attention, x: pz.nx.NamedArray, rows: _Rows):
        q, _ = self.walk(layer.query, x, rows)
        k, _ = self.walk(layer.key, x, rows)
        v, _ = self.walk(layer.value, x, rows)
        runs = rows.num_runs
        index = rows.index_or_corrupted(np.arange(runs))  # [runs, seq]

        def dense(a):
            d = pz.nx.nmap(lambda r: r[index])(a.untag("seq")).tag("run", "seq")
            rest = [n for n in d.named_shape if n not in ("run", "batch")]
            array = d.unwrap("run", "batch", *rest)
            return pz.nx.wrap(array.reshape(-1, *array.shape[2:])).tag("batch", *rest)

        mixer = layer.mixer
        for field in ("hook_attn_scores", "hook_pattern"):
            hp = getattr(mixer, field)
            if self._patches(hp.name):
                fn = functools.partial(self._dense_hook, runs=runs)
                hooked = InterveneHook(name=hp.name, axes=hp.axes, fn=fn)
                mixer = dataclasses.replace(mixer, **{field: hooked})
        z = mixer((dense(q), dense(k), dense(v)), **self.dense_side(runs))
        hook_z = layer.hook_z
        z = pz.nx.wrap(self.patch_dense(hook_z.name, hook_z.to_user(z), runs)).tag(*hook_z.axes)

        # Nothing mixes positions after the last attention: keep the rows the metric reads.
        out_rows = self.plan.pruned_rows if self.prune else rows
        rest = [n for n in z.named_shape if n not in ("batch", "seq")]
        array = z.unwrap("batch", "seq", *rest)
        array = array.reshape(runs, -1, *array.shape[1:])[out_rows.run, :, out_rows.pos]
        z_rows = pz.nx.wrap(array).tag("seq", "batch", *rest)
        return layer.output(z_rows, **self.flat_side(out_rows)), out_rows

    def _dense_hook(self, value: jax.Array, name: str, runs: int) -> jax.Array:
        return self.patch_dense(name, value, runs)


_RESID = ("batch", "seq", "embedding")


@functools.partial(jax.jit, static_argnames=("plan", "prune", "rows_sharding"))
def _shared_block(block, x, positions, patch, *, plan, prune, rows_sharding=None):
    """One block on one group's rows ``[batch, rows, d_model]``, patching the site's hook
    where ``patch`` is true. Traced once per kind of block (all groups share one layout).
    ``rows_sharding`` splits the rows across devices (see `_sweep_shared`)."""
    x = _constrain(x, rows_sharding)
    x = pz.nx.wrap(x).tag(*_RESID)
    out = _Walker(plan, positions, patch, prune).walk(block, x, plan.rows)[0].unwrap(*_RESID)
    return _constrain(out, rows_sharding)


def _constrain(x: jax.Array, sharding: Any) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


@functools.partial(jax.jit, static_argnames=("plan", "metric"))
def _shared_scores(final_norm, unembed, x, positions, *, plan, metric):
    """The metric of every unit of one group: ``[units, ...]``."""
    rows = plan.rows if plan.read is None else plan.pruned_rows
    keep = np.nonzero(rows.run >= 1)[0]  # the clean run has done its part
    x, rows = _take_rows(pz.nx.wrap(x).tag(*_RESID), keep), rows.select(keep)
    walker = _Walker(plan, positions, None, False)
    x, rows = walker.walk(final_norm, x, rows)
    logits, rows = walker.walk(unembed, x, rows)
    start, stop = plan.read if plan.read is not None else (0, plan.seq)
    index = rows.index_or_corrupted(plan.unit_run, start, stop)  # [units, stop - start]
    read = jnp.moveaxis(logits.unwrap("batch", "seq", "vocab")[:, index], 1, 0)
    full = _nan_outside(read, start, stop, plan.seq, axis=2)  # [units, batch, seq, vocab]
    return jax.vmap(lambda one: jnp.asarray(metric(one)))(full)


@compiling.jit(static_argnames=("plan", "metric", "rows_sharding"))
def _sweep_shared(
    model, clean, corrupted, clean_mask, corrupted_mask, *, plan, metric, rows_sharding=None
):
    """Every unit's metric, ``[layer, unit, ...]``, with shared runs (the module docstring).

    ``rows_sharding`` (``[batch, rows, d_model]``, rows over the mesh's data axis) splits
    each group's rows, the (run, position) pairs of its patched runs, across devices: the
    per-token layers (projections, MLPs, norms), most of the work, each run on a device's
    share of the rows. Attention gathers every run's rows (collectives XLA inserts), mixes
    them on every device and scatters back."""
    model = model.tree()  # a `Distinct`
    batch, seq = clean.shape

    def positions(mask):
        if mask is None:
            return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        return positions_from_mask(pz.nx.wrap(mask).tag("batch", "seq")).unwrap("batch", "seq")

    positions = jnp.stack([positions(clean_mask), positions(corrupted_mask)])
    rows = plan.rows
    tokens = jnp.stack([clean, corrupted])[np.minimum(rows.run, 1), :, rows.pos].T
    walker = _Walker(plan, positions, None, False)
    first, _ = walker.walk(model.embed, pz.nx.wrap(tokens).tag("batch", "seq"), rows)
    first = first.unwrap(*_RESID)

    groups = _run_groups(model.blocks.sublayers, first, positions, plan, rows_sharding)
    return jax.lax.map(
        lambda x: _shared_scores(
            model.final_norm, model.unembed, x, positions, plan=plan, metric=metric
        ),
        groups,
    )


# Above this many bytes of block weights, a per-layer (unstacked) model's sweep runs its
# blocks one after another rather than copying their weights into stacks for one loop.
STACK_COPY_LIMIT_BYTES = 4 * 2**30


def _run_groups(blocks, first, positions, plan: _Plan, rows_sharding) -> jax.Array:
    """Every group through every block: ``[layers, batch, rows, d_model]``.

    Group ``L`` holds the runs patched in block ``L`` (with the clean and corrupted runs);
    it begins at block ``L`` as a copy of group 0 (`_Plan.start_index`), and block ``L``
    then runs over groups ``0 .. L``. The blocks before the last run as one loop over
    layers (`jax.lax.scan`), each layer choosing its kind of block (Gemma 3's local or
    global) by `jax.lax.switch` and reading its weights from stacks by the loop counter,
    so the program holds one copy of each kind of block whatever the depth. The last
    block, which may keep only the rows the metric reads, runs on its own."""
    layers = len(blocks)
    last = layers - 1

    def run(block, x, patch, prune=False):
        return _shared_block(
            block, x, positions, patch, plan=plan, prune=prune, rows_sharding=rows_sharding
        )

    def begin(groups, layer):  # group ``layer`` starts as group 0's clean and corrupted runs
        return groups.at[layer].set(groups[0][:, plan.start_index])

    def run_block(block, groups, layer, count, prune=False):
        """``block`` (layer ``layer``) over groups ``0 .. count - 1``, patching group
        ``layer``."""
        patches = jnp.arange(count) == layer
        return jax.lax.map(lambda args: run(block, *args, prune), (groups[:count], patches))

    groups = jnp.zeros((layers, *first.shape), first.dtype).at[0].set(first)
    refs = [_canonical(block, j, keep_slices=True) for j, block in enumerate(blocks[:last])]
    weight_bytes = sum(
        leaf.nbytes
        for block in refs
        for leaf in jax.tree.leaves(block, is_leaf=_is_slice)
        if not _is_slice(leaf)
    )
    if weight_bytes <= STACK_COPY_LIMIT_BYTES:
        groups = _loop_over_layers(refs, groups, run, begin)
    else:  # a large per-layer model: its blocks one after another
        for j in range(last):
            groups = begin(groups, j)
            groups = groups.at[: j + 1].set(run_block(_canonical(blocks[j], j), groups, j, j + 1))
    groups = begin(groups, last)
    prune = plan.read is not None
    return run_block(_canonical(blocks[last], last), groups, last, layers, prune=prune)


def _is_slice(node: Any) -> bool:
    return isinstance(node, _StackRef)


def _loop_over_layers(blocks, groups, run, begin) -> jax.Array:
    """`_run_groups`' loop: blocks ``0 .. len(blocks) - 1`` over the groups begun so far
    (``run(block, x, patch)`` one block on one group; ``begin(groups, layer)`` a new
    group)."""
    if not blocks:
        return groups
    flat = [jax.tree.flatten(block, is_leaf=_is_slice) for block in blocks]
    signatures = [
        (treedef,)
        + tuple(
            ("slice", leaf.label) if _is_slice(leaf) else (leaf.shape, str(leaf.dtype))
            for leaf in leaves
        )
        for leaves, treedef in flat
    ]
    kinds, kind_of, slot_of = stacking.group_kinds(signatures)
    branches = []
    for members in kinds:
        template, treedef = flat[members[0]]
        columns = []
        for q, leaf in enumerate(template):
            if _is_slice(leaf):  # a stacked model: index its stack, copy nothing
                index = jnp.asarray([flat[j][0][q].index for j in members], jnp.int32)
                columns.append((leaf.stack, index))
            else:
                columns.append((jnp.stack([flat[j][0][q] for j in members]), None))
        branches.append(_kind_branch(treedef, columns, run))
    kind_of, slot_of = jnp.asarray(kind_of), jnp.asarray(slot_of)

    def step(groups, layer):
        groups = begin(groups, layer)
        return jax.lax.switch(kind_of[layer], branches, groups, layer, slot_of[layer]), None

    return jax.lax.scan(step, groups, jnp.arange(len(blocks)))[0]


def _kind_branch(treedef, columns, run):
    """One kind of block at layer ``layer`` (its ``slot``-th member), over groups
    ``0 .. layer`` (a loop whose length is the layer: compiled once)."""

    def branch(groups, layer, slot):
        leaves = []
        for values, index in columns:
            if index is None:
                leaves.append(values[slot])
            else:
                value = stacking.take_layer(values, index[slot])
                leaves.append(pz.ParameterValue(value=value, label="block"))
        block = jax.tree.unflatten(treedef, leaves)

        def one(g, groups):
            return groups.at[g].set(run(block, groups[g], g == layer))

        return jax.lax.fori_loop(0, layer + 1, one, groups)

    return branch


# --------------------------------------------------------------- the general form


def _with_hook_fns(model: Any, fns: dict[str, Callable]) -> Any:
    # Called inside a traced function, so the fns may close over tracers: the rewritten
    # tree never crosses a jit boundary, so its static fields are never hashed.
    return intervene(model, fns)


def _unit_counts(values: Sequence[jax.Array], axis: int) -> tuple[int, ...]:
    """How many units each layer's value has along ``axis``."""
    return tuple(int(value.shape[axis]) for value in values)


def _without_missing_units(scores: jax.Array, counts: Sequence[int]) -> jax.Array:
    """``scores`` (``[layer, unit, ...]``, as wide as the widest layer) with NaN where a
    layer has no such unit: Gemma 4's full-attention layers can have fewer KV heads than
    its sliding ones (``num_global_key_value_heads``), and a head that does not exist has
    no effect to measure."""
    units = scores.shape[1]
    if min(counts) == units:
        return scores
    exists = np.arange(units)[None, :] < np.asarray(counts)[:, None]  # [layer, unit]
    exists = exists.reshape(*exists.shape, *(1,) * (scores.ndim - 2))
    return jnp.where(exists, scores, jnp.nan)


def _unit_mask(selected: jax.Array, ndim: int, axis: int) -> jax.Array:
    """``selected`` ([units], bool) shaped to broadcast along ``axis`` of an ndim array."""
    shape = [1] * ndim
    shape[axis] = selected.shape[0]
    return selected.reshape(shape)


@compiling.jit(
    static_argnames=(
        "names",
        "unit_axis",
        "metric",
        "chunk_size",
        "forward",
        "site_sharding",
        "window",
    ),
)
def _sweep_vmapped(
    model,
    clean_values,
    inputs,
    *,
    names,
    unit_axis,
    metric,
    chunk_size,
    forward,
    site_sharding=None,
    window=None,
):
    """Every site's metric, ``[layer, unit, ...]``. ``site_sharding`` (a ``NamedSharding``
    of a 1-D array, `gemmalens.sharding.Placement.site_sharding`) splits the sites across
    its mesh axis: the vmapped axis is laid out by it, so each device (with its slice of
    the model) runs its share of the sites. ``window``: `_logits_at`'s."""
    model = model.tree()  # a `Distinct`
    counts = _unit_counts(clean_values, unit_axis)
    layers, units = len(names), max(counts)

    def patched_metric(site: jax.Array) -> jax.Array:
        chosen = (jnp.arange(layers * units) == site).reshape(layers, units)

        def blend(layer: int) -> Callable:
            def fn(value: jax.Array, name: str) -> jax.Array:
                # where, not a weighted sum: the patched entry is bit-for-bit the clean one.
                mask = _unit_mask(chosen[layer, : counts[layer]], value.ndim, unit_axis)
                return jnp.where(mask, clean_values[layer].astype(value.dtype), value)

            return fn

        hooked = _with_hook_fns(model, {n: blend(i) for i, n in enumerate(names)})
        return jnp.asarray(metric(_logits_at(forward, hooked, inputs, window)))

    count = layers * units
    if site_sharding is not None:
        scores = _split_sites(patched_metric, count, chunk_size, site_sharding)
    elif chunk_size is None:
        scores = jax.vmap(patched_metric)(jnp.arange(count))
    else:
        # Bounded memory: vmap inside chunks of sites, chunks one after another.
        scores = jax.lax.map(patched_metric, jnp.arange(count), batch_size=chunk_size)
    return _without_missing_units(scores.reshape(layers, units, *scores.shape[1:]), counts)


def _logits_at(
    forward: Callable, model: Any, inputs: tuple, window: tuple[int, int, int] | None
) -> jax.Array:
    """``forward(model, *inputs)``'s logits; with ``window = (start, stop, seq)`` the final
    norm and the unembedding run at positions ``start..stop-1`` only, the others NaN (the
    metric reads none of them: `_logit_window`)."""
    if window is None:
        return forward(model, *inputs)
    start, stop, seq = window
    logits = forward(model, *inputs, logit_window=(start, stop))
    return _nan_outside(logits, start, stop, seq, axis=1)


def _logit_window(
    m: Model, inputs: tuple, metric: Metric, logit_positions: LogitPositions = "auto"
) -> tuple[int, int, int] | None:
    """``(start, stop, seq)``: the positions of the logits that a run of ``inputs`` (as
    `Model._prepare` gives them) computes for ``metric`` (`logit_positions`, ``"auto"``
    read off the metric), or None for all. Only where the final norm and the unembedding
    act on each position alone and carry no installed hook
    (`gemmalens.layers.transformer.unembeds_per_token`)."""
    tokens = inputs[2] if "decoder_tokens" in m.input_streams else inputs[0]
    batch, seq = tokens.shape
    positions = _normalise_positions(logit_positions, seq)
    read = _read_positions(m, metric, (batch, seq, m.config.vocab_size), positions)
    if not _model_facts(m._frozen).unembeds_per_token:
        return None
    if read is None or read == (0, seq):
        return None
    return (*read, seq)


def _split_sites(
    patched_metric: Callable, count: int, chunk_size: int | None, site_sharding: Any
) -> jax.Array:
    """``vmap(patched_metric)`` over sites ``0 .. count - 1``, the vmapped axis split by
    ``site_sharding`` (inside a trace). The sites are padded up to a multiple of the
    split (of each chunk's split, with ``chunk_size``); a padded site's index is past every
    real one, so it patches nothing, and its score is dropped."""
    ways = _ways(site_sharding)

    def split(sites: jax.Array) -> jax.Array:
        # Constraints on the site index and on the scores (their leading axis; any metric
        # axes stay whole) lay out the vmapped axis of everything between across the
        # devices: XLA's sharding propagation carries them through the forward pass.
        sites = jax.lax.with_sharding_constraint(sites, site_sharding)
        return jax.lax.with_sharding_constraint(jax.vmap(patched_metric)(sites), site_sharding)

    if chunk_size is None:
        padded = -(-count // ways) * ways
        scores = split(jnp.arange(padded))
    else:
        # Each chunk is split across the devices: chunk_size rounded up to a multiple of
        # the split, chunks one after another.
        per_chunk = -(-chunk_size // ways) * ways
        padded = -(-count // per_chunk) * per_chunk
        scores = jax.lax.map(split, jnp.arange(padded).reshape(-1, per_chunk))
        scores = scores.reshape(padded, *scores.shape[2:])
    return scores[:count]


def _ways(site_sharding: Any) -> int:
    """Into how many pieces a 1-D sharding splits its axis."""
    mesh, entry = site_sharding.mesh, site_sharding.spec[0]
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return int(np.prod([mesh.shape[n] for n in names]))


def _off_data(placement: Any, x: Any) -> Any:
    """The array ``x`` laid out as before but whole along the mesh's ``data`` axis (so a
    sequence split on a ``seq`` axis stays); anything else (None, image side inputs) as
    it is. A sweep that splits its sites over the data axis places its inputs so: split
    there by batch too, XLA would have to choose between the two."""
    from gemmalens.sharding import DATA

    if not isinstance(x, jax.Array):
        return x
    mesh = placement.mesh
    spec = getattr(x.sharding, "spec", None)
    if spec is None or getattr(x.sharding, "mesh", None) != mesh:
        entries: list[Any] = [None] * x.ndim
    else:
        entries = []
        for entry in tuple(spec) + (None,) * (x.ndim - len(spec)):
            names = (entry,) if isinstance(entry, str) else tuple(entry or ())
            kept = tuple(n for n in names if n != DATA)
            entries.append(kept[0] if len(kept) == 1 else (kept or None))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*entries))
    return jax.device_put(x, sharding)


@dataclasses.dataclass(frozen=True)
class _Runs:
    """The clean and corrupted runs as the model takes them (`Model._prepare`):
    ``(tokens, mask)`` for a decoder, ``(encoder_tokens, encoder_mask, decoder_tokens,
    decoder_mask)`` for an encoder-decoder (masks None when unpadded); ``forward`` is the
    model's ``logits_of``."""

    clean: tuple
    corrupted: tuple
    forward: Callable
    encoder_decoder: bool

    def capture(self, m: Model, inputs: tuple, names: Sequence[str]) -> list[jax.Array]:
        """The values at ``names`` in the run of ``inputs``."""
        _, values = m._captured(inputs, list(names))
        return [values[n] for n in names]


def _same_shape(what: str, clean: jax.Array, corrupted: jax.Array) -> None:
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"Clean {what} {tuple(clean.shape)} and corrupted {what} "
            f"{tuple(corrupted.shape)} must have the same shape to patch between them."
        )


def _prepare_runs(
    m: Model,
    clean_tokens,
    corrupted_tokens,
    attention_mask,
    corrupted_mask,
    decoder: dict[str, Any],
    media: _Media | None = None,
) -> _Runs:
    """Validated runs. ``decoder``: the decoder keywords of `sweep` (``decoder_tokens``,
    ``corrupted_decoder_tokens``, ``decoder_attention_mask``,
    ``corrupted_decoder_attention_mask``), each None where not given; ``media``: the
    images and audio of both runs (`_Media`)."""
    encoder_decoder = "decoder_tokens" in m.input_streams
    clean_streams, corrupted_streams = {}, {}
    if not encoder_decoder:
        if any(x is not None for x in decoder.values()):
            raise TypeError(
                "decoder_tokens (and the corrupted / mask variants) are for encoder-decoder "
                "models; this model is a decoder: pass its tokens as clean_tokens and "
                "corrupted_tokens."
            )
    elif decoder["decoder_tokens"] is None:
        raise TypeError(
            "Patching an encoder-decoder model needs decoder_tokens=...: the decoder input of "
            "the clean run (and corrupted_decoder_tokens=... when the corrupted run's "
            "decoder input differs; by default it is the same)."
        )
    else:
        clean_streams = {
            "decoder_tokens": decoder["decoder_tokens"],
            "decoder_attention_mask": decoder["decoder_attention_mask"],
        }
        corrupted_streams = {
            "decoder_tokens": _given(
                decoder["corrupted_decoder_tokens"], decoder["decoder_tokens"]
            ),
            "decoder_attention_mask": _given(
                decoder["corrupted_decoder_attention_mask"], decoder["decoder_attention_mask"]
            ),
        }
    clean_media, corrupted_media = (media or _Media()).streams()
    clean_streams = {**clean_streams, **clean_media}
    corrupted_streams = {**corrupted_streams, **corrupted_media}
    clean = m._prepare(clean_tokens, attention_mask, clean_streams)
    corrupted = m._prepare(
        corrupted_tokens, _given(corrupted_mask, attention_mask), corrupted_streams
    )
    what = ("encoder tokens", "decoder tokens") if encoder_decoder else ("tokens",)
    for name, clean_part, corrupted_part in zip(what, clean[::2], corrupted[::2]):
        _same_shape(name, clean_part, corrupted_part)
    return _Runs(clean, corrupted, m.logits_of, encoder_decoder)


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


# An input that describes another: it follows that input into the corrupted run, and is
# not inherited from the clean run when the corrupted run has inputs of its own.
_DESCRIBES = {"input_features_mask": "input_features", "image_position_ids": "pixel_values"}
_PAIRS = {"pixel_values": "images", "input_features": "audio clips"}


@dataclasses.dataclass(frozen=True)
class _Media:
    """The images and audio of a patching call: `sweep`'s ``pixel_values``,
    ``input_features`` (clean) and ``corrupted_*`` keywords, and ``inputs`` /
    ``corrupted_inputs`` for the model's other keyword inputs (masks, position ids,
    token types)."""

    clean: dict[str, Any] = dataclasses.field(default_factory=dict)
    corrupted: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(
        cls,
        pixel_values: Any = None,
        corrupted_pixel_values: Any = None,
        input_features: Any = None,
        corrupted_input_features: Any = None,
        inputs: Mapping[str, Any] | None = None,
        corrupted_inputs: Mapping[str, Any] | None = None,
    ) -> _Media:
        def named(given: dict[str, Any], extra: Mapping[str, Any] | None, which: str):
            extra = dict(extra or {})
            for name in ("tokens", "attention_mask", *given):
                if name in extra:
                    keyword = name if which == "inputs" else f"corrupted_{name}"
                    raise TypeError(
                        f"{which} holds {name!r}: pass it as {keyword}=... instead ({which} "
                        "is for the model's other keyword inputs, e.g. input_features_mask)."
                    )
            return {k: v for k, v in {**given, **extra}.items() if v is not None}

        clean = named(
            {"pixel_values": pixel_values, "input_features": input_features}, inputs, "inputs"
        )
        corrupted = named(
            {"pixel_values": corrupted_pixel_values, "input_features": corrupted_input_features},
            corrupted_inputs,
            "corrupted_inputs",
        )
        return cls(clean, corrupted)

    def streams(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The clean run's keyword inputs and the corrupted run's (each input the
        corrupted run does not give is the clean run's)."""
        for name, what in _PAIRS.items():
            if name in self.corrupted and name not in self.clean:
                raise TypeError(
                    f"corrupted_{name} needs {name}=... for the clean run too (give both "
                    f"to patch between two sets of {what})."
                )
        corrupted = dict(self.corrupted)
        for name, value in self.clean.items():
            owner = _DESCRIBES.get(name)
            if name in corrupted or (owner is not None and owner in self.corrupted):
                continue
            corrupted[name] = value
        return dict(self.clean), corrupted


@dataclasses.dataclass(frozen=True)
class _ModelFacts:
    shares_runs: bool
    unembeds_per_token: bool
    causal: bool
    dtype: str  # of the weights, so of the logits


# Keyed by id, holding the model weakly: a strong reference would keep a deleted model's
# weights (tens of GB at real sizes) alive on the device.
_FACTS: dict[int, tuple[weakref.ref, _ModelFacts]] = {}


def _model_facts(model: Any) -> _ModelFacts:
    """What the sweep needs to know of a model, kept per model object: walking the tree
    takes tens of milliseconds, a fair part of a sweep on a small model."""
    cached = _FACTS.get(id(model))
    if cached is not None and cached[0]() is model:
        return cached[1]
    mixers = pz.select(model).at_instances_of(DotProductAttention).get_sequence()
    tables = pz.select(model).at_instances_of(EmbedTokens).get_sequence()
    facts = _ModelFacts(
        shares_runs=shares_runs(model),
        unembeds_per_token=unembeds_per_token(model),
        # Image blocks see later tokens of their block: not causal where images are given.
        causal=all(mixer.mask.causal and not mixer.mask.image_blocks for mixer in mixers),
        dtype=tables[0].table.value.dtype.name if tables else "float32",
    )
    if len(_FACTS) >= 16:
        _FACTS.clear()
    try:
        _FACTS[id(model)] = (weakref.ref(model), facts)
    except TypeError:  # a tree that cannot be weakly referenced is not cached
        pass
    return facts


def _layers_have_equal_units(config: Any, site: str) -> bool:
    """Whether every layer has as many units of ``site`` as the next (the shared-runs plan
    has one count for all layers)."""
    if SITES[site].unit != "kv_head" or not hasattr(config, "layer_kv_heads"):
        return True
    return len({config.layer_kv_heads(i) for i in range(config.num_hidden_layers)}) == 1


def _shared_plan(m, site, clean, corrupted, clean_mask, corrupted_mask, metric, positions):
    batch, seq = clean.shape
    spec = SITES[site]
    causal = _model_facts(m._frozen).causal
    if causal:  # never past the last position: a plan needs one row per run
        first_diff = min(first_difference(clean, corrupted, clean_mask, corrupted_mask), seq - 1)
    else:
        first_diff = 0
    read = _read_positions(m, metric, (batch, seq, m.config.vocab_size), positions)
    units = {
        "pos": seq,
        "head": m.config.num_attention_heads,
        "kv_head": m.config.num_key_value_heads,
    }[spec.unit]
    return _Plan(
        site=site,
        layers=m.config.num_hidden_layers,
        units=units,
        seq=seq,
        first_diff=first_diff,
        causal=causal,
        read=read,
        arange=clean_mask is None and corrupted_mask is None,
    )


def sweep(
    m: Model,
    clean_tokens: Any,
    corrupted_tokens: Any,
    metric: Metric,
    site: str = "resid_pre",
    attention_mask: Any = None,
    corrupted_attention_mask: Any = None,
    chunk_size: int | None = None,
    logit_positions: LogitPositions = "auto",
    *,
    decoder_tokens: Any = None,
    corrupted_decoder_tokens: Any = None,
    decoder_attention_mask: Any = None,
    corrupted_decoder_attention_mask: Any = None,
    pixel_values: Any = None,
    corrupted_pixel_values: Any = None,
    input_features: Any = None,
    corrupted_input_features: Any = None,
    inputs: Mapping[str, Any] | None = None,
    corrupted_inputs: Mapping[str, Any] | None = None,
) -> jax.Array:
    """Activation patching at every site of one kind, in one compiled program.

    Args:
      m: the model (a decoder, or an encoder-decoder such as T5Gemma 2).
      clean_tokens, corrupted_tokens: ``[batch, seq]`` ids of the same shape (for an
        encoder-decoder: the encoder inputs).
      metric: a jax function of the patched run's logits ``[batch, seq, vocab]`` (an
        encoder-decoder's decoder logits) that returns a scalar (e.g. a logit difference
        averaged over the batch; anything else is a ValueError). Pass the same function
        object again to reuse the compiled sweep.
      site: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out`` or ``mlp_out``
        (sites are ``[layer, pos]``); ``z``, ``q`` or ``pattern`` (``[layer, head]``);
        ``k`` or ``v`` (``[layer, kv_head]``). A head site patches all positions. Models
        with per-layer embeddings add ``per_layer_input`` (``[layer, pos]``); models with
        spliced SAEs (`gemmalens.sae.splice`) add ``features`` (``[sae, feature]``, all
        positions). An
        encoder-decoder's sites name their stack: ``encoder.resid_pre`` (``[layer,
        encoder pos]``), ``decoder.resid_pre`` (``[layer, decoder pos]``), ``decoder.z``
        (the merged self+cross attention's per-head output), ``decoder.cross_pattern``
        (one head's attention to the encoder), ... `available_sites` lists a model's.
      attention_mask: for padded batches (defaults to ``tokens != pad``); the corrupted
        run uses ``corrupted_attention_mask`` when given.
      chunk_size: patch this many sites at a time, each chunk a ``vmap`` of whole forward
        passes (bounds memory on big models, at the price of the sharing described in
        the module docstring); None runs every site in one shared program. On a mesh
        with a data axis each chunk is split across it (``chunk_size`` rounded up to a
        multiple of its size).
      logit_positions: which positions of the logits the metric reads, so that only those
        are computed. ``"auto"`` (default) reads it off the metric (`metric_positions`)
        and computes every position when it cannot be shown; ``"all"`` always computes
        every position; an int, a slice or a list of positions declares them (the
        others are NaN in the logits the metric gets). With a large vocabulary, a metric
        that reads every position holds ``[sites of a layer, batch, seq, vocab]`` logits
        at once in the shared-runs program, ``[sites, batch, seq, vocab]`` (or a chunk's
        sites) in the general one: index the positions statically (``logits[:, -1]``) or
        declare them. (Where the final norm or the unembedding carries a hook or is not
        per-token, every position is computed.)
      decoder_tokens: an encoder-decoder's decoder input in the clean run (required for
        one, refused for a decoder).
      corrupted_decoder_tokens: the decoder input of the corrupted run; defaults to
        ``decoder_tokens``. Corrupt the encoder input (different ``clean_tokens`` and
        ``corrupted_tokens``), the decoder input (different decoder tokens), or both.
      decoder_attention_mask, corrupted_decoder_attention_mask: the decoder masks (the
        corrupted one defaults to the clean one).
      pixel_values, corrupted_pixel_values: a model with its vision tower: the images of
        the clean and the corrupted run, as the model takes them (`Model.__call__`); the
        corrupted run's default to the clean run's. Patch image tokens from another image
        with the same tokens and different images (sites in the text stream; the tower's
        own hook points are not sites). Runs with images take the general form.
      input_features, corrupted_input_features: a model with its audio tower: the clips of
        the two runs, as the model takes them (an `gemmalens.audio.AudioFeatures` carries
        its mask); the corrupted run's default to the clean run's. Patch audio tokens from
        another clip with the same tokens and different clips.
      inputs, corrupted_inputs: the model's other keyword inputs for each run
        (``input_features_mask``, ``token_type_ids``, Gemma 4's ``image_position_ids``,
        ...). The corrupted run takes the clean run's where it gives none, except a mask
        or position ids of clips or images the corrupted run replaces.

    Returns:
      ``[layer, unit]`` metric values: entry ``[l, u]`` is the metric of the corrupted run
      with unit ``u`` (position or head) of layer ``l`` set to its clean value, for every
      batch row at once. Where layers differ in how many units they have (the KV heads of
      Gemma 4's full-attention layers, ``num_global_key_value_heads``), the array is as
      wide as the widest layer and the units a layer lacks are NaN.

    On a mesh (`gemmalens.sharding`) whose ``data`` axis has several devices, the sites
    are split across that axis: each row of devices along it (a whole copy of the model,
    split over ``model``) runs its share. Without one, every device runs every site with
    its slice of the model.

    Example (T5Gemma 2, the encoder input corrupted)::

        scores = patching.sweep(m, clean, corrupted, metric, site="encoder.resid_pre",
                                decoder_tokens=decoder)      # [encoder layer, encoder pos]
    """
    names = site_names(m, site)  # an unknown site is the first error
    runs = _prepare_runs(
        m,
        clean_tokens,
        corrupted_tokens,
        attention_mask,
        corrupted_attention_mask,
        dict(
            decoder_tokens=decoder_tokens,
            corrupted_decoder_tokens=corrupted_decoder_tokens,
            decoder_attention_mask=decoder_attention_mask,
            corrupted_decoder_attention_mask=corrupted_decoder_attention_mask,
        ),
        _Media.of(
            pixel_values,
            corrupted_pixel_values,
            input_features,
            corrupted_input_features,
            inputs,
            corrupted_inputs,
        ),
    )
    program, args, kwargs = _sweep_program(
        m, runs, names, metric, site, chunk_size, logit_positions
    )
    return program(*args, **kwargs)


def _check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None and not (
        isinstance(chunk_size, (int, np.integer))
        and not isinstance(chunk_size, bool)
        and chunk_size >= 1
    ):
        raise ValueError(
            f"chunk_size={chunk_size!r}: patch this many sites at a time, a whole number of "
            "at least 1 (None runs every site in one program)."
        )


def _sweep_program(
    m: Model,
    runs: _Runs,
    names: tuple[str, ...],
    metric: Metric,
    site: str,
    chunk_size: int | None,
    logit_positions: LogitPositions,
    split_sites: bool = True,
) -> tuple[Callable, tuple, dict[str, Any]]:
    """The compiled sweep `sweep` runs, and its arguments: ``program(*args, **kwargs)``.
    (Apart so that a test can compile it with and without ``split_sites`` and compare.)

    On a mesh with a data axis (and ``split_sites``) the sites are split across it
    (`_split_sites`, or the rows of the shared runs: `_sweep_shared`); the inputs then
    leave that axis to them."""
    _check_chunk_size(chunk_size)
    site_sharding = None
    if split_sites and m.placement is not None:
        site_sharding = m.placement.site_sharding()
    inputs = runs.corrupted
    if site_sharding is not None:
        inputs = tuple(_off_data(m.placement, x) for x in inputs)
    if (
        not runs.encoder_decoder
        and len(runs.clean) == 2  # no images or audio: the shared runs read tokens and masks
        and site in SITES
        and chunk_size is None
        and _model_facts(m._frozen).shares_runs
        and _layers_have_equal_units(m.config, site)
    ):
        (clean, clean_mask), (corrupted, corrupted_mask) = runs.clean, inputs
        rows_sharding = None
        if site_sharding is not None:
            clean, clean_mask = (_off_data(m.placement, x) for x in (clean, clean_mask))
            rows = jax.sharding.PartitionSpec(None, site_sharding.spec[0], None)
            rows_sharding = jax.sharding.NamedSharding(site_sharding.mesh, rows)
        positions = _normalise_positions(logit_positions, clean.shape[1])
        plan = _shared_plan(
            m, site, clean, corrupted, clean_mask, corrupted_mask, metric, positions
        )
        args = (m._frozen_distinct, clean, corrupted, clean_mask, corrupted_mask)
        kwargs = dict(plan=plan, metric=metric, rows_sharding=rows_sharding)
        return _sweep_shared, args, kwargs
    clean_values = runs.capture(m, runs.clean, names)
    if site == FEATURES_SITE:
        _check_feature_widths(names, clean_values)
    if site_sharding is not None:
        clean_values = [_off_data(m.placement, v) for v in clean_values]
    kwargs = dict(
        names=names,
        unit_axis=site_spec(site).unit_axis,
        metric=metric,
        chunk_size=chunk_size,
        forward=runs.forward,
        site_sharding=site_sharding,
        window=_logit_window(m, runs.corrupted, metric, logit_positions),
    )
    return _sweep_vmapped, (m._frozen_distinct, clean_values, inputs), kwargs


@compiling.jit(static_argnames=("names", "metric", "forward", "window"))
def _metric_and_grads(model, zeros, inputs, *, names, metric, forward, window=None):
    model = model.tree()  # a `Distinct`

    def run(deltas):
        # Adding a zero offset at each hook makes d metric / d offset = d metric / d value.
        fns = {n: (lambda d: lambda value, name: value + d)(deltas[i]) for i, n in enumerate(names)}
        return jnp.asarray(metric(_logits_at(forward, _with_hook_fns(model, fns), inputs, window)))

    return jax.value_and_grad(run)(zeros)


def attribution_patching(
    m: Model,
    clean_tokens: Any,
    corrupted_tokens: Any,
    metric: Metric,
    site: str = "resid_pre",
    attention_mask: Any = None,
    corrupted_attention_mask: Any = None,
    *,
    decoder_tokens: Any = None,
    corrupted_decoder_tokens: Any = None,
    decoder_attention_mask: Any = None,
    corrupted_decoder_attention_mask: Any = None,
    pixel_values: Any = None,
    corrupted_pixel_values: Any = None,
    input_features: Any = None,
    corrupted_input_features: Any = None,
    inputs: Mapping[str, Any] | None = None,
    corrupted_inputs: Mapping[str, Any] | None = None,
    logit_positions: LogitPositions = "auto",
) -> jax.Array:
    """The first-order estimate of `sweep`'s effects, from one forward and backward pass.

    For each site, ``(clean_value - corrupted_value) . d metric / d value`` with the
    gradient taken on the corrupted run and the dot product over every axis but the
    site's unit (so over batch, d_model / d_head / key positions). It estimates
    ``sweep(...)[l, u] - metric(corrupted run)``: note the *difference*, not the metric.
    ``logit_positions`` is `sweep`'s: the positions of the logits computed (the others
    NaN in what the metric gets). Where the metric of the corrupted run is NaN, every
    estimate is NaN.

    Returns:
      ``[layer, unit]`` like `sweep`, NaN where `sweep` is (same arguments, same site
      names, the same decoder arguments for an encoder-decoder, the same images, clips and
      ``inputs`` for a model with a vision or audio tower).
    """
    names = site_names(m, site)
    spec = site_spec(site)
    runs = _prepare_runs(
        m,
        clean_tokens,
        corrupted_tokens,
        attention_mask,
        corrupted_attention_mask,
        dict(
            decoder_tokens=decoder_tokens,
            corrupted_decoder_tokens=corrupted_decoder_tokens,
            decoder_attention_mask=decoder_attention_mask,
            corrupted_decoder_attention_mask=corrupted_decoder_attention_mask,
        ),
        _Media.of(
            pixel_values,
            corrupted_pixel_values,
            input_features,
            corrupted_input_features,
            inputs,
            corrupted_inputs,
        ),
    )
    clean_values = runs.capture(m, runs.clean, names)
    corrupted_values = runs.capture(m, runs.corrupted, names)
    if site == FEATURES_SITE:
        _check_feature_widths(names, clean_values)
    zeros = [jnp.zeros_like(v) for v in corrupted_values]
    value, grads = _metric_and_grads(
        m._frozen_distinct,
        zeros,
        runs.corrupted,
        names=names,
        metric=metric,
        forward=runs.forward,
        window=_logit_window(m, runs.corrupted, metric, logit_positions),
    )
    scores = []
    for clean, corrupted, grad in zip(clean_values, corrupted_values, grads):
        delta = (clean - corrupted).astype(jnp.float32)
        product = delta * grad.astype(jnp.float32)
        other_axes = tuple(a for a in range(product.ndim) if a != spec.unit_axis)
        scores.append(product.sum(axis=other_axes))
    counts = _unit_counts(clean_values, spec.unit_axis)
    units = max(counts)
    scores = jnp.stack([jnp.pad(score, (0, units - score.shape[0])) for score in scores])
    # A NaN metric (e.g. one reading a logit position outside `logit_positions`) has a
    # gradient of zero through the NaN it read: give NaN, as `sweep` does, not zeros.
    scores = jnp.where(jnp.isnan(value), jnp.nan, scores)
    return _without_missing_units(scores, counts)


# --------------------------------------------------------------- path patching

_PATH_LABEL = "gemmalens.path_receiver:"
# The keywords of `sweep` that describe the runs beyond tokens and masks.
_RUN_KEYWORDS = (
    "decoder_tokens",
    "corrupted_decoder_tokens",
    "decoder_attention_mask",
    "corrupted_decoder_attention_mask",
    "pixel_values",
    "corrupted_pixel_values",
    "input_features",
    "corrupted_input_features",
    "inputs",
    "corrupted_inputs",
)

Receivers = Mapping[str, Union[int, Sequence[int], None]]


def _head_outputs(m: Model) -> tuple[str, ...]:
    """Every attention head output (``hook_z``) of every text stack, in forward order."""
    return tuple(n for stack in _stacks(m) for n in site_names(m, f"{stack}z"))


def _checked_receivers(
    m: Model, receivers: Receivers
) -> tuple[tuple[str, tuple[int, ...] | None], ...]:
    """``receivers`` as ``((hook name, heads or None), ...)``, each name and head checked."""
    from gemmalens.lens import _unknown_hook_message

    if not isinstance(receivers, Mapping) or not receivers:
        raise TypeError(
            "receivers maps hook names to the heads that receive (None: the whole value), "
            "e.g. {'blocks.4.attn.hook_q': [0, 2]}; receivers=None measures the path to "
            f"the logits. Got {receivers!r:.80}."
        )
    checked = []
    for name, heads in receivers.items():
        if name not in m.hook_names:
            raise KeyError(_unknown_hook_message(name, m.hook_names, m.config.family))
        if name.endswith(".attn.hook_z"):
            raise ValueError(
                f"{name!r} is a head output, which path patching holds at its corrupted "
                "value: a receiver is what a head reads (its hook_q, hook_k or hook_v) or "
                "a residual-stream hook. (For a head's whole effect use sweep(site='z').)"
            )
        if heads is None:
            checked.append((name, None))
            continue
        listed = [heads] if isinstance(heads, (int, np.integer)) else list(heads)
        checked.append((name, tuple(int(h) for h in listed)))
    return tuple(checked)


@compiling.jit(
    static_argnames=(
        "senders",
        "frozen",
        "receivers",
        "metric",
        "chunk_size",
        "forward",
        "run",
        "window",
    )
)
def _path_vmapped(
    model,
    clean_values,
    held_values,
    inputs,
    *,
    senders,
    frozen,
    receivers,
    metric,
    chunk_size,
    forward,
    run,
    window=None,
):
    """Every sender head's path-patched metric, ``[layer, head]`` (see `path_patching`)."""
    model = model.tree()  # a `Distinct`
    counts = _unit_counts(clean_values, 2)
    layers, units = len(senders), max(counts)
    held = dict(zip(frozen, held_values))

    def patched_metric(site: jax.Array) -> jax.Array:
        chosen = (jnp.arange(layers * units) == site).reshape(layers, units)

        def hold(name: str) -> Callable:
            def fn(value: jax.Array, _: str) -> jax.Array:
                return held[name].astype(value.dtype)

            return fn

        def send(layer: int) -> Callable:
            def fn(value: jax.Array, _: str) -> jax.Array:
                mask = _unit_mask(chosen[layer, : counts[layer]], value.ndim, 2)
                clean = clean_values[layer].astype(value.dtype)
                return jnp.where(mask, clean, held[senders[layer]].astype(value.dtype))

            return fn

        fns = {name: hold(name) for name in frozen}
        fns.update({name: send(i) for i, name in enumerate(senders)})
        holding = _with_hook_fns(model, fns)
        if not receivers:
            return jnp.asarray(metric(_logits_at(forward, holding, inputs, window)))
        capturing = capture_hooks(holding, {n for n, _ in receivers}, _PATH_LABEL)
        unbound, state = pz.unbind_state_vars(capturing)
        _, values = run(unbound, [v.freeze() for v in state], *inputs)
        received = {v.label[len(_PATH_LABEL) :]: v.value for v in values}

        def receive(name: str, heads: tuple[int, ...] | None) -> Callable:
            def fn(value: jax.Array, hook: str) -> jax.Array:
                new = received[name].astype(value.dtype)
                if heads is None:
                    return new
                if value.ndim != 4:
                    raise ValueError(
                        f"receivers[{hook!r}] names heads, but its value {value.shape} has no "
                        "head axis ([batch, pos, head, d_head]): pass None for the whole value."
                    )
                index = checked_indices(heads, value.shape[2], "head", repr(hook))
                selected = jnp.zeros(value.shape[2], bool).at[index].set(True)
                return jnp.where(_unit_mask(selected, value.ndim, 2), new, value)

            return fn

        receiving = _with_hook_fns(model, {n: receive(n, h) for n, h in receivers})
        return jnp.asarray(metric(_logits_at(forward, receiving, inputs, window)))

    count = layers * units
    if chunk_size is None:
        scores = jax.vmap(patched_metric)(jnp.arange(count))
    else:
        scores = jax.lax.map(patched_metric, jnp.arange(count), batch_size=chunk_size)
    return _without_missing_units(scores.reshape(layers, units), counts)


def path_patching(
    m: Model,
    clean_tokens: Any,
    corrupted_tokens: Any,
    metric: Metric,
    receivers: Receivers | None = None,
    site: str = "z",
    attention_mask: Any = None,
    corrupted_attention_mask: Any = None,
    chunk_size: int | None = None,
    logit_positions: LogitPositions = "auto",
    **run_inputs: Any,
) -> jax.Array:
    """Path patching (Wang et al. 2022, the IOI circuit) from every attention head of a
    stack, in one compiled program: how much of each head's effect travels to
    ``receivers`` (or straight to the logits) without passing through another head.

    For each sender head, the corrupted run is made with the sender's output (its
    ``hook_z``) set to its clean value and *every other head's output, in every layer and
    stack, held at its corrupted value*. MLPs and the family's other per-token layers
    (Gemma 3n's AltUp, LAuReL and per-layer inputs; Gemma 4's experts, per-layer inputs
    and layer scalars; soft-caps) are recomputed, as in Wang et al.:

    - ``receivers=None``: the score is the metric of that run, the sender's effect on the
      logits through the residual stream and the MLPs alone (its *direct* path).
    - ``receivers={hook name: heads or None}``: the receivers' values are read from that
      run and patched into a plain corrupted run (the named heads of a ``[batch, pos,
      head, d_head]`` value such as ``blocks.5.attn.hook_q``, or the whole value for
      None, e.g. a ``hook_resid_pre``); everything after them is recomputed. The score is
      the metric of that run: the sender's effect through the receivers only.

    The convention is `sweep`'s: the corrupted run with clean values patched in, so a
    sender with no path to the receivers scores the corrupted run's metric (swap the two
    prompts to patch corrupted values into the clean run instead). A sender at or after
    the receivers' layer has no path to them and scores that too.

    ``m``, the tokens, ``metric``, the masks, ``chunk_size`` and ``logit_positions`` are
    `sweep`'s.

    Args:
      receivers: see above; a head output (``hook_z``) cannot receive (it is held).
      site: the senders, every head of a stack: ``z``, or an encoder-decoder's
        ``encoder.z`` / ``decoder.z``.
      run_inputs: `sweep`'s keywords for the rest of the runs (``decoder_tokens``,
        ``corrupted_decoder_tokens``, the decoder masks, ``pixel_values``,
        ``input_features`` and their ``corrupted_`` forms, ``inputs``,
        ``corrupted_inputs``).

    Returns:
      ``[layer, head]`` of the sender stack, NaN where a layer has fewer heads.
    """
    if site.removeprefix("encoder.").removeprefix("decoder.") != "z":
        raise ValueError(
            f"site={site!r}: path patching sends from attention heads, site 'z' (an "
            "encoder-decoder's 'encoder.z' or 'decoder.z')."
        )
    unknown = sorted(set(run_inputs) - set(_RUN_KEYWORDS))
    if unknown:
        raise TypeError(
            f"path_patching got unexpected keywords {unknown}; the runs take "
            f"{', '.join(_RUN_KEYWORDS)} (as in sweep)."
        )
    senders = site_names(m, site)
    _check_chunk_size(chunk_size)
    checked = None if receivers is None else _checked_receivers(m, receivers)
    given = {k: run_inputs.get(k) for k in _RUN_KEYWORDS}
    runs = _prepare_runs(
        m,
        clean_tokens,
        corrupted_tokens,
        attention_mask,
        corrupted_attention_mask,
        {k: given[k] for k in _RUN_KEYWORDS[:4]},
        _Media.of(*(given[k] for k in _RUN_KEYWORDS[4:])),
    )
    frozen = _head_outputs(m)
    clean_values = runs.capture(m, runs.clean, senders)
    held_values = runs.capture(m, runs.corrupted, frozen)
    return _path_vmapped(
        m._frozen_distinct,
        clean_values,
        held_values,
        runs.corrupted,
        senders=senders,
        frozen=frozen,
        receivers=checked,
        metric=metric,
        chunk_size=chunk_size,
        forward=runs.forward,
        run=m.captured_run,
        window=_logit_window(m, runs.corrupted, metric, logit_positions),
    )
