"""A minimal MATLAB level-5 MAT-file writer for the synthetic MARS info files.

MATLAB saved the real MARS info arrays as class `double` with the payload stored as a smaller integer type
(int32 for the track tables, uint16 for `query_IDX`); `scipy.io.loadmat` then returns those integer types.
`scipy.io.savemat` cannot write that combination and stamps the creation time into the header, so this
writer exists to make synthetic files with the real storage and the same bytes for the same input.
"""

from __future__ import annotations

import struct

import numpy as np

MI_INT8, MI_UINT16, MI_INT32, MI_UINT32, MI_MATRIX = 1, 4, 5, 6, 14
MX_DOUBLE_CLASS = 6
PAYLOAD_TYPES = {np.dtype("int32"): MI_INT32, np.dtype("uint16"): MI_UINT16}
HEADER_TEXT = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 1970"


def _element(data_type: int, payload: bytes) -> bytes:
    """A tagged data element, padded to a multiple of 8 bytes."""
    pad = (-len(payload)) % 8
    return struct.pack("<II", data_type, len(payload)) + payload + b"\0" * pad


def _double_matrix(name: str, values: np.ndarray) -> bytes:
    """A double-class matrix whose values are stored with the integer type of `values`."""
    if values.ndim != 2:
        raise ValueError("MAT matrices here are 2-D")
    flags = _element(MI_UINT32, struct.pack("<II", MX_DOUBLE_CLASS, 0))
    dims = _element(MI_INT32, struct.pack("<2i", *values.shape))
    label = _element(MI_INT8, name.encode("ascii"))
    # MATLAB stores arrays column-major.
    real = _element(PAYLOAD_TYPES[values.dtype], np.asfortranarray(values).tobytes(order="F"))
    return _element(MI_MATRIX, flags + dims + label + real)


def mat_bytes(name: str, values: np.ndarray) -> bytes:
    """The bytes of a MAT-file holding one variable `name` (int32 or uint16 payload, double class)."""
    values = np.asarray(values)
    if values.dtype not in PAYLOAD_TYPES:
        raise ValueError(f"payload dtype must be int32 or uint16, got {values.dtype}")
    header = HEADER_TEXT.ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    return header + _double_matrix(name, values)
