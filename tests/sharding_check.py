"""Sharded against unsharded runs of every teaching model, on simulated CPU devices.

Run in a subprocess by tests/test_sharding.py (the device count is fixed when JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharding_check OUT.json

Writes, per family, the largest differences between the model on one device and the same
model on a (data=2, model=4) mesh, in float32: logits, every captured hook, an
intervention, a patching sweep, attribution patching and greedy generation; plus each parameter's shard shape on each device and the messages of bad meshes.

Then, on (data=4, model=2): patching sweeps whose sites are split over the data axis
(`sites`), against one device, with each device's share of the work (flops of the compiled
program, split and not); and on (seq=4, model=2), (data=2, seq=2, model=2) and with
rules={"seq": "data"}: prompts split along their tokens (`seq`), against one device, with
the layout of what came back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
import time

import jax
import numpy as np
from penzai import pz

import gemmalens as gl
from gemmalens import patching
from gemmalens.layers import stacking

FAMILIES = ["gemma3", "gemma3n", "gemma4_moe", "t5gemma2"]
RS = np.random.RandomState(0)
TOKENS = RS.randint(3, 400, (2, 9))
# Every token but the first corrupted: the teaching models' last logits barely move when
# one token changes, and a sweep between two near-equal runs would have little to compare.
CORRUPTED = TOKENS.copy()
CORRUPTED[:, 1:] = (CORRUPTED[:, 1:] + 100) % 400 + 3
DECODER = RS.randint(3, 400, (2, 5))
DECODER[:, 0] = 2


def metric(logits):
    """Every sweep's metric here: one function, so that a one-device sweep one part of the
    check already compiled is not compiled again by another. The spread of the last
    position's logits: every token counts, so it moves wherever the output does (the
    logits of two unused tokens barely move in the teaching models)."""
    return logits[:, -1].std(-1).mean()


def zero_head(value, hook):
    """The intervention: head 1's ``z`` set to zero."""
    return value.at[:, :, 1].set(0.0)


@functools.cache
def one_device(name: str):
    """Teaching model ``name`` on one device, loaded once: the parts of the check compare
    against the same model, so its programs (the same in several parts) compile once."""
    return gl.teaching_model(name)


# One-device values of each family that `compare` computes and `stacked` compares against
# too (each computed once).
REFERENCE: dict[str, dict] = {}


def scale(a) -> float:
    a = np.abs(np.asarray(a, np.float64))
    return max(1.0, float(a[a < 1e30].max(initial=0.0)))


