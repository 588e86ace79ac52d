"""The cache analyses on every family, each identity checked against values computed here,
with numpy, from captured hook values and the checkpoint's own tensors.

Tiny perturbed checkpoints made by transformers: Gemma 3 (soft-capped), Gemma 3n (AltUp with
a non-zero active stream, LAuReL, per-layer inputs, KV sharing), Gemma 4 E2B-like (layer
scalars, per-layer inputs, KV sharing) and MoE-like (experts, K=V), T5Gemma 2 (encoder and
decoder with merged attention). Every weight is perturbed, ``layer_scalar`` included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import gemmalens as gl
from gemmalens import residual
from gemmalens.patching import SITES
from tests import hf_reference as ref
from tests.jaxpr_shapes import unembedding_shapes

RELATIVE = 1e-5
FAMILIES = ["gemma3", "gemma3n", "gemma4_e2b", "gemma4_moe", "t5gemma2"]
TOKENS = np.random.RandomState(3).randint(3, 250, (2, 9))
DECODER_TOKENS = np.random.RandomState(4).randint(3, 250, (2, 6))


class Family:
    """A loaded tiny model, its checkpoint tensors, and one run with every hook captured."""

    def __init__(self, name, directory):
        self.name = name
        self.tensors = load_file(directory / "model.safetensors")
        self.m = gl.load(directory)
        if name == "t5gemma2":
            logits, self.cache = self.m.run_with_cache(TOKENS, decoder_tokens=DECODER_TOKENS)
        else:
            logits, self.cache = self.m.run_with_cache(TOKENS)
        self.logits = np.asarray(logits, np.float64)

    def values(self, name: str) -> np.ndarray:
        return np.asarray(self.cache[name], np.float64)

    def stacks(self) -> list[tuple[str | None, str, str]]:
        """``(stack argument, hook prefix, checkpoint prefix)`` for each stack."""
        if self.name == "t5gemma2":
            return [
                ("encoder", "encoder.", "model.encoder.layers."),
                ("decoder", "decoder.", "model.decoder.layers."),
            ]
        return [(None, "", "model.layers.")]

    def layers(self, stack) -> int:
        return self.cache.num_layers_of(stack)

    def softcap(self) -> float | None:
        config = self.m.config.decoder if self.name == "t5gemma2" else self.m.config
        return config.final_logit_softcapping


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    builders = {
        "gemma3": lambda d: ref.gemma3_text(d),
        "gemma3n": lambda d: ref.gemma3n_text(d),
        "gemma4_e2b": lambda d: ref.gemma4_text(d, moe=False),
        "gemma4_moe": lambda d: ref.gemma4_text(d, moe=True),
        "t5gemma2": lambda d: ref.t5gemma2(d),
    }

    return ref.on_demand(tmp_path_factory, builders, Family)


def _relative(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _collapse(streams: np.ndarray, tensors: dict) -> np.ndarray:
    """Gemma 3n's read-out of AltUp streams ``[b, p, K, d]``, as transformers writes it:
    stream 0 and the back-projected others, each rescaled to stream 0's RMS, averaged."""
    first = streams[..., 0, :]
    target = np.sqrt(np.mean(first**2, axis=-1, keepdims=True))
    parts = [first]
    for j in range(streams.shape[-2] - 1):
        weight = tensors[f"model.altup_unembed_projections.{j}.weight"].astype(np.float64)
        back = streams[..., j + 1, :] @ weight.T
        magnitude = np.sqrt(np.maximum(np.mean(back**2, axis=-1, keepdims=True), 1e-5))
        parts.append(back * target / magnitude)
    return np.mean(parts, axis=0)


def _stream_after(family: Family, prefix: str, depth: int) -> np.ndarray:
    """The residual stream after ``depth`` blocks, from hooks (and the collapse for 3n)."""
    if family.name == "gemma3n":
        name = "hook_altup_expanded" if depth == 0 else f"blocks.{depth - 1}.hook_streams_post"
        return _collapse(family.values(name), family.tensors)
    if depth == 0:
        return family.values(prefix + "hook_embed")
    return family.values(f"{prefix}blocks.{depth - 1}.hook_resid_post")


# --------------------------------------------------------------------------- decomposition


@pytest.mark.parametrize("name", FAMILIES)
def test_decomposition_sums_to_the_stream_it_decomposes(families, name):
    family = families(name)
    for stack, prefix, _ in family.stacks():
        total = family.layers(stack)
        for depth in (2, total):
            parts, labels = family.cache.decompose_resid(
                layer=depth, stack=stack, return_labels=True
            )
            expected = _stream_after(family, prefix, depth)
            assert _relative(np.asarray(parts).sum(0), expected) <= RELATIVE, (stack, depth)
            assert len(labels) == parts.shape[0] > 1 + 2 * depth - 1
            accumulated = family.cache.accumulated_resid(layer=depth, stack=stack)
            assert _relative(accumulated[-1], expected) <= RELATIVE


@pytest.mark.parametrize("name", ["gemma3n", "gemma4_e2b", "gemma4_moe"])
def test_naive_sum_of_branch_outputs_would_not_add_up(families, name):
    """What decompose_resid returned before (embedding plus the raw branch outputs) misses
    the stream by far on these families: the identity above can fail."""
    family = families(name)
    layers = family.layers(None)
    naive = family.values("hook_embed") + sum(
        family.values(f"blocks.{i}.hook_attn_out") + family.values(f"blocks.{i}.hook_mlp_out")
        for i in range(layers)
    )
    assert _relative(naive, _stream_after(family, "", layers)) > 0.05


def test_gemma4_parts_are_scaled_by_later_layer_scalars(families):
    family = families("gemma4_e2b")
    parts, labels = family.cache.decompose_resid(return_labels=True)
    scalars = [float(family.tensors[f"model.layers.{i}.layer_scalar"][0]) for i in range(6)]
    index = labels.index("blocks.3.hook_attn_out")
    expected = family.values("blocks.3.hook_attn_out") * np.prod(scalars[3:])
    assert _relative(parts[index], expected) <= RELATIVE
    assert "blocks.3.hook_per_layer_out" in labels


