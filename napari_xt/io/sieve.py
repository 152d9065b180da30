"""Sieving a label image: pieces smaller than `min_size` pixels take the label around them.

A piece is a 4-connected set of pixels of one label. One pass relabels every piece of fewer
than `min_size` pixels to the label most of its outside 4-neighbours carry, counting only
neighbours in pieces of at least `min_size` pixels when it has any; ties go to the lower
label. Each pass decides every piece from its own input alone, so the result does not
depend on any order. `sieve` makes two passes: the second settles a speck that lay wholly
inside another small piece (the first pass gives it that piece's old label, the second the
label the piece took). Pieces of `min_size` pixels or more are never changed.

The rule is local: whether a pixel changes depends only on the pieces within `halo(min_size)`
pixels of it. `sieve_blocks` therefore sieves an image of any size block by block, each block
read with that margin, with bounded memory, and gives exactly the whole-image result: in a
pass, a piece not touching its window's cut sides is a whole piece of the image; a piece that
does touch them reaches at least `min_size` pixels away from any small piece that concerns
the block, so it is counted as large, which it is.

This is a finishing pass over the labels, not part of the model: `napari-xt sieve` writes the
sieved labels of a result store as a separate label image beside the model's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

Bounds = tuple[int, int, int, int]  # y0, x0, y1, x1


PASSES = 2


def halo(min_size: int) -> int:
    """The margin (pixels) a block is read with so that `sieve_blocks` is exact: what one
    pass needs (2 `min_size` + 2), once per pass."""
    return PASSES * (2 * int(min_size) + 2)


def check_min_size(min_size: int) -> int:
    """`min_size` as an int >= 1; raises `ValueError` otherwise."""
    if isinstance(min_size, bool) or int(min_size) != min_size or int(min_size) < 1:
        raise ValueError(f"min_size must be a whole number of pixels >= 1, got {min_size!r}")
    return int(min_size)


def sieve(labels: np.ndarray, min_size: int,
          cut: tuple[bool, bool, bool, bool] = (False, False, False, False)) -> np.ndarray:
    """The sieved copy of a (Y, X) integer label array (see the module docstring).

    cut: (top, left, bottom, right) sides of `labels` that are cut from a larger image (not
    its edges): a piece touching a cut side may continue beyond it and is never small.
    `min_size=1` changes nothing."""
    min_size = check_min_size(min_size)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (Y, X), got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise ValueError(f"labels must be integers, not {labels.dtype}")
    out = labels.copy()
    if min_size <= 1 or labels.size == 0:
        return out
    for _ in range(PASSES):
        out = sieve_pass(out, min_size, cut)
    return out


def sieve_pass(labels: np.ndarray, min_size: int,
               cut: tuple[bool, bool, bool, bool] = (False, False, False, False)) -> np.ndarray:
    """One pass of the rule (module docstring) over a (Y, X) integer array, as a copy.

    Votes are counted on the ranks of the label values (any integer dtype and range,
    negative values included), then mapped back."""
    values, rank = np.unique(labels, return_inverse=True)
    rank = rank.reshape(labels.shape)
    ids, count = piece_ids(rank, len(values))
    sizes = np.bincount(ids.ravel(), minlength=count + 1)
    large = sizes >= min_size
    large[0] = True  # no piece has id 0 (every pixel has a label)
    top, left, bottom, right = cut
    for flag, edge in ((top, ids[0]), (left, ids[:, 0]), (bottom, ids[-1]), (right, ids[:, -1])):
        if flag:
            large[edge] = True
    out = labels.copy()
    if large.all():
        return out
    # votes: (small piece, neighbour rank, neighbour in a large piece) over 4-neighbour pairs
    a_ids, b_vals, b_large = [], [], []
    for axis in (0, 1):
        n = labels.shape[axis]
        lo = (slice(0, n - 1), slice(None)) if axis == 0 else (slice(None), slice(0, n - 1))
        hi = (slice(1, n), slice(None)) if axis == 0 else (slice(None), slice(1, n))
        i_lo, i_hi = ids[lo].ravel(), ids[hi].ravel()
        v_lo, v_hi = rank[lo].ravel(), rank[hi].ravel()
        differ = i_lo != i_hi
        for src, dst, val in ((i_lo, i_hi, v_hi), (i_hi, i_lo, v_lo)):
            keep = differ & ~large[src]
            a_ids.append(src[keep])
            b_vals.append(val[keep].astype(np.int64))
            b_large.append(large[dst[keep]])
    piece = np.concatenate(a_ids)
    value = np.concatenate(b_vals)
    near_large = np.concatenate(b_large)
    small = np.flatnonzero(~large)
    if piece.size == 0:  # a small piece alone in the image (nothing around it)
        return out
    # a piece with large neighbours votes among those only
    has_large = np.zeros(count + 1, bool)
    has_large[piece[near_large]] = True
    use = near_large | ~has_large[piece]
    piece, value = piece[use], value[use]
    span = len(values)  # ranks are 0 .. span - 1; piece * span stays far below 2**63
    keys, votes = np.unique(piece * span + value, return_counts=True)
    k_piece, k_value = keys // span, keys % span
    # per piece: most votes, then the lower label (ranks keep the order of the values)
    order = np.lexsort((k_value, -votes, k_piece))
    first = np.ones(len(order), bool)
    first[1:] = k_piece[order][1:] != k_piece[order][:-1]
    winner = np.zeros(count + 1, np.int64)
    chosen = order[first]
    winner[k_piece[chosen]] = k_value[chosen]
    decided = np.zeros(count + 1, bool)
    decided[k_piece[chosen]] = True
    change = np.zeros(count + 1, bool)
    change[small] = decided[small]
    mask = change[ids]
    out[mask] = values[winner[ids[mask]]]
    return out


MANY_VALUES = 32  # from this many distinct values on, pieces are found as graph components


def piece_ids(rank: np.ndarray, n_values: int) -> tuple[np.ndarray, int]:
    """(ids, count): every piece of a (Y, X) array of ranks 0 .. n_values - 1 numbered
    1 .. count. Few values: one labelling per value, inside that value's bounding box;
    many: the connected components of the graph of equal 4-neighbours, in one go."""
    from scipy import ndimage as ndi

    ids = np.zeros(rank.shape, np.int64)
    if n_values < MANY_VALUES:
        count = 0
        for value, box in enumerate(ndi.find_objects(rank + 1)):
            if box is None:
                continue
            lab, n = ndi.label(rank[box] == value)
            part = ids[box]
            inside = lab > 0
            part[inside] = lab[inside] + count
            count += n
        return ids, count
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index = np.arange(rank.size, dtype=np.int64).reshape(rank.shape)
    same_y = rank[1:] == rank[:-1]
    same_x = rank[:, 1:] == rank[:, :-1]
    src = np.concatenate([index[1:][same_y], index[:, 1:][same_x]])
    dst = np.concatenate([index[:-1][same_y], index[:, :-1][same_x]])
    graph = coo_matrix((np.ones(src.size, np.int8), (src, dst)), shape=(rank.size, rank.size))
    count, component = connected_components(graph, directed=False)
    ids[:] = component.reshape(rank.shape) + 1
    return ids, int(count)


def sieve_box(read: Callable[[Bounds], np.ndarray], shape: tuple[int, int], min_size: int,
              box: Bounds) -> np.ndarray:
    """The sieved labels of `box` (y0, x0, y1, x1) of an image of `shape` (Y, X), exactly as
    `sieve` of the whole image gives them: `read(window)` returns the input labels of a
    window, read here with a margin of `halo(min_size)` pixels around the box (clipped at
    the image edges)."""
    min_size = check_min_size(min_size)
    height, width = (int(s) for s in shape)
    y0, x0, y1, x1 = (int(v) for v in box)
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise ValueError(f"box {box} is not inside an image of shape {shape}")
    m = halo(min_size) if min_size > 1 else 0
    wy0, wx0 = max(0, y0 - m), max(0, x0 - m)
    wy1, wx1 = min(height, y1 + m), min(width, x1 + m)
    window = np.asarray(read((wy0, wx0, wy1, wx1)))
    if window.shape != (wy1 - wy0, wx1 - wx0):
        raise ValueError(f"read({(wy0, wx0, wy1, wx1)}) gave shape {window.shape}, not "
                         f"{(wy1 - wy0, wx1 - wx0)}")
    done = sieve(window, min_size, (wy0 > 0, wx0 > 0, wy1 < height, wx1 < width))
    return done[y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0]


def sieve_blocks(read: Callable[[Bounds], np.ndarray], shape: tuple[int, int], min_size: int,
                 block: int = 1024) -> Iterator[tuple[Bounds, np.ndarray]]:
    """The sieved image of `shape` (Y, X), block by block: yields ((y0, x0, y1, x1), block),
    the blocks tiling the image in row-major order, each from `sieve_box`, so memory is
    bounded by the block and the result is exactly `sieve` of the whole image."""
    min_size = check_min_size(min_size)
    if block < 1:
        raise ValueError(f"block must be >= 1 pixel, got {block}")
    height, width = (int(s) for s in shape)
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            box = (y0, x0, min(height, y0 + block), min(width, x0 + block))
            yield box, sieve_box(read, shape, min_size, box)


def sieve_lazy(labels, min_size: int, chunk: int = 1024):
    """The sieved image of a (Y, X) label array (dask or numpy) as a dask array of
    `chunk`-sized blocks, each computed by `sieve_box` from a window of `labels` (so a block
    reads only its window and the result is exactly `sieve` of the whole image)."""
    import dask.array as da

    min_size = check_min_size(min_size)
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a whole number of pixels >= 1, got {chunk!r}")
    chunk = int(chunk)
    if not isinstance(labels, da.Array):
        labels = da.from_array(np.asarray(labels), chunks=chunk)
    shape = tuple(int(s) for s in labels.shape)
    if len(shape) != 2:
        raise ValueError(f"labels must be 2-D (Y, X), got shape {shape}")

    def read(window: Bounds) -> np.ndarray:
        y0, x0, y1, x1 = window
        return np.asarray(labels[y0:y1, x0:x1].compute(scheduler="synchronous"))

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return sieve_box(read, shape, min_size, (y0, x0, y1, x1))

    chunks = tuple(tuple(min(chunk, n - i) for i in range(0, n, chunk)) for n in shape)
    token = da.core.tokenize(labels, min_size, chunk, PASSES)
    return da.map_blocks(block, dtype=labels.dtype, chunks=chunks, name=f"sieve-{token}")
