"""The pruned method's computation (``tolerance > 0``, :mod:`pipeline.methods.pruned`): query blocks in the
run's spatial order against the source tiles each block keeps (:mod:`pipeline.pruning` decides which).

Points and sources are put in one spatial order each, once per run (:func:`compact_order`: the leaves of a
k-d tree in lengthscales, refining the Morton order of :func:`spatial_order`).  In that order, query block
``b`` is rows ``[b * rows, (b + 1) * rows)`` and source tile ``t`` is rows ``[t * INDEX_TILE, (t + 1) *
INDEX_TILE)``, wherever the rows are computed, so a block's bits do not depend on how blocks are grouped into
tasks or spread over workers: the in-process API and ``kgrad run`` give the same bits.  Each block is
computed as sub-blocks of consecutive rows, each against the kept sources it cannot skip
(:func:`sub_block_sources`), as *items* (a sub-block against one tile of those sources) in fixed-shape calls
(:func:`pipeline.blocks.block_item_sums`, zero-weight sources and items as padding), the partial sums added in
item order.

Used by :func:`pipeline.api.kernel_gradients` (all tiles in memory) and by the workers (only the tiles
their blocks need, read from the run's sorted copy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .block_precision import block_setups, needs_x64
from .blocks import block_item_sums, run_blocks
from .kernels import KernelSpec
from .pruning import (INDEX_TILE, Budget, KernelBounds, Selection, TileIndex, select_mini_tiles, select_sources,
                      select_sources_of_blocks, select_tiles, tile_index)
from .sources import PreparedSources, prepare_sources
from .spatial import column_bounds, compact_order, in_input_order, spatial_order, tile_rows
from .tiles import TileShape


def block_boxes(queries: np.ndarray, spec: KernelSpec, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes (lower, upper), each (B, D) in lengthscales, of consecutive blocks of ``rows`` rows."""
    scaled = np.asarray(queries, np.float64) / np.asarray(spec.lengthscale, np.float64)
    starts = np.arange(0, len(scaled), rows)
    return np.minimum.reduceat(scaled, starts, axis=0), np.maximum.reduceat(scaled, starts, axis=0)


def blocks_to_compute(queries: np.ndarray, spec: KernelSpec, rows: int, index: TileIndex, bounds: KernelBounds,
                      budget: Budget) -> Selection:
    """For consecutive blocks of ``rows`` query rows (spatial order): the tiles each must look at."""
    if len(queries) == 0:
        return Selection([], np.zeros(0), np.zeros(0), np.zeros((0, queries.shape[1])), np.zeros((0, queries.shape[1])))
    lower, upper = block_boxes(queries, spec, rows)
    return select_tiles(lower, upper, index, bounds, budget)


