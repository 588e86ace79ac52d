"""Trains the teaching models that ship with gemmalens.

The models are the gemmalens Penzai models themselves: their parameters are unbound,
differentiated with JAX and updated with optax, and the trained tree is written as a
Hugging Face checkpoint that `gemmalens.load` and transformers both read.

    python -m gemmalens.teaching.train                    # every model, full setting
    python -m gemmalens.teaching.train --tiny --steps 30  # seconds on a CPU
    python -m gemmalens.teaching.train --models gemma3_vision   # the picture model only

The vision model (``gemma3_vision``) trains on picture questions
(`gemmalens.teaching.images`) with the shipped text models' tokenizer, for
``--image-steps`` steps; trained alone, it updates only its own entry of ``report.json``.

Outputs: ``--out`` (default ``gemmalens/assets/teaching``) gets one checkpoint folder per
model plus ``NOTICE``; ``--report`` (default ``docs/teaching``) gets the loss curves, the
evidence figures and ``report.json`` with every measured number.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from penzai import pz
from tqdm.auto import tqdm

import gemmalens as gl
from gemmalens.checkpoints.save import save_checkpoint
from gemmalens.encdec import named_tokens, seq2seq_side_inputs
from gemmalens.families import registry
from gemmalens.layers.hooks import capture, hook_points
from gemmalens.layers.transformer import with_positions
from gemmalens.teaching import configs, corpus, images
from gemmalens.tokenizer import Tokenizer, train_gemma_tokenizer
from gemmalens.vision.merge import IMAGE_BLOCKS, PIXEL_VALUES
from gemmalens.vision.siglip import PIXEL_AXES

# The model_type each family writes -> its config class (from the family registry).
FAMILY_CONFIGS = {
    model_type: family.config_class for model_type, family in registry.by_saved_model_type().items()
}
# Share of training rows drawn from each source.
DEFAULT_MIXTURE = {
    "docs": 0.55,
    "induction": 0.15,
    "ioi": 0.1,
    "facts": 0.1,
    "additions": 0.05,
    "chat": 0.05,
}
_ROUTER_HOOKS = "blocks.*.moe.hook_router_logits"
# The vocabulary the shipped models share; picture questions are spelled in it.
SHIPPED_TOKENIZER = (
    pathlib.Path(__file__).resolve().parent.parent
    / "assets"
    / "teaching"
    / "gemma3"
    / "tokenizer.model"
)
_CAPTURE_LABEL = "train/"


@dataclasses.dataclass(frozen=True)
class Settings:
    """One training run's knobs. The defaults are what the shipped models were trained with."""

    steps: int = 4000
    batch_size: int = 64
    seq_len: int = configs.SEQ_LEN
    learning_rate: float = 2e-3
    warmup_steps: int = 150
    weight_decay: float = 0.01
    # Switch-Transformer load balancing, so that every expert gets work.
    load_balance_weight: float = 0.01
    seed: int = 0
    tiny: bool = False
    mixture: tuple[tuple[str, float], ...] = tuple(DEFAULT_MIXTURE.items())
    # Characters of documentation prose (None: all of it).
    docs_chars: int | None = None
    vocab_size: int = configs.VOCAB_SIZE
    # The picture-question model (`configs.VISION_MODELS`) trains with these instead.
    image_steps: int = 2000
    image_batch_size: int = 64
    # At 2e-3 the picture model learns the answers' words and never reads the picture (its
    # tower's output turns constant); with 32 rows it may read it and then stop; at 1e-3
    # with 64 rows it reads it from step 200 on (docs/teaching-models.md).
    image_learning_rate: float = 1e-3

    def for_images(self) -> Settings:
        """The settings a vision model trains with: its own steps, batch size and rate."""
        warmup = min(self.warmup_steps, max(1, self.image_steps // 10))
        return dataclasses.replace(
            self,
            steps=self.image_steps,
            batch_size=self.image_batch_size,
            learning_rate=self.image_learning_rate,
            warmup_steps=warmup,
        )


# ----------------------------------------------------------------------------------- data


def _encode_stream(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """The texts as one stream of ids, each text opened by ``<bos>`` and closed by ``<eos>``."""
    pieces = []
    for ids in tokenizer.encode(list(texts), add_bos=True, add_eos=True):
        pieces.append(np.asarray(ids, np.int32))
    return np.concatenate(pieces)


class TrainingData:
    """Rows of ``seq_len`` token ids drawn from the sources in ``settings.mixture``.

    Text sources are encoded once into long streams; a row is ``<bos>`` followed by a
    window of a stream at a random offset. Induction rows are ``<bos>`` and a random span
    of ordinary tokens repeated to the end of the row.
    """

    def __init__(self, tokenizer: Tokenizer, docs: Sequence[str], settings: Settings):
        rng = np.random.default_rng(settings.seed)
        self.settings = settings
        self.bos = tokenizer.bos_id
        # Ordinary pieces follow the special pieces (0..106) and the 256 byte pieces.
        self.first_ordinary_id = 107 + 256
        self.vocab_size = tokenizer.vocab_size
        sentences = 400 if settings.tiny else 20_000
        self.streams = {"docs": _encode_stream(tokenizer, docs)}
        for kind in corpus.SYNTHETIC_TEXT:
            paragraphs = [corpus.synthetic_paragraph(kind, rng) for _ in range(sentences // 8)]
            self.streams[kind] = _encode_stream(tokenizer, paragraphs)
        self.kinds = [kind for kind, _ in settings.mixture]
        weights = np.array([weight for _, weight in settings.mixture], np.float64)
        self.weights = weights / weights.sum()
        for kind in self.kinds:
            if kind != "induction" and len(self.streams[kind]) <= settings.seq_len:
                raise ValueError(f"The {kind!r} stream is shorter than one row; add more text.")

    def batch(self, rng: np.random.Generator) -> np.ndarray:
        """``[batch_size, seq_len]`` int32 token ids."""
        s = self.settings
        rows = np.empty((s.batch_size, s.seq_len), np.int32)
        for row, kind in zip(rows, rng.choice(self.kinds, size=s.batch_size, p=self.weights)):
            row[0] = self.bos
            if kind == "induction":
                row[1:] = corpus.repeated_random_tokens(
                    rng, s.seq_len - 1, self.first_ordinary_id, self.vocab_size
                )
            else:
                stream = self.streams[kind]
                start = rng.integers(0, len(stream) - s.seq_len)
                row[1:] = stream[start : start + s.seq_len - 1]
        return rows

    def describe(self) -> dict[str, Any]:
        # Induction rows are drawn fresh, from no stream.
        return {
            kind: {"tokens": len(self.streams.get(kind, ())), "share_of_rows": float(weight)}
            for kind, weight in zip(self.kinds, self.weights)
        }


class Seq2SeqData:
    """Batches of encoder-decoder examples (`corpus.seq2seq_example`), tasks drawn evenly.

    Encoder rows are ``<bos> text`` (what ``m.generate(text)`` feeds the encoder), decoder
    rows ``<bos> target <eos>``, both padded on the right to fixed lengths; the masks mark
    real tokens.
    """

    encoder_len = 32
    decoder_len = 16

    def __init__(self, tokenizer: Tokenizer, settings: Settings):
        self.tokenizer = tokenizer
        self.settings = settings

    def examples(self, rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
        tasks = rng.choice(corpus.SEQ2SEQ_TASKS, size=count)
        return [corpus.seq2seq_example(task, rng) for task in tasks]

    def _padded(
        self, texts: Sequence[str], length: int, add_eos: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer.encode(list(texts), add_bos=True, add_eos=add_eos)
        tokens = np.zeros((len(ids), length), np.int32)
        for row, seq in zip(tokens, ids):
            if len(seq) > length:
                raise ValueError(f"An example of {len(seq)} tokens exceeds the {length} allowed.")
            row[: len(seq)] = seq
        return tokens, (tokens != self.tokenizer.pad_id).astype(np.int32)

    def batch(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        sources, targets = zip(*self.examples(rng, self.settings.batch_size))
        tokens, mask = self._padded(sources, self.encoder_len, add_eos=False)
        decoder_tokens, decoder_mask = self._padded(targets, self.decoder_len, add_eos=True)
        return {
            "tokens": tokens,
            "mask": mask,
            "decoder_tokens": decoder_tokens,
            "decoder_mask": decoder_mask,
        }

    def describe(self) -> dict[str, Any]:
        return {
            task: {"share_of_rows": 1 / len(corpus.SEQ2SEQ_TASKS)} for task in corpus.SEQ2SEQ_TASKS
        }


def _documentation(settings: Settings) -> list[str]:
    """The documentation prose a run uses: ``settings.docs_chars`` of it, 20,000 characters
    in the tiny setting, all of it otherwise."""
    return corpus.documentation(settings.docs_chars or (20_000 if settings.tiny else None))


def build_tokenizer(docs: Sequence[str], path: pathlib.Path, settings: Settings) -> Tokenizer:
    """Trains the shared tokenizer on the documentation and samples of every synthetic kind."""
    rng = np.random.default_rng(settings.seed + 1)
    lines = list(docs)
    samples = 100 if settings.tiny else 2000
    for kind in corpus.SYNTHETIC_TEXT:
        lines += [corpus.synthetic_paragraph(kind, rng, sentences=4) for _ in range(samples)]
    train_gemma_tokenizer(lines, path, settings.vocab_size, exact_vocab_size=not settings.tiny)
    return Tokenizer.from_file(path)


# ------------------------------------------------------------------------------- training


def next_token_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array | None = None):
    """Mean cross-entropy of each next token (only where ``mask`` marks it real)."""
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    if mask is None:
        return -picked.mean()
    weights = mask[:, 1:].astype(jnp.float32)
    return -(picked * weights).sum() / weights.sum()


def _load_balance_loss(router_logits: list[jax.Array], top_k: int) -> jax.Array:
    """Switch Transformer's ``E * sum_e f_e P_e``: 1 when routing is uniform, larger when
    a few experts take most tokens (f_e: share of top-k picks, P_e: mean router weight)."""
    losses = []
    for logits in router_logits:
        experts = logits.shape[-1]
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, experts)
        chosen = jax.lax.top_k(probs, top_k)[1]
        share = jax.nn.one_hot(chosen, experts).sum(axis=1).mean(axis=0) / top_k
        losses.append(experts * jnp.sum(jax.lax.stop_gradient(share) * probs.mean(axis=0)))
    return jnp.mean(jnp.stack(losses))


def _answer_loss(model: pz.nn.Layer, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean cross-entropy of the answer tokens of a picture-question batch
    (`images.ImageQuestions.batch`): the decoder runs on every position but unembeds only
    the few that say an answer token, most of a small model's cost otherwise."""
    tokens = named_tokens(batch["tokens"])
    side = {
        PIXEL_VALUES: pz.nx.wrap(batch["pixel_values"]).tag(*PIXEL_AXES),
        IMAGE_BLOCKS: pz.nx.wrap(batch["image_blocks"]).tag("batch", "seq"),
    }
    side = with_positions(tokens, side)
    h = model.final_norm(model.blocks(model.embed(tokens, **side), **side), **side)
    hidden = h.unwrap("batch", "seq", "embedding")  # [batch, seq, d_model]
    at = jnp.take_along_axis(hidden, batch["loss_positions"][..., None], axis=1)
    logits = model.unembed(pz.nx.wrap(at).tag("batch", "seq", "embedding"), **side)
    log_probs = jax.nn.log_softmax(logits.unwrap("batch", "seq", "vocab").astype(jnp.float32))
    picked = jnp.take_along_axis(log_probs, batch["loss_targets"][..., None], axis=-1)[..., 0]
    weights = batch["loss_weights"].astype(jnp.float32)
    return -(picked * weights).sum() / weights.sum()


class Trainer:
    """Holds the unbound model, its parameters and the optimiser state of one run."""

    def __init__(self, hf_config: dict[str, Any], settings: Settings):
        self.hf_config = hf_config
        self.settings = settings
        if hf_config["model_type"] == "gemma3":  # with the vision tower
            self.config = images.model_config(hf_config)
        else:
            self.config = FAMILY_CONFIGS[hf_config["model_type"]].from_hf(hf_config)
        model = self.config.build(gl.RandomInit(seed=settings.seed))
        unbound, params = pz.unbind_params(model, freeze=True)
        self.top_k = hf_config.get("top_k_experts") or 0
        names = {hp.name for hp in hook_points(model)}
        router_names = {n for n in names if n.endswith("moe.hook_router_logits")}
        self._plain = unbound
        capturing = capture(unbound, router_names, _CAPTURE_LABEL)
        self.unbound, state = pz.unbind_state_vars(capturing, freeze=True)
        self.state = state
        self.params = params
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, settings.learning_rate, settings.warmup_steps, settings.steps, 0.05
        )
        self.optimizer = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(schedule, b2=0.98, weight_decay=settings.weight_decay),
        )
        self.opt_state = self.optimizer.init(self.params)
        self._step = jax.jit(self._update, donate_argnums=(0, 1))

    def _losses(self, params, batch):
        model = pz.bind_variables(self.unbound, params)
        if "decoder_tokens" in batch:  # encoder-decoder: the loss is on the decoder's tokens
            side = seq2seq_side_inputs(
                batch["tokens"], batch["mask"], batch["decoder_tokens"], batch["decoder_mask"]
            )
            inputs = (named_tokens(batch["tokens"]), named_tokens(batch["decoder_tokens"]))
            logits, values = model.stateless_call(self.state, inputs, **side)
            target, mask = batch["decoder_tokens"], batch["decoder_mask"]
        elif "pixel_values" in batch:  # picture questions: the loss is on the answers only
            loss = _answer_loss(pz.bind_variables(self._plain, params), batch)
            return loss, (loss, jnp.zeros(()))
        else:
            logits, values = model.stateless_call(self.state, named_tokens(batch["tokens"]))
            target, mask = batch["tokens"], None
        loss = next_token_loss(logits.unwrap("batch", "seq", "vocab"), target, mask)
        # Captured values are plain [batch, seq, expert] arrays.
        router = [v.value for v in values if v.label.startswith(_CAPTURE_LABEL)]
        balance = _load_balance_loss(router, self.top_k) if router else jnp.zeros(())
        return loss + self.settings.load_balance_weight * balance, (loss, balance)

    def _update(self, params, opt_state, batch):
        grads, (loss, balance) = jax.grad(self._losses, has_aux=True)(params, batch)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, balance

    def step(self, batch: np.ndarray | dict[str, np.ndarray]) -> tuple[jax.Array, jax.Array]:
        """One optimiser step on ``[batch, seq]`` tokens (or an encoder-decoder or
        picture-question batch dict)."""
        if not isinstance(batch, dict):
            batch = {"tokens": batch}
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        self.params, self.opt_state, loss, balance = self._step(self.params, self.opt_state, batch)
        return loss, balance

    def model(self, tokenizer: Tokenizer | None = None) -> gl.Model:
        """The trained model as a `gemmalens.Model` (parameters bound, hooks restored)."""
        model = pz.bind_variables(self._plain, self.params, unfreeze_as_copy=True)
        surface = getattr(self.config, "surface_class", gl.Model)
        return surface(model, self.config, tokenizer)


def train(
    hf_config: dict[str, Any],
    data: TrainingData,
    settings: Settings,
    name: str = "",
    progress: bool = True,
) -> tuple[Trainer, dict[str, Any]]:
    """Trains one model; returns the trainer and its loss history."""
    trainer = Trainer(hf_config, settings)
    rng = np.random.default_rng(settings.seed + 2)
    losses, balances = [], []
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc=f"training {name}", disable=not progress)
    for step in bar:
        loss, balance = trainer.step(data.batch(rng))
        losses.append(loss)
        balances.append(balance)
        if step % 50 == 0 or step == settings.steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    losses = [float(x) for x in jax.device_get(losses)]
    seconds = time.perf_counter() - start
    history = {
        "loss": losses,
        "load_balance": [float(x) for x in jax.device_get(balances)],
        "seconds": seconds,
        "device": str(jax.devices()[0].device_kind),
    }
    return trainer, history


# ------------------------------------------------------------------------------- the CLI


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


NOTICE = """\
The teaching models in this folder were trained by gemmalens (Apache-2.0) on text that
includes docstrings from the Python standard library and from NumPy, and on synthetic
text and token sequences generated by gemmalens/teaching/corpus.py.

Python: Copyright (c) 2001 Python Software Foundation; All Rights Reserved. Used under
the PSF License Agreement for Python, which permits derivative works.

NumPy: Copyright (c) 2005, NumPy Developers. All rights reserved. Used under the BSD
3-Clause licence, which permits redistribution in binary form with this notice.
"""


def run(
    names: Sequence[str],
    out: pathlib.Path,
    report_dir: pathlib.Path,
    settings: Settings,
    evidence: Callable[..., dict[str, Any]] | None = None,
    progress: bool = True,
    tokenizer: pathlib.Path | None = None,
) -> dict[str, Any]:
    """Builds the corpus and tokenizer, trains ``names``, writes checkpoints and report.

    ``tokenizer``: an existing ``tokenizer.model`` to use instead of training one (so that
    retrained models keep the vocabulary of the models they replace).

    Vision models alone (`configs.VISION_MODELS`) need no text corpus: they use
    ``tokenizer`` or else the shipped text models' tokenizer, and their entries are
    written into the ``report.json`` already in ``report_dir``, the rest of it kept."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    report_path = report_dir / "report.json"
    if all(name in configs.VISION_MODELS for name in names):
        tokenizer_path = pathlib.Path(tokenizer or SHIPPED_TOKENIZER)
        tokenizer = Tokenizer.from_file(tokenizer_path)
        report = json.loads(report_path.read_text()) if report_path.exists() else {"models": {}}
        return _train_models(
            names, out, report_dir, settings, evidence, progress, tokenizer, None, report, started
        )
    docs = _documentation(settings)
    if tokenizer is None:
        tokenizer_path = build_tokenizer(docs, out / "tokenizer.model", settings).path
    else:
        tokenizer_path = out / "tokenizer.model"
        if pathlib.Path(tokenizer).resolve() != tokenizer_path.resolve():
            tokenizer_path.write_bytes(pathlib.Path(tokenizer).read_bytes())
    tokenizer = Tokenizer.from_file(tokenizer_path)
    data = TrainingData(tokenizer, docs, settings)
    report: dict[str, Any] = {
        "settings": {**dataclasses.asdict(settings), "mixture": dict(settings.mixture)},
        "corpus": {
            "documentation_characters": sum(map(len, docs)),
            "documentation_texts": len(docs),
            "documentation_sources": {
                "python": platform.python_version(),
                "numpy": np.__version__,
            },
            "streams": data.describe(),
        },
        "tokenizer": {"vocab_size": tokenizer.vocab_size, "sha256": _sha256(tokenizer_path)},
        "jax": jax.__version__,
        "models": {},
    }
    return _train_models(
        names, out, report_dir, settings, evidence, progress, tokenizer, data, report, started
    )


def _train_models(
    names: Sequence[str],
    out: pathlib.Path,
    report_dir: pathlib.Path,
    settings: Settings,
    evidence: Callable[..., dict[str, Any]] | None,
    progress: bool,
    tokenizer: Tokenizer,
    data: TrainingData | None,
    report: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Trains, saves and measures each of ``names``, updating ``report`` after each."""
    seq2seq = Seq2SeqData(tokenizer, settings)
    for name in names:
        hf = configs.hf_config(name, tiny=settings.tiny)
        vision = name in configs.VISION_MODELS
        model_settings = settings.for_images() if vision else settings
        if vision:
            source = images.ImageQuestions(tokenizer, model_settings.batch_size)
        else:
            source = seq2seq if hf.get("is_encoder_decoder", False) else data
        trainer, history = train(hf, source, model_settings, name, progress)
        model = trainer.model(tokenizer)
        directory = save_checkpoint(model, out / name, hf, tokenizer=tokenizer.path)
        entry = {
            "parameters": int(trainer.config.num_params()),
            "checkpoint_bytes": (directory / "model.safetensors").stat().st_size,
            "train_seconds": history["seconds"],
            "device": history["device"],
            "first_loss": history["loss"][0],
            "final_loss": float(np.mean(history["loss"][-50:])),
        }
        if vision:  # its own steps and data, beside the text models' shared ones
            entry["settings"] = {
                key: getattr(model_settings, key)
                for key in ("steps", "batch_size", "learning_rate", "warmup_steps", "seed")
            }
            entry["task"] = source.describe()
        _plot_loss(history, name, report_dir / f"loss_{name}.png")
        if evidence is not None:
            shipped = gl.load(directory, vision=vision)
            measure = images.measure if vision else evidence
            entry["evidence"] = measure(name, shipped, source, report_dir)
        report["models"][name] = entry
        (report_dir / f"loss_{name}.json").write_text(json.dumps(history["loss"]))
        # Written after every model, so that a run cut short keeps what it finished. A
        # vision-only run leaves the text run's total alone.
        if data is not None:
            report["total_seconds"] = time.perf_counter() - started
        (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "NOTICE").write_text(NOTICE)
    return report


def remeasure(
    names: Sequence[str], out: pathlib.Path, report_dir: pathlib.Path, settings: Settings
) -> dict[str, Any]:
    """Re-runs the evidence on the checkpoints in ``out`` (no training) and updates the
    ``evidence`` entries of ``report_dir/report.json``; runs on a CPU in a minute."""
    from gemmalens.teaching.evidence import measure

    report_dir.mkdir(parents=True, exist_ok=True)
    report_path = report_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"models": {}}
    tokenizer = Tokenizer.from_file(out / names[0] / "tokenizer.model")
    text = [name for name in names if name not in configs.VISION_MODELS]
    data = TrainingData(tokenizer, _documentation(settings), settings) if text else None
    seq2seq = Seq2SeqData(tokenizer, settings)
    for name in names:
        if name in configs.VISION_MODELS:
            found = images.measure(name, gl.load(out / name, vision=True), None, report_dir)
            report["models"].setdefault(name, {})["evidence"] = found
            continue
        encoder_decoder = configs.hf_config(name).get("is_encoder_decoder", False)
        source = seq2seq if encoder_decoder else data
        found = measure(name, gl.load(out / name), source, report_dir)
        report["models"].setdefault(name, {})["evidence"] = found
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _plot_loss(history: dict[str, Any], name: str, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = np.asarray(history["loss"])
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot(loss, color="#9ecae1", lw=0.6, label="per step")
    window = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(window - 1, len(loss)), smooth, color="#08519c", lw=1.6, label="mean")
    ax.set(
        title=f"{name}: training loss ({len(loss)} steps, {history['seconds']:.0f} s "
        f"on {history['device']})",
        xlabel="step",
        ylabel="next-token cross-entropy (nats)",
    )
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gemmalens.teaching.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--models", nargs="+", default=list(configs.TEACHING_CONFIGS))
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("gemmalens/assets/teaching")
    )
    parser.add_argument("--report", type=pathlib.Path, default=pathlib.Path("docs/teaching"))
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument(
        "--image-steps", type=int, default=Settings.image_steps, help="steps of the vision model"
    )
    parser.add_argument("--image-batch-size", type=int, default=Settings.image_batch_size)
    parser.add_argument("--tiny", action="store_true", help="tiny widths and corpus (CPU, tests)")
    parser.add_argument("--no-evidence", action="store_true", help="skip the evidence figures")
    parser.add_argument(
        "--tokenizer", type=pathlib.Path, help="use this tokenizer.model instead of training one"
    )
    parser.add_argument(
        "--evidence-only",
        action="store_true",
        help="no training: measure the checkpoints already in --out and update --report",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    settings = Settings(
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        tiny=args.tiny,
        seq_len=64 if args.tiny else Settings.seq_len,
        warmup_steps=min(Settings.warmup_steps, max(1, args.steps // 10)),
        image_steps=args.image_steps,
        image_batch_size=args.image_batch_size,
    )
    if args.evidence_only:
        remeasure(args.models, args.out, args.report, settings)
        return 0
    evidence = None
    if not args.no_evidence:
        from gemmalens.teaching.evidence import measure

        evidence = measure
    report = run(args.models, args.out, args.report, settings, evidence, tokenizer=args.tokenizer)
    for name, entry in report["models"].items():
        print(
            f"{name}: loss {entry['first_loss']:.2f} -> {entry['final_loss']:.2f} in "
            f"{entry['train_seconds']:.0f} s on {entry['device']}; {args.out / name}"
        )
    print(f"report: {args.report / 'report.json'} ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
