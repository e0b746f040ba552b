"""A zero-shot ``.npz`` of small colour images whose class attributes are visual facts measured in the pixels.

Every class is a combination of primitives: two or three strokes out of six (``top``, ``middle``, ``bottom``
horizontal bars, ``left``, ``right`` vertical bars, the ``diagonal``) drawn in one ink colour (``red``,
``green``, ``blue``). An image of the class draws its strokes on a ``size`` x ``size`` canvas (3 channels),
the whole drawing shifted by up to ``shift`` pixels, each stroke with its own intensity in [0.6, 1], the ink
colour jittered, plus Gaussian pixel noise; pixels are clipped to [0, 1].

The class attributes are not the recipe: they are measured in the pixels of ``reference`` images of each class
(drawn apart from the training and test images) by two detectors that read only the image,

  stroke k:  mean over the pixels of stroke k's region (its nominal place widened by ``shift``) of the ink,
             max over channels;
  colour c:  share of channel c in the ink of the pixels brighter than 0.5,

averaged over the class's reference images. Strokes overlap (a vertical bar crosses the ends of the horizontal
ones), so the measured values are continuous and correlated, as real attributes are. The unseen classes are new
combinations of strokes and colours that every seen class set shows: each attribute is on in at least two seen
classes and the seen classes' recipe matrix has full column rank, so an attribute -> visual map learned on the
seen classes can place the unseen ones.

    python -m scenarios.planted_shapes OUT.npz [--classes 20] [--unseen 5] [--train-per-class 200] ...
    modnet gzsl benchmark=npz benchmark.path=OUT.npz

Measured (``--train-per-class 100 --test-per-class 40``, 15 seen / 5 unseen, HATCNN at gzsl's defaults,
f-CLSWGAN at width 1024; seeds 0-2, mean +- std): uncalibrated H NIWT .007 +- .005, ESZSL .764 +- .080,
ALE .762 +- .028, f-CLSWGAN .710 +- .016; calibrated H .325 +- .046, .760 +- .097, .699 +- .031,
.675 +- .062; ZSL accuracy .325 +- .067, .910 +- .039, .885 +- .106, .888 +- .096 (chance .2). NIWT's
importance at the default layer (-2: the last conv block) is the Grad-CAM channel weight, a gradient averaged
over space, which cannot tell a bar at the top from the same bar at the bottom: five of the six stroke
attributes are positions.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Sequence

import numpy as np

STROKES = ("top", "middle", "bottom", "left", "right", "diagonal")
COLOURS = ("red", "green", "blue")
ATTRIBUTE_NAMES = tuple(STROKES) + tuple(COLOURS)


def stroke_masks(size: int) -> np.ndarray:
    """[6, size, size] boolean masks of the strokes at their nominal place (2 pixels thick), in STROKES order."""
    if size < 10:
        raise ValueError(f"planted shapes need size >= 10 pixels (got {size}): the six strokes must not merge")
    lo, hi = round(0.19 * size), round(0.81 * size)  # the bars' extent (3..13 on 16 pixels)
    mid = size // 2 - 1
    masks = np.zeros((len(STROKES), size, size), dtype=bool)
    masks[0, lo - 1:lo + 1, lo:hi] = True           # top
    masks[1, mid:mid + 2, lo:hi] = True             # middle
    masks[2, hi - 1:hi + 1, lo:hi] = True           # bottom
    masks[3, lo:hi, lo - 1:lo + 1] = True           # left
    masks[4, lo:hi, hi - 1:hi + 1] = True           # right
    for i in range(lo, hi):                         # diagonal, top-left to bottom-right
        masks[5, i, i:i + 2] = True
    return masks


def _shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    h, w = mask.shape[-2:]
    src = mask[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[..., max(0, dy):max(0, dy) + src.shape[-2], max(0, dx):max(0, dx) + src.shape[-1]] = src
    return out


def detector_regions(size: int, shift: int) -> np.ndarray:
    """[6, size, size] regions read by the stroke detectors: each stroke's mask widened by ``shift`` pixels in
    every direction (the union of its shifted copies), so a shifted stroke stays inside its region."""
    masks = stroke_masks(size)
    regions = np.zeros_like(masks)
    for dy, dx in itertools.product(range(-shift, shift + 1), repeat=2):
        regions |= _shifted(masks, dy, dx)
    return regions


def draw(recipes: np.ndarray, labels: np.ndarray, *, size: int = 16, shift: int = 1, noise: float = 0.1,
         rng: np.random.Generator) -> np.ndarray:
    """Images [n, 3, size, size] in [0, 1] of the classes ``labels`` (rows of ``recipes`` [C, 6 strokes + 3
    colours], binary, one colour per class); all random draws vectorised over the images."""
    masks = stroke_masks(size).astype(np.float32)                            # [6, H, W]
    n = labels.size
    strokes = recipes[labels, :len(STROKES)].astype(np.float32)             # [n, 6]
    intensity = strokes * rng.uniform(0.6, 1.0, (n, len(STROKES))).astype(np.float32)
    ink = np.einsum("ns,shw->nhw", intensity, masks).clip(0, 1)              # [n, H, W], overlaps saturate
    shifts = rng.integers(-shift, shift + 1, (n, 2))
    for dy, dx in itertools.product(range(-shift, shift + 1), repeat=2):     # at most (2 shift + 1)^2 groups
        group = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
        if group.any():
            ink[group] = _shifted(ink[group], dy, dx)
    colour = recipes[labels, len(STROKES):].astype(np.float32) * 0.8        # [n, 3]: the class's ink colour
    colour = colour + rng.uniform(0.0, 0.3, (n, 3)).astype(np.float32)       # jittered hue
    images = colour[:, :, None, None] * ink[:, None]                         # [n, 3, H, W]
    images += noise * rng.standard_normal(images.shape, dtype=np.float32)
    return images.clip(0.0, 1.0)


def measure_attributes(images: np.ndarray, shift: int = 1) -> np.ndarray:
    """Per-image attributes [n, 9] read from the pixels only (module doc): 6 stroke detectors, 3 colour shares."""
    grey = images.max(axis=1)                                                # [n, H, W] ink in any channel
    regions = detector_regions(images.shape[-1], shift).astype(np.float32)
    strokes = np.einsum("nhw,shw->ns", grey, regions) / regions.sum((1, 2))
    bright = (grey > 0.5)[:, None]                                           # [n, 1, H, W]
    per_channel = (images * bright).sum((2, 3))                              # [n, 3]
    colours = per_channel / np.maximum(per_channel.sum(1, keepdims=True), 1e-8)
    return np.concatenate([strokes, colours], axis=1)


def choose_classes(n_classes: int, n_unseen: int, rng: np.random.Generator,
                   max_tries: int = 1000) -> tuple[np.ndarray, list[int]]:
    """Binary recipes [C, 9] (2-3 strokes, one colour; all distinct) and the unseen class ids, drawn until
    every attribute is on in at least two seen classes and the seen recipes have full column rank."""
    combos = [set(c) for k in (2, 3) for c in itertools.combinations(range(len(STROKES)), k)]
    pool = [(s, c) for s in combos for c in range(len(COLOURS))]
    if not 2 <= n_unseen < n_classes <= len(pool):
        raise ValueError(f"planted shapes: need 2 <= unseen < classes <= {len(pool)} (got classes={n_classes}, "
                         f"unseen={n_unseen})")
    for _ in range(max_tries):
        chosen = rng.choice(len(pool), n_classes, replace=False)
        recipes = np.zeros((n_classes, len(ATTRIBUTE_NAMES)), dtype=np.int64)
        for row, i in enumerate(chosen):
            strokes, colour = pool[i]
            recipes[row, sorted(strokes)] = 1
            recipes[row, len(STROKES) + colour] = 1
        unseen = sorted(rng.choice(n_classes, n_unseen, replace=False).tolist())
        seen = np.setdiff1d(np.arange(n_classes), unseen)
        seen_recipes = recipes[seen]
        if seen_recipes.sum(0).min() >= 2 and np.linalg.matrix_rank(seen_recipes) == recipes.shape[1]:
            return recipes, unseen
    raise ValueError(f"no class set of {n_classes} classes with {n_unseen} unseen passed the checks in "
                     f"{max_tries} draws; use more classes or fewer unseen ones")


def class_name(recipe: np.ndarray) -> str:
    strokes = [STROKES[i] for i in np.flatnonzero(recipe[:len(STROKES)])]
    return f"{COLOURS[int(np.argmax(recipe[len(STROKES):]))]} {'+'.join(strokes)}"


def make_planted_shapes(*, n_classes: int = 20, n_unseen: int = 5, train_per_class: int = 200,
                        test_per_class: int = 50, reference_per_class: int = 50, size: int = 16, shift: int = 1,
                        noise: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of the zero-shot ``.npz`` (keys of configs/benchmark/npz.yaml) plus ``recipes`` (the binary
    recipe of every class, for checks; modnet reads only ``class_attributes``)."""
    rng = np.random.default_rng(seed)
    recipes, unseen = choose_classes(n_classes, n_unseen, rng)
    seen = [c for c in range(n_classes) if c not in unseen]
    reference_labels = np.repeat(np.arange(n_classes), reference_per_class)
    reference = draw(recipes, reference_labels, size=size, shift=shift, noise=noise, rng=rng)
    per_image = measure_attributes(reference, shift)
    attributes = np.stack([per_image[reference_labels == c].mean(0) for c in range(n_classes)])
    y_train = rng.permutation(np.repeat(np.asarray(seen), train_per_class))
    y_test = rng.permutation(np.repeat(np.arange(n_classes), test_per_class))
    return {"x_train": draw(recipes, y_train, size=size, shift=shift, noise=noise, rng=rng), "y_train": y_train,
            "x_test": draw(recipes, y_test, size=size, shift=shift, noise=noise, rng=rng), "y_test": y_test,
            "class_attributes": attributes.astype(np.float32), "unseen_classes": np.asarray(unseen),
            "attribute_names": np.asarray(ATTRIBUTE_NAMES), "class_names": np.asarray([class_name(r) for r in recipes]),
            "recipes": recipes}


def write_planted_shapes(path: str | Path, **kwargs) -> dict[str, np.ndarray]:
    """``make_planted_shapes(**kwargs)`` saved to ``path`` (numpy.savez); returns the arrays."""
    arrays = make_planted_shapes(**kwargs)
    np.savez(path, **arrays)
    return arrays


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the .npz to write")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--unseen", type=int, default=5)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--reference-per-class", type=int, default=50)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--shift", type=int, default=1)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    arrays = write_planted_shapes(a.out, n_classes=a.classes, n_unseen=a.unseen, train_per_class=a.train_per_class,
                                  test_per_class=a.test_per_class, reference_per_class=a.reference_per_class,
                                  size=a.size, shift=a.shift, noise=a.noise, seed=a.seed)
    names = arrays["class_names"]
    print(f"{a.out}: {arrays['x_train'].shape[0]} training images of {a.classes - a.unseen} seen classes, "
          f"{arrays['x_test'].shape[0]} test images, {arrays['x_train'].shape[1:]} each; unseen: "
          f"{', '.join(str(names[c]) for c in arrays['unseen_classes'])}")


if __name__ == "__main__":
    main()
