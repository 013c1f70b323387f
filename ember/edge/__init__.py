"""The edge runtime: Llama GGUF models on Ember's C kernels without PyTorch (see llm.py).

Nothing here imports torch (tests/unit/test_edge_runtime.py checks it in a fresh process).
"""

from ember.edge.arch import UnsupportedModelError
from ember.edge.llm import EdgeDelta, EdgeLLM, EdgeOutput

__all__ = ["EdgeDelta", "EdgeLLM", "EdgeOutput", "UnsupportedModelError"]
