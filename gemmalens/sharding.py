"""Models on several devices: parameters placed by their named axes with JAX's own sharding.

A gemmalens parameter carries Penzai axis names (``heads``, ``kv_heads``, ``neurons``,
``expert``, ``vocab``, ``embedding`` ...). Sharding maps those names onto the axes of a
`jax.sharding.Mesh` (a *rule table*), and each parameter becomes a global `jax.Array` laid
out by a `jax.sharding.NamedSharding`. Every compiled program (forward, captures,
interventions, patching sweeps, generation) then runs through XLA's SPMD partitioner:
nothing in the analyses changes, and values come back as global arrays (sharded as XLA
chose; ``np.asarray`` gathers one).

The default table is Megatron-style tensor parallelism on a ``"model"`` mesh axis (query
heads, MLP neurons, experts and the vocabulary split across devices) and data parallelism
on a ``"data"`` axis (the batch of the inputs, and the sites of a patching sweep)::

    mesh = gl.sharding.make_mesh(model=4, data=2)      # 8 devices
    m = gl.load("gemma-3-27b", dtype="bfloat16", mesh=mesh)
    m.sharding_rules                                   # what went where
    logits, cache = m.run_with_cache(tokens)           # as on one device

Long prompts can also be split along the sequence (context parallelism), opt-in: a mesh
with a ``"seq"`` axis (``make_mesh(model=2, seq=4)``), or ``rules={"seq": "data"}`` to
use the data axis for it. The inputs ``[batch, seq]`` are then placed split along ``seq``
and XLA's partitioner carries the split through every block (attention gathers the keys
and values it needs), so activations and captured attention patterns are split by query
position.

Loading streams each device's slice of each tensor from the memory-mapped checkpoint, so
no host or device ever holds the whole model. Stacked layers (``stack_layers=True``,
`gemmalens.layers.stacking`) keep each stack's layer axis whole on every device and split
its named axes as each layer's parameter is (`Placement.stack_spec`). Several hosts: see
`initialize_distributed`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from penzai import pz

__all__ = [
    "DATA",
    "MODEL",
    "SEQ",
    "DEFAULT_RULES",
    "Placement",
    "device_shapes",
    "initialize_distributed",
    "make_mesh",
    "memory_estimate",
    "memory_table",
    "pad_sequence",
    "shard",
]

MODEL = "model"
DATA = "data"
SEQ = "seq"

MeshAxes = str | tuple[str, ...] | None

# Parameter axis -> mesh axis. Axes not named stay whole on every device.
DEFAULT_RULES: dict[str, MeshAxes] = {
    "heads": MODEL,
    "kv_heads": MODEL,
    "neurons": MODEL,
    "expert": MODEL,  # expert parallelism: each device holds a slice of the experts
    "vocab": MODEL,
    # The token axis of the inputs (activations only, never a parameter's: the vision
    # tower's position table has a "seq" axis too). Like every entry naming a mesh axis
    # the mesh lacks, it applies only on meshes with a "seq" axis: sequence sharding is
    # opt-in.
    SEQ: SEQ,
}
# Rule entries that place activations only: parameters with an axis of that name stay
# whole, and the parameter checks of `Placement.fit` skip them.
ACTIVATION_RULES = (SEQ,)
# The families share the table: their parameters use the same axis names. A family that
# needs another entry adds it here (e.g. a new projection axis).
FAMILY_RULES: dict[str, dict[str, MeshAxes]] = {
    "gemma3": {},
    "gemma3n": {},
    "gemma4": {},
    "t5gemma2": {},
}


def make_mesh(model: int | None = None, data: int = 1, devices: Any = None, seq: int = 1) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (all of them by default), or a ``(data,
    seq, model)`` one with ``seq`` > 1.

    Args:
      model: devices per model replica (tensor / expert parallelism); by default all the
        devices not used by ``data`` and ``seq``.
      data: model replicas the batch (and a patching sweep's sites) is split across.
      devices: the devices, e.g. ``jax.devices()[:4]``.
      seq: devices each prompt is split across along its tokens (sequence sharding, for
        long prompts); the prompt length must then be a multiple of ``seq``
        (`pad_sequence`).
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = f"data={data} x seq={seq}" if seq > 1 else f"data={data}"
    if model is None:
        if len(devices) % (data * seq):
            raise ValueError(f"{axes} does not divide the {len(devices)} devices.")
        model = len(devices) // (data * seq)
    needed = model * data * seq
    if needed != len(devices):
        raise ValueError(
            f"A mesh of {axes} x model={model} needs {needed} devices; there are "
            f"{len(devices)} (pass devices=jax.devices()[:{needed}] to use fewer)."
        )
    # Model innermost: tensor parallelism talks most (every layer), so its devices are the
    # nearest; seq next (attention gathers keys and values); data outermost (no traffic).
    if seq > 1:
        grid = np.array(devices, dtype=object).reshape(data, seq, model)
        return Mesh(grid, (DATA, SEQ, MODEL))
    grid = np.array(devices, dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def pad_sequence(
    tokens: Any, multiple: int, pad_id: int, attention_mask: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[batch, seq]`` right-padded with ``pad_id`` to a multiple of
    ``multiple`` positions (what sequence sharding needs), and their attention mask (1 =
    real token). The real tokens' logits and captured values are those of the unpadded
    prompt: padding comes after them (a causal model never reads it) and is masked.

    Args:
      tokens: ``[batch, seq]`` ids.
      multiple: e.g. ``m.placement.seq_ways``.
      pad_id: ``m.config.pad_token_id``.
      attention_mask: the mask of ``tokens`` when they are padded already (by default,
        ``tokens != pad_id``).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}.")
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}.")
    mask = (tokens != pad_id) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask has shape {mask.shape} but tokens have shape {tokens.shape}."
        )
    extra = -tokens.shape[1] % multiple
    padded = np.pad(tokens, ((0, 0), (0, extra)), constant_values=pad_id)
    return padded, np.pad(mask.astype(np.int32), ((0, 0), (0, extra)))


def _mesh_names(spec: MeshAxes) -> tuple[str, ...]:
    if spec is None:
        return ()
    return (spec,) if isinstance(spec, str) else tuple(spec)


def _mesh_size(mesh: Mesh, spec: MeshAxes) -> int:
    return math.prod(mesh.shape[name] for name in _mesh_names(spec))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where each parameter goes: a mesh and a rule table fitted to one model's parameters.

    Build it with `Placement.fit`; `sharding` gives a parameter's `NamedSharding`.

    Attributes:
      mesh: the device mesh.
      rules: parameter axis -> mesh axis (or axes), the ones in force; ``seq`` (an
        activation rule) splits the inputs along their tokens (`input_sharding`).
      replicated: axes the default table shards but that the mesh does not divide for some
        parameters (e.g. one KV head on a 4-way model axis): those parameters keep the axis
        whole, the others are split.
    """

    mesh: Mesh
    rules: dict[str, MeshAxes]
    replicated: tuple[str, ...] = ()

    @classmethod
    def fit(
        cls,
        mesh: Mesh,
        family: str,
        shapes: Iterable[tuple[str, Mapping[str, int]]],
        rules: Mapping[str, MeshAxes] | None = None,
    ) -> Placement:
        """The placement of a model's parameters on ``mesh``.

        Args:
          mesh: the mesh.
          family: the model family (its rule table starts from `DEFAULT_RULES`).
          shapes: ``(label, {axis: size})`` of every parameter.
          rules: the user's entries, over the family's table (``{"kv_heads": None}`` keeps
            an axis whole; ``{"seq": "data"}`` splits prompts along their tokens over the
            data axis, ``{"seq": None}`` keeps them whole on a mesh with a ``seq``
            axis). A user's entry that the mesh cannot honour is an error; a
            default one is left out for the parameters it does not divide (their axis is listed in
            ``replicated``).

        Raises:
          ValueError: an unknown mesh axis, or a parameter whose axis the mesh does not
            divide, or one mesh axis asked for twice by one parameter; the message names the
            parameter and the fix.
        """
        shapes = list(shapes)
        table = {**DEFAULT_RULES, **FAMILY_RULES.get(family, {})}
        user = dict(rules or {})
        for axis, spec in user.items():
            unknown = [n for n in _mesh_names(spec) if n not in mesh.shape]
            if unknown:
                raise ValueError(
                    f"rules[{axis!r}] = {spec!r} names mesh axis {unknown[0]!r}, but the mesh "
                    f"has axes {tuple(mesh.axis_names)}."
                )
        # Default entries for mesh axes this mesh lacks simply do not apply.
        table = {a: s for a, s in table.items() if all(n in mesh.shape for n in _mesh_names(s))}
        table.update(user)
        replicated = []
        for axis, spec in list(table.items()):
            size = _mesh_size(mesh, spec)
            if spec is None or size == 1 or axis in ACTIVATION_RULES:
                continue
            for label, named_shape in shapes:
                if axis in named_shape and named_shape[axis] % size:
                    if axis in user:
                        raise ValueError(
                            f"Parameter {label} has {axis}={named_shape[axis]}, which the mesh "
                            f"axis {spec!r} (size {size}) does not divide. Use a mesh whose "
                            f"{spec!r} size divides {named_shape[axis]}, or keep the axis whole "
                            f"with rules={{{axis!r}: None}}."
                        )
                    # A default entry: this parameter keeps the axis whole (see `spec`).
                    replicated.append(axis)
                    break
        table = {a: s for a, s in table.items() if s is not None}
        by_parameter = {a: s for a, s in table.items() if a not in ACTIVATION_RULES}
        for label, named_shape in shapes:
            used = [n for a in named_shape if a in by_parameter for n in _mesh_names(table[a])]
            twice = {n for n in used if used.count(n) > 1}
            if twice:
                axes = [
                    a
                    for a in named_shape
                    if a in by_parameter and set(_mesh_names(table[a])) & twice
                ]
                raise ValueError(
                    f"Parameter {label} would split its axes {axes} over the same mesh axis "
                    f"{sorted(twice)}; map one of them elsewhere or to None in rules."
                )
        return cls(mesh, table, tuple(replicated))

    def spec(self, named_shape: Mapping[str, int]) -> PartitionSpec:
        """The partition of an array with these named axes (in data order): each axis by its
        rule, where the mesh divides it. Activation-only rules (``seq``: see
        `input_sharding`) do not apply."""
        entries = []
        for axis, size in named_shape.items():
            spec = None if axis in ACTIVATION_RULES else self.rules.get(axis)
            divides = spec is not None and size % _mesh_size(self.mesh, spec) == 0
            entries.append(spec if divides else None)
        return PartitionSpec(*entries)

    def sharding(self, named_shape: Mapping[str, int]) -> NamedSharding:
        """The sharding of an array with these named axes, in data order."""
        return NamedSharding(self.mesh, self.spec(named_shape))

    def stack_spec(self, named_shape: Mapping[str, int]) -> PartitionSpec:
        """The partition of a stack of parameters (`gemmalens.layers.stacking`: a leading
        positional layer axis, then these named axes): the layer axis whole on every
        device, the named axes exactly as `spec` places each layer's parameter."""
        return PartitionSpec(None, *self.spec(named_shape))

    def stack_sharding(self, named_shape: Mapping[str, int]) -> NamedSharding:
        """The sharding of a stack ``[layer, *named_shape]`` (`stack_spec`)."""
        return NamedSharding(self.mesh, self.stack_spec(named_shape))

    def per_device(self, named_shape: Mapping[str, int]) -> tuple[int, ...]:
        """The shape of one device's slice."""
        spec = self.spec(named_shape)
        return tuple(n // _mesh_size(self.mesh, p) for n, p in zip(named_shape.values(), spec))

    def put(self, named_shape: Mapping[str, int], host: np.ndarray, dtype: Any) -> jax.Array:
        """A global array from host data (e.g. a memory-mapped tensor): each device reads
        and converts only its own slice."""
        dtype = np.dtype(dtype)
        return jax.make_array_from_callback(
            host.shape, self.sharding(named_shape), lambda index: np.asarray(host[index], dtype)
        )

    def put_stack(
        self, named_shape: Mapping[str, int], hosts: Sequence[np.ndarray], dtype: Any
    ) -> jax.Array:
        """A stack ``[layer, ...]`` (`stack_sharding`) of host data, one array per layer
        shaped as ``named_shape`` (e.g. memory-mapped tensors): each device reads and
        converts only its own slice of each layer."""
        dtype = np.dtype(dtype)
        layers = range(len(hosts))

        def slice_of(index: tuple[slice, ...]) -> np.ndarray:
            return np.stack([np.asarray(hosts[i][index[1:]], dtype) for i in layers[index[0]]])

        shape = (len(hosts), *named_shape.values())
        return jax.make_array_from_callback(shape, self.stack_sharding(named_shape), slice_of)

    def activation_sharding(self, named_shape: Mapping[str, int]) -> NamedSharding:
        """The sharding of an activation or cache with these named axes (data order): the
        parameter rules (``kv_heads``, ``heads`` ...) and ``batch`` over the data axis,
        each where the mesh divides it. Not split along ``seq``: generation's KV caches
        grow a position at a time, and decoding one token has no sequence to split."""
        rules = {**self.rules, "batch": DATA} if DATA in self.mesh.shape else self.rules
        return dataclasses.replace(self, rules=rules).sharding(named_shape)

    @property
    def seq_axes(self) -> tuple[str, ...]:
        """The mesh axes prompts are split across along their tokens (``rules["seq"]``);
        empty without sequence sharding."""
        axes = _mesh_names(self.rules.get(SEQ))
        return axes if _mesh_size(self.mesh, axes) > 1 else ()

    @property
    def seq_ways(self) -> int:
        """How many pieces each prompt is split into along its tokens (1: not split)."""
        return _mesh_size(self.mesh, self.seq_axes)

    def input_sharding(self, shape: tuple[int, ...]) -> NamedSharding | None:
        """Where an input ``[batch, seq, ...]`` (token ids, a mask) goes: ``seq`` split by
        the ``seq`` rule when one is in force, ``batch`` over the ``data`` axis when the
        data axis divides it and the ``seq`` rule does not use it. None when neither is
        split (an ordinary array).

        Args:
          shape: the input's shape.

        Raises:
          ValueError: the sequence split does not divide the prompt length; the message
            gives the length to pad to (`pad_sequence`).
        """
        entries: list[MeshAxes] = [None] * len(shape)
        seq_axes = self.seq_axes
        if seq_axes and len(shape) >= 2:
            ways = _mesh_size(self.mesh, seq_axes)
            if shape[1] % ways:
                padded = -(-shape[1] // ways) * ways
                spec = seq_axes[0] if len(seq_axes) == 1 else seq_axes
                raise ValueError(
                    f"The prompt has {shape[1]} tokens, which the sequence split "
                    f"(rules['seq'] = {spec!r}: {ways} devices) does not divide. Pad it to "
                    f"{padded} tokens: tokens, mask = gl.sharding.pad_sequence(tokens, {ways}, "
                    "m.config.pad_token_id) and pass attention_mask=mask (the real tokens' "
                    "values do not change); or load without sequence sharding "
                    "(rules={'seq': None})."
                )
            entries[1] = seq_axes[0] if len(seq_axes) == 1 else seq_axes
        data = self.mesh.shape.get(DATA, 1)
        if data > 1 and DATA not in seq_axes and shape and shape[0] % data == 0:
            entries[0] = DATA
        if all(e is None for e in entries):
            return None
        return NamedSharding(self.mesh, PartitionSpec(*entries))

    def site_sharding(self) -> NamedSharding | None:
        """How a patching sweep splits its sites: over the ``data`` axis, when it has more
        than one device; None otherwise (every device runs every site, each with its
        slice of the model)."""
        if self.mesh.shape.get(DATA, 1) == 1:
            return None
        return NamedSharding(self.mesh, PartitionSpec(DATA))


# While a model is built for a mesh, parameter sources place each parameter as they make it.
_ACTIVE: contextvars.ContextVar[Placement | None] = contextvars.ContextVar(
    "gemmalens_placement", default=None
)


def active() -> Placement | None:
    """The placement parameters are being built for, if any."""
    return _ACTIVE.get()


@contextlib.contextmanager
def placing(placement: Placement | None) -> Iterator[None]:
    """Parameters made inside (checkpoint reads, random initialisation) go to ``placement``."""
    token = _ACTIVE.set(placement)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@dataclasses.dataclass
class PlacementRequest:
    """A mesh asked for before the model's parameter shapes are known (`gemmalens.load`):
    the builder fits it once it has them, and leaves the result in ``placement``."""

    mesh: Mesh
    family: str
    rules: Mapping[str, MeshAxes] | None = None
    placement: Placement | None = None


_REQUESTED: contextvars.ContextVar[PlacementRequest | None] = contextvars.ContextVar(
    "gemmalens_placement_request", default=None
)


@contextlib.contextmanager
def requesting(request: PlacementRequest | None) -> Iterator[PlacementRequest | None]:
    """Models built inside fit ``request`` to their parameters and are placed by it."""
    token = _REQUESTED.set(request)
    try:
        yield request
    finally:
        _REQUESTED.reset(token)


@contextlib.contextmanager
def placing_requested(shapes: Iterable[tuple[str, Mapping[str, int]]]) -> Iterator[None]:
    """Inside a builder: fits the pending request (if any) to ``shapes`` and places what is
    made inside by it."""
    request = _REQUESTED.get()
    if request is None:
        yield
        return
    request.placement = Placement.fit(request.mesh, request.family, shapes, request.rules)
    with placing(request.placement):
        yield


def fit_for_build(
    build: Callable[[Any], Any], family: str, mesh: Mesh, rules: Mapping[str, MeshAxes] | None
) -> Placement:
    """The placement of the model ``build`` makes, from a shape-only pass of the builder."""
    from gemmalens.layers.params import ShapeOnly

    shapes = ShapeOnly()
    build(shapes)
    return Placement.fit(mesh, family, ((r.label, r.axes) for r in shapes.requests), rules)


def _param_shapes(tree: Any) -> list[tuple[str, dict[str, int]]]:
    _, params = pz.unbind_params(tree)
    return [(p.label, dict(p.value.named_shape)) for p in params]


def shard(m: Any, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> Any:
    """A copy of model ``m`` with its parameters placed on ``mesh`` (``m`` is unchanged).

    Args:
      m: a `gemmalens.Model` (any family, adapters included; stacked or per layer: a
        stack's layer axis stays whole on every device, its named axes are placed as
        each layer's parameter is, `Placement.stack_spec`).
      mesh: e.g. `make_mesh`.
      rules: entries over the family's rule table (see `Placement.fit`).

    Returns:
      the model on the mesh; ``.mesh`` and ``.sharding_rules`` say how.
    """
    from gemmalens.layers.params import apply_once  # params imports this module

    placement = Placement.fit(mesh, m.config.family, _param_shapes(m.model), rules)

    def place(param: pz.Parameter) -> pz.Parameter:
        value = param.value
        if isinstance(value, pz.nx.NamedArray) and value.positional_shape:
            # A stack (`gemmalens.layers.stacking`): [layer, *named axes].
            if len(value.positional_shape) != 1:
                raise ValueError(
                    f"{param.label} has positional axes {value.positional_shape}; a "
                    "parameter on a mesh has named axes only, or one leading layer axis."
                )
            array = jax.device_put(value.data_array, placement.stack_sharding(value.named_shape))
            return pz.Parameter(
                value=dataclasses.replace(value, data_array=array), label=param.label
            )
        value = value.as_namedarrayview()
        order = sorted(value.data_axis_for_name, key=value.data_axis_for_name.get)
        shape = {a: value.data_shape[value.data_axis_for_name[a]] for a in order}
        array = jax.device_put(value.data_array, placement.sharding(shape))
        return pz.Parameter(value=pz.nx.wrap(array).tag(*order), label=param.label)

    # A parameter used at two places (a stack read by every layer's slice, T5Gemma 2's
    # shared projections) stays one parameter.
    selection = pz.select(m.model).at_instances_of(pz.Parameter)
    return m.with_tree(apply_once(selection, lambda p: p.label, place), placement=placement)


def device_shapes(m: Any) -> dict[str, dict[Any, tuple[int, ...]]]:
    """Each parameter's shard shape on each device: ``{label: {device: shape}}``."""
    _, params = pz.unbind_params(m.model)
    out = {}
    for p in params:
        array = p.value.as_namedarrayview().data_array
        out[p.label] = {s.device: tuple(s.data.shape) for s in array.addressable_shards}
    return out


def memory_estimate(
    config: Any,
    tokens: int = 4096,
    batch: int = 1,
    dtype: Any = "bfloat16",
    devices: int = 1,
    rules: Mapping[str, MeshAxes] | None = None,
    seq: int = 1,
) -> dict[str, float]:
    """Memory in GiB a model needs, in total and per device on a ``(data=1, model=devices)``
    mesh with the family's rules: parameters, the generation KV cache for ``batch`` rows of
    ``tokens`` tokens (sliding-window layers keep their window, KV-sharing layers nothing),
    and every attention pattern captured at ``batch x tokens`` (each attention layer's
    ``[batch, heads, tokens, tokens]``; an encoder-decoder counts each stack at ``tokens``).

    With ``seq`` > 1, on a ``(data=1, seq, model=devices)`` mesh: the prompt split along
    its tokens, so each device holds ``1/seq`` of the query positions of each pattern
    (parameters and the generation KV cache are not split by ``seq``).

    Activations of the forward pass itself are not included. Computed from the model's
    shapes only: nothing is allocated.
    """
    from gemmalens.layers.attention import Attention
    from gemmalens.layers.params import ShapeOnly
    from gemmalens.sampling import cache_length

    itemsize = np.dtype(jax.numpy.dtype(dtype)).itemsize
    shapes = ShapeOnly()
    tree = config.build(shapes)
    if seq > 1:
        mesh = jax.sharding.AbstractMesh((1, seq, devices), (DATA, SEQ, MODEL))
    else:
        mesh = jax.sharding.AbstractMesh((1, devices), (DATA, MODEL))
    placement = Placement.fit(
        mesh, config.family, ((r.label, r.axes) for r in shapes.requests), rules
    )
    counted = [r for r in shapes.requests if config.counts_as_parameter(r.label)]
    params = sum(r.size for r in counted)
    params_device = sum(math.prod(placement.per_device(r.axes)) for r in counted)
    kv = kv_device = patterns = patterns_device = 0
    # The text stacks only: an image tower keeps no KV cache and its patterns are per image.
    text_attention = [
        attention
        for attention in pz.select(tree).at_instances_of(Attention).get_sequence()
        if "vision." not in attention.hook_z.name
    ]
    for attention in text_attention:
        axes = attention.key.sublayers[0].output_axes  # {kv_heads, head_dim}
        per_token = 2 * math.prod(axes.values())
        length = cache_length(attention, tokens)
        kv += batch * length * per_token
        kv_device += batch * length * 2 * math.prod(placement.per_device(axes))
    for layer in pz.select(tree).at_instances_of(pz.nn.Linear).get_sequence():
        heads = layer.weights.value.named_shape.get("heads")
        label = layer.weights.label
        # Towers (vision, Gemma 3n's audio) have patterns per image or clip, not per token.
        in_tower = "vision." in label or label.startswith("audio.")
        if heads is None or not label.endswith("q_proj.weights") or in_tower:
            continue
        patterns += batch * heads * tokens * tokens
        per_device_heads = placement.per_device({"heads": heads})[0]
        # Split by query position across the seq axis (rounded up: a prompt padded to it).
        patterns_device += batch * per_device_heads * -(-tokens // placement.seq_ways) * tokens
    gib = itemsize / 2**30
    return {
        "parameters": params / 1e9,
        "parameters_gib": params * gib,
        "parameters_gib_per_device": params_device * gib,
        "kv_cache_gib": kv * gib,
        "kv_cache_gib_per_device": kv_device * gib,
        "patterns_gib": patterns * gib,
        "patterns_gib_per_device": patterns_device * gib,
    }


def memory_table(presets: Iterable[str] | None = None, devices: int = 8, tokens: int = 4096) -> str:
    """The docs' memory table (markdown): `memory_estimate` of each preset in bfloat16 on one
    device and on ``devices``."""
    from gemmalens.presets import preset
    from gemmalens.presets import presets as all_presets

    rows = [
        "| preset | parameters | weights (bf16) | per device on "
        f"{devices} | KV cache, 1 x {tokens} | per device | every pattern, 1 x {tokens} "
        "| per device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in presets or all_presets():
        e = memory_estimate(preset(name), tokens=tokens, devices=devices)
        rows.append(
            f"| {name} | {e['parameters']:.2f} B | {e['parameters_gib']:.1f} GiB "
            f"| {e['parameters_gib_per_device']:.1f} GiB | {e['kv_cache_gib']:.2f} GiB "
            f"| {e['kv_cache_gib_per_device']:.2f} GiB | {e['patterns_gib']:.1f} GiB "
            f"| {e['patterns_gib_per_device']:.1f} GiB |"
        )
    return "\n".join(rows) + "\n"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs: Any,
) -> None:
    """Joins this process to a multi-host JAX job (`jax.distributed.initialize`).

    Run the same script on every host (one process per host), each with its
    ``process_id``; on managed clusters (Slurm, TPU pods, Kubernetes with JAX's cluster
    detection) all three arguments may be left out. Afterwards ``jax.devices()`` lists the
    devices of every host, `make_mesh` spans them, and `gemmalens.load` reads on each host
    only the slices its own devices hold (every host needs the checkpoint on a local or
    shared disk).

    Limits: values a host prints or turns into NumPy must be fully addressable on it
    (``jax.experimental.multihost_utils.process_allgather`` gathers them); widgets and
    plots belong on process 0.
    """
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kwargs,
    )