def test_gemma4_moe_splits_dense_and_routed_parts(families):
    family = families("gemma4_moe")
    parts, labels = family.cache.decompose_resid(return_labels=True)
    dense = labels.index("blocks.2.hook_dense_mlp_out")
    routed = labels.index("blocks.2.moe.hook_out")
    scale = np.prod(
        [float(family.tensors[f"model.layers.{i}.layer_scalar"][0]) for i in range(2, 6)]
    )
    together = np.asarray(parts[dense] + parts[routed], np.float64)
    assert _relative(together, family.values("blocks.2.hook_mlp_out") * scale) <= RELATIVE
    assert np.abs(np.asarray(parts[routed])).max() > 1e-3  # both parts carry something
    whole, whole_labels = family.cache.decompose_resid(return_labels=True, detail=False)
    assert "blocks.2.hook_mlp_out" in whole_labels and whole.shape[0] == len(labels) - 6


def test_t5gemma2_decoder_attention_splits_into_self_and_cross(families):
    family = families("t5gemma2")
    parts, labels = family.cache.decompose_resid(stack="decoder", return_labels=True)
    for i in range(family.layers("decoder")):
        own = labels.index(f"decoder.blocks.{i}.hook_attn_out[self]")
        cross = labels.index(f"decoder.blocks.{i}.hook_attn_out[cross]")
        expected = family.values(f"decoder.blocks.{i}.hook_attn_out")
        assert _relative(parts[own] + parts[cross], expected) <= RELATIVE


# --------------------------------------------------------------------------- logit lens


@pytest.mark.parametrize("name", FAMILIES)
def test_logit_lens_last_entry_equals_the_logits(families, name):
    family = families(name)
    lens = family.cache.logit_lens(top_k=3)
    assert np.abs(np.asarray(lens.logits[-1], np.float64) - family.logits).max() <= 1e-4
    assert np.abs(family.logits).max() > 1.0


def test_gemma3n_logit_lens_reads_every_stream(families):
    """Reading the active stream (hook_resid_post) through the final norm is not what the
    model does; the lens' last entry differs from that by a lot and matches the logits."""
    family = families("gemma3n")
    lens = family.cache.logit_lens(top_k=3, softcap=False)
    active = family.values("blocks.4.hook_resid_post")
    weight = family.tensors["model.norm.weight"].astype(np.float64)
    table = family.tensors["model.embed_tokens.weight"].astype(np.float64)
    normed = active / np.sqrt(np.mean(active**2, axis=-1, keepdims=True) + 1e-6) * weight
    assert _relative(normed @ table.T, lens.logits[-1]) > 0.05
    assert lens.labels[-1] == "blocks.4.hook_streams_post"


def test_encoder_has_no_logit_lens(families):
    family = families("t5gemma2")
    with pytest.raises(ValueError, match="not unembedded"):
        family.cache.logit_lens(stack="encoder")
    with pytest.raises(ValueError, match="no stack 'middle'"):
        family.cache.decompose_resid(stack="middle")


# --------------------------------------------------------------------------- heads


def _z_times_output(family, prefix, checkpoint_prefix, i, z):
    w_o = family.tensors[f"{checkpoint_prefix}{i}.self_attn.o_proj.weight"].astype(np.float64)
    return np.einsum("bphd,mhd->bpm", z, w_o.reshape(w_o.shape[0], z.shape[2], z.shape[3]))


@pytest.mark.parametrize("name", FAMILIES)
def test_head_results_sum_to_the_attention_output(families, name):
    """Every attention variant: own keys, keys shared from an earlier layer (3n, 4 E2B),
    K=V (4 MoE), merged self+cross (T5Gemma 2's decoder)."""
    family = families(name)
    for stack, prefix, checkpoint_prefix in family.stacks():
        for i in range(family.layers(stack)):
            z = family.values(f"{prefix}blocks.{i}.attn.hook_z")
            raw = np.asarray(family.cache.head_results(i, fold_post_norm=False, stack=stack))
            expected = _z_times_output(family, prefix, checkpoint_prefix, i, z)
            assert _relative(raw.sum(axis=2), expected) <= RELATIVE, (stack, i)
            folded = np.asarray(family.cache.head_results(i, stack=stack))
            attn_out = family.values(f"{prefix}blocks.{i}.hook_attn_out")
            assert _relative(folded.sum(axis=2), attn_out) <= RELATIVE, (stack, i)


def test_merged_attention_head_parts(families):
    family = families("t5gemma2")
    for i in range(family.layers("decoder")):
        p = f"decoder.blocks.{i}.attn."
        self_pattern, v = family.values(p + "hook_self_pattern"), family.values(p + "hook_v")
        group = self_pattern.shape[1] // v.shape[2]
        z_self = np.einsum("bhqk,bkhd->bqhd", self_pattern, np.repeat(v, group, axis=2))
        own = np.asarray(family.cache.head_results(i, False, part="self", stack="decoder"))
        expected = _z_times_output(family, "decoder.", "model.decoder.layers.", i, z_self)
        assert _relative(own.sum(axis=2), expected) <= RELATIVE
        both = family.cache.head_results(i, part="self", stack="decoder") + (
            family.cache.head_results(i, part="cross", stack="decoder")
        )
        assert _relative(np.asarray(both), family.cache.head_results(i, stack="decoder")) <= 1e-5
    with pytest.raises(ValueError, match="plain attention"):
        family.cache.head_results(0, part="self", stack="encoder")


@pytest.mark.parametrize("name", FAMILIES)
def test_stacked_heads_replace_the_attention_parts_of_the_decomposition(families, name):
    family = families(name)
    for stack, prefix, _ in family.stacks():
        layers = family.layers(stack)
        heads = np.asarray(family.cache.stack_head_results(stack=stack), np.float64)
        parts, labels = family.cache.decompose_resid(stack=stack, return_labels=True)
        per_layer = heads.reshape(layers, -1, *heads.shape[1:]).sum(axis=1)
        for i in range(layers):
            attention = sum(
                np.asarray(parts[j], np.float64)
                for j, label in enumerate(labels)
                if label.startswith(f"{prefix}blocks.{i}.hook_attn_out")
            )
            assert _relative(per_layer[i], attention) <= RELATIVE, (stack, i)


# --------------------------------------------------------------------------- attribution


