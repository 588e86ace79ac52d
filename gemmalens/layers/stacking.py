"""Layer stacking: blocks of the same shape keep one stored array per parameter and run as
one compiled loop body, so that compile time does not grow with depth.

Two pieces, both invisible to the analyses:

* **Stacked storage.** Every parameter of a block stack (``blocks.{i}.*``,
  ``encoder.blocks.{i}.*``, ``vision.blocks.{i}.*``, ...) of one name and shape lives in
  one `pz.Parameter` whose value has a leading positional *layer* axis, labelled with a
  ``*`` for the layer (``blocks.*.attn.q_proj.weights``). In the tree, each block still
  holds its own parameter, now a `LayerSlice`: a view with the per-layer label
  (``blocks.17.attn.q_proj.weights``) whose ``.value`` is that layer's slice. So the tree
  keeps its per-layer shape: Treescope shows every block, hook names and captures stay
  per layer, and editing a block (a LoRA adapter, a spliced SAE, a new weight) edits that
  block alone.
* **Scanned execution.** `ScannedSequential` replaces a stack's `pz.nn.Sequential`. When
  it is traced it compares its blocks and runs each run of loopable blocks as one
  `jax.lax.scan` over layers (`plan_loops`), reading each layer's weights from the stacks
  by the loop counter. Kinds of block (Gemma 3's local and global layers) share the loop:
  where they hold the same stacks and differ only in layers their parents only call (the
  RoPE base, the attention's window), one step runs them all with a `jax.lax.switch` on
  the kind around just those layers (`_merged_step`); otherwise the step switches between
  the kinds' whole parts. Blocks that differ from their neighbours (an edited block, a
  KV-sharing producer or consumer) run as they are. `LOOP_STYLE = "periods"` loops over
  repeats of the layer pattern's period instead (`plan_runs`).

Hooks inside a scanned run keep their per-layer meaning: an intervention at
``blocks.17.attn.hook_pattern`` becomes a `jax.lax.switch` on the loop counter, so only
layer 17 runs it, under ``vmap`` and ``grad`` too; captures are returned by the loop and
written to each layer's own cache entry. A block whose set of captured hooks differs from
its neighbours' (one captured layer among many) runs on its own, so the loop never carries
values nobody asked for.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import re
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens import sharding
from gemmalens.layers.attention import Attention
from gemmalens.layers.hooks import CaptureHook, HookPoint, InterveneHook
from gemmalens.layers.kv_sharing import KVProducer, SharedKVAttention

# A stack's parameters: "<stack>.blocks.<index>.<rest>" (the stack prefix may be empty).
_BLOCK_LABEL = re.compile(r"^(?P<stack>(?:.*\.)?blocks)\.(?P<index>\d+)\.(?P<rest>.+)$")
_BLOCK_NAME = re.compile(r"^(?:.*\.)?blocks\.\d+$")
# Layers that publish or read values through a side input shared by the whole stack.
_SHARES_STATE = (KVProducer, SharedKVAttention)
# The longest period looked for (Gemma 3's is 6; Gemma 4's 6; room for others).
MAX_PERIOD = 8


def take_layer(stacked: pz.nx.NamedArray, index: Any) -> pz.nx.NamedArray:
    """The slice ``index`` of a stacked value (a leading positional layer axis, then the
    parameter's named axes). ``index`` may be traced (a loop counter)."""
    if isinstance(stacked, pz.nx.NamedArray) and len(stacked.positional_shape) == 1:
        # The stored layout, indexed directly (an `nmap` costs more to trace, once per
        # parameter of every layer).
        layer = jax.lax.dynamic_index_in_dim(stacked.data_array, index, keepdims=False)
        return pz.nx.NamedArray(named_axes=stacked.named_axes, data_array=layer)
    return pz.nx.nmap(lambda layers: layers[index])(stacked)


@pz.pytree_dataclass
class LayerSlice(pz.Struct):
    """One layer's parameter, stored as slice ``index`` of a shared stack.

    Reads like a `pz.Parameter`: ``.value`` is this layer's value (named axes as the
    unstacked parameter had), ``.label`` its per-layer label. ``stack`` is the
    `pz.Parameter` (or its frozen value) that every layer's slice shares.
    """

    stack: Any
    index: int = dataclasses.field(metadata={"pytree_node": False})
    label: str = dataclasses.field(metadata={"pytree_node": False})

    @property
    def value(self) -> pz.nx.NamedArray:
        return take_layer(self.stack.value, self.index)

    def treescope_color(self) -> str:
        return "#a0b0c9"

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        # One line per layer: its label and where it lives, not the whole stack again.
        from treescope import repr_lib

        stored = getattr(self.stack, "value", None)
        where = f"layer {self.index} of {self.stack.label}"
        if isinstance(stored, pz.nx.NamedArrayBase):
            axes = ", ".join(f"{n}:{s}" for n, s in stored.named_shape.items())
            where += f" ({stored.positional_shape[0]} layers | {axes}, {stored.dtype})"
        return repr_lib.render_object_constructor(
            type(self),
            {"label": self.label, "stored_as": where},
            path,
            subtree_renderer,
            roundtrippable=False,
            color=self.treescope_color(),
        )


@pz.pytree_dataclass
class LayerNumber(pz.Struct):
    """A block's own layer number, where a layer reads per-layer data by it (Gemma 3n's
    and Gemma 4's per-layer inputs). Inside a scanned run ``value`` is the loop's
    (traced) layer number; elsewhere the int."""

    value: int = dataclasses.field(metadata={"pytree_node": False})


@dataclasses.dataclass(frozen=True)
class _LoopNumber:
    value: Any


def _stack_key(label: str, value: pz.nx.NamedArray) -> tuple[Hashable, ...] | None:
    match = _BLOCK_LABEL.match(label)
    if match is None:
        return None
    shape = tuple(value.named_shape.items())
    return (match["stack"], match["rest"], shape, str(value.dtype))


def _is_block_stack(layer: Any) -> bool:
    return (
        type(layer) is pz.nn.Sequential
        and len(layer.sublayers) >= 2
        and all(
            isinstance(b, pz.nn.NamedGroup) and _BLOCK_NAME.match(b.name) for b in layer.sublayers
        )
    )


@functools.cache
def _stack_into(sharding: Any) -> Any:
    """``jnp.stack`` of per-layer arrays straight into ``sharding`` (a stack's)."""
    return jax.jit(lambda arrays: jnp.stack(arrays), out_shardings=sharding)


@functools.cache
def _layer_into(sharding: Any) -> Any:
    """Layer ``index`` of a stack straight into ``sharding`` (its per-layer parameter's)."""
    return jax.jit(
        lambda stack, index: jax.lax.dynamic_index_in_dim(stack, index, keepdims=False),
        out_shardings=sharding,
    )


class _FromValues:
    """Stacks made from the per-layer values the tree holds; with ``placement`` (a
    `gemmalens.sharding.Placement`) each stack is placed by its `stack_sharding`."""

    def __init__(self, donate: bool, placement: Any = None):
        self.donate, self.placement = donate, placement

    def stack(self, members: list[pz.Parameter]) -> jax.Array:
        named_shape = members[0].value.named_shape
        axes = tuple(named_shape)
        arrays = [m.value.unwrap(*axes) for m in members]
        if self.placement is None:
            stacked = jnp.stack(arrays)
        else:
            stacked = _stack_into(self.placement.stack_sharding(named_shape))(arrays)
        if self.donate:
            for array in arrays:
                if isinstance(array, jax.Array) and not array.is_deleted():
                    array.delete()
        return stacked

    def single(self, param: pz.Parameter) -> pz.Parameter:
        return param


class _FromSource:
    """Stacks made directly by a `ParamSource` from the requests a placeholder build
    recorded: each stack is written once, in one piece, and no per-layer copy of a stacked
    parameter ever exists (no second copy of the model, no freed per-layer arrays leaving
    the device memory in pieces too small for the next stack)."""

    def __init__(self, source: Any, requests: dict[str, Any]):
        self.source, self.requests = source, requests

    def stack(self, members: list[pz.Parameter]) -> jax.Array:
        requests = [self.requests[m.label] for m in members]
        make = getattr(self.source, "stack", None)
        if make is not None:
            return make(requests)
        # A source without a stacked form: one layer at a time, each freed once copied.
        placement = sharding.active()
        return _FromValues(True, placement).stack([self.source(r) for r in requests])

    def single(self, param: pz.Parameter) -> pz.Parameter:
        return self.source(self.requests[param.label])


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)  # value, label
class _Placeholder(pz.ParameterValue):
    """A parameter not made yet: its value is a `jax.ShapeDtypeStruct` (`build_stacked`)."""


