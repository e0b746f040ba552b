"""``cub``: Caltech-UCSD Birds-200-2011 (modnet gzsl only), Xian et al.'s proposed split. ``benchmark.path``
is an xlsa17 folder (res101.mat ResNet-101 features + att_splits.mat) or the image release, embedded once by a
torchvision ResNet from local weights (``benchmark.resnet.*``). Features only: explain (Grad-CAM) cannot use it.
"""
from __future__ import annotations

from scenarios.benchmarks._xlsa17 import check_release_path
from scenarios.registry import register_benchmark

NAME = "cub"


@register_benchmark(NAME, commands=("gzsl",), order=21,
                    description="CUB: zero-shot image features, no images",
                    keys={"gzsl": ("path", "backbone_features", "hidden", "attributes", "resnet")})
class Cub:
    @staticmethod
    def check(bcfg, command):
        check_release_path(NAME, bcfg.get("path"))

    @staticmethod
    def zero_shot(path=None, **options):
        from scenarios.zsl import load_cub_images, load_xlsa17_or_release

        return load_xlsa17_or_release(NAME, path, load_cub_images, **options)
