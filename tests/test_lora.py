"""LoRA adapters: PEFT's adapters and logits on tiny transformers models of every family,
save/load round trips both ways, merging, no-op adapters, the adapter hook points, the
comparison helpers against values computed independently, and bad input."""

from __future__ import annotations

import json

import jax
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file, save_file

import gemmalens as gl
from gemmalens.checkpoints.safetensors_files import CheckpointError
from tests import hf_reference as ref

TOLERANCE = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
RS = np.random.RandomState(0)
TOKENS = RS.randint(3, 250, (2, 9))


def _hf_decoder(build):
    def make(directory):
        return build(directory), {}

    return make


def _hf_t5(directory):
    model = ref.t5gemma2(directory, perturbation=0.05)
    decoder = RS.randint(3, 250, (2, 5))
    decoder[:, 0] = 2
    return model, {"decoder_tokens": decoder}


FAMILIES = {
    "gemma3": _hf_decoder(ref.gemma3_text),
    "gemma3n": _hf_decoder(ref.gemma3n_text),
    "gemma4_e2b": _hf_decoder(lambda d: ref.gemma4_text(d, moe=False)),
    "gemma4_moe": _hf_decoder(lambda d: ref.gemma4_text(d, moe=True)),
    "t5gemma2": _hf_t5,
}


def _peft_logits(model, tokens, streams) -> np.ndarray:
    args = {"input_ids": torch.as_tensor(tokens)}
    if "decoder_tokens" in streams:
        args["decoder_input_ids"] = torch.as_tensor(streams["decoder_tokens"])
    with torch.no_grad():
        return model(**args).logits.float().numpy()


@pytest.fixture(scope="module", params=list(FAMILIES))
def peft_pair(request, tmp_path_factory):
    """A tiny perturbed transformers model of one family with a PEFT LoRA (random A and B,
    rsLoRA off, alpha != rank), saved; and the base loaded in gemmalens."""
    base_dir = tmp_path_factory.mktemp(f"{request.param}-base")
    hf_model, streams = FAMILIES[request.param](base_dir)
    config = peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0
    )
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(hf_model, config).eval()
    adapter_dir = tmp_path_factory.mktemp(f"{request.param}-adapter")
    peft_model.save_pretrained(adapter_dir)
    return peft_model, adapter_dir, gl.load(base_dir), streams


def test_peft_adapter_gives_peft_logits(peft_pair):
    peft_model, adapter_dir, base, streams = peft_pair
    adapted = gl.lora.load_adapter(base, adapter_dir)
    theirs = _peft_logits(peft_model, TOKENS, streams)
    ours = np.asarray(adapted(TOKENS, **streams))
    assert np.abs(ours - theirs).max() <= TOLERANCE
    # The adapter matters: without it the logits are far from PEFT's.
    assert np.abs(np.asarray(base(TOKENS, **streams)) - theirs).max() > 100 * TOLERANCE
    assert adapted.adapter_config["r"] == 3 and gl.lora.adapted_modules(adapted)


def test_saved_adapter_loads_in_peft_and_round_trips(peft_pair, tmp_path):
    peft_model, adapter_dir, base, streams = peft_pair
    adapted = gl.lora.load_adapter(base, adapter_dir)
    gl.lora.save_adapter(adapted, tmp_path)
    # gemmalens -> gemmalens: identical adapter matrices and outputs.
    again = gl.lora.load_adapter(base, tmp_path)
    assert np.array_equal(
        np.asarray(again(TOKENS, **streams)), np.asarray(adapted(TOKENS, **streams))
    )
    # gemmalens -> PEFT: same tensor names (less layers PEFT adapted but never uses) and values.
    theirs, ours = (
        load_file(adapter_dir / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter_model.safetensors"),
    )
    unused = adapted.adapter_config["unused_modules"]
    expected = {k for k in theirs if not any(f".{u}.lora_" in k for u in unused)}
    assert set(ours) == expected
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], atol=1e-7)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["peft_type"]) == (3, 5.0, "LORA")


def test_merge_equals_unmerged(peft_pair):
    _, adapter_dir, base, streams = peft_pair
    adapted = gl.lora.load_adapter(base, adapter_dir)
    merged = gl.lora.merge(adapted)
    assert not gl.lora.adapted_modules(merged)
    assert not [h for h in merged.hook_names if ".lora." in h]
    diff = np.abs(np.asarray(merged(TOKENS, **streams)) - np.asarray(adapted(TOKENS, **streams)))
    assert diff.max() <= TOLERANCE


