"""What awa2 and cub share before loading: ``benchmark.path`` names a folder that ``scenarios.zsl.
load_xlsa17_or_release`` can read (checked with the file system only, before any heavy import)."""
from __future__ import annotations

from pathlib import Path


def check_release_path(name: str, path, missing: type[Exception] = FileNotFoundError) -> None:
    """One line when ``path`` is missing, not a folder, or holds neither xlsa17's files nor an image folder
    (``missing``: the error class of the last two; the loader passes its ``MissingFileError``)."""
    if not path:
        raise ValueError(f"benchmark={name} needs benchmark.path=<xlsa17 folder (res101.mat + att_splits.mat) or "
                         "the image release folder>")
    root = Path(str(path)).expanduser()
    if not root.is_dir():
        raise missing(f"benchmark.path={path}: no such folder; point it at an xlsa17 folder or the "
                      f"{name.upper()} image release")
    if any((root / d).is_dir() for d in ("JPEGImages", "images")):
        return
    present = [f for f in ("res101.mat", "att_splits.mat") if (root / f).exists()]
    if not present:
        raise missing(f"{root} holds neither res101.mat/att_splits.mat (xlsa17) nor an image folder "
                      "(JPEGImages/ for AwA2, images/ for CUB)")
    if len(present) == 1:  # one of the two passed here and failed after the imports
        lacking = "att_splits.mat" if present == ["res101.mat"] else "res101.mat"
        raise missing(f"{root} has {present[0]} but not {lacking}; an xlsa17 folder needs both (res101.mat: the "
                      "features, att_splits.mat: the class attributes and splits)")