@pytest.mark.parametrize("name", FAMILIES)
def test_direct_logit_attribution_sums_to_the_logit_before_the_softcap(families, name):
    family = families(name)
    correct, wrong = 17, 23
    parts = family.cache.decompose_resid()
    attrs = np.asarray(family.cache.logit_attrs(parts, correct, wrong), np.float64)
    cap = family.softcap()
    last = family.logits[:, -1]
    pre = last if cap is None else cap * np.arctanh(last / cap)
    expected = pre[:, correct] - pre[:, wrong]
    assert np.abs(attrs.sum(0) - expected).max() <= 1e-3 * max(1.0, np.abs(expected).max())
    helper = np.asarray(family.cache.pre_softcap_logits(family.logits))
    np.testing.assert_allclose(helper[:, -1], pre, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- widgets


@pytest.mark.parametrize("name", ["gemma3", "gemma3n", "gemma4_moe", "t5gemma2"])
def test_logit_lens_viewer_on_every_teaching_model(name):
    """The viewer asks the model which hooks its lens reads; its last row is the model's
    own prediction (argmax of the logits) at every position."""
    from gemmalens.widgets import LogitLensViewer
    from gemmalens.widgets._base import TokenNamer

    m = gl.teaching_model(name)
    ids = np.asarray(m.to_tokens("The cat sat on the mat and")[0])
    if name == "t5gemma2":
        decoder_ids = np.asarray(m.to_tokens("Le chat")[0])
        viewer = LogitLensViewer.from_model(m, ids, decoder_tokens=decoder_ids, embed_html=False)
        logits = np.asarray(m(ids, decoder_tokens=decoder_ids))
        with pytest.raises(ValueError, match="decoder_tokens"):
            LogitLensViewer.from_model(m, ids)
    else:
        viewer = LogitLensViewer.from_model(m, ids, embed_html=False)
        logits = np.asarray(m(ids))
    layers = residual.find_stack(m.config, None).num_layers
    assert viewer.row_labels == ["embed"] + [str(i) for i in range(layers)]
    namer = TokenNamer(m.tokenizer)
    best = [namer(t) for t in logits[0].argmax(-1)]
    shown = [viewer.top_k(layers, p, 1)[0][0] for p in range(len(best))]
    assert shown == best


# --------------------------------------------------------------------------- patching

PATCH_SITES = {"resid_pre": 1, "attn_out": 1, "z": 2}  # site -> the unit axis it patches


def _corrupted_tokens() -> np.ndarray:
    corrupted = TOKENS.copy()
    corrupted[:, 3] = (corrupted[:, 3] + 7) % 240 + 3
    return corrupted


def _metric(logits):
    return (logits[:, -1, 17] - logits[:, -1, 23]).mean()


def _patched_by_hand(family, site, sites, clean_cache):
    """The metric of the corrupted run with one site at a time set to its clean value,
    for each ``(layer, unit)`` of ``sites``, through one `run_with_hooks` call: the
    corrupted batch is repeated once per site, and each copy is patched at its own site
    only (the copies are independent runs, so this is a loop in one compilation)."""
    rows = TOKENS.shape[0]
    corrupted = np.tile(_corrupted_tokens(), (len(sites), 1))
    axis = SITES[site].unit_axis
    hooks = {}
    for layer in sorted({layer for layer, _ in sites}):
        name = SITES[site].hook.format(layer)
        clean_value = np.tile(np.asarray(clean_cache[name]), (len(sites),) + (1,) * (axis + 1))
        mask = np.zeros(clean_value.shape, bool)
        for k, (site_layer, unit) in enumerate(sites):
            if site_layer == layer:
                index = (slice(k * rows, (k + 1) * rows),) + (slice(None),) * (axis - 1) + (unit,)
                mask[index] = True
        hooks[name] = lambda value, _, m=mask, v=clean_value: jnp.where(m, v, value)
    logits = np.asarray(family.m.run_with_hooks(corrupted, hooks))
    return [float(_metric(logits[k * rows : (k + 1) * rows])) for k in range(len(sites))]


@pytest.mark.parametrize("name", ["gemma3", "gemma3n", "gemma4_e2b"])
def test_sweep_equals_a_loop_of_hooked_runs(families, name):
    """Every site of each kind (every layer, every position or head) against hooked runs;
    the shared-KV layers (3n: 3, 4; E2B: 4, 5) are among them for the head site."""
    from gemmalens import patching

    family = families(name)
    _, clean_cache = family.m.run_with_cache(TOKENS)
    layers = family.layers(None)
    for site in PATCH_SITES:
        scores = np.asarray(patching.sweep(family.m, TOKENS, _corrupted_tokens(), _metric, site))
        assert scores.shape[0] == layers
        sites = [(layer, unit) for layer in range(layers) for unit in range(scores.shape[1])]
        expected = np.asarray(_patched_by_hand(family, site, sites, clean_cache))
        np.testing.assert_allclose(
            scores.ravel(), expected, rtol=1e-4, atol=1e-4, err_msg=f"{name} {site}"
        )


def test_head_sites_where_layers_have_different_kv_heads(families):
    """Gemma 4's full-attention layers can have fewer KV heads than its sliding ones (the
    MoE-like config: 1 against 2, as the 26B-A4B has 2 against 8). `sweep` and
    `attribution_patching` of the ``k`` and ``v`` sites are as wide as the widest layer,
    NaN where a layer has no such head; the heads that exist equal hooked runs (the ``k``
    sweep) and a central difference along clean - corrupted (the ``v`` attribution: both
    sites take the same code path, so each check runs on one)."""
    from gemmalens import patching

    family = families("gemma4_moe")
    m, corrupted = family.m, _corrupted_tokens()
    _, clean_cache = m.run_with_cache(TOKENS)

    def layout(site):
        names = patching.site_names(m, site)
        counts = [clean_cache[name].shape[2] for name in names]
        assert min(counts) < max(counts), counts  # the case this test is for
        exists = np.arange(max(counts))[None, :] < np.asarray(counts)[:, None]
        return names, counts, exists

    names, counts, exists = layout("k")
    scores = np.asarray(patching.sweep(m, TOKENS, corrupted, _metric, "k"))
    assert scores.shape == exists.shape
    assert np.isnan(scores[~exists]).all() and np.isfinite(scores[exists]).all()
    sites = [(layer, unit) for layer, count in enumerate(counts) for unit in range(count)]
    expected = np.asarray(_patched_by_hand(family, "k", sites, clean_cache))
    np.testing.assert_allclose(scores[exists], expected, rtol=1e-4, atol=1e-4)
    assert np.ptp(expected) > 1e-3  # the heads' effects differ: the check can fail

    names, counts, exists = layout("v")
    estimate = np.asarray(patching.attribution_patching(m, TOKENS, corrupted, _metric, "v"))
    assert estimate.shape == exists.shape
    assert np.isnan(estimate[~exists]).all() and np.isfinite(estimate[exists]).all()
    layer = counts.index(min(counts))  # a layer with fewer heads: its one head
    name = names[layer]
    _, corrupted_cache = m.run_with_cache(corrupted, names=[name])
    delta = np.asarray(clean_cache[name] - corrupted_cache[name])

    def moved(epsilon):
        def shift(value, _):
            return value + epsilon * delta

        return float(_metric(m.run_with_hooks(corrupted, {name: shift})))

    step = 1e-2
    derivative = (moved(step) - moved(-step)) / (2 * step)
    assert abs(derivative) > 1e-2  # the check has something to compare
    assert abs(estimate[layer, 0] - derivative) <= 2e-2 * abs(derivative) + 1e-4


@pytest.mark.parametrize("name", ["gemma3", "gemma3n", "gemma4_e2b"])
def test_patching_clean_into_clean_changes_nothing_and_attribution_runs(families, name):
    from gemmalens import patching

    family = families(name)
    clean_metric = float(_metric(family.m(TOKENS)))
    for site in ("resid_pre", "z"):
        scores = np.asarray(patching.sweep(family.m, TOKENS, TOKENS, _metric, site=site))
        np.testing.assert_allclose(scores, clean_metric, atol=1e-4 * max(1, abs(clean_metric)))
    estimate = np.asarray(
        patching.attribution_patching(family.m, TOKENS, _corrupted_tokens(), _metric)
    )
    exact = np.asarray(patching.sweep(family.m, TOKENS, _corrupted_tokens(), _metric))
    assert estimate.shape == exact.shape and np.isfinite(estimate).all()
    # Before position 3 nothing differs between the runs: both are exactly zero there.
    corrupted_metric = float(_metric(family.m(_corrupted_tokens())))
    np.testing.assert_allclose(exact[:, :3], corrupted_metric, atol=1e-4)
    np.testing.assert_allclose(estimate[:, :3], 0.0, atol=1e-6)


@pytest.mark.parametrize("name", ["gemma3", "gemma3n", "gemma4_moe", "t5gemma2"])
def test_patching_and_attention_viewers_on_every_teaching_model(name):
    from gemmalens import patching
    from gemmalens.widgets import AttentionViewer, PatchingViewer

    m = gl.teaching_model(name)
    clean = np.asarray(m.to_tokens("Alice and Bob went out. Bob gave it to")[0])
    corrupted = clean.copy()
    corrupted[0, -4] = clean[0, 1]

    def metric(logits):
        return (logits[:, -1, 5] - logits[:, -1, 6]).mean()

    if name == "t5gemma2":
        decoder = np.asarray(m.to_tokens("Alice")[0])
        site, seq2seq = "decoder.z", {"decoder_tokens": decoder}
        with pytest.raises(ValueError, match="decoder_tokens"):
            PatchingViewer.from_model(m, clean, corrupted, metric, sites=[site])
    else:
        site, seq2seq = "resid_pre", {}
    viewer = PatchingViewer.from_model(
        m, clean, corrupted, metric, sites=[site], embed_html=False, show="metric", **seq2seq
    )
    expected = np.asarray(patching.sweep(m, clean, corrupted, metric, site=site, **seq2seq))
    np.testing.assert_allclose(viewer.values(site), expected, rtol=1e-5, atol=1e-5)
    shown = viewer._compute({"site": site, "show": "metric"})
    assert shown["unit"] == ("head" if site.endswith("z") else "pos")
    attention = AttentionViewer.from_model(m, clean, embed_html=False, **seq2seq)
    assert attention.figure() is not None


_DECODER_KEYWORDS = (
    "decoder_tokens",
    "corrupted_decoder_tokens",
    "decoder_attention_mask",
    "corrupted_decoder_attention_mask",
)


def _window_case(name):
    """A teaching model, an IOI-like pair of prompts, the site and the metric (the logit
    difference of the two names at the last position) for the logit-window tests."""
    m = gl.teaching_model(name)
    clean = np.asarray(m.to_tokens("When Mary and John went out, John gave a drink to")[0])
    corrupted = clean.copy()
    corrupted[0, 7] = clean[0, 2]
    mary, john = (m.tokenizer.encode(word, add_bos=False)[0] for word in (" Mary", " John"))
    site, seq2seq, logits_seq = "resid_pre", {}, clean.shape[1]
    if name == "t5gemma2":
        decoder = np.asarray(m.to_tokens("Mary")[0])
        site, seq2seq = "encoder.resid_pre", {"decoder_tokens": decoder}
        logits_seq = decoder.shape[1]

    def metric(logits):
        return (logits[:, -1, mary] - logits[:, -1, john]).mean()

    return m, clean, corrupted, site, seq2seq, logits_seq, metric


@pytest.mark.parametrize("name", ["gemma3", "gemma3n", "gemma4_moe", "t5gemma2"])
def test_general_sweep_unembeds_only_the_positions_the_metric_reads(name):
    """The vmapped sweep (every family but text-only Gemma 3, and any chunked sweep) and
    attribution patching run the final norm and the unembedding at the positions the
    metric reads: their programs have no ``[..., seq, ..., vocab]`` product, where they had
    one per site before (at real sizes, e.g. 34 GiB for Gemma 3 4B with its vision tower at
    1 x 32). Read off the traced programs (no compile); that the values are unchanged is
    checked against hooked runs and central differences by the tests above."""
    from gemmalens import patching

    m, clean, corrupted, site, seq2seq, logits_seq, metric = _window_case(name)
    # Gemma 3's teaching model shares runs; chunks send it to the vmapped program.
    chunk_size = 16 if name == "gemma3" else None
    runs = patching._prepare_runs(
        m, clean, corrupted, None, None, {**dict.fromkeys(_DECODER_KEYWORDS), **seq2seq}
    )
    names = patching.site_names(m, site)
    vocab = m.config.vocab_size

    def sweep_shapes(logit_positions):
        program, args, kwargs = patching._sweep_program(
            m, runs, names, metric, site, chunk_size, logit_positions
        )
        assert program is patching._sweep_vmapped
        jaxpr = jax.make_jaxpr(lambda *a: program(*a, **kwargs))(*args).jaxpr
        return kwargs["window"], unembedding_shapes(jaxpr, vocab)

    window, shapes = sweep_shapes("auto")
    assert window == (logits_seq - 1, logits_seq, logits_seq)
    assert all(logits_seq not in shape and 1 in shape for shape in shapes), shapes
    window, shapes = sweep_shapes("all")  # the check can fail: every position
    assert window is None and all(logits_seq in shape for shape in shapes), shapes

    values = runs.capture(m, runs.corrupted, names)
    for window in (patching._logit_window(m, runs.corrupted, metric), None):

        def attribution(zeros, window=window):
            return patching._metric_and_grads(
                m._frozen_distinct,
                zeros,
                runs.corrupted,
                names=names,
                metric=metric,
                forward=runs.forward,
                window=window,
            )

        zeros = [jnp.zeros_like(v) for v in values]
        shapes = unembedding_shapes(jax.make_jaxpr(attribution)(zeros).jaxpr, vocab)
        assert all((logits_seq in shape) == (window is None) for shape in shapes), shapes


def test_general_sweep_reads_only_the_promised_positions():
    """The windowed vmapped sweep equals the every-position one; a metric that reads a
    position outside the declared ones gets NaN, not a number (in the sweep and in
    attribution patching)."""
    from gemmalens import patching

    m, clean, corrupted, site, _, _, metric = _window_case("gemma3")
    args = (m, clean, corrupted, metric, site)
    every = np.asarray(patching.sweep(*args, chunk_size=64, logit_positions="all"))
    read = np.asarray(patching.sweep(*args, chunk_size=64))
    assert np.ptp(every) > 0.1  # the sites' effects differ: the comparison can fail
    np.testing.assert_allclose(read, every, rtol=1e-5, atol=1e-4)

    def first_position(logits):
        return metric(logits[:, :1])

    wrong = patching.sweep(*args[:3], first_position, site, chunk_size=64, logit_positions=[-1])
    assert np.isnan(np.asarray(wrong)).all()
    # Attribution takes the same declaration.
    estimate = np.asarray(patching.attribution_patching(*args, logit_positions=[-1]))
    np.testing.assert_allclose(estimate, patching.attribution_patching(*args), rtol=1e-6)
    assert np.abs(estimate).max() > 1e-3
    wrong = patching.attribution_patching(*args[:3], first_position, site, logit_positions=[-1])
    assert np.isnan(np.asarray(wrong)).all()


# --------------------------------------------------------------------------- one surface


def test_models_say_what_stacks_and_inputs_they_have():
    t5 = gl.teaching_model("t5gemma2")
    assert [(s.name, s.prefix, s.reads, s.reaches_logits) for s in t5.stacks] == [
        ("encoder", "encoder.", "tokens", False),
        ("decoder", "decoder.", "decoder_tokens", True),
    ]
    assert t5.input_streams == ("tokens", "decoder_tokens")
    assert [s.num_layers for s in t5.stacks] == [
        t5.config.encoder.num_hidden_layers,
        t5.config.decoder.num_hidden_layers,
    ]
    m = gl.teaching_model("gemma3n")
    assert [(s.name, s.prefix, s.num_layers) for s in m.stacks] == [
        ("decoder", "", m.config.num_hidden_layers)
    ]
    assert m.input_streams == ("tokens",)
    tokens = np.asarray(m.to_tokens("one two three")[0])
    with pytest.raises(TypeError, match="one input stream"):
        m(tokens, decoder_tokens=tokens)
    with pytest.raises(TypeError, match="by keyword"):
        t5.run_with_cache(tokens, tokens)
    # One surface: the encoder-decoder's capture and hooked runs are the base class's.
    assert type(t5).run_with_cache is gl.Model.run_with_cache
    assert type(t5).run_with_hooks is gl.Model.run_with_hooks
    logits, cache = t5.run_with_cache(tokens, decoder_tokens=tokens[:, :2])
    hooked = t5.run_with_hooks(tokens, {}, decoder_tokens=tokens[:, :2])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(hooked), atol=1e-4)
    assert "encoder.blocks.0.hook_resid_post" in cache


