"""`ImageAttentionViewer`: where a text token looks in an image, drawn over the image, and
where the vision tower's patches look among themselves."""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import traitlets
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from gemmalens.widgets import _figures
from gemmalens.widgets._base import (
    MEAN_HEAD,
    Viewer,
    check_choice,
    check_head,
    layers_with,
    options_list,
    select_head,
    token_labels,
    tokenizer_of,
)

# The text patterns whose keys hold the image tokens, by kind of model.
TEXT_PATTERN = "blocks.{layer}.attn.hook_pattern"
# T5Gemma 2's images are in the encoder: the decoder's cross part reads them.
CROSS_PATTERN = "decoder.blocks.{layer}.attn.hook_cross_pattern"
SOURCES = {"text": "text token -> image", "vision": "image patch -> image patch"}
# The image is drawn at most this many pixels wide and high (it is an inline PNG).
DISPLAY_PIXELS = 256


def _vision_template(cache: Mapping[str, Any]) -> str | None:
    """``vision.blocks.{layer}.attn.hook_pattern`` under the prefix the cache uses
    (``encoder.`` for T5Gemma 2), or None without the tower's patterns."""
    for name in cache:
        found = re.match(r"^(.*vision\.)blocks\.\d+\.attn\.hook_pattern$", str(name))
        if found:
            return found.group(1) + "blocks.{layer}.attn.hook_pattern"
    return None


