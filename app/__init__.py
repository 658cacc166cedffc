"""The Streamlit dashboard (``headscope app``) and report export, thin over the analyses' API."""
from pathlib import Path

APP_MAIN = Path(__file__).with_name("streamlit_app.py")
