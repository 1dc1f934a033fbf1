"""Bit-packed integer codes and the packed-weights file.

Codes of `bits` bits (1 to 8) are packed densely into a byte stream, with no
padding between values::

    stream bit k  =  bit (k % 8) of byte k // 8        (least significant first)
    value i       =  stream bits [i * bits, (i + 1) * bits), its least
                     significant bit first

so a value may straddle two bytes (3, 5, 6 and 7 bits) and the stream takes
`ceil(size * bits / 8)` bytes. Values are taken in C order of the array.
Signed codes are stored as their `bits`-bit two's complement and sign-extended
on unpacking; the grids are those of `haqjax.quant.affine`: signed
`[-2^(b-1), 2^(b-1) - 1]` (1-bit signed is {-1, 0}), unsigned `[0, 2^b - 1]`.

The packed-weights file (`save_packed` / `load_packed`, usually `weights.bin`)
holds a list of `PackedTensor`s::

    bytes 0-7    magic b"HAQPACK1"
    bytes 8-11   header length H, uint32 little-endian
    next H       header: zlib-compressed UTF-8 JSON
                 {"tensors": [{"name", "shape", "bits", "signed", "axis"}, ...],
                  "payload": payload bytes}
    the rest     payload: for each tensor in header order
                 codes      ceil(size * bits / 8) bytes, packed as above
                 scales     C float32 little-endian
                 zero pts   ceil(C * bits / 8) bytes, packed like the codes

where C is `shape[axis]` (one scale and zero point per channel) or 1 when
`axis` is null (per tensor). Zero points lie on the codes' grid, so they pack
at the codes' width. Tensors of 16 or 32 bits (biases) are stored as whole
little-endian int16/int32 words instead of packed. Every offset follows from
the header, which stays a few hundred bytes for a ResNet-20: the file is
`sum(bits * size) / 8` plus the scales, within 1%.

`graph_weights` lists an integer graph's kernels and biases as such tensors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from haqjax.deploy.graph import Graph
from haqjax.deploy.graph import Node
from haqjax.io import atomic_open

MAGIC = b"HAQPACK1"
PACKED_BITS = tuple(range(1, 9))
WORD_BITS = (16, 32)


def code_range(bits: int, signed: bool) -> tuple[int, int]:
  """The smallest and largest code of a `bits`-bit grid."""
  if signed:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  return 0, (1 << bits) - 1


def _check_bits(bits: int, allowed: Sequence[int]) -> None:
  if not isinstance(bits, (int, np.integer)) or int(bits) not in allowed:
    raise ValueError(f"bits is {bits!r}; allowed: {', '.join(map(str, allowed))}")


def packed_nbytes(size: int, bits: int) -> int:
  """Bytes that `size` codes of `bits` bits take once packed."""
  return (size * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int, *, signed: bool) -> np.ndarray:
  """Packs integer codes of `bits` bits into bytes (see the module docstring).

  Args:
    codes: integers of any shape, on the `bits`-bit grid.
    bits: 1 to 8.
    signed: two's complement grid; otherwise unsigned.

  Returns:
    uint8 array of `packed_nbytes(codes.size, bits)` bytes.

  Raises:
    ValueError: `bits` out of 1..8, non-integer codes or codes off the grid.
  """
  _check_bits(bits, PACKED_BITS)
  codes = np.asarray(codes)
  if codes.size and not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"codes have dtype {codes.dtype}; allowed: an integer dtype")
  flat = codes.reshape(-1).astype(np.int64)
  lo, hi = code_range(bits, signed)
  if flat.size and (flat.min() < lo or flat.max() > hi):
    raise ValueError(f"codes span [{flat.min()}, {flat.max()}]; allowed: the "
                     f"{'signed' if signed else 'unsigned'} {bits}-bit grid "
                     f"[{lo}, {hi}]")
  words = (flat & ((1 << bits) - 1)).astype(np.uint8)  # Two's complement.
  if bits == 8:
    return words
  # [n, bits] bit planes, least significant first, then one stream.
  planes = (words[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_codes(data: np.ndarray | bytes, bits: int, *, signed: bool,
                 shape: Sequence[int]) -> np.ndarray:
  """Inverse of `pack_codes`: the codes of `shape`, int8 if signed else uint8.

  Raises:
    ValueError: `bits` out of 1..8 or fewer bytes than `shape` needs.
  """
  _check_bits(bits, PACKED_BITS)
  data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)
  size = math.prod(shape)
  need = packed_nbytes(size, bits)
  if data.size < need:
    raise ValueError(f"data has {data.size} bytes; allowed: at least {need} for "
                     f"{size} codes of {bits} bits")
  if bits == 8:
    words = data[:size].astype(np.uint8)
  else:
    planes = np.unpackbits(data[:need], count=size * bits, bitorder="little")
    weights = (1 << np.arange(bits)).astype(np.uint8)
    words = (planes.reshape(size, bits) * weights).sum(axis=1, dtype=np.uint8)
  if signed:
    values = words.astype(np.int16)
    values -= (values >> (bits - 1)) << bits  # Sign extension.
    return values.astype(np.int8).reshape(shape)
  return words.reshape(shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackedTensor:
  """One quantized tensor: `x = (codes - zero_point) * scale` per channel.

  Attributes:
    name: the tensor's name (e.g. 'conv1/kernel'); unique within a file.
    codes: integer codes on the grid of `bits` and `signed`.
    bits: 1 to 8 (packed), or 16 or 32 (whole words, for biases).
    signed: signed (two's complement) or unsigned grid.
    scale: float32 [C]: one scale per index of `axis`, or [1] per tensor.
    zero_point: integers [C] on the same grid as the codes.
    axis: the channel axis of `codes` the scales run along; None: per tensor.
  """
  name: str
  codes: np.ndarray
  bits: int
  signed: bool
  scale: np.ndarray
  zero_point: np.ndarray
  axis: int | None = None

  def __post_init__(self):
    _check_bits(self.bits, PACKED_BITS + WORD_BITS)
    codes = np.asarray(self.codes)
    if self.axis is not None and not -codes.ndim <= self.axis < codes.ndim:
      raise ValueError(f"axis is {self.axis} for {self.name!r} of shape "
                       f"{codes.shape}; allowed: None or -{codes.ndim}..{codes.ndim - 1}")
    channels = 1 if self.axis is None else codes.shape[self.axis]
    for field in ("scale", "zero_point"):
      value = np.asarray(getattr(self, field))
      if value.shape != (channels,):
        raise ValueError(f"{field} of {self.name!r} has shape {value.shape}; "
                         f"allowed: ({channels},), one per channel of axis {self.axis}")

  @property
  def channels(self) -> int:
    return 1 if self.axis is None else np.shape(self.codes)[self.axis]


def _encode_ints(values: np.ndarray, bits: int, signed: bool) -> bytes:
  if bits in WORD_BITS:
    lo, hi = code_range(bits, signed)
    values = np.asarray(values).astype(np.int64)
    if values.size and (values.min() < lo or values.max() > hi):
      raise ValueError(f"values span [{values.min()}, {values.max()}]; allowed: "
                       f"the {bits}-bit grid [{lo}, {hi}]")
    dtype = f"<{'i' if signed else 'u'}{bits // 8}"
    return values.astype(dtype).tobytes()
  return pack_codes(values, bits, signed=signed).tobytes()


def _decode_ints(data: bytes, bits: int, signed: bool, shape: Sequence[int]) -> np.ndarray:
  if bits in WORD_BITS:
    dtype = f"<{'i' if signed else 'u'}{bits // 8}"
    return np.frombuffer(data, dtype).reshape(shape).astype(dtype[1:])
  return unpack_codes(data, bits, signed=signed, shape=shape)


def _nbytes(size: int, bits: int) -> int:
  return size * bits // 8 if bits in WORD_BITS else packed_nbytes(size, bits)


def tensor_nbytes(t: PackedTensor) -> int:
  """Payload bytes of one tensor: codes, scales and zero points."""
  return (_nbytes(np.size(t.codes), t.bits) + 4 * t.channels
          + _nbytes(t.channels, t.bits))


def save_packed(path: str | os.PathLike, tensors: Sequence[PackedTensor]) -> int:
  """Writes `tensors` to a packed-weights file, atomically; returns its size.

  Raises:
    ValueError: repeated names, or codes or zero points off their grid.
  """
  names = [t.name for t in tensors]
  if len(set(names)) != len(names):
    repeated = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f"tensor names {repeated} repeat; allowed: unique names")
  payload = []
  for t in tensors:
    payload.append(_encode_ints(t.codes, t.bits, t.signed))
    payload.append(np.asarray(t.scale, "<f4").tobytes())
    payload.append(_encode_ints(t.zero_point, t.bits, t.signed))
  body = b"".join(payload)
  header = {"tensors": [{"name": t.name, "shape": list(np.shape(t.codes)),
                         "bits": int(t.bits), "signed": bool(t.signed),
                         "axis": t.axis} for t in tensors],
            "payload": len(body)}
  packed_header = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
  with atomic_open(path, "wb") as f:
    f.write(MAGIC + struct.pack("<I", len(packed_header)) + packed_header + body)
  return len(MAGIC) + 4 + len(packed_header) + len(body)


def load_packed(path: str | os.PathLike) -> list[PackedTensor]:
  """Reads a packed-weights file written by `save_packed`.

  Raises:
    ValueError: not a packed-weights file, or cut short.
  """
  with open(path, "rb") as f:
    data = f.read()
  if data[:len(MAGIC)] != MAGIC:
    raise ValueError(f"{os.fspath(path)!r} starts with {data[:len(MAGIC)]!r}; "
                     f"allowed: a packed-weights file starting with {MAGIC!r}")
  (length,) = struct.unpack_from("<I", data, len(MAGIC))
  start = len(MAGIC) + 4
  header = json.loads(zlib.decompress(data[start:start + length]))
  body = memoryview(data)[start + length:]
  if len(body) != header["payload"]:
    raise ValueError(f"{os.fspath(path)!r} has {len(body)} payload bytes; "
                     f"allowed: {header['payload']} as its header says")
  tensors, at = [], 0
  for entry in header["tensors"]:
    shape, bits, signed, axis = entry["shape"], entry["bits"], entry["signed"], entry["axis"]
    channels = 1 if axis is None else shape[axis]
    sizes = (_nbytes(math.prod(shape), bits), 4 * channels, _nbytes(channels, bits))
    codes, scale, zero = (bytes(body[at + sum(sizes[:i]):at + sum(sizes[:i + 1])])
                          for i in range(3))
    at += sum(sizes)
    tensors.append(PackedTensor(
        name=entry["name"], codes=_decode_ints(codes, bits, signed, shape),
        bits=bits, signed=signed, scale=np.frombuffer(scale, "<f4").astype(np.float32),
        zero_point=_decode_ints(zero, bits, signed, (channels,)), axis=axis))
  return tensors


def weight_bits(graph: Graph, node: Node) -> int:
  """The weight bit-width of an integer layer: the policy's, if its codes fit.

  Without a policy (or when the codes do not fit its signed grid, as a
  binary {-1, +1} kernel does not fit 1 bit), the smallest signed grid that
  holds the codes.
  """
  weight = node.arrays["weight"]
  span = (int(weight.min()), int(weight.max())) if weight.size else (0, 0)

  def fits(bits):
    lo, hi = code_range(bits, True)
    return lo <= span[0] and span[1] <= hi

  if graph.policy is not None and node.name in graph.policy.names:
    bits = int(np.asarray(graph.policy.bits_for(node.name)[0]))
    if bits in PACKED_BITS and fits(bits):
      return bits
  return next(b for b in PACKED_BITS if fits(b))


def graph_weights(graph: Graph) -> list[PackedTensor]:
  """The packed tensors of `graph`'s integer layers, in graph order.

  Each `conv` / `dense` layer gives `<layer>/kernel` (its signed codes at
  `weight_bits`, per output channel, the last axis: HWIO or `[K, C]`, zero
  points 0) and `<layer>/bias` (int32 in accumulator units, at the
  accumulator's per-channel scale, which carries a folded BatchNorm's sign).
  Floating-point layers are not integer data and are left out.
  """
  tensors = []
  for node in graph.nodes:
    if node.op not in ("conv", "dense"):
      continue
    weight, bias = node.arrays["weight"], node.arrays["bias"]
    channels = weight.shape[-1]
    tensors.append(PackedTensor(
        name=f"{node.name}/kernel", codes=weight, bits=weight_bits(graph, node),
        signed=True, scale=node.arrays["weight_scale"].astype(np.float32),
        zero_point=np.zeros(channels, np.int64), axis=weight.ndim - 1))
    tensors.append(PackedTensor(
        name=f"{node.name}/bias", codes=bias, bits=32, signed=True,
        scale=np.broadcast_to(node.encoding.scale, (channels,)).astype(np.float32),
        zero_point=np.zeros(channels, np.int64), axis=0))
  return tensors
