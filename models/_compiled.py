"""Small compiled loops (numba), imported only by the code paths that need them."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def fnv1a(offsets, data, out):
    for i in range(len(out)):
        h = np.uint64(14695981039346656037)
        for b in data[offsets[i]:offsets[i + 1]]:
            h = (h ^ np.uint64(b)) * np.uint64(1099511628211)
        # MurmurHash3's finaliser: FNV-1a's high bits barely move between ids that
        # differ in their last characters (inf-0001, inf-0002, ...), and the high bits decide
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
        out[i] = h