def biggest(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def compare(name: str, mesh) -> dict:
    one = one_device(name)
    sharded = gl.load(gl.teaching_model_path(name), mesh=mesh)
    streams = {"decoder_tokens": DECODER} if name == "t5gemma2" else {}
    out = {"rules": sharded.sharding_rules, "replicated": list(sharded.placement.replicated)}

    logits_one, cache_one = one.run_with_cache(TOKENS, **streams)
    reference = REFERENCE[name] = {"logits": logits_one, "cache": cache_one}
    logits_sharded, cache_sharded = sharded.run_with_cache(TOKENS, **streams)
    out["logits"] = biggest(logits_one, logits_sharded)
    out["logit_scale"] = float(np.abs(np.asarray(logits_one)).max())
    gathered = cache_sharded.gather()
    # Relative to each value's scale (attention scores hold the dtype's most negative
    # number at masked positions).
    relative = {k: biggest(cache_one[k], gathered[k]) / scale(cache_one[k]) for k in cache_one}
    out["captures"] = max(relative.values())
    out["worst_capture"] = max(relative, key=relative.get)
    out["captures_count"] = len(cache_one)
    out["captures_are_numpy"] = all(isinstance(gathered[k], np.ndarray) for k in gathered)

    z = "decoder.blocks.0.attn.hook_z" if name == "t5gemma2" else "blocks.0.attn.hook_z"
    reference["intervened"] = one.run_with_hooks(TOKENS, {z: zero_head}, **streams)
    out["intervention"] = biggest(
        reference["intervened"], sharded.run_with_hooks(TOKENS, {z: zero_head}, **streams)
    )

    prefix = "decoder." if name == "t5gemma2" else ""
    kwargs = (
        {"decoder_tokens": DECODER, "corrupted_decoder_tokens": DECODER}
        if name == "t5gemma2"
        else {}
    )
    args = (TOKENS, CORRUPTED, metric)  # T5Gemma 2: the encoder input is corrupted
    site = prefix + "resid_pre"
    reference["sweep"] = np.asarray(patching.sweep(one, *args, site=site, **kwargs))
    out["sweep"] = biggest(reference["sweep"], patching.sweep(sharded, *args, site=site, **kwargs))
    out["sweep_spread"] = float(np.ptp(reference["sweep"]))
    out["attribution"] = biggest(
        patching.attribution_patching(one, *args, site=site, **kwargs),
        patching.attribution_patching(sharded, *args, site=site, **kwargs),
    )
    paths = np.asarray(patching.path_patching(one, *args, site=prefix + "z", **kwargs))
    out["path_patching"] = biggest(
        paths, patching.path_patching(sharded, *args, site=prefix + "z", **kwargs)
    )
    out["path_spread"] = float(np.ptp(paths))

    # Ragged prompts (padded inside generate) for decoders; the encoder input for T5Gemma 2.
    prompts = TOKENS if name == "t5gemma2" else [list(TOKENS[0, :6]), list(TOKENS[1, :4])]
    a = one.generate(prompts, max_new_tokens=6, stop_at_eos=False)
    b = sharded.generate(prompts, max_new_tokens=6, stop_at_eos=False)
    out["greedy_equal"] = bool(np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens)))
    out["greedy_tokens"] = [np.asarray(a.tokens).tolist(), np.asarray(b.tokens).tolist()]
    out["greedy_tie_gaps"] = tie_gaps(one, a, b, name == "t5gemma2")

    shapes = gl.sharding.device_shapes(sharded)
    out["devices_holding_params"] = len({d for per in shapes.values() for d in per})
    out["shards"] = {
        label: sorted({tuple(s) for s in per.values()})
        for label, per in shapes.items()
        if any(part in label for part in ("blocks.0.attn.q_proj", "blocks.0.mlp", "embed."))
        or label.startswith(("blocks.0.moe", "decoder.blocks.0.mlp"))
    }
    _, params = pz.unbind_params(one.model)
    out["full"] = {p.label: dict(p.value.named_shape) for p in params if p.label in out["shards"]}
    return out


def tie_gaps(one, a, b, encoder_decoder: bool) -> list[float]:
    """Where two greedy generations part, how far apart the one-device model put the two
    tokens chosen there: its logits for the shared prefix (a full forward), the chosen
    token's minus the other's. A gap of float32 rounding is a tie that either way of
    summing may break (the teaching models meet such near-ties); one beyond it is a
    disagreement. One entry per row whose tokens differ, at the first difference."""
    ta, tb = np.asarray(a.tokens), np.asarray(b.tokens)
    gaps = []
    for row in np.flatnonzero((ta != tb).any(axis=1)):
        step = int(np.flatnonzero(ta[row] != tb[row])[0])
        prompt = np.asarray(a.prompt_tokens)[row][np.asarray(a.prompt_mask)[row] > 0]
        if encoder_decoder:  # the prompt is the encoder's input; the decoder starts afresh
            start = [one.config.decoder_start_token_id]
            decoder = np.asarray([start + ta[row, :step].tolist()])
            logits = np.asarray(one(prompt[None], decoder_tokens=decoder))[0, -1]
        else:
            logits = np.asarray(one(np.concatenate([prompt, ta[row, :step]])[None]))[0, -1]
        gaps.append(float(logits[ta[row, step]] - logits[tb[row, step]]))
    return gaps


