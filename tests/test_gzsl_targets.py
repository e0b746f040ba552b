"""The issue's zero-shot target, in the same command: NIWT's H above ESZSL's, U well above chance (3 seeds)."""
import json

import numpy as np
import pytest

from modnet.cli import main


def _means(path):
    res = json.loads(path.read_text())["methods"]
    return {m: (v["H"], v["U"]) for m, v in res.items()}


def _npz(tmp_path):
    from sklearn.datasets import load_digits

    from scenarios.zsl import digit_attributes

    d = load_digits()
    x, y = (d.data / 16).astype(np.float32), d.target
    att, names = digit_attributes()
    order = np.random.default_rng(7).permutation(len(y))
    x, y = x[order], y[order]
    unseen = [2, 7]
    keep = ~np.isin(y[:1300], unseen)  # training samples of seen classes only
    path = tmp_path / "zsl.npz"
    np.savez(path, x_train=x[:1300][keep], y_train=y[:1300][keep], x_test=x[1300:], y_test=y[1300:],
             class_attributes=att, unseen_classes=np.array(unseen), attribute_names=np.array(names))
    return path


@pytest.mark.parametrize("source", ["digits", "npz"])
def test_niwt_beats_eszsl_with_unseen_accuracy_well_above_chance(tmp_path, source):
    extra = [] if source == "digits" else ["benchmark=npz", f"benchmark.path={_npz(tmp_path)}"]
    assert main(["gzsl", "seeds=[0,1,2]", "progress=false", f"output_dir={tmp_path / 'o'}", *extra]) == 0
    m = _means(tmp_path / "o" / "results.json")
    assert m["niwt"][0] > m["eszsl"][0]
    assert m["niwt"][1] > 0.3  # chance over 10 classes is 0.1
