"""Model zoo: CIFAR ResNets, CIFAR VGG-16-BN, a small digits CNN and a timm-style registry.

Build any model by name with :func:`create_model`; list names with :func:`available_models`.
"""

from .cifar_resnet import BasicBlock, CifarResNet, cifar_resnet, resnet20, resnet32, resnet56, resnet110
from .digits_cnn import DigitsCNN, digits_cnn
from .registry import TORCHVISION_PREFIX, available_models, create_model, register_model
from .vgg import VGG16_CFG, CifarVGG, vgg16_bn

register_model("resnet20")(resnet20)
register_model("resnet32")(resnet32)
register_model("resnet56")(resnet56)
register_model("resnet110")(resnet110)
register_model("vgg16_bn_cifar")(vgg16_bn)
register_model("digits_cnn")(digits_cnn)

__all__ = [
    "TORCHVISION_PREFIX",
    "VGG16_CFG",
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "DigitsCNN",
    "available_models",
    "cifar_resnet",
    "create_model",
    "digits_cnn",
    "register_model",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "vgg16_bn",
]
