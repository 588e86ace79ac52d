"""Sparse autoencoders and transcoders: Gemma Scope 2 files, splicing, feature tools.

A JumpReLU sparse autoencoder (SAE) reads a value ``x`` at a hook point and writes it as
a sparse sum of decoder directions::

    pre = x @ w_enc + b_enc                     # [..., features]
    f = where(pre > threshold, relu(pre), 0)    # JumpReLU: hook_features
    x_hat = f @ w_dec + b_dec                   # hook_reconstruction
    error = x - x_hat                           # hook_error

A transcoder reads the MLP's input and reconstructs the MLP's output instead (an
*affine-skip* transcoder adds ``x @ w_skip`` to ``x_hat``). `splice` places them in a
model as visible Penzai layers; the reconstruction error is added back by default, so the
logits do not change until a feature is edited::

    m = gl.teaching_model("gemma3")
    sae = gl.sae.load("gemma-scope-2-270m-pt/resid_post/layer_3_width_16k_l0_small", m)
    ms = gl.sae.splice(m, [sae])                      # m itself is unchanged
    logits, cache = ms.run_with_cache(tokens, names="*.sae.*")
    cache["blocks.3.hook_resid_post.sae.hook_features"]          # [batch, seq, features]
    ms.run_with_hooks(tokens, gl.sae.ablate(sae, [12, 40]))      # minus their decoder terms
    m.run_with_hooks(tokens, gl.sae.steer(sae, 12, 8.0))         # + 8 * w_dec[12]
    patching.sweep(ms, clean, corrupted, metric, site="features")   # [sae, feature]
    gl.sae.top_activations(ms, sae, [12, 40], corpus_tokens, k=20)
    gl.sae.logit_effects(m, sae, 12)                              # [vocab]
    gl.sae.attribute(ms, tokens, metric)                          # gradient x activation

Hook points of a spliced dictionary (``site`` below is `SAE.site`):

* ``<site>.sae.hook_features``: JumpReLU activations, ``[batch, seq, features]``;
* ``<site>.sae.hook_reconstruction``: ``x_hat`` from the (possibly edited) features;
* ``<site>.sae.hook_error``: target minus the reconstruction from the *unedited* features
  (as SAELens' ``use_error_term``), so editing a feature changes the output by exactly
  its change times its decoder row;
* transcoders also get ``blocks.{i}.mlp.hook_in``, the MLP input after the
  pre-feedforward norm (gain included: what the gate and up projections read).

An SAE's site is the gemmalens hook it reads (``blocks.3.hook_resid_post``,
``blocks.3.hook_mlp_out``, ``blocks.3.attn.hook_z``); a transcoder's is ``blocks.3.mlp``.

Families: dictionaries splice into every decoder family. On Gemma 3n the residual hooks
hold AltUp's active stream, so an SAE there reads and rewrites that stream alone; on
Gemma 4, ``attn.hook_z`` is wider on full-attention layers than on sliding ones and each
layer's own width is checked. Transcoders fit Gemma 3's MLP shape only, and
`logit_effects` is refused outside Gemma 3 (the path to the logits is not one matrix
there); T5Gemma 2 (two stacks, no published dictionaries) is refused with the reason.

The file layouts read, and where they were learned, are in `gemmalens.sae.files`.
"""

from __future__ import annotations

from gemmalens.sae.files import SAE, check_fits, load
from gemmalens.sae.layers import SAESplice, SparseCoder, TranscoderSplice, splice
from gemmalens.sae.tools import (
    FeatureAttribution,
    TopActivations,
    ablate,
    attribute,
    logit_effects,
    steer,
    top_activations,
)

__all__ = [
    "SAE",
    "FeatureAttribution",
    "SAESplice",
    "SparseCoder",
    "TopActivations",
    "TranscoderSplice",
    "ablate",
    "attribute",
    "check_fits",
    "load",
    "logit_effects",
    "splice",
    "steer",
    "top_activations",
]
