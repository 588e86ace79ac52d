"""Trains the teaching dictionaries: sparse autoencoders and transcoders on a teaching model.

    python -m gemmalens.teaching.saes                 # the shipped setting (a GPU: ~1 min)
    python -m gemmalens.teaching.saes --steps 200     # a quick run on a CPU

Two dictionaries are trained on the Gemma 3 teaching model, both JumpReLU as in Gemma
Scope 2, and written in Gemma Scope 2's layout (``params.safetensors`` + ``config.json``)
so that `gemmalens.sae.load` reads them as it reads the published files:

* a residual-stream SAE at ``blocks.{layer}.hook_resid_post``;
* an affine-skip transcoder from the MLP input (``blocks.{layer}.mlp.hook_in``, after the
  pre-feedforward norm) to the MLP output (``blocks.{layer}.hook_mlp_out``).

Training follows the JumpReLU recipe (Rajamanoharan et al. 2024, as used for Gemma Scope):
loss = squared reconstruction error + lambda * L0, the L0 and the thresholds trained
through a straight-through estimator with a rectangle kernel of width ``bandwidth``;
inputs scaled so that their mean squared norm is ``d_in`` while training, the scale folded
into the saved weights; decoder rows kept at unit norm; Adam with beta1 = 0. lambda is
steered towards ``target_l0`` during training (a multiplicative controller) rather than
hand-tuned, and the final lambda is recorded. <bos> tokens are left out: their residual
norm is many times every other token's (the attention sink), as Gemma Scope leaves them out.

Each folder also holds ``evaluation_tokens.npy`` (held-out rows of the training mixture)
and ``evidence.json``: variance explained, L0, dead fraction, the change in next-token loss
when the dictionary replaces the model's value (no error term), and the features that best
pick out a few token categories. `measure` recomputes it all from the shipped files, and
the test suite does so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import keyword
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

import gemmalens as gl
from gemmalens.sae import SAE
from gemmalens.teaching import ASSETS, corpus

MODEL = "gemma3"
KINDS = ("resid_post", "transcoder")
# Per-kind changes to `SAESettings`. The transcoder's affine skip carries the linear part
# of the MLP, and with the SAE's fast thresholds a third of its features died (33 % dead
# at 20x, 11 % at 5x, measured on the held-out rows of the first Gemma 3 teaching model;
# 20 % at 5x on the retrained one); its L0 then settles below target.
OVERRIDES = {"transcoder": {"threshold_learning_rate_multiple": 5.0}}


@dataclasses.dataclass(frozen=True)
class SAESettings:
    """One dictionary-training run. The defaults made the shipped dictionaries."""

    layer: int = 3
    width: int = 1024
    steps: int = 4000
    batch_size: int = 4096
    learning_rate: float = 1e-3
    target_l0: float = 24.0
    bandwidth: float = 0.01
    # The log-thresholds learn this many times faster than the weights: with one rate
    # the encoder outgrows them and L0 never comes down in a short run.
    threshold_learning_rate_multiple: float = 20.0
    # Thresholds start where each feature fires on this many times the target rate.
    initial_firing_multiple: float = 4.0
    initial_l0_coefficient: float = 1.0
    training_tokens: int = 500_000
    evaluation_rows: int = 48
    seed: int = 0


def dictionary_path(kind: str, model: str = MODEL) -> pathlib.Path:
    """The folder of a shipped teaching dictionary (``kind``: ``"resid_post"`` or
    ``"transcoder"``)."""
    if kind not in KINDS:
        raise KeyError(f"No teaching dictionary of kind {kind!r}; there are {list(KINDS)}.")
    folders = sorted((ASSETS / model / "saes" / kind).glob("layer_*"))
    if not folders:
        raise FileNotFoundError(
            f"The teaching {kind} dictionary of {model!r} is missing from "
            f"{ASSETS / model / 'saes'}. It ships inside the package; reinstall gemmalens, "
            "or rebuild it with `python -m gemmalens.teaching.saes`."
        )
    return folders[0]


def teaching_saes(model: Any = None) -> dict[str, SAE]:
    """The shipped teaching dictionaries of the Gemma 3 teaching model, by kind
    (``"resid_post"``, ``"transcoder"``), checked against ``model`` when given."""
    return {kind: gl.sae.load(dictionary_path(kind), model) for kind in KINDS}


# ------------------------------------------------------------------------------ activations


def _sites(kind: str, layer: int) -> tuple[str, str]:
    if kind == "resid_post":
        return f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_resid_post"
    return f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out"


def _with_mlp_input_hook(m: gl.Model, layer: int) -> gl.Model:
    """``m`` with a zero transcoder spliced at ``layer`` (error term on, so the outputs are
    unchanged): splicing is what creates the ``blocks.{layer}.mlp.hook_in`` hook point."""
    d = m.config.hidden_size
    placeholder = SAE(
        w_enc=np.zeros((d, 1), np.float32),
        w_dec=np.zeros((1, d), np.float32),
        b_enc=np.zeros(1, np.float32),
        b_dec=np.zeros(d, np.float32),
        threshold=np.ones(1, np.float32),
        hook_in=f"blocks.{layer}.mlp.hook_in",
        hook_out=f"blocks.{layer}.hook_mlp_out",
    )
    return gl.sae.splice(m, placeholder)


def activations(
    m: gl.Model, kind: str, layer: int, rows: np.ndarray, batch: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """The dictionary's input and target at every non-<bos> token of ``rows``:
    two ``[tokens, d_model]`` float32 arrays."""
    hook_in, hook_out = _sites(kind, layer)
    runner = _with_mlp_input_hook(m, layer) if kind == "transcoder" else m
    keep = rows != m.config.bos_token_id
    inputs, targets = [], []
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        _, cache = runner.run_with_cache(part, names=sorted({hook_in, hook_out}))
        kept = keep[start : start + batch]
        inputs.append(np.asarray(cache[hook_in])[kept])
        targets.append(np.asarray(cache[hook_out])[kept])
    return np.concatenate(inputs), np.concatenate(targets)


# -------------------------------------------------------------------------------- training


def _straight_through(bandwidth: float):
    """`_fires` whose threshold gradient is the rectangle-kernel estimate of the step's
    derivative, -K((pre - threshold) / bandwidth) / bandwidth (no gradient to ``pre``)."""

    @jax.custom_vjp
    def fires(pre, threshold):
        return (pre > threshold).astype(pre.dtype)

    def forward(pre, threshold):
        return fires(pre, threshold), (pre, threshold)

    def backward(residuals, g):
        pre, threshold = residuals
        near = jnp.abs((pre - threshold) / bandwidth) < 0.5
        d_threshold = -(g * near).reshape(-1, pre.shape[-1]).sum(0) / bandwidth
        return jnp.zeros_like(pre), d_threshold.astype(threshold.dtype)

    fires.defvjp(forward, backward)
    return fires


def _init(key: jax.Array, sample: jax.Array, d_out: int, s: SAESettings, skip: bool, b_dec):
    d_in = sample.shape[1]
    w_dec = jax.random.normal(key, (s.width, d_out), jnp.float32)
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=1, keepdims=True)
    w_enc = w_dec.T if d_in == d_out else jax.random.normal(key, (d_in, s.width)) / d_in**0.5
    params = {
        "w_enc": w_enc * 0.1,
        "b_enc": jnp.zeros(s.width),
        "w_dec": w_dec,
        "b_dec": jnp.asarray(b_dec, jnp.float32),
    }
    # Thresholds from the data: at initialisation each feature fires on about
    # ``initial_firing_multiple * target_l0 / width`` of the tokens. (From a fixed small
    # value, the log-threshold would need thousands of steps to reach the scale of the
    # pre-activations.)
    pre = sample @ params["w_enc"] + params["b_enc"]
    rate = min(0.5, s.initial_firing_multiple * s.target_l0 / s.width)
    start = jnp.maximum(jnp.quantile(pre, 1 - rate, axis=0), 1e-3)
    params["log_threshold"] = jnp.log(start).astype(jnp.float32)
    if skip:
        params["w_skip"] = jnp.zeros((d_in, d_out))
    return params


def _make_step(s: SAESettings, optimizer: Any):
    fires = _straight_through(s.bandwidth)

    def loss(params, x, y, l0_coefficient):
        pre = x @ params["w_enc"] + params["b_enc"]
        gate = fires(pre, jnp.exp(params["log_threshold"]))
        f = jax.nn.relu(pre) * gate
        y_hat = f @ params["w_dec"] + params["b_dec"]
        if "w_skip" in params:
            y_hat = y_hat + x @ params["w_skip"]
        reconstruction = jnp.mean(jnp.sum((y - y_hat) ** 2, -1))
        l0 = jnp.mean(jnp.sum(gate, -1))
        return reconstruction + l0_coefficient * l0, (reconstruction, l0)

    @jax.jit
    def step(params, opt_state, x, y, l0_coefficient):
        (_, (reconstruction, l0)), grads = jax.value_and_grad(loss, has_aux=True)(
            params, x, y, l0_coefficient
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree.map(jnp.add, params, updates)
        # Unit-norm decoder rows: the L0 penalty is blind to scale, so fix it.
        w_dec = params["w_dec"]
        params = {**params, "w_dec": w_dec / jnp.linalg.norm(w_dec, axis=1, keepdims=True)}
        return params, opt_state, reconstruction, l0

    return step


def train_dictionary(
    x: np.ndarray, y: np.ndarray, s: SAESettings, skip: bool, progress: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Trains one JumpReLU dictionary from ``x`` to ``y`` (``[tokens, d]`` each); returns its
    weights in Gemma Scope's names (the input and output scales folded in) and a history."""
    import optax  # training only: loading the shipped dictionaries does not need it
    from tqdm.auto import tqdm

    scale_in = float(np.sqrt(x.shape[1] / np.mean(np.sum(x.astype(np.float64) ** 2, -1))))
    scale_out = float(np.sqrt(y.shape[1] / np.mean(np.sum(y.astype(np.float64) ** 2, -1))))
    xs, ys = jnp.asarray(x * scale_in), jnp.asarray(y * scale_out)
    key = jax.random.key(s.seed)
    params = _init(key, xs[:8192], y.shape[1], s, skip, np.mean(y * scale_out, 0))
    adam = lambda rate: optax.adam(rate, b1=0.0, b2=0.999)  # noqa: E731
    optimizer = optax.multi_transform(
        {
            "weights": adam(s.learning_rate),
            "threshold": adam(s.learning_rate * s.threshold_learning_rate_multiple),
        },
        {name: "threshold" if name == "log_threshold" else "weights" for name in params},
    )
    opt_state = optimizer.init(params)
    step = _make_step(s, optimizer)
    rng = np.random.default_rng(s.seed)
    coefficient = s.initial_l0_coefficient
    history: dict[str, list[float]] = {"reconstruction": [], "l0": [], "l0_coefficient": []}
    recent: list[float] = []
    bar = tqdm(range(s.steps), desc="training dictionary", disable=not progress)
    for i in bar:
        index = rng.integers(0, len(xs), s.batch_size)
        params, opt_state, reconstruction, l0 = step(
            params, opt_state, xs[index], ys[index], coefficient
        )
        recent.append(float(l0))
        history["reconstruction"].append(float(reconstruction))
        history["l0"].append(float(l0))
        history["l0_coefficient"].append(coefficient)
        # Steer lambda towards the target L0 over the first 90 % of the steps, then hold it.
        if (i + 1) % 25 == 0 and i < 0.9 * s.steps:
            coefficient *= float(np.clip((np.mean(recent) / s.target_l0) ** 0.25, 0.8, 1.25))
            recent = []
            bar.set_postfix(l0=f"{history['l0'][-1]:.1f}", mse=f"{float(reconstruction):.2f}")
    p = jax.device_get(params)
    weights = {
        "w_enc": np.asarray(p["w_enc"] * scale_in, np.float32),
        "b_enc": np.asarray(p["b_enc"], np.float32),
        "threshold": np.asarray(np.exp(p["log_threshold"]), np.float32),
        "w_dec": np.asarray(p["w_dec"] / scale_out, np.float32),
        "b_dec": np.asarray(p["b_dec"] / scale_out, np.float32),
    }
    if skip:
        weights["affine_skip_connection"] = np.asarray(
            p["w_skip"] * scale_in / scale_out, np.float32
        )
    history["scale_in"], history["scale_out"] = scale_in, scale_out
    return weights, history


