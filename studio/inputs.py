"""Command-line INPUTS -> files: paths, glob patterns, folders and CSV manifests.

Every batch command (``normalize``, ``segment``, ``translate``) takes the same kinds of
inputs, expanded by one function so they behave the same: a missing path or a glob that
matches nothing is an error (a typo must not silently shrink a batch), folders are read
one level deep (hidden files skipped), a ``.csv`` lists one input per row in a ``path``
column (relative to the CSV's folder). Each file comes back with the folder it was found
in (None for files named directly), so jobs can treat a folder of tiles as one unit.
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Callable, Sequence
from pathlib import Path

from studio.errors import InputError

GLOB_CHARS = set("*?[")


def read_csv_manifest(path: Path) -> list[Path]:
    """The ``path`` column of a CSV manifest (relative paths resolved against its folder)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read CSV manifest ({exc})") from exc
    if not rows or "path" not in rows[0]:
        raise InputError(path, "CSV manifest needs a 'path' column (one input per row)")
    out = []
    for row in rows:
        p = Path(row["path"])
        p = p if p.is_absolute() else path.parent / p
        if not p.exists():
            raise InputError(p, f"listed in {path.name} but does not exist")
        out.append(p)
    return out


def expand_inputs(inputs: Sequence[str | Path], accept: Callable[[Path], bool], what: str = "images or slides"
                  ) -> list[tuple[Path, Path | None]]:
    """Files to process as ``(file, folder it came from or None)``, in order, no repeats.

    Args:
        inputs: paths, glob patterns, folders and CSV manifests, as typed by the user.
        accept: which files are inputs (e.g. images and slides); others in folders and
            globs are skipped, a file named directly that is not accepted is an error.
        what: how to name accepted files in error messages.
    """
    if not inputs:
        raise InputError("INPUTS", f"nothing to process; give {what}, folders, globs or a CSV manifest")
    found: dict[Path, Path | None] = {}

    def add(path: Path, folder: Path | None = None) -> None:
        found.setdefault(path, folder)

    for raw in inputs:
        text = str(raw)
        path = Path(text)
        if any(ch in text for ch in GLOB_CHARS) and not path.exists():
            matches = [m for m in sorted(Path(p) for p in glob.glob(text)) if m.is_file() and accept(m)]
            if not matches:
                raise InputError(text, f"glob matched no {what}")
            for m in matches:
                add(m)
        elif not path.exists():
            raise InputError(path, "no such file or folder")
        elif path.is_dir():
            members = [p for p in sorted(path.iterdir())
                       if p.is_file() and not p.name.startswith(".") and accept(p)]
            if not members:
                raise InputError(path, f"folder holds no {what}")
            for m in members:
                add(m, path)
        elif path.suffix.lower() == ".csv":
            for p in read_csv_manifest(path):
                if not accept(p):
                    raise InputError(p, f"listed in {path.name} but is not an input here: expected {what}")
                add(p)
        elif accept(path):
            add(path)
        else:
            raise InputError(path, f"is not an input here: expected {what} (extension {path.suffix or '(none)'!r})")
    return list(found.items())
