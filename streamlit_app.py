"""histostudio in the browser: ``streamlit run streamlit_app.py`` (or ``histostudio app``).

Thin on purpose: the app lives in :mod:`studio.app` so that an installed package can run
it too (``studio/app/launch/histostudio_app.py``, ``studio.app.APP_SCRIPT``).
"""

from studio.app.main import main

main()
