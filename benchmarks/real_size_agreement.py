"""Real-size agreement with transformers: every preset at its released dimensions.

    python benchmarks/real_size_agreement.py --presets all --dtype bfloat16 --out bf16.json
    python benchmarks/real_size_agreement.py --presets gemma3n_e4b --dtype float32 --f64 gemma3n_e4b
    python benchmarks/real_size_agreement.py --tiny      # the same code on tiny configs, on CPU

For each preset, transformers builds the model from the matching config with random weights
(transformers' own initialisation, then every norm weight, every other vector parameter and
Gemma 4's ``layer_scalar`` moved off its identity value by normal(0, 0.1) noise, and any
matrix that starts at zero filled with normal(0, 0.02)), saves it as a Hugging Face
checkpoint directory (sharded safetensors) and computes the reference logits on random
token ids; gemmalens then loads that directory with ``gemmalens.load`` and computes its own.
Both sides run eager attention (and eager experts) in transformers and the dtype asked for.

Reported per preset and dtype: max |dlogit|, max |dlogit| over the logit scale (the standard
deviation of the reference logits over the vocabulary, averaged over positions), top-1
agreement and, for the MoE, the fraction of (layer, token) pairs whose chosen expert sets
agree. ``bfloat16`` runs also measure both sides against transformers in float32 (the same
weights, upcast), so that gemmalens' bf16 error can be set beside transformers' own.
``float32`` runs compare per-layer hidden states too; ``--f64`` adds a float64 transformers
reference (and, for Gemma 3n, which neurons the activation-sparsity cutoff keeps).

Prints a Markdown table and writes the figures as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch
os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")  # and give memory back
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")  # no TF32 in float32 runs

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gemmalens as gl  # noqa: E402
from gemmalens.families.hf_config import to_hf  # noqa: E402

SLIDING, FULL = "sliding_attention", "full_attention"
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
# transformers class names per gemmalens family: (config class, model class, model_type).
HF_CLASSES = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "gemma3_text"),
    "gemma3n": ("Gemma3nTextConfig", "Gemma3nForCausalLM", "gemma3n_text"),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", "gemma4_text"),
    "t5gemma2": ("T5Gemma2Config", "T5Gemma2ForConditionalGeneration", "t5gemma2"),
}
# T5Gemma 2's SigLIP tower is unused by the text path compared here: a tiny one is built.
TINY_SIGLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)
NORM_NOISE = 0.1  # added to every vector parameter and layer_scalar
MATRIX_STD = 0.02  # for matrices that transformers initialises to zero
TINY_DEFAULT = ["gemma3_270m", "gemma3n_e4b", "gemma4_e2b", "gemma4_26b_a4b", "t5gemma2_270m_270m"]


# ------------------------------------------------------------------------------ configs


def tiny_config(name: str) -> Any:
    """The preset shrunk to a few small layers, its family's features kept."""
    config = gl.preset(name)
    family = config.family
    if family == "gemma3":
        return config.replace(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
            sliding_window=4, max_position_embeddings=256,
        )  # fmt: skip
    if family == "gemma3n":
        return config.replace(
            vocab_size=512, vocab_size_per_layer_input=480, hidden_size=64, intermediate_size=128,
            num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            hidden_size_per_layer_input=8, laurel_rank=8, num_kv_shared_layers=2,
            sliding_window=4, activation_sparsity_pattern=(0.95,) * 3 + (0.0,) * 4,
            max_position_embeddings=256,
        )  # fmt: skip
    if family == "gemma4":
        common = dict(
            vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
            num_attention_heads=4, head_dim=16, global_head_dim=32, sliding_window=4,
            max_position_embeddings=256,
        )  # fmt: skip
        if config.enable_moe_block or config.num_global_key_value_heads:
            return config.replace(
                **common, layer_types=(SLIDING, SLIDING, FULL) * 2, num_key_value_heads=2,
                num_global_key_value_heads=1,
                **(dict(num_experts=8, top_k_experts=2, moe_intermediate_size=16)
                   if config.enable_moe_block else {}),
            )  # fmt: skip
        return config.replace(
            **common, layer_types=(SLIDING, FULL) * 3, num_kv_shared_layers=2,
            num_key_value_heads=min(config.num_key_value_heads, 2),
            vocab_size_per_layer_input=512, hidden_size_per_layer_input=8,
        )  # fmt: skip
    if family == "t5gemma2":
        stack = tiny_config("gemma3_270m")
        return dataclasses.replace(
            config, encoder=stack, decoder=stack.replace(num_hidden_layers=3),
            eoi_token_index=500, image_token_index=501, boi_token_index=499,
        )  # fmt: skip
    raise ValueError(f"No tiny config for family {family!r}.")