def test_comparisons_on_every_family(peft_pair):
    """module_effects and lens_difference against hooked runs and the models' own outputs."""
    _, adapter_dir, base, streams = peft_pair
    adapted = gl.lora.load_adapter(base, adapter_dir)
    target = 7

    def metric(logits):
        return jax.nn.log_softmax(logits[0, -1])[target]

    effects = gl.lora.module_effects(adapted, TOKENS, metric, **streams)
    assert effects["adapted"] == pytest.approx(float(metric(adapted(TOKENS, **streams))), abs=1e-5)
    assert effects["base"] == pytest.approx(float(metric(base(TOKENS, **streams))), abs=1e-5)
    row = effects["modules"][0]
    # Every use of the adapter (a projection used twice has hook_delta and hook_delta_1).
    off = {f"{row['module']}.lora.hook_delta*": lambda v, name: v * 0}
    knocked = float(metric(adapted.run_with_hooks(TOKENS, off, **streams)))
    assert row["knockout"] == pytest.approx(effects["adapted"] - knocked, abs=1e-5)
    # Every hook can be captured, each use of a shared adapter under its own name.
    _, cache = adapted.run_with_cache(TOKENS, "*.lora.*", **streams)
    assert len(cache) >= len(gl.lora.adapted_modules(adapted))

    lens = gl.lora.lens_difference(base, adapted, TOKENS, target, **streams)
    for name, model in (("base", base), ("adapted", adapted)):
        final = jax.nn.log_softmax(np.asarray(model(TOKENS, **streams))[:, -1], axis=-1)
        np.testing.assert_allclose(lens[name][-1], final[:, target], atol=1e-4)


# ------------------------------------------------------------- the teaching model


@pytest.fixture(scope="module")
def teaching():
    return gl.teaching_model("gemma3")


@pytest.fixture(scope="module")
def random_adapter(teaching):
    return gl.lora.attach(
        teaching,
        rank=4,
        targets=("q_proj", "v_proj", "o_proj", "down_proj"),
        alpha=8,
        init="random",
    )


@pytest.mark.parametrize(
    "options", [dict(rank=4), dict(rank=4, init="zeros"), dict(rank=0, init="random")]
)
def test_noop_adapters_change_nothing(teaching, options):
    adapted = gl.lora.attach(teaching, **options)
    assert gl.lora.adapted_modules(adapted)
    assert np.array_equal(np.asarray(adapted(TOKENS)), np.asarray(teaching(TOKENS)))


def test_attach_leaves_the_base_alone_and_detach_restores_it(teaching, random_adapter):
    assert not gl.lora.adapted_modules(teaching)
    assert np.abs(np.asarray(random_adapter(TOKENS)) - np.asarray(teaching(TOKENS))).max() > 0.1
    restored = gl.lora.detach(random_adapter)
    assert np.array_equal(np.asarray(restored(TOKENS)), np.asarray(teaching(TOKENS)))


def test_hook_delta_is_scale_b_a_x(random_adapter):
    """The captured delta equals scale * B A x with x the projection's captured input."""
    m = random_adapter
    _, cache = m.run_with_cache(
        TOKENS, ["blocks.2.attn.hook_z", "blocks.2.attn.o_proj.lora.hook_delta"]
    )
    adapter = [
        a
        for a in jax.tree.leaves(m.model, is_leaf=lambda x: isinstance(x, gl.lora.LoRALinear))
        if isinstance(a, gl.lora.LoRALinear) and a.module == "blocks.2.attn.o_proj"
    ][0]
    a = np.asarray(adapter.lora.down.weights.value.unwrap("lora_rank", "heads", "head_dim"))
    b = np.asarray(adapter.lora.up.weights.value.unwrap("embedding", "lora_rank"))
    z = np.asarray(cache["blocks.2.attn.hook_z"])  # [batch, seq, heads, head_dim]
    expected = adapter.lora.scale * np.einsum("er,rhd,bshd->bse", b, a, z)
    np.testing.assert_allclose(
        np.asarray(cache["blocks.2.attn.o_proj.lora.hook_delta"]), expected, rtol=1e-5, atol=1e-4
    )
    # Zeroing every delta through hooks gives the base model's logits.
    zeroed = m.run_with_hooks(TOKENS, {"*.lora.hook_delta": lambda v, name: v * 0})
    base = gl.lora.detach(m)
    np.testing.assert_allclose(np.asarray(zeroed), np.asarray(base(TOKENS)), atol=1e-5)


