"""64-bit perceptual hash (pHash) and Hamming-radius search without all-pairs comparison.

pHash: 32x32 greyscale, 2-D DCT (scipy), the 8x8 lowest frequencies, one bit per coefficient
above their median. Search: split the 64 bits into ``m > radius`` bands; by pigeonhole any two
hashes within ``radius`` agree exactly on some ``m - radius`` of them, so only hashes that share
the bits of one such choice of bands are compared (multi-index hashing, exact).
"""
from __future__ import annotations

import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image


def phash(rgb: np.ndarray) -> int:
    """pHash of an RGB uint8 array (any size), as a signed int64 (Parquet has no uint64 stats)."""
    from scipy.fft import dctn  # imported here: listing the stages need not load scipy

    im = Image.fromarray(rgb).convert("L").resize((32, 32), Image.BILINEAR)
    coeffs = dctn(np.asarray(im, dtype=np.float64), norm="ortho")[:8, :8]
    bits = (coeffs > np.median(coeffs)).ravel()
    # first coefficient = most significant bit; read as two's complement = the uint64 viewed as int64
    return int.from_bytes(np.packbits(bits).tobytes(), "big", signed=True)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a.view(np.uint64), b.view(np.uint64)))


def _bands(m: int) -> list[int]:
    """Bit masks of ``m`` bands covering the 64 bits."""
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    masks, shift = [], 0
    for w in widths:
        masks.append(((1 << w) - 1) << shift)
        shift += w
    return masks


