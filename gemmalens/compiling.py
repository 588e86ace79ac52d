"""The XLA options gemmalens compiles its programs with, chosen for short first calls and
for loops over stacked layers.

gemmalens passes two XLA:GPU options to the programs it compiles (the forward passes,
captures, generation, patching sweeps, attribution, the SAE and feature tools):

* **No Triton GEMMs** (``xla_gpu_enable_triton_gemm``). By default XLA:GPU autotunes
  every matrix product between cuBLAS and its own Triton kernels, compiling several Triton
  candidates for each. cuBLAS alone compiles in about half the time and, at these sizes,
  runs as fast.
* **Dynamic-slice fusion** (``xla_gpu_enable_dynamic_slice_fusion``). A loop over stacked
  layers (`gemmalens.layers.stacking`) reads each layer's weights as a slice of a stack at
  the loop's counter. Without this option XLA copies the slice out before the matrix
  products; with it, cuBLAS and the grouped-expert kernel read the weights in place.

Measured with random bfloat16 weights at 1 x 4096 tokens (``benchmarks/real_size_speed.py
--case ours_phases``, 2026-12-05), before against after:

* Gemma 3 27B, stacked, H100, Triton GEMMs off only: compile 4.95 s against 2.40 s;
  steady 0.389 s against 0.390 s.
* The same on an H200, Triton GEMMs off, then dynamic-slice fusion added: compile 3.79 s
  against 2.05 s; steady 0.373 s against 0.371 s.
* Gemma 4 26B-A4B, stacked, H200: steady 0.136 s with Triton GEMMs off, 0.110 s once
  loops also indexed their stacks by counter arithmetic and dynamic-slice fusion was on
  (the copies of its experts' weights had taken a fifth of the forward). On an H100, 0.198 s under XLA's defaults, 0.183 s with Triton off.
* The Gemma 3 1B patching sweep of 1,664 sites, H100, Triton GEMMs off only: compile
  8.20 s against 3.59 s; steady 0.162 s against 0.171 s (6% slower).

**Short programs** compile without XLA's Triton norm fusions as well (`SHORT_OPTIONS`,
for programs of at most `SHORT_PROGRAM_TOKENS` token positions: batch x length of the
largest integer array they take, the prompt's token ids). XLA:GPU rewrites each RMSNorm
into a Triton kernel of its own; compiling those kernels is about 40% of a per-layer
model's compile, and they pay only on long prompts. Per-layer models on an H100, one
process per figure (``run u``, docs/benchmarks.md), first call with / without the
rewrite: Gemma 3 4B 4.7-5.0 s / 2.7-3.0 s at 128, 1,024 and 4,096 tokens; 27B 7.6-8.1 s
/ 5.1-5.5 s; 1B 3.9-4.0 s / 2.2-2.3 s. Steady forwards: the same within the processes'
spread at 128 and 1,024 tokens for the 4B (8.56-8.57 against 8.39-8.49 ms; 15.72-15.79
against 15.71-15.75 ms), at most 2% slower for the 1B and 27B (3.45 against 3.51 ms, 28.8
against 29.4 ms at 128 tokens); at 4,096 tokens the rewrite wins 1.5-2%, so long programs
keep it.

**Long programs and programs taking a stacked model** compile with XLA's dot merger off
as well (`DOT_MERGER_OFF`, `takes_stacked`). The merger joins two products of one input (a
layer's key and value projections) into one by concatenating their weights, on every
call: inside a loop over stacked layers that copies both slices out of their stacks on
every layer, and at long prompts the copy and the split of the joined result cost more than
the second product saves. Short programs of per-layer models keep it (at 128 tokens and
in decoding the differences went both ways).

**Generation programs** (`gemmalens.sampling`: a prefill and its decode loop) compile
with `DECODING_OPTIONS` instead: Triton GEMMs and Triton norm fusions on, which make a
decode step's few-row products and small norms faster (about 10% more tokens/s for Gemma
3 1B on an H100, batch 1 and 8).

`XLA_OPTIONS` is read when gemmalens is imported. To compile with XLA's own defaults, set
the environment variable ``GEMMALENS_XLA_OPTIONS=xla`` before importing gemmalens. The
options apply to gemmalens' own programs called at the top level (JAX takes options only
there; inside another trace they run as plain jits); ``XLA_FLAGS`` still sets the rest,
and where both name an option, these win.

`Distinct` is how those programs take a model: each distinct array once, so that a stacked
model's stacks, which every layer holds, are one argument each.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import jax

try:  # JAX has no public test for "no trace under way" (`_at_top_level`)
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # pragma: no cover - a JAX without it
    _trace_state_clean = None

#: The environment variable read at import: ``xla`` compiles with XLA's own defaults.
ENV_VAR = "GEMMALENS_XLA_OPTIONS"

#: XLA debug options passed to every program gemmalens compiles (empty: XLA's defaults).
#: Options for another backend are ignored (these are XLA:GPU's), so the CPU and TPU
#: compile as before.
XLA_OPTIONS: dict[str, Any] = (
    {}
    if os.environ.get(ENV_VAR, "").strip().lower() == "xla"
    else {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_dynamic_slice_fusion": True}
)


#: Programs of at most this many token positions compile with `SHORT_OPTIONS` added.
SHORT_PROGRAM_TOKENS = 1024
#: What short programs add to `XLA_OPTIONS` (nothing under ``GEMMALENS_XLA_OPTIONS=xla``):
#: XLA:GPU's Triton norm fusions off. The pass does not exist on other backends.
SHORT_OPTIONS: dict[str, Any] = (
    {"xla_disable_hlo_passes": "triton-softmax-rewriter"} if XLA_OPTIONS else {}
)


#: What long programs (more than `SHORT_PROGRAM_TOKENS` token positions) and programs that
#: take a stacked model (a `Distinct` whose tree holds `LayerSlice` views, `takes_stacked`)
#: add to `XLA_OPTIONS` (nothing under ``GEMMALENS_XLA_OPTIONS=xla``): XLA's dot merger off.
#: The merger joins two products of one input (a layer's key and value projections) into
#: one by concatenating their weights on every call. Inside a loop over stacked layers that
#: copies both slices out of their stacks on every layer, where two products read them in
#: place: alternated on an H100 (run z3), the stacked Gemma 3 27B's forward took
#: 0.361-0.363 s against 0.369-0.371 s, the stacked 1B sweep's 0.107 s against 0.112-0.113
#: s. Per-layer at 1 x 4096 the copy (2.0 ms) and the split of the joined result (0.9 ms)
#: cost more than the second product (runs zb and zc, six alternated pairs on two H100s:
#: the 27B 0.3567 s against 0.3623 s on average, 1.5%). At 128 tokens and in decoding
#: (Gemma 3 1B and 4B, one process each) the differences went both ways, by up to 5% for
#: the 1B and more for the 4B, so short per-layer programs keep the merger until measured
#: better.
DOT_MERGER_OFF: dict[str, Any] = {"xla_gpu_dot_merger_threshold_mb": 0} if XLA_OPTIONS else {}

#: What generation programs (a prompt's prefill and its decode loop, `gemmalens.sampling`)
#: compile with in place of `XLA_OPTIONS` and `SHORT_OPTIONS` (nothing under
#: ``GEMMALENS_XLA_OPTIONS=xla``): XLA's Triton GEMMs and Triton norm fusions stay on. A
#: decode step multiplies a few rows by every weight matrix, where XLA's Triton kernels beat
#: cuBLAS, and its norms are chains of small row reductions that the Triton fusions run in
#: fewer kernels. Measured in one process on an H100 (Gemma 3 1B, random bfloat16 weights,
#: prompt 128, 256 new tokens, two rounds; `benchmarks/decode_options.py`): 718-719 against
#: 643-645 new tokens/s at batch 1, 5,083-5,087 against 4,615-4,616 at batch 8 (Triton
#: GEMMs alone 692-694 and 4,811-4,835; Triton norms alone 652-653 and 4,756-4,777); the
#: first call took 11.5-12.0 s against 13.6-14.4 s (the old options ran first in each
#: group, so partly warm-up: call it no slower). Dynamic-slice fusion stays on for stacked
#: models; long prompts and stacked models add `DOT_MERGER_OFF` as other programs do.
DECODING_OPTIONS: dict[str, Any] = (
    {"xla_gpu_enable_dynamic_slice_fusion": True} if XLA_OPTIONS else {}
)


def jit(fun: Callable | None = None, /, *, decoding: bool = False, **kwargs: Any) -> Any:
    """`jax.jit` with `XLA_OPTIONS` (usable bare, or with keywords as a decorator);
    ``decoding=True`` marks a generation program, compiled with `DECODING_OPTIONS` instead.

    JAX takes compiler options only on a top-level jit. Called inside another trace
    (`jax.jit`, `jax.eval_shape`, `jax.make_jaxpr`), the function is staged into that
    program as a plain jit, and the outer program's options apply."""
    if fun is None:
        return functools.partial(jit, decoding=decoding, **kwargs)
    return _Jitted(fun, kwargs, decoding)


