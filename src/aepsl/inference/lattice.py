"""The permutohedral lattice (Adams, Baek & Davis 2010) in tensor operations: approximate
Gaussian filtering of values attached to points of a d-dimensional feature space.

A Gaussian of unit standard deviation in feature space is approximated in four steps:

1. `build` embeds each point in the hyperplane of R^(d+1) whose coordinates sum to 0, finds the
   simplex of the lattice (the points of (d+1)Z^(d+1) and their d+1 "remainder" translates) that
   encloses it, and records its d+1 corners and barycentric weights. Hashing is a sort: each
   corner key becomes one integer code, and the sorted distinct codes number the vertices.
2. `splat`: every point adds its value times its barycentric weights to its d+1 vertices
   (scatter-add, `index_add_`).
3. `blur`: along each of the d+1 lattice directions in turn, v <- v + (v[n1] + v[n2]) / 2, with
   n1, n2 the two neighbours of a vertex in that direction (found by looking their codes up among
   the sorted ones; an absent neighbour contributes 0).
4. `slice`: every point reads the barycentric interpolation of its vertices (gather), times the
   constant alpha = 1 / (1 + 2^-d).

The embedding, rounding, ranking, blur kernel [1/2, 1, 1/2] and alpha follow the conventions of
Krähenbühl & Koltun's dense CRF code, so `filter` = slice(blur(splat(v))) is the filter their
mean field uses. Points carry a group id (an image of a batch): points of different groups never
share a vertex, so one lattice filters a batch without mixing images; `concat` joins lattices.

`operator` writes lattices as sparse CSR matrices (splat, one blur per direction, slice) with
per-point scales folded in: the same arithmetic in one pass per step, several times faster than
the scatter/gather steps on a CPU (benchmarks/bench_crf.py). Everything is device agnostic.

Per-corner tensors are laid out (d+1, P): row r holds corner r of every point. Grids (what
`splat` returns) have one row per vertex plus row 0, the absent vertex, which stays 0: vertex
indices in `offsets` and `neighbours` start at 1.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Lattice:
    """The enclosing simplices of P points in a lattice of M vertices (dimension d).

    offsets: (d+1, P) int64 vertex of each point's corner r, in 1..M.
    weights: (d+1, P) barycentric weights (they sum to 1 over the corners of a point).
    neighbours: (d+1, 2, M) int64 the two neighbours of vertex 1..M along each lattice direction,
        0 where that neighbour holds no point's mass (is not in the lattice).
    order: (P*(d+1),) int64 the entries r*P + p of `offsets`, sorted by vertex (the rows of the
        splat as a sparse matrix).
    """

    offsets: Tensor
    weights: Tensor
    neighbours: Tensor
    order: Tensor

    @property
    def dim(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def points(self) -> int:
        return self.offsets.shape[1]

    @property
    def vertices(self) -> int:
        return self.neighbours.shape[2]

    @property
    def alpha(self) -> float:
        return 1.0 / (1.0 + 2.0 ** (-self.dim))


def _elevate(features: Tensor) -> Tensor:
    """(P, d) features -> (d+1, P) coordinates in the hyperplane sum = 0, scaled so that the
    lattice blur approximates a Gaussian of standard deviation 1 (Adams et al. 2010, p. 5-6)."""
    d = features.shape[1]
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = [inv_std / math.sqrt((i + 2) * (i + 1)) for i in range(d)]
    scale_t = torch.tensor(scale, dtype=features.dtype, device=features.device)
    cf = (features * scale_t).t().contiguous()
    elevated = torch.empty(d + 1, features.shape[0], dtype=features.dtype, device=features.device)
    # elevated[j] = sum(cf[j:]) - j * cf[j-1] for j = 1..d; elevated[0] = sum(cf); summed from
    # the last feature down, as the reference
    total = torch.zeros_like(elevated[0])
    for j in range(d, 0, -1):
        torch.add(total, cf[j - 1], alpha=-j, out=elevated[j])
        total += cf[j - 1]
    elevated[0] = total
    return elevated


def _enclosing_simplex(elevated: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For (d+1, P) elevated points: the remainder-0 corner divided by d+1 (d+1, P) int64, the
    rank of each coordinate (d+1, P) int64 and the barycentric weights (d+1, P)
    (Adams et al. 2010, p. 10)."""
    d1, points = elevated.shape
    d = d1 - 1
    down = 1.0 / d1
    rounded = torch.round(elevated * down)  # half to even, as the SSE reference
    residual = elevated - rounded * d1
    # rank[i] = #{j > i: r_i < r_j} + #{j < i: r_j >= r_i} (a tie ranks the lower index lower),
    # plus the sum of the rounded point, which wraps around to bring it back on the hyperplane
    total = rounded.sum(0).to(torch.int32)
    ranks = [total.clone() for _ in range(d1)]
    for i in range(d):
        for j in range(i + 1, d1):
            less = residual[i] < residual[j]
            ranks[i] += less
            ranks[j] += ~less
    rank = torch.stack(ranks)
    wrap = (rank < 0).to(torch.int32) - (rank > d).to(torch.int32)
    rank += wrap * d1
    quotient = rounded.to(torch.int32) + wrap  # the remainder-0 corner is d1 * quotient
    value = (elevated - quotient * d1) * down
    # barycentric weights: b[d - rank_i] += v_i, b[d - rank_i + 1] -= v_i, b[0] += 1 + b[d+1]
    sorted_value = torch.zeros(d1 + 1, points, dtype=elevated.dtype, device=elevated.device)
    sorted_value[1:].scatter_(0, (d - rank).long(), value)  # u_k = v of rank d - k, at k + 1
    weights = sorted_value[1:] - sorted_value[:-1]
    weights[0] += 1.0 - sorted_value[d1]
    return quotient.long(), rank.long(), weights