def test_delta_norms_match_dense_products(random_adapter):
    rows = gl.lora.delta_norms(random_adapter)
    adapters = {
        a.module: a
        for a in jax.tree.leaves(
            random_adapter.model, is_leaf=lambda x: isinstance(x, gl.lora.LoRALinear)
        )
        if isinstance(a, gl.lora.LoRALinear)
    }
    whole = [r for r in rows if r["head"] is None]
    assert len(whole) == len(adapters) == 4 * random_adapter.config.num_hidden_layers
    assert [r["norm"] for r in whole] == sorted((r["norm"] for r in whole), reverse=True)
    for row in rows:
        adapter = adapters[row["module"]]
        base = adapter.base
        axes_out, axes_in = base.out_axis_names, base.in_axis_names
        a = np.asarray(adapter.lora.down.weights.value.unwrap("lora_rank", *axes_in), np.float64)
        b = np.asarray(adapter.lora.up.weights.value.unwrap(*axes_out, "lora_rank"), np.float64)
        delta = adapter.lora.scale * np.tensordot(b, a, axes=([b.ndim - 1], [0]))
        if row["head"] is not None:
            axis = [*axes_out, *axes_in].index(
                "heads" if "heads" in axes_out + axes_in else "kv_heads"
            )
            delta = np.take(delta, row["head"], axis=axis)
        assert row["norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-4)


def test_module_effects_equal_hooked_runs(random_adapter):
    target = 7

    def metric(logits):
        return jax.nn.log_softmax(logits[0, -1])[target]

    effects = gl.lora.module_effects(random_adapter, TOKENS, metric)
    adapted = float(metric(random_adapter(TOKENS)))
    base = float(metric(gl.lora.detach(random_adapter)(TOKENS)))
    assert effects["adapted"] == pytest.approx(adapted, abs=1e-5)
    assert effects["base"] == pytest.approx(base, abs=1e-5)
    for row in effects["modules"][:2]:
        off = {f"{row['module']}.lora.hook_delta": lambda v, name: v * 0}
        knocked = float(metric(random_adapter.run_with_hooks(TOKENS, off)))
        assert row["knockout"] == pytest.approx(adapted - knocked, abs=1e-5)
        only = {
            "*.lora.hook_delta": lambda v, name, keep=row["module"]: (
                v if name.startswith(keep) else v * 0
            )
        }
        alone = float(metric(random_adapter.run_with_hooks(TOKENS, only)))
        assert row["alone"] == pytest.approx(alone - base, abs=1e-5)


def test_lens_difference_ends_at_each_models_output(teaching, random_adapter):
    target = 7
    d = gl.lora.lens_difference(teaching, random_adapter, TOKENS, target)
    for name, model in (("base", teaching), ("adapted", random_adapter)):
        final = jax.nn.log_softmax(np.asarray(model(TOKENS))[:, -1], axis=-1)[:, target]
        np.testing.assert_allclose(d[name][-1], final, atol=1e-4)
    assert (
        d["labels"][0] == "hook_embed" and len(d["labels"]) == teaching.config.num_hidden_layers + 1
    )
    np.testing.assert_allclose(d["base"][0], d["adapted"][0])  # the embedding is not adapted


def test_training_teaches_a_new_fact(teaching):
    prompt, answer = "The capital of Zorbia is", " Quill"
    adapted = gl.lora.attach(teaching, rank=4, targets=("q_proj", "v_proj", "down_proj"))
    trained, losses = gl.lora.train(adapted, [(prompt, answer)], steps=40, learning_rate=3e-2)
    assert losses[-1] < 0.1 * losses[0]
    tokens, _ = teaching.to_tokens(prompt)
    first_answer_token = teaching.tokenizer.encode([prompt + answer])[0][tokens.shape[1]]
    assert int(np.argmax(np.asarray(trained(tokens))[0, -1])) == first_answer_token
    assert int(np.argmax(np.asarray(teaching(tokens))[0, -1])) != first_answer_token


# ------------------------------------------------------------------------ bad input


def test_bad_targets_and_double_attach(teaching, random_adapter):
    with pytest.raises(ValueError, match=r"No projection is named \['qproj'\].*q_proj"):
        gl.lora.attach(teaching, targets=("qproj",))
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        gl.lora.attach(random_adapter)
    with pytest.raises(ValueError, match="needs a model with LoRA adapters"):
        gl.lora.merge(teaching)


def test_pickled_adapters_are_refused(teaching, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not opened")
    with pytest.raises(
        CheckpointError, match=r"pickle file, which gemmalens never opens(.|\n)*save_file"
    ):
        gl.lora.load_adapter(teaching, tmp_path)


def test_adapter_for_another_architecture(teaching, random_adapter, tmp_path):
    gl.lora.save_adapter(random_adapter, tmp_path / "good")
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())

    def write(name, tensors, config):
        directory = tmp_path / name
        directory.mkdir()
        save_file(tensors, directory / "adapter_model.safetensors")
        (directory / "adapter_config.json").write_text(json.dumps(config))
        return directory

    extra = dict(tensors)
    extra["base_model.model.model.layers.40.self_attn.q_proj.lora_A.weight"] = np.zeros(
        (4, 4), np.float32
    )
    with pytest.raises(
        CheckpointError, match=r"modules this gemma3 model does not have.*layers\.40"
    ):
        gl.lora.load_adapter(teaching, write("extra", extra, config))
    wide = {
        k: np.zeros((v.shape[0], v.shape[1] + 1), np.float32) if "lora_A" in k else v
        for k, v in tensors.items()
    }
    with pytest.raises(CheckpointError, match=r"another model size"):
        gl.lora.load_adapter(teaching, write("wide", wide, config))
    with pytest.raises(CheckpointError, match=r"has rank 4 but adapter_config.json says r=8"):
        gl.lora.load_adapter(teaching, write("rank", tensors, dict(config, r=8)))
    with pytest.raises(CheckpointError, match=r"use_dora"):
        gl.lora.load_adapter(teaching, write("dora", tensors, dict(config, use_dora=True)))
    truncated = write("truncated", tensors, config)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or not safetensors"):
        gl.lora.load_adapter(teaching, truncated)
