"""Sparse autoencoders and transcoders (`gemmalens.sae`) on the Gemma 3 teaching model.

Files are written here in the published layouts (Gemma Scope 2 ``params.safetensors`` +
``config.json``; SAELens ``cfg.json`` + ``sae_weights.safetensors``) with random weights
whose thresholds let a fraction of features fire, and checked against an independent
NumPy JumpReLU.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import gemmalens as gl
from gemmalens import patching
from gemmalens import sae as S
from gemmalens.checkpoints.safetensors_files import CheckpointError
from gemmalens.compiling import Distinct

D, WIDTH, LAYER, TC_LAYER, Z_LAYER = 256, 48, 2, 3, 1


def _params(rng, d_in=D, width=WIDTH, d_out=D, skip=False):
    params = {
        "w_enc": (rng.normal(size=(d_in, width)) / np.sqrt(d_in)).astype(np.float32),
        "w_dec": (rng.normal(size=(width, d_out)) / np.sqrt(width)).astype(np.float32),
        "b_enc": (rng.normal(size=width) * 0.1).astype(np.float32),
        "b_dec": (rng.normal(size=d_out) * 0.1).astype(np.float32),
        "threshold": np.abs(rng.normal(size=width)).astype(np.float32),
    }
    if skip:
        params["affine_skip_connection"] = (rng.normal(size=(d_in, d_out)) / d_in).astype(
            np.float32
        )
    return params


def write_gemma_scope(folder, params, hook_in, hook_out=None, **config):
    folder.mkdir(parents=True)
    save_file(params, str(folder / "params.safetensors"))
    cfg = {
        "hf_hook_point_in": hook_in,
        "width": params["w_enc"].shape[1],
        "architecture": "jump_relu",
        "model_name": "google/gemma-3-270m",
        "l0": 12,
        **config,
    }
    if hook_out is not None:
        cfg["hf_hook_point_out"] = hook_out
        cfg["affine_connection"] = "affine_skip_connection" in params
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def numpy_jumprelu(params, x):
    pre = x @ params["w_enc"] + params["b_enc"]
    f = np.where(pre > params["threshold"], np.maximum(pre, 0), 0)
    out = f @ params["w_dec"] + params["b_dec"]
    if "affine_skip_connection" in params:
        out = out + x @ params["affine_skip_connection"]
    return f, out


@pytest.fixture(scope="module")
def m():
    return gl.teaching_model("gemma3")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma-scope-2")
    rng = np.random.default_rng(0)
    out = {}
    out["res"] = (
        write_gemma_scope(
            root / "resid_post" / f"layer_{LAYER}_width_48_l0_small",
            p := _params(rng),
            f"model.layers.{LAYER}.output",
        ),
        p,
    )
    out["tc"] = (
        write_gemma_scope(
            root / "transcoder_all" / f"layer_{TC_LAYER}_width_48_l0_small_affine",
            p := _params(rng, skip=True),
            f"model.layers.{TC_LAYER}.pre_feedforward_layernorm.output",
            f"model.layers.{TC_LAYER}.post_feedforward_layernorm.output",
        ),
        p,
    )
    out["z"] = (
        write_gemma_scope(
            root / "attn_out" / f"layer_{Z_LAYER}_width_48_l0_small",
            p := _params(rng),
            f"model.layers.{Z_LAYER}.self_attn.o_proj.input",
        ),
        p,
    )
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def saes(files, m):
    return {k: S.load(files[k][0], m) for k in ("res", "tc", "z")}


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(1)
    return jnp.asarray(rng.integers(3, 4096, size=(2, 10)), jnp.int32)


@pytest.fixture(scope="module")
def spliced(m, saes):
    return S.splice(m, [saes["res"], saes["tc"], saes["z"]])


@pytest.fixture(scope="module")
def spliced_cache(spliced, tokens):
    return spliced.run_with_cache(tokens)


# ----------------------------------------------------------------------------- formats


def test_gemma_scope_sae_and_affine_transcoder_match_numpy(files, saes):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, D)).astype(np.float32) * 3
    for key in ("res", "tc", "z"):
        sae, params = saes[key], files[key][1]
        f, out = numpy_jumprelu(params, x)
        assert 0.05 < (f > 0).mean() < 0.95, "thresholds should let a fraction fire"
        np.testing.assert_allclose(np.asarray(sae.encode(x)), f, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(sae(x)), out, rtol=1e-5, atol=1e-5)
    assert saes["res"].hook_in == f"blocks.{LAYER}.hook_resid_post"
    assert saes["z"].hook_in == f"blocks.{Z_LAYER}.attn.hook_z"
    tc = saes["tc"]
    assert (tc.hook_in, tc.hook_out) == (
        f"blocks.{TC_LAYER}.mlp.hook_in",
        f"blocks.{TC_LAYER}.hook_mlp_out",
    )
    # hook_z values [..., heads, head_dim] are flattened head-major
    np.testing.assert_allclose(
        np.asarray(saes["z"].encode(x.reshape(5, 4, 64))), np.asarray(saes["z"].encode(x))
    )


def test_config_missing_falls_back_to_folder_names(files, tmp_path):
    folder = tmp_path / "mlp_out" / "layer_4_width_48_l0_big"
    folder.mkdir(parents=True)
    save_file(files["res"][1], str(folder / "params.safetensors"))
    assert S.load(folder).hook_in == "blocks.4.hook_mlp_out"


def _write_saelens(folder, params, hook, hook_out=None, architecture="jumprelu"):
    folder.mkdir(parents=True)
    weights = {
        "W_enc": params["w_enc"],
        "W_dec": params["w_dec"],
        "b_enc": params["b_enc"],
        "b_dec": params["b_dec"],
        "threshold": params["threshold"],
    }
    if "affine_skip_connection" in params:
        weights["W_skip"] = np.ascontiguousarray(params["affine_skip_connection"].T)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    metadata = {"hook_name": hook, "model_name": "gemma-3-270m"}
    if hook_out:
        metadata["hook_name_out"] = hook_out
    cfg = {
        "architecture": architecture,
        "d_in": params["w_enc"].shape[0],
        "d_sae": params["w_enc"].shape[1],
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": metadata,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_saelens_saved_format_reads_the_same(files, saes, m, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, D)).astype(np.float32)
    res = S.load(
        _write_saelens(tmp_path / "res", files["res"][1], f"blocks.{LAYER}.hook_resid_post"), m
    )
    tc = S.load(
        _write_saelens(
            tmp_path / "tc",
            files["tc"][1],
            f"model.layers.{TC_LAYER}.pre_feedforward_layernorm.output",
            f"blocks.{TC_LAYER}.hook_mlp_out",
            architecture="jumprelu_skip_transcoder",
        ),
        m,
    )
    assert res.source == "SAELens" and res.hook_in == saes["res"].hook_in
    assert tc.is_transcoder and tc.site == saes["tc"].site
    for ours, theirs in ((res, saes["res"]), (tc, saes["tc"])):
        np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(theirs(x)), rtol=1e-6)


def test_matches_saelens_on_the_same_files(files, tmp_path, monkeypatch):
    """SAELens' own Gemma Scope 2 loader, pointed at the files written here (no network)."""
    pytest.importorskip(
        "sae_lens",
        reason="SAELens is an optional reference, not in the test extra (it brings about 50 "
        "packages, TransformerLens among them); the numpy references above check the same "
        "algebra. pip install sae-lens==6.54.12 to run this comparison.",
    )
    import torch
    from sae_lens import SAE as LensSAE
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from safetensors.numpy import load_file

    def local(repo_id, filename, subfolder=None, **kwargs):
        path = files["root"] / (f"{subfolder}/{filename}" if subfolder else filename)
        if not path.exists():
            raise loaders.EntryNotFoundError(str(path))
        return str(path)

    def shapes(repo_id, filename):
        return {k: list(v.shape) for k, v in load_file(files["root"] / filename).items()}

    monkeypatch.setattr(loaders, "hf_hub_download", local)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", shapes)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, D)).astype(np.float32) * 3
    for key in ("res", "tc"):
        folder = files[key][0].relative_to(files["root"]).as_posix()
        cfg, state, _ = loaders.gemma_3_sae_huggingface_loader(
            "google/gemma-scope-2-270m-pt", folder, "cpu", False, None
        )
        lens = LensSAE.from_dict(loaders.handle_config_defaulting(cfg))
        lens.load_state_dict(state)
        with torch.no_grad():
            xt = torch.from_numpy(x)
            lens_f = lens.encode(xt).numpy()
            lens_out = lens(xt).numpy()
        ours = S.load(files[key][0])
        np.testing.assert_allclose(np.asarray(ours.encode(x)), lens_f, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ours(x)), lens_out, rtol=1e-5, atol=1e-5)
        # and SAELens' saved format, written by SAELens, reads back the same
        lens.save_model(tmp_path / key)
        again = S.load(tmp_path / key)
        np.testing.assert_allclose(np.asarray(again(x)), lens_out, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- splicing


def test_splice_with_error_term_leaves_logits_unchanged(m, saes, spliced, tokens, spliced_cache):
    # Like with like: a run capturing every hook compiles differently from a plain call
    # (the two differ by ~1e-5 on the unspliced model too). Float rounding grows with the
    # logits, so the bound is relative to the largest one.
    logits, _ = spliced_cache
    largest = float(jnp.abs(logits).max())
    assert float(jnp.abs(logits - m.run_with_cache(tokens)[0]).max()) <= 5e-7 * largest
    sae_only = S.splice(m, [saes["res"], saes["z"]])
    assert float(jnp.abs(sae_only(tokens) - m(tokens)).max()) <= 1e-5
    # The spliced MLP is the same computation, compiled in another fusion: float rounding.
    np.testing.assert_allclose(spliced(tokens), m(tokens), rtol=1e-6, atol=1e-5)
    assert not any(".sae." in n for n in m.hook_names)  # m itself is unchanged
    sae_hooks = [n for n in spliced.hook_names if ".sae." in n]
    assert len(sae_hooks) == 9 and f"blocks.{TC_LAYER}.mlp.hook_in" in spliced.hook_names
    without = S.splice(m, [saes["res"]], include_error=False)
    assert float(jnp.abs(without(tokens) - m(tokens)).max()) > 1e-3


def test_spliced_hooks_hold_the_sae_values(saes, spliced_cache):
    _, cache = spliced_cache
    res, tc, z = saes["res"], saes["tc"], saes["z"]
    x = np.asarray(cache[res.hook_in])
    f = np.asarray(cache[res.hook_name("features")])
    np.testing.assert_allclose(f, np.asarray(res.encode(x)), rtol=1e-5, atol=1e-5)
    recon = np.asarray(cache[res.hook_name("reconstruction")])
    np.testing.assert_allclose(recon, np.asarray(res.decode(f)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(cache[res.hook_name("error")]), x - recon, rtol=1e-5, atol=1e-4
    )
    # the transcoder reads the MLP input and its error is the MLP output minus x_hat
    mlp_in = np.asarray(cache[tc.hook_in])
    mlp_out = np.asarray(cache[tc.hook_out])
    tc_recon = np.asarray(cache[tc.hook_name("reconstruction")])
    np.testing.assert_allclose(tc_recon, np.asarray(tc(mlp_in)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(cache[tc.hook_name("error")]), mlp_out - tc_recon, rtol=1e-5, atol=1e-4
    )
    zf = np.asarray(cache[z.hook_name("features")])
    np.testing.assert_allclose(zf, np.asarray(z.encode(np.asarray(cache[z.hook_in]))), atol=1e-5)


def test_ablating_a_feature_subtracts_its_decoder_contribution(
    saes, spliced, tokens, spliced_cache
):
    _, cache = spliced_cache
    res = saes["res"]
    f = np.asarray(cache[res.hook_name("features")])
    chosen = [int(i) for i in np.argsort(-(f > 0).sum((0, 1)))[:2]]
    after = f"blocks.{LAYER + 1}.hook_resid_pre"  # the value that leaves the SAE
    with spliced.hooks(S.ablate(res, chosen)):
        _, ablated = spliced.run_with_cache(tokens, names=[after, res.hook_name("features")])
    expected = np.asarray(cache[after]) - f[..., chosen] @ res.w_dec[chosen]
    np.testing.assert_allclose(np.asarray(ablated[after]), expected, rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(ablated[res.hook_name("features")])[..., chosen] == 0)


def test_steering_by_zero_changes_nothing_and_adds_the_direction(m, saes, tokens):
    res = saes["res"]
    base = m(tokens)
    assert float(jnp.abs(m.run_with_hooks(tokens, S.steer(res, 3, 0.0)) - base).max()) == 0.0
    after = f"blocks.{LAYER + 1}.hook_resid_pre"
    _, plain = m.run_with_cache(tokens, names=[after])
    with m.hooks(S.steer(res, 3, 2.5, positions=[4])):
        _, steered = m.run_with_cache(tokens, names=[after])
    delta = np.asarray(steered[after]) - np.asarray(plain[after])
    np.testing.assert_allclose(delta[:, 4], np.broadcast_to(2.5 * res.w_dec[3], (2, D)), atol=1e-4)
    assert np.abs(np.delete(delta, 4, axis=1)).max() == 0


def test_vectorised_feature_sweep_equals_a_loop(m, saes, tokens):
    ms = S.splice(m, [saes["res"]])
    corrupted = tokens.at[:, 2].set(11)
    name = saes["res"].hook_name("features")

    def metric(logits):
        return logits[:, -1, 7].mean() - logits[:, -1, 9].mean()

    scores = patching.sweep(ms, tokens, corrupted, metric, site="features")
    assert scores.shape == (1, WIDTH)
    assert "features" in patching.available_sites(ms)
    _, clean = ms.run_with_cache(tokens, names=[name])
    clean_f = clean[name]
    for feature in (5, 40):  # each loop run compiles anew

        def patch(value, name, feature=feature):
            return value.at[..., feature].set(clean_f[..., feature])

        looped = metric(ms.run_with_hooks(corrupted, {name: patch}))
        np.testing.assert_allclose(float(scores[0, feature]), float(looped), rtol=1e-5, atol=1e-5)
    estimates = patching.attribution_patching(ms, tokens, corrupted, metric, site="features")
    assert estimates.shape == (1, WIDTH) and bool(jnp.isfinite(estimates).all())


def test_top_activations_match_a_full_capture(saes, spliced, tokens):
    rng = np.random.default_rng(5)
    corpus = rng.integers(3, 4096, size=(7, 10))
    corpus[6, 6:] = 0  # padding never counts
    res = saes["res"]
    top = S.top_activations(spliced, res, [1, 2, 3], corpus, k=4, batch_size=3, show_progress=False)
    _, cache = spliced.run_with_cache(corpus, names=[res.hook_name("features")])
    f = np.array(cache[res.hook_name("features")])
    f[6, 6:] = -np.inf
    for row, feature in enumerate((1, 2, 3)):
        expected = np.sort(f[..., feature].ravel())[::-1][:4]
        np.testing.assert_allclose(top.values[row], expected, rtol=1e-5, atol=1e-5)
        s, p, v = top.examples(feature)[0]
        assert abs(f[s, p, feature] - v) < 1e-4


def test_logit_effects_are_the_decoder_row_through_the_unembedding(m, saes):
    res = saes["res"]
    effects = S.logit_effects(m, res, [0, 4])
    gain = 1 + np.asarray(m.model.final_norm.sublayers[0].scale.value.unwrap("embedding"))
    table = np.asarray(m.model.unembed.sublayers[0].table.value.unwrap("vocab", "embedding"))
    np.testing.assert_allclose(
        np.asarray(effects), (res.w_dec[[0, 4]] * gain) @ table.T, rtol=1e-4, atol=1e-4
    )
    assert S.logit_effects(m, saes["z"], 1).shape == (4096,)


def test_attribution_is_gradient_times_activation(saes, spliced, tokens, spliced_cache):
    _, cache = spliced_cache
    res = saes["res"]

    def metric(logits):
        return logits[:, -1, 7].mean()

    result = S.attribute(spliced, tokens, metric, saes=res)
    after = f"blocks.{LAYER + 1}.hook_resid_pre"
    inputs = spliced._prepare(tokens, None, {})
    _, (grad,) = patching._metric_and_grads(
        Distinct.of(spliced._frozen),
        [jnp.zeros_like(cache[after])],
        inputs,
        names=(after,),
        metric=metric,
        forward=spliced.logits_of,
    )
    g = np.asarray(grad)
    f = np.asarray(cache[res.hook_name("features")])
    expected = np.einsum("bsf,bsd,fd->f", f, g, res.w_dec)
    np.testing.assert_allclose(result.features[res.site], expected, rtol=1e-3, atol=1e-4)
    error = float((np.asarray(cache[res.hook_name("error")]) * g).sum())
    assert abs(result.error[res.site] - error) < 1e-3 * max(1.0, abs(error))
    assert 0.0 <= result.error_share(res.site) <= 1.0


# ----------------------------------------------------------------------------- bad input


def test_width_mismatch_is_named(files, tmp_path):
    folder = write_gemma_scope(
        tmp_path / "resid_post" / "layer_2_width_16k",
        files["res"][1],
        "model.layers.2.output",
        width=16384,
    )
    with pytest.raises(CheckpointError, match="Width mismatch.*width 16384.*48 features"):
        S.load(folder)


def test_d_model_mismatch_is_named(m, tmp_path):
    folder = write_gemma_scope(
        tmp_path / "resid_post" / "layer_2",
        _params(np.random.default_rng(6), d_in=640, d_out=640),
        "model.layers.2.output",
    )
    with pytest.raises(CheckpointError, match="d_model mismatch.*640-wide.*256 wide"):
        S.load(folder, m)


def test_layer_out_of_range_is_named(m, files, tmp_path):
    folder = write_gemma_scope(
        tmp_path / "resid_post" / "layer_9", files["res"][1], "model.layers.9.output"
    )
    sae = S.load(folder)  # the file alone is fine
    with pytest.raises(CheckpointError, match=r"Layer out of range.*layer 9.*6 layers \(0-5\)"):
        S.splice(m, [sae])


def test_unknown_hook_point_is_named(files, tmp_path):
    folder = write_gemma_scope(
        tmp_path / "resid_post" / "layer_2", files["res"][1], "model.layers.2.self_attn.q_norm"
    )
    with pytest.raises(
        CheckpointError, match="Unknown hook point 'model.layers.2.self_attn.q_norm'"
    ):
        S.load(folder)


def test_features_site_without_saes_is_named(m, tokens):
    with pytest.raises(ValueError, match="'features' needs spliced sparse autoencoders"):
        patching.sweep(m, tokens, tokens, lambda lg: lg.sum(), site="features")


def test_features_and_positions_out_of_range_are_refused(m, saes, spliced, tokens):
    """A feature past the dictionary's width used to be dropped by JAX's scatter (ablate:
    nothing ablated) or clamped by its gather (top_activations: the last feature's
    activations under the asked-for number), silently; each tool now names the range."""
    res = saes["res"]
    outside = f"feature {WIDTH} is outside the SAE at '{res.site}', which has {WIDTH} features"
    with pytest.raises(IndexError, match=outside):
        spliced.run_with_hooks(tokens, S.ablate(res, [1, WIDTH]))
    with pytest.raises(IndexError, match=outside):
        S.steer(res, WIDTH, 1.0)
    with pytest.raises(IndexError, match=outside):
        S.top_activations(spliced, res, [WIDTH], np.asarray(tokens), show_progress=False)
    with pytest.raises(IndexError, match=outside):
        S.logit_effects(m, res, [0, WIDTH])
    with pytest.raises(IndexError, match="position 10 is outside 'blocks"):
        m.run_with_hooks(tokens, S.steer(res, 3, 1.0, positions=[10]))
    # Counting from the end is allowed, as in numpy.
    last = np.asarray(spliced.run_with_hooks(tokens, S.ablate(res, -1)))
    np.testing.assert_array_equal(
        last, np.asarray(spliced.run_with_hooks(tokens, S.ablate(res, WIDTH - 1)))
    )
    top = S.top_activations(spliced, res, [1, 2], np.asarray(tokens), k=2, show_progress=False)
    with pytest.raises(
        KeyError, match=r"Feature 3 was not among those searched; these are \[1, 2\]"
    ):
        top.examples(3)
