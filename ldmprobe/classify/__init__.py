"""When does an ImageNet classifier recognise the prompted object? Per-step decoding + VGG-16.

`imagenet.py` the class names and target lookup, `weights.py` VGG-16 and its preprocessing,
`decoders.py` the VAE / tiny decoder, `runner.py` the per-step runner and its results,
`figure.py` the study's figure.
"""

from .decoders import DEFAULT_TINY_DECODER, LatentDecoder, load_tiny_decoder, make_decoder
from .figure import curve_classes, plot_classification
from .imagenet import (
    ClassifyError,
    ClassInfo,
    ClassSet,
    ImageNetClass,
    UnknownClassError,
    imagenet_class,
    imagenet_classes,
)
from .runner import (
    CONFIDENCE,
    MAX_TOP_K,
    Classification,
    ClassifyResponse,
    ClassScore,
    StepClassifier,
    StepPrediction,
    first_steps,
)
from .weights import (
    CAFFE_BGR_MEAN,
    DEFAULT_CLASSIFIER,
    PREPROCESSINGS,
    RANDOM,
    SCENES_CLASSIFIER,
    VGG_ARCH,
    ImageClassifier,
    WeightsSourceError,
    _timm_vgg_names,
    load_classifier,
    load_vgg16,
)

__all__ = ["CAFFE_BGR_MEAN", "CONFIDENCE", "DEFAULT_CLASSIFIER", "PREPROCESSINGS", "DEFAULT_TINY_DECODER", "MAX_TOP_K", "RANDOM", "SCENES_CLASSIFIER", "VGG_ARCH",
           "Classification", "ClassInfo", "ClassSet", "ClassScore", "ClassifyError", "ClassifyResponse", "ImageClassifier",
           "ImageNetClass", "LatentDecoder", "StepClassifier", "StepPrediction", "UnknownClassError",
           "WeightsSourceError", "_timm_vgg_names", "curve_classes", "first_steps", "imagenet_class",
           "imagenet_classes", "load_classifier", "load_tiny_decoder", "load_vgg16", "make_decoder", "plot_classification"]
