"""Hand-written CPU kernels (AVX-512 + VNNI), compiled once and loaded through ctypes."""
