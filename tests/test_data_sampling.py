import math

import numpy as np
import pytest
import torch

from meunet.data.augment import apply_transforms, perturb_probabilities, random_transforms
from meunet.data.normalization import Normalization
from meunet.data.patches import PatchDataset, read_padded, sample_order, scan_image
from meunet.data.sampling import build_index, grid_counts, keep_mask, patch_class_counts
from meunet.errors import InputError


def _labels(shape=(37, 50, 41), seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    labels[rng.random(shape) < 0.2] = 1
    labels[rng.random(shape) < 0.05] = 2
    return labels


def test_grid_covers_the_volume():
    assert grid_counts((37, 16, 17), (16, 16, 16), (8, 8, 8)) == (4, 1, 2)
    assert grid_counts((5, 5, 5), (16, 16, 16), (8, 8, 8)) == (1, 1, 1)


def test_patch_counts_match_brute_force():
    labels = _labels()
    patch, step = (16, 16, 12), (8, 4, 6)
    starts, counts = patch_class_counts(labels, 3, patch, step, "lab.nii")
    padded = np.zeros((48, 60, 48), np.uint8)
    padded[:37, :50, :41] = labels
    expected = [
        [(padded[z : z + 16, y : y + 16, x : x + 12] == c).sum() for c in range(3)] for z, y, x in starts
    ]
    assert np.array_equal(counts, expected)
    assert starts.max(0).tolist() == [24, 36, 30]  # the last patches reach past the end (padded)
    assert (counts.sum(1) == 16 * 16 * 12).all()


def test_slab_reading_does_not_change_counts(monkeypatch):
    labels = _labels()
    _, whole = patch_class_counts(labels, 3, (16, 16, 16), (8, 8, 8), "x")
    monkeypatch.setattr("meunet.data.sampling.SLAB_BYTES", 1)  # one cell row per slab
    _, slabbed = patch_class_counts(labels, 3, (16, 16, 16), (8, 8, 8), "x")
    assert np.array_equal(whole, slabbed)


def test_label_values_beyond_classes_are_refused():
    labels = _labels()
    labels[30, 3, 4] = 5
    with pytest.raises(InputError, match=r"label value 5 outside the 3 classes"):
        patch_class_counts(labels, 3, (16, 16, 16), (8, 8, 8), "lab.nii")
    with pytest.raises(InputError, match="integers"):
        patch_class_counts(labels.astype(np.float32) / 2, 3, (16, 16, 16), (8, 8, 8), "lab.nii")


def test_background_rejection_keeps_foreground_and_a_seeded_share_of_background():
    counts = np.array([[1000, 0]] * 4000 + [[979, 21]] * 100 + [[980, 20]] * 100)
    kept = keep_mask(counts, 0.98, 0.05, np.random.default_rng(1))
    assert kept[4000:4100].all()  # 97.9 % background: below the threshold
    assert abs(kept[:4000].mean() - 0.05) < 0.015
    assert abs(kept[4100:].mean() - 0.05) < 0.1  # exactly 98 % is a candidate
    assert np.array_equal(kept, keep_mask(counts, 0.98, 0.05, np.random.default_rng(1)))


def test_index_over_volumes_sums_kept_counts():
    vols = [_labels(seed=0), np.zeros((32, 32, 32), np.uint8)]
    index = build_index(vols, ["a", "b"], 3, (16, 16, 16), (8, 8, 8), 0.98, 0.0, seed=3)
    assert set(index.volume.tolist()) == {0}  # the empty volume contributes nothing with keep 0
    _, counts = patch_class_counts(vols[0], 3, (16, 16, 16), (8, 8, 8), "a")
    assert np.array_equal(index.class_counts, counts.sum(0))
    with pytest.raises(InputError, match=r"every training patch \(16x16x16\) is at least 98% background"):
        build_index(vols[1:], ["b"], 3, (16, 16, 16), (8, 8, 8), 0.98, 0.0, seed=3)


def test_oversampling_balances_a_rare_class_and_zero_is_a_plain_permutation():
    counts = np.zeros((1000, 3), np.int64)
    counts[:, 0] = 4096
    counts[:300, 1] = 500  # a common class in 30 % of the patches
    counts[990:, 2] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 400]  # a rare one in 1 %, mostly in the last patch
    plain = sample_order(7, 2, counts)
    assert np.array_equal(np.sort(plain), np.arange(1000))
    assert np.array_equal(plain, sample_order(7, 2, counts, 0.0))
    draws = np.concatenate([sample_order(7, epoch, counts, 0.33) for epoch in range(20)])
    assert np.array_equal(draws[:1000], sample_order(7, 0, counts, 0.33))  # a function of (seed, epoch)
    rare = np.isin(draws, np.arange(990, 1000)).mean()
    assert 0.33 / 2 * 0.8 < rare < 0.33 / 2 + 0.01 * 1.2 + 0.02  # half the oversampled draws, plus chance
    assert (draws == 999).sum() > 10 * (draws == 990).sum()  # proportional to the class's voxels
    assert np.array_equal(sample_order(7, 2, counts[:, :1], 0.33), sample_order(7, 2, counts[:, :1]))