@pytest.mark.parametrize("name", ["gemma3n", "gemma4_moe", "t5gemma2"])
def test_attribution_patching_is_the_directional_derivative(name):
    """Each attribution score is d metric / d epsilon of the corrupted run with the site's
    value moved by epsilon * (clean - corrupted): checked by central differences on the
    teaching models (Gemma 3n's AltUp, Gemma 4's experts, T5Gemma 2's encoder)."""
    from gemmalens import patching

    m = gl.teaching_model(name)
    clean = np.asarray(m.to_tokens("When Mary and John went out, John gave a drink to")[0])
    corrupted = clean.copy()
    corrupted[0, 7] = clean[0, 2]
    seq2seq, site = {}, "resid_pre"
    if name == "t5gemma2":
        seq2seq, site = {"decoder_tokens": np.asarray(m.to_tokens("Mary")[0])}, "encoder.resid_pre"

    # The names' logit difference moves by units here; two unused tokens' moved by less than
    # the check's absolute tolerance on the retrained teaching models.
    mary, john = (m.tokenizer.encode(word, add_bos=False)[0] for word in (" Mary", " John"))

    def metric(logits):
        return (logits[:, -1, mary] - logits[:, -1, john]).mean()

    scores = np.asarray(patching.attribution_patching(m, clean, corrupted, metric, site, **seq2seq))
    layer, position = np.unravel_index(np.abs(scores).argmax(), scores.shape)
    name_ = patching.site_names(m, site)[layer]
    run = {"decoder_tokens": seq2seq["decoder_tokens"]} if seq2seq else {}
    _, clean_cache = m.run_with_cache(clean, names=[name_], **run)
    _, corrupted_cache = m.run_with_cache(corrupted, names=[name_], **run)
    delta = np.asarray(clean_cache[name_] - corrupted_cache[name_])[:, position]

    def moved(epsilon):
        def shift(value, _):
            return value.at[:, position].add(epsilon * delta)

        return float(metric(m.run_with_hooks(corrupted, {name_: shift}, **run)))

    step = 1e-2
    derivative = (moved(step) - moved(-step)) / (2 * step)
    assert abs(derivative) > 1e-3  # the check has something to compare
    assert abs(scores[layer, position] - derivative) <= 2e-2 * abs(derivative) + 1e-3