def hf_config_dict(config) -> dict[str, Any]:
    """The transformers config (keyword arguments of its config class) for a gemmalens
    config: `gl.families.hf_config.to_hf` for the text families, with a tiny SigLIP tower
    for T5Gemma 2 (transformers cannot build one without it)."""
    if config.family != "t5gemma2":
        d = to_hf(config)
        d.pop("model_type")
        return d

    def stack(c):
        d = hf_config_dict(c)
        d.pop("use_bidirectional_attention")
        return d

    special = dict(
        boi_token_index=config.boi_token_index,
        eoi_token_index=config.eoi_token_index,
        image_token_index=config.image_token_index,
    )
    return dict(
        encoder=dict(
            text_config=stack(config.encoder),
            vision_config=TINY_SIGLIP,
            mm_tokens_per_image=1,
            **special,
        ),
        decoder=stack(config.decoder),
        image_token_index=config.image_token_index,
        eoi_token_index=config.eoi_token_index,
    )


def config_differences(ours, theirs, prefix: str = "") -> list[str]:
    """Fields where two gemmalens configs differ (nested dataclasses walked)."""
    out = []
    for field in dataclasses.fields(ours):
        a, b = getattr(ours, field.name), getattr(theirs, field.name)
        if dataclasses.is_dataclass(a) and type(a) is type(b):
            out += config_differences(a, b, f"{prefix}{field.name}.")
        elif a != b:
            out.append(f"{prefix}{field.name}: preset {a!r}, loaded {b!r}")
    return out


# ------------------------------------------------------------------------- transformers


def _set_eager(config) -> None:
    """Eager attention and experts on a transformers config and its sub-configs."""
    subs = [config]
    for key in ("encoder", "decoder", "text_config", "vision_config"):
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            subs.append(sub)
            subs += [getattr(sub, k) for k in ("text_config", "vision_config") if hasattr(sub, k)]
    for sub in subs:
        sub._attn_implementation = "eager"
        if hasattr(sub, "_experts_implementation"):
            sub._experts_implementation = "eager"


def build_hf(config, device: str, seed: int, perturb_all: float) -> torch.nn.Module:
    """transformers' model of ``config`` in bfloat16 on ``device``, random weights.

    ``perturb_all`` > 0 adds normal(0, perturb_all) to *every* parameter instead (as the
    tests' tiny references do), which at real widths gives a far more sensitive network."""
    config_class, model_class, _ = HF_CLASSES[config.family]
    hf_config = getattr(transformers, config_class)(**hf_config_dict(config))
    _set_eager(hf_config)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = getattr(transformers, model_class)(hf_config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed + 1)

    def noise(shape, std):
        return std * torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    with torch.no_grad():
        for _, param in model.named_parameters():
            if perturb_all:
                param.add_(noise(param.shape, perturb_all).to(param.dtype))
            elif param.ndim <= 1:
                param.add_(noise(param.shape, NORM_NOISE).to(param.dtype))
            elif not bool(param.any()):
                param.copy_(noise(param.shape, MATRIX_STD).to(param.dtype))
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.add_(noise(buffer.shape, NORM_NOISE).to(buffer.dtype))
    return model


def load_hf(directory: Path, family: str, dtype: str, device: str) -> torch.nn.Module:
    """The saved checkpoint read back by transformers in ``dtype`` (buffers such as the
    embedding scale are then made in that dtype, as in any ``from_pretrained``)."""
    _, model_class, _ = HF_CLASSES[family]
    placement = {} if device == "cpu" else {"device_map": device}  # (needs accelerate)
    model = getattr(transformers, model_class).from_pretrained(
        directory, dtype=TORCH_DTYPES[dtype], attn_implementation="eager", **placement
    )
    _set_eager(model.config)
    return model.eval()