def test_read_padded_fills_outside():
    a = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    out = read_padded(a, (-2, 3, 4), (4, 4, 4), fill=7)
    assert out.shape == (4, 4, 4) and out.dtype == np.uint8
    assert (out[:2] == 7).all() and (out[:, 2:] == 7).all() and (out[:, :, 2:] == 7).all()
    assert np.array_equal(out[2:, :2, :2], a[:2, 3:5, 4:6])
    probs = np.zeros((3, 4, 5, 6), np.float16)
    fill = np.array([1, 0, 0], np.float16).reshape(3, 1, 1, 1)
    out = read_padded(probs, (2, 0, 0), (4, 5, 6), fill)
    assert out.shape == (3, 4, 5, 6) and (out[0, 2:] == 1).all() and (out[:, :2] == 0).all()


def test_scan_image_refuses_nan_and_samples():
    image = np.random.default_rng(0).normal(size=(20, 30, 30)).astype(np.float32)
    samples = scan_image(image, "img.tif", max_samples=3000)
    assert 1000 < samples.size <= 3000 * 2 and samples.dtype == np.float32
    image[17, 2, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        scan_image(image, "img.tif")


def test_dataset_cuts_aligned_context_and_is_a_function_of_k():
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 40), dtype=np.uint8)
    labels = _labels((40, 40, 40))
    index = build_index([labels], ["l"], 3, (16, 16, 16), (8, 8, 8), 0.98, 1.0, seed=0)
    norm = Normalization(0, 255, 100, 50)
    ds = PatchDataset([lambda: image], [lambda: labels], index, (16, 16, 16), (24, 24, 24), norm, seed=5)
    k = len(index) + 3  # second epoch
    sample = ds[k]
    assert sample["image"].shape == (1, 16, 16, 16) and sample["context_image"].shape == (1, 24, 24, 24)
    assert sample["label"].dtype == torch.uint8
    assert torch.equal(sample["context_image"][:, 4:20, 4:20, 4:20], sample["image"])
    assert torch.equal(sample["context_label"][4:20, 4:20, 4:20], sample["label"])
    z, y, x = index.start[sample_order(5, 1, index.counts)[3]]
    assert np.array_equal(sample["label"].numpy(), read_padded(labels, (z, y, x), (16, 16, 16)))
    fresh = PatchDataset([lambda: image], [lambda: labels], index, (16, 16, 16), (24, 24, 24), norm, seed=5)
    assert torch.equal(fresh[k]["context_image"], sample["context_image"])
    corner = ds[int(np.flatnonzero(sample_order(5, 0, index.counts) == 0)[0])]  # patch at (0, 0, 0)
    assert (corner["context_image"][0, :4] == norm.apply(np.zeros(1))[0]).all()  # raw 0 outside


