"""Architecture presets, as data. Sizes follow the released Gemma checkpoints' configs."""

from __future__ import annotations

from gemmalens.families.gemma3 import Gemma3Config, RopeConfig


def _gemma3(**fields) -> Gemma3Config:
    layers = fields["num_hidden_layers"]
    fields.setdefault("layer_types", Gemma3Config.default_layer_types(layers))
    return Gemma3Config(**fields)


_LINEAR_8 = RopeConfig(theta=1_000_000.0, rope_type="linear", factor=8.0)
_LARGE = dict(
    vocab_size=262_144, sliding_window=1024, rope_global=_LINEAR_8, max_position_embeddings=131_072
)

PRESETS = {
    "gemma3_270m": _gemma3(
        vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512,
    ),
    "gemma3_1b": _gemma3(
        vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512,
    ),
    "gemma3_4b_text": _gemma3(
        hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, **_LARGE,
    ),
    "gemma3_12b_text": _gemma3(
        hidden_size=3840, intermediate_size=15_360, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, **_LARGE,
    ),
    "gemma3_27b_text": _gemma3(
        hidden_size=5376, intermediate_size=21_504, num_hidden_layers=62, num_attention_heads=32,
        num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168, **_LARGE,
    ),
}  # fmt: skip


def presets() -> list[str]:
    """Names of the architecture presets."""
    return sorted(PRESETS)


def preset(name: str) -> Gemma3Config:
    """The config of a named preset (``gl.preset("gemma3_1b").num_params()``)."""
    try:
        return PRESETS[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(
            f"No preset named {name!r}.{hint} Available: {', '.join(presets())}."
        ) from None
