"""What a traced program computes, read off its jaxpr: for tests that check that a program
does not hold an array it should not (e.g. logits of positions nobody reads)."""

from __future__ import annotations

from typing import Any


def output_shapes(jaxpr: Any, primitive: str) -> list[tuple[int, ...]]:
    """The output shapes of every ``primitive`` equation in ``jaxpr`` and in the programs it
    calls (nested jits, loops, vmapped bodies)."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    shapes += output_shapes(inner, primitive)
    return shapes


def unembedding_shapes(jaxpr: Any, vocab: int) -> list[tuple[int, ...]]:
    """The shapes of the matrix products in ``jaxpr`` with a ``vocab``-sized axis (the
    unembedding's); asserts there is one."""
    shapes = [s for s in output_shapes(jaxpr, "dot_general") if vocab in s]
    assert shapes, "no unembedding product found"
    return shapes