def _smooth(shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.cumsum(-1).cumsum(-2).cumsum(-3) / 20


def test_augmentation_transforms_local_and_context_alike():
    n, patch = 8, (24, 32, 20)
    context = _smooth((n, 1, 36, 48, 30))
    m = [(c - p) // 2 for c, p in zip(context.shape[2:], patch, strict=True)]
    crop = (..., slice(m[0], m[0] + 24), slice(m[1], m[1] + 32), slice(m[2], m[2] + 20))
    local = context[crop].clone()
    t = random_transforms(n, 1.0, math.pi / 2, 0.1, True, torch.Generator().manual_seed(0))
    assert t.affine.all() and t.flips.any()
    warped_local = apply_transforms(local, t, "bilinear")
    warped_context = apply_transforms(context, t, "bilinear")
    # where the local patch's samples stay inside it (a ball about the centre), both agree
    axes = [torch.arange(s) + 0.5 - s / 2 for s in patch]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    inner = (zz**2 + yy**2 + xx**2).sqrt() < (min(patch) / 2 - 1) / 1.1
    diff = (warped_local - warped_context[crop])[..., inner].abs().max()
    assert diff < 1e-3 * context.abs().max()
    assert (warped_local - local)[..., inner].abs().max() > 0.1  # it did transform


def test_quarter_turn_and_fill():
    x = torch.zeros(1, 1, 9, 9, 9)
    x[0, 0, 4, 4, :] = 1  # a bar along x
    t = random_transforms(1, 1.0, 0.0, 0.0, False, torch.Generator())
    t.matrices[0] = torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # swap y and x
    out = apply_transforms(x, t, "nearest")
    assert torch.equal(out[0, 0, 4], x[0, 0, 4].T)  # the bar now runs along y
    filled = apply_transforms(torch.zeros(1, 2, 8, 8, 8), _turn45(), "bilinear", torch.tensor([3.0, -1.0]))
    assert filled[0, 0, 0, 0, 0] == 3 and filled[0, 1, 0, 0, 0] == -1 and filled[0, 0, 4, 4, 4] == 0


def _turn45():
    t = random_transforms(1, 1.0, 0.0, 0.0, False, torch.Generator())
    c = math.cos(math.pi / 4)
    t.matrices[0] = torch.tensor([[1.0, 0, 0], [0, c, -c], [0, c, c]])
    return t


def test_transforms_are_seeded_and_probability_respected():
    a = random_transforms(1000, 0.2, 1.0, 0.1, True, torch.Generator().manual_seed(4))
    b = random_transforms(1000, 0.2, 1.0, 0.1, True, torch.Generator().manual_seed(4))
    assert torch.equal(a.matrices, b.matrices) and torch.equal(a.flips, b.flips)
    assert 0.15 < a.affine.float().mean() < 0.25
    assert torch.equal(a.matrices[~a.affine], torch.eye(3).expand(int((~a.affine).sum()), 3, 3))
    scales = torch.linalg.det(a.matrices[a.affine]) ** (1 / 3)
    assert scales.min() >= 0.9 - 1e-5 and scales.max() <= 1.1 + 1e-5


def _cube_probs(n: int = 1) -> torch.Tensor:
    """(n, 3, 20, 20, 20): class 1 certain in a 6^3 cube and in a 2^3 cube, background elsewhere."""
    probs = torch.zeros(n, 3, 20, 20, 20)
    probs[:, 0] = 1
    for box in (np.s_[4:10, 4:10, 4:10], np.s_[14:16, 14:16, 14:16]):
        probs[(slice(None), 0, *box)], probs[(slice(None), 1, *box)] = 0, 1
    return probs


@pytest.mark.parametrize(
    ("operation", "radius", "voxels"),
    [("dilation", 1, 8**3 + 4**3), ("erosion", 1, 4**3), ("opening", 1, 6**3), ("closing", 2, 6**3 + 2**3)],
)
def test_morphology_is_the_binary_operation_with_a_cube(operation, radius, voxels):
    from meunet.data.augment import morphology

    out = morphology(_cube_probs()[:, 1:2], operation, radius)
    assert set(out.unique().tolist()) <= {0.0, 1.0} and out.sum() == voxels


def test_perturbation_keeps_probabilities_and_changes_the_classes():
    probs = _cube_probs(8)
    out = perturb_probabilities(probs, torch.Generator().manual_seed(0), 1.0, 8, 0.0)
    assert torch.allclose(out.sum(1), torch.ones(8, 20, 20, 20), atol=1e-5)
    sizes = out[:, 1].sum((1, 2, 3))
    assert (sizes != probs[:, 1].sum((1, 2, 3))).all() and len(set(sizes.tolist())) > 2
    assert torch.equal(out[:, 2], probs[:, 2])  # an absent class stays absent
    assert torch.equal(perturb_probabilities(probs, torch.Generator(), 0.0, 8, 0.0), probs)
    a = perturb_probabilities(probs, torch.Generator().manual_seed(3), 0.4, 8, 0.2)
    b = perturb_probabilities(probs, torch.Generator().manual_seed(3), 0.4, 8, 0.2)
    assert torch.equal(a, b)


def test_perturbation_removes_one_small_component():
    probs = _cube_probs()
    out = perturb_probabilities(probs, torch.Generator().manual_seed(0), 0.0, 8, 1.0)
    removed = (probs[0, 1] - out[0, 1]).sum().item()
    assert removed in (6**3, 2**3)  # one of the two components (each <= 15 % of the patch)
    assert torch.allclose(out.sum(1), torch.ones(1, 20, 20, 20))
    assert torch.equal(out[0, 0] == 1, out[0, 1] == 0)  # what class 1 lost went to the background


def test_intensity_transforms_map_local_and_context_patches_alike():
    from meunet.data.augment import Intensity, apply_intensity, random_intensity

    context = torch.randn(3, 1, 24, 24, 24)
    local = context[:, :, 4:20, 4:20, 4:20].clone()
    n = len(local)
    t = Intensity(
        scale=torch.tensor([1.2, 1.0, 0.8]),
        shift=torch.tensor([0.1, 0.0, -0.2]),
        contrast=torch.tensor([1.0, 1.25, 0.9]),
        gamma=torch.tensor([1.0, 0.7, 1.4]),
        noise=torch.zeros(n),
        blur=torch.zeros(n),
    )
    new_local, new_context = apply_intensity([local, context], t, torch.Generator())
    assert torch.allclose(new_context[:, :, 4:20, 4:20, 4:20], new_local, atol=1e-5)
    assert torch.allclose(new_local[0], local[0] * 1.2 + 0.1, atol=1e-5)
    assert not torch.allclose(new_local[1], local[1])
    identity = random_intensity(n, 0.0, torch.Generator())
    assert torch.equal(apply_intensity([local], identity, torch.Generator())[0], local)
    noisy = Intensity(*(torch.ones(n),) * 3, torch.ones(n), torch.full((n,), 0.3), torch.full((n,), 1.0))
    out = apply_intensity([local], noisy, torch.Generator().manual_seed(0))[0]
    assert 0.2 < (out - local).std() < 1.5  # blurred and noisy


def test_held_out_regions_are_never_read_by_a_fold():
    from meunet.data.sampling import PatchIndex, fold_regions, without_regions

    rng = np.random.default_rng(0)
    cases = (
        ([(40, 8, 8)], 2),
        ([(40, 8, 8)], 3),
        ([(8, 40, 8)], 2),
        ([(30, 8, 8), (50, 8, 8), (20, 8, 8)], 2),
    )
    cases += (([(30, 8, 8), (50, 8, 8), (20, 8, 8), (10, 8, 8)], 3),)
    for shapes, folds in cases:
        starts = rng.integers(-8, 50, (200, 3)).astype(np.int64)
        index = PatchIndex(rng.integers(0, len(shapes), 200), starts, np.ones((200, 2), np.int64))
        regions = fold_regions(shapes, folds)
        held = sorted((v, a, i) for fold in regions for v, a, lo, hi in fold for i in range(lo, hi))
        axis = [int(np.argmax(s)) if len(shapes) < folds else 0 for s in shapes]
        assert held == [(v, axis[v], i) for v, s in enumerate(shapes) for i in range(s[axis[v]])]  # once each
        for fold in regions:
            kept = without_regions(index, fold, (16, 16, 16), (4, 4, 4))
            assert 0 < len(kept) < len(index)
            for v, start in zip(kept.volume, kept.start, strict=True):
                assert all(v != rv or start[a] + 20 <= lo or start[a] - 4 >= hi for rv, a, lo, hi in fold)
