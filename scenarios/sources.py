"""Data sources: the embedded digits, a user's .npz, and torchvision data sets (downloaded only when allowed)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# class_disjoint_validation (scenarios.zsl) holds out at least one seen class and keeps at least two
MIN_SEEN_CLASSES = 3


def load_digits_arrays(test_fraction: float = 0.3, image: bool = False, split_seed: int = 0):
    """scikit-learn's 8x8 digits (1,797 images, ships with scikit-learn): a stratified train/test split,
    pixels scaled to [0, 1]; ``image`` gives (N, 1, 8, 8) instead of (N, 64)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_fraction, stratify=d.target,
                                          random_state=split_seed)
    return _tensors(xtr, ytr, xte, yte)


def _tensors(xtr, ytr, xte, yte):
    import torch

    return (torch.as_tensor(xtr, dtype=torch.float32), torch.as_tensor(ytr, dtype=torch.long),
            torch.as_tensor(xte, dtype=torch.float32), torch.as_tensor(yte, dtype=torch.long))


def read_npz(path: str | Path) -> dict:
    """Every array of a ``.npz`` (``numpy.savez``), never unpickling: an object array, or a file that is not an
    .npz archive, is a ValueError saying to write plain numeric/string arrays with numpy.savez."""
    path = Path(path)
    try:
        f = np.load(path, allow_pickle=False)
        if isinstance(f, np.ndarray):  # a bare .npy (whatever its name): np.load gives the array itself
            raise ValueError(f"{path} is a single .npy array, not an .npz archive; write the arrays with "
                             "numpy.savez(path, x_train=..., y_train=..., ...)")
        with f:
            return {k: f[k] for k in f.files}
    except ValueError as err:
        if "Object arrays" in str(err):
            raise ValueError(f"{path} holds an array of Python objects, which is never loaded (it would be "
                             "unpickled); store numbers, or strings as a str array, with numpy.savez") from None
        if "pickle" in str(err):  # not a zip nor .npy: numpy would read it as a pickle
            raise ValueError(f"could not read {path}: not a readable .npz file; write it with numpy.savez") from None
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"could not read {path}: not a readable .npz file ({type(err).__name__}: {err}); "
                         "write it with numpy.savez") from None


