"""Tensor-level wrappers around the compiled CPU kernels (see cpu_kernels.cpp for layouts).

`CpuKernels` is loaded once (its ABI checked, see abi.py) and handed to the layers the
ExecutionPlan puts on the kernels; every method takes contiguous float32 CPU tensors and
allocates its output. `pack_q4` / `pack_q8` turn the runtime's group-32 forms (w = q * scale +
offset; w = q * d: ember.formats.blocks) into the kernels' row-interleaved layouts.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from ctypes import c_float, c_int, c_int64, c_void_p

import torch

from ember.kernels.abi import LinearW, check_abi
from ember.kernels.build import NoCompiler, forced_isa, open_library, supported_isas

logger = logging.getLogger(__name__)

BLOCK = 32


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


INT8_HEAD_DIMS = (64, 128, 256)
"""Head dims the int8 KV cache runs with (the tiled attention kernel's)."""


def check_kv_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None = None,
              v_scale: torch.Tensor | None = None) -> int:
    """The kernels read raw pointers: refuse caches of another dtype or layout. Returns the
    kernels' kv_dtype code: 0 bfloat16, 1 int8 (with float32 scales (blocks, block_size, Hk))."""
    for cache in (k_cache, v_cache):
        if cache.dtype not in (torch.bfloat16, torch.int8) or not cache.is_contiguous():
            raise ValueError(f"attention kernels need contiguous bfloat16 or int8 KV caches, "
                             f"got {cache.dtype}")
    if k_cache.dtype != torch.int8:
        return 0
    for scale in (k_scale, v_scale):
        if scale is None or scale.dtype != torch.float32 or not scale.is_contiguous() \
                or scale.shape != k_cache.shape[:-1]:
            raise ValueError("int8 KV caches need contiguous float32 scales of shape "
                             f"{tuple(k_cache.shape[:-1])}")
    if k_cache.shape[-1] not in INT8_HEAD_DIMS:
        raise ValueError(f"int8 KV caches need head_dim in {INT8_HEAD_DIMS}")
    return 1


def optional_ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


TILE = 16


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """Pad dim 0 to a multiple of TILE with zeros."""
    extra = -t.shape[0] % TILE
    return t if extra == 0 else torch.cat([t, t.new_zeros(extra, *t.shape[1:])])


def _tile_scales(s: torch.Tensor) -> torch.Tensor:
    """(N, K/32) per-row block scales -> (N/16, K/32, 16): lane l of tile t is row 16 t + l."""
    s = _pad_rows(s.float())
    return s.view(-1, TILE, s.shape[1]).transpose(1, 2).contiguous()


