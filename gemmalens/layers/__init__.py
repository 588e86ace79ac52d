"""Penzai layers shared by every Gemma family."""

from gemmalens.layers.attention import Attention, AttentionMask, DotProductAttention
from gemmalens.layers.embeddings import EmbedTokens, TanhSoftCap, TiedUnembed
from gemmalens.layers.hooks import CaptureHook, HookPoint, InterveneHook, hook_points
from gemmalens.layers.mlp import MLP, GatedMLP
from gemmalens.layers.norms import LayerNorm, RMSNorm
from gemmalens.layers.params import ParamBuilder, ParamRequest, RandomInit, ShapeOnly
from gemmalens.layers.rope import ApplyRoPE, inverse_frequencies
from gemmalens.layers.transformer import DecoderLM, positions_from_mask, residual_block

__all__ = [
    "ApplyRoPE",
    "Attention",
    "AttentionMask",
    "CaptureHook",
    "DecoderLM",
    "DotProductAttention",
    "EmbedTokens",
    "GatedMLP",
    "HookPoint",
    "InterveneHook",
    "LayerNorm",
    "MLP",
    "ParamBuilder",
    "ParamRequest",
    "RMSNorm",
    "RandomInit",
    "ShapeOnly",
    "TanhSoftCap",
    "TiedUnembed",
    "hook_points",
    "inverse_frequencies",
    "positions_from_mask",
    "residual_block",
]
