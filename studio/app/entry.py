"""Streamlit entry script inside the package: ``streamlit run $(python -c 'import studio.app as a;
print(a.APP_SCRIPT)')``. ``histostudio app`` runs this file; the repository's
``streamlit_app.py`` does the same thing."""

from studio.app.main import main

main()