def test_the_registry_is_where_families_are_declared():
    from gemmalens.checkpoints import load as loading
    from gemmalens.checkpoints import save
    from gemmalens.families import registry

    families = gl.model_families()
    assert sorted(families) == ["gemma3", "gemma3n", "gemma4", "t5gemma2"]
    assert set(loading.LOADERS) == {t for f in families.values() for t in f.model_types}
    assert set(save._writers()) == {f.saved_model_type for f in families.values()}
    for preset in gl.presets():
        config = gl.preset(preset)
        family = registry.family(config)
        assert isinstance(config, family.config_class), preset
        assert preset in family.presets()
    assert sum(len(f.presets()) for f in families.values()) == len(gl.presets())
    with pytest.raises(ValueError, match="Unknown family"):
        registry.family("gemma2")


@pytest.mark.parametrize("name", ["gemma3", "gemma3n", "gemma4_moe", "t5gemma2"])
def test_induction_scores_on_every_teaching_model(name):
    """`circuits.induction_scores` against the attention computed here from captured
    patterns, on every family (T5Gemma 2: the decoder's heads, read from its self-attention
    part, the encoder's keys counted in the chance level)."""
    from gemmalens import circuits

    m = gl.teaching_model(name)
    tokens = circuits.repeated_random_tokens(m, span=8, batch=2, seed=1)
    assert tokens.shape == (2, 17) and (tokens[:, 1:9] == tokens[:, 9:]).all()
    result = circuits.induction_scores(m, tokens)
    # Any other layout would read the wrong positions: refused, not scored.
    changed = tokens.copy()
    changed[1, -1] += 1
    for other, what in ((tokens[:, :-1], r"shape \(2, 16\)"), (changed, "halves differ")):
        with pytest.raises(ValueError, match=f"{what}. Make them with"):
            circuits.induction_scores(m, other)
    queries = np.arange(9, 17)
    if name == "t5gemma2":
        encoder = np.asarray(m.to_tokens("a short encoder input")[0])
        encoder = np.repeat(encoder, 2, axis=0)
        result = circuits.induction_scores(m, tokens, encoder_tokens=encoder)
        _, cache = m.run_with_cache(encoder, decoder_tokens=tokens, names="*self_pattern")
        layers, hook = m.config.decoder.num_hidden_layers, "self_pattern"
        encoder_keys = encoder.shape[1]
    else:
        _, cache = m.run_with_cache(tokens, names="*hook_pattern")
        layers, hook, encoder_keys = m.config.num_hidden_layers, "pattern", 0
        with pytest.raises(ValueError, match="encoder_tokens is for encoder-decoder"):
            circuits.induction_scores(m, tokens, encoder_tokens=tokens)
    heads = (m.config.decoder if name == "t5gemma2" else m.config).num_attention_heads
    assert result.scores.shape == (layers, heads) and result.chance.shape == (layers,)
    for layer in range(layers):
        pattern = np.asarray(
            cache[f"{'decoder.' if encoder_keys else ''}blocks.{layer}.attn.hook_{hook}"]
        )
        for head in range(pattern.shape[1]):
            by_hand = np.mean([pattern[b, head, q, q - 7] for b in range(2) for q in queries])
            assert abs(result.scores[layer, head] - by_hand) < 1e-5
        visible = [(pattern[0, 0, q] > 0).sum() + encoder_keys for q in queries]
        reaches = [pattern[0, 0, q, q - 7] > 0 for q in queries]
        assert abs(result.chance[layer] - np.mean(np.divide(reaches, visible))) < 1e-6
    # The decoder-only teaching models learnt induction heads (best 0.89-0.98 against a
    # chance level of 0.08); the T5Gemma 2 one's decoder did not (0.07 against 0.05).
    assert result.scores.max() > 2 * result.chance.max() or name == "t5gemma2"