def stack_layouts(m) -> dict:
    """Each stack of ``m``: its layer count, named axes, the spec it is placed with and its
    shard shapes over the devices."""
    out = {}
    for view in pz.select(m.model).at_instances_of(stacking.LayerSlice).get_sequence():
        value = view.stack.value
        out[view.stack.label] = {
            "layers": value.positional_shape[0],
            "named": dict(value.named_shape),
            "spec": str(value.data_array.sharding.spec),
            "shards": sorted({tuple(s.data.shape) for s in value.data_array.addressable_shards}),
        }
    return out


def value_difference(a, b) -> float:
    """The largest difference between the parameter values of models ``a`` and ``b``
    (each layer's, by its label, stacked or not); infinite where their labels differ."""
    ours, theirs = (stacking.parameter_values(m.model) for m in (a, b))
    if ours.keys() != theirs.keys():
        return float("inf")
    return max(
        biggest(ours[k].unwrap(*ours[k].named_shape), theirs[k].unwrap(*ours[k].named_shape))
        for k in ours
    )


def same_layouts(a, b) -> bool:
    """Whether models ``a`` and ``b`` store the same parameters (stacks, by their labels)
    placed alike (the specs of the arrays holding them)."""
    stored = [{p.label: p.value.data_array for p in pz.unbind_params(m.model)[1]} for m in (a, b)]
    return stored[0].keys() == stored[1].keys() and all(
        stored[0][k].sharding.spec == stored[1][k].sharding.spec for k in stored[0]
    )


def stacked(mesh) -> dict:
    """Stacked layers on the mesh against the one-device per-layer model, family by
    family: each loaded stacked from its teaching checkpoint (``gl.load(path, mesh=...,
    stack_layers=True)``: each stack read by `Placement.put_stack`, each device its own
    slices): logits, captured patterns and residuals of every layer (so the looped ones
    stay in their loop), an intervention inside the loop (`compare`'s, whose one-device
    value `REFERENCE` holds), a sweep, and each stack's layout. Then, on Gemma 3, the other
    ways to a stacked model on a mesh, against the loaded one: `Model.stacked` of a
    sharded model (donating), `gl.sharding.shard` of a stacked one, ``gl.build(...,
    mesh=..., stack_layers=True)``; and `Model.unstacked`."""
    out = {}
    original = gl.sharding.Placement.put_stack
    placed: list[str] = []

    def put_stack(self, named_shape, hosts, dtype):
        array = original(self, named_shape, hosts, dtype)
        placed.append(str(array.sharding.spec))
        return array

    for name in FAMILIES:
        start = time.perf_counter()
        one, reference = one_device(name), REFERENCE[name]
        placed.clear()
        gl.sharding.Placement.put_stack = put_stack
        try:
            m = gl.load(gl.teaching_model_path(name), mesh=mesh, stack_layers=True)
        finally:
            gl.sharding.Placement.put_stack = original
        streams = {"decoder_tokens": DECODER} if name == "t5gemma2" else {}
        prefix = "decoder." if name == "t5gemma2" else ""
        entry = {"is_stacked": m.is_stacked, "mesh": dict(m.mesh.shape), "put_stack": placed[:]}
        entry["values"] = value_difference(m, one)
        entry["looped"] = {
            stack: [
                i for kind, first, *rest in plan if kind == "loop" for i in range(first, rest[0])
            ]
            for stack, plan in stacking.runs(m.model).items()
        }
        # Every layer's pattern and residual: blocks capturing alike loop together.
        names = [
            hook
            for hook in m.hook_names
            if hook.startswith(prefix + "blocks.")
            and hook.endswith((".attn.hook_pattern", ".hook_resid_post"))
        ]
        logits, cache = m.run_with_cache(TOKENS, names=names, **streams)
        entry["logits"] = biggest(reference["logits"], logits)
        gathered = cache.gather()
        relative = {
            k: biggest(reference["cache"][k], gathered[k]) / scale(reference["cache"][k])
            for k in gathered
        }
        entry["captured"] = sorted(relative)
        entry["captures"] = max(relative.values())
        entry["worst_capture"] = max(relative, key=relative.get)

        z = prefix + "blocks.0.attn.hook_z"
        intervened = m.run_with_hooks(TOKENS, {z: zero_head}, **streams)
        entry["intervention"] = biggest(reference["intervened"], intervened)
        entry["intervention_effect"] = biggest(reference["intervened"], reference["logits"])

        kwargs = {"decoder_tokens": DECODER, "corrupted_decoder_tokens": DECODER} if streams else {}
        args = (TOKENS, CORRUPTED, metric)
        expected = reference["sweep"]  # `compare`'s one-device sweep of the same site
        swept = patching.sweep(m, *args, site=prefix + "resid_pre", **kwargs)
        entry["sweep"] = biggest(expected, swept)
        entry["sweep_spread"] = float(np.ptp(expected))
        entry["stacks"] = stack_layouts(m)
        entry["seconds"] = time.perf_counter() - start
        out[name] = entry
        if name == "gemma3":
            loaded = m

    # Gemma 3: the other ways to a stacked model on the mesh give the loaded one.
    start = time.perf_counter()
    path, config = gl.teaching_model_path("gemma3"), one_device("gemma3").config
    per_layer = gl.load(path, mesh=mesh)
    in_blocks = [
        p.value.data_array
        for p in pz.select(per_layer.model).at_instances_of(pz.Parameter).get_sequence()
        if p.label.startswith("blocks.")
    ]
    restacked = per_layer.stacked(donate=True)
    out["restacked"] = [value_difference(restacked, loaded), same_layouts(restacked, loaded)]
    out["restacked_freed"] = [len(in_blocks), sum(a.is_deleted() for a in in_blocks)]
    out["restacked_mesh"] = restacked.mesh is mesh
    resharded = gl.sharding.shard(one_device("gemma3").stacked(), mesh)
    out["shard_of_stacked"] = [value_difference(resharded, loaded), same_layouts(resharded, loaded)]
    # Random values made in their placed layouts round as one program does (1 ulp).
    built = gl.build(config, seed=3, mesh=mesh, stack_layers=True)
    one_built = gl.build(config, seed=3)
    out["built"] = [value_difference(built, one_built), same_layouts(built, loaded)]
    out["built_is_stacked"] = built.is_stacked
    unstacked = loaded.unstacked()
    again = gl.load(path, mesh=mesh)
    out["unstacked"] = [value_difference(unstacked, again), same_layouts(unstacked, again)]
    out["unstacked_is_stacked"] = unstacked.is_stacked
    # The per-layer random build on the mesh (one program per kind of parameter).
    built_per_layer = gl.build(config, seed=3, mesh=mesh)
    out["built_per_layer"] = [
        value_difference(built_per_layer, one_built),
        same_layouts(built_per_layer, again),
    ]
    out["seconds"] = time.perf_counter() - start
    return out