class _Jitted:
    """A function jitted once per set of compiler options it is called with: at the top
    level, `XLA_OPTIONS` (`DECODING_OPTIONS` for generation programs), with `SHORT_OPTIONS`
    added for short programs (`token_positions`; not generation programs) and
    `DOT_MERGER_OFF` for long ones and those taking a stacked model (`takes_stacked`);
    plainly inside another trace. ``lower`` and ``trace`` choose as a
    call does; other attributes are those of the jit with `XLA_OPTIONS` alone."""

    def __init__(self, fun: Callable, kwargs: dict[str, Any], decoding: bool = False) -> None:
        self._fun, self._kwargs, self._decoding = fun, kwargs, decoding
        self._by_options: dict[tuple, Any] = {}
        self._top_level = self._with(dict(XLA_OPTIONS))
        self._nested = jax.jit(fun, **kwargs)
        functools.update_wrapper(self, fun)

    def _with(self, options: dict[str, Any]) -> Any:
        key = tuple(sorted(options.items()))
        if key not in self._by_options:
            self._by_options[key] = jax.jit(
                self._fun, compiler_options=options or None, **self._kwargs
            )
        return self._by_options[key]

    def options_for(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The compiler options a call with these arguments compiles with (None inside
        another trace, where JAX takes none)."""
        if not _at_top_level():
            return None
        options = dict(DECODING_OPTIONS if self._decoding else XLA_OPTIONS)
        short = token_positions(args, kwargs) <= SHORT_PROGRAM_TOKENS
        if short and not self._decoding:
            options.update(SHORT_OPTIONS)
        if not short or takes_stacked(args, kwargs):
            options.update(DOT_MERGER_OFF)
        return options

    def _for(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        options = self.options_for(args, kwargs)
        return self._nested if options is None else self._with(options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        jitted = self._for(args, kwargs)
        compiled = _cache_size(jitted)
        out = jitted(*args, **kwargs)
        if _cache_size(jitted) != compiled:
            release_programs_near_the_map_limit()
        return out

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self._for(args, kwargs).lower(*args, **kwargs)

    def trace(self, *args: Any, **kwargs: Any) -> Any:
        return self._for(args, kwargs).trace(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._top_level, name)


def _cache_size(jitted: Any) -> int:
    size = getattr(jitted, "_cache_size", None)
    return size() if size is not None else 0


#: `release_programs_near_the_map_limit` clears JAX's caches past this share of the limit.
MAP_LIMIT_SHARE = 0.8
#: A generous bound on the mappings one compile adds (measured: about 3 for a tiny jit, 90
#: to 140 for a teaching model's forward or capture), with room for the user's own jits
#: between gemmalens' compiles: counting the mappings costs about 1 ms per thousand, so
#: after a count far from the limit the next ones are skipped until it could be near.
MAPS_PER_COMPILE_BOUND = 1000
_compiles_until_count = 0
_warned_about_maps = False


def _memory_maps() -> tuple[int, int] | None:
    """``(memory mappings of this process, the kernel's limit)`` on Linux, else None."""
    try:
        with open("/proc/sys/vm/max_map_count", "rb") as limit_file:
            limit = int(limit_file.read())
        with open("/proc/self/maps", "rb") as maps_file:
            count = sum(1 for _ in maps_file)
    except (OSError, ValueError):
        return None
    return count, limit


def release_programs_near_the_map_limit() -> bool:
    """Clears JAX's caches of compiled programs when this process nears Linux's limit on
    memory mappings (``vm.max_map_count``, usually 65,530); returns whether it did.

    On the CPU each compiled program keeps its machine code in memory mappings of its own,
    about a hundred for a model's forward pass, until JAX's caches drop it. A long notebook
    session that compiles many hundreds of programs (new shapes, new capture sets, sweeps)
    would reach the limit, and then XLA fails to map the next program's code and the kernel
    dies. gemmalens checks after each program of its own compiles (on the CPU, where the
    code lives in the host's memory) and, past `MAP_LIMIT_SHARE` of the limit, clears the
    caches (`jax.clear_caches`): later calls compile again, nothing else is lost. It warns
    the first time. Far from the limit it counts again only after enough compiles to
    approach it (`MAPS_PER_COMPILE_BOUND`)."""
    global _warned_about_maps, _compiles_until_count
    if jax.default_backend() != "cpu":
        return False
    if _compiles_until_count > 0:
        _compiles_until_count -= 1
        return False
    maps = _memory_maps()
    if maps is None:
        return False
    room = MAP_LIMIT_SHARE * maps[1] - maps[0]
    if room > 0:
        _compiles_until_count = int(room // MAPS_PER_COMPILE_BOUND)
        return False
    jax.clear_caches()
    if not _warned_about_maps:
        _warned_about_maps = True
        warnings.warn(
            f"This process holds {maps[0]:,} memory mappings, near Linux's limit of "
            f"{maps[1]:,} (vm.max_map_count): each compiled program keeps its code in "
            "mappings of its own. gemmalens cleared JAX's caches of compiled programs "
            "(jax.clear_caches()) so that the next compile does not fail; programs compile "
            "again when next called. To raise the limit: sudo sysctl -w "
            "vm.max_map_count=262144.",
            RuntimeWarning,
            stacklevel=_first_level_outside_gemmalens(),
        )
    return True


def _first_level_outside_gemmalens() -> int:
    """The ``stacklevel`` (for `warnings.warn` called by this function's caller) of the
    first frame outside the gemmalens package: the user's line that made the call."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def takes_stacked(args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a program takes a stacked model: a `Distinct` whose tree holds layers'
    slices of stacks (`gemmalens.layers.stacking.LayerSlice`)."""
    for leaf in jax.tree.leaves((args, kwargs), is_leaf=lambda x: isinstance(x, Distinct)):
        if isinstance(leaf, Distinct) and _holds_layer_slices(leaf.treedef):
            return True
    return False


@functools.lru_cache(maxsize=32)
def _holds_layer_slices(treedef: Any) -> bool:
    # Imported here: gemmalens.layers (merged_attention) imports this module.
    from gemmalens.layers.stacking import LayerSlice

    def walk(node: Any) -> bool:
        data = node.node_data()
        if data is not None and data[0] is LayerSlice:
            return True
        return any(walk(child) for child in node.children())

    return walk(treedef)


def token_positions(args: tuple, kwargs: dict[str, Any]) -> int:
    """The size of the largest integer array a program takes, outside the model (a
    `Distinct`): its token ids' batch x length (0 where it takes none)."""
    most = 0
    for leaf in jax.tree.leaves((args, kwargs), is_leaf=lambda x: isinstance(x, Distinct)):
        dtype = getattr(leaf, "dtype", None)  # None for a `Distinct`, a function, an int
        if dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.integer):
            most = max(most, int(getattr(leaf, "size", 0)))
    return most


def _at_top_level() -> bool:
    """Whether no trace is under way (a call here compiles a program of its own). Without
    JAX's private test, the safe side: no options."""
    return bool(_trace_state_clean()) if _trace_state_clean is not None else False


def distinct_leaves(leaves: list) -> tuple[list, tuple[int, ...]]:
    """The distinct leaves (by identity) and, for each leaf, its place among them. A
    stacked model holds each stack once per layer (`LayerSlice`); passed once, a compiled
    program sees the stack as one argument, not one per layer."""
    places: dict[int, int] = {}
    distinct, index = [], []
    for leaf in leaves:
        place = places.setdefault(id(leaf), len(distinct))
        if place == len(distinct):
            distinct.append(leaf)
        index.append(place)
    return distinct, tuple(index)


@jax.tree_util.register_pytree_node_class
class Distinct:
    """A tree (a model, or a model and its state) that hands a compiled program each
    distinct array once: a stacked model's layers all hold the same stacks, which passed
    as a plain tree would be arguments once per layer. ``.tree()`` inside the program
    gives the tree back, every layer reading the one argument."""

    def __init__(self, treedef: Any, leaves: list) -> None:
        self.treedef, self.leaves = treedef, leaves

    @classmethod
    def of(cls, tree: Any) -> Distinct:
        leaves, treedef = jax.tree.flatten(tree)
        return cls(treedef, leaves)

    def tree(self) -> Any:
        return jax.tree.unflatten(self.treedef, self.leaves)

    def tree_flatten(self) -> tuple[list, tuple]:
        distinct, index = distinct_leaves(self.leaves)
        return distinct, (self.treedef, index)

    @classmethod
    def tree_unflatten(cls, aux: tuple, distinct: list) -> Distinct:
        treedef, index = aux
        return cls(treedef, [distinct[i] for i in index])