def _radix(low: Tensor, high: Tensor) -> tuple[list[int], int]:
    """Strides of a mixed-radix number of digits in [low, high] each, and its range."""
    strides, size = [], 1
    for span in (high - low + 1).tolist():
        strides.append(size)
        size *= span
    return strides, size


def build(features: Tensor, groups: Tensor | None = None) -> Lattice:
    """The lattice of (P, d) float features (already divided by the standard deviations);
    `groups` (P,) int64 >= 0 keeps points of different groups apart (default: one group)."""
    points, d = features.shape
    d1 = d + 1
    device = features.device
    quotient, rank, weights = _enclosing_simplex(_elevate(features))
    # Corner r of a simplex is the lattice point k = d1 * q + r with q = quotient - 1 where
    # rank > d - r (first d coordinates; the last is implied by the zero sum). Its code is the
    # mixed-radix number (group, q_0 .. q_d-1, r); a margin of 2 around the range of q keeps the
    # codes of the blur neighbours (q -1 or +1) from wrapping.
    q0 = quotient[:d]
    low = q0.amin(1) - 2
    strides, size = _radix(low, q0.amax(1) + 2)
    groups_n = 1 if groups is None else int(groups.max()) + 1
    span = d1 * size * groups_n
    if span >= 2**62:
        raise ValueError("lattice keys too spread to hash in 64 bits (standard deviations tiny?)")
    dtype = torch.int32 if span < 2**31 else torch.long  # int32 sorts twice as fast
    stride = torch.tensor(strides, dtype=torch.long, device=device)
    base = ((q0 - low[:, None]) * stride[:, None]).sum(0)
    if groups is not None:
        base += groups * size
    # code of corner r = d1 * (base - sum of stride_i over i < d with rank_i > d - r) + r
    at_rank = torch.zeros(d1, points, dtype=torch.long, device=device)
    at_rank.scatter_add_(0, rank[:d], stride[:, None].expand(d, points))
    codes = torch.empty(d1, points, dtype=dtype, device=device)
    codes[0] = base * d1
    for r in range(1, d1):
        base -= at_rank[d + 1 - r]
        codes[r] = base * d1 + r
    # hashing: sort the codes; a vertex is a run of equal codes, numbered from 1
    ordered, order = torch.sort(codes.view(-1), stable=True)
    new = torch.ones_like(ordered, dtype=torch.bool)
    torch.ne(ordered[1:], ordered[:-1], out=new[1:])
    offsets = torch.empty_like(order)
    offsets.scatter_(0, order, new.cumsum(0))
    unique = ordered[new]
    vertices = unique.numel()
    # n1 along direction j < d: every coordinate of k -1 and coordinate j +d; along direction d:
    # every coordinate -1 (the implied last one +d). In codes: r >= 1 -> r - 1 (q_j + 1);
    # r = 0 -> r = d with every q_i - 1 but q_j. n2 is the inverse map: n1(v) = u <=> n2(u) = v.
    first = (unique % d1 == 0).to(dtype)
    shift = -1 + first * (d1 - d1 * sum(strides))
    deltas = torch.tensor([d1 * s for s in strides] + [0], dtype=dtype, device=device)
    targets = unique + shift + deltas[:, None]  # (d+1, M)
    found = torch.searchsorted(unique, targets).clamp_(max=vertices - 1)
    n1 = torch.where(unique[found] == targets, found + 1, 0)
    n2 = torch.zeros(d1, vertices + 1, dtype=torch.long, device=device)
    n2.scatter_(1, n1, torch.arange(1, vertices + 1, device=device).expand(d1, vertices))
    neighbours = torch.stack([n1, n2[:, 1:]], 1)
    return Lattice(offsets.view(d1, points), weights, neighbours, order)