def _layers(model) -> list[torch.nn.Module] | None:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else None


def hf_forward(model, family: str, tokens, decoder_tokens, capture: bool) -> dict[str, Any]:
    """Logits (float32 numpy) and, with ``capture``, every layer's output, the MoE expert
    choices and the Gemma 3n sparse-gate masks, by forward hooks."""
    out: dict[str, Any] = {"layers": {}, "experts": {}, "active": {}}
    handles = []
    layers = _layers(model) if family != "t5gemma2" else None
    for i, layer in enumerate(layers or []):
        if capture:

            def keep_layer(module, args, output, i=i):
                value = output[0] if isinstance(output, tuple) else output
                value = value.float()
                if family == "gemma3n":  # [stream, batch, seq, d] -> [batch, seq, stream, d]
                    value = value.permute(1, 2, 0, 3)
                out["layers"][i] = value.cpu().numpy()

            handles.append(layer.register_forward_hook(keep_layer))
        router = getattr(layer, "router", None)
        if router is not None:

            def keep_router(module, args, output, i=i):
                out["experts"][i] = output[2].cpu().numpy()

            handles.append(router.register_forward_hook(keep_router))
        mlp = getattr(layer, "mlp", None)
        if capture and family == "gemma3n" and getattr(mlp, "activation_sparsity", 0) > 0:

            def keep_active(module, args, output, i=i):
                out["active"][i] = (args[0] > 0).cpu().numpy()

            handles.append(mlp.act_fn.register_forward_hook(keep_active))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            kwargs = {"input_ids": torch.as_tensor(tokens, dtype=torch.long, device=device)}
            if decoder_tokens is not None:
                kwargs["decoder_input_ids"] = torch.as_tensor(
                    decoder_tokens, dtype=torch.long, device=device
                )
            result = model(**kwargs)
            out["logits"] = result.logits.float().cpu().numpy()
    finally:
        for handle in handles:
            handle.remove()
    batch, seq = tokens.shape
    out["experts"] = {i: v.reshape(batch, seq, -1) for i, v in out["experts"].items()}
    return out


# ---------------------------------------------------------------------------- gemmalens


def gl_forward(
    directory: Path, config, dtype: str, tokens, decoder_tokens, capture: bool
) -> dict[str, Any]:
    """gemmalens' logits (float32 numpy) and the same captures as `hf_forward`, by hooks."""
    model = gl.load(directory, dtype=dtype, show_progress=False)
    out: dict[str, Any] = {
        "layers": {},
        "experts": {},
        "active": {},
        "config_differences": config_differences(config, model.config),
    }
    if config.family == "t5gemma2":
        out["logits"] = np.asarray(model(tokens, decoder_tokens=decoder_tokens), np.float32)
        return out
    names = []
    if capture:
        stream = "hook_streams_post" if config.family == "gemma3n" else "hook_resid_post"
        names.append(f"blocks.*.{stream}")
        if config.family == "gemma3n" and any(config.activation_sparsity_pattern):
            names.append("blocks.*.mlp.hook_pre_sparse")
    if getattr(config, "enable_moe_block", False):
        names.append("blocks.*.moe.hook_expert_indices")
    if not names:
        out["logits"] = np.asarray(model(tokens), np.float32)
        return out
    logits, cache = model.run_with_cache(tokens, names=names)
    out["logits"] = np.asarray(logits, np.float32)
    for name in cache.keys():
        index = int(name.split(".")[1])
        value = np.asarray(cache[name])
        if name.endswith("moe.hook_expert_indices"):
            out["experts"][index] = value
        elif name.endswith("mlp.hook_pre_sparse"):
            out["active"][index] = value > 0
        else:
            out["layers"][index] = value.astype(np.float32)
    del model, cache
    return out


# ------------------------------------------------------------------------------ metrics