@dataclasses.dataclass
class _Placeholders:
    """A `ParamSource` that records each request and returns a parameter holding only its
    shape (`build_stacked` fills it in)."""

    dtype: Any
    requests: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, request: Any) -> _Placeholder:
        self.requests[request.label] = request
        shape = jax.ShapeDtypeStruct(request.shape, self.dtype)
        value = pz.nx.NamedArray(named_axes=collections.OrderedDict(request.axes), data_array=shape)
        return _Placeholder(value=value, label=request.label)


_BUILD_STACKED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "build_stacked", default=False
)


@contextlib.contextmanager
def stacked_builds() -> Iterator[None]:
    """Inside this, checkpoint readers build their trees stacked (`build_stacked`):
    ``gemmalens.load(..., stack_layers=True)``."""
    token = _BUILD_STACKED.set(True)
    try:
        yield
    finally:
        _BUILD_STACKED.reset(token)


def building_stacked() -> bool:
    """Whether a reader should build stacked (`stacked_builds`)."""
    return _BUILD_STACKED.get()


def build_stacked(build: Any, source: Any) -> Any:
    """``build(source)`` with its block stacks stacked (as `stack_tree` makes them), each
    stack made directly by ``source``: its ``stack(requests)`` method where it has one (a
    random initialisation writes each stack in one program; a checkpoint stacks on the
    host and copies once), else one layer at a time. The peak memory is the model's.

    Inside `gemmalens.sharding.placing` the source places what it makes: each stack by
    the placement's `stack_sharding` (each device reading only its slice of a
    checkpoint's tensors), the other parameters as in a per-layer build."""
    placeholders = _Placeholders(source.dtype)
    tree = build(placeholders)
    return stack_tree(tree, filler=_FromSource(source, placeholders.requests))


