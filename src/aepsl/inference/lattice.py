"""The permutohedral lattice (Adams, Baek & Davis 2010) in tensor operations: approximate
Gaussian filtering of values attached to points of a d-dimensional feature space.

A Gaussian of unit standard deviation in feature space is approximated in four steps:

1. `build` embeds each point in the hyperplane of R^(d+1) whose coordinates sum to 0, finds the
   simplex of the lattice (the points of (d+1)Z^(d+1) and their d+1 "remainder" translates) that
   encloses it, and records its d+1 vertices and the barycentric weights. Hashing is a sort: each
   vertex key becomes one int64 code, and the sorted unique codes number the vertices.
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

`operator` turns a lattice into three sparse CSR matrices (splat, one blur per direction, slice)
with optional per-point scales folded in: the same arithmetic, faster than scatter/gather (one
pass per step, see benchmarks/bench_crf.py). Everything is device agnostic (CPU or CUDA).

Grids (the tensors `splat` returns) have one row per vertex plus row 0, the absent vertex, which
stays 0; vertex indices in `offsets` and `neighbours` start at 1.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Lattice:
    """The enclosing simplices of P points in a lattice of M vertices (dimension d).

    offsets: (P, d+1) int64 vertex of each simplex corner, in 1..M.
    weights: (P, d+1) barycentric weights (they sum to 1 per point).
    neighbours: (d+1, 2, M) int64 the two neighbours of vertex 1..M along each lattice direction,
        0 where that neighbour holds no point's mass (is not in the lattice).
    order: (P*(d+1),) int64 the entries p*(d+1) + corner of `offsets`, sorted by vertex (stable):
        the splat's rows, ready for a sparse matrix.
    """

    offsets: Tensor
    weights: Tensor
    neighbours: Tensor
    order: Tensor

    @property
    def dim(self) -> int:
        return self.offsets.shape[1] - 1

    @property
    def points(self) -> int:
        return self.offsets.shape[0]

    @property
    def vertices(self) -> int:
        return self.neighbours.shape[2]

    @property
    def alpha(self) -> float:
        return 1.0 / (1.0 + 2.0 ** (-self.dim))


def _elevate(features: Tensor) -> Tensor:
    """(P, d) features -> (P, d+1) coordinates in the hyperplane sum = 0, scaled so that the
    lattice blur approximates a Gaussian of standard deviation 1 (Adams et al. 2010, p. 5-6)."""
    d = features.shape[1]
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = [inv_std / math.sqrt((i + 2) * (i + 1)) for i in range(d)]
    cf = features * torch.tensor(scale, dtype=features.dtype, device=features.device)
    # suffix[:, m] = cf[:, d-1] + ... + cf[:, d-1-m], summed in the reference's order
    suffix = cf.flip(1).cumsum(1)
    # elevated[0] = sum(cf); elevated[j] = sum(cf[j:]) - j * cf[j-1] for j = 1..d
    later = torch.cat([suffix[:, : d - 1].flip(1), torch.zeros_like(cf[:, :1])], dim=1)
    steps = torch.arange(1, d + 1, dtype=features.dtype, device=features.device)
    return torch.cat([suffix[:, d - 1 :], later - steps * cf], dim=1)


def _enclosing_simplex(elevated: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Remainder-0 vertex (P, d+1) int64, rank of each coordinate (P, d+1) int64 and barycentric
    weights (P, d+1) of elevated points (Adams et al. 2010, p. 10)."""
    points, d1 = elevated.shape
    d = d1 - 1
    down = 1.0 / d1
    rounded = torch.round(elevated * down)  # half to even, as the SSE reference
    rem0 = rounded * d1
    total = rounded.sum(1, keepdim=True).long()
    residual = elevated - rem0
    # rank[i] = #{j > i: r_i < r_j} + #{j < i: r_j >= r_i} (a tie ranks the lower index lower)
    rank = total.expand(points, d1).clone()
    for i in range(d):
        less = (residual[:, i : i + 1] < residual[:, i + 1 :]).long()
        rank[:, i] += less.sum(1)
        rank[:, i + 1 :] += 1 - less
    # bring the point back onto the hyperplane: ranks out of 0..d wrap around
    wrap = (rank < 0).long() - (rank > d).long()
    rank = rank + wrap * d1
    rem0 = rem0 + wrap.to(rem0.dtype) * d1
    value = (elevated - rem0) * down
    bary = torch.zeros(points, d1 + 1, dtype=elevated.dtype, device=elevated.device)
    bary.scatter_add_(1, d - rank, value)
    bary.scatter_add_(1, d - rank + 1, -value)
    bary[:, 0] += 1.0 + bary[:, d1]
    return rem0.long(), rank, bary[:, :d1].contiguous()


