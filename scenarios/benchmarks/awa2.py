"""``awa2``: Animals with Attributes 2 (modnet gzsl only), Xian et al.'s proposed split. ``benchmark.path`` is an xlsa17
folder (res101.mat ResNet-101 features + att_splits.mat) or the image release, embedded once by a torchvision
ResNet from local weights (``benchmark.resnet.*``). Features only: explain (Grad-CAM) cannot use it.
"""
from __future__ import annotations

from scenarios.benchmarks._xlsa17 import check_release_path
from scenarios.registry import register_benchmark

NAME = "awa2"


@register_benchmark(NAME, commands=("gzsl",), order=20,
                    description="AwA2: zero-shot image features, no images",
                    keys={"gzsl": ("path", "backbone_features", "hidden", "attributes", "resnet")})
class Awa2:
    @staticmethod
    def check(bcfg, command):
        check_release_path(NAME, bcfg.get("path"))

    @staticmethod
    def zero_shot(path=None, **options):
        from scenarios.zsl import load_awa2_images, load_xlsa17_or_release

        return load_xlsa17_or_release(NAME, path, load_awa2_images, **options)