def kv_cache(mesh) -> dict:
    """A Gemma 3 with as many KV heads as query heads (4): its generation caches split
    their KV heads over the model axis and their rows over the data axis."""
    from gemmalens import sampling

    config = dataclasses.replace(one_device("gemma3").config, num_key_value_heads=4)
    one = gl.build(config, seed=1)
    sharded = gl.sharding.shard(one, mesh)
    program = sampling.prepare(sharded._frozen, 2, 16, sharded.placement)
    specs = sorted({str(s.spec) for s in program.caches.shardings if s is not None})
    prompts = TOKENS[:, :5]
    a = one.generate(prompts, max_new_tokens=6, stop_at_eos=False)
    b = sharded.generate(prompts, max_new_tokens=6, stop_at_eos=False)
    return {
        "specs": specs,
        "greedy_equal": bool(np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))),
    }


def bad_meshes() -> dict:
    messages = {}
    m = gl.teaching_model("gemma3")
    try:
        gl.sharding.shard(m, gl.sharding.make_mesh(model=8), rules={"heads": "model"})
    except ValueError as error:
        messages["heads_not_divisible"] = str(error)
    try:
        gl.sharding.shard(m, gl.sharding.make_mesh(model=4, data=2), rules={"neurons": "tensor"})
    except ValueError as error:
        messages["unknown_axis"] = str(error)
    try:
        gl.sharding.shard(
            m,
            gl.sharding.make_mesh(model=4, data=2),
            rules={"embedding": "model", "heads": "model"},
        )
    except ValueError as error:
        messages["axis_twice"] = str(error)
    return messages


