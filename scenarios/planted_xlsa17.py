"""A planted xlsa17 folder: the real ``att_splits.mat`` beside a generated ``res101.mat`` whose features follow
the attributes, so that zero-shot transfer has a known answer at the real size (AWA2: 37,322 x 2048).

Every image of class c gets ``features = mu_c + noise * N(0, I)`` with ``mu_c = offset + a_c @ M``: ``a_c`` is
class c's attribute row as ``load_xlsa17`` builds it (``original_att``, missing entries filled, rows
L2-normalised), ``M`` a fixed random matrix (A x n_features, N(0, 1) entries, drawn with the seed) and ``offset`` a
fixed random vector. Class means are a linear function of the attributes, so a method that learns the map
from the seen classes can place the unseen ones. Labels follow the split: the locations ``trainval_loc`` and
``test_seen_loc`` hold seen classes, ``test_unseen_loc`` unseen ones (the classes of ``testclasses.txt`` next
to the split file, or ``unseen``), each class an equal share in a random order.

``per_class`` keeps that many images per class (a small folder for tests): the locations are renumbered and a
matching ``att_splits.mat`` is written. The real split is copied byte for byte otherwise.

    python -m scenarios.planted_xlsa17 SPLIT_DIR OUT_DIR [--features 2048] [--noise 2] [--per-class N]
    modnet gzsl benchmark=awa2 benchmark.path=OUT_DIR
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from modnet.methods.knowledge import attribute_matrix

SPLIT_KEYS = ("trainval_loc", "test_seen_loc", "test_unseen_loc")
_CLASS_LISTS = ("classes.txt", "predicates.txt", "attributes.txt", "trainvalclasses.txt", "testclasses.txt")


def _class_name(cell) -> str:
    return str(np.asarray(cell).ravel()[0]).strip()


def _unseen_ids(names: list[str], split_dir: Path, unseen: Sequence[str] | None) -> list[int]:
    if unseen is None:
        listing = split_dir / "testclasses.txt"
        if not listing.exists():
            raise FileNotFoundError(f"{listing} not found: pass unseen= (the unseen class names)")
        unseen = [line.split(None, 1)[-1].strip() for line in listing.read_text().splitlines() if line.strip()]
    missing = [u for u in unseen if u not in names]
    if missing:
        raise ValueError(f"unseen classes {missing} are not in allclasses_names")
    return sorted(names.index(u) for u in unseen)


def write_planted_xlsa17(split_file: str | Path, out_dir: str | Path, *, n_features: int = 2048,
                         noise: float = 2.0, per_class: int | None = None, unseen: Sequence[str] | None = None,
                         seed: int = 0) -> dict:
    """Write ``out_dir/res101.mat`` (and ``att_splits.mat``, the class lists) as described in the module doc.

    Returns {"n": images, "seen": [class ids], "unseen": [class ids], "labels": 0-based label per image}.
    """
    import scipy.io

    split_file = Path(split_file)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = scipy.io.loadmat(str(split_file))
    names = [_class_name(c) for c in np.asarray(split["allclasses_names"]).ravel()]
    unseen_ids = _unseen_ids(names, split_file.parent, unseen)
    seen_ids = [c for c in range(len(names)) if c not in unseen_ids]
    rng = np.random.default_rng(seed)
    locations = {k: np.asarray(split[k]).astype(np.int64).ravel() - 1 for k in SPLIT_KEYS}
    n = int(max(loc.max() for loc in locations.values())) + 1

    def shares(count: int, classes: list[int]) -> np.ndarray:
        return rng.permutation(np.resize(np.asarray(classes), count))

    labels = np.full(n, -1, dtype=np.int64)
    seen_loc = np.concatenate([locations["trainval_loc"], locations["test_seen_loc"]])
    labels[seen_loc] = shares(seen_loc.size, seen_ids)
    labels[locations["test_unseen_loc"]] = shares(locations["test_unseen_loc"].size, unseen_ids)

    if per_class is not None:  # keep per_class images of each class, renumber the locations
        if per_class < 2:
            raise ValueError(f"--per-class must be >= 2 (a seen class needs a training and a test-seen image), "
                             f"got {per_class}")
        keep = np.zeros(n, dtype=bool)
        in_trainval = np.zeros(n, dtype=bool)
        in_trainval[locations["trainval_loc"]] = True
        for c in range(len(names)):
            members = np.flatnonzero(labels == c)
            if c in unseen_ids:
                keep[members[:per_class]] = True
                continue
            # a seen class keeps trainval and test-seen images in the split's proportion, at least one of each
            # (the first per_class images alone could all fall in trainval: a seen class nothing scores)
            tv, ts = members[in_trainval[members]], members[~in_trainval[members]]
            n_ts = min(max(1, int(round(per_class * ts.size / max(members.size, 1)))), ts.size, per_class - 1)
            keep[ts[:n_ts]] = True
            keep[tv[:per_class - n_ts]] = True
        new_index = np.cumsum(keep) - 1
        split = dict(split)
        for k in SPLIT_KEYS:
            loc = locations[k][keep[locations[k]]]
            split[k] = (new_index[loc] + 1).astype(np.uint16)[:, None]
        for k in ("train_loc", "val_loc"):  # the fine-grained split is not renumbered: drop it
            split.pop(k, None)
        split = {k: v for k, v in split.items() if not k.startswith("__")}
        scipy.io.savemat(str(out_dir / "att_splits.mat"), split)
        labels = labels[keep]
        n = labels.size
    elif split_file.resolve() != (out_dir / "att_splits.mat").resolve():
        shutil.copyfile(split_file, out_dir / "att_splits.mat")
    for listing in _CLASS_LISTS:
        if (split_file.parent / listing).exists() and split_file.parent.resolve() != out_dir.resolve():
            shutil.copyfile(split_file.parent / listing, out_dir / listing)

    att = attribute_matrix(np.asarray(split["original_att"], dtype=np.float64), classes_by_attributes=False)
    att = att.numpy().astype(np.float64)                                   # [C, A], rows L2-normalised
    mix = rng.standard_normal((att.shape[1], n_features))
    means = (att @ mix + rng.standard_normal(n_features)).astype(np.float32)   # [C, F]
    features = np.empty((n_features, n), dtype=np.float32)                 # xlsa17 layout: F x N
    for start in range(0, n, 4096):                                        # bounded temporary memory
        block = labels[start:start + 4096]
        features[:, start:start + block.size] = (
            means[block] + noise * rng.standard_normal((block.size, n_features), dtype=np.float32)).T
    scipy.io.savemat(str(out_dir / "res101.mat"),
                     {"features": features, "labels": (labels + 1)[:, None].astype(np.int16),
                      "image_files": np.array([f"planted/{i:05d}.jpg" for i in range(n)], dtype=object)[:, None]})
    return {"n": n, "seen": seen_ids, "unseen": unseen_ids, "labels": labels}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("split_dir", help="folder with the real att_splits.mat (and testclasses.txt)")
    parser.add_argument("out_dir")
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--noise", type=float, default=2.0)
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = write_planted_xlsa17(Path(args.split_dir) / "att_splits.mat", args.out_dir, n_features=args.features,
                                noise=args.noise, per_class=args.per_class, seed=args.seed)
    print(f"{args.out_dir}: res101.mat with {info['n']} images x {args.features} features, "
          f"{len(info['seen'])} seen / {len(info['unseen'])} unseen classes")


if __name__ == "__main__":
    main()
