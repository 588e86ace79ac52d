"""Tiny transformers models built inside the tests: the numerical reference.

Every weight is perturbed away from its initial value (transformers initialises norm
weights to constants, which would hide a wrong ``1 + w``).
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers

TINY_GEMMA3 = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=7,  # not a multiple of 6: layer 5 global, 6 local again
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,  # != head_dim
    sliding_window=4,
    max_position_embeddings=256,
    final_logit_softcapping=5.0,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    },
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
)


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))


def gemma3_text(
    directory: pathlib.Path,
    seed: int = 0,
    perturbation: float = 0.1,
    post_norm_gain: float = 0.0,
    **overrides,
) -> transformers.PreTrainedModel:
    """Saves a perturbed tiny ``Gemma3ForCausalLM`` to ``directory`` and returns it.

    Random models tend to predict the token they just read, so greedy generation repeats
    itself. ``post_norm_gain`` (added to the post-attention and post-feedforward norm
    weights) lets the blocks outweigh the embedding, which makes generation varied."""
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(**{**TINY_GEMMA3, **overrides})
    config._attn_implementation = "eager"
    model = transformers.Gemma3ForCausalLM(config).eval()
    perturb_(model, seed, perturbation)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".post_" in name:
                param.add_(post_norm_gain)
    model.save_pretrained(directory)
    return model


def gemma3_multimodal(directory: pathlib.Path, seed: int = 0) -> transformers.PreTrainedModel:
    """Saves a perturbed tiny ``Gemma3ForConditionalGeneration`` (SigLIP tower included)."""
    torch.manual_seed(seed)
    text = {**TINY_GEMMA3, "vocab_size": 300, "final_logit_softcapping": None}
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=255,
        eoi_token_index=256,
        image_token_index=257,
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    perturb_(model, seed)
    model.save_pretrained(directory)
    return model


def logits(model: transformers.PreTrainedModel, tokens: np.ndarray, **kwargs) -> np.ndarray:
    """The reference logits in float32 numpy."""
    args = {k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()}
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens, np.int64)), **args)
    return out.logits.float().numpy()
