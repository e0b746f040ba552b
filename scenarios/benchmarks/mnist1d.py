"""``mnist1d``: MNIST-1D (Greydanus 2020, "Scaling down deep learning"), modnet cl only: 10 classes of 40-d
sequences (1-d templates of the digits, padded, translated, sheared, scaled and noised), generated offline by the
``mnist1d`` package (``mnist1d.data.make_dataset``; nothing is downloaded). Vectors, so ``model.arch=auto``
takes the MLP; Split-MNIST-1D divides the classes over ``n_experiences``.

Keys: num_samples (5000: the package's default, num_samples // 10 per class), train_split (0.8: the first 80%
of the shuffled samples train, as in the package), seed (42: the generator's seed, fixing the data whatever the
run's seed, which orders the classes), n_experiences, class_order.
"""
from __future__ import annotations

from scenarios.registry import register_benchmark

NAME = "mnist1d"


@register_benchmark(NAME, commands=("cl",), order=14,
                    description="MNIST-1D: continual-learning 40-d sequences without class attributes",
                    keys={"cl": ("num_samples", "train_split", "seed", "n_experiences", "class_order")})
class Mnist1D:
    N_CLASSES = 10

    @staticmethod
    def check(bcfg, command):
        """The generator's own limits, before the imports (it raised them after torch's)."""
        n, split = bcfg.get("num_samples"), bcfg.get("train_split")
        if isinstance(n, bool) or not isinstance(n, int) or n < 20:
            raise ValueError(f"benchmark.num_samples={n!r}: MNIST-1D needs an integer >= 20 (2 samples per class)")
        if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0.0 < split < 1.0:
            raise ValueError(f"benchmark.train_split={split!r} must be in (0, 1): the share of the samples that train")

    @staticmethod
    def arrays(bcfg):
        return generate(int(bcfg.num_samples), float(bcfg.train_split), int(bcfg.seed))


def generate(num_samples: int = 5000, train_split: float = 0.8, seed: int = 42):
    """MNIST-1D from the package's generator -> (x_train, y_train, x_test, y_test) tensors, x (N, 40) float32.

    The generator seeds Python's and numpy's global random state; both are restored afterwards.
    """
    import random

    import numpy as np
    import torch

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError(f"benchmark=mnist1d needs the mnist1d package ({err}): pip install mnist1d") from err
    if num_samples < 20:
        raise ValueError(f"benchmark.num_samples={num_samples}: MNIST-1D needs at least 2 samples per class (20)")
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"benchmark.train_split={train_split} must be in (0, 1)")
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    missing = sorted(set(range(10)) - set(data["y"].tolist()))
    if missing:
        raise ValueError(f"benchmark.num_samples={num_samples} with train_split={train_split} leaves classes "
                         f"{missing} without training samples; raise num_samples")
    tensor = lambda a, dtype: torch.as_tensor(np.asarray(a), dtype=dtype)  # noqa: E731
    return (tensor(data["x"], torch.float32), tensor(data["y"], torch.long),
            tensor(data["x_test"], torch.float32), tensor(data["y_test"], torch.long))
