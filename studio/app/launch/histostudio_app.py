"""Streamlit entry script inside the installed package (``studio.app.APP_SCRIPT``):
``histostudio app`` runs ``streamlit run`` on this file. The repository's
``streamlit_app.py`` does the same thing."""

from studio.app.main import main

main()