def build(features: Tensor, groups: Tensor | None = None) -> Lattice:
    """The lattice of (P, d) float features (already divided by the standard deviations);
    `groups` (P,) int64 >= 0 keeps points of different groups apart (default: one group)."""
    points, d = features.shape
    d1 = d + 1
    device = features.device
    rem0, rank, weights = _enclosing_simplex(_elevate(features))
    # Vertex r of a simplex has the key rem0 + r, minus d+1 where rank > d - r (the first d
    # coordinates; the last is implied by the zero sum). Its code is the mixed-radix number of
    # (group, key - low); a margin of 2(d+1) per coordinate keeps the blur neighbours' codes
    # (every coordinate -1 or +1, one of them +d or -d) from wrapping.
    key0 = rem0[:, :d]
    low = key0.amin(0) - 2 * d1
    spans = (key0.amax(0) - low + 2 * d1 + 1).tolist()
    strides, size = [], 1
    for span in spans:
        strides.append(size)
        size *= span
    groups_n = 1 if groups is None else int(groups.max()) + 1
    if size * groups_n >= 2**62:
        raise ValueError("lattice keys too spread to hash in 64 bits (standard deviations tiny?)")
    stride = torch.tensor(strides, dtype=torch.long, device=device)
    base = ((key0 - low) * stride).sum(1)
    if groups is not None:
        base = base + groups * size
    # above[p, m] = sum of stride_i over the coordinates i < d with rank_i >= m (m = 0..d+1)
    above = torch.zeros(points, d1 + 1, dtype=torch.long, device=device)
    above.scatter_add_(1, rank[:, :d], stride.expand(points, d))
    above = above.flip(1).cumsum(1).flip(1)
    remainder = torch.arange(d1, device=device)
    codes = base[:, None] + remainder * sum(strides) - d1 * above[:, d - remainder + 1]
    # hashing: sort the codes; a vertex is a run of equal codes, numbered from 1
    ordered, order = torch.sort(codes.view(-1), stable=True)
    new = torch.ones_like(ordered, dtype=torch.bool)
    torch.ne(ordered[1:], ordered[:-1], out=new[1:])
    offsets = torch.empty_like(order)
    offsets[order] = new.cumsum(0)
    unique = ordered[new]
    # neighbours along direction j < d: every coordinate -1 and coordinate j +d (n1), or the
    # opposite (n2); along direction d: every coordinate -1 (the implied last one +d), or +1.
    # Only n1 is looked up: n2 is its inverse (n1(v) = u <=> n2(u) = v).
    step = -sum(strides)
    deltas = torch.tensor([step + d1 * s for s in strides] + [step], device=device)
    targets = unique + deltas[:, None]  # (d+1, M), rows sorted
    found = torch.searchsorted(unique, targets).clamp_(max=unique.numel() - 1)
    n1 = torch.where(unique[found] == targets, found + 1, 0)
    vertices = unique.numel()
    n2 = torch.zeros(d1, vertices + 1, dtype=torch.long, device=device)
    n2.scatter_(1, n1, torch.arange(1, vertices + 1, device=device).expand(d1, vertices))
    neighbours = torch.stack([n1, n2[:, 1:]], 1)
    return Lattice(offsets.view(points, d1), weights, neighbours, order)


def concat(lattices: list[Lattice]) -> Lattice:
    """One lattice of the points of `lattices` in order, each keeping its own vertices."""
    if len(lattices) == 1:
        return lattices[0]
    offsets, neighbours, order, vertex_shift, entry_shift = [], [], [], 0, 0
    for lattice in lattices:
        offsets.append(lattice.offsets + vertex_shift)
        neighbours.append(torch.where(lattice.neighbours > 0, lattice.neighbours + vertex_shift, 0))
        order.append(lattice.order + entry_shift)
        vertex_shift += lattice.vertices
        entry_shift += lattice.order.numel()
    weights = torch.cat([lattice.weights for lattice in lattices])
    return Lattice(torch.cat(offsets), weights, torch.cat(neighbours, dim=2), torch.cat(order))


def splat(lattice: Lattice, values: Tensor) -> Tensor:
    """(P, C) values -> (M+1, C) grid: each vertex sums the values of the points around it,
    weighted by their barycentric weights; row 0 is 0."""
    grid = values.new_zeros(lattice.vertices + 1, values.shape[1])
    for r in range(lattice.dim + 1):
        grid.index_add_(0, lattice.offsets[:, r], values * lattice.weights[:, r : r + 1])
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
    out = grid.index_select(0, lattice.offsets[:, 0]) * lattice.weights[:, :1]
    for r in range(1, lattice.dim + 1):
        out += grid.index_select(0, lattice.offsets[:, r]) * lattice.weights[:, r : r + 1]
    return out * lattice.alpha