def _interleave(q: torch.Tensor, vectors: int) -> torch.Tensor:
    """(Np, K) bytes -> (Np/16, K/32, vectors, 16 rows, 32/vectors) in row-interleaved order."""
    n, k = q.shape
    per = BLOCK // vectors  # bytes of one row inside one 64-byte vector: 4
    return (q.view(n // TILE, TILE, k // BLOCK, vectors, per)
            .permute(0, 2, 3, 1, 4).contiguous())  # (tiles, blocks, vectors, 16, 4)


def pack_q4(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-32 4-bit weights w = q * scale + offset (q (N, K) uint8 in [0, 15], scale /
    offset (N, K/32)) into the kernel layout of cpu_kernels.cpp: packed (Np/16, K/32, 4, 64)
    uint8 and d, m (Np/16, K/32, 16) float32 with w = q * d + m. N is padded to a multiple of
    16 rows."""
    n, k = q.shape
    if k % BLOCK or scale.shape[1] * BLOCK != k:
        raise ValueError(f"Q4 kernels need group size {BLOCK} and K % {BLOCK} == 0")
    v = _interleave(_pad_rows(q.to(torch.uint8)), 8)  # (tiles, blocks, 8, 16, 4)
    packed = (v[:, :, :4] | (v[:, :, 4:] << 4)).reshape(-1, k // BLOCK, 4, 64).contiguous()
    return packed, _tile_scales(scale), _tile_scales(offset)


Q4K_BLOCK_BYTES = 288
"""kernels' Q4K tile block (common.h kQ4kBlockBytes): Q4's 256 nibble bytes, 16 + 16 bytes of
sub-block scales and mins."""
Q4K_SUPER = 256
"""Columns per Q4K d / dmin (GGUF Q4_K's super-block; common.h kQ4kSuper blocks of 32)."""


def pack_q4k(q: torch.Tensor, sc: torch.Tensor, m: torch.Tensor, d: torch.Tensor,
             dmin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_K's fields (q (N, K) uint8 in [0, 15]; sc, m (N, K/32) uint8 in [0, 63]; d, dmin
    (N, K/256) float32; w = d sc q - dmin m) into the kernels' Q4K layout: packed (Np/16, K/32,
    288) uint8, per block the Q4 layout's 256 nibble bytes, then sc and m of the tile's 16
    rows; d and -dmin (Np/16, K/256, 16) float32: 19 bytes per 32 weights (the file's 18, its
    d / dmin being float16) against Q4's 24."""
    n, k = q.shape
    if k % Q4K_SUPER or sc.shape != (n, k // BLOCK) or m.shape != sc.shape \
            or d.shape != (n, k // Q4K_SUPER) or dmin.shape != d.shape:
        raise ValueError(f"Q4K kernels need K % {Q4K_SUPER} == 0 and Q4_K's field shapes")
    if q.numel() and int(q.max()) > 15 or sc.numel() and max(int(sc.max()), int(m.max())) > 63:
        raise ValueError("Q4K kernels need codes in [0, 15] and scales / mins in [0, 63]")
    nib = pack_q4(q, torch.zeros(n, k // BLOCK), torch.zeros(n, k // BLOCK))[0]
    tiles, nb = nib.shape[0], k // BLOCK
    lanes = [_pad_rows(t.to(torch.uint8)).view(tiles, TILE, nb).transpose(1, 2) for t in (sc, m)]
    packed = torch.cat([nib.reshape(tiles, nb, 256), *lanes], dim=2).contiguous()
    return packed, _tile_scales(d), _tile_scales(-dmin)


def pack_q8(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-32 8-bit weights w = q * d (q (N, K) int8, d (N, K/32)) into the kernel layout:
    u = q + 128 (Np/16, K/32, 8, 64) uint8 and d (Np/16, K/32, 16) float32 (exact)."""
    n, k = q.shape
    if k % BLOCK:
        raise ValueError(f"Q8 kernels need K % {BLOCK} == 0, got {k}")
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    packed = _interleave(_pad_rows(u), 8).reshape(-1, k // BLOCK, 8, 64).contiguous()
    return packed, _tile_scales(d.reshape(n, k // BLOCK))


def pack_q5(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Group-32 5-bit weights w = q * d (q (N, K) int8 in [-16, 15]: GGUF Q5_0's codes minus
    16; d (N, K/32), float16 values: Q5_0's) into the kernels' Q5 layout, exactly: packed
    (Np/16, K/32, 352) uint8, per tile and block the Q4 layout's 256 nibble bytes of
    u = q + 16, a 64-byte plane of their fifth bits (byte (row r, lane byte i) of the 64-byte
    vectors, bit j = fifth bit of column 4 j + i) and the 16 rows' d as float16: 22 bytes per
    32 weights, GGUF Q5_0's (Q8's layout takes 36)."""
    n, k = q.shape
    if k % BLOCK:
        raise ValueError(f"Q5 kernels need K % {BLOCK} == 0, got {k}")
    if q.numel() and (int(q.min()) < -16 or int(q.max()) > 15):
        raise ValueError("Q5 kernels need codes in [-16, 15]")
    d16 = d.reshape(n, k // BLOCK).to(torch.float16)
    if not torch.equal(d16.float(), d.reshape(n, k // BLOCK).float()):
        raise ValueError("Q5 kernels need float16 scales (GGUF Q5_0's)")
    u = (q.to(torch.int16) + 16).to(torch.uint8)
    v = _interleave(_pad_rows(u), 8)  # (tiles, blocks, 8 vectors j, 16 rows, 4)
    low = v & 15
    nib = (low[:, :, :4] | (low[:, :, 4:] << 4)).reshape(-1, k // BLOCK, 256)
    bits = v >> 4  # (tiles, blocks, 8, 16, 4) in {0, 1}
    plane = torch.zeros_like(bits[:, :, 0])
    for j in range(8):
        plane |= bits[:, :, j] << j
    scales = _pad_rows(d16).view(-1, TILE, k // BLOCK).transpose(1, 2).contiguous()
    return torch.cat([nib, plane.reshape(-1, k // BLOCK, 64),
                      scales.view(torch.uint8).reshape(-1, k // BLOCK, 32)], dim=2).contiguous()


def f16_exact(d: torch.Tensor) -> bool:
    """Whether every scale is a float16 value (GGUF Q8_0 / Q5_0 scales are)."""
    return bool(torch.equal(d.to(torch.float16).float(), d.float()))


def pack_q8h(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q8 weights whose scales are float16 values (GGUF Q8_0's) into the kernels' Q8h layout,
    exactly: per tile and block Q8's 512 code bytes (`pack_q8`) then the 16 rows' d as
    float16: (Np/16, K/32, 544) uint8, 34 bytes per 32 weights (GGUF Q8_0's; Q8 takes 36)."""
    n, k = q.shape
    if not f16_exact(d):
        raise ValueError("Q8h kernels need float16 scales (GGUF Q8_0's)")
    codes, _ = pack_q8(q, d)
    d16 = _pad_rows(d.reshape(n, k // BLOCK).to(torch.float16))
    scales = d16.view(-1, TILE, k // BLOCK).transpose(1, 2).contiguous()
    return torch.cat([codes.reshape(-1, k // BLOCK, 512),
                      scales.view(torch.uint8).reshape(-1, k // BLOCK, 32)], dim=2).contiguous()


FALLBACK_DECODE_SLOWDOWN = 3
"""How many times slower PyTorch's int4/int8 ops decode the int4 SmolLM2 than Ember's kernels,
as the warning quotes it. NOTE: the issue's target ratio, not yet measured on a quiet machine:
`ember bench offline --ember-isa auto --ember-isa torch` measures it."""


def fallback_warning(failures: list[tuple[str, Exception]], cxx: str | None) -> str:
    """The one line logged when no kernel library could be loaded or built."""
    first = failures[0][1]
    if all(isinstance(e, NoCompiler) for _, e in failures):
        return (f"CPU kernels off: {first} and no cached kernel build for this CPU "
                f"({', '.join(n for n, _ in failures)}): running PyTorch's int4/int8 ops "
                f"instead (decode ~{FALLBACK_DECODE_SLOWDOWN}x slower); install g++ or run "
                "`ember build-kernels` once where a compiler exists")
    return (f"CPU kernels off: {first}; running PyTorch's int4/int8 ops instead (decode "
            f"~{FALLBACK_DECODE_SLOWDOWN}x slower)")


class CpuKernels:
    """The compiled kernel library plus the thread count every call uses."""

    def __init__(self, lib: ctypes.CDLL, num_threads: int, isa: str) -> None:
        self.lib = lib
        self.num_threads = num_threads
        self.isa = isa
        """The instruction set the library was built for (e.g. 'avx512-vnni', 'avx2')."""
        i64, f32, ptr, i32 = c_int64, c_float, c_void_p, c_int
        sigs = {
            "q4_gemm": [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, i32],
            "q8_gemm": [ptr, i64, i64, ptr, ptr, i64, ptr, i32],
            "q5_gemm": [ptr, i64, i64, ptr, i64, ptr, i32],
            "q4k_gemm": [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, i32],
            "q6x_gemm": [ptr, i64, i64, ptr, ptr, i64, ptr, i32],
            "q8h_gemm": [ptr, i64, i64, ptr, i64, ptr, i32],
            "linear_gemm": [ptr, ptr, i64, ptr, i32],
            "q8h_rows": [ptr, i64, ptr, i64, ptr],
            "q8_rows": [ptr, ptr, i64, ptr, i64, ptr],
            "rms_norm": [ptr, ptr, ptr, i64, i64, f32, ptr],
            "silu_mul": [ptr, i64, i64, ptr],
            "rope_store_qkv": [ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr],
            "rope_store_qkv_i8": [ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr],
            "paged_decode_attention": [ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, ptr, i64,
                                       i64, i64, i64, i64, f32, i64, ptr, i32],
            "apply_token_bitmask": [ptr, i64, ptr, i64, ptr, i64, i64, i64],
            "draft_head_step": [ptr, ptr, f32, ptr, i64, i64, ptr, ptr, i32],
            "draft_head_chain": [ptr, ptr, f32, ptr, ptr, ptr, i64, i64, ptr, i64, ptr, i32],
        }
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None

    @classmethod
    def load(cls, cache_dir: str | None, num_threads: int,
             force_isa: str | None = None, cxx: str | None = None) -> "CpuKernels | None":
        """The compiled kernels (built on first use), or None when this machine cannot run
        them or the library's C ABI differs from abi.py's mirror (reason logged).
        force_isa: an ISA name of build.ISAS to use instead of the best this CPU has (which
        falls back to the next ISA when its build fails, e.g. a compiler too old for it).
        cxx: the compiler command (EnvSettings.cxx; None: g++ / c++ / clang++)."""
        if force_isa is not None:
            forced = forced_isa(force_isa)
            isas = [forced] if forced is not None else []
        else:
            isas = supported_isas()
        failures: list[tuple[str, Exception]] = []
        for isa in isas:
            try:
                lib = open_library(cache_dir, isa, cxx)
            except (OSError, RuntimeError) as e:
                failures.append((isa.name, e))
                continue
            reason = check_abi(lib)
            if reason is not None:
                logger.warning("CPU kernels off: %s", reason)
                return None
            if failures:
                logger.warning("CPU kernels: %s instead of %s (%s)", isa.name,
                               failures[0][0], failures[0][1])
            return cls(lib, num_threads, isa.name)
        if failures:
            logger.warning("%s", fallback_warning(failures, cxx))
        return None

    # ---- linear -------------------------------------------------------------------------

    def q4_gemm(self, x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                ) -> torch.Tensor:
        """x (M, K) float32 -> (M, Np) with Np = 16 * packed.shape[0]."""
        return self._gemm(self.lib.q4_gemm, x, packed, d, m)

    def q8_gemm(self, x: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """x (M, K) float32 -> (M, Np)."""
        return self._gemm(self.lib.q8_gemm, x, q, d)

    def q4k_gemm(self, x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor,
                 neg_dmin: torch.Tensor) -> torch.Tensor:
        """x (M, K) float32 -> (M, Np) for Q4K weights (`pack_q4k`)."""
        return self._gemm(self.lib.q4k_gemm, x, packed, d, neg_dmin)

    def q6x_gemm(self, x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """x (M, K) float32 -> (M, Np) for Q6 layer weights (`ember.formats.q6.pack_q6` with
        256-column super-blocks: GGUF Q6_K's)."""
        return self._gemm(self.lib.q6x_gemm, x, packed, d)

    def q5_gemm(self, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """x (M, K) float32 -> (M, Np) for Q5 weights (`pack_q5`: scales included)."""
        return self._gemm(self.lib.q5_gemm, x, packed)

    def q8h_gemm(self, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """x (M, K) float32 -> (M, Np) for Q8h weights (`pack_q8h`: scales included)."""
        return self._gemm(self.lib.q8h_gemm, x, packed)

    def _gemm(self, fn: Callable[..., None], x: torch.Tensor, packed: torch.Tensor,
              *scales: torch.Tensor) -> torch.Tensor:
        """A per-format gemm entry point (cpu_kernels.cpp): x (M, K) -> (M, 16 * tiles) over
        packed (tiles, ...) and the format's scale tensors, if any."""
        mrows, k = x.shape
        y = torch.empty(mrows, packed.shape[0] * TILE, dtype=torch.float32)
        fn(_ptr(x), mrows, k, _ptr(packed), *map(_ptr, scales), y.shape[1], _ptr(y),
           self.num_threads)
        return y

    def linear_gemm(self, lw: LinearW, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) float32 -> (M, Np) for a matrix in any kernel format (`LinearW`: e.g.
        `ember.kernels.decoder.KernelLinear.c_struct()`; its tensors must stay alive)."""
        if x.shape[1] != lw.k:
            raise ValueError(f"activations of width {x.shape[1]} for a matrix of K = {lw.k}")
        y = torch.empty(x.shape[0], -(-lw.n // TILE) * TILE, dtype=torch.float32)
        self.lib.linear_gemm(ctypes.byref(lw), _ptr(x), x.shape[0], _ptr(y), self.num_threads)
        return y

    def draft_head_step(self, mats: "ctypes.Array[LinearW]", norm: torch.Tensor, eps: float,
                        x: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One `eagle` draft-head step in one call (cpu_kernels.cpp `draft_head_step`): mats =
        (fc, gate_up, down, out) as a ctypes array (their tensors kept alive by the caller),
        x (T, 2D) = [h ; e] float32 -> (next features (T, D), argmax row of out's first
        `vocab` rows (T,) int64)."""
        t, dim = x.shape[0], mats[0].n
        if x.shape[1] != mats[0].k:
            raise ValueError(f"head input of width {x.shape[1]} for fc of K = {mats[0].k}")
        feat = torch.empty(t, dim, dtype=torch.float32)
        best = torch.empty(t, dtype=torch.int64)
        self.lib.draft_head_step(mats, _ptr(norm), eps, _ptr(x), t, vocab, _ptr(feat),
                                 _ptr(best), self.num_threads)
        return feat, best

    def draft_head_chain(self, mats: "ctypes.Array[LinearW]", norm: torch.Tensor, eps: float,
                         h: torch.Tensor, e: torch.Tensor | None, first: list[int] | None,
                         embed: torch.Tensor, steps: int) -> list[list[int]]:
        """`steps` chained `draft_head_step`s in one call (cpu_kernels.cpp `draft_head_chain`):
        the first on [h ; e] (h, e: (T, D) float32) or, e None, on [h ; embed[first[i]]], each
        next one on [its features ; embed[its drafted row]]; embed (V, D) float32, V the head's
        vocabulary (out's first V rows) -> each row's `steps` argmax rows. Plain lists in and
        out (ctypes arrays): a torch op costs more than the call right after a forward."""
        t, dim, vocab = h.shape[0], mats[0].n, embed.shape[0]
        if h.shape != (t, dim) or h.dtype != torch.float32 or (e is None) == (first is None) \
                or 2 * dim != mats[0].k \
                or embed.shape != (vocab, dim) or vocab > mats[3].n \
                or (e is not None and e.shape != (t, dim)) \
                or (first is not None and (len(first) != t or not all(0 <= r < vocab
                                                                       for r in first))):
            shape = None if e is None else tuple(e.shape)
            raise ValueError(f"head inputs h {tuple(h.shape)}, e {shape}, first {first} and "
                             f"embedding table {tuple(embed.shape)} for fc of K = "
                             f"{mats[0].k}, out of {mats[3].n} rows")
        rows = None if first is None else (ctypes.c_int64 * t)(*first)
        best = (ctypes.c_int64 * (t * steps))()
        self.lib.draft_head_chain(mats, _ptr(norm), eps, _ptr(h), None if e is None else _ptr(e),
                                  None if rows is None else ctypes.addressof(rows), t, vocab,
                                  _ptr(embed), steps, ctypes.addressof(best), self.num_threads)
        flat = list(best)
        return [flat[i * steps:(i + 1) * steps] for i in range(t)]

    def q8h_rows(self, packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (T,) int64 of Q8h weights as float32 (T, K) (embedding lookup)."""
        k = packed.shape[1] * BLOCK
        out = torch.empty(ids.shape[0], k, dtype=torch.float32)
        self.lib.q8h_rows(_ptr(packed), k, _ptr(ids), ids.shape[0], _ptr(out))
        return out

    def q8_rows(self, q: torch.Tensor, d: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (T,) int64 of Q8 weights as float32 (T, K) (embedding lookup)."""
        k = q.shape[1] * BLOCK
        out = torch.empty(ids.shape[0], k, dtype=torch.float32)
        self.lib.q8_rows(_ptr(q), _ptr(d), k, _ptr(ids), ids.shape[0], _ptr(out))
        return out

    # ---- elementwise ----------------------------------------------------------------------

    def rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor,
                 eps: float) -> torch.Tensor:
        """Normalised rows of x (T, H); with `residual`, x += residual first, in place."""
        t, h = x.shape
        out = torch.empty_like(x)
        self.lib.rms_norm(_ptr(x), None if residual is None else _ptr(residual), _ptr(w), t, h,
                          eps, _ptr(out))
        return out

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        t, two_i = gu.shape
        out = torch.empty(t, two_i // 2, dtype=torch.float32)
        self.lib.silu_mul(_ptr(gu), t, two_i // 2, _ptr(out))
        return out

    # ---- attention ------------------------------------------------------------------------

    def rope_store_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       num_heads: int, num_kv_heads: int, head_dim: int, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slots: torch.Tensor,
                       k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> None:
        """Rotate the q and k heads of qkv (T, (Hq + 2 Hk) * D) in place (cos/sin (T, D/2));
        write its k and v heads at `slots` of the caches (bfloat16, or int8 with a scale per
        slot and head in k_scale / v_scale)."""
        if check_kv_caches(k_cache, v_cache, k_scale, v_scale) == 1:
            self.lib.rope_store_qkv_i8(
                _ptr(qkv), _ptr(cos), _ptr(sin), qkv.shape[0], num_heads, num_kv_heads,
                head_dim, _ptr(k_cache), _ptr(v_cache), optional_ptr(k_scale), optional_ptr(v_scale),
                _ptr(slots))
            return
        self.lib.rope_store_qkv(_ptr(qkv), _ptr(cos), _ptr(sin), qkv.shape[0], num_heads,
                                num_kv_heads, head_dim, _ptr(k_cache), _ptr(v_cache),
                                _ptr(slots))

    def paged_decode_attention(self, qkv: torch.Tensor, num_heads: int, head_dim: int,
                               k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, lens: torch.Tensor,
                               scale: float, window: int | None = None,
                               k_scale: torch.Tensor | None = None,
                               v_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Queries = the q heads of the first B rows of qkv (rows of (Hq + 2 Hk) * D floats);
        caches (blocks, block_size, Hk, D) bfloat16; block_tables (B, max_blocks); lens (B,):
        row i attends to keys [0, lens[i]), or only the last `window` of them. Consecutive
        rows of one sequence are tiled (flash-style), long contexts split across threads.
        int8 caches come with their scales (k_scale / v_scale). Returns (B, Hq * D)."""
        kv_dtype = check_kv_caches(k_cache, v_cache, k_scale, v_scale)
        b = block_tables.shape[0]
        out = torch.empty(b, num_heads * head_dim, dtype=torch.float32)
        self.lib.paged_decode_attention(
            _ptr(qkv), qkv.stride(0), _ptr(k_cache), _ptr(v_cache), optional_ptr(k_scale),
            optional_ptr(v_scale), kv_dtype, _ptr(block_tables),
            block_tables.shape[1], _ptr(lens), b, num_heads, k_cache.shape[2], head_dim,
            k_cache.shape[1], scale, window or 0, _ptr(out), self.num_threads)
        return out

    # ---- sampling -------------------------------------------------------------------------

    def apply_token_bitmask(self, logits: torch.Tensor, masks: torch.Tensor,
                            rows: list[int], eos_token_id: int | None) -> None:
        """Grammar masks in place: row rows[i] of `logits` (N, V) float32 (rows contiguous)
        keeps the tokens whose bit is set in `masks` (C, W) int32 row i (bit t % 32 of word
        t // 32), the others become -inf; a mask with no bit set allows only EOS.
        Single-threaded: a few us per 49k row."""
        if logits.dtype != torch.float32 or logits.stride(1) != 1 or \
                masks.dtype != torch.int32 or not masks.is_contiguous() or \
                masks.shape[1] * 32 < logits.shape[1] or len(rows) != masks.shape[0] or \
                (rows and not 0 <= min(rows) <= max(rows) < logits.shape[0]):
            raise ValueError("apply_token_bitmask needs float32 logits with contiguous rows and "
                             "one contiguous int32 mask row of >= V bits per in-range row")
        index = (c_int64 * len(rows))(*rows)
        self.lib.apply_token_bitmask(
            _ptr(logits), logits.stride(0), index, len(rows), _ptr(masks),
            masks.shape[1], logits.shape[1], -1 if eos_token_id is None else eos_token_id)