@pytest.mark.parametrize("name", ["gemma3", "gemma3n", "gemma4_moe", "t5gemma2"])
def test_ready_made_interventions_on_every_teaching_model(name):
    """`interventions.ablate_heads`, `ablate_neurons` and `add_vector` equal the same edits
    written here as hooks, on every family; an encoder-decoder names the stack (both)."""
    from gemmalens import interventions as iv

    m = gl.teaching_model(name)
    tokens = np.asarray(m.to_tokens("The cat sat on the mat because it was tired")[0])
    run = {"decoder_tokens": tokens[:, :4]} if name == "t5gemma2" else {}
    plain = np.asarray(m(tokens, **run))
    for stack in ("encoder", "decoder") if name == "t5gemma2" else (None,):
        prefix = f"{stack}." if stack else ""
        config = m.config.decoder if stack else m.config
        vector = jnp.linspace(-1.0, 1.0, config.hidden_size)
        # The most active neuron (Gemma 3n's sparse early layers leave most at zero).
        post = f"{prefix}blocks.0.mlp.hook_post"
        _, cache = m.run_with_cache(tokens, names=[post], **run)
        neuron = int(np.abs(np.asarray(cache[post])).sum((0, 1)).argmax())
        by_hand = {
            "heads": {
                f"{prefix}blocks.1.attn.hook_z": lambda z, _: z.at[:, :, jnp.array([0, 2])].set(0)
            },
            "neurons": {post: lambda h, _, n=neuron: h.at[..., n].set(0)},
            "vector": {
                f"{prefix}blocks.1.hook_resid_mid": lambda r, _, v=vector: r.at[
                    :, jnp.array([2])
                ].add((3.0 * v).astype(r.dtype))
            },
        }
        ready = {
            "heads": iv.ablate_heads(1, [0, 2], stack=stack),
            "neurons": iv.ablate_neurons(0, neuron, stack=stack),
            "vector": iv.add_vector(1, vector, 3.0, "hook_resid_mid", positions=2, stack=stack),
        }
        for kind, hooks in ready.items():
            assert list(hooks) == list(by_hand[kind])
            ours = np.asarray(m.run_with_hooks(tokens, hooks, **run))
            expected = np.asarray(m.run_with_hooks(tokens, by_hand[kind], **run))
            np.testing.assert_array_equal(ours, expected, err_msg=f"{name} {stack} {kind}")
            assert np.abs(ours - plain).max() > 1e-4, f"{name} {stack} {kind} changed nothing"
    if name == "t5gemma2":
        with pytest.raises(KeyError, match="decoder.blocks.1.attn.hook_z"):
            m.run_with_hooks(tokens, iv.ablate_heads(1, 0), **run)  # no stack named