def compare_logits(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """max |dlogit|, that over the logit scale, mean |dlogit| and top-1 agreement.

    The logit scale is the standard deviation of ``ref`` over the vocabulary, averaged over
    positions. ``top1_tie_aware`` counts a position as agreeing when ``ours``' argmax is one
    of ``ref``'s maxima (bfloat16 logits tie often)."""
    ours, ref = ours.astype(np.float64), ref.astype(np.float64)
    diff = np.abs(ours - ref)
    scale = float(ref.std(axis=-1).mean())
    pick = ours.argmax(-1)
    at_pick = np.take_along_axis(ref, pick[..., None], -1)[..., 0]
    return dict(
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        logit_scale=scale,
        max_rel=float(diff.max() / scale),
        top1=float((pick == ref.argmax(-1)).mean()),
        top1_tie_aware=float((at_pick == ref.max(-1)).mean()),
    )


def compare_layers(ours: dict[int, np.ndarray], ref: dict[int, np.ndarray]) -> list[float]:
    """Per layer: max |difference| over the RMS of the reference."""
    rel = []
    for i in sorted(ref):
        if i not in ours:
            break
        a, b = ours[i].astype(np.float64), ref[i].astype(np.float64)
        rel.append(float(np.abs(a - b).max() / np.sqrt((b**2).mean())))
    return rel


def compare_experts(ours: dict[int, np.ndarray], ref: dict[int, np.ndarray]) -> dict[str, Any]:
    """Fraction of (layer, token) pairs with the same set of chosen experts."""
    per_layer = []
    for i in sorted(ref):
        same = (np.sort(ours[i], -1) == np.sort(ref[i], -1)).all(-1)
        per_layer.append(float(same.mean()))
    return dict(
        same_set=float(np.mean(per_layer)),
        worst_layer=float(min(per_layer)),
        first_layer_below_1=next((i for i, f in enumerate(per_layer) if f < 1), None),
        per_layer=per_layer,
    )


def compare_active(ours: dict[int, np.ndarray], ref: dict[int, np.ndarray]) -> list[int]:
    """Per sparse layer: neurons kept by one side and cut by the other."""
    return [int((ours[i] != ref[i]).sum()) for i in sorted(ref)]


# -------------------------------------------------------------------------------- a run


def parse_preset(spec: str, dtypes: list[str]) -> tuple[str, float, list[str]]:
    """``name[+perturb][@dtype/dtype]``: ``+perturb`` adds normal(0, 0.1) to every weight
    (as the tests' tiny references do); ``@float32`` runs only those dtypes for this preset."""
    spec, _, only = spec.partition("@")
    name, _, variant = spec.partition("+")
    if variant not in ("", "perturb"):
        raise ValueError(f"Unknown variant {variant!r} in {spec!r}; use NAME or NAME+perturb.")
    return name, 0.1 if variant else 0.0, only.split("/") if only else dtypes


def token_ids(config, batch: int, seq: int, seed: int):
    """Random ids avoiding pad/eos/bos and T5Gemma 2's image markers."""
    top = config.vocab_size
    if config.family == "gemma3n":
        top = min(top, config.vocab_size_per_layer_input)
    if config.family == "t5gemma2":
        top = min(top, config.boi_token_index)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, top, size=(batch, seq)).astype(np.int32)
    decoder = None
    if config.family == "t5gemma2":
        decoder = rng.integers(3, top, size=(batch, seq)).astype(np.int32)
        decoder[:, 0] = config.decoder_start_token_id
    return tokens, decoder


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_preset(spec: str, args, workdir: Path) -> dict[str, Any]:
    name, perturb_all, dtypes = parse_preset(spec, args.dtype)
    config = tiny_config(name) if args.tiny else gl.preset(name)
    full_depth = getattr(config, "num_hidden_layers", None)
    if name in args.layers:  # fewer layers, only where the full checkpoint cannot be written
        config = config.replace(num_hidden_layers=args.layers[name])
    with_f64 = "all" in args.f64 or spec.split("@")[0] in args.f64
    tokens, decoder = token_ids(config, args.batch, args.seq, args.seed)
    result: dict[str, Any] = {
        "preset": spec,
        "parameters": int(config.num_params()) if hasattr(config, "num_params") else None,
        "layers": getattr(config, "num_hidden_layers", None),
        "full_depth": full_depth,
        "perturbation": f"every weight + N(0, {perturb_all})"
        if perturb_all
        else f"norms, vectors and layer_scalar + N(0, {NORM_NOISE})",
        "timings_s": {},
    }
    times = result["timings_s"]
    directory = workdir / spec.replace("+", "_").replace("@", "_").replace("/", "_")
    started = time.perf_counter()

    def lap(key):
        nonlocal started
        now = time.perf_counter()
        times[key] = round(now - started, 2)
        started = now

    try:
        model = build_hf(config, args.device, args.seed, perturb_all)
        lap("build_hf")
        model.save_pretrained(directory, max_shard_size="5GB")
        result["checkpoint_gb"] = round(
            sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e9, 2
        )
        lap("save")
        refs = {}
        if "bfloat16" in dtypes:
            refs["bfloat16"] = hf_forward(model, config.family, tokens, decoder, capture=False)
            lap("hf_bfloat16")
        del model
        free_memory()
        f32_reference = args.hf_f32_reference == "all" or name in args.hf_f32_reference.split(",")
        need_f32 = "float32" in dtypes or ("bfloat16" in dtypes and f32_reference)
        for dtype in ["float32"] * need_f32 + ["float64"] * with_f64:
            model = load_hf(directory, config.family, dtype, args.device)
            refs[dtype] = hf_forward(model, config.family, tokens, decoder, capture=True)
            del model
            free_memory()
            lap(f"hf_{dtype}")
        for dtype in dtypes:
            ours = gl_forward(directory, config, dtype, tokens, decoder, dtype == "float32")
            lap(f"gemmalens_{dtype}")
            free_memory()
            entry = {"config_differences": ours["config_differences"]}
            entry["vs_transformers"] = compare_logits(ours["logits"], refs[dtype]["logits"])
            if refs[dtype]["experts"]:
                entry["experts_vs_transformers"] = compare_experts(
                    ours["experts"], refs[dtype]["experts"]
                )
            if dtype == "bfloat16" and "float32" in refs:
                entry["gemmalens_vs_transformers_f32"] = compare_logits(
                    ours["logits"], refs["float32"]["logits"]
                )
                entry["transformers_vs_transformers_f32"] = compare_logits(
                    refs["bfloat16"]["logits"], refs["float32"]["logits"]
                )
                if refs["float32"]["experts"]:
                    entry["experts_vs_transformers_f32"] = compare_experts(
                        ours["experts"], refs["float32"]["experts"]
                    )
                    entry["transformers_experts_vs_transformers_f32"] = compare_experts(
                        refs["bfloat16"]["experts"], refs["float32"]["experts"]
                    )
            if dtype == "float32" and ours["layers"]:
                entry["layers_vs_transformers"] = compare_layers(
                    ours["layers"], refs["float32"]["layers"]
                )
            if dtype == "float32" and "float64" in refs:
                f64 = refs["float64"]
                entry["gemmalens_vs_transformers_f64"] = compare_logits(
                    ours["logits"], f64["logits"]
                )
                entry["transformers_vs_transformers_f64"] = compare_logits(
                    refs["float32"]["logits"], f64["logits"]
                )
                if f64["layers"]:
                    entry["layers_gemmalens_vs_f64"] = compare_layers(ours["layers"], f64["layers"])
                    entry["layers_transformers_vs_f64"] = compare_layers(
                        refs["float32"]["layers"], f64["layers"]
                    )
                if f64["active"] and ours["active"]:
                    entry["sparse_flips_gemmalens_vs_f64"] = compare_active(
                        ours["active"], f64["active"]
                    )
                    entry["sparse_flips_transformers_vs_f64"] = compare_active(
                        refs["float32"]["active"], f64["active"]
                    )
                    entry["sparse_neurons_per_layer"] = int(next(iter(f64["active"].values())).size)
                if f64["experts"]:
                    entry["experts_vs_transformers_f64"] = compare_experts(
                        ours["experts"], f64["experts"]
                    )
            result[dtype] = entry
            del ours
    except Exception as error:  # keep going with the other presets
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()[-3000:]
        print(result["traceback"], file=sys.stderr)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        free_memory()
    return result


