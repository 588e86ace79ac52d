"""Measurements that show what each teaching model learned, with the figures for the docs.

* every model: next-token predictions for a few prompts, and loss on the first and the
  second copy of repeated random tokens (in-context learning);
* Gemma 3 style: the induction score of every head (attention from a token in the second
  copy to the token after its first occurrence), against the score of uniform attention;
* Gemma 4 MoE: which experts each kind of token goes to, per layer, and each expert's load;
* Gemma 3n: how much closer AltUp's prediction lands to what the layer computes than the
  unchanged input does, and the loss when the predictions are switched off;
* every decoder: the indirect-object task with the recipient named first and named second
  (a model that learned "answer the first name" fails the second kind).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import gemmalens as gl
from gemmalens.circuits import induction_scores, repeated_random_tokens
from gemmalens.teaching import corpus

PROMPTS = (
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "12 + 7 =",
    "Return the number of",
)
TOKEN_KINDS = ("special", "digit", "Capitalised word", "lowercase word", "punctuation / space")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def top_predictions(m: gl.Model, prompts=PROMPTS, k: int = 5) -> dict[str, list]:
    """The ``k`` most likely next tokens after each prompt, with their probabilities."""
    out = {}
    for prompt in prompts:
        probs = jax.nn.softmax(m(prompt)[0, -1].astype(jnp.float32))
        top = np.argsort(-np.asarray(probs))[:k]
        out[prompt] = [(m.tokenizer.id_to_piece(int(t)), round(float(probs[t]), 4)) for t in top]
    return out


def _loss_per_position(logits: jax.Array, tokens: np.ndarray) -> np.ndarray:
    log_probs = jax.nn.log_softmax(jnp.asarray(logits[:, :-1], jnp.float32))
    picked = jnp.take_along_axis(log_probs, jnp.asarray(tokens[:, 1:, None]), axis=-1)[..., 0]
    return -np.asarray(picked)


def in_context_loss(m: gl.Model, tokens: np.ndarray) -> dict[str, float]:
    """Mean loss on the first copy of the span and on the second copy."""
    span = (tokens.shape[1] - 1) // 2
    loss = _loss_per_position(m(tokens), tokens)  # predicts tokens[:, 1:]
    return {
        "first_copy": float(loss[:, : span - 1].mean()),
        "second_copy": float(loss[:, span:].mean()),
        "chance": float(np.log(min(m.config.vocab_size, 32_000) - 107 - 256)),
    }


def _plot_induction(scores: np.ndarray, chance: np.ndarray, layer_types, path: pathlib.Path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 4.0), dpi=120)
    image = ax.imshow(scores, cmap="magma", vmin=0, vmax=1)
    for (layer, head), value in np.ndenumerate(scores):
        colour = "black" if value > 0.5 else "white"
        ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=9, color=colour)
    ax.set_yticks(
        range(len(scores)),
        [
            f"{i} {'global' if t == 'full_attention' else 'local'} (chance {c:.3f})"
            for i, (t, c) in enumerate(zip(layer_types, chance))
        ],
    )
    ax.set_xticks(range(scores.shape[1]), [str(h) for h in range(scores.shape[1])])
    ax.set(
        title="Induction score per head on repeated random tokens", xlabel="head", ylabel="layer"
    )
    fig.colorbar(image, ax=ax, label="attention to the token\nafter the earlier copy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def token_kind(piece: str, token_id: int) -> str:
    """One of `TOKEN_KINDS` for a SentencePiece piece."""
    if token_id < 107:
        return "special"
    text = piece.replace("\u2581", " ").strip()
    if text.isdigit():
        return "digit"
    if any(c.isalpha() for c in text):
        first = next(c for c in text if c.isalpha())
        return "Capitalised word" if first.isupper() else "lowercase word"
    return "punctuation / space"


def routing_by_token_kind(m: gl.Model, tokens: np.ndarray) -> dict[str, Any]:
    """Per layer: the share of each kind's top-k picks that go to each expert, each
    expert's share of all picks (its load), and the mutual information between the kind
    of a token and the expert it picks (0 bits if routing ignored the kind)."""
    _, cache = m.run_with_cache(tokens, names="blocks.*.moe.hook_expert_indices")
    kinds = np.array(
        [
            [TOKEN_KINDS.index(token_kind(m.tokenizer.id_to_piece(int(t)), int(t))) for t in row]
            for row in tokens
        ]
    )
    experts = m.config.num_experts
    layers = {}
    for layer in range(m.config.num_hidden_layers):
        chosen = np.asarray(cache[f"blocks.{layer}.moe.hook_expert_indices"])  # [b, s, k]
        counts = np.zeros((len(TOKEN_KINDS), experts))
        np.add.at(counts, (np.repeat(kinds[..., None], chosen.shape[-1], -1), chosen), 1)
        joint = counts / counts.sum()
        p_kind, p_expert = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nonzero = joint > 0
        mutual_information = float(
            np.sum(joint[nonzero] * np.log2(joint[nonzero] / (p_kind @ p_expert)[nonzero]))
        )
        present = counts.sum(1) > 0
        layers[layer] = {
            "load": (counts.sum(0) / counts.sum()).round(4).tolist(),
            "share_by_kind": {
                TOKEN_KINDS[k]: (counts[k] / counts[k].sum()).round(4).tolist()
                for k in np.flatnonzero(present)
            },
            "tokens_by_kind": {
                TOKEN_KINDS[k]: int(counts[k].sum() / chosen.shape[-1])
                for k in np.flatnonzero(present)
            },
            "mutual_information_bits": round(mutual_information, 4),
        }
    return layers


def _plot_routing(routing: dict[int, dict], path: pathlib.Path) -> None:
    plt = _plt()
    layers = sorted(routing)
    fig, axes = plt.subplots(
        2,
        len(layers),
        figsize=(3.2 * len(layers), 5.6),
        dpi=120,
        gridspec_kw={"height_ratios": [3, 1.3]},
    )
    for column, layer in enumerate(layers):
        entry = routing[layer]
        kinds = list(entry["share_by_kind"])
        shares = np.array([entry["share_by_kind"][k] for k in kinds])
        ax = axes[0, column]
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=max(0.5, shares.max()), aspect="auto")
        ax.set_xticks(range(shares.shape[1]))
        ax.set_yticks(range(len(kinds)), kinds if column == 0 else [""] * len(kinds))
        ax.set_title(f"layer {layer}: MI {entry['mutual_information_bits']:.2f} bits", fontsize=10)
        ax.set_xlabel("expert")
        load = np.asarray(entry["load"])
        bar = axes[1, column]
        bar.bar(range(len(load)), load, color="#3182bd")
        bar.axhline(1 / len(load), color="grey", ls="--", lw=1)
        bar.set(xlabel="expert", ylim=(0, max(0.3, load.max() * 1.15)))
        bar.set_ylabel("load" if column == 0 else "")
    fig.suptitle(
        "Share of each token kind's picks per expert (top); expert load, uniform dashed (bottom)"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _rms(x: np.ndarray, axis=-1) -> np.ndarray:
    return np.sqrt(np.mean(np.square(x), axis=axis))


def altup_prediction_quality(m: gl.Model, tokens: np.ndarray) -> dict[str, Any]:
    """Per layer, for the active stream: RMS distance from what the layer computed
    (``hook_resid_post``) to AltUp's prediction (``altup.hook_predictions``) and to the
    unchanged input stream (the no-prediction baseline); and the same for every stream
    against the corrected output. Plus the loss with every prediction switched off (zero
    prediction coefficients: predictions = inputs)."""
    active = m.config.altup_active_idx
    layers = m.config.num_hidden_layers
    names = ["hook_altup_expanded"] + [
        f"blocks.{i}.{n}"
        for i in range(layers)
        for n in (
            "altup.hook_predictions",
            "hook_resid_post",
            "altup.hook_corrected",
            "hook_streams_post",
        )
    ]
    logits, cache = m.run_with_cache(tokens, names=names)
    result = {"layers": {}}
    for i in range(layers):
        inputs = np.asarray(
            cache["hook_altup_expanded" if i == 0 else f"blocks.{i - 1}.hook_streams_post"],
            np.float32,
        )
        predictions = np.asarray(cache[f"blocks.{i}.altup.hook_predictions"], np.float32)
        computed = np.asarray(cache[f"blocks.{i}.hook_resid_post"], np.float32)
        corrected = np.asarray(cache[f"blocks.{i}.altup.hook_corrected"], np.float32)
        result["layers"][i] = {
            "active_prediction_error": float(_rms(computed - predictions[:, :, active]).mean()),
            "active_no_prediction_error": float(_rms(computed - inputs[:, :, active]).mean()),
            "stream_prediction_error": _rms(corrected - predictions)
            .mean(axis=(0, 1))
            .round(4)
            .tolist(),
            "stream_no_prediction_error": _rms(corrected - inputs)
            .mean(axis=(0, 1))
            .round(4)
            .tolist(),
        }
    off = {
        f"blocks.{i}.altup.hook_prediction_coefs": lambda v, name: jnp.zeros_like(v)
        for i in range(layers)
    }
    ablated = m.run_with_hooks(tokens, hooks=off)
    result["loss"] = float(_loss_per_position(logits, tokens).mean())
    result["loss_without_predictions"] = float(_loss_per_position(ablated, tokens).mean())
    return result


def _plot_altup(quality: dict[str, Any], path: pathlib.Path) -> None:
    plt = _plt()
    layers = sorted(quality["layers"])
    predicted = [quality["layers"][i]["active_prediction_error"] for i in layers]
    baseline = [quality["layers"][i]["active_no_prediction_error"] for i in layers]
    fig, ax = plt.subplots(figsize=(5.6, 3.2), dpi=120)
    width = 0.38
    ax.bar(
        np.arange(len(layers)) - width / 2,
        baseline,
        width,
        color="#bdbdbd",
        label="input unchanged (no prediction)",
    )
    ax.bar(
        np.arange(len(layers)) + width / 2,
        predicted,
        width,
        color="#31a354",
        label="AltUp prediction",
    )
    ax.set_xticks(range(len(layers)), [str(i) for i in layers])
    ax.set(
        title="Distance to the layer's output, active stream", xlabel="layer", ylabel="RMS distance"
    )
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def indirect_object_prompts(
    rng: np.random.Generator, count: int, recipient_first: bool
) -> list[tuple[str, str, str]]:
    """``(prompt, recipient, giver)`` triples: a corpus sentence cut before the recipient
    (``"When Mary and John went to the store, John gave a drink to"``, `` Mary``,
    `` John``), with the recipient named first or second in the opening clause."""
    out = []
    for _ in range(count):
        a, b = (corpus.NAMES[i] for i in rng.choice(len(corpus.NAMES), size=2, replace=False))
        template = corpus.IOI_TEMPLATES[rng.integers(len(corpus.IOI_TEMPLATES))]
        first, second = (a, b) if recipient_first else (b, a)
        sentence = template.format(
            a=a,
            b=b,
            first=first,
            second=second,
            place=corpus.PLACES[rng.integers(len(corpus.PLACES))],
            obj=corpus.OBJECTS[rng.integers(len(corpus.OBJECTS))],
        )
        prompt = sentence[: sentence.rindex(f" {a}.")]
        out.append((prompt, f" {a}", f" {b}"))
    return out


def indirect_object(m: gl.Model, count: int = 64, seed: int = 11) -> dict[str, dict[str, float]]:
    """How often the recipient beats the giver at the end of an indirect-object sentence,
    and the mean logit difference (recipient minus giver), for sentences that name the
    recipient first and for sentences that name it second."""
    found = {}
    for key, recipient_first in (("recipient_first", True), ("recipient_second", False)):
        rng = np.random.default_rng(seed)
        prompts, recipients, givers = zip(*indirect_object_prompts(rng, count, recipient_first))
        # One right-padded batch: each row's last real position predicts the name.
        tokens, mask = m.to_tokens(list(prompts))
        logits = np.asarray(m(tokens, attention_mask=mask), np.float32)
        last = logits[np.arange(len(prompts)), np.asarray(mask).sum(axis=1) - 1]
        right = np.array([m.tokenizer.encode(name, add_bos=False)[-1] for name in recipients])
        wrong = np.array([m.tokenizer.encode(name, add_bos=False)[-1] for name in givers])
        rows = np.arange(len(prompts))
        found[key] = {
            "top1_accuracy": round(float(np.mean(last.argmax(axis=1) == right)), 4),
            "mean_logit_difference": round(
                float(np.mean(last[rows, right] - last[rows, wrong])), 4
            ),
        }
    return found


def evaluation_rows(data, seed: int = 1234, rows: int = 32) -> np.ndarray:
    """Rows from the training mixture, without induction rows, drawn with another seed."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < rows:
        batch = data.batch(rng)
        out += [row for row in batch if len(set(row.tolist())) > len(row) // 4]
    return np.stack(out[:rows])


def seq2seq_accuracy(m: Any, data, per_task: int = 40, seed: int = 99) -> dict[str, float]:
    """Exact-match accuracy of greedy generation on fresh examples of each task."""
    rng = np.random.default_rng(seed)
    accuracy = {}
    for task in corpus.SEQ2SEQ_TASKS:
        examples = [corpus.seq2seq_example(task, rng) for _ in range(per_task)]
        sources, targets = zip(*examples)
        generation = m.generate(list(sources), max_new_tokens=data.decoder_len)
        hits = [out.strip() == target.strip() for out, target in zip(generation.text, targets)]
        accuracy[task] = float(np.mean(hits))
    return accuracy


def _plot_cross_attention(m: Any, examples: list[tuple[str, str]], path: pathlib.Path):
    """The cross-attention of the last decoder layer (mean over heads) for each example."""
    plt = _plt()
    layer = m.config.decoder.num_hidden_layers - 1
    name = f"decoder.blocks.{layer}.attn.hook_cross_pattern"
    fig, axes = plt.subplots(1, len(examples), figsize=(5.2 * len(examples), 4.2), dpi=120)
    for ax, (source, target) in zip(np.atleast_1d(axes), examples):
        encoder_ids = m.tokenizer.encode(source)
        decoder_ids = m.tokenizer.encode(target)
        _, cache = m.run_with_cache(
            np.array([encoder_ids]), decoder_tokens=np.array([decoder_ids]), names=[name]
        )
        pattern = np.asarray(cache[name], np.float32)[0].mean(axis=0)
        ax.imshow(pattern, cmap="Blues", vmin=0, aspect="auto")
        pieces = [m.tokenizer.piece_text(t) for t in encoder_ids]
        outputs = [m.tokenizer.piece_text(t) for t in decoder_ids]
        ax.set_xticks(range(len(pieces)), pieces, rotation=70, fontsize=8)
        ax.set_yticks(range(len(outputs)), outputs, fontsize=8)
        ax.set(xlabel="encoder token (key)", ylabel="decoder input (query)")
        ax.set_title(f"{source[:40]}", fontsize=9)
    fig.suptitle(f"Cross-attention, decoder layer {layer}, mean over heads")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def measure_seq2seq(name: str, m: Any, data, report_dir: pathlib.Path) -> dict[str, Any]:
    """Evidence for the encoder-decoder: task accuracy and a cross-attention figure."""
    rng = np.random.default_rng(7)
    examples = [corpus.seq2seq_example(task, rng) for task in ("reverse", "capital")]
    _plot_cross_attention(m, examples, report_dir / f"cross_attention_{name}.png")
    return {"accuracy": seq2seq_accuracy(m, data)}


def measure(name: str, m: gl.Model, data, report_dir: pathlib.Path) -> dict[str, Any]:
    """All the evidence for teaching model ``name``; writes its figures to ``report_dir``."""
    if isinstance(m, gl.EncoderDecoderModel):
        return measure_seq2seq(name, m, data, report_dir)
    repeated = repeated_random_tokens(m)
    found: dict[str, Any] = {
        "next_token": top_predictions(m),
        "in_context_loss": in_context_loss(m, repeated),
        "indirect_object": indirect_object(m),
    }
    induction = induction_scores(m, repeated)
    scores, chance = induction.scores, induction.chance
    found["induction"] = {
        "scores": scores.round(4).tolist(),
        "chance_per_layer": chance.round(4).tolist(),
        "top_heads": [
            {"layer": layer, "head": head, "score": round(score, 4)}
            for layer, head, score in induction.top(3)
        ],
    }
    if name == "gemma3":
        _plot_induction(scores, chance, m.config.layer_types, report_dir / "induction_gemma3.png")
    rows = evaluation_rows(data)
    if getattr(m.config, "enable_moe_block", False):
        found["routing"] = routing_by_token_kind(m, rows)
        _plot_routing(found["routing"], report_dir / f"routing_{name}.png")
    if getattr(m.config, "altup_num_inputs", 0):
        found["altup"] = altup_prediction_quality(m, rows)
        _plot_altup(found["altup"], report_dir / f"altup_{name}.png")
    return found


def record_indirect_object(report_path: pathlib.Path, names: tuple[str, ...] = ()) -> dict:
    """Measures `indirect_object` on the shipped decoder teaching models and writes it into
    their ``evidence`` in ``report_path`` (the rest of the report is left as it is). It
    reads no corpus, so any machine gives the same figures:
    ``python -m gemmalens.teaching.evidence``."""
    import json

    report = json.loads(report_path.read_text())
    for name in names or tuple(report["models"]):
        m = gl.teaching_model(name)
        if isinstance(m, gl.EncoderDecoderModel):
            continue
        found = indirect_object(m)
        report["models"][name].setdefault("evidence", {})["indirect_object"] = found
        print(f"{name}: {found}")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    import sys

    path = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "docs/teaching/report.json")
    record_indirect_object(path)