@pytest.mark.parametrize("name", ["gemma3", "gemma3n", "gemma4_moe", "t5gemma2"])
def test_interventions_out_of_range_are_refused_on_every_teaching_model(name):
    """A head, neuron or position past the hook value's axis was dropped by JAX's scatter
    (the run unchanged, no error) and a vector of the wrong width failed in broadcasting;
    each ready-made intervention now names the hook and its range, on every family and
    on the stacked form (where one hook function serves every layer of a stack)."""
    from gemmalens import interventions as iv

    m = gl.teaching_model(name)
    tokens = np.asarray(m.to_tokens("The cat sat on the mat")[0])
    seq = tokens.shape[1]
    stack = "decoder" if name == "t5gemma2" else None
    run = {"decoder_tokens": tokens[:, :4]} if stack else {}
    prefix = f"{stack}." if stack else ""
    config = m.config.decoder if stack else m.config
    _, cache = m.run_with_cache(
        tokens, names=[f"{prefix}blocks.1.attn.hook_z", f"{prefix}blocks.1.mlp.hook_post"], **run
    )
    heads = cache[f"{prefix}blocks.1.attn.hook_z"].shape[2]
    neurons = cache[f"{prefix}blocks.1.mlp.hook_post"].shape[-1]
    length = 4 if stack else seq
    width = config.hidden_size
    cases = [
        (iv.ablate_heads(1, [0, heads], stack=stack), IndexError, f"head {heads} is outside"),
        (iv.ablate_neurons(1, neurons, stack=stack), IndexError, f"neuron {neurons} is outside"),
        (
            iv.add_vector(1, jnp.ones(width), positions=length, stack=stack),
            IndexError,
            f"position {length} is outside '{prefix}blocks.1.hook_resid_pre', which has "
            f"{length} positions",
        ),
        (
            iv.add_vector(1, jnp.ones(width + 1), stack=stack),
            ValueError,
            rf"shape \({width + 1},\), but '{prefix}blocks.1.hook_resid_pre' is {width} wide",
        ),
    ]
    for model in (m, m.stacked()):
        for hooks, error, message in cases:
            with pytest.raises(error, match=message):
                model.run_with_hooks(tokens, hooks, **run)
    counted_from_end = np.asarray(
        m.run_with_hooks(tokens, iv.ablate_heads(1, -1, stack=stack), **run)
    )
    np.testing.assert_array_equal(
        counted_from_end,
        np.asarray(m.run_with_hooks(tokens, iv.ablate_heads(1, heads - 1, stack=stack), **run)),
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_a_metric_that_is_not_one_number_is_refused_on_every_family(families, name):
    """A per-prompt metric (shape ``[batch]``) is refused, before anything compiles, by the
    shared sweep, the chunked sweep and attribution, on every family's sites (T5Gemma 2: an
    encoder and a decoder site), with the reduction to add; the scalar form of the same
    metric runs."""
    from gemmalens import patching

    m, corrupted = families(name).m, _corrupted_tokens()
    seq2seq, sites = {}, ["resid_pre", "z"]
    if name == "t5gemma2":
        seq2seq, sites = {"decoder_tokens": DECODER_TOKENS}, ["encoder.resid_pre", "decoder.z"]

    def per_prompt(logits):
        return logits[:, -1, 17] - logits[:, -1, 23]

    for site in sites:
        for analysis, options in (
            (patching.sweep, {}),
            (patching.sweep, {"chunk_size": 3}),
            (patching.attribution_patching, {}),
        ):
            with pytest.raises(ValueError, match=r"shape \(2,\); patching needs one.*mean"):
                analysis(m, TOKENS, corrupted, per_prompt, site, **options, **seq2seq)
    # A token id past this model's vocabulary (JAX would clamp it to the last token).
    vocab = families(name).logits.shape[-1]

    def other_vocabulary(logits):
        return (logits[:, -1, vocab + 5] - logits[:, -1, 23]).mean()

    for analysis in (patching.sweep, patching.attribution_patching, patching.path_patching):
        with pytest.raises(
            ValueError, match=f"vocabulary index {vocab + 5}, but they have {vocab}"
        ):
            analysis(m, TOKENS, corrupted, other_vocabulary, site=sites[-1], **seq2seq)
    scores = patching.attribution_patching(m, TOKENS, corrupted, _metric, sites[0], **seq2seq)
    assert np.isfinite(np.asarray(scores)).all()


# The receivers of each family's check: a later layer's query heads (T5Gemma 2: the
# decoder's cross-attention keys, which read the encoder's output), and a residual stream.
PATH_CASES = {
    "gemma3": ("z", {"blocks.2.attn.hook_q": [0, 2]}, 2),
    "gemma3n": ("z", {"blocks.3.attn.hook_q": [1]}, 3),  # a KV-sharing layer
    "gemma4_e2b": ("z", {"blocks.4.attn.hook_q": None}, 4),  # a KV-sharing layer
    "gemma4_moe": ("z", {"blocks.2.hook_resid_pre": None}, 2),
    "t5gemma2": ("encoder.z", {"decoder.blocks.1.attn.hook_cross_k": [0]}, None),
}


def path_patched_by_hand(m, corrupted, metric, clean, held, senders, sender, receivers, **run):
    """One sender's path-patching score from hooked runs: the corrupted run (``corrupted``
    tokens, ``run`` its other inputs) with the sender head's clean z and every other head's
    corrupted z (``clean`` and ``held``: every head output of the clean and the corrupted
    run; ``senders``: the sender stack's z names), then (with receivers) a plain corrupted
    run with the receivers' values from that run. (Also used by the image test.)"""
    layer, head = sender

    def hold(name):
        if name != senders[layer]:
            return lambda value, _: jnp.asarray(held[name])
        assert held[name].shape[2] > head
        mask = jnp.asarray(np.arange(held[name].shape[2]) == head)[:, None]
        return lambda value, _: jnp.where(mask, clean[name], held[name])

    holding = {name: hold(name) for name in held}
    if receivers is None:
        return float(metric(m.run_with_hooks(corrupted, holding, **run)))
    with m.hooks(holding):
        _, received = m.run_with_cache(corrupted, names=list(receivers), **run)
    patch = {}
    for name, heads in receivers.items():
        value = np.asarray(received[name])
        if heads is None:
            patch[name] = lambda v, _, new=value: jnp.asarray(new)
        else:
            mask = np.isin(np.arange(value.shape[2]), heads)[:, None]
            patch[name] = lambda v, _, new=value, k=mask: jnp.where(k, new, v)
    return float(metric(m.run_with_hooks(corrupted, patch, **run)))


def path_patching_beside_hooked_runs(
    m, clean, corrupted, metric, receivers, senders, site="z", clean_run=(), held_run=(), **options
):
    """``(direct, through, comparisons)``: `path_patching` to the logits and through
    ``receivers`` (``options``: its keywords for the runs), and for each sender ``(layer,
    head)`` (a negative head counts from the end) and each of the two, ``(sender,
    receivers or None, score, the same score from hooked runs)``. ``clean_run`` and
    ``held_run``: the keywords of the clean and the corrupted run for `run_with_cache` and
    `run_with_hooks`. (Shared with the image and audio tests.)"""
    from gemmalens import patching

    clean_run, held_run = dict(clean_run), dict(held_run)
    direct = np.asarray(patching.path_patching(m, clean, corrupted, metric, site=site, **options))
    through = np.asarray(
        patching.path_patching(m, clean, corrupted, metric, receivers, site, **options)
    )
    heads_out = [n for s in m.stacks for n in patching.site_names(m, f"{s.prefix}z")]
    clean_z = m.run_with_cache(clean, names=heads_out, **clean_run)[1]
    held_z = m.run_with_cache(corrupted, names=heads_out, **held_run)[1]
    names = patching.site_names(m, site)
    comparisons = []
    for layer, head in senders:
        sender = (layer, head % direct.shape[1])
        for scores, to in ((direct, None), (through, receivers)):
            expected = path_patched_by_hand(
                m, corrupted, metric, clean_z, held_z, names, sender, to, **held_run
            )
            comparisons.append((sender, to, float(scores[sender]), expected))
    return direct, through, comparisons


@pytest.mark.parametrize("name", FAMILIES)
def test_path_patching_equals_hooked_runs_on_every_family(families, name):
    """`path_patching` against the same runs made here with hooks, for senders of the
    first two layers, to the logits and to each family's receivers (a KV-sharing
    layer's queries, a residual stream, T5Gemma 2's cross-attention keys); senders at or
    after the receivers' layer score the corrupted run's metric; with a decoder's last
    layer as sender the direct path is the whole effect, `sweep(site='z')`."""
    from gemmalens import patching

    family = families(name)
    m, corrupted = family.m, _corrupted_tokens()
    site, receivers, receiver_layer = PATH_CASES[name]
    run = {"decoder_tokens": DECODER_TOKENS} if name == "t5gemma2" else {}
    direct, through, comparisons = path_patching_beside_hooked_runs(
        m, TOKENS, corrupted, _metric, receivers, [(0, 0), (0, -1), (1, 1)], site, run, run, **run
    )
    assert through.shape == direct.shape and np.isfinite(direct).all()
    for sender, to, score, expected in comparisons:
        assert abs(score - expected) <= 1e-4 * max(1.0, abs(expected)), (
            f"{name} sender {sender} receivers {to}: {score} != {expected}"
        )
    corrupted_metric = float(_metric(m(corrupted, **run)))
    if receiver_layer is None:
        # The encoder reaches the decoder only through the decoder's attention, which is
        # held: an encoder head has no path to the logits but through a receiver.
        np.testing.assert_allclose(direct, corrupted_metric, atol=1e-5)
    else:
        np.testing.assert_allclose(through[receiver_layer:], corrupted_metric, atol=1e-5)
        last = np.asarray(patching.sweep(m, TOKENS, corrupted, _metric, site="z"))[-1]
        np.testing.assert_allclose(direct[-1], last, rtol=1e-5, atol=1e-5)
        assert np.ptp(direct) > 1e-3  # heads differ: the comparisons can fail
    assert np.ptp(through) > 1e-4


def test_path_patching_on_a_padded_batch():
    """Two prompts of different lengths, right-padded with a mask, and a metric that reads
    each row's last real token (a gather, so every position's logits are computed): path
    patching equals the runs made with hooks (Gemma 3n teaching model, AltUp and KV
    sharing)."""

    m = gl.teaching_model("gemma3n")
    clean, mask = m.to_tokens(
        ["When Mary and John went out, John gave a drink to", "Mary and John: John gave it to"]
    )
    corrupted, _ = m.to_tokens(
        ["When Mary and John went out, Mary gave a drink to", "Mary and John: Mary gave it to"]
    )
    mask = np.asarray(mask)
    assert (mask == 0).any()  # the second row is padded
    last, rows = mask.sum(1) - 1, np.arange(2)
    mary, john = (m.tokenizer.encode(word, add_bos=False)[0] for word in (" Mary", " John"))

    def metric(logits):
        return (logits[rows, last, mary] - logits[rows, last, john]).mean()

    receivers = {"blocks.5.attn.hook_q": None}
    masked = {"attention_mask": mask}
    direct, through, comparisons = path_patching_beside_hooked_runs(
        m, clean, corrupted, metric, receivers, [(3, 3), (0, 1)], "z", masked, masked, **masked
    )
    for _, _, score, expected in comparisons:
        assert abs(score - expected) <= 1e-4 * max(1.0, abs(expected))
    assert np.ptp(direct) > 1.0 and np.ptp(through) > 1.0
