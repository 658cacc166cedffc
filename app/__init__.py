"""The Streamlit dashboard (``headscope app``) and report export, thin over the analyses' API."""
if "." not in __name__:  # imported as a top-level module, not headscope.app: see headscope/_shadow.py
    from headscope._shadow import give_way
    give_way(__name__, __file__)
else:
    from pathlib import Path

    APP_MAIN = Path(__file__).with_name("streamlit_app.py")