def display_image(image: Any, pixels: int = DISPLAY_PIXELS) -> np.ndarray:
    """One image as ``[H, W, 3]`` uint8 for display, at most ``pixels`` on a side.

    ``image``: model input (``[3, H, W]`` floats normalised to [-1, 1], as Gemma 3's and
    T5Gemma 2's processors give ``pixel_values``), an ``[H, W, 3]`` array, a PIL image or a
    file path."""
    import PIL.Image

    from gemmalens.vision.preprocess import load_image

    array = np.asarray(image) if not isinstance(image, (str, bytes)) else None
    if array is not None and array.ndim == 3 and array.shape[0] == 3 and array.dtype.kind == "f":
        # Normalised model input (mean = std = 0.5): back to 0..255.
        rgb = np.clip((array.transpose(1, 2, 0) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    else:
        rgb = load_image(image)
    height, width = rgb.shape[:2]
    scale = min(1.0, pixels / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = np.asarray(PIL.Image.fromarray(rgb).resize(size, PIL.Image.Resampling.BICUBIC))
    return rgb


def gemma4_pictures(images: Mapping[str, Any]) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Gemma 4's processor output (`gemmalens.vision.preprocess_gemma4`) back to images:
    each image's real patches put back at their (x, y) places, ``[H, W, 3]`` uint8, and its
    patch grid ``(rows, cols)``."""
    pixels = np.asarray(images["pixel_values"], np.float32)
    positions = np.asarray(images["image_position_ids"])
    pictures, grids = [], []
    for patches, places in zip(pixels, positions):
        real = (places >= 0).all(-1)
        cols, rows = (int(n) + 1 for n in places[real].max(axis=0))
        side = math.isqrt(patches.shape[-1] // 3)
        canvas = np.zeros((rows * side, cols * side, 3), np.float32)
        for patch, (x, y) in zip(patches[real], places[real]):
            canvas[y * side : (y + 1) * side, x * side : (x + 1) * side] = patch.reshape(
                side, side, 3
            )
        pictures.append(np.clip(canvas * 255.0, 0, 255).round().astype(np.uint8))
        grids.append((rows, cols))
    return pictures, grids


def png_data_url(rgb: np.ndarray) -> str:
    """``data:image/png;base64,...`` of an ``[H, W, 3]`` uint8 array."""
    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.fromarray(np.asarray(rgb, np.uint8)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid(count: int, grid: tuple[int, int] | None, what: str) -> tuple[int, int]:
    if grid is not None:
        rows, cols = (int(g) for g in grid)
        if rows * cols != count:
            raise ValueError(f"grid={grid} has {rows * cols} cells, but the {what} has {count}.")
        return rows, cols
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(
            f"The {what} has {count} tokens, not a square number: pass grid=(rows, cols)."
        )
    return side, side


class ImageAttentionViewer(Viewer):
    """Attention over an image, drawn as a heatmap on the image itself.

    Two sources (chosen when the viewer is built):

    * ``"text"``: pick a text token (click it), a layer and a head (or the mean over
      heads); each of the image's soft tokens is coloured by how much the token attends to
      it, over the part of the image the soft token pools (Gemma 3: 256 soft tokens, a
      16 x 16 grid over the 896 px image). The side panel gives the token's total attention
      on the image and its top cells. Captures ``blocks.{i}.attn.hook_pattern`` (T5Gemma 2:
      the decoder's cross part, ``decoder.blocks.{i}.attn.hook_cross_pattern``).
    * ``"vision"``: the tower's own patch-to-patch attention
      (``vision.blocks.{i}.attn.hook_pattern``): click a patch to see where it looks.

    Build it from a cache of a run with images::

        logits, cache = m.run_with_cache(tokens, pixel_values=pixels)
        viewer = ImageAttentionViewer(cache, tokens, pixels)          # text -> image
        viewer = ImageAttentionViewer(cache, tokens, pixels, source="vision")

    Traitlets (synced):
      layer, head: the layer and head shown (``head = -1``: the mean over heads).
      image: which image of the batch row (0 = the first).
      selected_token: the query token (text source), -1 for none.
      patch: the query patch (vision source); ``query_patch`` is the one shown (the last
        patch of an image whose grid is smaller).
      rows, cols: the grid of cells over the image.
      heat: text source ``[query][cell]`` attention of every token to each cell of the
        image; vision source ``[cell]`` attention of ``patch`` to each patch.
      share: text source ``[query]``: each token's total attention on the image.
      image_url: the image as an inline PNG.
      image_positions: text source: the token positions of the image's soft tokens.
    """

    css_class = "gemmalens-image-attention"

    source = traitlets.Unicode("text").tag(sync=True)
    layer = traitlets.Int(0).tag(sync=True)
    head = traitlets.Int(MEAN_HEAD).tag(sync=True)
    image = traitlets.Int(0).tag(sync=True)
    selected_token = traitlets.Int(-1).tag(sync=True)
    patch = traitlets.Int(0).tag(sync=True)
    query_patch = traitlets.Int(0).tag(sync=True)
    rows = traitlets.Int(1).tag(sync=True)
    cols = traitlets.Int(1).tag(sync=True)
    heat = traitlets.List().tag(sync=True)
    share = traitlets.List().tag(sync=True)
    image_url = traitlets.Unicode("").tag(sync=True)
    image_positions = traitlets.List().tag(sync=True)

    def __init__(
        self,
        cache: Mapping[str, Any],
        tokens: Any,
        images: Any,
        *,
        source: str = "text",
        image_token_id: int | None = None,
        tokenizer: Any = None,
        layer: int | None = None,
        head: int = MEAN_HEAD,
        image: int | None = None,
        selected_token: int = -1,
        patch: int = 0,
        batch: int = 0,
        grid: tuple[int, int] | None = None,
        decoder_tokens: Any = None,
        embed_html: bool = True,
    ):
        """
        Args:
          cache: an `ActivationCache` of a run with images holding the patterns of the
            source (see the class docstring).
          tokens: the token ids of the run (``[batch, seq]``), image placeholders included
            (T5Gemma 2: the encoder's tokens).
          images: what was shown to the model: its ``pixel_values`` (``[images, 3, H, W]``,
            normalised; Gemma 4: `preprocess_gemma4`'s result, whose patch positions also
            give each image's grid) or the original images (arrays, PIL images or paths),
            one per image placeholder run, in order over the batch.
          source: ``"text"`` or ``"vision"``.
          image_token_id: the placeholder id (default: the cache's model's config).
          tokenizer: decodes the ids (default: the cache's model's tokenizer).
          layer, head, image, selected_token, patch: what is shown first (``image``: the
            index of an image over the batch; default the first of the row).
          batch: which batch row (text source).
          grid: ``(rows, cols)`` of the image's soft tokens (text) or patches (vision)
            when they are not a square.
          decoder_tokens: T5Gemma 2: the decoder's tokens, the queries of the cross part.
          embed_html: add the static `to_html` copy to the notebook output.
        """
        if not isinstance(cache, Mapping):
            raise TypeError(
                "ImageAttentionViewer takes the ActivationCache of m.run_with_cache(tokens, "
                f"pixel_values=...), got {type(cache).__name__}."
            )
        check_choice("source", source, list(SOURCES))
        model = getattr(cache, "model", None)
        config = getattr(model, "config", None)
        ids = np.asarray(tokens)
        ids = ids[None] if ids.ndim == 1 else ids
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_id", None)
            if image_token_id is None:
                raise ValueError(
                    "Which token id marks image positions? Pass image_token_id=... (the "
                    "cache has no model config to read it from)."
                )
        from gemmalens.vision.merge import image_runs

        runs = image_runs(ids, image_token_id)
        if not runs:
            raise ValueError(
                f"The tokens hold no image placeholder (id {image_token_id}): build the prompt "
                "with the image's soft-token run (gl.vision.expand_gemma3_image_text)."
            )
        patch_grids = None
        if isinstance(images, Mapping) and "image_position_ids" in images:
            pictures, patch_grids = gemma4_pictures(images)
        else:
            pictures = list(images) if not isinstance(images, (str, bytes)) else [images]
        if len(pictures) != len(runs):
            raise ValueError(
                f"{len(pictures)} images given for {len(runs)} image placeholder runs in the "
                "tokens; pass one image per run, in order over the batch."
            )
        self._runs = runs
        self._pictures = pictures
        self._patch_grids = patch_grids
        self._display: dict[int, str] = {}
        if source == "text":
            self._init_text(cache, ids, decoder_tokens, batch, grid, model, tokenizer)
            labels = self._labels
            first_image = [i for i, run in enumerate(runs) if run[0] == batch]
            if not first_image:
                raise ValueError(f"Batch row {batch} holds no image.")
            images_shown = first_image
        else:
            self._init_vision(cache, grid)
            self._labels = labels = []
            images_shown = list(range(len(runs)))
        self._images = images_shown
        heads = self._heads
        note = (
            "Cells are the image's soft tokens; colour: attention of the chosen token."
            if source == "text"
            else "Cells are the vision tower's patches; colour: attention of the chosen patch."
        )
        super().__init__(
            embed_html=embed_html,
            view="image-attention",
            title="Where the text looks in the image"
            if source == "text"
            else "Patch-to-patch attention in the vision tower",
            tokens=labels,
            options={
                "layer": options_list(self._layers),
                "head": [[MEAN_HEAD, "mean"], *options_list(range(heads))],
                "image": options_list(images_shown, lambda i: f"image {i}"),
                "patch": options_list(range(max(self._cells.values()))),
            },
            note=note,
            source=source,
            layer=self._layers[0] if layer is None else layer,
            head=head,
            image=images_shown[0] if image is None else image,
            selected_token=selected_token,
            patch=patch,
        )

    # ------------------------------------------------------------------ setup

    def _init_text(self, cache, ids, decoder_tokens, batch, grid, model, tokenizer) -> None:
        template = TEXT_PATTERN
        if not layers_with(cache, template) and layers_with(cache, CROSS_PATTERN):
            template = CROSS_PATTERN
        layers = layers_with(cache, template)
        if not layers:
            raise KeyError(
                f"ImageAttentionViewer needs {TEXT_PATTERN.format(layer='{i}')!r} (or T5Gemma "
                f"2's {CROSS_PATTERN.format(layer='{i}')!r}) in the cache. Capture them with "
                "m.run_with_cache(tokens, names=['*blocks.*.attn.hook_pattern', ...], "
                "pixel_values=...)."
            )
        if not 0 <= batch < ids.shape[0]:
            raise ValueError(f"batch must be in [0, {ids.shape[0]}), got {batch}.")
        self._template, self._layers, self._batch = template, layers, batch
        sample = np.asarray(cache[template.format(layer=layers[0])])
        if sample.shape[-1] != ids.shape[1]:
            raise ValueError(
                f"The patterns have {sample.shape[-1]} keys but tokens has {ids.shape[1]} "
                "positions; pass the tokens of the run the cache comes from."
            )
        self._heads = sample.shape[1]
        queries = decoder_tokens if template == CROSS_PATTERN else ids
        self._labels = token_labels(queries, tokenizer_of(cache, tokenizer), batch, sample.shape[2])
        self._patterns = {
            i: np.asarray(np.asarray(cache[template.format(layer=i)])[batch], np.float32)
            for i in layers
        }
        self._grids = {}
        for image, (_, start, stop) in enumerate(self._runs):
            if self._patch_grids is None:
                self._grids[image] = _grid(stop - start, grid, "image's soft-token run")
            else:  # Gemma 4: the patch grid pooled k x k, k from the soft-token count
                rows, cols = self._patch_grids[image]
                kernel = math.isqrt(rows * cols // max(1, stop - start))
                self._grids[image] = _grid(
                    stop - start,
                    (rows // max(1, kernel), cols // max(1, kernel)),
                    f"soft-token run of image {image}",
                )
        self._cells = {image: r * c for image, (r, c) in self._grids.items()}

    def _init_vision(self, cache, grid) -> None:
        template = _vision_template(cache)
        if template is None:
            raise KeyError(
                "The vision source needs the tower's patterns, vision.blocks.{i}.attn."
                "hook_pattern, in the cache: capture them with m.run_with_cache(tokens, "
                "names=['*vision.blocks.*.attn.hook_pattern'], pixel_values=...)."
            )
        self._template = template
        self._layers = layers_with(cache, template)
        self._patterns = {
            i: np.asarray(cache[template.format(layer=i)], np.float32) for i in self._layers
        }
        sample = self._patterns[self._layers[0]]
        if sample.shape[0] != len(self._runs):
            raise ValueError(
                f"The tower's patterns hold {sample.shape[0]} images but the tokens "
                f"{len(self._runs)} image runs."
            )
        self._heads = sample.shape[1]
        if self._patch_grids is None:
            square = _grid(sample.shape[-1], grid, "vision tower's patch grid")
            self._grids = dict.fromkeys(range(len(self._runs)), square)
        else:  # Gemma 4: each image's real patches come first, row-major, then padding
            self._grids = dict(enumerate(self._patch_grids))
        self._cells = {image: r * c for image, (r, c) in self._grids.items()}

    # ------------------------------------------------------------------ controls

    @property
    def _data_controls(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.source == "text":
            return ("layer", "head", "image")
        return ("layer", "head", "image", "patch")

    @traitlets.validate("layer")
    def _check_layer(self, proposal: Any) -> int:
        return check_choice("layer", proposal["value"], self._layers)

    @traitlets.validate("head")
    def _check_head(self, proposal: Any) -> int:
        return check_head(proposal["value"], self._heads)

    @traitlets.validate("image")
    def _check_image(self, proposal: Any) -> int:
        return check_choice("image", proposal["value"], self._images)

    @traitlets.validate("patch")
    def _check_patch(self, proposal: Any) -> int:
        return check_choice("patch", proposal["value"], list(range(max(self._cells.values()))))

    @traitlets.validate("selected_token")
    def _check_selected(self, proposal: Any) -> int:
        return check_choice(
            "selected_token",
            proposal["value"],
            list(range(-1, len(self._labels) if self.source == "text" else 0)),
            " (-1: none)",
        )

    # ------------------------------------------------------------------ data

    def _pattern(self, layer: int, head: int) -> np.ndarray:
        return select_head(self._patterns[layer], head)

    def _image_url(self, image: int) -> str:
        if image not in self._display:
            self._display[image] = png_data_url(display_image(self._pictures[image]))
        return self._display[image]

    def image_attention(
        self, layer: int | None = None, head: int | None = None, image: int | None = None
    ) -> np.ndarray:
        """Text source: ``[query, rows, cols]`` attention of every query token to each of
        ``image``'s soft tokens. Vision source: ``[patch, rows, cols]`` attention of every
        patch to each patch of ``image``."""
        layer = self.layer if layer is None else check_choice("layer", layer, self._layers)
        head = self.head if head is None else head
        image = self.image if image is None else check_choice("image", image, self._images)
        pattern = self._pattern(layer, head)
        rows, cols = self._grids[image]
        if self.source == "text":
            _, start, stop = self._runs[image]
            cells = pattern[:, start:stop]
        else:
            cells = pattern[image][: rows * cols, : rows * cols]
        return cells.reshape(cells.shape[0], rows, cols)

    def _compute(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        heat = self.image_attention(controls["layer"], controls["head"], controls["image"])
        heat = heat.reshape(heat.shape[0], -1)
        rows, cols = self._grids[controls["image"]]
        data: dict[str, Any] = {
            "rows": rows,
            "cols": cols,
            "image_url": self._image_url(controls["image"]),
        }
        if self.source == "text":
            _, start, stop = self._runs[controls["image"]]
            data.update(heat=heat, share=heat.sum(axis=1), image_positions=list(range(start, stop)))
        else:
            # A patch past a smaller image's grid shows that image's last patch.
            patch = min(controls["patch"], rows * cols - 1)
            data.update(heat=heat[patch], share=[], image_positions=[], query_patch=patch)
        return data

    def _static_values(self) -> dict[str, list]:
        values = super()._static_values()
        values["image"] = list(self._images)
        return values

    # ------------------------------------------------------------------ figure

    def figure(self, figsize: tuple[float, float] | None = None, cmap: str = "magma") -> Figure:
        """The current state as a matplotlib figure: the image with the attention heatmap
        over it (text source: of ``selected_token``, else the last token)."""
        rgb = display_image(self._pictures[self.image])
        heat = self.image_attention()
        rows, cols = self._grids[self.image]
        if self.source == "text":
            query = self.selected_token if self.selected_token >= 0 else len(self._labels) - 1
            values = heat[query]
            what = f"token {query} {self._labels[query]!r}, {values.sum():.3f} on the image"
        else:
            query = min(self.patch, rows * cols - 1)
            values = heat[query]
            what = f"patch {query} (row {query // cols}, column {query % cols})"
        head = "mean over heads" if self.head == MEAN_HEAD else f"head {self.head}"
        figure = _figures.new_figure(5.4, 4.6, figsize=figsize)
        ax = figure.subplots()
        height, width = rgb.shape[:2]
        ax.imshow(rgb, extent=(0, width, height, 0))
        overlay = ax.imshow(
            values,
            cmap=cmap,
            alpha=0.6,
            vmin=0.0,
            extent=(0, width, height, 0),
            interpolation="nearest",
        )
        if self.source == "vision":
            cell_w, cell_h = width / cols, height / rows
            row, column = divmod(query, cols)
            corner = (column * cell_w, row * cell_h)
            ax.add_patch(
                Rectangle(corner, cell_w, cell_h, fill=False, edgecolor="#2ca02c", linewidth=2)
            )
        ax.set_axis_off()
        ax.set_title(f"Layer {self.layer}, {head}: {what}", fontsize=9)
        figure.colorbar(overlay, ax=ax, label="attention", shrink=0.8)
        return figure


__all__ = ["ImageAttentionViewer", "display_image", "gemma4_pictures", "png_data_url"]
