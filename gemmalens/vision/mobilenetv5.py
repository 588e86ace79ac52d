"""Gemma 3n's image encoder: MobileNetV5 (timm's ``mobilenetv5_300m_enc``) with its
multi-scale fusion adapter, and ``embed_vision``'s soft path.

The forward pass, with the hook point that names each value::

    pixel_values [batch, channel, height, width]   (768 x 768 in the released models)
      -> conv_stem: 3x3 conv stride 2 (+bias), RMS norm, GELU     vision.conv_stem.hook_out
      -> stages of blocks, each ending at                         vision.stages.{j}.blocks.{k}.hook_out
           er   edge residual: 3x3 conv (expand), norm, GELU, 1x1 conv, norm (+ skip)
           uir  universal inverted residual: [depthwise conv, norm], 1x1 expand, norm, GELU,
                [depthwise conv, norm, GELU], 1x1 project, norm, layer scale (+ skip)
           mqa  mobile multi-query attention: norm, queries per head (1x1 conv), one
                key and one value head ([depthwise conv stride v, norm], 1x1 conv),
                softmax(q k / sqrt(d)) v                          ...attn.hook_pattern
                1x1 conv out, layer scale (+ skip)
      -> the last two stages' outputs, resized (nearest) to the larger grid, concatenated
         over channels, a 1x1 expand / project feed-forward, average-pooled to
         msfa_output_resolution (16), RMS norm                    vision.hook_fused
      -> [batch, image_token = 16 * 16, embedding = 2048] * sqrt(2048)
      -> embed_vision's soft path: RMS norm, projection to the text width, RMS norm
         without scale                                            vision.hook_soft_tokens
    soft tokens [batch, image_token, embedding]

Every convolution pads as TensorFlow's "SAME" (timm's ``pad_type='same'``), every norm is
an RMS norm over channels (eps 1e-6, weight as is). Named axes: ``batch`` (one per image),
``channel``, ``height``, ``width``; in attention ``heads``, ``seq`` (query pixels,
row-major), ``kv_seq`` (key pixels), ``head_dim``; ``image_token``, ``embedding``.

Parameter labels are timm's names under ``vision.`` with the stage and block indices as
``stages.{j}.blocks.{k}`` (``.kernel`` for convolutions, ``.scale`` for norms);
`hf_name` turns them into the checkpoint's ``model.vision_tower.timm_model.*`` names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemmalens.layers.hooks import HookPoint
from gemmalens.layers.norms import RMSNorm
from gemmalens.layers.params import CountsParameters, ParamBuilder, ParamSource

__all__ = [
    "HUB_TOWER_PREFIX",
    "MOBILENETV5_300M",
    "PIXEL_AXES",
    "Conv2d",
    "FusionAdapter",
    "LayerScale",
    "MobileNetV5Config",
    "MobileNetV5Tower",
    "MultiQueryAttention2d",
    "build_tower",
    "hf_name",
    "make_divisible",
]

HUB_TOWER_PREFIX = "model.vision_tower.timm_model."
PIXEL_AXES = ("batch", "channel", "height", "width")

# The block strings of timm's mobilenetv5_300m_enc (its own notation:
# type_r{repeat}_k{mid / main kernel}_a{start kernel}_s{stride}_e{expansion}_c{channels},
# mqa: _h{heads}_d{key / value dim}_v{kv stride}), one tuple per stage.
_MQA_640 = ("mqa_r1_k3_h12_v2_s1_d64_c640", "uir_r1_a0_k0_s1_e2_c640")
_MQA_1280 = ("mqa_r1_k3_h16_s1_d96_c1280", "uir_r1_a0_k0_s1_e2_c1280")
MOBILENETV5_300M: tuple[tuple[str, ...], ...] = (
    ("er_r1_k3_s2_e4_c128", "er_r1_k3_s1_e4_c128", "er_r1_k3_s1_e4_c128"),
    ("uir_r1_a3_k5_s2_e6_c256",) + ("uir_r1_a5_k0_s1_e4_c256", "uir_r1_a3_k0_s1_e4_c256") * 2,
    ("uir_r1_a5_k5_s2_e6_c640",)
    + ("uir_r1_a5_k0_s1_e4_c640",) * 7
    + ("uir_r1_a0_k0_s1_e1_c640",)
    + _MQA_640 * 14,
    ("uir_r1_a5_k5_s2_e6_c1280",) + _MQA_1280 * 19,
)


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """The nearest multiple of ``divisor`` (at least ``divisor``), one step up when rounding
    lost more than 10%: timm's rule for channel counts."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < round_limit * value else out


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block of a stage, decoded from its timm string."""

    kind: str  # "er", "uir" or "mqa"
    out_channels: int
    stride: int = 1
    kernel: int = 0  # er: the expanding conv; uir: the middle depthwise conv; mqa: kv conv
    start_kernel: int = 0  # uir only
    expansion: float = 1.0
    heads: int = 0  # mqa only
    head_dim: int = 0
    kv_stride: int = 1

    @classmethod
    def parse(cls, text: str, channel_multiplier: float) -> BlockSpec:
        kind, *options = text.split("_")
        if kind not in ("er", "uir", "mqa"):
            raise ValueError(f"block {text!r}: gemmalens builds er, uir and mqa blocks only.")
        values = {}
        for option in options:
            match = re.fullmatch(r"([a-z]+)([0-9.]+)", option)
            if match is None or match.group(1) not in set("rkasecdhv"):
                raise ValueError(f"block {text!r}: option {option!r} is not supported.")
            values[match.group(1)] = match.group(2)
        if values.get("r", "1") != "1":
            raise ValueError(f"block {text!r}: write repeated blocks out one by one.")
        channels = int(values["c"])
        if channel_multiplier != 1.0:
            channels = make_divisible(channels * channel_multiplier)
        return cls(
            kind=kind,
            out_channels=channels,
            stride=int(values.get("s", 1)),
            kernel=int(values.get("k", 0)),
            start_kernel=int(values.get("a", 0)),
            expansion=float(values.get("e", 1)),
            heads=int(values.get("h", 0)),
            head_dim=int(values.get("d", 0)),
            kv_stride=int(values.get("v", 1)),
        )


@dataclasses.dataclass(frozen=True)
class MobileNetV5Config(CountsParameters):
    """MobileNetV5 as timm builds ``mobilenetv5_300m_enc`` (defaults: the released tower,
    294 284 096 parameters).

    Attributes:
      stages: the timm block strings of each stage (`MOBILENETV5_300M`).
      channel_multiplier: timm's ``channel_multiplier`` model argument (scales every
        block's output channels; below 1 the 64-channel stem is kept, as timm does).
      hidden_size: the fusion adapter's output channels (2048: transformers'
        ``vision_config.hidden_size``).
      msfa_indices: which feature maps (0 the stem, ``j + 1`` stage ``j``) are fused.
      msfa_output_resolution: the side of the fused grid (16: 256 soft tokens).
      image_size: the side of the processor's square images (768).
    """

    stages: tuple[tuple[str, ...], ...] = MOBILENETV5_300M
    channel_multiplier: float = 1.0
    stem_size: int = 64
    num_channels: int = 3
    hidden_size: int = 2048
    msfa_indices: tuple[int, ...] = (-2, -1)
    msfa_output_resolution: int = 16
    msfa_expansion: float = 2.0
    image_size: int = 768
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(tuple(s) for s in self.stages))
        self.blocks  # noqa: B018  (parses: a bad string raises here)
        count = len(self.stages) + 1
        for index in self.msfa_indices:
            if not -count <= index < count:
                raise ValueError(f"msfa_indices: {index} is not one of {count} feature maps.")

    @functools.cached_property
    def blocks(self) -> tuple[tuple[BlockSpec, ...], ...]:
        return tuple(
            tuple(BlockSpec.parse(b, self.channel_multiplier) for b in stage)
            for stage in self.stages
        )

    @property
    def fused_maps(self) -> tuple[int, ...]:
        count = len(self.stages) + 1
        return tuple(sorted({i % count for i in self.msfa_indices}))

    @property
    def num_soft_tokens(self) -> int:
        return self.msfa_output_resolution**2

    @property
    def num_attention_heads(self) -> int:
        """The most heads of any attention block (for pattern-size warnings)."""
        return max([b.heads for s in self.blocks for b in s] or [1])

    @property
    def num_patches(self) -> int:
        """Query pixels of the largest attention grid at ``image_size`` (for warnings)."""
        side, largest = self.image_size // 2, 0
        for stage in self.blocks:
            for block in stage:
                side = -(-side // block.stride)
                if block.kind == "mqa":
                    largest = max(largest, side * side)
        return largest

    def build(self, source: ParamSource, scope: str = "vision") -> MobileNetV5Tower:
        return build_tower(ParamBuilder(source).scope(scope), self)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> MobileNetV5Config:
        """Reads transformers' Gemma 3n ``vision_config`` (a ``TimmWrapperConfig`` with
        ``architecture = "mobilenetv5_300m_enc"``); of timm's model arguments
        (``model_args``) ``channel_multiplier``, ``msfa_output_resolution``,
        ``msfa_indices`` and ``stem_size`` are read, others refused."""
        architecture = hf.get("architecture", "mobilenetv5_300m_enc")
        if architecture != "mobilenetv5_300m_enc":
            raise ValueError(
                f"vision_config.architecture is {architecture!r}; gemmalens builds Gemma 3n's "
                "'mobilenetv5_300m_enc' only."
            )
        args = dict(hf.get("model_args") or {})
        known = {"channel_multiplier", "msfa_output_resolution", "msfa_indices", "stem_size"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(
                f"vision_config.model_args {unknown} are not read by gemmalens' MobileNetV5 "
                f"(it reads {sorted(known)})."
            )
        return cls(
            channel_multiplier=float(args.get("channel_multiplier", 1.0)),
            stem_size=int(args.get("stem_size", 64)),
            msfa_indices=tuple(args.get("msfa_indices", (-2, -1))),
            msfa_output_resolution=int(args.get("msfa_output_resolution", 16)),
            hidden_size=int(hf.get("hidden_size", 2048)),
        )


# ---------------------------------------------------------------------------- layers


@pz.pytree_dataclass
class Conv2d(pz.nn.Layer):
    """A 2-D convolution over ``[..., channel, height, width]`` with TensorFlow "SAME"
    padding (at stride 2 the extra row / column goes at the end, as timm's
    ``Conv2dSame``). ``kernel`` is torch's ``[out_channel, channel / groups, kh, kw]``."""

    kernel: pz.nn.ParameterLike[pz.nx.NamedArray]
    bias: pz.nn.ParameterLike[pz.nx.NamedArray] | None
    stride: int = dataclasses.field(metadata={"pytree_node": False})
    groups: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        kernel = self.kernel.value.unwrap("out_channel", "channel", "kernel_h", "kernel_w")

        def conv(image: jax.Array) -> jax.Array:
            out = jax.lax.conv_general_dilated(
                image[None].astype(kernel.dtype),
                kernel,
                (self.stride, self.stride),
                "SAME",
                feature_group_count=self.groups,
                precision=jax.lax.Precision.HIGHEST,
            )
            return out[0]

        y = pz.nx.nmap(conv)(x.untag("channel", "height", "width"))
        y = y.tag("channel", "height", "width")
        if self.bias is not None:
            y = y + self.bias.value
        return y

    @classmethod
    def build(
        cls,
        params: ParamBuilder,
        name: str,
        channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> Conv2d:
        weight = params(
            f"{name}.kernel",
            {"out_channel": out_channels},
            {"channel": channels // groups, "kernel_h": kernel, "kernel_w": kernel},
            layout="conv",
        )
        b = params(f"{name}.bias", {"channel": out_channels}, init="zeros") if bias else None
        return cls(kernel=weight, bias=b, stride=stride, groups=groups)


def _gelu(x: jax.Array) -> jax.Array:
    """GELU, tanh approximation (timm's ``_GELU`` here is ``gelu_pytorch_tanh``)."""
    return jax.nn.gelu(x, approximate=True)


@pz.pytree_dataclass
class LayerScale(pz.nn.Layer):
    """Multiplies each channel by its learned ``gamma`` (timm's ``LayerScale2d``)."""

    gamma: pz.nn.ParameterLike[pz.nx.NamedArray]

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return x * self.gamma.value


@pz.pytree_dataclass
class MultiQueryAttention2d(pz.nn.Layer):
    """Mobile multi-query attention over the pixels of a feature map: ``heads`` query
    heads, one key and one value head (optionally computed on a strided grid).

    ``[batch, channel, height, width]`` -> the same shape; the pattern
    ``[batch, heads, seq, kv_seq]`` passes ``hook_pattern``.
    """

    query: pz.nn.Layer
    key: pz.nn.Layer
    value: pz.nn.Layer
    output: pz.nn.Layer
    hook_pattern: HookPoint
    heads: int = dataclasses.field(metadata={"pytree_node": False})
    head_dim: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        height, width = x.named_shape["height"], x.named_shape["width"]

        def pixels(v: pz.nx.NamedArray, channel: str, axis: str) -> pz.nx.NamedArray:
            flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731  [c, h, w] -> [c, h*w]
            return pz.nx.nmap(flat)(v.untag("channel", "height", "width")).tag(channel, axis)

        split = lambda a: a.reshape(self.heads, self.head_dim)  # noqa: E731
        q = pixels(self.query(x), "channel", "seq")
        q = pz.nx.nmap(split)(q.untag("channel")).tag("heads", "head_dim")
        k = pixels(self.key(x), "head_dim", "kv_seq")
        v = pixels(self.value(x), "head_dim", "kv_seq")
        scores = pz.nx.nmap(jnp.dot)(q.untag("head_dim"), k.untag("head_dim"))
        scores = scores * (self.head_dim**-0.5)
        pattern = pz.nx.nmap(jax.nn.softmax)(scores.untag("kv_seq")).tag("kv_seq")
        pattern = self.hook_pattern(pattern, **side_inputs)
        z = pz.nx.nmap(jnp.dot)(pattern.untag("kv_seq"), v.untag("kv_seq"))
        # Channels of the output projection's input: head-major, as the heads were split.
        merge = lambda a: a.reshape(-1, height, width)  # noqa: E731  [heads*d, h, w]
        z = pz.nx.nmap(lambda a: merge(a.transpose(0, 2, 1)))(z.untag("heads", "seq", "head_dim"))
        return self.output(z.tag("channel", "height", "width"))


def _nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch's ``interpolate(mode="nearest")`` of ``[channel, h, w]`` to ``size``: output
    pixel i reads input floor(i * in / out)."""
    rows = np.floor(np.arange(size[0]) * x.shape[1] / size[0]).astype(int)
    cols = np.floor(np.arange(size[1]) * x.shape[2] / size[1]).astype(int)
    return x[:, rows][:, :, cols]


@pz.pytree_dataclass
class FusionAdapter(pz.nn.Layer):
    """The multi-scale fusion adapter: its input is a tuple of feature maps (the largest
    first); each smaller one is resized (nearest) to the largest grid, they are
    concatenated over channels, go through ``ffn``, are average-pooled to
    ``output_resolution`` and normalised. Output ``[batch, channel, height, width]``."""

    ffn: pz.nn.Layer
    norm: pz.nn.Layer
    output_resolution: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, maps: tuple[pz.nx.NamedArray, ...], **side_inputs: Any) -> pz.nx.NamedArray:
        size = (maps[0].named_shape["height"], maps[0].named_shape["width"])
        resized = [
            pz.nx.nmap(lambda a: _nearest(a, size))(m.untag("channel", "height", "width"))
            for m in maps
        ]
        x = pz.nx.nmap(lambda *a: jnp.concatenate(a))(*resized).tag("channel", "height", "width")
        x = self.ffn(x, **side_inputs)
        out = self.output_resolution
        if size != (out, out):
            if size[0] % out or size[1] % out:
                raise NotImplementedError(
                    f"The fused grid is {size[0]}x{size[1]}, not a multiple of "
                    f"msfa_output_resolution = {out} (timm resizes bilinearly then; gemmalens "
                    "pools only): use images whose side is a multiple of 16 * "
                    f"{out} pixels."
                )
            ph, pw = size[0] // out, size[1] // out

            def pool(a: jax.Array) -> jax.Array:
                return a.reshape(a.shape[0], out, ph, out, pw).mean(axis=(2, 4))

            x = pz.nx.nmap(pool)(x.untag("channel", "height", "width"))
            x = x.tag("channel", "height", "width")
        return self.norm(x, **side_inputs)


@pz.pytree_dataclass
class MobileNetV5Tower(pz.nn.Layer):
    """MobileNetV5 with the fusion adapter: pixel values ``[batch, channel, height, width]``
    (named) -> fused features ``[batch, channel = hidden_size, R, R]`` (``vision.hook_fused``;
    R = ``msfa_output_resolution``).

    Attributes:
      stem: the first convolution, norm and GELU (``vision.conv_stem.hook_out``).
      stages: one `pz.nn.Sequential` of blocks per stage.
      msfa: the `FusionAdapter`, reading the maps numbered ``fused_maps`` (0 the stem).
      hook_fused: the adapter's output.
    """

    stem: pz.nn.Layer
    stages: tuple[pz.nn.Layer, ...]
    msfa: FusionAdapter
    hook_fused: HookPoint
    fused_maps: tuple[int, ...] = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, pixels: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        x = self.stem(pixels, **side_inputs)
        maps = [x]
        for stage in self.stages:
            x = stage(x, **side_inputs)
            maps.append(x)
        fused = self.msfa(tuple(maps[i] for i in self.fused_maps), **side_inputs)
        return self.hook_fused(fused, **side_inputs)


# ---------------------------------------------------------------------------- builders


def _norm(params: ParamBuilder, name: str, channels: int, eps: float) -> RMSNorm:
    return RMSNorm.build(params, name, "channel", channels, eps, "plain")


def _conv_norm(
    params: ParamBuilder,
    name: str,
    channels: int,
    out: int,
    kernel: int,
    eps: float,
    stride: int = 1,
    groups: int = 1,
    act: bool = True,
) -> pz.nn.Sequential:
    """timm's ``ConvNormAct``: ``{name}.conv`` and ``{name}.bn`` (an RMS norm)."""
    scope = params.scope(name)
    layers = [
        Conv2d.build(scope, "conv", channels, out, kernel, stride, groups),
        _norm(scope, "bn", out, eps),
    ]
    return pz.nn.Sequential(layers + ([pz.nn.Elementwise(_gelu)] if act else []))


def _maybe_residual(body: list[pz.nn.Layer], skip: bool) -> pz.nn.Layer:
    return pz.nn.Residual(pz.nn.Sequential(body)) if skip else pz.nn.Sequential(body)


def _edge_residual(
    params: ParamBuilder, spec: BlockSpec, channels: int, eps: float
) -> list[pz.nn.Layer]:
    mid = make_divisible(channels * spec.expansion)
    body = [
        Conv2d.build(params, "conv_exp", channels, mid, spec.kernel, spec.stride),
        _norm(params, "bn1", mid, eps),
        pz.nn.Elementwise(_gelu),
        Conv2d.build(params, "conv_pwl", mid, spec.out_channels, 1),
        _norm(params, "bn2", spec.out_channels, eps),
    ]
    return [_maybe_residual(body, channels == spec.out_channels and spec.stride == 1)]


def _inverted_residual(
    params: ParamBuilder,
    spec: BlockSpec,
    channels: int,
    eps: float,
    skip_allowed: bool = True,
    layer_scale: bool = True,
) -> list[pz.nn.Layer]:
    mid = make_divisible(channels * spec.expansion)
    body = []
    if spec.start_kernel:
        stride = 1 if spec.kernel else spec.stride
        body.append(
            _conv_norm(
                params, "dw_start", channels, channels, spec.start_kernel, eps, stride,
                groups=channels, act=False,
            )
        )  # fmt: skip
    body.append(_conv_norm(params, "pw_exp", channels, mid, 1, eps))
    if spec.kernel:
        body.append(_conv_norm(params, "dw_mid", mid, mid, spec.kernel, eps, spec.stride, mid))
    body.append(_conv_norm(params, "pw_proj", mid, spec.out_channels, 1, eps, act=False))
    if layer_scale:
        gamma = params("layer_scale.gamma", {"channel": spec.out_channels}, init="ones")
        body.append(LayerScale(gamma=gamma))
    skip = skip_allowed and channels == spec.out_channels and spec.stride == 1
    return [_maybe_residual(body, skip)]


def _attention_block(
    params: ParamBuilder, spec: BlockSpec, channels: int, eps: float
) -> list[pz.nn.Layer]:
    if spec.stride != 1:
        raise ValueError("mqa blocks with a stride (query pooling) are not built by gemmalens.")
    attn = params.scope("attn")

    def key_or_value(name: str) -> pz.nn.Sequential:
        scope = attn.scope(name)
        layers = []
        if spec.kv_stride > 1:
            layers += [
                Conv2d.build(
                    scope, "down_conv", channels, channels, spec.kernel, spec.kv_stride, channels
                ),
                _norm(scope, "norm", channels, eps),
            ]
        layers.append(Conv2d.build(scope, "proj", channels, spec.head_dim, 1))
        return pz.nn.Sequential(layers)

    inner = spec.heads * spec.head_dim
    mixer = MultiQueryAttention2d(
        query=Conv2d.build(attn.scope("query"), "proj", channels, inner, 1),
        key=key_or_value("key"),
        value=key_or_value("value"),
        output=Conv2d.build(attn.scope("output"), "proj", inner, spec.out_channels, 1),
        hook_pattern=attn.hook("hook_pattern", ("batch", "heads", "seq", "kv_seq")),
        heads=spec.heads,
        head_dim=spec.head_dim,
    )
    gamma = params("layer_scale.gamma", {"channel": spec.out_channels}, init="ones")
    body = [_norm(params, "norm", channels, eps), mixer, LayerScale(gamma=gamma)]
    return [_maybe_residual(body, channels == spec.out_channels)]


_BLOCKS = {"er": _edge_residual, "uir": _inverted_residual, "mqa": _attention_block}


def build_tower(params: ParamBuilder, config: MobileNetV5Config) -> MobileNetV5Tower:
    """The tower, parameters and hook points under ``params`` (``vision.``)."""
    eps = config.rms_norm_eps
    stem = params.scope("conv_stem")
    stem_size = config.stem_size
    if config.channel_multiplier > 1.0:  # timm rounds the stem only when widening
        stem_size = make_divisible(stem_size * config.channel_multiplier)
    channels = stem_size
    widths = [channels]
    stem_layer = pz.nn.Sequential(
        [
            Conv2d.build(stem, "conv", config.num_channels, channels, 3, 2, bias=True),
            _norm(stem, "bn", channels, eps),
            pz.nn.Elementwise(_gelu),
            stem.hook("hook_out", PIXEL_AXES),
        ]
    )
    stages = []
    for j, specs in enumerate(config.blocks):
        blocks = []
        for k, spec in enumerate(specs):
            scope = params.scope(f"stages.{j}.blocks.{k}")
            layers = _BLOCKS[spec.kind](scope, spec, channels, eps)
            blocks.append(
                pz.nn.NamedGroup(f"block_{j}_{k}", [*layers, scope.hook("hook_out", PIXEL_AXES)])
            )
            channels = spec.out_channels
        stages.append(pz.nn.Sequential(blocks))
        widths.append(channels)
    fused_in = sum(widths[i] for i in config.fused_maps)
    msfa = params.scope("msfa")
    ffn = BlockSpec("uir", config.hidden_size, expansion=config.msfa_expansion)
    adapter = FusionAdapter(
        ffn=_inverted_residual(msfa.scope("ffn"), ffn, fused_in, eps, False, False)[0],
        norm=_norm(msfa, "norm", config.hidden_size, eps),
        output_resolution=config.msfa_output_resolution,
    )
    return MobileNetV5Tower(
        stem=stem_layer,
        stages=tuple(stages),
        msfa=adapter,
        hook_fused=params.hook("hook_fused", PIXEL_AXES),
        fused_maps=config.fused_maps,
    )


def hf_name(label: str, prefix: str = HUB_TOWER_PREFIX) -> str:
    """``vision.stages.2.blocks.9.attn.key.proj.kernel`` ->
    ``{prefix}blocks.2.9.attn.key.proj.weight``."""
    name = label.removeprefix("vision.")
    name = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"blocks.\1.\2.", name)
    return prefix + re.sub(r"\.(kernel|scale)$", ".weight", name)


def tokens_from_fused(fused: pz.nx.NamedArray, hidden_size: int) -> pz.nx.NamedArray:
    """``[batch, channel, h, w]`` -> ``[batch, image_token, embedding]`` (row-major pixels),
    times sqrt(hidden_size) as ``Gemma3nModel.get_image_features`` scales them."""
    flat = pz.nx.nmap(lambda a: a.reshape(a.shape[0], -1).T)(
        fused.untag("channel", "height", "width")
    )
    return flat.tag("image_token", "embedding") * math.sqrt(hidden_size)


def pixel_array(pixel_values: Any, config: MobileNetV5Config) -> np.ndarray:
    """The pixel values as float32 ``[image, channel, size, size]``, checked: square images
    whose fused grid is ``msfa_output_resolution`` (or a multiple of it)."""
    if isinstance(pixel_values, Mapping) and "pixel_values" in pixel_values:
        pixel_values = pixel_values["pixel_values"]  # a processor's output
    pixels = np.asarray(pixel_values)
    channels, out = config.num_channels, config.msfa_output_resolution
    reduction = 2 ** (1 + sum(b.stride > 1 for s in config.blocks[:-1] for b in s))
    side = reduction * out
    expected = (
        f"[num_images, {channels}, H, W] (channels first) with H = W a multiple of {side} "
        f"pixels ({config.image_size} in the released models, as Gemma3nProcessor makes them)"
    )
    if pixels.ndim == 3 and pixels.shape[0] == channels:
        raise ValueError(
            f"pixel_values has shape {pixels.shape}, one image without its image axis; the "
            f"model takes {expected}: use pixel_values[None]."
        )
    shape_ok = pixels.ndim == 4 and pixels.shape[1] == channels and 0 not in pixels.shape
    if not shape_ok or pixels.shape[2] != pixels.shape[3] or pixels.shape[2] % side:
        raise ValueError(f"pixel_values must be {expected}; got shape {pixels.shape}.")
    if not np.issubdtype(pixels.dtype, np.floating):
        raise TypeError(f"pixel_values must be floats, got dtype {pixels.dtype}.")
    return pixels.astype(np.float32)


def from_state_dict(
    config: MobileNetV5Config,
    arrays: Mapping[str, np.ndarray],
    dtype: Any = jnp.float32,
    prefix: str = "",
) -> MobileNetV5Tower:
    """The tower read from in-memory tensors under timm's names (a bare timm model's
    ``state_dict()`` has no prefix), every tensor checked first."""
    from gemmalens.checkpoints.mapped import MappedCheckpoint
    from gemmalens.checkpoints.parameters import build_from_checkpoint

    ckpt = MappedCheckpoint.from_arrays(arrays)
    return build_from_checkpoint(
        ckpt,
        config.build,
        lambda label: hf_name(label, prefix),
        dtype,
        ignore=lambda key: not key.startswith(prefix),
        show_progress=False,
    )


def stage_outputs(names: Sequence[str]) -> list[str]:
    """The hook names of each stage's last block, in order (per-stage hidden states)."""
    last: dict[str, str] = {}
    for name in names:
        match = re.fullmatch(r"(vision\.stages\.\d+)\.blocks\.\d+\.hook_out", name)
        if match:
            last[match.group(1)] = name
    return list(last.values())