def flops(program, args, kwargs) -> float:
    """The flops one device runs in the compiled program (XLA's cost analysis of the
    partitioned module: each device's share)."""
    cost = program.lower(*args, **kwargs).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def split_sites() -> dict:
    """Sweeps on a (data=4, model=2) mesh against one device: Gemma 3 through the shared
    runs and in chunks, T5Gemma 2 through the vmapped form (its 2 x 5 decoder sites padded
    to 12). The compiled programs are compiled again without the split
    (``split_sites=False``, on the same mesh): each device's flops show the sites really
    went over the data axis."""
    mesh = gl.sharding.make_mesh(model=2, data=4)
    out = {}

    for name, chunk, label in [
        ("gemma3", None, "shared"),
        ("gemma3", 16, "chunked"),
        ("t5gemma2", None, "vmapped"),
    ]:
        one = one_device(name)
        sharded = gl.load(gl.teaching_model_path(name), mesh=mesh)
        site, decoder = "resid_pre", dict.fromkeys(DECODER_KEYWORDS)
        if name == "t5gemma2":
            site, decoder["decoder_tokens"] = "decoder.resid_pre", DECODER
        given = {k: v for k, v in decoder.items() if v is not None}
        a = patching.sweep(one, TOKENS, CORRUPTED, metric, site, chunk_size=chunk, **given)
        b = patching.sweep(sharded, TOKENS, CORRUPTED, metric, site, chunk_size=chunk, **given)
        entry = {"difference": biggest(a, b), "scale": scale(a), "shape": list(b.shape)}
        # The cost analysis counts a loop's body once (a chunk; a group of the shared runs):
        # split and whole programs have the same loops, so their ratio is each device's
        # share of the work. The shared runs' blocks are counted in their unrolled form
        # (one copy per layer, as `patching.STACK_COPY_LIMIT_BYTES = 0` gives): in the loop
        # over layers the cost analysis sees one block, and the replicated attention and
        # metric then weigh more than their share of the work.
        runs = patching._prepare_runs(sharded, TOKENS, CORRUPTED, None, None, decoder)
        names = patching.site_names(sharded, site)
        limit, patching.STACK_COPY_LIMIT_BYTES = patching.STACK_COPY_LIMIT_BYTES, 0
        try:
            programs = [
                patching._sweep_program(
                    sharded, runs, names, metric, site, chunk, "auto", split_sites=split
                )
                for split in (True, False)
            ]
            entry["program"] = programs[0][0].__name__
            entry["flops_split"], entry["flops_whole"] = (flops(*p) for p in programs)
        finally:
            patching.STACK_COPY_LIMIT_BYTES = limit
        out[label] = entry
    jax.clear_caches()
    return out


DECODER_KEYWORDS = (
    "decoder_tokens",
    "corrupted_decoder_tokens",
    "decoder_attention_mask",
    "corrupted_decoder_attention_mask",
)
LONG = RS.randint(3, 400, (2, 16))  # 16 tokens: a multiple of every sequence split here


