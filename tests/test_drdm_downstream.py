"""The downstream DRDM benchmarks at toy size: few-shot split, augmentation arms, matched random fields, training.

Synthetic data only (tiny untrained recovery networks: their fields are the random start fields); the shared CT is
used only by the loader test, which skips when it is absent.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmarks.drdm_fewshot as fewshot
import benchmarks.drdm_registration as registration
from benchmarks.drdm_fewshot import (
    ARMS,
    evaluate,
    fewshot_split,
    make_arm,
    map_labels,
    paired_differences,
    top_labels,
    train_segmenter,
)
from benchmarks.drdm_model import bank_statistics, make_sampler, recovery_effect
from benchmarks.drdm_registration import (
    drdm_pairs,
    evaluate_registration,
    random_pairs,
    random_smooth_field,
    real_pairs,
    train_registration,
)
from drdm.diffusion import DeformationDiffusion
from drdm.fields import compose
from drdm.networks import RecoveryNet
from drdm.sampler import warp_intensities

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = {
    **fewshot.QUICK,
    "steps": 2,
    "batch": 2,
    "channels": [4, 8],
    "t_prime": [40],
    "bank_size": 2,
    "recovery_stride": 4,
    "translate_px": 2,
    "elastic_spacing": 8,
}
N_TOY = 3


def _toy_volume(slices: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[Z, 1, S, S]`` (a bright disc per label on a ramp) and labels 0..3 (float)."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images, labels = [], []
    for z in range(slices):
        lab = torch.zeros(size, size)
        for value, (cy, cx) in enumerate(((10, 10), (10, 22), (22, 16)), start=1):
            lab[(yy - cy - z * 0.5) ** 2 + (xx - cx) ** 2 < 25] = value
        images.append((0.2 + 0.2 * lab + 0.05 * xx / size)[None])
        labels.append(lab[None])
    return torch.stack(images), torch.stack(labels)


def _sampler() -> object:
    torch.manual_seed(0)
    network = RecoveryNet(2, 1, channels=(4, 8), embed_dim=8, recursions=1).eval()
    return make_sampler(network, DeformationDiffusion(control_size=8), TOY)


# ---------------------------------------------------------------------------------------------------- split
def test_fewshot_split_hand_checked_cases():
    seen = set()
    for seed in range(60):
        train, test = fewshot_split(7, 1, 3, seed)
        seen.add(train[0])
        expected = {0: [3, 4, 5, 6], 1: [4, 5, 6], 2: [5, 6], 3: [0, 6], 4: [0, 1], 5: [0, 1, 2], 6: [0, 1, 2, 3]}
        assert test == expected[train[0]]
    assert seen == set(range(7))  # every case above was met
    cases = {(2, 7): [0, 4, 5, 9], (0, 9): [2, 3, 4, 5, 6, 7], (4, 5): [0, 1, 2, 7, 8, 9]}  # 10 slices, k 2, gap 2
    found = set()
    for seed in range(2000):
        train, test = fewshot_split(10, 2, 2, seed)
        if tuple(train) in cases:
            assert test == cases[tuple(train)]
            found.add(tuple(train))
        if found == set(cases):
            break
    assert found == set(cases)


@pytest.mark.parametrize(("n", "k", "gap"), [(30, 1, 3), (30, 3, 3), (30, 5, 3), (12, 2, 1)])
def test_fewshot_split_never_tests_training_slices_or_neighbours(n, k, gap):
    for seed in range(25):
        train, test = fewshot_split(n, k, gap, seed)
        assert len(train) == k == len(set(train)) and test
        assert all(abs(z - t) >= gap for z in test for t in train)  # nothing within the gap
        assert set(test) == {z for z in range(n) if min(abs(z - t) for t in train) >= gap}  # and all the rest
        assert fewshot_split(n, k, gap, seed) == (train, test)  # the seed reproduces the split


def test_fewshot_split_rejects_bad_settings():
    with pytest.raises(ValueError, match="no test slice"):
        fewshot_split(3, 1, 3, 0)  # every slice is within 2 of the training slice
    with pytest.raises(ValueError, match="k must be"):
        fewshot_split(5, 6, 1, 0)
    with pytest.raises(ValueError, match="gap must be"):
        fewshot_split(5, 1, 0, 0)


def test_top_labels_and_mapping():
    seg = np.array([0, 0, 0, 5, 5, 5, 2, 2, 9, 7, 7])
    assert top_labels(seg, 2) == [5, 2]  # ties (2 and 7) broken by the smaller value
    assert map_labels(seg, [5, 2]).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------- arms
@pytest.mark.parametrize("arm_name", ARMS)
def test_each_arm_keeps_shapes_and_labels_and_reproduces(arm_name):
    images, labels = _toy_volume(1)
    item = {"image": images[0], "label": labels[0]}
    sampler = _sampler()
    arm = make_arm(arm_name, sampler, TOY)
    if arm_name == "none":
        assert arm is None
        return
    outputs = []
    for _ in range(2):  # a fresh arm with the same seed gives the same outputs
        arm = make_arm(arm_name, sampler, TOY).set_random_state(3)
        outputs.append([arm(dict(item)) for _ in range(4)])
    changed = False
    for out, again in zip(*outputs):
        image, label = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
        assert image.shape == (1, 32, 32) and label.shape == (1, 32, 32)
        assert set(label.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}  # no new label value
        assert torch.equal(image, torch.as_tensor(again["image"]))
        assert torch.equal(label, torch.as_tensor(again["label"]))
        changed |= not torch.equal(image, images[0])
    assert changed  # the arm deforms


def test_arm_rejects_unknown_names():
    with pytest.raises(ValueError, match="arm must be one of"):
        make_arm("cutmix", None, TOY)
    with pytest.raises(ValueError, match="needs a DRDM sampler"):
        make_arm("drdm", None, TOY)


def test_segmenter_runs_every_arm_and_reproduces():
    images, labels = _toy_volume(6)
    sampler = _sampler()
    for arm_name in ARMS:
        dice = []
        for _ in range(2):
            arm = make_arm(arm_name, sampler, TOY)
            net, seconds = train_segmenter(images, labels, [0, 1], arm, TOY, seed=5, n_labels=N_TOY)
            dice.append(evaluate(net, images, labels, [4, 5], n_labels=N_TOY))
            assert seconds >= 0.0 and (seconds > 0.0) == (arm is not None)
        assert dice[0].shape == (N_TOY,) and np.all((dice[0] >= 0) & (dice[0] <= 1))
        np.testing.assert_array_equal(dice[0], dice[1])


def test_paired_differences_hand_checked():
    per_seed = {"none": [0.1, 0.2], "monai": [0.5, 0.7], "drdm": [0.6, 0.6], "both": [0.5, 0.9]}
    diffs = paired_differences(per_seed)
    assert set(diffs) == {"drdm", "both"}  # neither the reference nor the unaugmented arm
    np.testing.assert_allclose(diffs["drdm"], [0.1, -0.1])
    np.testing.assert_allclose(diffs["both"], [0.0, 0.2])


def test_bank_statistics_per_level_and_recovery_effect():
    images, labels = _toy_volume(1)
    sampler = _sampler()
    settings = {**TOY, "t_prime": [8, 40], "bank_size": 2}
    arm = make_arm("drdm", sampler, settings)
    assert bank_statistics(arm) == {}  # no bank before the first call
    arm.set_random_state(0)
    arm({"image": images[0], "label": labels[0]})
    stats = bank_statistics(arm)
    assert sorted(stats) == [8, 40] and all(len(v) == 2 for v in stats.values())
    mean = {t: np.mean([s["mean_displacement_pct"] for s in v]) for t, v in stats.items()}
    assert 0.0 < mean[8] < mean[40]  # a later start level draws a larger random field
    effect = recovery_effect(sampler, images[0], [8, 40], 2)
    assert sorted(effect) == [8, 40]
    assert effect[8][0] < effect[40][0] and all(start > 0 and rec > 0 for start, rec in effect.values())


def test_evaluate_is_one_for_a_perfect_prediction():
    images, labels = _toy_volume(2)

    class Oracle(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(labels.long()[:, 0], N_TOY + 1).permute(0, 3, 1, 2).float()

    np.testing.assert_allclose(evaluate(Oracle(), images, labels, [0, 1], n_labels=N_TOY), 1.0)


# ---------------------------------------------------------------------------------------------------- registration
@pytest.mark.parametrize("shape", [(32, 32), (40, 24), (8, 12, 10)])
@pytest.mark.parametrize("target", [0.3, 1.7, 6.0])
def test_random_smooth_field_has_the_requested_mean_displacement(shape, target):
    field = random_smooth_field(shape, target, 8, torch.Generator().manual_seed(0))
    assert field.shape == (1, len(shape), *shape) and field.dtype == torch.float32
    assert abs(float(field.norm(dim=1).mean()) - target) <= 0.05 * target
    again = random_smooth_field(shape, target, 8, torch.Generator().manual_seed(0))
    assert torch.equal(field, again)


def test_random_smooth_field_edge_cases():
    assert torch.count_nonzero(random_smooth_field((16, 16), 0.0)) == 0
    with pytest.raises(ValueError, match="mean_displacement"):
        random_smooth_field((16, 16), -1.0)
    with pytest.raises(ValueError, match="control_spacing"):
        random_smooth_field((16, 16), 1.0, 0)


def test_random_pairs_match_each_drdm_pair_and_follow_algorithm_4():
    images, _ = _toy_volume(2)
    gen = torch.Generator().manual_seed(1)
    fake = [
        {
            "source": images[i],
            "ddf": random_smooth_field((32, 32), 0.5 + i, 8, gen)[0],
            "aug_ddf": random_smooth_field((32, 32), 2.0, 8, gen)[0],
        }
        for i in range(2)
    ]
    pairs = random_pairs(fake, 8, seed=0)
    for pair, ref in zip(pairs, fake):
        for key in ("ddf", "aug_ddf"):
            want = float(ref[key].norm(dim=0).mean())
            assert abs(float(pair[key].norm(dim=0).mean()) - want) <= 0.05 * want
            assert not torch.equal(pair[key], ref[key])  # a new field, only its magnitude is shared
        src = pair["source"][None]
        torch.testing.assert_close(pair["moving"], warp_intensities(src, pair["aug_ddf"][None])[0])
        composed = compose(pair["aug_ddf"][None], pair["ddf"][None])
        torch.testing.assert_close(pair["fixed"], warp_intensities(src, composed)[0])
    assert all(torch.equal(a["fixed"], b["fixed"]) for a, b in zip(pairs, random_pairs(fake, 8, seed=0)))


def test_drdm_pairs_come_from_the_workflow_files():
    images, _ = _toy_volume(2)
    network = RecoveryNet(2, 1, channels=(4, 8), embed_dim=8, recursions=1).eval()
    settings = {"level_pairs": [[30, 30]], "outputs_per_pair": 2, "recovery_stride": 5}
    with tempfile.TemporaryDirectory() as tmp:
        pairs, info = drdm_pairs(network, DeformationDiffusion(control_size=8), images, [0, 1], settings, Path(tmp))
    assert len(pairs) == info["pairs"] == 4
    for pair in pairs:
        assert pair["moving"].shape == (1, 32, 32) and pair["ddf"].shape == (2, 32, 32)
        moving = warp_intensities(pair["source"][None], pair["aug_ddf"][None])[0]
        torch.testing.assert_close(pair["moving"], moving, atol=1e-5, rtol=0)  # moving = warp(source, aug_ddf)
    assert info["syn_mean_vox"] > 0 and info["aug_mean_vox"] > 0


def test_registration_trains_evaluates_and_reproduces():
    images, labels = _toy_volume(4)
    gen = torch.Generator().manual_seed(2)
    fake = [
        {"source": images[i], "ddf": random_smooth_field((32, 32), 1.0, 8, gen)[0], "aug_ddf": torch.zeros(2, 32, 32)}
        for i in range(4)
    ]
    train = random_pairs(fake, 8)
    settings = {"steps": 2, "batch": 2, "channels": [4, 8]}
    test = real_pairs(images, labels, 1)
    assert len(test) == 3 and torch.equal(test[0]["moving"], images[1])
    results = [evaluate_registration(train_registration(train, settings, seed=0), test, N_TOY) for _ in range(2)]
    assert results[0] == results[1]
    dice, fold = results[0]
    assert 0.0 <= dice <= 1.0 and 0.0 <= fold <= 100.0
    same = [{**p, "moving": p["fixed"], "moving_label": p["fixed_label"]} for p in test]
    assert evaluate_registration(None, same, N_TOY) == (1.0, 0.0)  # identity on identical pairs


# ---------------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("module", [fewshot, registration])
def test_quick_run_skips_cleanly_without_the_shared_ct(module, monkeypatch, tmp_path):
    for value in (None, tmp_path):  # no shared folder, or one without ct/
        monkeypatch.setattr(module, "shared_data_dir", lambda v=value: v)
        figures = module.run(quick=True)
        assert len(figures) == 1 and "absent" in figures[0]["name"]


def test_ct_slices_of_the_shared_ct(shared_data):
    if not (shared_data / "ct" / "seg.nii.gz").is_file():
        pytest.skip("shared CT absent")
    images, labels, class_ids = fewshot.ct_slices(shared_data, fewshot.QUICK)
    assert images.shape == labels.shape == (30, 1, 64, 64)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert set(labels.unique().tolist()) == set(range(fewshot.N_LABELS + 1))
    assert len(class_ids) == fewshot.N_LABELS and class_ids[0] == 5  # the liver is the largest organ


def test_fewshot_table_rows_and_paired_columns():
    from benchmarks.tables import _fewshot

    figs = [
        {
            "name": "fewshot CT K=1 monai: mean Dice (8 organs)",
            "value": 0.5,
            "params": {"k": 1, "arm": "monai", "sd": 0.1},
        },
        {
            "name": "fewshot CT K=1 drdm: mean Dice (8 organs)",
            "value": 0.55,
            "params": {"k": 1, "arm": "drdm", "sd": 0.2},
        },
        {
            "name": "fewshot CT K=1 drdm minus monai: paired mean Dice difference",
            "value": 0.05,
            "params": {"k": 1, "arm": "drdm", "sd": 0.01},
        },
        {"name": "fewshot CT K=1 monai: Dice of organ 1 (class 5)", "value": 0.9, "params": {"k": 1, "arm": "monai"}},
        {"name": "fewshot CT DRDM bank fields T'=16: mean displacement", "value": 1.25, "params": {"level": 16}},
        {"name": "fewshot CT DRDM bank fields T'=16: folding (det J <= 0)", "value": 0.0, "params": {"level": 16}},
        {
            "name": "fewshot CT DRDM T'=16: mean displacement of the recovered field",
            "value": 1.5,
            "params": {"level": 16},
        },
    ]
    lines = _fewshot({"figures": figs}).splitlines()
    assert lines[0] == "| K | none | monai | drdm | both | drdm minus monai (paired) |"
    assert lines[2] == "| 1 |  | 0.500 ± 0.100 | 0.550 ± 0.200 |  | +0.050 ± 0.010 |"  # organ rows stay out
    assert lines[-3].startswith("| T' | random start field, mean | recovered field, mean | bank fields, mean |")
    assert lines[-1] == "| 16 |  | 1.50 | 1.25 |  | 0.0000 |"