# -------------------------------------------------------------------------------- evidence

# Python keywords that are not also common English words ("and", "if", "for", "in", ...):
# those would make the category mostly prose.
PYTHON_ONLY_KEYWORDS = frozenset(keyword.kwlist) - {
    "and",
    "as",
    "break",
    "continue",
    "else",
    "for",
    "from",
    "if",
    "in",
    "is",
    "not",
    "or",
    "pass",
    "try",
    "while",
    "with",
}
# Token categories the evidence looks for a feature of, as predicates on a piece's text.
CATEGORIES = {
    "digit": lambda text: text.isdigit(),
    "capital city": lambda text: text in {c for _, c in corpus.COUNTRIES_AND_CAPITALS},
    "person's name": lambda text: text in set(corpus.NAMES),
    "Python keyword": lambda text: text in PYTHON_ONLY_KEYWORDS,
}


def _categories(m: gl.Model, tokens: np.ndarray) -> dict[str, np.ndarray]:
    pieces = [
        m.tokenizer.id_to_piece(int(t)).replace("\u2581", "") for t in range(m.tokenizer.vocab_size)
    ]
    return {
        name: np.array([test(piece) for piece in pieces])[tokens]
        for name, test in CATEGORIES.items()
    }


def measure(m: gl.Model, sae: SAE, tokens: np.ndarray, batch: int = 16) -> dict[str, Any]:
    """Evidence for one dictionary on ``tokens`` (``[rows, seq]`` ids):

    * ``variance_explained``: ``1 - sum |y - y_hat|^2 / sum |y - mean(y)|^2`` over non-<bos>
      tokens; ``l0``: mean number of active features per token; ``dead_fraction``: the share
      of features active on none of them;
    * ``loss``: next-token loss of the model, of the model with the dictionary spliced in
      without its error term, and the difference (``delta``);
    * ``features``: for each token category, the feature whose firing best picks out the
      category's tokens (F1 of "fires" against "is in the category", at least 10 tokens of
      the category), with its precision, recall and the tokens it fires on most.
    """
    from gemmalens.teaching.train import next_token_loss

    kind = "transcoder" if sae.is_transcoder else "resid_post"
    x, y = activations(m, kind, sae.layer, tokens, batch)
    f = np.asarray(sae.encode(x))
    y_hat = np.asarray(sae.decode(f, x))
    residual = np.sum((y - y_hat).astype(np.float64) ** 2)
    spread = np.sum((y - y.mean(0)).astype(np.float64) ** 2)
    active = f > 0
    spliced = gl.sae.splice(m, sae, include_error=False)
    mask = (tokens != m.config.pad_token_id).astype(np.int32)

    def loss(model: gl.Model) -> float:
        values = [
            float(
                next_token_loss(
                    model(tokens[i : i + batch]), tokens[i : i + batch], mask[i : i + batch]
                )
            )
            for i in range(0, len(tokens), batch)
        ]
        return float(np.mean(values))

    base, replaced = loss(m), loss(spliced)
    keep = tokens != m.config.bos_token_id
    kept_tokens = tokens[keep]
    features = {}
    for name, member in _categories(m, kept_tokens).items():
        if member.sum() < 10:
            continue
        true_pos = (active & member[:, None]).sum(0)
        precision = true_pos / np.maximum(active.sum(0), 1)
        recall = true_pos / member.sum()
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        best = int(np.argmax(f1))
        strongest = np.argsort(-f[:, best])[:8]
        features[name] = {
            "feature": best,
            "f1": float(f1[best]),
            "precision": float(precision[best]),
            "recall": float(recall[best]),
            "category_tokens": int(member.sum()),
            "top_tokens": [m.tokenizer.id_to_piece(int(kept_tokens[i])) for i in strongest],
        }
    return {
        "site": sae.site,
        "width": sae.d_sae,
        "tokens": int(len(x)),
        "variance_explained": float(1 - residual / spread),
        "l0": float(active.sum(1).mean()),
        "dead_fraction": float((~active.any(0)).mean()),
        "loss": {"model": base, "spliced_without_error": replaced, "delta": replaced - base},
        "features": features,
    }