# What `stack_tree` stacks: parameters, and placeholders of parameters to be made.
_OWN = (pz.Parameter, _Placeholder)


def stack_tree(tree: Any, donate: bool = False, filler: Any = None, placement: Any = None) -> Any:
    """``tree`` with its block stacks' parameters stored stacked (`LayerSlice` views) and
    its block stacks run by `ScannedSequential`.

    ``donate``: delete each per-layer array once it is copied into its stack, so that the
    peak memory is the model plus one stack (the input tree is unusable afterwards).
    ``filler``: where the values come from (`build_stacked`); the tree's own by default.
    ``placement``: the `gemmalens.sharding.Placement` of a tree on a mesh: each stack made
    from the tree's values is placed by its `stack_sharding` (the layer axis whole, the
    named axes as each layer's parameter was placed).
    """
    filler = filler or _FromValues(donate, placement)
    params = pz.select(tree).at_instances_of(_OWN).get_sequence()
    groups: dict[tuple, list[pz.Parameter]] = collections.defaultdict(list)
    seen: set[int] = set()
    for param in params:
        if id(param) in seen:
            continue
        seen.add(id(param))
        key = _stack_key(param.label, param.value)
        if key is not None:
            groups[key].append(param)
    names = collections.Counter((stack, rest) for stack, rest, *_ in groups)
    replaced: dict[int, Any] = {}
    for (stack_name, rest, shape, _), members in groups.items():
        label = f"{stack_name}.*.{rest}"
        if names[(stack_name, rest)] > 1:
            label += "[" + ",".join(f"{a}={n}" for a, n in shape) + "]"
        value = pz.nx.NamedArray(
            named_axes=collections.OrderedDict(shape), data_array=filler.stack(members)
        )
        stack = pz.Parameter(value=value, label=label)
        for index, member in enumerate(members):
            replaced[id(member)] = LayerSlice(stack=stack, index=index, label=member.label)
    singles: dict[int, Any] = {}

    def replace(param: pz.Parameter) -> Any:
        if id(param) in replaced:
            return replaced[id(param)]
        if id(param) not in singles:  # a shared parameter stays one object
            singles[id(param)] = filler.single(param)
        return singles[id(param)]

    stacked_tree = pz.select(tree).at_instances_of(_OWN).apply(replace)
    return (
        pz.select(stacked_tree)
        .at_instances_of(pz.nn.Sequential)
        .where(_is_block_stack)
        .apply(lambda seq: ScannedSequential(sublayers=list(seq.sublayers)))
    )


def unstack_tree(tree: Any, placement: Any = None) -> Any:
    """The inverse of `stack_tree`: every `LayerSlice` becomes its own parameter again (a
    copy of its slice) and every `ScannedSequential` a plain `pz.nn.Sequential`. With
    ``placement`` (a tree on a mesh), each slice is placed by the placement's
    `~gemmalens.sharding.Placement.sharding`, as a per-layer parameter is."""

    def own(view: LayerSlice) -> pz.Parameter:
        if placement is None:
            return pz.Parameter(value=view.value, label=view.label)
        stored = view.stack.value
        take = _layer_into(placement.sharding(stored.named_shape))
        value = pz.nx.NamedArray(
            named_axes=stored.named_axes, data_array=take(stored.data_array, view.index)
        )
        return pz.Parameter(value=value, label=view.label)

    tree = pz.select(tree).at_instances_of(LayerSlice).apply(own)
    return (
        pz.select(tree)
        .at_instances_of(ScannedSequential)
        .apply(lambda seq: pz.nn.Sequential(sublayers=list(seq.sublayers)))
    )


def parameter_values(tree: Any) -> dict[str, pz.nx.NamedArray]:
    """Every parameter's value by its per-layer label (``blocks.3.attn.q_proj.weights``),
    whether stored on its own or as a slice of a stack."""
    _, params = pz.unbind_params(tree)
    values = {p.label: p.value for p in params if ".*." not in p.label}
    for view in pz.select(tree).at_instances_of(LayerSlice).get_sequence():
        values[view.label] = view.value
    return values


def is_stacked(tree: Any) -> bool:
    """Whether ``tree`` stores any parameter stacked."""
    return bool(pz.select(tree).at_instances_of(LayerSlice).count())


# ---------------------------------------------------------------------------- execution


def _is_unit(node: Any) -> bool:
    return isinstance(node, (LayerSlice, HookPoint, LayerNumber))


def _contents(block: Any) -> Any:
    return block.sublayers if isinstance(block, pz.nn.NamedGroup) else block


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) :] if name.startswith(prefix) else name


@dataclasses.dataclass(frozen=True)
class _Flat:
    """A block split into its structure and its leaves (slices and hooks kept whole)."""

    block: Any
    treedef: Any
    leaves: list[Any]
    signature: Hashable
    prefix: str  # the block's hook-name prefix (``blocks.17.``)


