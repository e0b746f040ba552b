"""What awa2 and cub share before loading: ``benchmark.path`` names a folder that ``scenarios.zsl.
load_xlsa17_or_release`` can read (checked with the file system only, before any heavy import)."""
from __future__ import annotations

from pathlib import Path


def check_release_path(name: str, path) -> None:
    """One line when ``path`` is missing, not a folder, or holds neither xlsa17's files nor an image folder."""
    if not path:
        raise ValueError(f"benchmark={name} needs benchmark.path=<xlsa17 folder (res101.mat + att_splits.mat) or "
                         "the image release folder>")
    root = Path(str(path)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"benchmark.path={path}: no such folder; point it at an xlsa17 folder or the "
                                f"{name.upper()} image release")
    if not any((root / f).exists() for f in ("res101.mat", "att_splits.mat", "JPEGImages", "images")):
        raise FileNotFoundError(f"{root} holds neither res101.mat/att_splits.mat (xlsa17) nor an image folder "
                                "(JPEGImages/ for AwA2, images/ for CUB)")
