"""`RoutingViewer`: which experts a Gemma 4 MoE layer sends each token to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import traitlets
from matplotlib.figure import Figure

from gemmalens.widgets import _figures
from gemmalens.widgets._base import (
    LayerViewer,
    batch_row,
    check_choice,
    ids_of,
    options_list,
    require_hook_points,
    require_layers,
    token_labels,
    tokenizer_of,
)

LOGITS_HOOK = "blocks.{layer}.moe.hook_router_logits"
WEIGHTS_HOOK = "blocks.{layer}.moe.hook_expert_weights"
INDICES_HOOK = "blocks.{layer}.moe.hook_expert_indices"
SHOWN = {"weights": "expert weight", "probabilities": "router probability"}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64 for accuracy."""
    shifted = np.asarray(logits, np.float64) - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class RoutingViewer(LayerViewer):
    """Mixture-of-experts routing (Gemma 4 26B-A4B): token x expert weights per layer.

    Each MoE layer's router scores every expert for every token
    (``blocks.{i}.moe.hook_router_logits``), keeps the top k
    (``hook_expert_indices``) and weighs them (``hook_expert_weights``, zero elsewhere).
    The viewer shows the token x expert heatmap of the weights (or the router's
    probabilities), a bar chart of each expert's load (how many tokens chose it) and
    the experts of a hovered or clicked token.

    Build it from a cache of an MoE model::

        names = ["blocks.*.moe.hook_router_logits", "blocks.*.moe.hook_expert_weights",
                 "blocks.*.moe.hook_expert_indices"]
        logits, cache = m.run_with_cache(tokens, names=names)
        viewer = RoutingViewer(cache, tokens)

    or ``RoutingViewer.from_model(m, "Some text")``.

    Traitlets (synced):
      layer: the layer shown.
      show: ``"weights"`` or ``"probabilities"`` (the heatmap's values).
      selected_token: the token whose experts are listed (-1: none).
      weights: ``[pos][expert]`` expert weights of ``layer`` (0 for unused experts).
      probabilities: ``[pos][expert]`` softmax of the router logits.
      chosen: ``[pos][k]`` the chosen experts, most probable first.
      load: ``[expert]`` how many tokens chose each expert.
      load_weight: ``[expert]`` the sum of each expert's weights over the tokens.
    """

    css_class = "gemmalens-routing"

    show = traitlets.Unicode("weights").tag(sync=True)
    weights = traitlets.List().tag(sync=True)
    probabilities = traitlets.List().tag(sync=True)
    chosen = traitlets.List().tag(sync=True)
    load = traitlets.List().tag(sync=True)
    load_weight = traitlets.List().tag(sync=True)

    _data_controls = ("layer",)

    def __init__(
        self,
        cache: Mapping[str, Any],
        tokens: Any = None,
        *,
        tokenizer: Any = None,
        layer: int | None = None,
        show: str = "weights",
        batch: int = 0,
        selected_token: int = -1,
        embed_html: bool = True,
    ):
        """
        Args:
          cache: an `ActivationCache` of an MoE model holding the three
            ``blocks.{i}.moe.hook_*`` routing values for at least one layer.
          tokens: the token ids of the cache (or labels); None labels positions by number.
          tokenizer: decodes the ids (default: the cache's model's tokenizer).
          layer, show, selected_token: what is shown first.
          batch: which batch row to show.
          embed_html: add the static `to_html` copy to the notebook output.
        """
        hooks = [LOGITS_HOOK, WEIGHTS_HOOK, INDICES_HOOK]
        layers = require_layers(
            cache, hooks, "RoutingViewer (MoE models only)", [h.format(layer="*") for h in hooks]
        )
        self._layers = layers
        self._routing = {}
        for i in layers:
            logits = batch_row(cache[LOGITS_HOOK.format(layer=i)], batch, LOGITS_HOOK)
            self._routing[i] = {
                "probabilities": softmax(logits).astype(np.float32),
                "weights": batch_row(cache[WEIGHTS_HOOK.format(layer=i)], batch, WEIGHTS_HOOK),
                "chosen": np.asarray(cache[INDICES_HOOK.format(layer=i)])[batch].astype(int),
            }
        positions, experts = self._routing[layers[0]]["weights"].shape
        self._experts = experts
        labels = token_labels(tokens, tokenizer_of(cache, tokenizer), batch, positions)
        top_k = self._routing[layers[0]]["chosen"].shape[-1]
        super().__init__(
            embed_html=embed_html,
            view="routing",
            title="Mixture-of-experts routing",
            tokens=labels,
            options={
                "layer": options_list(layers),
                "show": [[key, text] for key, text in SHOWN.items()],
            },
            note=f"{experts} experts, {top_k} chosen per token (the non-zero weights).",
            layer=layers[0] if layer is None else layer,
            show=show,
            selected_token=selected_token,
        )

    @classmethod
    def from_model(cls, m: Any, tokens: Any, **kwargs: Any) -> RoutingViewer:
        """Runs ``m`` on ``tokens`` (text or ids) capturing only the routing hooks, and
        builds the viewer."""
        require_hook_points(
            m,
            LOGITS_HOOK,
            "RoutingViewer",
            "a mixture-of-experts model's routing (Gemma 4 26B-A4B, the gemma4_moe teaching model)",
        )
        ids = ids_of(m, tokens)
        names = [h.format(layer="*") for h in (LOGITS_HOOK, WEIGHTS_HOOK, INDICES_HOOK)]
        _, cache = m.run_with_cache(ids, names=names)
        return cls(cache, ids, **kwargs)

    @traitlets.validate("show")
    def _check_show(self, proposal: Any) -> str:
        return check_choice("show", proposal["value"], list(SHOWN))

    def routing(self, layer: int | None = None) -> dict[str, np.ndarray]:
        """``{"probabilities", "weights": [pos, expert], "chosen": [pos, k]}`` of ``layer``."""
        layer = self.layer if layer is None else check_choice("layer", layer, self._layers)
        return dict(self._routing[layer])

    def _compute(self, controls: Mapping[str, Any]) -> dict[str, Any]:
        routing = self._routing[controls["layer"]]
        chosen = routing["chosen"]
        return {
            "weights": routing["weights"],
            "probabilities": routing["probabilities"],
            "chosen": chosen,
            "load": np.bincount(chosen.reshape(-1), minlength=self._experts),
            "load_weight": routing["weights"].sum(axis=0),
        }

    def top_experts(self, token: int, k: int | None = None) -> list[dict[str, Any]]:
        """The experts of position ``token`` in the current layer, most probable first:
        ``[{"expert", "probability", "weight", "chosen"}]`` (default: the chosen ones)."""
        routing = self._routing[self.layer]
        chosen = routing["chosen"][token]
        k = len(chosen) if k is None else k
        order = np.argsort(-routing["probabilities"][token], kind="stable")[:k]
        return [
            {
                "expert": int(e),
                "probability": float(routing["probabilities"][token, e]),
                "weight": float(routing["weights"][token, e]),
                "chosen": bool(e in chosen),
            }
            for e in order
        ]

    def figure(self, figsize: tuple[float, float] | None = None, cmap: str = "Blues") -> Figure:
        """The current layer as a matplotlib figure: the token x expert heatmap (chosen
        experts marked) and each expert's load."""
        data = self._compute({"layer": self.layer})
        values = data[self.show]
        positions, experts = values.shape
        width, height = _figures.fitted_size(experts, positions + 4, cell=0.26)
        figure = _figures.new_figure(width, height, figsize=figsize)
        top, bottom = figure.subplots(
            2, 1, sharex=True, height_ratios=[max(positions, 4), max(2.5, positions / 4)]
        )
        image = top.imshow(values, cmap=cmap, vmin=0.0, aspect="auto", interpolation="nearest")
        rows, columns = np.nonzero(_chosen_mask(data["chosen"], experts))
        top.scatter(columns, rows, s=6, c="#d62728", marker="o", label="chosen")
        if self.selected_token >= 0:
            top.axhline(self.selected_token, color="#d62728", linewidth=0.8, alpha=0.6)
        _figures.tick_labels(top, self.tokens, "y")
        top.set_ylabel("token")
        top.set_title(f"Layer {self.layer}: {SHOWN[self.show]} per token and expert", fontsize=10)
        top.legend(loc="upper right", fontsize=7, markerscale=1.5, framealpha=0.9)
        # The colour bar spans both panels so that their expert columns line up.
        figure.colorbar(image, ax=[top, bottom], label=SHOWN[self.show], shrink=0.6)
        bottom.bar(np.arange(experts), data["load"], color="#4a98c9")
        bottom.set_ylabel("tokens")
        bottom.set_xlabel("expert")
        bottom.set_title("Expert load (tokens that chose each expert)", fontsize=10)
        bottom.grid(axis="y", alpha=0.3)
        step = max(1, experts // 32)
        bottom.set_xticks(np.arange(0, experts, step))
        return figure


def _chosen_mask(chosen: np.ndarray, experts: int) -> np.ndarray:
    """``[pos, expert]`` True where the expert is among the token's chosen ones."""
    mask = np.zeros((chosen.shape[0], experts), bool)
    np.put_along_axis(mask, chosen, True, axis=1)
    return mask