def _flatten(block: Any, prefix: str | None = None) -> _Flat:
    """``block`` (or a part of one: ``prefix`` is then its block's) as a `_Flat`."""
    leaves, treedef = jax.tree.flatten(_contents(block), is_leaf=_is_unit)
    if prefix is None:
        prefix = block.name + "." if isinstance(block, pz.nn.NamedGroup) else ""
    keys: list[Hashable] = []
    for leaf in leaves:
        if isinstance(leaf, LayerSlice):
            keys.append(("slice", leaf.stack.label))
        elif isinstance(leaf, LayerNumber):
            keys.append(("layer number",))
        elif isinstance(leaf, HookPoint):
            # Interventions are per layer inside a run (a switch); captures are not: a
            # block whose captured hooks differ from its neighbours' runs on its own.
            keys.append(("hook", _relative(leaf.name, prefix), leaf.axes, _captures(leaf)))
        else:
            keys.append(("leaf", id(leaf)))
    return _Flat(block, treedef, leaves, (treedef, tuple(keys)), prefix)


def _captures(hook: HookPoint) -> bool:
    return isinstance(hook, CaptureHook)


def plan_runs(signatures: Sequence[Hashable], max_period: int = MAX_PERIOD) -> list[tuple]:
    """Splits blocks into runs: ``("scan", start, period, repeats)`` where the blocks
    ``start .. start + period * repeats`` repeat with ``period``, ``("one", index)`` for a
    block that runs alone. Takes, at each position, the period that covers most blocks
    (the shortest on a tie)."""
    plan: list[tuple] = []
    n = len(signatures)
    i = 0
    while i < n:
        best_period, best_repeats = 1, 1
        for period in range(1, min(max_period, (n - i) // 2) + 1):
            head = signatures[i : i + period]
            repeats = 1
            while (
                i + (repeats + 1) * period <= n
                and signatures[i + repeats * period : i + (repeats + 1) * period] == head
            ):
                repeats += 1
            if repeats >= 2 and repeats * period > best_period * best_repeats:
                best_period, best_repeats = period, repeats
        if best_repeats >= 2:
            plan.append(("scan", i, best_period, best_repeats))
            i += best_period * best_repeats
        else:
            plan.append(("one", i))
            i += 1
    return plan


def _loopable(flat: _Flat, shares_state: dict) -> bool:
    # Only slices, hooks and layer numbers vary; anything else (a block's own parameter)
    # makes the block run on its own, and so does a block that hands values to later
    # blocks through a side input (a KV-sharing producer or consumer). Blocks of one tree
    # structure are alike in that: ``shares_state`` keeps the answer per structure (the
    # search walks the whole block, 3 ms a block on a CPU, at every trace).
    if any(key[0] == "leaf" for key in flat.signature[1]):
        return False
    treedef = flat.signature[0]
    if treedef not in shares_state:
        shares_state[treedef] = bool(pz.select(flat.block).at_instances_of(_SHARES_STATE).count())
    return not shares_state[treedef]


def _captured_names(flat: _Flat) -> frozenset:
    return frozenset(key[1] for key in flat.signature[1] if key[0] == "hook" and key[3])


def plan_loops(flats: Sequence[_Flat]) -> list[tuple]:
    """Splits blocks into loops: ``("loop", start, stop, kinds)`` where blocks ``start ..
    stop - 1`` run as one loop over layers, each layer choosing its kind of block (its
    distinct structure: Gemma 3's local and global layers are two kinds) by a switch on
    the loop counter; ``("one", index)`` for a block that runs alone (one holding its own
    parameters or shared state). The blocks of a loop capture the same hooks."""
    plan: list[tuple] = []
    shares_state: dict[Any, bool] = {}
    i, n = 0, len(flats)
    while i < n:
        j = i + 1
        if _loopable(flats[i], shares_state):
            while (
                j < n
                and _loopable(flats[j], shares_state)
                and _captured_names(flats[j]) == _captured_names(flats[i])
            ):
                j += 1
        if j - i >= 2:
            plan.append(("loop", i, j, len({f.signature for f in flats[i:j]})))
        else:
            plan.append(("one", i))
        i = j
    return plan


#: How `ScannedSequential` loops: ``"kinds"`` (`plan_loops`: one copy of each kind of
#: block in the compiled program) or ``"periods"`` (`plan_runs`: one copy of each block of
#: the repeating period, no switch).
LOOP_STYLE = "kinds"
#: Layers per step of a loop over kinds (`jax.lax.scan`'s ``unroll``): 1 keeps the program
#: smallest; more lets XLA schedule across neighbouring layers, at that multiple of the
#: loop body's compile time. Like `LOOP_STYLE`, read when a program is traced: set it
#: before the first call (programs already compiled keep theirs).
LOOP_UNROLL = 1


@dataclasses.dataclass
class _LoopHook:
    """Stands in a scanned block for one hook position: runs the repeat's own
    intervention (a switch on the loop counter) and hands captured values to the loop."""

    hooks: tuple[HookPoint, ...]
    counter: Any
    captured: dict[Any, Any]
    key: Any

    @property
    def name(self) -> str:
        return self.hooks[0].name

    @property
    def axes(self) -> tuple[str, ...]:
        return self.hooks[0].axes

    def __call__(self, value: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        fns = [getattr(h, "fn", None) for h in self.hooks]
        if any(fn is not None for fn in fns):
            order = tuple(value.named_shape)

            def branch(hook: HookPoint, fn: Any) -> Any:
                if fn is None:
                    return lambda v: v
                intervene = InterveneHook(name=hook.name, axes=hook.axes, fn=fn)
                return lambda v: intervene(v).order_as(*order)

            branches = [branch(h, fn) for h, fn in zip(self.hooks, fns)]
            value = value.order_as(*order)
            value = jax.lax.switch(self.counter, branches, value)
        if _captures(self.hooks[0]):
            self.captured[self.key] = self.hooks[0].to_user(value)
        return value


def _loop_hook(hooks: tuple[HookPoint, ...], counter: Any, captured: dict, key: Any) -> Any:
    """What stands at a hook position inside a loop: the bare hook point where no layer
    intervenes or captures there (so that layers that test for bare hooks, such as
    attention choosing its fused kernel, see one), else a `_LoopHook`."""
    if not _captures(hooks[0]) and all(getattr(h, "fn", None) is None for h in hooks):
        return HookPoint(name=hooks[0].name, axes=hooks[0].axes)
    return _LoopHook(hooks, counter, captured, key)


_IN_LAYER_LOOP: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "in_layer_loop", default=False
)


def in_layer_loop() -> bool:
    """Whether the code running is being traced as the body of a loop over stacked layers
    (where a layer's weights are slices of stacks at the loop's counter)."""
    return _IN_LAYER_LOOP.get()


def _counted_scan(step: Any, h: Any, length: int, unroll: int = 1) -> tuple[Any, Any]:
    """``step(counter, h) -> (h, captured)`` run ``length`` times as one `jax.lax.scan`:
    the final ``h`` and each step's captures stacked. The counter rides in the carry (not
    scanned over `jnp.arange`): a value XLA follows from the loop's induction variable, so
    slices at ``start + step * counter`` are what XLA:GPU's dynamic-slice fusion reads in
    place."""

    def loop(carry, _):
        counter, h = carry
        token = _IN_LAYER_LOOP.set(True)
        try:
            h, captured = step(counter, h)
        finally:
            _IN_LAYER_LOOP.reset(token)
        return (counter + 1, h), captured

    start = (jnp.zeros((), jnp.int32), h)
    (_, h), stacked = jax.lax.scan(loop, start, None, length=length, unroll=unroll)
    return h, stacked


def _scan_run(
    flats: Sequence[_Flat], period: int, repeats: int, h: Any, side_inputs: dict[str, Any]
) -> Any:
    template = flats[:period]
    columns = {
        j: [
            _column(leaf, [flats[r * period + j].leaves[q] for r in range(repeats)])
            for q, leaf in enumerate(flat.leaves)
        ]
        for j, flat in enumerate(template)
    }

    order = _axis_orders(h)

    def step(counter, carry):
        captured: dict[Any, Any] = {}
        for j, flat in enumerate(template):
            block = _in_loop(flat, columns[j], counter, captured, lambda leaf, q, j=j: (j, q))
            carry = block(carry, **side_inputs)
        return _in_order(carry, order), captured

    h, stacked = _counted_scan(step, _in_order(h, order), repeats)
    for (j, q), values in stacked.items():
        for r, hook in enumerate(columns[j][q]):
            hook.sink.value = values[r]
    return h


@dataclasses.dataclass(frozen=True)
class _Progression:
    """The integers ``start, start + step, ...`` indexed by a loop counter: ``self[i]`` is
    ``start + step * i``, arithmetic on the counter rather than a read of a table."""

    start: int
    step: int

    def __getitem__(self, index: Any) -> Any:
        if (self.start, self.step) == (0, 1):
            return index
        return self.start + self.step * index


def _integers(values: list[int]) -> Any:
    """``values`` as a loop indexes them: a `_Progression` where they are evenly spaced
    (the common case: a stack's layers in order), else an int32 table.

    XLA sees a slice at ``start + step * counter`` as a function of the loop's counter;
    at an entry of a table it sees only some number. The former lets XLA:GPU's
    dynamic-slice fusion read a layer's weights in place instead of copying them first."""
    steps = {b - a for a, b in zip(values, values[1:])}
    if len(steps) <= 1:
        return _Progression(values[0], steps.pop() if steps else 1)
    return jnp.asarray(values, jnp.int32)


def _column(leaf: Any, column: list[Any]) -> Any:
    """What a loop reads for one leaf position across its layers: the stack indices of
    a `LayerSlice`, the layer numbers of a `LayerNumber` (`_integers`), the hooks of a
    `HookPoint` (a tuple); None for a leaf every layer shares."""
    if isinstance(leaf, LayerSlice):
        return _integers([v.index for v in column])
    if isinstance(leaf, LayerNumber):
        return _integers([v.value for v in column])
    if isinstance(leaf, HookPoint):
        return tuple(column)
    return None


class _KindsDiffer(Exception):
    """The kinds of block in a loop return values of different shapes (`_loop_run`)."""


def _in_block(flat: _Flat, hook: HookPoint) -> str:
    """The hook's name within its block (``attn.hook_pattern``)."""
    return _relative(hook.name, flat.prefix)


def group_kinds(signatures: Sequence[Hashable]) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """Layers grouped by kind (equal signatures), in order of first appearance: the members
    of each kind, and for each layer its kind and its place among its kind's members (the
    tables a loop's `jax.lax.switch` reads by the loop counter)."""
    kinds: dict[Hashable, list[int]] = {}
    for i, signature in enumerate(signatures):
        kinds.setdefault(signature, []).append(i)
    kind_of = np.zeros(len(signatures), np.int32)
    slot_of = np.zeros(len(signatures), np.int32)
    for k, members in enumerate(kinds.values()):
        kind_of[members] = k
        slot_of[members] = np.arange(len(members))
    return list(kinds.values()), kind_of, slot_of


def _parts(flats: Sequence[_Flat]) -> list[list[_Flat]]:
    """The blocks cut at their top-level sublayers (norm-and-attention, hook, MLP, ...):
    ``parts[p][i]`` is part ``p`` of block ``i``. Blocks whose top levels do not line up
    stay whole (one part)."""
    groups = [f.block for f in flats]
    if not all(isinstance(b, pz.nn.NamedGroup) for b in groups):
        return [list(flats)]
    if len({len(b.sublayers) for b in groups}) != 1:
        return [list(flats)]
    return [
        [_flatten(f.block.sublayers[p], f.prefix) for f in flats]
        for p in range(len(groups[0].sublayers))
    ]


def _loop_run(flats: Sequence[_Flat], h: Any, side_inputs: dict[str, Any]) -> Any:
    """`plan_loops`' loop over ``flats``: `jax.lax.scan` over the layers. Each step runs
    the block's parts (`_parts`) in turn: a part alike in every layer (Gemma 3's MLP) runs
    as it is, reading the layer's weights from the stacks by the loop counter; a part that
    differs between kinds of layer (local and global attention) is a `jax.lax.switch` on
    the layer's kind, reading its weights by the layer's place among its kind. So the
    program holds each distinct part once."""
    order = _axis_orders(h)
    sinks: dict[tuple[int, str], HookPoint] = {}
    steps = [_part_step(part, side_inputs, order, sinks) for part in _parts(flats)]

    def step(layer, carry):
        captured: dict[Any, Any] = {}
        for run_part in steps:
            carry, got = run_part(carry, layer)
            captured.update(got)
        return carry, captured

    try:
        h, stacked = _counted_scan(
            step, _in_order(h, order), len(flats), unroll=min(LOOP_UNROLL, len(flats))
        )
    except TypeError as error:  # the kinds' steps return different types
        if "branch" in str(error):
            raise _KindsDiffer(str(error)) from error
        raise
    for (i, name), hook in sinks.items():
        hook.sink.value = stacked[name][i]
    return h


def _part_step(part: list[_Flat], side_inputs: dict[str, Any], order, sinks: dict) -> Any:
    """``fn(carry, layer) -> (carry, captured)`` for one part of every layer's block: the
    kinds merged into one step (`_merged_step`) where they differ only in layers a switch
    can stand in for, else a switch between whole parts, one branch per kind."""
    kinds, kind_of, slot_of = group_kinds([flat.signature for flat in part])
    if len(kinds) > 1:
        merged = _merged_step(part, kinds, kind_of, side_inputs, order, sinks)
        if merged is not None:
            return merged
    branches = [
        _kind_branch(part[members[0]], _columns(part, members, sinks), side_inputs, order)
        for members in kinds
    ]
    if len(branches) == 1:  # alike in every layer: the slot is the layer
        return branches[0]
    kind_of, slot_of = jnp.asarray(kind_of), jnp.asarray(slot_of)

    def switch(carry, layer):
        return jax.lax.switch(kind_of[layer], branches, carry, slot_of[layer])

    return switch


def _columns(part: list[_Flat], members: Sequence[int], sinks: dict) -> list[Any]:
    """What a loop over the layers ``members`` of ``part`` reads for each leaf position of
    ``part[members[0]]`` (`_column`); the capturing hooks among them go into ``sinks``,
    keyed by layer and name."""
    template = part[members[0]]
    columns = []
    for q, leaf in enumerate(template.leaves):
        columns.append(_column(leaf, [part[i].leaves[q] for i in members]))
        if isinstance(leaf, HookPoint) and _captures(leaf):
            for i, hook in zip(members, columns[-1]):
                sinks[i, _in_block(part[i], hook)] = hook
    return columns


def _kind_branch(template: _Flat, columns: list[Any], side_inputs: dict[str, Any], order):
    def branch(carry, slot):
        captured: dict[Any, Any] = {}
        block = _in_loop(
            template, columns, slot, captured, lambda leaf, q: _in_block(template, leaf)
        )
        return _in_order(block(carry, **side_inputs), order), captured

    return branch


def _in_loop(flat: _Flat, columns: list[Any], index: Any, captured: dict, hook_key) -> Any:
    """``flat``'s block as one step of a loop runs it (`_resolved` leaves)."""
    return _unflattened(flat, _resolved(flat, columns, index, captured, hook_key))


def _resolved(flat: _Flat, columns: list[Any], index: Any, captured: dict, hook_key) -> list:
    """``flat``'s leaves as one step of a loop reads them: entry ``index`` (traced) of each
    leaf's column, i.e. the layer's slice of each stack, its layer number, its hooks
    (`_loop_hook`, capturing into ``captured`` under ``hook_key(leaf, q)``)."""
    leaves = []
    for q, (leaf, column) in enumerate(zip(flat.leaves, columns)):
        if isinstance(leaf, LayerSlice):
            value = take_layer(leaf.stack.value, column[index])
            leaves.append(pz.ParameterValue(value=value, label=leaf.label))
        elif isinstance(leaf, LayerNumber):
            leaves.append(_LoopNumber(column[index]))
        elif isinstance(leaf, HookPoint):
            leaves.append(_loop_hook(column, index, captured, hook_key(leaf, q)))
        else:
            leaves.append(leaf)
    return leaves


def _unflattened(flat: _Flat, leaves: list) -> Any:
    """``flat``'s block (or part) holding ``leaves``."""
    contents = jax.tree.unflatten(flat.treedef, leaves)
    if isinstance(flat.block, pz.nn.NamedGroup):
        return dataclasses.replace(flat.block, sublayers=contents)
    return contents


# ------------------------------------------------------------- kinds merged into one step


class _CannotMerge(Exception):
    """Kinds of block that differ where no switch can stand in (`_merged`)."""


def _called_only(parent: Any, field: str) -> bool:
    """Whether ``parent`` only calls its sublayer ``field`` (never reads that layer's own
    fields), so that a switch between kinds may stand in its place. A mask, for one, is
    read by its attention (its band), not only called."""
    if isinstance(parent, (pz.nn.Sequential, pz.nn.NamedGroup)):
        return field == "sublayers"
    if isinstance(parent, pz.nn.Residual):
        return field == "delta"
    if isinstance(parent, Attention):
        return field in ("query", "key", "value", "mixer", "output")
    return False


def _static_fields_differ(nodes: list[Any]) -> bool:
    first = nodes[0]
    for field in dataclasses.fields(first):
        if field.metadata.get("pytree_node", True):
            continue
        for node in nodes[1:]:
            try:
                if bool(getattr(node, field.name) != getattr(first, field.name)):
                    return True
            except (ValueError, TypeError):  # arrays and other values without one answer
                return True
    return False


def _merged(nodes: list[Any], kind: Any, switchable: bool = False) -> Any:
    """One tree for the kinds' trees ``nodes`` (each kind's version of one step's block,
    sharing its leaves): their common parts as they are, and a `_KindSwitch` at each
    deepest layer that differs between kinds and that its parent only calls
    (``switchable``). Raises `_CannotMerge` where kinds differ anywhere else."""
    first = nodes[0]
    structure = jax.tree.structure(first)
    if all(jax.tree.structure(node) == structure for node in nodes[1:]):
        return first
    alike = all(type(node) is type(first) for node in nodes)
    if alike and isinstance(first, (list, tuple)):
        if len({len(node) for node in nodes}) != 1:
            raise _CannotMerge
        # The items of a list a layer only calls are themselves only called.
        return type(first)(_merged(list(items), kind, switchable) for items in zip(*nodes))
    try:
        if not (alike and dataclasses.is_dataclass(first)) or _static_fields_differ(nodes):
            raise _CannotMerge
        changes = {
            field.name: _merged(
                [getattr(node, field.name) for node in nodes],
                kind,
                _called_only(first, field.name),
            )
            for field in dataclasses.fields(first)
            if field.metadata.get("pytree_node", True)
        }
        return dataclasses.replace(first, **changes)
    except _CannotMerge:
        # Differs in itself, or below where no switch can stand: the switch stands here.
        if switchable and isinstance(first, pz.nn.Layer):
            return _KindSwitch(nodes, kind)
        raise


@dataclasses.dataclass
class _KindSwitch:
    """Stands in a merged step (`_merged_step`) where kinds of layer differ (Gemma 3's
    RoPE base, its attention's sliding window): a `jax.lax.switch` on the layer's kind
    between the kinds' versions of this one layer. Hooks inside capture through it."""

    options: list[Any]
    kind: Any

    def __call__(self, value: Any, **side_inputs: Any) -> Any:
        hooks = [
            [h for h in jax.tree.leaves(option) if isinstance(h, _LoopHook)]
            for option in self.options
        ]

        def branch(option: Any, hooks: list[_LoopHook]) -> Any:
            def run(value: Any) -> Any:
                # Captures made inside a branch leave it as the branch's output.
                captured: dict[Any, Any] = {}
                outer = [hook.captured for hook in hooks]
                for hook in hooks:
                    hook.captured = captured
                try:
                    return option(value, **side_inputs), captured
                finally:
                    for hook, into in zip(hooks, outer):
                        hook.captured = into

            return run

        runs = [branch(option, h) for option, h in zip(self.options, hooks)]
        # Every branch returns its arrays' axes in one order (the first branch's).
        order = _axis_orders(jax.eval_shape(lambda v: runs[0](v)[0], value))

        def ordered(run: Any) -> Any:
            def ordered_run(value: Any) -> Any:
                out, captured = run(value)
                return _in_order(out, order), captured

            return ordered_run

        out, captured = jax.lax.switch(self.kind, [ordered(run) for run in runs], value)
        step_captures = next((h.captured for option in hooks for h in option), None)
        if step_captures is not None:  # the step's dictionary, which every hook shares
            step_captures.update(captured)
        return out


def _merged_step(
    part: list[_Flat],
    kinds: list[list[int]],
    kind_of: np.ndarray,
    side_inputs: dict[str, Any],
    order: Any,
    sinks: dict,
) -> Any:
    """``fn(carry, layer) -> (carry, captured)`` running every kind of ``part`` as one
    block, or None where the kinds cannot merge.

    Kinds that hold the same leaves (the same stacks, hooks and layer numbers: Gemma 3's
    local and global layers) and differ only in layers their parents only call merge:
    each leaf is read at the layer (the loop's counter), the common layers run once, and
    a `_KindSwitch` stands at each layer that differs. The switch then holds only what
    differs (a RoPE, an attention kernel), not the projections and norms around it,
    which XLA fuses and reads from the stacks in place as in a loop over one kind."""
    templates = [part[members[0]] for members in kinds]
    if len({template.signature[1] for template in templates}) != 1:
        return None
    try:  # whether the structures merge, on placeholders for the leaves
        _merged([_unflattened(t, [None] * len(t.leaves)) for t in templates], None)
    except _CannotMerge:
        return None
    template = templates[0]
    columns = _columns(part, range(len(part)), sinks)
    kind_of = jnp.asarray(kind_of)

    def step(carry, layer):
        captured: dict[Any, Any] = {}
        leaves = _resolved(
            template, columns, layer, captured, lambda leaf, q: _in_block(template, leaf)
        )
        block = _merged([_unflattened(t, leaves) for t in templates], kind_of[layer])
        return _in_order(block(carry, **side_inputs), order), captured

    return step


def _is_named(node: Any) -> bool:
    return isinstance(node, pz.nx.NamedArrayBase)


def _axis_orders(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: tuple(x.named_shape) if _is_named(x) else None, tree, is_leaf=_is_named
    )


def _in_order(tree: Any, orders: Any) -> Any:
    """A loop carry with each named array's axes in one fixed order (a block may hand back
    a view with its axes permuted, which `jax.lax.scan` would see as another type)."""
    return jax.tree.map(
        lambda x, order: x.order_as(*order) if _is_named(x) else x,
        tree,
        orders,
        is_leaf=_is_named,
    )


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)  # sublayers
class ScannedSequential(pz.nn.Sequential):
    """A stack of blocks that runs repeating blocks as one loop (`jax.lax.scan`).

    Holds the blocks exactly as `pz.nn.Sequential` does (``sublayers``, one per layer);
    only the way they run differs. The result equals running them one after another.
    """

    def plan(self) -> tuple[list[_Flat], list[tuple]]:
        """Each block flattened, and the split of the blocks into runs: `plan_loops`, or
        `plan_runs` where `LOOP_STYLE` is ``"periods"``."""
        flats = [_flatten(block) for block in self.sublayers]
        if LOOP_STYLE == "periods":
            return flats, plan_runs([f.signature for f in flats])
        return flats, plan_loops(flats)

    def __call__(self, value: Any, **side_inputs: Any) -> Any:
        flats, plan = self.plan()
        return self._run(flats, plan, value, side_inputs)

    def _run(self, flats: list[_Flat], plan: list[tuple], value: Any, side_inputs: dict) -> Any:
        """Runs ``plan`` (`plan_loops` or `plan_runs` over ``flats``, its indices relative
        to ``flats[0]``)."""
        for run in plan:
            if run[0] == "one":
                value = flats[run[1]].block(value, **side_inputs)
            elif run[0] == "loop":
                run_flats = flats[run[1] : run[2]]
                try:
                    value = _loop_run(run_flats, value, side_inputs)
                except _KindsDiffer:
                    # Kinds whose captured values differ in shape (Gemma 4's global and
                    # local queries) cannot share one loop step: repeating periods instead.
                    periods = plan_runs([f.signature for f in run_flats])
                    value = self._run(run_flats, periods, value, side_inputs)
            else:
                _, start, period, repeats = run
                run_flats = flats[start : start + period * repeats]
                value = _scan_run(run_flats, period, repeats, value, side_inputs)
        return value

    def treescope_color(self) -> str:
        return "#6d9dc5"


def runs(tree: Any) -> dict[str, list[tuple]]:
    """How each block stack of ``tree`` runs, by stack: `plan_runs`' list, e.g.
    ``{"blocks": [("scan", 0, 6, 10), ("scan", 60, 1, 2)]}`` for Gemma 3 27B (ten repeats
    of its six-layer period, then two local layers)."""
    out = {}
    for seq in pz.select(tree).at_instances_of(ScannedSequential).get_sequence():
        name = seq.sublayers[0].name.rsplit(".", 1)[0]
        out[name] = seq.plan()[1]
    return out