def sequence() -> dict:
    """Prompts split along their tokens against one device: every capture of Gemma 3 and
    T5Gemma 2 on (seq=4, model=2); Gemma 3 with rules={"seq": "data"} on (data=4,
    model=2); a sweep and generation on (data=2, seq=2, model=2); the error for a length
    the split does not divide, and its fix."""
    out = {}

    def captures(one, sharded, **streams):
        logits_one, cache_one = one.run_with_cache(LONG, **streams)
        logits, cache = sharded.run_with_cache(LONG, **streams)
        gathered = cache.gather()
        relative = {k: biggest(cache_one[k], gathered[k]) / scale(cache_one[k]) for k in cache_one}
        # What XLA's partitioner made of the inputs' split: each captured value's layout
        # as it came back (nothing constrains them), one entry per kind of hook.
        specs = {}
        for k in cache_one:
            kind = re.sub(r"\d+", "N", k)
            specs.setdefault(kind, str(cache[k].sharding.spec))
        return {
            "logits": biggest(logits_one, logits) / scale(logits_one),
            "logits_spec": str(logits.sharding.spec),
            "captures": max(relative.values()),
            "worst_capture": max(relative, key=relative.get),
            "specs": specs,
            "count": len(cache_one),
        }

    seq_mesh = gl.sharding.make_mesh(model=2, seq=4)
    for name in ("gemma3", "t5gemma2"):
        one = one_device(name)
        sharded = gl.load(gl.teaching_model_path(name), mesh=seq_mesh)
        streams = {"decoder_tokens": LONG[:, :8]} if name == "t5gemma2" else {}
        out[name] = captures(one, sharded, **streams)
        # Without captured patterns attention runs its fused path, not the explicit one.
        logits_one, logits = one(LONG, **streams), sharded(LONG, **streams)
        out[name]["forward"] = biggest(logits_one, logits) / scale(logits_one)
        out[name]["forward_spec"] = str(logits.sharding.spec)
        out[name]["rules_seq"] = sharded.sharding_rules["seq"]
        out[name]["input_spec"] = str(sharded._on_mesh(LONG).sharding.spec)
        if name == "gemma3":
            try:
                sharded(TOKENS)  # 9 tokens on a 4-way split
            except ValueError as error:
                out["bad_length"] = str(error)
            padded, mask = gl.sharding.pad_sequence(TOKENS, 4, one.config.pad_token_id)
            out["padded_shape"] = list(padded.shape)
            out["padded"] = biggest(one(TOKENS), sharded(padded, attention_mask=mask)[:, :9])
            out["padded_scale"] = scale(one(TOKENS))

    # The data axis as the sequence split: the batch then stays whole.
    one = one_device("gemma3")
    on_data = gl.load(
        gl.teaching_model_path("gemma3"),
        mesh=gl.sharding.make_mesh(model=2, data=4),
        rules={"seq": "data"},
    )
    out["on_data"] = captures(one, on_data)
    out["on_data"]["input_spec"] = str(on_data._on_mesh(LONG).sharding.spec)

    # Both at once: sites over data, tokens over seq; generation ignores the seq split.
    mixed = gl.load(
        gl.teaching_model_path("gemma3"), mesh=gl.sharding.make_mesh(model=2, data=2, seq=2)
    )
    corrupted = LONG.copy()
    corrupted[:, 10] = (corrupted[:, 10] + 100) % 400 + 3

    a = patching.sweep(one, LONG, corrupted, metric)
    b = patching.sweep(mixed, LONG, corrupted, metric)
    out["mixed_sweep"], out["mixed_sweep_scale"] = biggest(a, b), scale(a)
    out["mixed_input_spec"] = str(mixed._on_mesh(LONG).sharding.spec)
    ga = one.generate(LONG[:, :6], max_new_tokens=4, stop_at_eos=False)
    gb = mixed.generate(LONG[:, :6], max_new_tokens=4, stop_at_eos=False)
    out["mixed_greedy_equal"] = bool(np.array_equal(np.asarray(ga.tokens), np.asarray(gb.tokens)))
    jax.clear_caches()
    return out


def main(path: str, model: int = 2, data: int = 2) -> None:
    mesh = gl.sharding.make_mesh(model=model, data=data)
    results = {"devices": len(jax.devices())}
    for name in FAMILIES:
        start = time.perf_counter()
        results[name] = compare(name, mesh)
        results[name]["seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    results["stacked"] = stacked(mesh)
    results["stacked"]["total_seconds"] = time.perf_counter() - start
    results["kv_cache"] = kv_cache(mesh)
    results["bad"] = bad_meshes()
    for name, case in (("sites", split_sites), ("seq", sequence)):
        start = time.perf_counter()
        results[name] = case()
        results[name]["seconds"] = time.perf_counter() - start
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
