"""Post-processing of label volumes chosen on validation (nnU-Net's ``determine_postprocessing``).

For each foreground class a rule may (a) keep only the class's largest connected component (all that
share the largest size, so the result does not depend on the order of labelling), or (b) remove
its components smaller than ``min_size`` voxels; removed voxels become background (0). Components are
26-connected. :func:`choose_rules` keeps a rule for a class only where it raises that class's Dice on the
validation volumes; the rules are stored in ``model.json`` under ``postprocessing`` as
``{"<class index>": {"largest_component": true}}`` or ``{"<class index>": {"min_size": N}}`` and applied by
every prediction path.

:func:`postprocess_slabs` applies them in bounded memory to a volume read slab by slab along z, with two
passes: the first labels each slab with connected-components-3d, joins labels that touch across slab
borders (union-find over the border planes) and sums component sizes; the second labels each slab again
(the same labels, deterministically), maps them to their joined components and removes what the rules
remove. Memory: two slabs and one integer per component. The result equals :func:`apply_rules` on the
whole volume in memory.

>>> labels = np.zeros((8, 8, 8), np.uint8)
>>> labels[1:4, 1:4, 1:4] = 1; labels[6, 6, 6] = 1
>>> int((apply_rules(labels, {"1": {"largest_component": True}}) == 1).sum())
27
>>> int((apply_rules(labels, {"1": {"min_size": 2}}) == 1).sum())
27
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import cc3d
import numpy as np

from meunet.io import iter_slabs

Rules = dict[str, dict]
CONNECTIVITY = 26
SLAB_VOXELS = 1 << 22  # voxels per slab of the streamed passes (4 M: 4 MiB of uint8, 32 MiB of int64 ids)


def apply_rules(labels: np.ndarray, rules: Rules) -> np.ndarray:
    """The rules applied to a whole uint8/uint16 (Z, Y, X) label volume in memory (a new array)."""
    out = labels.copy()
    for key, rule in rules.items():
        c = int(key)
        components = cc3d.connected_components(labels == c, connectivity=CONNECTIVITY)
        sizes = cc3d.statistics(components)["voxel_counts"]  # no int64 copy of the volume
        out[(components > 0) & ~_kept(sizes, rule)[components]] = 0
    return out


def _kept(sizes: np.ndarray, rule: dict) -> np.ndarray:
    """bool per component id (0 = not the class, never 'kept'): whether the rule keeps it."""
    keep = np.zeros(len(sizes), dtype=bool)
    if len(sizes) > 1:
        if rule.get("largest_component"):
            keep[1:] = sizes[1:] == sizes[1:].max()  # ties: all of them, whatever the labelling order
        else:
            keep[1:] = sizes[1:] >= rule["min_size"]
    return keep


class _Joined:
    """Union-find over global component ids: ``voxels`` per slab component, ``rank`` for union by size."""

    def __init__(self) -> None:
        self.parent = np.zeros(1, dtype=np.int64)
        self.voxels = np.zeros(1, dtype=np.int64)
        self.rank = np.zeros(1, dtype=np.int64)

    def add(self, sizes: np.ndarray) -> int:
        """Add components with ``sizes`` (ids 1..n of a slab); returns the offset of their global ids."""
        offset = len(self.parent) - 1
        n = len(sizes) - 1
        self.parent = np.concatenate([self.parent, np.arange(offset + 1, offset + n + 1)])
        self.voxels = np.concatenate([self.voxels, sizes[1:]])
        self.rank = np.concatenate([self.rank, sizes[1:]])
        return offset

    def root(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        while True:
            up = self.parent[ids]
            if np.array_equal(up, ids):
                return ids
            self.parent[ids] = self.parent[up]  # path halving
            ids = up

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = int(self.root(np.array([x]))[0]), int(self.root(np.array([y]))[0])
            if rx != ry:
                small, large = (rx, ry) if self.rank[rx] < self.rank[ry] else (ry, rx)
                self.parent[small] = large
                self.rank[large] += self.rank[small]


def _border_pairs(previous: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique (previous, current) global ids of components touching across a z border (26-connected):
    ``previous`` is the last plane of one slab, ``current`` the first of the next, both (Y, X) int64."""
    pairs = []
    height, width = previous.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            a = previous[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)]
            b = current[max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)]
            both = (a > 0) & (b > 0)
            pairs.append(np.stack([a[both], b[both]], 1))
    joined = np.unique(np.concatenate(pairs), axis=0)
    return joined[:, 0], joined[:, 1]


