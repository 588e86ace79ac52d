"""Imports timm (the reference for Gemma 3n's MobileNetV5) where torchvision cannot be.

timm imports torchvision at module level, but this environment's CPU torch has no
matching torchvision: PyPI's build fails to import beside it ("operator torchvision::nms
does not exist") and installing one with pip replaces the CPU torch. Building
``timm.create_model("mobilenetv5_300m_enc")`` runs no torchvision code at all; only
``import timm`` needs these names to exist (timm 1.0.31):

- ``torchvision.ops.misc.FrozenBatchNorm2d`` (batch-norm freezing utilities),
- ``torchvision.models.feature_extraction.create_feature_extractor`` and
  ``get_graph_node_names`` (FX feature extraction),
- ``torchvision.datasets.*`` (dataset factories),
- ``torchvision.transforms.ToTensor`` (subclassed by ``timm.data``) and
  ``torchvision.transforms.functional.InterpolationMode`` (mode names in lookup tables).

`import_timm` puts stand-ins for exactly these names into ``sys.modules`` while timm is
imported, then takes them out again (so transformers' ``is_torchvision_available`` stays
False). Each stand-in raises when called or instantiated, so the stand-ins cannot change
any number; ``InterpolationMode`` is a plain enum of names. Nothing is stubbed when a
real torchvision imports.
"""

from __future__ import annotations

import enum
import importlib
import sys
import types

_MODULES = {
    "torchvision.ops.misc": ("FrozenBatchNorm2d",),
    "torchvision.models.feature_extraction": (
        "create_feature_extractor",
        "get_graph_node_names",
    ),
    "torchvision.datasets": (
        "CIFAR10",
        "CIFAR100",
        "MNIST",
        "KMNIST",
        "FashionMNIST",
        "ImageFolder",
        "Places365",
        "INaturalist",
        "QMNIST",
        "ImageNet",
    ),
    "torchvision.transforms": ("ToTensor",),
    "torchvision.transforms.functional": (),
}


class InterpolationMode(enum.Enum):
    """Names only: timm builds string lookup tables from these members."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _stand_in(module: str, name: str) -> type:
    def refuse(*args, **kwargs):
        raise RuntimeError(
            f"{module}.{name} is a test stand-in (tests/torchvision_shim.py): torchvision is "
            "not installed, and MobileNetV5 was not expected to use it."
        )

    # A class, since timm subclasses ToTensor and checks isinstance against
    # FrozenBatchNorm2d; calling or instantiating it raises.
    return type(name, (), {"__init__": refuse, "__call__": refuse})


def _stand_ins() -> dict[str, types.ModuleType]:
    modules: dict[str, types.ModuleType] = {}
    for path in ["torchvision", "torchvision.ops", "torchvision.models", *_MODULES]:
        module = types.ModuleType(path, "test stand-in (tests/torchvision_shim.py)")
        module.__path__ = []
        modules[path] = module
    for path, names in _MODULES.items():
        for name in names:
            setattr(modules[path], name, _stand_in(path, name))
    modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
    for path, module in modules.items():
        parent, _, child = path.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    return modules


def _real_torchvision() -> bool:
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # ImportError, or the RuntimeError of a mismatched build
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        return False


def import_timm() -> types.ModuleType:
    """``timm``, imported with the stand-ins if torchvision does not import (raises
    ImportError if timm itself is missing)."""
    if "timm" in sys.modules or _real_torchvision():
        return importlib.import_module("timm")
    stand_ins = _stand_ins()
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module("timm")
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
