"""64-bit perceptual hash (pHash) and Hamming-radius search without all-pairs comparison.

pHash: 32x32 greyscale, 2-D DCT (scipy), the 8x8 lowest frequencies, one bit per coefficient
above their median. Search: split the 64 bits into ``radius + 1`` bands; by pigeonhole any two
hashes within ``radius`` agree exactly on at least one band, so only hashes sharing a band value
are compared.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dctn


def phash(rgb: np.ndarray) -> int:
    """pHash of an RGB uint8 array (any size), as a signed int64 (Parquet has no uint64 stats)."""
    im = Image.fromarray(rgb).convert("L").resize((32, 32), Image.BILINEAR)
    coeffs = dctn(np.asarray(im, dtype=np.float64), norm="ortho")[:8, :8]
    bits = (coeffs > np.median(coeffs)).ravel()
    # first coefficient = most significant bit; read as two's complement = the uint64 viewed as int64
    return int.from_bytes(np.packbits(bits).tobytes(), "big", signed=True)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a.view(np.uint64), b.view(np.uint64)))


def _bands(radius: int) -> list[tuple[int, int]]:
    """(shift, width) of ``radius + 1`` bands covering 64 bits."""
    n = radius + 1
    widths = [64 // n + (1 if i < 64 % n else 0) for i in range(n)]
    out, shift = [], 0
    for w in widths:
        out.append((shift, w))
        shift += w
    return out


def near_pairs(hashes: np.ndarray, radius: int, other: np.ndarray | None = None) -> np.ndarray:
    """Index pairs (i, j) with Hamming distance <= radius.

    Within ``hashes`` (i < j), or between ``hashes`` (i) and ``other`` (j) when given. Returns an
    (n, 2) int64 array, sorted and unique.
    """
    h = np.ascontiguousarray(hashes, dtype=np.int64).view(np.uint64)
    o = None if other is None else np.ascontiguousarray(other, dtype=np.int64).view(np.uint64)
    found: list[np.ndarray] = []
    for shift, width in _bands(radius):
        mask = np.uint64((1 << width) - 1) if width < 64 else np.uint64(2**64 - 1)
        kh = (h >> np.uint64(shift)) & mask
        if o is None:
            found.append(_pairs_within(kh, h, radius))
        else:
            ko = (o >> np.uint64(shift)) & mask
            found.append(_pairs_between(kh, h, ko, o, radius))
    if not found or not any(len(f) for f in found):
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate([f for f in found if len(f)]), axis=0)


def _runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    ends = np.r_[starts[1:], len(sk)]
    return order, starts, ends


def _pairs_within(keys: np.ndarray, h: np.ndarray, radius: int) -> np.ndarray:
    order, starts, ends = _runs(keys)
    out = []
    sizes = ends - starts
    # Runs of two (most band collisions) in one vectorised step; larger runs pair by pair.
    two = starts[sizes == 2]
    if len(two):
        a, b = order[two], order[two + 1]
        ok = np.bitwise_count(h[a] ^ h[b]) <= radius
        out.append(np.stack([np.minimum(a, b)[ok], np.maximum(a, b)[ok]], axis=1))
    multi = sizes > 2
    for s, e in zip(starts[multi], ends[multi]):
        idx = order[s:e]
        i, j = np.triu_indices(len(idx), k=1)
        d = np.bitwise_count(h[idx[i]] ^ h[idx[j]])
        ok = d <= radius
        if ok.any():
            a, b = idx[i[ok]], idx[j[ok]]
            out.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def _pairs_between(kh: np.ndarray, h: np.ndarray, ko: np.ndarray, o: np.ndarray, radius: int) -> np.ndarray:
    order, starts, ends = _runs(ko)
    sk = ko[order]
    out = []
    pos = np.searchsorted(sk[starts], kh)
    hit = np.flatnonzero((pos < len(starts)) & (sk[starts[np.minimum(pos, len(starts) - 1)]] == kh))
    for i in hit:
        js = order[starts[pos[i]]:ends[pos[i]]]
        ok = np.bitwise_count(o[js] ^ h[i]) <= radius
        if ok.any():
            out.append(np.stack([np.full(int(ok.sum()), i), js[ok]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def brute_force_pairs(hashes: np.ndarray, radius: int, block: int = 2048) -> np.ndarray:
    """All-pairs reference (for tests and the benchmark)."""
    h = np.ascontiguousarray(hashes, dtype=np.int64).view(np.uint64)
    out = []
    for s in range(0, len(h), block):
        d = np.bitwise_count(h[s:s + block, None] ^ h[None, :])
        i, j = np.nonzero(d <= radius)
        i = i + s
        keep = i < j
        out.append(np.stack([i[keep], j[keep]], axis=1))
    return np.unique(np.concatenate(out), axis=0) if out else np.zeros((0, 2), dtype=np.int64)


# A near duplicate is often the same picture cropped by a few percent and rescaled: its pHash then
# lies 6-8 bits from its source's, as far as unrelated images with the same layout. Hashing centre
# crops brings the two back together (the copy's full frame ~ the source's centre crop).
CROP_SCALES = (0.98, 0.96, 0.94)


def centre_crop(rgb: np.ndarray, scale: float) -> np.ndarray:
    """The centre of an image keeping ``scale`` of its width and height."""
    h, w = rgb.shape[:2]
    ch, cw = max(2, int(round(h * scale))), max(2, int(round(w * scale)))
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(rgb[y:y + ch, x:x + cw])


def crop_phashes(rgb: np.ndarray, scales: tuple[float, ...] = CROP_SCALES) -> list[int]:
    """pHash of the centre crop at each scale."""
    return [phash(centre_crop(rgb, s)) for s in scales]


COLOR_CELLS = 4 * 4 * 3


def color_signature(rgb: np.ndarray, grid: int = 4) -> list[int]:
    """Mean colour of each cell of a ``grid`` x ``grid`` split (RGB, row-major): a check that two
    images with close pHashes (which see only luminance) also agree in colour."""
    im = Image.fromarray(rgb).resize((grid, grid), Image.BOX)
    return np.asarray(im, dtype=np.uint8).ravel().tolist()


def crop_color_signatures(rgb: np.ndarray, scales: tuple[float, ...] = CROP_SCALES) -> list[int]:
    """The colour signature of the whole image, then of each centre crop (``COLOR_CELLS`` values
    each): a crop match is confirmed against the crop that matched."""
    out = color_signature(rgb)
    for s in scales:
        out += color_signature(centre_crop(rgb, s))
    return out


def color_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference (0-255) between rows of two colour-signature arrays."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=-1)
