"""The D2L convolutional networks, their registry, shape summaries and the seed's primitives.

A leaf package: it imports torch only.
"""

from models.errors import (
    ArchError,
    DuplicateModelError,
    ModelError,
    ShapeError,
    UnknownModelError,
)
from models.lenet import LeNet, lenet
from models.registry import (
    CLASSES,
    ModelEntry,
    build_model,
    get_model_entry,
    list_models,
    register_model,
)
from models.resnet import RESNET18_ARCH, Residual, ResNet, resnet18
from models.summary import LayerRow, Summary, summarize, summarize_module
from models.vgg import VGG, VGG_11, VGG_SMALL, vgg, vgg_block

__all__ = [
    "CLASSES",
    "RESNET18_ARCH",
    "VGG",
    "VGG_11",
    "VGG_SMALL",
    "ArchError",
    "DuplicateModelError",
    "LayerRow",
    "LeNet",
    "ModelEntry",
    "ModelError",
    "ResNet",
    "Residual",
    "ShapeError",
    "Summary",
    "UnknownModelError",
    "build_model",
    "get_model_entry",
    "lenet",
    "list_models",
    "register_model",
    "resnet18",
    "summarize",
    "summarize_module",
    "vgg",
    "vgg_block",
]
