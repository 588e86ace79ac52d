"""Which Pallas blocks run past their array's edge, and how the kernels touch them.

Pallas' Triton lowering masks a load or a store only where the kernel passes a mask: a block
of 16 rows over an array of 3 rows, read or written without one, reaches past the buffer
(and Pallas' interpreter pads such blocks, so an interpreted test cannot see it). These
helpers read a traced program's Pallas calls and list every access to such blocks, so a test
can demand that each is masked.
"""

from __future__ import annotations

from typing import Any

import jax

_ACCESSES = {"get", "swap", "addupdate", "masked_load", "masked_swap"}


def _block_dims(block_mapping) -> list[int | None]:
    dims = []
    for dim in block_mapping.block_shape:
        size = getattr(dim, "block_size", dim)
        dims.append(size if isinstance(size, int) else None)
    return dims


def _runs_past_edge(block_mapping) -> bool:
    shape = block_mapping.array_aval.shape
    return any(
        block is not None and size % block != 0
        for block, size in zip(_block_dims(block_mapping), shape, strict=True)
    )


def _sub_jaxprs(eqn) -> list[tuple[Any, list]]:
    """(inner jaxpr, the outer variables bound to its inputs) for an equation's bodies."""
    params = eqn.params
    if eqn.primitive.name == "while":
        cond_n, body_n = params["cond_nconsts"], params["body_nconsts"]
        carry = eqn.invars[cond_n + body_n :]
        return [
            (params["cond_jaxpr"].jaxpr, eqn.invars[:cond_n] + carry),
            (params["body_jaxpr"].jaxpr, eqn.invars[cond_n:]),
        ]
    if eqn.primitive.name == "cond":
        return [(branch.jaxpr, eqn.invars[1:]) for branch in params["branches"]]
    found = []
    for param in params.values():
        inner = getattr(param, "jaxpr", param)
        if hasattr(inner, "eqns") and len(inner.invars) == len(eqn.invars):
            found.append((inner, eqn.invars))
    return found


def _access(eqn) -> str:
    """The access's name; a masked one says whether it was given a mask."""
    name = eqn.primitive.name
    if name in ("masked_load", "masked_swap"):
        parts = eqn.params["args_tree"].unflatten(eqn.invars)
        mask = parts[2] if name == "masked_load" else parts[3]
        return f"{name} with mask" if mask is not None else f"{name} without mask"
    return name


def edge_block_accesses(function, *args) -> dict[str, dict[int, list[str]]]:
    """Traces ``function(*args)`` and returns, for each Pallas call it makes,
    ``{kernel name: {operand index: [accesses]}}`` for the operands (inputs then outputs)
    whose blocks do not tile their arrays, with every read or write the kernel makes of them
    (e.g. ``"masked_load with mask"``, ``"get"``, ``"swap"``)."""
    found: dict[str, dict[int, list[str]]] = {}

    def scan_kernel(jaxpr, refs: dict, accesses: dict[int, list[str]]) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in _ACCESSES and eqn.invars[0] in refs:
                accesses[refs[eqn.invars[0]]].append(_access(eqn))
            for inner, outer in _sub_jaxprs(eqn):
                bound = {
                    var: refs[value]
                    for var, value in zip(inner.invars, outer, strict=True)
                    if type(value).__name__ != "Literal" and value in refs
                }
                if bound:
                    scan_kernel(inner, bound, accesses)

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                mappings = eqn.params["grid_mapping"].block_mappings
                kernel = eqn.params["jaxpr"]
                refs = {
                    kernel.invars[index]: index
                    for index, mapping in enumerate(mappings)
                    if _runs_past_edge(mapping)
                }
                accesses: dict[int, list[str]] = {index: [] for index in refs.values()}
                scan_kernel(kernel, refs, accesses)
                found[eqn.params["name"]] = accesses
            for inner, _ in _sub_jaxprs(eqn):
                walk(inner)

    walk(jax.make_jaxpr(function)(*args).jaxpr)
    return found
