"""The Ember checkpoint format: what `ember quantize / prune / distill` write, what loading reads.

A checkpoint is a directory:

    OUT/model.safetensors   the tensors (safetensors; no pickle anywhere)
    OUT/ember.json          metadata (below); its presence makes the directory an Ember checkpoint
    OUT/tokenizer.json      the tokenizer (HF `tokenizers` JSON)

ember.json (format_version 1) holds:
    format: "ember-checkpoint", format_version: 1
    architecture: every `ArchConfig` field (sizes are uniform across layers; structured pruning
        writes the shrunk sizes here)
    tensors: {parameter name: {"format": ..., "shape": [...], ...}} for every parameter; the
        format, never a file name, says how to read a tensor (see below)
    tokenizer: {"file": "tokenizer.json", "chat_template", "bos_token_id", "eos_token_id",
        "eos_token_ids", "pad_token_id", "unk_token_id", "add_bos_token", "add_eos_token"}
    compression: {"method": ..., "settings": {...}, "summary": {...}, "history": [...]}
    calibration: [{"file": name, "path": ..., "sha256": ...}] (texts used to calibrate / train)
    source: {"model", "path", "kind", "sha256"}; created: ISO-8601 UTC time; ember_version

Tensor formats:
    "float32" | "float16" | "bfloat16": stored as is under the parameter name. Pruned weights are
        stored dense; their entry adds "sparsity", "pattern" ("unstructured" or "N:M") and
        "sparse_bytes" (size with a sparse encoding: bitmask + values for unstructured, values +
        2-bit in-group indices for N:M) so reports can count the bytes a sparse format needs.
    "int8" | "int4" | "int3": weight W of shape (out, in), quantized group-wise along `in`:
        <name>.qweight  uint8. int8: (out, in), one code per byte. int4 / int3: (out, ceil(in/2)),
                        two codes per byte along `in`: low nibble = even column, high nibble = odd
                        column (an odd `in` pads one zero code). Codes q are in [0, 2^bits - 1].
        <name>.scales   float16 or float32, (out, ceil(in / group_size))
        <name>.zeros    float16 or float32, (out, ceil(in / group_size))
        and the entry has "bits", "group_size", "symmetric", "shape" = [out, in]. One dequant rule
        for every variant: w[o, i] = (q[o, i] - zeros[o, g]) * scales[o, g], g = i // group_size.
        Symmetric quantization stores zero = 2^(bits-1) explicitly. The last group may be
        shorter when group_size does not divide `in`. Per-channel int8 has group_size == in.

The runtime reads these through `QuantizedTensor`; for now loading dequantizes to the runtime
dtype, and runtime Linear formats can take the packed codes as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FORMAT_NAME = "ember-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "ember.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

QUANT_BITS: dict[str, int] = {"int8": 8, "int4": 4, "int3": 3}
"""Quantized tensor formats and their bits per code."""
DENSE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Dense tensor formats."""
STORAGE_SUFFIXES = (".qweight", ".scales", ".zeros")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, in) uint8 codes -> stored qweight: as is for 8 bits, two per byte otherwise."""
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    out_f, in_f = codes.shape
    if in_f % 2:
        codes = torch.cat([codes, codes.new_zeros(out_f, 1)], dim=1)
    pairs = codes.to(torch.uint8).view(out_f, -1, 2)  # (out, ceil(in/2), 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Stored qweight -> (out, in) uint8 codes."""
    if bits == 8:
        return qweight
    low = qweight & 0x0F
    high = qweight >> 4
    codes = torch.stack([low, high], dim=-1).view(qweight.shape[0], -1)  # (out, 2*ceil(in/2))
    return codes[:, :in_features]


@dataclass
class QuantizedTensor:
    """A group-wise quantized weight as stored: w = (q - zero) * scale per (row, group)."""

    qweight: torch.Tensor
    """uint8, (out, in) for 8 bits, (out, ceil(in/2)) two codes per byte for 4 / 3 bits."""
    scales: torch.Tensor
    """(out, ceil(in / group_size)) float16 or float32."""
    zeros: torch.Tensor
    """(out, ceil(in / group_size)) float16 or float32, in code units."""
    bits: int
    group_size: int
    shape: tuple[int, int]
    """(out_features, in_features) of the dequantized weight."""
    symmetric: bool = False

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bits: int, group_size: int, symmetric: bool = False) -> "QuantizedTensor":
        """Pack (out, in) integer codes together with their group scales and zeros."""
        out_f, in_f = codes.shape
        qt = cls(pack_codes(codes, bits), scales.contiguous(), zeros.contiguous(), bits,
                 group_size, (out_f, in_f), symmetric)
        qt.validate("<new>")
        return qt

    @property
    def format(self) -> str:
        return f"int{self.bits}"

    @property
    def num_groups(self) -> int:
        return math.ceil(self.shape[1] / self.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (codes + scales + zeros)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 codes."""
        return unpack_codes(self.qweight, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out, in) weight in `dtype` (computed in float32)."""
        in_f = self.shape[1]
        scales = self.scales.float().repeat_interleave(self.group_size, dim=1)[:, :in_f]
        zeros = self.zeros.float().repeat_interleave(self.group_size, dim=1)[:, :in_f]
        return ((self.codes().float() - zeros) * scales).to(dtype)  # (out, in)

    def validate(self, name: str) -> None:
        """Raise ValueError (naming `name`) unless the parts have the documented shapes."""
        out_f, in_f = self.shape
        packed_in = in_f if self.bits == 8 else math.ceil(in_f / 2)
        expect = {"qweight": (out_f, packed_in), "scales": (out_f, self.num_groups),
                  "zeros": (out_f, self.num_groups)}
        for part, shape in expect.items():
            tensor = getattr(self, part)
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name}.{part} has shape {tuple(tensor.shape)}, "
                                 f"expected {shape}")
        if self.qweight.dtype != torch.uint8:
            raise ValueError(f"{name}.qweight must be uint8, got {self.qweight.dtype}")
        if self.bits not in QUANT_BITS.values() or self.group_size < 1:
            raise ValueError(f"{name}: bad bits {self.bits} / group_size {self.group_size}")

    def storage(self, name: str) -> dict[str, torch.Tensor]:
        """The safetensors entries of this tensor under parameter name `name`."""
        return {f"{name}.qweight": self.qweight, f"{name}.scales": self.scales,
                f"{name}.zeros": self.zeros}

    def metadata(self) -> dict[str, object]:
        """The ember.json tensor entry."""
        return {"format": self.format, "shape": list(self.shape), "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric,
                "scale_dtype": str(self.scales.dtype).removeprefix("torch.")}
