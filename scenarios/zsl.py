"""Generalized zero-shot learning (GZSL) data: seen-class training data, test-seen / test-unseen splits and
class-level domain knowledge, in one ``ZSLData`` record.

Sources:
(a) xlsa17 "proposed splits" of Xian et al. (``res101.mat`` + ``att_splits.mat``) for AWA2 and CUB: locations
    are 1-based uint16 indices into the rows of ``features.T``; ``labels`` are 1-based into
    ``allclasses_names`` (CUB's order there is NOT classes.txt's); AWA2's ``original_att`` marks missing
    values with -1 (filled here, see ``modnet.methods.knowledge.attribute_matrix``). scipy.io reads the files.
(b) raw image folders (AwA2 ``JPEGImages/<class>/``, CUB-200-2011 ``images/<NNN.name>/``) with the proposed
    class split (trainvalclasses.txt / testclasses.txt), embedded by a torchvision ResNet whose weights come
    from a local file (a download is tried only when asked, with a clear error when offline).
(c) the embedded default: scikit-learn's 8x8 digits with grounded attributes, the seven-segment encoding
    of each digit plus its number of closed loops.
(d) a user ``.npz`` (x_train, y_train, x_test, y_test, class_attributes, unseen_classes, optional
    attribute_names, class_names).

Every loader validates before any training: attribute rows vs labels, unseen classes absent from training,
no NaN attribute vector, files present and readable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from modnet.methods.knowledge import MissingFileError, attribute_matrix

__all__ = [
    "ZSLData",
    "DIGIT_SEGMENTS",
    "digit_attributes",
    "load_digits_zsl",
    "load_npz_zsl",
    "load_xlsa17",
    "resnet_feature_extractor",
    "load_image_folder_zsl",
    "load_awa2_images",
    "load_cub_images",
    "load_xlsa17_or_release",
    "load_zsl_benchmark",
    "load_zsl_from_config",
    "zero_shot_names",
    "split_seen_test",
    "class_disjoint_validation",
]


@dataclass
class ZSLData:
    """A GZSL benchmark. Labels are dataset class ids 0..C-1 (rows of ``attributes``).

    ``x_train``/``y_train`` hold seen-class samples only; ``x_test_seen`` are held-out samples of seen
    classes (S), ``x_test_unseen`` samples of unseen classes (U). ``x_*`` are feature vectors [n, d] or
    images [n, c, h, w]. ``attributes`` [C, A] is the class-level knowledge (L2-normalised rows).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test_seen: Tensor
    y_test_seen: Tensor
    x_test_unseen: Tensor
    y_test_unseen: Tensor
    attributes: Tensor
    seen_classes: list[int]
    unseen_classes: list[int]
    class_names: list[str] = field(default_factory=list)
    attribute_names: list[str] = field(default_factory=list)
    # the attributes before their rows' L2 normalisation, where the loader has them (None: not kept): what a
    # column's spread over classes is read from (modnet explain: a column constant over the classes explains nothing)
    raw_attributes: Tensor | None = None

    @property
    def n_classes(self) -> int:
        return int(self.attributes.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def validate(self) -> "ZSLData":
        """Raise ValueError on inconsistent data (called by every loader)."""
        c = self.n_classes
        if self.attributes.dim() != 2:
            raise ValueError(f"{self.name}: attributes must be [n_classes, n_attributes], got "
                             f"{tuple(self.attributes.shape)}")
        nan_rows = torch.nonzero(~torch.isfinite(self.attributes).all(1)).flatten().tolist()
        if nan_rows:
            raise ValueError(f"{self.name}: attribute vectors of classes {nan_rows} contain NaN/inf")
        for split, x, y in (("train", self.x_train, self.y_train), ("test_seen", self.x_test_seen, self.y_test_seen),
                            ("test_unseen", self.x_test_unseen, self.y_test_unseen)):
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{self.name}: x_{split} has {x.shape[0]} samples but y_{split} {y.shape[0]}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
                raise ValueError(f"{self.name}: y_{split} has labels in [{int(y.min())}, {int(y.max())}] but the "
                                 f"attribute matrix has {c} class rows; give one attribute row per class.")
        seen, unseen = set(self.seen_classes), set(self.unseen_classes)
        if not unseen:
            raise ValueError(f"{self.name}: no unseen classes")
        if seen & unseen:
            raise ValueError(f"{self.name}: classes {sorted(seen & unseen)} are both seen and unseen")
        leaked = sorted(set(self.y_train.tolist()) & unseen)
        if leaked:
            raise ValueError(f"{self.name}: unseen classes {leaked} have training samples; zero-shot training "
                             "must use seen classes only (remove them from the training set or from unseen_classes).")
        if not set(self.y_test_unseen.tolist()) <= unseen:
            raise ValueError(f"{self.name}: test_unseen holds seen-class samples")
        if not set(self.y_test_seen.tolist()) <= seen:
            raise ValueError(f"{self.name}: test_seen holds classes outside seen_classes")
        # every seen class is trained and scored (per-class mean accuracy; Avalanche's nc_benchmark needs test
        # samples of every class it trains, a KeyError deep inside it otherwise)
        for split, y in (("train", self.y_train), ("test_seen", self.y_test_seen)):
            empty = sorted(seen - set(y.tolist()))
            if empty:
                raise ValueError(f"{self.name}: seen classes {empty[:10]}{' ...' if len(empty) > 10 else ''} have "
                                 f"no {split} samples; every seen class needs training and test-seen samples "
                                 "(give the split more samples of them, e.g. a larger --per-class for "
                                 "scenarios.planted_xlsa17, or drop them from the seen classes).")
        if self.class_names and len(self.class_names) != c:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {c} attribute rows")
        if self.attribute_names and len(self.attribute_names) != self.attributes.shape[1]:
            raise ValueError(f"{self.name}: {len(self.attribute_names)} attribute names for "
                             f"{self.attributes.shape[1]} attributes")
        return self


def split_seen_test(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of sample indices (scikit-learn) -> (train_idx, test_idx)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    return train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)


def _make(name, x, y, seen, unseen, attributes, test_fraction, seed, class_names, attribute_names,
          raw_attributes=None) -> ZSLData:
    """Seen-class samples -> train / test-seen (stratified); all unseen-class samples -> test-unseen."""
    x, y = np.asarray(x), np.asarray(y).astype(np.int64)
    is_seen = np.isin(y, seen)
    seen_idx = np.nonzero(is_seen)[0]
    tr, te = split_seen_test(y[seen_idx], test_fraction, seed)
    tr, te = seen_idx[tr], seen_idx[te]
    unseen_idx = np.nonzero(np.isin(y, unseen))[0]
    t = lambda a, dt=torch.float32: torch.as_tensor(a, dtype=dt)  # noqa: E731
    return ZSLData(name, t(x[tr]), t(y[tr], torch.long), t(x[te]), t(y[te], torch.long), t(x[unseen_idx]),
                   t(y[unseen_idx], torch.long), attributes, sorted(int(c) for c in seen),
                   sorted(int(c) for c in unseen), list(class_names), list(attribute_names),
                   raw_attributes).validate()


# ----------------------------------------------------------------------------------------------------------
# (c) digits with seven-segment attributes
# ----------------------------------------------------------------------------------------------------------
#: Segments of a seven-segment display: a top, b upper right, c lower right, d bottom, e lower left,
#: f upper left, g middle. Row d = digit d.
DIGIT_SEGMENTS = np.array([
    # a  b  c  d  e  f  g
    [1, 1, 1, 1, 1, 1, 0],  # 0
    [0, 1, 1, 0, 0, 0, 0],  # 1
    [1, 1, 0, 1, 1, 0, 1],  # 2
    [1, 1, 1, 1, 0, 0, 1],  # 3
    [0, 1, 1, 0, 0, 1, 1],  # 4
    [1, 0, 1, 1, 0, 1, 1],  # 5
    [1, 0, 1, 1, 1, 1, 1],  # 6
    [1, 1, 1, 0, 0, 0, 0],  # 7
    [1, 1, 1, 1, 1, 1, 1],  # 8
    [1, 1, 1, 1, 0, 1, 1],  # 9
], dtype=np.float64)
#: Closed loops of the handwritten digit (0, 6, 9: one; 8: two; the open handwritten 4 of this data: none).
DIGIT_LOOPS = np.array([1, 0, 0, 0, 0, 0, 1, 0, 2, 1], dtype=np.float64)
DIGIT_ATTRIBUTE_NAMES = ["segment_top", "segment_upper_right", "segment_lower_right", "segment_bottom",
                         "segment_lower_left", "segment_upper_left", "segment_middle", "closed_loops"]


def digit_attributes(loops: bool = True) -> tuple[np.ndarray, list[str]]:
    """[10, 8] grounded attributes (seven segments + closed loops) and their names (unnormalised)."""
    if not loops:
        return DIGIT_SEGMENTS.copy(), DIGIT_ATTRIBUTE_NAMES[:7]
    return np.concatenate([DIGIT_SEGMENTS, DIGIT_LOOPS[:, None]], 1), list(DIGIT_ATTRIBUTE_NAMES)


def load_digits_zsl(unseen_classes: Sequence[int] = (2, 7), test_fraction: float = 0.3, seed: int = 0,
                    images: bool = False, loops: bool = True) -> ZSLData:
    """scikit-learn digits (1,797 8x8 images, pixel values / 16) as a GZSL benchmark.

    ``images=True`` gives [n, 1, 8, 8] tensors for a CNN, otherwise [n, 64] vectors.
    """
    from sklearn.datasets import load_digits

    unseen = sorted(int(c) for c in unseen_classes)
    if not unseen or min(unseen) < 0 or max(unseen) > 9 or len(set(unseen)) == 10:
        raise ValueError(f"unseen_classes must be some (not all) of the digits 0..9, got {list(unseen_classes)}")
    data = load_digits()
    x = data.data.astype(np.float32) / 16.0
    if images:
        x = x.reshape(-1, 1, 8, 8)
    att, names = digit_attributes(loops)
    seen = [c for c in range(10) if c not in unseen]
    return _make("digits", x, data.target, seen, unseen, attribute_matrix(att, missing_value=None),
                 test_fraction, seed, [str(d) for d in range(10)], names,
                 attribute_matrix(att, missing_value=None, normalize=False))


# ----------------------------------------------------------------------------------------------------------
# (d) user .npz
# ----------------------------------------------------------------------------------------------------------


def load_npz_zsl(path: str | Path, missing: str = "mean") -> ZSLData:
    """GZSL data from a user ``.npz``: x_train, y_train, x_test, y_test, class_attributes [C, A],
    unseen_classes, optional attribute_names, class_names. Labels are class ids 0..C-1.

    Training uses the seen-class samples of x_train (samples of an unseen class there are an error);
    x_test samples split into test-seen and test-unseen by their label.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"GZSL .npz file not found: {path}. Pass benchmark.path=<file.npz>.")
    from scenarios.sources import check_zsl_npz, read_npz

    arrays = read_npz(path)
    x_train, y_train, x_test, y_test, att_raw, seen, unseen = check_zsl_npz(path, arrays)
    n_classes = att_raw.shape[0]
    test_seen, test_unseen = np.isin(y_test, seen), np.isin(y_test, unseen)
    names = [str(s) for s in arrays["class_names"]] if "class_names" in arrays else [str(c) for c in range(n_classes)]
    att_names = [str(s) for s in arrays["attribute_names"]] if "attribute_names" in arrays else []
    t = torch.as_tensor
    return ZSLData(path.stem, t(x_train), t(y_train), t(x_test[test_seen]), t(y_test[test_seen]),
                   t(x_test[test_unseen]), t(y_test[test_unseen]), attribute_matrix(att_raw, missing=missing),
                   seen, unseen, names, att_names,
                   attribute_matrix(att_raw, missing=missing, normalize=False)).validate()


# ----------------------------------------------------------------------------------------------------------
# (a) xlsa17 res101.mat + att_splits.mat
# ----------------------------------------------------------------------------------------------------------
def _loadmat(path: Path, what: str, keys: Sequence[str]) -> dict:
    import scipy.io

    if not path.exists():
        raise MissingFileError(f"{what} not found: {path}. The xlsa17 release (Xian et al.) has res101.mat and "
                               "att_splits.mat per data set; pass benchmark.path=<folder with both>.")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as error:  # scipy raises ValueError, MatReadError, TypeError ... on corrupt files
        raise ValueError(f"{path} is not a readable MATLAB .mat file ({type(error).__name__}: {error}); "
                         "re-download it from the xlsa17 release.") from error
    missing = [k for k in keys if k not in mat]
    if missing:
        raise ValueError(f"{path} lacks the variables {missing} expected in an xlsa17 {what}")
    return mat


def _locations(split: dict, key: str, n: int, path: Path) -> np.ndarray:
    loc = np.asarray(split[key]).astype(np.int64).ravel()
    if loc.size and (loc.min() < 1 or loc.max() > n):
        raise ValueError(f"{path}: {key} holds indices in [{loc.min()}, {loc.max()}] but res101.mat has {n} "
                         "samples; xlsa17 locations are 1-based (do the files belong together?)")
    return loc - 1


def _names(cell) -> list[str]:
    return [str(np.asarray(c).ravel()[0]).strip() for c in np.asarray(cell).ravel()]


def _read_name_list(path: Path) -> list[str]:
    """'1\\tblack' / '1 has_bill_shape::dagger' / 'sheep' lines -> names (leading index dropped)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(None, 1)
        if parts:
            out.append(parts[1].strip() if len(parts) == 2 and parts[0].isdigit() else parts[0])
    return out


def load_xlsa17(root: str | Path | None = None, *, res101: str | Path | None = None,
                att_splits: str | Path | None = None, attributes: str = "original_att", missing: str = "mean",
                name: str | None = None) -> ZSLData:
    """AWA2 / CUB from xlsa17 ``res101.mat`` (features 2048 x N, labels N x 1) and ``att_splits.mat``.

    Seen classes = labels at ``trainval_loc``; unseen = labels at ``test_unseen_loc``. Class ids are
    0-based positions in ``allclasses_names`` (``labels`` - 1). ``attributes="original_att"`` (default)
    rebuilds the L2-normalised attribute rows with missing (-1) entries filled by ``missing``; ``"att"``
    takes xlsa17's normalised matrix as is (AWA2's -1 entries then stay as small negatives).
    Attribute names are read from predicates.txt (AWA2) or attributes.txt (CUB) next to the files if present.
    """
    root = Path(root).expanduser() if root is not None else None
    res_path = Path(res101) if res101 is not None else (root / "res101.mat" if root else None)
    split_path = Path(att_splits) if att_splits is not None else (root / "att_splits.mat" if root else None)
    if res_path is None or split_path is None:
        raise ValueError("load_xlsa17 needs root= (folder with res101.mat and att_splits.mat) or both file paths")
    if attributes not in ("att", "original_att"):
        raise ValueError(f"attributes must be 'att' or 'original_att', got {attributes!r}")
    split = _loadmat(split_path, "att_splits.mat", ["trainval_loc", "test_seen_loc", "test_unseen_loc",
                                                    "allclasses_names", attributes])
    res = _loadmat(res_path, "res101.mat", ["features", "labels"])
    features = np.asarray(res["features"], dtype=np.float32).T  # 2048 x N -> N x 2048
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():  # found at load, naming the file, not by scikit-learn after two validation networks
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{res_path}: features of {len(bad)} images contain NaN/inf (columns {bad[:5].tolist()}"
                         f"{' ...' if len(bad) > 5 else ''} of 'features'); re-extract them or drop those images")
    labels = np.asarray(res["labels"]).astype(np.int64).ravel() - 1
    n = features.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"{res_path}: {n} feature columns but {labels.shape[0]} labels")
    class_names = _names(split["allclasses_names"])
    att_raw = np.asarray(split[attributes], dtype=np.float64)
    if att_raw.shape[1] != len(class_names):
        raise ValueError(f"{split_path}: {attributes} has {att_raw.shape[1]} class columns but allclasses_names "
                         f"{len(class_names)} names")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"{res_path}: labels span [{labels.min() + 1}, {labels.max() + 1}] (1-based) but there are "
                         f"{len(class_names)} classes")
    if attributes == "att":
        att = attribute_matrix(att_raw, classes_by_attributes=False, missing_value=None, normalize=False)
    else:
        att = attribute_matrix(att_raw, classes_by_attributes=False, missing=missing)
    trainval = _locations(split, "trainval_loc", n, split_path)
    test_seen = _locations(split, "test_seen_loc", n, split_path)
    test_unseen = _locations(split, "test_unseen_loc", n, split_path)
    seen = sorted(np.unique(labels[trainval]).tolist())
    unseen = sorted(np.unique(labels[test_unseen]).tolist())

    attribute_names: list[str] = []
    folder = split_path.parent
    for candidate in ("predicates.txt", "attributes.txt"):
        if (folder / candidate).exists():
            names = _read_name_list(folder / candidate)
            if len(names) == att.shape[1]:
                attribute_names = names
                break
    guessed = name or ("AWA2" if len(class_names) == 50 else "CUB" if len(class_names) == 200 else folder.name)
    t = torch.as_tensor
    return ZSLData(guessed, t(features[trainval]), t(labels[trainval]), t(features[test_seen]),
                   t(labels[test_seen]), t(features[test_unseen]), t(labels[test_unseen]), att, seen, unseen,
                   class_names, attribute_names).validate()


