"""Float32 arithmetic on the host, as TF's float32 ops round (schedule values, bin edges).

A float32 division or product computed in float64 and rounded to float32 equals the float32
operation (float64 has more than 2 * 24 + 2 bits), so host floats rounded here match the device.
"""

from __future__ import annotations

import struct

__all__ = ["f32", "f32_bits", "f32_from_bits"]


def f32(x: float) -> float:
    """Round a host float to float32.

    Example::

        >>> f32(0.1)
        0.10000000149011612
    """
    return struct.unpack("f", struct.pack("f", x))[0]


def f32_bits(x: float) -> int:
    """The bits of float32 ``x`` as a signed int32.

    Example::

        >>> f32_bits(1.0)
        1065353216
    """
    return struct.unpack("<i", struct.pack("<f", x))[0]


def f32_from_bits(bits: int) -> float:
    """The float32 whose bits (a signed int32) are ``bits``.

    Example::

        >>> f32_from_bits(1065353216)
        1.0
    """
    return struct.unpack("<f", struct.pack("<i", bits))[0]
