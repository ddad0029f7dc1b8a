"""Recognise a dataset folder's layout and open it as a :class:`NucleiDataset`.

``open_dataset(path)`` is what CLI commands and training recipes call with a user's
folder: it picks the reader from the files present, so users never name the format unless
a folder is ambiguous.

==========  =====================================================================
layout      recognised by
==========  =====================================================================
pannuke     ``images.npy`` + ``masks.npy`` (or ``images/<fold>/images.npy`` +
            ``masks/<fold>/masks.npy``, the official download's nesting)
conic       ``images.npy`` + ``labels.npy``
folder      ``images/`` + ``labels/`` folders
==========  =====================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from studio.data.base import NucleiDataset
from studio.data.conic import CoNICDataset
from studio.data.folder import FolderDataset
from studio.data.pannuke import PanNukeDataset, find_pannuke_files
from studio.errors import InputError

LAYOUTS: dict[str, Callable[..., NucleiDataset]] = {
    "pannuke": PanNukeDataset,
    "conic": CoNICDataset,
    "folder": FolderDataset,
}
LOOKED_FOR = (
    "images.npy + masks.npy (PanNuke fold), images/<fold>/images.npy + masks/<fold>/masks.npy "
    "(PanNuke download), images.npy + labels.npy (CoNIC), images/ + labels/ folders (folder layout)"
)


def _matches(path: Path) -> list[str]:
    found = []
    if find_pannuke_files(path) is not None:
        found.append("pannuke")
    if (path / "images.npy").is_file() and (path / "labels.npy").is_file():
        found.append("conic")
    if (path / "images").is_dir() and (path / "labels").is_dir():
        found.append("folder")
    return found


def detect_layout(path: str | Path) -> str:
    """``"pannuke"``, ``"conic"`` or ``"folder"`` for a dataset folder.

    Raises:
        InputError: not a folder, no layout matches (the message lists what was looked
            for and what is there), or several match (name one with ``layout=``).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such folder")
    if not path.is_dir():
        raise InputError(path, "is a file; give the dataset folder")
    found = _matches(path)
    if not found:
        present = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        shown = ", ".join(present[:10]) + (f" and {len(present) - 10} more" if len(present) > 10 else "")
        raise InputError(
            path, f"no known dataset layout; looked for {LOOKED_FOR}; found {shown or 'nothing'}"
        )
    if len(found) > 1:
        raise InputError(path, f"matches several layouts {found}; pass layout= one of them")
    return found[0]


def open_dataset(path: str | Path, layout: str | None = None, **kwargs: Any) -> NucleiDataset:
    """Open a dataset folder with the reader for its layout (detected unless given).

    Extra keyword arguments go to the reader (e.g. ``source="synthetic"``).
    """
    if layout is None:
        layout = detect_layout(path)
    if layout not in LAYOUTS:
        raise InputError("layout", f"{layout!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout](path, **kwargs)


def write_dataset(path: str | Path, samples: Any, layout: str, *, overwrite: bool = False) -> Path:
    """Write PanNuke-coded samples in ``layout`` (all-or-nothing), the mirror of
    :func:`open_dataset`. CoNIC has its own class codes: PanNuke classes are mapped with
    :data:`studio.data.conic.PANNUKE_TO_CONIC` (dead nuclei have no CoNIC class: refused)."""
    from dataclasses import replace

    from studio.data.base import as_samples
    from studio.data.conic import pannuke_to_conic, write_conic
    from studio.data.folder import write_folder
    from studio.data.pannuke import write_pannuke

    if layout not in LAYOUTS:
        raise InputError("format", f"{layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "pannuke":
        return write_pannuke(path, samples, overwrite=overwrite)
    if layout == "folder":
        return write_folder(path, samples, overwrite=overwrite)
    items = [replace(s, cls=pannuke_to_conic(s.cls, source=f"samples[{i}]"))
             for i, s in enumerate(as_samples(samples))]
    return write_conic(path, items, overwrite=overwrite)