def concat(lattices: list[Lattice]) -> Lattice:
    """One lattice of the points of `lattices` in order, each keeping its own vertices."""
    if len(lattices) == 1:
        return lattices[0]
    offsets, neighbours, order, vertex_shift, point_shift = [], [], [], 0, 0
    total = sum(lattice.points for lattice in lattices)
    for lattice in lattices:
        offsets.append(lattice.offsets + vertex_shift)
        neighbours.append(torch.where(lattice.neighbours > 0, lattice.neighbours + vertex_shift, 0))
        # entry r * P + p of this lattice is entry r * total + point_shift + p of the whole
        corner = lattice.order.div(lattice.points, rounding_mode="floor")
        point = lattice.order - corner * lattice.points
        order.append(corner * total + point_shift + point)
        vertex_shift += lattice.vertices
        point_shift += lattice.points
    return Lattice(
        torch.cat(offsets, 1),
        torch.cat([lattice.weights for lattice in lattices], 1),
        torch.cat(neighbours, 2),
        torch.cat(order),
    )


def splat(lattice: Lattice, values: Tensor) -> Tensor:
    """(P, C) values -> (M+1, C) grid: each vertex sums the values of the points around it,
    weighted by their barycentric weights; row 0 is 0."""
    grid = values.new_zeros(lattice.vertices + 1, values.shape[1])
    for offsets, weights in zip(lattice.offsets, lattice.weights, strict=True):
        grid.index_add_(0, offsets, values * weights[:, None])
    return grid


def blur(lattice: Lattice, grid: Tensor) -> Tensor:
    """Blur a (M+1, C) grid with [1/2, 1, 1/2] along each lattice direction in turn."""
    for n1, n2 in lattice.neighbours:
        moved = grid.index_select(0, n1) + grid.index_select(0, n2)
        grid = torch.cat([grid[:1], grid[1:] + 0.5 * moved])
    return grid


def slice(lattice: Lattice, grid: Tensor) -> Tensor:
    """(M+1, C) grid -> (P, C): each point's barycentric interpolation of its vertices, times
    alpha."""
    out = grid.new_zeros(lattice.points, grid.shape[1])
    for offsets, weights in zip(lattice.offsets, lattice.weights, strict=True):
        out += grid.index_select(0, offsets) * weights[:, None]
    return out * lattice.alpha


def filter(lattice: Lattice, values: Tensor) -> Tensor:
    """Approximate Gaussian filter of (P, C) values: slice(blur(splat(values)))."""
    return slice(lattice, blur(lattice, splat(lattice, values)))


def filter_ones(lattice: Lattice) -> Tensor:
    """(P,) `filter` of a constant 1 (the kernel's row sums), in 1-D operations."""
    offsets, weights = lattice.offsets.reshape(-1), lattice.weights.reshape(-1)
    grid = weights.new_zeros(lattice.vertices + 1).index_add_(0, offsets, weights)
    for n1, n2 in lattice.neighbours:
        grid = torch.cat([grid[:1], grid[1:] + 0.5 * (grid[n1] + grid[n2])])
    return (grid[lattice.offsets] * lattice.weights).sum(0) * lattice.alpha


def _csr(crow: Tensor, col: Tensor, value: Tensor, shape: tuple[int, int]) -> Tensor:
    """A sparse CSR matrix, with int32 indices where they fit (MKL and cuSPARSE take them
    without a conversion at every product)."""
    index = torch.int32 if max(shape) < 2**31 and col.numel() < 2**31 else torch.long
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            crow.to(index), col.to(index), value, size=shape, check_invariants=False
        )


