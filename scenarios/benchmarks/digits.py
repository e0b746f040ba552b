"""``digits``: scikit-learn's 8x8 digits (1,797 images, ships with scikit-learn; no download), in every command.

cl: Split-Digits (5 experiences x 2 classes), a fixed stratified train/test split; gzsl / explain: zero-shot
digits with grounded attributes (seven segments + closed loops), digits 2 and 7 unseen by default.
"""
from __future__ import annotations

from scenarios.registry import register_benchmark

NAME = "digits"


@register_benchmark(NAME, commands=("cl", "gzsl", "explain"), order=0,
                    description="scikit-learn's 8x8 digits, with seven-segment class attributes",
                    keys={"cl": ("test_fraction", "image", "variant", "n_experiences", "class_order",
                                 "max_train_samples"),
                          "gzsl": ("test_fraction", "image", "unseen_classes"),
                          "explain": ("test_fraction", "unseen_classes")})
class Digits:
    N_CLASSES = 10

    @staticmethod
    def check(bcfg, command):
        """gzsl / explain: ``unseen_classes`` some, not all, of the digits 0..9; gzsl: at least
        ``MIN_SEEN_CLASSES`` left seen (its class-disjoint validation holds one out and keeps two)."""
        unseen = bcfg.get("unseen_classes") if command != "cl" else None
        if unseen is None:
            return
        values = list(unseen)
        if not values or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= 9 for c in values) \
                or len(set(values)) == 10:
            raise ValueError(f"config benchmark.unseen_classes={values} must be some (not all) of the digits 0..9, "
                             "e.g. [2, 7]")
        from scenarios.sources import MIN_SEEN_CLASSES

        seen = 10 - len(set(values))
        if command == "gzsl" and seen < MIN_SEEN_CLASSES:
            raise ValueError(f"config benchmark.unseen_classes leaves {seen} of the 10 digits seen; a GZSL run "
                             f"needs at least {MIN_SEEN_CLASSES} (its class-disjoint validation holds one out and "
                             "keeps two): list fewer unseen classes")

    @staticmethod
    def arrays(bcfg):
        from scenarios.sources import load_digits_arrays

        return load_digits_arrays(bcfg.test_fraction, image=bcfg.get("image", False))

    @staticmethod
    def zero_shot(path=None, *, unseen_classes=(2, 7), test_fraction=0.3, seed=0, images=False, **_):
        from scenarios.zsl import load_digits_zsl

        return load_digits_zsl(unseen_classes, test_fraction, seed, images=images)