def _slab_depth(shape: Sequence[int]) -> int:
    return max(1, SLAB_VOXELS // (shape[1] * shape[2]))


def _slab_components(slab: np.ndarray, c: int) -> tuple[np.ndarray, int]:
    components, n = cc3d.connected_components(slab == c, connectivity=CONNECTIVITY, return_N=True)
    return components.astype(np.int64, copy=False), n


def joined_components(labels, c: int, depth: int | None = None) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The 26-connected components of class ``c`` in a (Z, Y, X) label array read once, slab by slab.

    Returns:
        (offsets, roots, sizes): per slab the offset of its component ids (slab id + offset = global id);
        per global id its joined component's root id; per root id the component's voxel count (0 for ids
        that are not roots, and for id 0).
    """
    joined, offsets, last = _Joined(), [], None
    for _, slab in iter_slabs(labels, depth or _slab_depth(labels.shape)):
        components, n = _slab_components(np.asarray(slab), c)
        offset = joined.add(np.bincount(components.ravel(), minlength=n + 1))
        offsets.append(offset)
        glob = np.where(components > 0, components + offset, 0)
        if last is not None:
            joined.union(*_border_pairs(last, glob[0]))
        last = glob[-1]
    roots = joined.root(np.arange(len(joined.parent)))
    sizes = np.zeros(len(roots), dtype=np.int64)
    np.add.at(sizes, roots, joined.voxels)
    sizes[0] = 0
    return offsets, roots, sizes


def postprocess_slabs(labels, rules: Rules, depth: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """The rules applied to a (Z, Y, X) label array read slab by slab: yields ``(z0, slab)`` in order.

    Args:
        labels: (Z, Y, X) uint8/uint16 array or lazy array (read twice per class with a rule, slab by slab).
        rules: as stored in ``model.json``'s ``postprocessing``.
        depth: slices per slab (default: about 16 M voxels).
    """
    depth = depth or _slab_depth(labels.shape)
    keep: dict[int, tuple[list[int], np.ndarray]] = {}
    for key, rule in rules.items():
        offsets, roots, sizes = joined_components(labels, int(key), depth)
        keep[int(key)] = (offsets, _kept(sizes, rule)[roots])
    for k, (z0, slab) in enumerate(iter_slabs(labels, depth)):
        out = np.array(slab, copy=True)
        for c, (offsets, kept) in keep.items():
            components, _ = _slab_components(np.asarray(slab), c)  # the labels of pass 1
            glob = np.where(components > 0, components + offsets[k], 0)
            out[(components > 0) & ~kept[glob]] = 0
        yield z0, out


def _pooled_dice(pairs: Sequence[tuple[np.ndarray, np.ndarray]], c: int, rule: dict | None) -> float:
    """Dice of class ``c`` pooled over the (prediction, truth) pairs, after ``rule``."""
    overlap = total = 0
    for prediction, truth in pairs:
        p = prediction if rule is None else apply_rules(prediction, {str(c): rule})
        overlap += 2 * int(((p == c) & (truth == c)).sum())
        total += int((p == c).sum()) + int((truth == c).sum())
    return 1.0 if total == 0 else overlap / total


def choose_rules(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], n_classes: int
) -> tuple[Rules, dict[str, dict[str, float]]]:
    """For each foreground class, the candidate rule that raises its validation Dice most, if any does.

    Candidates: keep the largest component; remove components smaller than a half and than a tenth of the
    smallest component of that class in the truth (a real object is not that small). Dice is pooled over the
    validation volumes.

    Args:
        pairs: per validation volume, its predicted and true (Z, Y, X) labels, in memory.
        n_classes: C.

    Returns:
        ``(rules, dice)``: the rules for :func:`apply_rules`, and per class ``{"before": d0, "after": d1}``.
    """
    rules: Rules = {}
    report: dict[str, dict[str, float]] = {}
    for c in range(1, n_classes):
        truths = [cc3d.connected_components(t == c, connectivity=CONNECTIVITY) for _, t in pairs]
        smallest = min(
            (int(cc3d.statistics(t)["voxel_counts"][1:].min()) for t in truths if t.any()), default=0
        )
        candidates = [{"largest_component": True}]
        candidates += [{"min_size": s} for s in sorted({smallest // 2, smallest // 10}) if s > 1]
        before = _pooled_dice(pairs, c, None)
        scored = [(_pooled_dice(pairs, c, rule), rule) for rule in candidates]
        best, rule = max(scored, key=lambda s: s[0])
        if best > before:
            rules[str(c)] = rule
        report[str(c)] = {"before": before, "after": max(best, before)}
    return rules, report
