"""The D2L convolutional networks, their registry, shape summaries and the seed's primitives.

A leaf package: it imports torch only.
"""

from models.alexnet import AlexNet, alexnet
from models.bn_lenet import BNLeNet, bn_lenet
from models.densenet import DENSENET_BOOK, DenseBlock, DenseNet, DenseNetArch, densenet
from models.errors import (
    ArchError,
    DuplicateModelError,
    ModelError,
    ShapeError,
    UnknownModelError,
)
from models.googlenet import GoogleNet, Inception, googlenet
from models.lenet import LeNet, lenet
from models.nin import NiN, nin, nin_block
from models.registry import (
    CLASSES,
    Arch,
    ArchInput,
    ArchJSON,
    ModelEntry,
    build_model,
    get_model_entry,
    list_models,
    register_model,
)
from models.regnet import REGNETX32, AnyNet, AnyNetArch, ResNeXtBlock, regnetx32
from models.resnet import RESNET18_ARCH, Residual, ResNet, resnet18
from models.summary import LayerRow, Summary, min_input_size, summarize, summarize_module
from models.vgg import VGG, VGG_11, VGG_SMALL, vgg, vgg_block

__all__ = [
    "CLASSES",
    "DENSENET_BOOK",
    "REGNETX32",
    "RESNET18_ARCH",
    "VGG",
    "VGG_11",
    "VGG_SMALL",
    "AlexNet",
    "AnyNet",
    "AnyNetArch",
    "Arch",
    "ArchError",
    "ArchInput",
    "ArchJSON",
    "BNLeNet",
    "DenseBlock",
    "DenseNet",
    "DenseNetArch",
    "DuplicateModelError",
    "GoogleNet",
    "Inception",
    "LayerRow",
    "LeNet",
    "ModelEntry",
    "ModelError",
    "NiN",
    "ResNeXtBlock",
    "ResNet",
    "Residual",
    "ShapeError",
    "Summary",
    "UnknownModelError",
    "alexnet",
    "bn_lenet",
    "build_model",
    "densenet",
    "get_model_entry",
    "googlenet",
    "lenet",
    "list_models",
    "min_input_size",
    "nin",
    "nin_block",
    "register_model",
    "regnetx32",
    "resnet18",
    "summarize",
    "summarize_module",
    "vgg",
    "vgg_block",
]
