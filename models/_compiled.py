"""Small compiled loops (numba), imported only by the code paths that need them."""

from __future__ import annotations

import numba
import numpy as np
import pyarrow as pa


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


def id_hashes(inference_id: pa.Array) -> np.ndarray:
    """A 64-bit hash of each inference id (FNV-1a, then MurmurHash3's finaliser), as uint64:
    the same for an id on every replay, in any batch. Explanations sample with it; bias
    mitigation draws its randomised decisions from it."""
    if isinstance(inference_id, pa.ChunkedArray):
        inference_id = inference_id.combine_chunks()
    if inference_id.type != pa.string():
        inference_id = inference_id.cast(pa.string())
    n = len(inference_id)
    _, offsets, data = inference_id.buffers()
    offsets = np.frombuffer(offsets, np.int32, n + 1, inference_id.offset * 4)
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    hashes = np.empty(n, np.uint64)
    fnv1a(offsets, data, hashes)
    return hashes
