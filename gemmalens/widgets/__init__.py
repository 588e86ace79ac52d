"""Interactive viewers for notebooks, each with a static twin.

Every viewer is an `anywidget.AnyWidget` built from a `run_with_cache` result (or, for
`PatchingViewer`, from `gemmalens.patching.sweep` results; `FeatureViewer` runs the model
itself, over a corpus):

* `AttentionViewer`: attention patterns per layer and head, sliding windows visible;
* `AltUpViewer`: Gemma 3n's AltUp streams, predicted vs corrected;
* `RoutingViewer`: Gemma 4 mixture-of-experts routing;
* `LogitLensViewer`: the top token each layer predicts;
* `PatchingViewer`: activation patching heatmaps;
* `ImageAttentionViewer`: where a text token looks in an image, drawn over the image,
  and the vision tower's patch-to-patch attention;
* `AudioAttentionViewer`: where a text token listens in an audio clip, on the clip's time
  axis under its spectrogram, and the audio tower's frame-to-frame (local) attention;
* `FeatureViewer`: a sparse autoencoder's or transcoder's features: top activating
  examples, activation histogram and logit effects of each, and the strongest features at
  each token of a prompt.

In Jupyter a viewer shows as a live widget; ``viewer.to_html()`` is a self-contained
interactive copy (no kernel, no network), which is also what nbconvert and the docs show;
``viewer.figure()`` is a static matplotlib figure of the current state.
"""

from gemmalens.widgets._base import Viewer, ViewerError
from gemmalens.widgets.altup import AltUpViewer
from gemmalens.widgets.attention import AttentionViewer
from gemmalens.widgets.audio_attention import AudioAttentionViewer
from gemmalens.widgets.features import FeatureViewer
from gemmalens.widgets.image_attention import ImageAttentionViewer
from gemmalens.widgets.logit_lens import LogitLensViewer
from gemmalens.widgets.patching import PatchingViewer
from gemmalens.widgets.routing import RoutingViewer

__all__ = [
    "AltUpViewer",
    "AudioAttentionViewer",
    "AttentionViewer",
    "FeatureViewer",
    "ImageAttentionViewer",
    "LogitLensViewer",
    "PatchingViewer",
    "RoutingViewer",
    "Viewer",
    "ViewerError",
]
