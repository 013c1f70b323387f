"""Weight formats: block geometry, exact reference dequantizers and how each format runs."""

from ember.formats.dequant import q8_0_blocks
from ember.formats.table import (
    FORMATS,
    SUPPORTED_GGUF_TYPES,
    Dequantizer,
    FormatSpec,
    format_for,
)

__all__ = ["FORMATS", "SUPPORTED_GGUF_TYPES", "Dequantizer", "FormatSpec", "format_for",
           "q8_0_blocks"]
