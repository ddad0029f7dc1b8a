"""The histostudio browser app (Streamlit): stain normalization, generation, virtual IHC.

Run it with ``histostudio app`` or ``streamlit run streamlit_app.py`` (repository) /
``streamlit run <site-packages>/studio/app/launch/histostudio_app.py`` (installed package,
:data:`APP_SCRIPT`).

Layout: :mod:`studio.app.main` builds the shell (page config, sidebar facts, navigation);
each page is one ``render()`` function (:mod:`~studio.app.normalize_page`,
:mod:`~studio.app.generate_page`, :mod:`~studio.app.virtual_ihc_page`); upload validation
and the sample/upload picker live in :mod:`~studio.app.common`; the numbers shown under
images are plain functions (:mod:`~studio.app.compare`, :mod:`~studio.app.dab`) that
import no Streamlit and are tested directly.
"""

from __future__ import annotations

from pathlib import Path

#: The script ``streamlit run`` needs when the package is installed (no repository checkout).
APP_SCRIPT = Path(__file__).resolve().parent / "launch" / "histostudio_app.py"

__all__ = ["APP_SCRIPT"]