# ------------------------------------------------------------------------------ output


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| preset | dtype | max abs dlogit | max dlogit / logit std | top-1 agreement "
        "| same experts | vs transformers f32: gemmalens / transformers max abs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['preset']} | | error: {r['error'][:80]} | | | | |")
        for dtype in ("bfloat16", "float32"):
            e = r.get(dtype)
            if e is None:
                continue
            v = e["vs_transformers"]
            experts = e.get("experts_vs_transformers")
            same = f"{experts['same_set']:.2%}" if experts else ""
            ref = ""
            if "gemmalens_vs_transformers_f32" in e:
                ours = e["gemmalens_vs_transformers_f32"]["max_abs"]
                theirs = e["transformers_vs_transformers_f32"]["max_abs"]
                ref = f"{ours:.3g} / {theirs:.3g}"
            elif "gemmalens_vs_transformers_f64" in e:
                ours = e["gemmalens_vs_transformers_f64"]["max_abs"]
                theirs = e["transformers_vs_transformers_f64"]["max_abs"]
                ref = f"(vs f64) {ours:.3g} / {theirs:.3g}"
            rows.append(
                f"| {r['preset']} | {dtype} | {v['max_abs']:.3g} | {v['max_rel']:.3g} | "
                f"{v['top1']:.2%} | {same} | {ref} |"
            )
    return "\n".join(rows)