@dataclass(frozen=True)
class Operator:
    """Lattice filters as sparse matrices: x -> slice @ blur(splat @ x), for (P, C) values x.
    The grid holds the vertices of each lattice in turn (no absent-vertex row: an absent
    neighbour is a 0 in a blur matrix); `blocks` are the grid rows of each lattice with its blur
    matrices, one per direction. Products write into buffers kept between calls (`addmm` with
    out= skips the zero-fill and copy of a fresh result: a third less time per product)."""

    splat: Tensor  # (M, P) CSR
    blocks: tuple[tuple[int, int, tuple[Tensor, ...]], ...]
    slice: Tensor  # (P, M) CSR
    buffers: dict = field(default_factory=dict, compare=False, repr=False)

    def _buffers(self, values: Tensor) -> tuple[Tensor, Tensor]:
        key = (values.shape[1], values.dtype)
        if key not in self.buffers:
            largest = max(stop - start for start, stop, _ in self.blocks)
            self.buffers[key] = (
                values.new_zeros(self.splat.shape[0], values.shape[1]),
                values.new_zeros(2, largest, values.shape[1]),
            )
        return self.buffers[key]

    def __call__(
        self, values: Tensor, add: Tensor | None = None, out: Tensor | None = None
    ) -> Tensor:
        """The sum of the filters of `values`, plus `add` (P, C) if given, into `out` if given
        (which may be `values` itself, not `add`)."""
        grid, spare = self._buffers(values)
        torch.addmm(grid, self.splat, values, beta=0, out=grid)
        for start, stop, steps in self.blocks:
            part = grid[start:stop]
            for i, step in enumerate(steps):
                target = grid[start:stop] if i == len(steps) - 1 else spare[i % 2, : stop - start]
                torch.addmm(target, step, part, beta=0, out=target)
                part = target
        if out is None:
            out = torch.empty_like(values)
        torch.addmm(out, self.slice, grid, beta=0, out=out)
        return out if add is None else out.add_(add)  # faster than addmm's beta=1


def operator(
    lattices: list[Lattice],
    pre: list[Tensor | None] | None = None,
    post: list[Tensor | None] | None = None,
) -> Operator:
    """The sum of the filters of `lattices` (each over the same P points) as one `Operator`:
    sum_k post_k * filter_k(pre_k * x), with pre_k, post_k (P,) per-point scales or None."""
    pre = pre or [None] * len(lattices)
    post = post or [None] * len(lattices)
    points = lattices[0].points
    device = lattices[0].offsets.device
    dtype = lattices[0].weights.dtype
    half = torch.tensor([1.0, 0.5, 0.5], dtype=lattices[0].weights.dtype, device=device)
    corners = sum(lattice.dim + 1 for lattice in lattices)
    total = sum(lattice.vertices for lattice in lattices)
    index = torch.int32 if max(total, points * corners) < 2**31 else torch.long
    slice_cols = torch.empty(points, corners, dtype=index, device=device)
    slice_values = torch.empty(points, corners, dtype=dtype, device=device)
    splat_cols = torch.empty(points * corners, dtype=index, device=device)
    splat_values = torch.empty(points * corners, dtype=dtype, device=device)
    splat_rows, blocks = [], []
    shift = column = 0
    for lattice, before, after in zip(lattices, pre, post, strict=True):
        d1 = lattice.dim + 1
        first, last = column * points, (column + d1) * points
        # slice (P, M): row p holds the corners of p in each lattice
        slice_cols[:, column : column + d1] = (lattice.offsets + (shift - 1)).t()
        weights = lattice.weights * lattice.alpha
        slice_values[:, column : column + d1] = (weights if after is None else weights * after).t()
        # splat (M, P): the transpose, entries in vertex order
        weights = lattice.weights if before is None else lattice.weights * before
        torch.remainder(lattice.order.to(index), points, out=splat_cols[first:last])
        torch.index_select(weights.view(-1), 0, lattice.order, out=splat_values[first:last])
        splat_rows.append(torch.bincount(lattice.offsets.view(-1) - 1, minlength=lattice.vertices))
        # blur (M, M) per direction: 1 on the diagonal, 1/2 at each neighbour present (an
        # absent one is a 0 on the diagonal)
        vertex = torch.arange(lattice.vertices, dtype=index, device=device)
        crow = torch.arange(lattice.vertices + 1, dtype=index, device=device) * 3
        shape = (lattice.vertices, lattice.vertices)
        steps = []
        for n1, n2 in lattice.neighbours.to(index):
            cols = torch.stack(
                [vertex, torch.where(n1 > 0, n1 - 1, vertex), torch.where(n2 > 0, n2 - 1, vertex)],
                1,
            )
            values = torch.stack([torch.ones_like(n1), n1 > 0, n2 > 0], 1).to(dtype)
            steps.append(_csr(crow, cols.view(-1), values.mul_(half).view(-1), shape))
        blocks.append((shift, shift + lattice.vertices, tuple(steps)))
        shift += lattice.vertices
        column += d1
    crow = torch.arange(points + 1, dtype=index, device=device) * corners
    slice_m = _csr(crow, slice_cols.view(-1), slice_values.view(-1), (points, total))
    counts = torch.cat(splat_rows)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    splat_m = _csr(crow, splat_cols, splat_values, (total, points))
    return Operator(splat_m, tuple(blocks), slice_m)