# ----------------------------------------------------------------------------------------------------------
# (b) raw images through a torchvision ResNet
# ----------------------------------------------------------------------------------------------------------
def resnet_feature_extractor(arch: str = "resnet101", weights_path: str | Path | None = None,
                             allow_download: bool = False) -> torch.nn.Module:
    """torchvision ResNet without its fc layer (global-average-pooled features, 2048-d for ResNet-101).

    Weights come from ``weights_path`` (a state_dict saved with torch.save, e.g. torchvision's
    ``resnet101-*.pth``). Without a path, ImageNet weights are downloaded only if ``allow_download``;
    offline, that fails with a ValueError saying to pass a local file.
    """
    import torchvision

    if not hasattr(torchvision.models, arch):
        raise ValueError(f"unknown torchvision architecture {arch!r} (e.g. resnet18, resnet50, resnet101)")
    builder = getattr(torchvision.models, arch)
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.exists():
            raise MissingFileError(f"ResNet weights not found: {path}. Pass the path of a torchvision state_dict.")
        model = builder(weights=None)
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{path} does not hold {arch} weights: {error}") from error
    elif allow_download:
        try:
            model = builder(weights="DEFAULT")
        except Exception as error:
            raise ValueError(f"could not download ImageNet weights for {arch} ({error}); this machine may be "
                             "offline: pass weights_path=<local .pth file>.") from error
    else:
        raise ValueError(f"no weights for {arch}: pass weights_path=<local .pth state_dict> (or allow_download="
                         "True on a machine that is online).")
    model.fc = torch.nn.Identity()
    return model.eval()


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