def environment() -> dict[str, Any]:
    return dict(
        date=datetime.date.today().isoformat(),
        python=platform.python_version(),
        jax=jax.__version__,
        jax_backend=jax.default_backend(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        gemmalens=gl.__version__,
        device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.machine(),
        jax_default_matmul_precision=os.environ.get("JAX_DEFAULT_MATMUL_PRECISION"),
        torch_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=None, help="comma-separated, or 'all'")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16, float32 or both (comma)")
    parser.add_argument("--f64", default="", help="presets with a float64 transformers reference")
    parser.add_argument(
        "--hf-f32-reference",
        default="all",
        help="presets whose bfloat16 runs also get transformers in float32: all, none or a list",
    )
    parser.add_argument(
        "--layers", default="", help="PRESET=N,...: build only N layers (when disk is short)"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (smoke run)")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints go")
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    args = parser.parse_args(argv)
    args.dtype = [d for d in args.dtype.split(",") if d]
    if bad := set(args.dtype) - {"bfloat16", "float32"}:
        parser.error(f"--dtype takes bfloat16 and/or float32, not {sorted(bad)}")
    args.f64 = [p for p in args.f64.split(",") if p]
    args.layers = {k: int(v) for k, v in (p.split("=") for p in args.layers.split(",") if p)}
    if args.presets in (None, "all"):
        args.presets = TINY_DEFAULT if args.tiny and args.presets is None else gl.presets()
    else:
        args.presets = [p for p in args.presets.split(",") if p]
    args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.tiny:
        args.batch, args.seq = min(args.batch, 2), min(args.seq, 12)
    workdir = Path(tempfile.mkdtemp(dir=args.workdir, prefix="real_size_"))
    results: dict[str, Any] = {
        "command": " ".join(["python benchmarks/real_size_agreement.py", *(argv or sys.argv[1:])]),
        "environment": environment(),
        "settings": dict(
            dtypes=args.dtype,
            batch=args.batch,
            seq=args.seq,
            seed=args.seed,
            tiny=args.tiny,
            f64=args.f64,
            attention="eager (transformers); gemmalens default",
        ),
        "presets": [],
    }
    try:
        for spec in args.presets:
            print(f"--- {spec}", flush=True)
            results["presets"].append(run_preset(spec, args, workdir))
            print(json.dumps(results["presets"][-1], default=str)[:1500], flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(results["presets"]))
    return results


if __name__ == "__main__":
    main()
