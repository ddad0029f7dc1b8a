"""The app shell: page config, sidebar facts (``studio.info``), navigation between pages.

``?page=generate`` (or ``normalize``, ``virtual-ihc``) in the URL picks the landing page;
the sidebar navigation moves between pages as usual.
"""

from __future__ import annotations

import streamlit as st

PAGES = {  # url path -> (title, icon, module in studio.app)
    "normalize": ("Normalize", ":material/palette:", "normalize_page"),
    "generate": ("Generate", ":material/auto_awesome:", "generate_page"),
    "virtual-ihc": ("Virtual IHC", ":material/biotech:", "virtual_ihc_page"),
}
DEFAULT_PAGE = "normalize"


@st.cache_resource(show_spinner=False)
def _device_line() -> str:
    from studio.info import device_report

    report = device_report()
    if report.cuda:
        where = "CUDA: " + ", ".join(report.devices)
    elif report.mps:
        where = "Apple MPS"
    else:
        where = "CPU"
    extra = " · xformers" if report.xformers else ""
    return f"{where} · torch {report.torch_version} · {report.threads} thread(s){extra}"


def sidebar() -> None:
    from studio import __version__
    from studio.info import checkpoints_dir, list_checkpoints

    with st.sidebar:
        st.markdown(f"**histostudio** {__version__}")
        st.caption("Compute")
        st.markdown(_device_line())
        root = checkpoints_dir()
        found = list_checkpoints(root)
        st.caption(f"Checkpoints ({len(found)})")
        if found:
            st.markdown("\n".join(f"- `{c.name}` · {c.kind} · {c.size_mb:.1f} MB" for c in found))
        else:
            st.markdown("none yet (the Generate page says how to train one)")
        st.caption(f"from `{root}`; set `HISTOSTUDIO_CHECKPOINTS` to use another folder")


def _page(url_path: str, default: bool):
    import importlib

    title, icon, module_name = PAGES[url_path]
    module = importlib.import_module(f"studio.app.{module_name}")
    return st.Page(module.render, title=title, icon=icon, url_path=url_path, default=default)


def main() -> None:
    st.set_page_config(page_title="histostudio", page_icon=":material/biotech:", layout="wide")
    requested = st.query_params.get("page", DEFAULT_PAGE)
    landing = requested if requested in PAGES else DEFAULT_PAGE
    page = st.navigation([_page(url, url == landing) for url in PAGES])
    sidebar()
    page.run()