@dataclass(frozen=True)
class SourceTiles:
    """Some (or all) source tiles, prepared as the dense path prepares sources, plus one zero-weight tile.

    ``ids``: the global ids of the tiles held (ascending); tile ``ids[k]`` holds flat source positions
    ``[k * cols, k * cols + counts)``; the positions from ``len(ids) * cols`` on are the zero-weight tile.
    ``scaled`` and ``abs_weight`` (per position, float64) are what the per-source pruning level reads."""

    ids: np.ndarray
    prepared: PreparedSources  # (held + 1 calls, 1 tile, cols, S): packed rows
    scaled: np.ndarray  # (positions, D): coordinates in lengthscales
    abs_weight: np.ndarray  # (positions,): |w|, 0 on padding

    @property
    def cols(self) -> int:
        return self.prepared.packed.shape[2]

    @classmethod
    def build(cls, ids: np.ndarray, sources: np.ndarray, weights: np.ndarray | None, spec: KernelSpec,
              dtype: str, cols: int, center: np.ndarray, meta: PreparedSources | None = None) -> "SourceTiles":
        """``sources`` (and ``weights``): the rows of the tiles ``ids``, in order.  ``meta``: the run's
        whole-source facts (count, bounding box, whether float32 terms may cancel) that each block's precision depends on."""
        sources = np.asarray(sources)
        m = len(sources)
        padded = -(-m // cols) * cols + cols  # whole tiles, then the zero-weight tile
        rows = np.empty((padded, sources.shape[1]), sources.dtype)
        rows[:m] = sources
        rows[m:] = sources[0] if m else 0.0  # real coordinates with weight 0: contribute exactly 0
        w = np.zeros(padded)
        w[:m] = 1.0 if weights is None else np.asarray(weights, np.float64)
        prepared = prepare_sources(rows, w, spec, dtype, TileShape(1, cols, 1), center=center)
        if meta is not None:
            prepared = dataclasses.replace(prepared, count=meta.count, lower=meta.lower, upper=meta.upper,
                                           may_cancel=meta.may_cancel)
        scaled = rows.astype(np.float64) / np.asarray(spec.lengthscale, np.float64)
        return cls(np.asarray(ids, np.int64), prepared, scaled, np.abs(w))

    def positions(self, tiles: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Flat positions of the real sources of the tiles ``tiles`` (global ids, all held), tile by tile in the
        order given (ascending for ascending ids)."""
        where = np.searchsorted(self.ids, tiles)
        if len(tiles) and (where.max() >= len(self.ids) or np.any(self.ids[where] != tiles)):
            raise ValueError("a block needs a source tile that was not loaded")
        return tile_rows(tiles, counts, self.cols, slots=where)


SOURCE_GROUP = 32  # query blocks whose single sources are selected at once (select_sources_of_blocks)
SUB_BLOCKS = 8  # a query block is computed as this many sub-blocks of consecutive rows ...
MINI_TILE = 16  # ... each against the mini-tiles (this many consecutive kept sources) it cannot skip
SUB_SHARE = 0.125  # share of the budget left after the tile levels that the sub-block level may spend
ITEMS_PER_CALL = (8, 16, 32)  # items of one compiled call (a block's items: whole calls of 32, then the rest;
# padding items are skipped inside the call, so they cost their transfer only)


def sub_block_rows(rows: int) -> int:
    """Rows of a sub-block for query blocks of ``rows`` rows (the block itself when it does not split evenly)."""
    return rows // SUB_BLOCKS if rows % SUB_BLOCKS == 0 and rows >= 16 * SUB_BLOCKS else rows


def sub_block_sources(queries_scaled: list, kept: list, kept_scaled: list, kept_weight: list, bounds: KernelBounds,
                      value_left: np.ndarray, slope_left: np.ndarray, sub_rows: int) -> list:
    """For query blocks (each block's rows in lengthscales, (b, D)) and the sources each keeps (``kept``:
    positions, ascending, with their scaled coordinates and ``|w|``): per block, per sub-block of ``sub_rows``
    consecutive rows, the positions it computes.  Each block's kept sources are cut into mini-tiles of
    :data:`MINI_TILE`; each sub-block keeps those it cannot skip with ``value_left`` / ``slope_left`` (per
    block) of budget (:func:`~pipeline.pruning.select_mini_tiles`).  The result depends only on each
    block's own rows and sources, not on how blocks are grouped."""
    n_blocks = len(kept)
    dim = queries_scaled[0].shape[1] if n_blocks else 0
    counts = np.array([len(k) for k in kept], np.int64)
    mini_count = -(-counts // MINI_TILE)
    mini_start = np.concatenate([[0], np.cumsum(mini_count)[:-1]]).astype(np.int64)
    if counts.sum():
        points = np.concatenate(kept_scaled)
        weight = np.concatenate(kept_weight)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        firsts = np.concatenate([offsets[b] + np.arange(0, counts[b], MINI_TILE) for b in range(n_blocks)]).astype(np.int64)
        mini_lower = np.minimum.reduceat(points, firsts, axis=0)
        mini_upper = np.maximum.reduceat(points, firsts, axis=0)
        mini_weight = np.add.reduceat(weight, firsts)
    else:
        mini_lower = mini_upper = np.zeros((0, dim))
        mini_weight = np.zeros(0)
    subs_of = [-(-len(q) // sub_rows) for q in queries_scaled]
    sub_block = np.repeat(np.arange(n_blocks), subs_of)
    sub_lower = np.concatenate([np.minimum.reduceat(q, np.arange(0, len(q), sub_rows), axis=0)
                                for q in queries_scaled if len(q)] or [np.zeros((0, dim))])
    sub_upper = np.concatenate([np.maximum.reduceat(q, np.arange(0, len(q), sub_rows), axis=0)
                                for q in queries_scaled if len(q)] or [np.zeros((0, dim))])
    chosen = select_mini_tiles(sub_lower, sub_upper, sub_block, mini_lower, mini_upper, mini_weight, mini_start,
                               mini_count, bounds, np.asarray(value_left)[sub_block], np.asarray(slope_left)[sub_block])
    out, row = [], 0
    for b in range(n_blocks):
        mine = []
        for _ in range(subs_of[b]):
            keep = np.zeros(mini_count[b], bool)
            keep[chosen[row] - mini_start[b]] = True
            mine.append(kept[b][np.repeat(keep, MINI_TILE)[:counts[b]]])
            row += 1
        out.append(mine)
    return out


def sub_block_pairs(sub_positions: list, rows: int, sub_rows: int) -> int:
    """The pairs a block of ``rows`` rows computes: each sub-block's rows times the sources it keeps."""
    return sum(min(sub_rows, rows - s * sub_rows) * len(p) for s, p in enumerate(sub_positions))


def item_calls(sub_positions: list, tiles: "SourceTiles", cols: int) -> list:
    """One block's items: each sub-block's positions cut into tiles of ``cols`` sources (the last padded with
    the zero-weight source), in sub-block order, packed into calls of :data:`ITEMS_PER_CALL` items (whole
    calls of the largest, then the rest in the smallest that holds it, ended by padding items: sub-block -1,
    skipped in the call, their sources left 0).  ``[(packed sources (I, cols, S), item_sub (I,) int32, real
    items)]``; the sources of all calls are gathered at once."""
    lengths = np.array([len(p) for p in sub_positions], np.int64)
    per_sub = -(-lengths // cols)
    items = int(per_sub.sum())
    if items == 0:
        return []
    sizes, left, largest = [], items, ITEMS_PER_CALL[-1]
    while left > 0:
        size = next(c for c in ITEMS_PER_CALL if c >= min(left, largest))
        sizes.append((size, min(size, left)))
        left -= sizes[-1][1]
    total = sum(size for size, _ in sizes)  # the real items are the first ``items`` (only the last call pads)
    item_sub = np.full(total, -1, np.int32)
    item_sub[:items] = np.repeat(np.arange(len(sub_positions), dtype=np.int32), per_sub)
    # Position t of sub-block s goes to slot t % cols of the sub-block's item t // cols.
    slots = np.full(items * cols, len(tiles.ids) * tiles.cols, np.int64)  # the zero-weight tile's first position
    place = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    first_item = np.repeat(np.cumsum(per_sub) - per_sub, lengths)
    slots[(first_item + place // cols) * cols + place % cols] = np.concatenate(sub_positions)
    packed = tiles.prepared.packed
    width = packed.shape[-1]
    gathered = np.zeros((total * cols, width), packed.dtype)
    np.take(packed.reshape(-1, width), slots, axis=0, out=gathered[:items * cols])
    gathered = gathered.reshape(total, cols, width)
    calls, first = [], 0
    for size, take in sizes:
        calls.append((gathered[first:first + size], item_sub[first:first + size], take))
        first += size
    return calls


def compute_blocks(queries: np.ndarray, selection: Selection, tiles: SourceTiles, counts: np.ndarray,
                   bounds: KernelBounds, budget: Budget, spec: KernelSpec, mode: str, dtype: str, shape: TileShape,
                   threads: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """g (n, D), v (n,) in ``dtype`` and the pairs computed, for query rows (n, D) in spatial order cut into
    blocks of ``shape.rows`` rows: block ``b`` against the sources of its tiles ``selection.kept[b]`` that
    the rest of its budget cannot skip (:func:`~pipeline.pruning.select_sources_of_blocks`, for
    :data:`SOURCE_GROUP` blocks at a time, with ``1 - SUB_SHARE`` of it), each of its sub-blocks against the
    mini-tiles of those it cannot skip with the rest (:func:`sub_block_sources`), computed as items
    (:func:`pipeline.blocks.block_item_sums`; ``counts``: sources per tile, global)."""
    queries = np.asarray(queries)
    n, dim = queries.shape
    g = np.empty((n, dim), dtype=dtype)
    v = np.empty(n, dtype=dtype)
    starts = list(range(0, n, shape.rows))
    sub_rows = sub_block_rows(shape.rows)
    subs = shape.rows // sub_rows
    setups = block_setups(queries, shape.rows, tiles.prepared, spec, mode, dtype)
    computed = np.zeros(len(starts), np.int64)
    value_left = budget.value - selection.spent_value
    slope_left = budget.slope - selection.spent_slope
    scale = np.asarray(spec.lengthscale, np.float64)
    x64 = needs_x64(spec, mode, dtype) or any(s.variant.uses_float64 for s in setups)
    for first in range(0, len(starts), SOURCE_GROUP):
        group = np.arange(first, min(first + SOURCE_GROUP, len(starts)))
        kept_tiles = [np.asarray(selection.kept[b], np.int64) for b in group]
        candidates = tiles.positions(np.concatenate(kept_tiles), counts)
        bounds_of = np.concatenate([[0], np.cumsum([int(counts[t].sum()) for t in kept_tiles])])
        keep = select_sources_of_blocks(selection.lower[group], selection.upper[group], tiles.scaled[candidates],
                                        tiles.abs_weight[candidates], bounds_of, bounds,
                                        value_left[group] * (1.0 - SUB_SHARE), slope_left[group] * (1.0 - SUB_SHARE))
        kept = [candidates[a:z][keep[a:z]] for a, z in zip(bounds_of[:-1], bounds_of[1:])]
        rows_of = [slice(starts[b], min(starts[b] + shape.rows, n)) for b in group]
        per_sub = sub_block_sources([np.asarray(queries[r], np.float64) / scale for r in rows_of], kept,
                                    [tiles.scaled[k] for k in kept], [tiles.abs_weight[k] for k in kept], bounds,
                                    value_left[group] * SUB_SHARE, slope_left[group] * SUB_SHARE, sub_rows)

        def one_block(k: int, first: int = first, rows_of: list = rows_of, per_sub: list = per_sub) -> None:
            b, rows = first + k, rows_of[k]
            computed[b] = sub_block_pairs(per_sub[k], rows.stop - rows.start, sub_rows)
            g[rows], v[rows] = block_item_sums(queries[rows], item_calls(per_sub[k], tiles, shape.cols), tiles.prepared.center,
                                               spec, mode, dtype, sub_rows, subs, setups[b])

        run_blocks(one_block, len(group), x64, threads)
    return g, v, int(computed.sum())


ESTIMATE_BLOCKS = 128  # query blocks sampled (evenly) for the plan's estimate of the pairs left
ESTIMATE_FINE_EVERY = 16  # ... and every 16th of them also through the per-source level
ESTIMATE_DENSE_EARLY = 0.8  # those alone leave more than this share of the pairs: dense, no more sampling


@dataclass(frozen=True)
class Layout:
    """A pruned run's spatial order and pruning data, fixed before any block runs."""

    point_order: np.ndarray  # (N,) int64: input row of each position in the run's order (compact_order)
    source_order: np.ndarray | None  # (M,) or None: the points are the sources (same order)
    index: TileIndex  # source tiles in spatial order
    bounds: KernelBounds
    budget: Budget
    weight_sum: float  # S = sum |w|
    tolerance: float
    estimated_pairs: int  # from a sample of blocks (the run records the exact count)
    meta: PreparedSources = dataclasses.field(repr=False, default=None)  # count, box, may_cancel of all sources
    spatial_order: np.ndarray | None = dataclasses.field(repr=False, default=None)  # the points' spatial_order

    @property
    def error_bounds(self) -> dict:
        return self.bounds.error_bounds(self.tolerance, self.weight_sum)


def make_layout(points: np.ndarray, sources: np.ndarray | None, weights: np.ndarray | None, spec: KernelSpec,
                tolerance: float, bounds: KernelBounds, rows: int, cols: int = INDEX_TILE) -> Layout:
    """Spatial orders, the tile index and an estimate of the pairs a pruned run computes.  ``sources``
    None: the points are the sources.  The run's orders are :func:`~pipeline.spatial.compact_order` (k-d
    leaves) of the points' and sources' :func:`~pipeline.spatial.spatial_order`; the points' spatial order
    is kept too (``spatial_order``: the other methods' order, which they take from here)."""
    points = np.asarray(points)
    morton = spatial_order(points, spec.lengthscale, weights if sources is None else None)
    point_order = compact_order(points, spec.lengthscale, morton)
    source_order = (None if sources is None else
                    compact_order(sources, spec.lengthscale, spatial_order(sources, spec.lengthscale, weights)))
    x = points if sources is None else np.asarray(sources)
    x_order = point_order if source_order is None else source_order
    scale = np.asarray(spec.lengthscale, np.float64)
    w_sorted = None if weights is None else np.asarray(weights, np.float64)[x_order]
    index = tile_index_of(x, x_order, w_sorted, scale, cols)
    weight_sum = float(index.weight.sum())
    budget = Budget.of(bounds, tolerance, weight_sum)
    n = len(points)
    blocks = -(-n // rows)
    sample = np.unique(np.linspace(0, blocks - 1, min(blocks, ESTIMATE_BLOCKS)).astype(np.int64))
    # The blocks that also go through the per-source level come first: if they leave nearly every pair, the
    # run is dense and the rest of the sample is not needed (a run with nothing to prune pays little).
    fine = np.zeros(len(sample), bool)
    fine[::ESTIMATE_FINE_EVERY] = True
    sample = np.concatenate([sample[fine], sample[~fine]])
    tile_pairs, fine_pairs, fine_tile_pairs, sampled_rows = 0, 0, 0, 0
    w_abs = np.ones(len(x)) if w_sorted is None else np.abs(w_sorted)
    n_fine, m = int(fine.sum()), len(x)
    for k, b in enumerate(sample):
        if k == n_fine and fine_pairs > ESTIMATE_DENSE_EARLY * sampled_rows * m:
            break
        q = points[point_order[b * rows:(b + 1) * rows]]
        sampled_rows += len(q)
        chosen = select_tiles(*block_boxes(q, spec, rows), index, bounds, budget)
        tiles = chosen.kept[0]
        candidates = int(index.counts[tiles].sum())
        tile_pairs += len(q) * candidates
        if k >= n_fine:
            continue
        # The per-source and sub-block levels: their share of the tile level's pairs, applied to the whole sample.
        positions = tile_rows(tiles, index.counts, cols)
        scaled = np.asarray(x[x_order[positions]], np.float64) / scale
        value_left, slope_left = budget.value - chosen.spent_value[0], budget.slope - chosen.spent_slope[0]
        keep = select_sources(chosen.lower[0], chosen.upper[0], scaled, w_abs[positions], bounds,
                              value_left * (1.0 - SUB_SHARE), slope_left * (1.0 - SUB_SHARE))
        sub_rows = sub_block_rows(rows)
        per_sub = sub_block_sources([np.asarray(q, np.float64) / scale], [keep], [scaled[keep]],
                                    [w_abs[positions][keep]], bounds, np.array([value_left * SUB_SHARE]),
                                    np.array([slope_left * SUB_SHARE]), sub_rows)[0]
        fine_pairs += sub_block_pairs(per_sub, len(q), sub_rows)
        fine_tile_pairs += len(q) * candidates
    share = fine_pairs / fine_tile_pairs if fine_tile_pairs else 1.0
    estimated = int(round(tile_pairs * share / max(sampled_rows, 1) * n))
    signed = bool(weights is not None and len(weights) and np.min(weights) < 0 < np.max(weights))
    lower, upper = column_bounds(x)
    meta = PreparedSources(None, np.zeros(points.shape[1]), len(x), lower=lower, upper=upper, may_cancel=signed)
    return Layout(point_order, source_order, index, bounds, budget, weight_sum, tolerance, estimated, meta, morton)


def tile_index_of(sources: np.ndarray, order: np.ndarray, weights_sorted: np.ndarray | None, scale: np.ndarray,
                  cols: int) -> TileIndex:
    """The tile index of sources (M, D) in the given order, built a slab at a time (bounded memory)."""
    slab = cols * 4096
    parts = [tile_index(np.asarray(sources[order[s:s + slab]], np.float64) / scale,
                        None if weights_sorted is None else weights_sorted[s:s + slab], cols)
             for s in range(0, len(order), slab)]
    return TileIndex(*(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("lower", "upper", "weight", "counts")))


def compute_in_memory(points: np.ndarray, sources: np.ndarray | None, weights: np.ndarray | None,
                      layout: Layout, spec: KernelSpec, mode: str, dtype: str, shape: TileShape,
                      center: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """The whole pruned computation in this process: g (N, D), v (N,) in input order, and pairs computed."""
    x = points if sources is None else sources
    x_order = layout.point_order if layout.source_order is None else layout.source_order
    tiles = SourceTiles.build(np.arange(layout.index.n_tiles), np.asarray(x)[x_order],
                              None if weights is None else np.asarray(weights)[x_order], spec, dtype, INDEX_TILE,
                              center, layout.meta)
    queries = np.asarray(points)[layout.point_order]
    selection = blocks_to_compute(queries, spec, shape.rows, layout.index, layout.bounds, layout.budget)
    g_sorted, v_sorted, pairs = compute_blocks(queries, selection, tiles, layout.index.counts, layout.bounds,
                                               layout.budget, spec, mode, dtype, shape, threads)
    return in_input_order(g_sorted, layout.point_order), in_input_order(v_sorted, layout.point_order), pairs