def evidence_table(out: pathlib.Path | None = None) -> str:
    """The shipped dictionaries' evidence as the Markdown table the docs show (a test keeps
    docs/teaching-models.md equal to it)."""
    out = out or ASSETS / MODEL / "saes"
    rows = [
        "| dictionary | site | width | L0 | variance explained | dead | next-token loss "
        "(model -> without error term) |",
        "|---|---|---|---|---|---|---|",
    ]
    categories = []
    for kind in KINDS:
        (folder,) = sorted((out / kind).glob("layer_*"))
        e = json.loads((folder / "evidence.json").read_text())
        loss = e["loss"]
        rows.append(
            f"| {kind} | `{e['site']}` | {e['width']} | {e['l0']:.1f} | "
            f"{e['variance_explained']:.3f} | {e['dead_fraction']:.1%} | "
            f"{loss['model']:.3f} -> {loss['spliced_without_error']:.3f} "
            f"(+{loss['delta']:.3f}) |"
        )
        for name, found in e["features"].items():
            tops = ", ".join(f"`{t}`" for t in dict.fromkeys(found["top_tokens"]))
            categories.append(
                f"| {kind} | {name} | #{found['feature']} | {found['f1']:.2f} | "
                f"{found['precision']:.2f} | {found['recall']:.2f} | {tops} |"
            )
    features = [
        "| dictionary | category | feature | F1 | precision | recall | fires most on |",
        "|---|---|---|---|---|---|---|",
        *categories,
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(features) + "\n"


# ----------------------------------------------------------------------------------- files


def _config(kind: str, layer: int, width: int, l0: float, history: dict) -> dict[str, Any]:
    config = {
        "architecture": "jump_relu",
        "width": width,
        "l0": round(l0, 2),
        "model_name": f"gemmalens teaching model {MODEL}",
        "trained_by": "python -m gemmalens.teaching.saes",
        "input_scale": history["scale_in"],
        "output_scale": history["scale_out"],
        "final_l0_coefficient": history["l0_coefficient"][-1],
    }
    if kind == "resid_post":
        return {**config, "hf_hook_point_in": f"model.layers.{layer}.output"}
    return {
        **config,
        "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
        "affine_connection": True,
    }


def write(
    folder: pathlib.Path,
    weights: dict[str, np.ndarray],
    config: dict[str, Any],
    evaluation_tokens: np.ndarray,
) -> None:
    """Writes one teaching SAE: ``params.safetensors``, ``config.json`` and its evaluation
    tokens, in the folder layout `gemmalens.sae.load` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    np.save(folder / "evaluation_tokens.npy", evaluation_tokens.astype(np.int32))


def run(
    s: SAESettings,
    out: pathlib.Path | None = None,
    progress: bool = True,
    kinds: Sequence[str] = KINDS,
) -> dict[str, Any]:
    """Trains and writes the dictionaries (``kinds``) with their evidence; returns the
    evidence. `OVERRIDES` adjusts ``s`` per kind."""
    out = out or ASSETS / MODEL / "saes"
    from gemmalens.teaching.train import Settings, TrainingData, _documentation

    m = gl.teaching_model(MODEL)
    teaching = Settings(seq_len=256, batch_size=32, seed=s.seed + 7)
    data = TrainingData(m.tokenizer, _documentation(teaching), teaching)
    rng = np.random.default_rng(s.seed + 11)
    rows_needed = int(np.ceil(s.training_tokens / (teaching.seq_len - 1)))
    train_rows = np.concatenate([data.batch(rng) for _ in range(-(-rows_needed // 32))])
    evaluation = np.concatenate(
        [
            data.batch(np.random.default_rng(s.seed + 99 + i))
            for i in range(-(-s.evaluation_rows // 32))
        ]
    )[: s.evaluation_rows]
    results = {}
    for kind in kinds:
        started = time.perf_counter()
        x, y = activations(m, kind, s.layer, train_rows)
        settings = dataclasses.replace(s, **OVERRIDES.get(kind, {}))
        weights, history = train_dictionary(
            x, y, settings, skip=kind == "transcoder", progress=progress
        )
        l0 = float(np.mean(history["l0"][-100:]))
        folder = out / kind / f"layer_{s.layer}_width_{s.width // 1024}k_l0_{round(l0)}"
        for old in (out / kind).glob("layer_*"):
            for file in old.iterdir():
                file.unlink()
            old.rmdir()
        write(folder, weights, _config(kind, s.layer, s.width, l0, history), evaluation)
        evidence = measure(m, gl.sae.load(folder, m), evaluation)
        evidence["training"] = {
            "settings": dataclasses.asdict(settings),
            "activation_tokens": int(len(x)),
            "seconds": time.perf_counter() - started,
            "device": str(jax.devices()[0].device_kind),
            "final_reconstruction": float(np.mean(history["reconstruction"][-100:])),
        }
        (folder / "evidence.json").write_text(json.dumps(evidence, indent=2) + "\n")
        results[kind] = evidence
    return results


def remeasure(out: pathlib.Path | None = None) -> dict[str, Any]:
    """Recomputes ``evidence.json`` of the dictionaries in ``out`` (default: the shipped
    ones) from their files and evaluation tokens, keeping the training record."""
    out = out or ASSETS / MODEL / "saes"
    m = gl.teaching_model(MODEL)
    results = {}
    for kind in KINDS:
        (folder,) = sorted((out / kind).glob("layer_*"))
        path = folder / "evidence.json"
        training = json.loads(path.read_text()).get("training") if path.exists() else None
        evidence = measure(m, gl.sae.load(folder, m), np.load(folder / "evaluation_tokens.npy"))
        if training is not None:
            evidence["training"] = training
        path.write_text(json.dumps(evidence, indent=2) + "\n")
        results[kind] = evidence
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """The command line that trains the teaching SAEs (``python -m gemmalens.teaching.saes``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = SAESettings()
    for field in dataclasses.fields(SAESettings):
        parser.add_argument(
            "--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name))
        )
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument(
        "--evidence-only", action="store_true", help="re-measure the dictionaries in --out"
    )
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = parser.parse_args(argv)
    if args.evidence_only:
        print(json.dumps(remeasure(args.out), indent=2))
        return 0
    changes = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SAESettings)
        if getattr(args, f.name) is not None
    }
    results = run(dataclasses.replace(defaults, **changes), args.out, kinds=args.kinds)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
