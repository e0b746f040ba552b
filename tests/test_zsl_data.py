"""GZSL data loaders (scenarios/zsl.py) against the real xlsa17 split files and hand-made inputs.

tests/data/zsl/{AWA2,CUB} hold copies of the real att_splits.mat (Xian et al.'s proposed splits) and the
class lists of the releases; res101.mat is synthesised with the real keys and sample count (features of
8 dimensions instead of 2048, to stay small) and with features that encode the 1-based image id.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from modnet.methods.knowledge import MissingFileError
from scenarios.zsl import (DIGIT_SEGMENTS, class_disjoint_validation, load_awa2_images, load_digits_zsl,
                           load_npz_zsl, load_xlsa17, load_zsl_benchmark, resnet_feature_extractor)

DATA = Path(__file__).parent / "data" / "zsl"


def _names(path: Path) -> list[str]:
    return [line.split(None, 1)[-1].strip() for line in path.read_text().splitlines() if line.strip()]


def _synthetic_res101(split_dir: Path, out: Path) -> dict:
    """res101.mat consistent with the real split: unseen-class labels at test_unseen_loc, seen elsewhere.

    Row i of features.T is [i + 1, label, noise...]: the 1-based image id and the 1-based label.
    """
    split = scipy.io.loadmat(str(split_dir / "att_splits.mat"))
    names = [str(c[0][0]) for c in split["allclasses_names"]]
    unseen_names = _names(split_dir / "testclasses.txt")
    unseen_ids = [names.index(n) for n in unseen_names]
    seen_ids = [i for i in range(len(names)) if i not in unseen_ids]
    n = int(max(split[k].max() for k in ("trainval_loc", "test_seen_loc", "test_unseen_loc")))
    labels = np.array([seen_ids[i % len(seen_ids)] for i in range(n)])
    unseen_loc = split["test_unseen_loc"].ravel().astype(int) - 1
    labels[unseen_loc] = [unseen_ids[i % len(unseen_ids)] for i in range(len(unseen_loc))]
    rng = np.random.default_rng(0)
    features = np.concatenate([np.arange(1, n + 1)[None], labels[None] + 1, rng.normal(size=(6, n))]).astype(np.float32)
    scipy.io.savemat(str(out), {"features": features, "labels": (labels + 1)[:, None].astype(np.int16),
                                "image_files": np.array([f"img{i}.jpg" for i in range(3)], dtype=object)})
    return {"split": split, "names": names, "unseen_names": unseen_names, "n": n}


@pytest.mark.parametrize("dataset, counts, n_seen, n_unseen", [
    ("AWA2", (23527, 5882, 7913), 40, 10),
    ("CUB", (7057, 1764, 2967), 150, 50),
])
def test_xlsa17_counts_order_and_one_based_locations(tmp_path, dataset, counts, n_seen, n_unseen):
    info = _synthetic_res101(DATA / dataset, tmp_path / "res101.mat")
    data = load_xlsa17(res101=tmp_path / "res101.mat", att_splits=DATA / dataset / "att_splits.mat")
    assert (len(data.y_train), len(data.y_test_seen), len(data.y_test_unseen)) == counts
    assert (len(data.seen_classes), len(data.unseen_classes)) == (n_seen, n_unseen)
    # class order is allclasses_names (for CUB NOT classes.txt, whose first class is 001.Black_footed_Albatross)
    assert data.class_names == info["names"]
    assert sorted(data.class_names[c] for c in data.unseen_classes) == sorted(info["unseen_names"])
    trainval = _names(DATA / dataset / "trainvalclasses.txt")
    assert sorted(data.class_names[c] for c in data.seen_classes) == sorted(trainval)
    # 1-based uint16 locations: sample j of train is image trainval_loc[j]; labels are 1-based too
    split = info["split"]
    np.testing.assert_array_equal(data.x_train[:, 0].numpy(), split["trainval_loc"].ravel().astype(np.float32))
    np.testing.assert_array_equal(data.x_test_unseen[:, 0].numpy(), split["test_unseen_loc"].ravel().astype(np.float32))
    np.testing.assert_array_equal(data.y_train.numpy() + 1, data.x_train[:, 1].numpy().astype(int))
    assert data.x_train.shape[1] == 8 and data.attributes.shape[0] == len(info["names"])


def test_cub_class_order_and_attribute_names(tmp_path):
    _synthetic_res101(DATA / "CUB", tmp_path / "res101.mat")
    data = load_xlsa17(res101=tmp_path / "res101.mat", att_splits=DATA / "CUB" / "att_splits.mat")
    classes_txt = _names(DATA / "CUB" / "classes.txt")
    assert data.class_names[0] == "002.Laysan_Albatross" != classes_txt[0]
    assert sorted(data.class_names) == sorted(classes_txt) and data.class_names != classes_txt
    assert len(data.attribute_names) == 312 and data.attribute_names[0] == "has_bill_shape::curved_(up_or_down)"
    assert data.name == "CUB"


def test_awa2_missing_values_filled_and_rows_match_xlsa17_att(tmp_path):
    _synthetic_res101(DATA / "AWA2", tmp_path / "res101.mat")
    split = scipy.io.loadmat(str(DATA / "AWA2" / "att_splits.mat"))
    original, att = split["original_att"], split["att"]          # [85, 50]
    data = load_xlsa17(res101=tmp_path / "res101.mat", att_splits=DATA / "AWA2" / "att_splits.mat")
    a = data.attributes.double().numpy()                             # [50, 85]
    missing = np.argwhere(original == -1)
    assert {tuple(m) for m in missing} == {(0, 0), (1, 0), (2, 0), (3, 0)}  # four antelope predicates
    # every class without missing values: exactly xlsa17's own L2-normalised att
    np.testing.assert_allclose(a[1:], att.T[1:], atol=1e-6)
    # antelope: -1 replaced by the predicate's mean over the 49 other classes, then L2-normalised
    row = original[:, 0].astype(float).copy()
    for p in missing[:, 0]:
        row[p] = original[p, 1:].mean()
    np.testing.assert_allclose(a[0], row / np.linalg.norm(row), atol=1e-6)
    assert (a >= 0).all() and data.attribute_names[:2] == ["black", "white"]
    # attributes="att" keeps the shipped matrix as is (its -1 entries became small negatives)
    raw = load_xlsa17(res101=tmp_path / "res101.mat", att_splits=DATA / "AWA2" / "att_splits.mat", attributes="att")
    np.testing.assert_allclose(raw.attributes.double().numpy(), att.T, atol=1e-6)


def test_xlsa17_errors(tmp_path):
    with pytest.raises(MissingFileError, match="res101.mat not found"):
        load_xlsa17(res101=tmp_path / "res101.mat", att_splits=DATA / "AWA2" / "att_splits.mat")
    (tmp_path / "res101.mat").write_bytes(b"this is not a MATLAB file" * 10)
    with pytest.raises(ValueError, match="not a readable MATLAB"):
        load_xlsa17(res101=tmp_path / "res101.mat", att_splits=DATA / "AWA2" / "att_splits.mat")
    # a res101.mat with fewer samples than the split's locations: the files do not belong together
    scipy.io.savemat(str(tmp_path / "res101.mat"), {"features": np.zeros((4, 100), np.float32),
                                                     "labels": np.ones((100, 1), np.int16)})
    with pytest.raises(ValueError, match="1-based"):
        load_xlsa17(res101=tmp_path / "res101.mat", att_splits=DATA / "AWA2" / "att_splits.mat")
    with pytest.raises(MissingFileError):
        load_zsl_benchmark("awa2", str(tmp_path / "nowhere"))


def test_digits_seven_segments_and_split():
    data = load_digits_zsl((2, 7), seed=0)
    assert data.seen_classes == [0, 1, 3, 4, 5, 6, 8, 9] and data.unseen_classes == [2, 7]
    assert len(data.y_train) + len(data.y_test_seen) + len(data.y_test_unseen) == 1797
    assert not set(data.y_train.tolist()) & {2, 7} and set(data.y_test_unseen.tolist()) == {2, 7}
    # seven-segment ground truth: 8 lights all segments, 1 only the two right ones, 7 = 1 + top
    assert DIGIT_SEGMENTS[8].sum() == 7 and DIGIT_SEGMENTS[1].tolist() == [0, 1, 1, 0, 0, 0, 0]
    assert (DIGIT_SEGMENTS[7] - DIGIT_SEGMENTS[1]).tolist() == [1, 0, 0, 0, 0, 0, 0]
    assert data.attributes.shape == (10, 8) and torch.allclose(data.attributes.norm(dim=1), torch.ones(10))
    assert len(torch.unique(data.attributes, dim=0)) == 10       # every digit has its own attribute vector
    images = load_digits_zsl((2, 7), seed=0, images=True)
    assert images.x_train.shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match="digits 0..9"):
        load_digits_zsl((3, 12))


def test_class_disjoint_validation_uses_training_data_only():
    data = load_digits_zsl((2, 7), seed=0)
    val = class_disjoint_validation(data, unseen_fraction=0.25, seed=0)
    assert len(val.unseen_classes) == 2 and not set(val.unseen_classes) & {2, 7}
    assert set(val.seen_classes) | set(val.unseen_classes) == set(data.seen_classes)
    assert len(val.y_train) + len(val.y_test_seen) + len(val.y_test_unseen) == len(data.y_train)
    assert not set(val.y_train.tolist()) & set(val.unseen_classes)


def _digits_npz(path: Path, **changes) -> Path:
    from sklearn.datasets import load_digits

    from scenarios.zsl import digit_attributes

    d = load_digits()
    x, y = d.data[:400].astype(np.float32), d.target[:400]
    train = ~np.isin(y, [2, 7]) & (np.arange(400) < 300)
    arrays = dict(x_train=x[train], y_train=y[train], x_test=x[~train], y_test=y[~train],
                  class_attributes=digit_attributes()[0], unseen_classes=np.array([2, 7]),
                  attribute_names=np.array(digit_attributes()[1]))
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_npz_loader_and_its_errors(tmp_path):
    data = load_npz_zsl(_digits_npz(tmp_path / "ok.npz"))
    assert data.unseen_classes == [2, 7] and len(data.seen_classes) == 8
    assert set(data.y_test_unseen.tolist()) == {2, 7} and not set(data.y_test_seen.tolist()) & {2, 7}
    assert data.attribute_names[0] == "segment_top"

    with pytest.raises(MissingFileError, match="not found"):
        load_npz_zsl(tmp_path / "missing.npz")
    att9 = _digits_npz(tmp_path / "a.npz", class_attributes=np.ones((9, 8)))   # 10 classes, 9 attribute rows
    with pytest.raises(ValueError, match="9 rows"):
        load_npz_zsl(att9)
    nan_att = np.ones((10, 8))
    nan_att[4, 2] = np.nan
    with pytest.raises(ValueError, match=r"rows \[4\].*NaN"):
        load_npz_zsl(_digits_npz(tmp_path / "n.npz", class_attributes=nan_att))
    with pytest.raises(ValueError, match=r"unseen classes \[3\] have samples in x_train"):
        load_npz_zsl(_digits_npz(tmp_path / "l.npz", unseen_classes=np.array([2, 3, 7])))
    with pytest.raises(ValueError, match="lacks the arrays"):
        load_npz_zsl(_digits_npz(tmp_path / "k.npz", unseen_classes=None))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not read"):
        load_npz_zsl(tmp_path / "bad.npz")


def test_raw_image_folder_through_a_local_resnet(tmp_path):
    from PIL import Image
    from torchvision.models import resnet18

    root = tmp_path / "AwA2"
    classes = ["zebra", "horse", "tiger"]
    rng = np.random.default_rng(0)
    for c in classes:
        (root / "JPEGImages" / c).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "JPEGImages" / c / f"{i}.jpg")
    (root / "classes.txt").write_text("".join(f"{i + 1}\t{c}\n" for i, c in enumerate(classes)))
    (root / "predicates.txt").write_text("1\tstripes\n2\thooves\n")
    (root / "predicate-matrix-continuous.txt").write_text("90 80\n5 95\n85 -1\n")
    (root / "trainvalclasses.txt").write_text("zebra\nhorse\n")
    (root / "testclasses.txt").write_text("tiger\n")

    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    extractor = resnet_feature_extractor("resnet18", tmp_path / "r18.pth")
    data = load_awa2_images(root, extractor=extractor, image_size=32, test_seen_fraction=0.2)
    assert data.x_train.shape == (8, 512) and data.x_test_seen.shape == (2, 512)
    assert data.x_test_unseen.shape == (5, 512)
    assert data.seen_classes == [0, 1] and data.unseen_classes == [2] and data.attribute_names == ["stripes", "hooves"]
    # the tiger's missing (-1) "hooves" value is filled with the mean of zebra's and horse's
    expected = torch.tensor([85.0, (80 + 95) / 2])
    assert torch.allclose(data.attributes[2], expected / expected.norm(), atol=1e-6)
    # features are the ResNet's pooled features of the images, in the class-folder order
    assert torch.isfinite(data.x_train).all() and data.x_train.std() > 0

    with pytest.raises(MissingFileError, match="weights not found"):
        resnet_feature_extractor("resnet18", tmp_path / "none.pth")
    with pytest.raises(ValueError, match="weights_path"):
        resnet_feature_extractor("resnet18", None, allow_download=False)
    (root / "testclasses.txt").write_text("lion\n")
    with pytest.raises(ValueError, match=r"\['lion'\] are not in the class list"):
        load_awa2_images(root, extractor=extractor, image_size=32)


def test_resnet_finetuning_sees_only_the_seen_training_images(tmp_path, monkeypatch):
    """benchmark.resnet.finetune: the ResNet is fine-tuned on exactly the training images of the split the data
    then uses (no test-seen image, no unseen class), and the features change; on an xlsa17 folder (features
    only) it is one clear error."""
    from PIL import Image
    from torchvision.models import resnet18

    import scenarios.zsl as zsl

    root = tmp_path / "AwA2"
    classes = ["zebra", "horse", "tiger"]
    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / "JPEGImages" / c).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 80, (40, 48, 3), dtype=np.uint8)
            pixels[..., k] += 150  # a colour per class
            Image.fromarray(pixels).save(root / "JPEGImages" / c / f"{i}.jpg")
    (root / "classes.txt").write_text("".join(f"{i + 1}\t{c}\n" for i, c in enumerate(classes)))
    (root / "predicate-matrix-continuous.txt").write_text("90 80\n5 95\n85 10\n")
    (root / "trainvalclasses.txt").write_text("zebra\nhorse\n")
    (root / "testclasses.txt").write_text("tiger\n")
    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "r18.pth")

    seen_by_finetuning = []
    real = zsl.finetune_extractor

    def spy(extractor, files, labels, **kw):
        seen_by_finetuning.append((list(files), list(labels), kw))
        return real(extractor, files, labels, **kw)

    monkeypatch.setattr(zsl, "finetune_extractor", spy)
    plain = load_awa2_images(root, extractor=resnet_feature_extractor("resnet18", tmp_path / "r18.pth"),
                             image_size=32, test_seen_fraction=0.25)
    assert not seen_by_finetuning  # off unless asked
    extractor = resnet_feature_extractor("resnet18", tmp_path / "r18.pth")
    before = [p.detach().clone() for p in extractor.parameters()]
    tuned = load_awa2_images(root, extractor=extractor, image_size=32, test_seen_fraction=0.25,
                             finetune={"epochs": 2, "lr": 0.01, "batch_size": 4})
    (files, labels, kw), = seen_by_finetuning
    assert kw["epochs"] == 2 and kw["lr"] == 0.01 and kw["batch_size"] == 4
    # exactly the training split: its size and class counts, seen classes only, no tiger image
    assert len(files) == tuned.x_train.shape[0] == plain.x_train.shape[0]
    assert np.bincount(labels, minlength=3).tolist() == torch.bincount(tuned.y_train, minlength=3).tolist()
    assert all("tiger" not in str(f) for f in files) and set(labels) == {0, 1}
    assert torch.equal(tuned.y_test_seen, plain.y_test_seen)
    assert any(not torch.equal(a, b) for a, b in zip(before, extractor.parameters()))
    assert not torch.allclose(tuned.x_train, plain.x_train) and torch.isfinite(tuned.x_test_unseen).all()

    xlsa = tmp_path / "xlsa"
    xlsa.mkdir()
    for name in ("res101.mat", "att_splits.mat"):  # an xlsa17 folder (one of the two alone is refused first)
        (xlsa / name).write_bytes(b"")
    with pytest.raises(ValueError, match="needs the image release"):
        zsl.load_xlsa17_or_release("awa2", str(xlsa), load_awa2_images, resnet_finetune={"epochs": 1})


def test_xlsa17_features_with_nan_are_named_at_load(tmp_path):
    """NaN features trained two validation networks, then failed in scikit-learn's words naming no file."""
    _synthetic_res101(DATA / "AWA2", tmp_path / "res101.mat")
    mat = scipy.io.loadmat(str(tmp_path / "res101.mat"))
    mat["features"][3, 10] = np.nan  # image 10 (column 10 of the 2048 x N matrix)
    scipy.io.savemat(str(tmp_path / "res101.mat"), {k: v for k, v in mat.items() if not k.startswith("__")})
    with pytest.raises(ValueError) as err:
        load_xlsa17(res101=tmp_path / "res101.mat", att_splits=DATA / "AWA2" / "att_splits.mat")
    assert "res101.mat" in str(err.value) and "NaN" in str(err.value) and "[10]" in str(err.value)