@torch.no_grad()
def _embed_images(files: Sequence[Path], extractor: torch.nn.Module, image_size: int, batch_size: int,
                  device: torch.device, progress: bool) -> np.ndarray:
    from PIL import Image
    from torchvision import transforms

    # ImageNet preprocessing of torchvision's ResNets (resize, centre crop, mean/std).
    prep = transforms.Compose([transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size),
                               transforms.ToTensor(),
                               transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    extractor = extractor.to(device).eval()
    chunks = []
    starts = range(0, len(files), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="ResNet features")
    for start in starts:
        batch = torch.stack([prep(Image.open(f).convert("RGB")) for f in files[start:start + batch_size]])
        chunks.append(extractor(batch.to(device)).flatten(1).cpu())
    return torch.cat(chunks).numpy()


def finetune_extractor(extractor: torch.nn.Module, files: Sequence[Path], labels: Sequence[int], *, epochs: int,
                       lr: float = 0.001, batch_size: int = 32, momentum: float = 0.9, image_size: int = 224,
                       seed: int = 0, device: str | torch.device = "cpu", progress: bool = False) -> torch.nn.Module:
    """Fine-tune a feature extractor (a torchvision ResNet with ``fc = Identity``) on labelled images: a new
    linear classifier over the classes of ``labels`` on its pooled features, cross-entropy, SGD with momentum, the
    standard training augmentation (random resized crop, horizontal flip) and ImageNet normalisation; the
    classifier is dropped afterwards and the extractor returned in eval mode.

    Xian et al. 2018 report GZSL on such features as their fine-tuned variant (the backbone trained on the seen
    classes' training images only: the test-seen and unseen images must never reach this function)."""
    from PIL import Image
    from torchvision import transforms

    device = torch.device(device)
    classes = sorted(set(int(c) for c in labels))
    target = torch.as_tensor([classes.index(int(c)) for c in labels])
    prep = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(),
                               transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the augmentation draws from the global generator
    extractor = extractor.to(device).eval()
    with torch.no_grad():
        dim = extractor(torch.zeros(1, 3, image_size, image_size, device=device)).flatten(1).shape[1]
    extractor.train()
    classifier = torch.nn.Linear(dim, len(classes)).to(device)
    optimizer = torch.optim.SGD([*extractor.parameters(), *classifier.parameters()], lr=lr, momentum=momentum)
    epochs_iter = range(int(epochs))
    if progress:
        from tqdm.auto import tqdm
        epochs_iter = tqdm(epochs_iter, desc="fine-tuning the ResNet")
    for _ in epochs_iter:
        order = torch.randperm(len(files), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # batch norm cannot train on one image: it joins the next epoch's order
                continue
            batch = torch.stack([prep(Image.open(files[i]).convert("RGB")) for i in idx]).to(device)
            loss = torch.nn.functional.cross_entropy(classifier(extractor(batch).flatten(1)), target[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return extractor.eval()


def load_image_folder_zsl(image_root: str | Path, class_names: Sequence[str], attributes: np.ndarray,
                          seen_class_names: Sequence[str], unseen_class_names: Sequence[str], *,
                          extractor: torch.nn.Module, attribute_names: Sequence[str] = (),
                          test_seen_fraction: float = 0.2, seed: int = 0, image_size: int = 224,
                          batch_size: int = 64, device: str | torch.device = "cpu", name: str = "images",
                          missing: str = "mean", progress: bool = False, finetune: dict | None = None) -> ZSLData:
    """Images in ``image_root/<class name>/*`` embedded by ``extractor`` -> ZSLData of features.

    ``attributes`` [C, A] rows follow ``class_names``. Seen-class images split into train / test-seen
    (stratified, ``test_seen_fraction`` as xlsa17's 20%); all unseen-class images are test-unseen.
    ``finetune`` ({epochs, lr, batch_size}; epochs 0 or None = off): the extractor is first fine-tuned on the
    seen classes' training images of that split (``finetune_extractor``), then embeds every image.
    """
    image_root = Path(image_root).expanduser()
    if not image_root.is_dir():
        raise MissingFileError(f"image folder not found: {image_root}")
    class_names = list(class_names)
    index = {c: i for i, c in enumerate(class_names)}
    unknown = [c for c in list(seen_class_names) + list(unseen_class_names) if c not in index]
    if unknown:
        raise ValueError(f"split classes {unknown[:10]} are not in the class list")
    att = attribute_matrix(np.asarray(attributes, dtype=np.float64), missing=missing)
    if att.shape[0] != len(class_names):
        raise ValueError(f"{att.shape[0]} attribute rows for {len(class_names)} classes")
    files, labels, empty = [], [], []
    for cname in list(seen_class_names) + list(unseen_class_names):
        folder = image_root / cname
        found = sorted(p for p in folder.glob("*") if p.suffix.lower() in _IMAGE_SUFFIXES) if folder.is_dir() else []
        if not found:
            empty.append(cname)
        files += found
        labels += [index[cname]] * len(found)
    if empty:
        raise ValueError(f"no images for classes {empty[:10]}{' ...' if len(empty) > 10 else ''} under {image_root}")
    seen = [index[c] for c in seen_class_names]
    unseen = [index[c] for c in unseen_class_names]
    if finetune and int(finetune.get("epochs") or 0) > 0:
        # the training images of exactly the split _make draws below (same labels, fraction and seed)
        y = np.asarray(labels, dtype=np.int64)
        seen_idx = np.nonzero(np.isin(y, seen))[0]
        train = seen_idx[split_seen_test(y[seen_idx], test_seen_fraction, seed)[0]]
        extractor = finetune_extractor(extractor, [files[i] for i in train], y[train].tolist(),
                                       epochs=int(finetune["epochs"]), lr=float(finetune.get("lr", 0.001)),
                                       batch_size=int(finetune.get("batch_size", 32)), image_size=image_size,
                                       seed=seed, device=device, progress=progress)
    features = _embed_images(files, extractor, image_size, batch_size, torch.device(device), progress)
    return _make(name, features, np.asarray(labels), seen, unseen, att, test_seen_fraction, seed, class_names,
                 list(attribute_names))


def _first_existing(candidates: Sequence[Path], what: str) -> Path:
    for c in candidates:
        if c.exists():
            return c
    raise MissingFileError(f"{what} not found; looked for: {', '.join(str(c) for c in candidates)}")


def load_awa2_images(root: str | Path, *, extractor: torch.nn.Module, split_dir: str | Path | None = None,
                     **kwargs) -> ZSLData:
    """AwA2 release folder: JPEGImages/<class>/, classes.txt, predicates.txt, predicate-matrix-continuous.txt,
    and the proposed split trainvalclasses.txt / testclasses.txt (in ``split_dir`` or ``root``)."""
    root = Path(root).expanduser()
    split_dir = Path(split_dir) if split_dir is not None else root
    classes = _read_name_list(_first_existing([root / "classes.txt"], "AwA2 classes.txt"))
    att = np.loadtxt(_first_existing([root / "predicate-matrix-continuous.txt"], "AwA2 predicate matrix"))
    predicates = root / "predicates.txt"
    names = _read_name_list(predicates) if predicates.exists() else []
    seen = _read_name_list(_first_existing([split_dir / "trainvalclasses.txt"], "trainvalclasses.txt"))
    unseen = _read_name_list(_first_existing([split_dir / "testclasses.txt"], "testclasses.txt"))
    images = _first_existing([root / "JPEGImages"], "AwA2 JPEGImages folder")
    return load_image_folder_zsl(images, classes, att, seen, unseen, extractor=extractor, attribute_names=names,
                                 name="AWA2", **kwargs)


def load_cub_images(root: str | Path, *, extractor: torch.nn.Module, split_dir: str | Path | None = None,
                    **kwargs) -> ZSLData:
    """CUB-200-2011 folder: images/<NNN.name>/, classes.txt, the 200 x 312 class-attribute matrix
    (attributes/class_attribute_labels_continuous.txt or class_attributes.txt), attributes.txt, and the
    proposed split trainvalclasses.txt / testclasses.txt (in ``split_dir`` or ``root``)."""
    root = Path(root).expanduser()
    split_dir = Path(split_dir) if split_dir is not None else root
    classes = _read_name_list(_first_existing([root / "classes.txt"], "CUB classes.txt"))
    att = np.loadtxt(_first_existing([root / "attributes" / "class_attribute_labels_continuous.txt",
                                      root / "class_attributes.txt"], "CUB class-attribute matrix"))
    names_file = next((p for p in (root / "attributes.txt", root / "attributes" / "attributes.txt",
                                   root.parent / "attributes.txt") if p.exists()), None)
    names = _read_name_list(names_file) if names_file else []
    seen = _read_name_list(_first_existing([split_dir / "trainvalclasses.txt"], "trainvalclasses.txt"))
    unseen = _read_name_list(_first_existing([split_dir / "testclasses.txt"], "testclasses.txt"))
    images = _first_existing([root / "images"], "CUB images folder")
    return load_image_folder_zsl(images, classes, att, seen, unseen, extractor=extractor, attribute_names=names,
                                 name="CUB", **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Dispatch from a config
# ----------------------------------------------------------------------------------------------------------
def load_xlsa17_or_release(name: str, path: str | None, release_loader, *, attributes: str = "original_att",
                           resnet_arch: str = "resnet101", resnet_weights: str | None = None,
                           allow_download: bool = False, seed: int = 0, device: str = "cpu", progress: bool = False,
                           resnet_finetune: dict | None = None, **_) -> ZSLData:
    """AWA2 / CUB (``name``) from ``path``: an xlsa17 folder (res101.mat + att_splits.mat) or the raw image
    release (JPEGImages/ or images/), embedded with a ResNet and read by ``release_loader``
    (``load_awa2_images`` / ``load_cub_images``)."""
    from scenarios.benchmarks._xlsa17 import check_release_path

    check_release_path(name, path, missing=MissingFileError)  # a folder with xlsa17's files or an image folder
    root = Path(path).expanduser()
    if (root / "res101.mat").exists() or (root / "att_splits.mat").exists():
        if resnet_finetune and int(resnet_finetune.get("epochs") or 0) > 0:
            raise ValueError(f"benchmark.resnet.finetune.epochs={resnet_finetune['epochs']} needs the image release, "
                             f"but {root} is an xlsa17 folder (features only): set it to 0 or point "
                             "benchmark.path at the images")
        return load_xlsa17(root, attributes=attributes, name=name.upper())
    extractor = resnet_feature_extractor(resnet_arch, resnet_weights, allow_download)
    return release_loader(root, extractor=extractor, seed=seed, device=device, progress=progress,
                          finetune=resnet_finetune)


def zero_shot_names() -> list[str]:
    """The benchmarks that give zero-shot data (``scenarios.registry``), in listing order."""
    from scenarios.registry import benchmark_entries

    return [entry.name for entry in benchmark_entries() if entry.zero_shot is not None]


def load_zsl_benchmark(name: str, path: str | None = None, *, seed: int = 0, unseen_classes: Sequence[int] = (2, 7),
                       test_fraction: float = 0.3, images: bool = False, attributes: str = "original_att",
                       resnet_arch: str = "resnet101", resnet_weights: str | None = None,
                       allow_download: bool = False, device: str = "cpu", progress: bool = False,
                       resnet_finetune: dict | None = None) -> ZSLData:
    """The zero-shot data of benchmark ``name`` (a ``scenarios/benchmarks/<name>.py`` with a ``zero_shot``
    loader: digits | npz | awa2 | cub). For awa2/cub, ``path`` is an xlsa17 folder (res101.mat +
    att_splits.mat) or the raw image release (JPEGImages/ or images/), embedded with a ResNet."""
    from scenarios.registry import get_benchmark

    name = name.lower()
    entry = get_benchmark(name)
    if entry is None or entry.zero_shot is None:
        names = zero_shot_names()
        raise ValueError(f"unknown benchmark {name!r}: choose {', '.join(names[:-1])} or {names[-1]}")
    return entry.zero_shot(path, seed=seed, unseen_classes=unseen_classes, test_fraction=test_fraction,
                           images=images, attributes=attributes, resnet_arch=resnet_arch,
                           resnet_weights=resnet_weights, allow_download=allow_download, device=device,
                           progress=progress, resnet_finetune=resnet_finetune)


def load_zsl_from_config(benchmark, *, seed: int = 0, images: bool | None = None, device: str = "cpu",
                         progress: bool = False) -> ZSLData:
    """The zero-shot data a ``benchmark`` config names (``configs/benchmark/<name>.yaml``, with the keys
    modnet gzsl / explain read). Keys a benchmark's file does not have keep ``load_zsl_benchmark``'s defaults;
    ``images`` overrides the config's ``image`` (explanations always need images)."""
    resnet = benchmark.get("resnet") or {}
    options = {"unseen_classes": benchmark.get("unseen_classes"), "test_fraction": benchmark.get("test_fraction"),
               "images": benchmark.get("image") if images is None else images,
               "attributes": benchmark.get("attributes"), "resnet_arch": resnet.get("arch"),
               "resnet_weights": resnet.get("weights"), "allow_download": resnet.get("allow_download"),
               "resnet_finetune": dict(resnet["finetune"]) if resnet.get("finetune") else None}
    return load_zsl_benchmark(benchmark.name, benchmark.get("path"), seed=seed, device=device, progress=progress,
                              **{key: value for key, value in options.items() if value is not None})


def pseudo_unseen_count(n_seen: int, unseen_fraction: float = 0.25) -> int:
    """How many seen classes ``class_disjoint_validation`` holds out as pseudo-unseen."""
    return min(max(1, int(round(unseen_fraction * n_seen))), n_seen - 2)


def class_disjoint_validation(data: ZSLData, unseen_fraction: float = 0.25, test_fraction: float = 0.2,
                              seed: int = 0) -> ZSLData:
    """A validation benchmark made from the training set only (Xian et al.'s class-disjoint train/val).

    A random ``unseen_fraction`` of the seen classes (at least one, leaving at least two seen) becomes
    pseudo-unseen: their training samples form test-unseen; the other seen classes' training samples split
    into train / test-seen. Hyper-parameters (e.g. the calibrated-stacking gamma) are chosen on it, never
    on the real test splits.
    """
    from scenarios.sources import MIN_SEEN_CLASSES  # the bound the configs are checked against, before the imports

    seen = list(data.seen_classes)
    if len(seen) < MIN_SEEN_CLASSES:
        raise ValueError(f"{data.name}: a class-disjoint validation split needs at least {MIN_SEEN_CLASSES} seen "
                         f"classes, got {len(seen)}; list fewer classes as unseen.")
    n_val = pseudo_unseen_count(len(seen), unseen_fraction)
    rng = np.random.default_rng(seed)
    pseudo_unseen = sorted(rng.choice(seen, size=n_val, replace=False).tolist())
    pseudo_seen = [c for c in seen if c not in pseudo_unseen]
    return _make(f"{data.name}-val", data.x_train.cpu().numpy(), data.y_train.cpu().numpy(), pseudo_seen,
                 pseudo_unseen, data.attributes, test_fraction, seed, data.class_names, data.attribute_names)
