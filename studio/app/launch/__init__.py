"""Holds only the script ``streamlit run`` starts when histostudio is installed as a package.

It lives in its own folder because Streamlit puts the script's folder first on
``sys.path``: here that exposes nothing but ``histostudio_app`` (from ``studio/app`` it
would expose ``common``, ``main``... as top-level modules).
"""
