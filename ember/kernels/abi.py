"""The C interface of the kernel library, mirrored in ctypes and checked at load.

The structs below mirror `LinearW` (kernels.h) and `LayerW` / `Shape` (decoder.cpp) field for
field. The library exports `ember_abi(what)`: its ABI version (what = 0) and the sizeof of each
mirrored struct (1, 2, 3); `check_abi` compares them with this side before anything is called,
so a stale or mismatched library is refused (the engine then runs PyTorch) instead of reading
garbage. Bump ABI_VERSION here and kAbiVersion in decoder.cpp together on any layout change.
"""

from __future__ import annotations

import ctypes
from ctypes import Structure, c_float, c_int, c_int64, c_void_p

ABI_VERSION = 4


class LinearW(Structure):
    """One weight matrix in a kernel format (kernels.h `LinearW`)."""

    _fields_ = [("fmt", c_int64), ("n", c_int64), ("k", c_int64), ("w", c_void_p),
                ("d", c_void_p), ("m", c_void_p)]


class LayerW(Structure):
    """One decoder layer's weights and KV caches (decoder.cpp `LayerW`)."""

    _fields_ = [("in_norm", c_void_p), ("post_norm", c_void_p), ("qkv", LinearW),
                ("o", LinearW), ("gate_up", LinearW), ("down", LinearW),
                ("k_cache", c_void_p), ("v_cache", c_void_p), ("k_scale", c_void_p),
                ("v_scale", c_void_p), ("kv_dtype", c_int64), ("window", c_int64),
                ("q_norm", c_void_p), ("k_norm", c_void_p), ("post_attn_norm", c_void_p),
                ("post_ffn_norm", c_void_p), ("rope_table", c_int64), ("kv_group", c_int64)]


class Shape(Structure):
    """Shape constants of the layer stack (decoder.cpp `Shape`)."""

    _fields_ = [("hidden", c_int64), ("inter", c_int64), ("hq", c_int64), ("hk", c_int64),
                ("dim", c_int64), ("block_size", c_int64), ("eps", c_float), ("scale", c_float),
                ("activation", c_int64)]


MIRRORED: tuple[tuple[str, int], ...] = (
    ("ABI version", ABI_VERSION),
    ("sizeof(LinearW)", ctypes.sizeof(LinearW)),
    ("sizeof(LayerW)", ctypes.sizeof(LayerW)),
    ("sizeof(Shape)", ctypes.sizeof(Shape)),
)
"""What `ember_abi(i)` must return for i = 0, 1, 2, 3."""


def check_abi(lib: ctypes.CDLL) -> str | None:
    """None when the library's ABI equals this side's, else the reason it does not.

    NOTE: `ember_abi` only returns constants, so this runs on any x86-64 CPU (the library's
    other entry points need AVX-512)."""
    fn = getattr(lib, "ember_abi", None)
    if fn is None:
        return "the kernel library exports no ember_abi (built from older sources)"
    fn.argtypes, fn.restype = [c_int], c_int64
    for what, (label, expected) in enumerate(MIRRORED):
        got = int(fn(what))
        if got != expected:
            return f"kernel library ABI mismatch: {label} is {got} in the library, " \
                   f"{expected} in ember/kernels/abi.py"
    return None