def _tables(radius: int, n_pairs: float) -> list[np.uint64]:
    """Masks of the lookup tables: the 64 bits in ``m`` bands, one table per choice of ``m - radius``
    bands. Two hashes within ``radius`` differ in at most ``radius`` bands, so they agree on every
    bit of at least one table: the search is exact. ``m`` is chosen for the least expected work
    (``n_pairs`` compared pairs): more bands mean more tables, but wider keys and fewer collisions."""
    def cost(m: int) -> float:
        widths = sorted(64 // m + (1 if i < 64 % m else 0) for i in range(m))
        key_bits = sum(widths[:m - radius])  # the narrowest key of the tables
        # per table: sorting the keys (~10 comparisons' worth per row) + comparing colliding pairs
        return math.comb(m, radius) * (10 * math.sqrt(2 * n_pairs) + n_pairs / 2.0 ** key_bits)

    m = min(range(radius + 1, min(64, radius + 8) + 1), key=cost)
    bands = _bands(m)
    return [np.uint64(sum(bands[i] for i in keep)) for keep in itertools.combinations(range(m), m - radius)]


def near_pairs(hashes: np.ndarray, radius: int, other: np.ndarray | None = None) -> np.ndarray:
    """Index pairs (i, j) with Hamming distance <= radius.

    Within ``hashes`` (i < j), or between ``hashes`` (i) and ``other`` (j) when given. Returns an
    (n, 2) int64 array, sorted and unique.
    """
    h = np.ascontiguousarray(hashes, dtype=np.int64).view(np.uint64)
    o = None if other is None else np.ascontiguousarray(other, dtype=np.int64).view(np.uint64)
    n_pairs = len(h) * (len(h) if o is None else len(o)) / (2 if o is None else 1)
    def table(mask: np.uint64) -> np.ndarray:
        return _pairs_within(h, mask, radius) if o is None else _pairs_between(h, o, mask, radius)

    tables = _tables(radius, max(1.0, n_pairs))
    # The tables are independent and numpy releases the GIL in their sorts and comparisons. Two
    # at a time: each holds a few arrays of the pool's size.
    if len(tables) > 1 and len(h) >= 100_000:
        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            found = list(pool.map(table, tables))
    else:
        found = [table(m) for m in tables]
    found = [f for f in found if len(f)]
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return unique_pairs(np.concatenate(found))


def search_tables(radius: int, pool_size: int) -> list[np.uint64]:
    """The lookup tables ``near_pairs`` uses for a pool of ``pool_size`` hashes: every part of a
    partitioned search must use the same ones."""
    return _tables(radius, max(1.0, pool_size * (pool_size - 1) / 2))


def key_parts(hashes: np.ndarray, tables: list[np.uint64], parts: int) -> np.ndarray:
    """(rows, tables) partition of each hash's key in each table. Equal keys share a partition, so
    a part holds whole runs of its tables and finds every pair within them; a mixing hash of the
    key spreads the runs evenly."""
    h = np.ascontiguousarray(hashes, dtype=np.int64).view(np.uint64)
    out = np.empty((len(h), len(tables)), dtype=np.int32)
    with np.errstate(over="ignore"):
        for t, mask in enumerate(tables):
            key, _ = _key(h, mask)
            x = (key + np.uint64(t + 1)) * np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing
            out[:, t] = ((x ^ (x >> np.uint64(29))) % np.uint64(parts)).astype(np.int32)
    return out


def pairs_within_key(hashes: np.ndarray, mask: np.uint64, radius: int) -> np.ndarray:
    """Pairs (i < j) within ``radius`` among rows that share their key under ``mask`` (one lookup
    table of ``search_tables``)."""
    h = np.ascontiguousarray(hashes, dtype=np.int64).view(np.uint64)
    return _pairs_within(h, mask, radius) if len(h) > 1 else np.zeros((0, 2), dtype=np.int64)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of a 1-D integer array by one sort: numpy's hash-based unique falls far behind
    a sort once the array outgrows the caches."""
    out = np.sort(values.ravel())
    return out[np.r_[True, out[1:] != out[:-1]]] if len(out) else out


def unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """``np.unique(pairs, axis=0)`` for non-negative int64 pairs, as one 1-D sort of packed pairs
    when both ids fit in 32 bits (the axis form sorts rows as records, several times slower)."""
    if not len(pairs) or pairs.max() >= 2**32:
        return np.unique(pairs, axis=0)
    packed = sorted_unique((pairs[:, 0].astype(np.uint64) << np.uint64(32)) | pairs[:, 1].astype(np.uint64))
    return np.stack([(packed >> np.uint64(32)).astype(np.int64), (packed & np.uint64(2**32 - 1)).astype(np.int64)], axis=1)


def _key(h: np.ndarray, mask: np.uint64) -> tuple[np.ndarray, int]:
    """The bits of ``h`` under ``mask`` packed together at the low end, and their number. Built in
    place: at pool scale each temporary is a fresh mapping of the pool's size, and first touching
    new memory costs more than the shifts."""
    key = np.empty(len(h), dtype=np.uint64)
    tmp = None
    bits, m = 0, int(mask)
    while m:
        shift = (m & -m).bit_length() - 1  # lowest set bit: a run of ones starts here
        width = ((m >> shift) ^ ((m >> shift) + 1)).bit_length() - 1
        part = key if bits == 0 else (tmp if tmp is not None else np.empty_like(key))
        np.right_shift(h, np.uint64(shift), out=part)
        np.bitwise_and(part, np.uint64((1 << width) - 1), out=part)
        if bits:
            np.left_shift(part, np.uint64(bits), out=part)
            np.bitwise_or(key, part, out=key)
            tmp = part
        bits += width
        m &= ~(((1 << width) - 1) << shift)
    return key, bits


def _sorted(key: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, sorted keys); ``key`` is consumed. Key and row packed in one uint64 when they fit:
    a plain in-place sort of numbers is several times faster than an argsort."""
    row_bits = max(1, (len(key) - 1).bit_length())
    if bits + row_bits > 64:
        order = np.argsort(key)
        return order, key[order]
    packed = key
    packed <<= np.uint64(row_bits)
    packed |= np.arange(len(key), dtype=np.uint64)
    packed.sort()
    order = (packed & np.uint64((1 << row_bits) - 1)).view(np.int64)
    packed >>= np.uint64(row_bits)
    return order, packed


def _pairs_within(h: np.ndarray, mask: np.uint64, radius: int) -> np.ndarray:
    """Pairs of rows with equal bits under ``mask`` and within ``radius``. Every pair of a run of
    equal keys is (i, i + d) in key order for some offset d: offset by offset, over all runs at
    once, the positions still inside their run shrink until none is left, so the work is the number
    of pairs compared, never a loop per row or per run."""
    order, sk = _sorted(*_key(h, mask))
    pos = np.flatnonzero(sk[1:] == sk[:-1])  # positions with a next row in their run
    if not len(pos):
        return np.zeros((0, 2), dtype=np.int64)
    sh = h[order]  # hashes in key order: the comparisons below read memory in order
    n = len(sk)
    out = []
    d = 1
    while len(pos):
        ok = pos[np.bitwise_count(sh[pos] ^ sh[pos + d]) <= radius]
        if len(ok):
            a, b = order[ok], order[ok + d]
            out.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
        d += 1
        pos = pos[pos < n - d]
        pos = pos[sk[pos + d] == sk[pos]]
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def _pairs_between(h: np.ndarray, o: np.ndarray, mask: np.uint64, radius: int) -> np.ndarray:
    """Pairs (i in h, j in o) with equal bits under ``mask`` and within ``radius``, by offset into
    o's run of i's key."""
    kh, _ = _key(h, mask)
    order, sk = _sorted(*_key(o, mask))
    so = o[order]
    lo, hi = np.searchsorted(sk, kh, side="left"), np.searchsorted(sk, kh, side="right")
    rows = np.flatnonzero(hi > lo)
    out = []
    d = 0
    while len(rows):
        at = lo[rows] + d
        ok = np.bitwise_count(h[rows] ^ so[at]) <= radius
        if ok.any():
            out.append(np.stack([rows[ok], order[at[ok]]], axis=1))
        d += 1
        rows = rows[hi[rows] - lo[rows] > d]
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
# Web copies are also cut on one side (a banner, a watermark, a scan's margin) or on two: windows that
# drop this share of the image at each side, each pair of adjacent sides and each pair of opposite ones.
SIDE_CUTS = (0.04, 0.08)
_SIDES = ("t", "b", "l", "r", "tl", "tr", "bl", "br", "tb", "lr")


def _centre_box(h: int, w: int, scale: float) -> tuple[int, int, int, int]:
    ch, cw = max(2, int(round(h * scale))), max(2, int(round(w * scale)))
    y, x = (h - ch) // 2, (w - cw) // 2
    return x, y, x + cw, y + ch


def _side_box(h: int, w: int, sides: str, cut: float) -> tuple[int, int, int, int]:
    dy, dx = max(1, int(round(h * cut))), max(1, int(round(w * cut)))
    return ((dx if "l" in sides else 0), (dy if "t" in sides else 0),
            (w - dx if "r" in sides else w), (h - dy if "b" in sides else h))


def crop_boxes(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the sub-windows whose hashes a crop of an ``h`` x ``w`` image
    is matched against: centre crops at each scale, then the side crops at each cut."""
    return [_centre_box(h, w, s) for s in CROP_SCALES] + [_side_box(h, w, sd, c) for c in SIDE_CUTS for sd in _SIDES]


def centre_crop(rgb: np.ndarray, scale: float) -> np.ndarray:
    """The centre of an image keeping ``scale`` of its width and height."""
    x0, y0, x1, y1 = _centre_box(*rgb.shape[:2], scale)
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


def crop_phashes(rgb: np.ndarray) -> list[int]:
    """pHash of each crop window (``crop_boxes``), as ``phash`` computes it on the window: one grey
    conversion and one batched DCT for all of them."""
    from scipy.fft import dctn

    grey = Image.fromarray(rgb).convert("L")
    small = np.stack([np.asarray(grey.crop(b).resize((32, 32), Image.BILINEAR), dtype=np.float64)
                      for b in crop_boxes(*rgb.shape[:2])])
    coeffs = dctn(small, axes=(1, 2), norm="ortho")[:, :8, :8].reshape(len(small), -1)
    bits = coeffs > np.median(coeffs, axis=1, keepdims=True)
    return [int.from_bytes(np.packbits(row).tobytes(), "big", signed=True) for row in bits]


COLOR_CELLS = 4 * 4 * 3


def color_signature(rgb: np.ndarray, grid: int = 4) -> list[int]:
    """Mean colour of each cell of a ``grid`` x ``grid`` split (RGB, row-major): a check that two
    images with close pHashes (which see only luminance) also agree in colour."""
    im = Image.fromarray(rgb).resize((grid, grid), Image.BOX)
    return np.asarray(im, dtype=np.uint8).ravel().tolist()


def crop_color_signatures(rgb: np.ndarray, grid: int = 4) -> list[int]:
    """The colour signature of the whole image, then of each crop window (``COLOR_CELLS`` values
    each): a crop match is confirmed against the window that matched."""
    im = Image.fromarray(rgb)
    out = color_signature(rgb, grid)
    for b in crop_boxes(*rgb.shape[:2]):
        out += np.asarray(im.crop(b).resize((grid, grid), Image.BOX), dtype=np.uint8).ravel().tolist()
    return out


def color_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference (0-255) between rows of two colour-signature arrays."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=-1)