def load_npz_arrays(path: str | Path):
    """A user's arrays: ``x_train (N, D) or (N, C, H, W)``, ``y_train (N,)`` integer labels, same for test.

    Every problem is reported before training starts, with what to change.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}; set benchmark.path to an existing .npz with "
                                f"arrays {', '.join(NPZ_KEYS)}")
    arrays = check_npz_arrays(path, read_npz(path))
    return _tensors(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"])


def integer_labels(path, name: str, y: np.ndarray) -> np.ndarray:
    """``y`` as int64 when it holds whole numbers; strings, fractions, NaN are one ValueError line (a label is
    never truncated)."""
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating) or y.dtype == np.bool_):
        sample = ", ".join(repr(v) for v in y.ravel()[:3].tolist())
        raise ValueError(f"{path}: {name} holds {'strings' if y.dtype.kind in 'US' else y.dtype} ({sample}, ...), "
                         "not integer class ids; store ids 0..C-1 (e.g. np.unique(names, return_inverse=True)[1])")
    if not np.issubdtype(y.dtype, np.integer):
        bad = ~np.isfinite(y) | (np.mod(np.nan_to_num(y), 1) != 0)
        if bad.any():
            raise ValueError(f"{path}: {name} holds non-integer labels (e.g. {y[bad][:3].tolist()}); store class "
                             "ids 0..C-1 as integers")
    return y.astype(np.int64)


def check_x_array(path, name: str, x: np.ndarray) -> None:
    """A user's input array: (N, D) vectors or (N, C, H, W) images, numeric and finite (one ValueError line each;
    the continual and the zero-shot .npz alike). Images with their channels last (N, H, W, C), a common layout
    elsewhere, are named as such: taken as (N, C, H, W) they are 'too small for the pooling blocks', or train on
    the wrong axes."""
    if x.ndim not in (2, 4):
        raise ValueError(f"{path}: {name} has shape {x.shape}; use (N, D) vectors or (N, C, H, W) images"
                         + (" (grayscale: x[:, None] adds the channel axis)" if x.ndim == 3 else ""))
    if x.ndim == 4 and x.shape[3] <= 4 and x.shape[1] == x.shape[2] >= 8:
        raise ValueError(f"{path}: {name} has shape {x.shape}, images with their channels last (N, H, W, C); "
                         "use (N, C, H, W): np.transpose(x, (0, 3, 1, 2))")
    if np.iscomplexobj(x):  # taken as float, the imaginary part was dropped with only a torch warning
        raise ValueError(f"{path}: {name} holds complex numbers ({x.dtype}); give real features, e.g. np.abs(x) or "
                         "np.concatenate([x.real, x.imag], axis=1)")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise ValueError(f"{path}: {name} contains NaN or infinite values (or is not numeric); "
                         "clean or impute them before training")


def check_npz_arrays(path: str | Path, arrays: dict) -> dict:
    """The continual-learning arrays of a user's .npz, checked (numpy only, no torch: ``modnet.validate``
    runs this before any heavy import): one ValueError line per problem, naming the array and what to change.

    Labels must be integers (integer dtype, or floats with whole values) and the class ids 0..C-1 with C the
    number of classes of y_train (no remapping: ids like [3, 7, 9] are an error that says how to remap).
    Returns the four arrays, labels as int64."""
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing array(s) {missing}; the file has {sorted(arrays)} and needs "
                         f"{list(NPZ_KEYS)}")
    arrays = {k: arrays[k] for k in NPZ_KEYS}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        check_x_array(path, f"x_{split}", x)
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{path}: y_{split} has shape {y.shape} but x_{split} has {len(x)} rows; "
                             f"labels must be a vector with one integer per row of x_{split}")
        y = integer_labels(path, f"y_{split}", y)
        if len(y) and y.min() < 0:
            raise ValueError(f"{path}: y_{split} has negative labels; use class ids 0..C-1")
        arrays[f"y_{split}"] = y.astype(np.int64)
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(f"{path}: x_train samples have shape {arrays['x_train'].shape[1:]} but x_test "
                         f"{arrays['x_test'].shape[1:]}; both must match")
    if not len(arrays["y_train"]):
        raise ValueError(f"{path}: y_train is empty; continual learning needs training samples")
    ids = np.unique(arrays["y_train"])
    if not np.array_equal(ids, np.arange(len(ids))):
        shown = ids[:8].tolist()
        raise ValueError(f"{path}: y_train class ids must be 0..C-1 ({len(ids)} classes: 0..{len(ids) - 1}), got "
                         f"{shown}{' ...' if len(ids) > 8 else ''}; remap them, e.g. "
                         "y = np.unique(y_train, return_inverse=True)[1] (and the same mapping for y_test)")
    if len(ids) < 2:  # one class: accuracy 1.0 and forgetting 0 by construction
        raise ValueError(f"{path}: y_train has a single class ({int(ids[0])}); classification needs at least 2 "
                         "classes (a continual benchmark at least 2 per experience)")
    unseen = set(np.unique(arrays["y_test"])) - set(ids)
    if unseen:
        raise ValueError(f"{path}: y_test has classes {sorted(int(c) for c in unseen)} that y_train lacks; "
                         "every test class needs training samples in continual learning")
    return arrays


TORCHVISION = {"mnist": "MNIST", "fmnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def load_torchvision_arrays(name: str, root: str | Path, download: bool):
    """MNIST, Fashion-MNIST, CIFAR-10/100 through torchvision, as float tensors in [0, 1] (N, C, H, W).

    Files are downloaded only when ``download`` is true; otherwise (or offline) a missing data set is an
    error that says where the files are expected and how to allow the download.
    """
    import torch
    import torchvision

    if name not in TORCHVISION:
        raise ValueError(f"unknown torchvision benchmark {name!r}; choose one of {sorted(TORCHVISION)}")
    cls = getattr(torchvision.datasets, TORCHVISION[name])
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]  # torchvision's messages run to lines
        if download:  # MNIST's failed download is a RuntimeError ("Error downloading ..."), CIFAR's an OSError
            raise ConnectionError(f"could not download {TORCHVISION[name]} to {root} ({why}); this machine seems "
                                  "offline: copy the data set there and set benchmark.download=false") from err
        # torchvision: "Dataset not found. You can use download=True ..."
        raise FileNotFoundError(f"{TORCHVISION[name]} not found under {root} ({why}); put its files there, or run "
                                "with benchmark.download=true on a machine with internet access") from err

    def arrays(ds):
        x = torch.as_tensor(np.asarray(ds.data), dtype=torch.float32) / 255.0
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return x, torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)

    return (*arrays(train), *arrays(test))


ZSL_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "class_attributes", "unseen_classes")


def check_zsl_npz(path, arrays, min_seen: int = 1) -> tuple:
    """The zero-shot arrays of a user's .npz, checked with numpy only (``modnet.validate`` runs this before any
    heavy import; ``scenarios.zsl.load_npz_zsl`` before building the data): one ValueError line per problem.
    Returns (x_train, y_train, x_test, y_test, class_attributes as float64, seen class ids, unseen class ids)."""
    missing_keys = [k for k in ZSL_NPZ_KEYS if k not in arrays]
    if missing_keys:
        raise ValueError(f"{path} lacks the arrays {missing_keys}; it needs {list(ZSL_NPZ_KEYS)} "
                         "(+ optional attribute_names, class_names).")
    att_raw = np.asarray(arrays["class_attributes"], dtype=np.float64)
    if att_raw.ndim != 2:
        raise ValueError(f"class_attributes must be [n_classes, n_attributes], got shape {att_raw.shape}")
    nan_rows = np.nonzero(~np.isfinite(att_raw).all(1))[0].tolist()
    if nan_rows:
        raise ValueError(f"class_attributes rows {nan_rows} contain NaN/inf: every class needs a complete "
                         "attribute vector (mark unknown entries with -1 to have them filled).")
    n_classes = att_raw.shape[0]
    y_train = integer_labels(path, "y_train", np.asarray(arrays["y_train"])).ravel()
    y_test = integer_labels(path, "y_test", np.asarray(arrays["y_test"])).ravel()
    if not len(y_train) or not len(y_test):
        raise ValueError(f"{path}: y_train and y_test need samples (got {len(y_train)} and {len(y_test)})")
    labels = np.concatenate([y_train, y_test])
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}] but class_attributes has {n_classes} rows; "
                         "labels must be class ids 0..n_classes-1 with one attribute row per class.")
    unseen_raw = np.asarray(arrays["unseen_classes"])
    if unseen_raw.ndim != 1:
        raise ValueError(f"{path}: unseen_classes must be a 1-d array of class ids, got shape {unseen_raw.shape}")
    unseen_list = integer_labels(path, "unseen_classes", unseen_raw).tolist()  # 2.6 ran as class 2
    repeated = sorted({c for c in unseen_list if unseen_list.count(c) > 1})
    if repeated:
        raise ValueError(f"{path}: unseen_classes lists {repeated} more than once; name each unseen class once")
    unseen = sorted(int(c) for c in unseen_list)
    if not unseen or min(unseen) < 0 or max(unseen) >= n_classes:
        raise ValueError(f"unseen_classes {unseen} must be non-empty class ids in [0, {n_classes})")
    leaked = sorted(set(y_train.tolist()) & set(unseen))
    if leaked:
        raise ValueError(f"unseen classes {leaked} have samples in x_train/y_train; zero-shot training uses "
                         "seen classes only: move those samples to x_test or drop the classes from unseen_classes.")
    for name in ("x_train", "x_test"):
        check_x_array(path, name, np.asarray(arrays[name]))
    x_train, x_test = np.asarray(arrays["x_train"], dtype=np.float32), np.asarray(arrays["x_test"], dtype=np.float32)
    if x_train.shape[0] != len(y_train) or x_test.shape[0] != len(y_test):
        raise ValueError(f"x_train/y_train ({x_train.shape[0]}/{len(y_train)}) or x_test/y_test "
                         f"({x_test.shape[0]}/{len(y_test)}) differ in length")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{path}: x_train samples have shape {x_train.shape[1:]} but x_test {x_test.shape[1:]}; "
                         "both must match")
    seen = sorted(set(range(n_classes)) - set(unseen))
    for u in unseen:  # an unseen class described as another class cannot be told from it by any zero-shot method
        twins = [c for c in range(n_classes) if c != u and np.array_equal(att_raw[c], att_raw[u])]
        if twins:
            raise ValueError(f"{path}: unseen class {u} has the same class_attributes row as class(es) {twins[:5]}; "
                             "zero-shot recognition tells classes apart by their attributes: give it its own row")
    if len(seen) < min_seen:  # gzsl: MIN_SEEN_CLASSES
        raise ValueError(f"{path}: {len(seen)} seen classes; a GZSL run needs at least {min_seen} (its "
                         "hyper-parameters are chosen on class-disjoint validation splits of the seen classes, "
                         "which hold one out and keep two): list fewer classes in unseen_classes")
    phantom = sorted(set(seen) - set(y_train.tolist()))
    if phantom:
        raise ValueError(f"{path}: class_attributes has {n_classes} rows but seen classes {phantom[:10]} have no "
                         "sample in y_train; one attribute row per class that has samples (drop the extra rows, "
                         "or list those classes in unseen_classes)")
    counts = np.bincount(y_train, minlength=n_classes)
    single = [c for c in seen if counts[c] < 2]
    if single:
        raise ValueError(f"{path}: seen classes {single[:10]} have fewer than 2 training samples; the class-disjoint "
                         "validation splits each seen class's training samples into training and test: give each "
                         "at least 2 (or list the class in unseen_classes)")
    absent = sorted(set(unseen) - set(y_test.tolist()))
    if absent:
        raise ValueError(f"{path}: unseen classes {absent[:10]} have no sample in y_test; every unseen class must be "
                         "in the test set (or drop it from unseen_classes and class_attributes)")
    for key, count, what in (("class_names", n_classes, "class_attributes rows"),
                             ("attribute_names", att_raw.shape[1], "class_attributes columns")):
        if key in arrays and len(np.asarray(arrays[key]).ravel()) != count:
            raise ValueError(f"{path}: {key} has {len(np.asarray(arrays[key]).ravel())} names for {count} {what}; "
                             "give one name each (or leave the array out)")
    return x_train, y_train, x_test, y_test, att_raw, seen, unseen
