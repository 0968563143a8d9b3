"""Small @triton.jit helpers shared by infofuse's kernels."""

import triton
import triton.language as tl


@triton.jit
def softcapped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    """cap·tanh(z/cap) where HAS_SOFTCAP, else z, in float32.

    Written as cap·(1 − 2/(exp(2z/cap) + 1)), which saturates cleanly at ±cap for large |z|.
    """
    if HAS_SOFTCAP:
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    return z
