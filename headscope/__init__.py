"""headscope: a workbench for the attention heads of transformer language models.

The implementation lives in the sub-packages ``headscope.kernels`` (attention statistics and
in-attention interventions), ``headscope.probe`` (models, capture, interventions, generation),
``headscope.analyses`` (head scores and the run store) and ``headscope.app`` (dashboard).
"""
__version__ = "0.1.0"
