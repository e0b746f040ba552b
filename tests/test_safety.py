"""No user file is unpickled: a crafted pickle that would create a marker folder, given to every loader of
user files, never runs (issue 14, "Unsafe")."""
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from modnet.methods.knowledge import load_word_vectors, save_word_vectors, train_word2vec

ROOT = Path(__file__).resolve().parents[1]


class _Evil:
    """Unpickling this creates the folder ``marker`` (os.mkdir): the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _crafted(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(_Evil(marker), protocol=4))
    return path


@pytest.mark.parametrize("name", ["vectors.kv", "word2vec.model", "vectors.bin", "vectors.txt", "vectors.npz",
                                  "vectors"])
def test_crafted_pickle_word_vectors_never_run(tmp_path, name):
    marker = tmp_path / "marker"
    path = _crafted(tmp_path / name, marker)
    with pytest.raises(ValueError) as err:
        load_word_vectors(path)
    assert not marker.exists()
    assert "allow_pickle" not in str(err.value) and "unsafely" not in str(err.value)
    if name.endswith((".kv", ".model")):
        assert "trust_pickle=True" in str(err.value)


def test_pickled_gensim_file_only_with_trust_pickle_and_a_warning(tmp_path):
    vectors = train_word2vec(["black and white stripes", "swims in the sea"], vector_size=8, epochs=1)
    vectors.save(str(tmp_path / "own.kv"))
    with pytest.raises(ValueError, match="trust_pickle"):
        load_word_vectors(tmp_path / "own.kv")
    with pytest.warns(UserWarning, match="unpickling"):
        trusted = load_word_vectors(tmp_path / "own.kv", trust_pickle=True)
    np.testing.assert_array_equal(trusted["stripes"], vectors["stripes"])
    # the pickle-free format: .npz of words and vectors, read without pickle
    npz = save_word_vectors(trusted, tmp_path / "own.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_word_vectors(npz)
    assert again.index_to_key == vectors.index_to_key
    np.testing.assert_array_equal(again["sea"], vectors["sea"])


def test_npz_with_pickled_object_arrays_never_runs(tmp_path):
    from scenarios.sources import load_npz_arrays
    from scenarios.zsl import load_npz_zsl

    marker = tmp_path / "marker"
    evil = np.array([_Evil(marker)], dtype=object)
    np.savez(tmp_path / "evil.npz", x_train=evil, y_train=evil, x_test=evil, y_test=evil, class_attributes=evil,
             unseen_classes=evil)
    _crafted(tmp_path / "raw.npz", marker)
    for path in (tmp_path / "evil.npz", tmp_path / "raw.npz"):
        for loader in (load_npz_arrays, load_npz_zsl):
            with pytest.raises(ValueError) as err:
                loader(path)
            assert "allow_pickle" not in str(err.value) and "unsafely" not in str(err.value)
        with pytest.raises(ValueError):
            load_word_vectors(path)
    assert not marker.exists()


def test_cli_on_a_crafted_npz_is_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    _crafted(tmp_path / "data.npz", marker)
    proc = subprocess.run([sys.executable, "-m", "modnet.cli", "cl", "benchmark=npz",
                           f"benchmark.path={tmp_path / 'data.npz'}", f"output_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.npz" in lines[0] and "Traceback" not in proc.stderr
    assert "allow_pickle" not in proc.stderr and not marker.exists()


def test_no_error_text_advises_unsafe_loading():
    for folder in ("modnet", "scenarios", "strategies"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert "allow_pickle=True" not in text and "allow_pickle` keyword" not in text, path
            assert "pickle.load(" not in text, path
