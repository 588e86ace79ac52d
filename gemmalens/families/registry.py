"""The family registry: the one place each Gemma family is declared.

Loading (`gemmalens.load`), saving (`gemmalens.checkpoints.save`), the teaching script, the
cache analyses (`gemmalens.residual`), ``gl.families()`` and the documentation all read
this table instead of listing families themselves. Adding a family means writing its
module (config, builder, what is new in it), its checkpoint name map, and one `Family`
entry here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gemmalens.checkpoints import gemma3 as gemma3_names
from gemmalens.checkpoints import gemma3n as gemma3n_names
from gemmalens.checkpoints import gemma4 as gemma4_names
from gemmalens.checkpoints import t5gemma2 as t5gemma2_names
from gemmalens.families.gemma3 import Gemma3Config
from gemmalens.families.gemma3n import Gemma3nConfig
from gemmalens.families.gemma4 import Gemma4Config
from gemmalens.families.t5gemma2 import T5Gemma2Config


def _unchanged(tensors: dict, config: Any) -> dict:
    return tensors


def _in_model(hf_name: Callable[[str], str]) -> Callable[[str], str]:
    return lambda label: "model." + hf_name(label)


@dataclasses.dataclass(frozen=True)
class Family:
    """One Gemma family, as the rest of the package needs to know it.

    Attributes:
      name: the config's ``family`` field (``"gemma3"``).
      title: how people write it (``"Gemma 3"``).
      config_class: its config dataclass (``from_hf``, ``build``, ``replace``).
      model_types: the ``config.json`` ``model_type`` values it loads.
      load_checkpoint: ``(CheckpointDir, dtype, show_progress) -> (penzai model, config)``.
      saved_model_type: the ``model_type`` it writes (text-only where there is one).
      tensor_name: gemmalens parameter label -> tensor name in the files it writes.
      to_file_layout: ``(tensors, config) -> tensors``, file-layout fix-ups when writing.
      residual: how its residual stream is written (a `gemmalens.residual.Readout`
        class name: ``"Readout"``, ``"ScaledReadout"`` or ``"AltUpReadout"``).
      notes: what is special to show (one line, for tables).
      towers: the encoders ``gl.load`` can build beside the text model on request
        (``"vision"``: ``load_checkpoint(..., vision=True)``; ``"audio"``:
        ``load_checkpoint(..., audio=True)``).
    """

    name: str
    title: str
    config_class: type
    model_types: tuple[str, ...]
    load_checkpoint: Callable[..., Any]
    saved_model_type: str
    tensor_name: Callable[[str], str]
    to_file_layout: Callable[[dict, Any], dict]
    residual: str
    notes: str
    towers: tuple[str, ...] = ()

    def presets(self) -> list[str]:
        """The names of this family's architecture presets (`gemmalens.presets`)."""
        from gemmalens.presets import PRESETS

        return sorted(name for name, config in PRESETS.items() if config.family == self.name)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="gemma3",
            title="Gemma 3",
            config_class=Gemma3Config,
            model_types=("gemma3_text", "gemma3"),
            load_checkpoint=gemma3_names.load_checkpoint,
            saved_model_type="gemma3_text",
            tensor_name=_in_model(gemma3_names.hf_name),
            to_file_layout=_unchanged,
            residual="Readout",
            notes="5 local : 1 global attention, QK-norm, pre- and post-norms",
            towers=("vision",),
        ),
        Family(
            name="gemma3n",
            title="Gemma 3n",
            config_class=Gemma3nConfig,
            model_types=("gemma3n_text", "gemma3n"),
            load_checkpoint=gemma3n_names.load_checkpoint,
            saved_model_type="gemma3n_text",
            tensor_name=_in_model(gemma3n_names.hf_name),
            to_file_layout=gemma3n_names.to_file_layout,
            residual="AltUpReadout",
            notes="AltUp streams, LAuReL, per-layer embeddings, sparse gates, KV sharing",
            towers=("vision", "audio"),
        ),
        Family(
            name="gemma4",
            title="Gemma 4",
            config_class=Gemma4Config,
            model_types=("gemma4_text", "gemma4"),
            load_checkpoint=gemma4_names.load_checkpoint,
            saved_model_type="gemma4_text",
            tensor_name=_in_model(gemma4_names.hf_name),
            to_file_layout=gemma4_names.to_file_layout,
            residual="ScaledReadout",
            notes="layer scalars, K=V global attention, per-layer embeddings, experts",
            towers=("vision", "audio"),
        ),
        Family(
            name="t5gemma2",
            title="T5Gemma 2",
            config_class=T5Gemma2Config,
            model_types=("t5gemma2",),
            load_checkpoint=t5gemma2_names.load_checkpoint,
            saved_model_type="t5gemma2",
            tensor_name=t5gemma2_names.key_mapper(t5gemma2_names.ENCODER_PREFIXES[0]),
            to_file_layout=_unchanged,
            residual="Readout",
            notes="encoder and decoder; the decoder's attention merges self and cross",
            towers=("vision",),
        ),
    )
}


def family(name_or_config: Any) -> Family:
    """The `Family` of a family name (``"gemma4"``) or a config (its ``family`` field)."""
    name = getattr(name_or_config, "family", name_or_config)
    if name not in FAMILIES:
        raise ValueError(f"Unknown family {name!r}; gemmalens has {sorted(FAMILIES)}.")
    return FAMILIES[name]


def by_model_type() -> dict[str, Family]:
    """``config.json`` ``model_type`` -> the family that loads it."""
    return {model_type: f for f in FAMILIES.values() for model_type in f.model_types}


def by_saved_model_type() -> dict[str, Family]:
    """The ``model_type`` a family writes -> the family."""
    return {f.saved_model_type: f for f in FAMILIES.values()}
