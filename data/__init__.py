"""Prompt sets, needles, haystack and fixtures shipped with headscope (package data)."""
if "." not in __name__:  # imported as a top-level module, not headscope.data: see headscope/_shadow.py
    from headscope._shadow import give_way
    give_way(__name__, __file__)