def filter(lattice: Lattice, values: Tensor) -> Tensor:
    """Approximate Gaussian filter of (P, C) values: slice(blur(splat(values)))."""
    return slice(lattice, blur(lattice, splat(lattice, values)))


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
    """A lattice filter as sparse matrices: out = slice @ blur[-1] @ ... @ blur[0] @ splat @ x,
    for (P, C) values x. Grids have M rows here (no absent-vertex row: absent neighbours are
    left out of the blur matrices)."""

    splat: Tensor  # (M, P) CSR
    blur: tuple[Tensor, ...]  # (M, M) CSR per direction, identity padding where d+1 < len
    slice: Tensor  # (P, M) CSR

    def __call__(self, values: Tensor, add: Tensor | None = None) -> Tensor:
        """slice(blur(splat(values))), plus `add` (P, C) if given (one pass fewer)."""
        grid = self.splat @ values
        for step in self.blur:
            grid = step @ grid
        if add is None:
            return self.slice @ grid
        return torch.addmm(add, self.slice, grid)


def operator(
    lattices: list[Lattice],
    pre: list[Tensor | None] | None = None,
    post: list[Tensor | None] | None = None,
) -> Operator:
    """The sum of the filters of `lattices` (each over the same P points) as one `Operator`:
    sum_k post_k * filter_k(pre_k * x), with pre_k, post_k (P,) per-point scales or None. One
    splat and one slice matrix hold all the lattices' vertices, one after the other."""
    pre = pre or [None] * len(lattices)
    post = post or [None] * len(lattices)
    points = lattices[0].points
    device = lattices[0].offsets.device
    total = sum(lattice.vertices for lattice in lattices)
    rounds = max(lattice.dim + 1 for lattice in lattices)
    slice_cols, slice_values, splat_rows, splat_cols, splat_values = [], [], [], [], []
    blur_cols: list[list[Tensor]] = [[] for _ in range(rounds)]
    blur_values: list[list[Tensor]] = [[] for _ in range(rounds)]
    half = torch.tensor([1.0, 0.5, 0.5], device=device)
    shift = 0
    for lattice, before, after in zip(lattices, pre, post, strict=True):
        d1 = lattice.dim + 1
        # slice (P, M): row p holds the d+1 corners of p in each lattice
        slice_cols.append(lattice.offsets - 1 + shift)
        weight = lattice.weights * lattice.alpha
        slice_values.append(weight if after is None else weight * after[:, None])
        # splat (M, P): the transpose, its entries in vertex order
        weight = lattice.weights if before is None else lattice.weights * before[:, None]
        splat_cols.append(lattice.order // d1)
        splat_values.append(weight.reshape(-1)[lattice.order])
        splat_rows.append(torch.bincount(lattice.offsets.view(-1) - 1, minlength=lattice.vertices))
        # blur (M, M): 1 on the diagonal, 1/2 at each neighbour present (absent: 0 at column 0)
        vertex = torch.arange(lattice.vertices, device=device)
        for j in range(rounds):
            if j < d1:  # an absent neighbour becomes a 0 on the diagonal
                n1, n2 = lattice.neighbours[j]
                cols = (
                    torch.stack(
                        [
                            vertex,
                            torch.where(n1 > 0, n1 - 1, vertex),
                            torch.where(n2 > 0, n2 - 1, vertex),
                        ],
                        1,
                    )
                    + shift
                )
                values = torch.stack([n1 >= 0, n1 > 0, n2 > 0], 1) * half
            else:  # blurred along all its directions already: identity
                cols = (vertex + shift)[:, None].expand(-1, 3)
                values = torch.tensor([1.0, 0.0, 0.0], device=device).expand(lattice.vertices, 3)
            blur_cols[j].append(cols)
            blur_values[j].append(values)
        shift += lattice.vertices
    cols_t, values_t = torch.cat(slice_cols, 1), torch.cat(slice_values, 1)
    dtype = values_t.dtype
    crow = torch.arange(points + 1, device=device) * cols_t.shape[1]
    slice_m = _csr(crow, cols_t.reshape(-1), values_t.reshape(-1), (points, total))
    counts = torch.cat(splat_rows)
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    splat_m = _csr(crow, torch.cat(splat_cols), torch.cat(splat_values), (total, points))
    crow = torch.arange(total + 1, device=device) * 3
    blur_m = tuple(
        _csr(crow, torch.cat(c).reshape(-1), torch.cat(v).reshape(-1).to(dtype), (total, total))
        for c, v in zip(blur_cols, blur_values, strict=True)
    )
    return Operator(splat_m, blur_m, slice_m)
