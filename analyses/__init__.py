"""Head scores: one module per analysis, one registry (``base.py``), the run store (``store.py``)."""
if "." not in __name__:  # imported as a top-level module, not headscope.analyses: see headscope/_shadow.py
    from headscope._shadow import give_way
    give_way(__name__, __file__)
