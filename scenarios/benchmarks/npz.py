"""``npz``: a user's arrays in one ``.npz`` (numpy.savez), in every command; the file fixes the split.

cl: x_train (N, D) or (N, C, H, W), y_train, x_test, y_test (``scenarios.sources.load_npz_arrays``);
gzsl / explain: the same plus class_attributes and unseen_classes (``scenarios.zsl.load_npz_zsl``; explain
needs images).
"""
from __future__ import annotations

from scenarios.registry import register_benchmark

NAME = "npz"


@register_benchmark(NAME, commands=("cl", "gzsl", "explain"), order=1,
                    description="a user's arrays in one .npz file",
                    keys={"cl": ("path", "variant", "n_experiences", "class_order", "max_train_samples"),
                          "gzsl": ("path", "backbone_features", "hidden"),
                          "explain": ("path",)})
class Npz:
    @staticmethod
    def check(bcfg, command):
        """The path given and a file (its arrays are checked by ``modnet.validate``'s npz checks)."""
        from pathlib import Path

        if not bcfg.get("path"):
            raise ValueError(f"benchmark=npz needs benchmark.path=<file.npz> (the arrays {command} reads)")
        path = Path(str(bcfg.path)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"npz file not found: {path}; set benchmark.path to an existing .npz")

    @staticmethod
    def arrays(bcfg):
        from scenarios.sources import load_npz_arrays

        if not bcfg.get("path"):
            raise ValueError("benchmark=npz needs benchmark.path=<file.npz>")
        return load_npz_arrays(bcfg.path)

    @staticmethod
    def zero_shot(path=None, **_):
        from scenarios.zsl import load_npz_zsl

        if not path:
            raise ValueError("benchmark npz needs benchmark.path=<file.npz>")
        return load_npz_zsl(path)
