"""Bit-stream packing of one group of 8 indices, shared by the CPU and CUDA kernels.

Eight values of ``bits`` bits fill exactly ``bits`` bytes, so groups are
independent and each kernel (chunks of groups claimed by the CPU threads, a
grid-stride loop on the GPU) handles whole groups. These are plain Python functions: ``cpu.py`` compiles
them with ``njit`` and ``cuda.py`` as device functions, so both backends run the
same code. Layout: value ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``,
least significant bit first (see :mod:`compressor.quant_primitives`).
"""

import numpy as np


def pack_group(theta, bits, mask, g, out):
    n = theta.shape[0]
    acc = np.uint64(0)
    nacc = 0
    pos = g * bits
    for i in range(g * 8, min(n, g * 8 + 8)):
        acc |= (np.uint64(theta[i]) & mask) << np.uint64(nacc)
        nacc += bits
        while nacc >= 8:
            out[pos] = np.uint8(acc & np.uint64(0xFF))
            acc >>= np.uint64(8)
            nacc -= 8
            pos += 1
    if nacc > 0:
        out[pos] = np.uint8(acc & np.uint64(0xFF))


def unpack_group(buf, n, bits, mask, g, out):
    acc = np.uint64(0)
    nacc = 0
    pos = g * bits
    for i in range(g * 8, min(n, g * 8 + 8)):
        while nacc < bits:  # reads only bytes that hold bits of values < n
            acc |= np.uint64(buf[pos]) << np.uint64(nacc)
            pos += 1
            nacc += 8
        out[i] = np.uint32(acc & mask)
        acc >>= np.uint64(bits)
        nacc -= bits
