"""Entry point of ``headscope app`` (``streamlit run app/streamlit_app.py``): pages live in ``ui``."""
import streamlit as st

from headscope.app import ui
from headscope.threads import configure_threads

configure_threads()  # once per server process, before the model pool loads

st.set_page_config(page_title="headscope", layout="wide")  # no page_icon: material icons load from a CDN
page = ui.navigation()
ui.model_pool().start(ui.current_model())  # warm the model while the user browses runs
ui.sidebar()
page.run()
