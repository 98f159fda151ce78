"""DRDM precision setting (issue 9): validation, fp32 islands under bf16 autocast, bf16-vs-fp32 agreement,
batched sampling, and the three DRDM bundle configs at fp32 and bf16."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from torch import nn

from data_prep.volumes import build_volume_datalist
from drdm.diffusion import DeformationDiffusion
from drdm.fields import compose, folding_fraction, jacobian_determinant, warp
from drdm.losses import DRDMLoss
from drdm.networks import RecoveryNet, make_norm
from drdm.sampler import DRDMSampler
from drdm.trainer import DRDMTrainer, PrecisionInferer
from drdm.workflows import AugmentationWorkflow

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
SHAPES = {2: (32, 24), 3: (16, 16, 12)}
TINY = {"network_def#channels": [2, 4, 8], "diffusion#control_size": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


def _net(d: int, seed: int = 0) -> RecoveryNet:
    """Small recovery network whose output is not the zero field (trained-like, random head)."""
    torch.manual_seed(seed)
    net = RecoveryNet(d, channels=(4, 8, 8))
    nn.init.normal_(net.head.weight, std=0.05)
    return net


def _image(d: int, batch: int = 1) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.linspace(0, 3, s) for s in SHAPES[d]], indexing="ij")
    img = sum(torch.sin(2 * g + i) for i, g in enumerate(grids))
    img = (img - img.min()) / (img.max() - img.min())
    return img[None, None].repeat(batch, 1, *([1] * d))


def _labels(d: int, batch: int = 1) -> torch.Tensor:
    idx = torch.meshgrid(*[torch.arange(s) for s in SHAPES[d]], indexing="ij")
    lab = (idx[0] // 6) * 3 + (idx[1] // 7) % 2 + 1
    return lab[None, None].repeat(batch, 1, *([1] * d)).to(torch.int16)


def _diffusion() -> DeformationDiffusion:
    return DeformationDiffusion(control_size=16)


# ---------------------------------------------------------------------------------------------- validation
def test_invalid_precision_raises_before_work(tmp_path):
    net = _net(2)
    with pytest.raises(ValueError, match="precision='fp8'"):
        DRDMSampler(net, _diffusion(), precision="fp8")
    with pytest.raises(ValueError, match="precision='fp16' needs a CUDA device"):
        DRDMSampler(net, _diffusion(), precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        PrecisionInferer("half-ish")
    with pytest.raises(ValueError, match="precision='fp16'"):
        DRDMTrainer("cpu", 1, [], net, torch.optim.Adam(net.parameters()), _diffusion(), precision="fp16")
    with pytest.raises(ValueError, match="batch_size"):
        DRDMSampler(net, _diffusion(), batch_size=0)
    # the workflow validates before reading any file (the datalist does not even exist)
    with pytest.raises(ValueError, match="precision='bf17'"):
        AugmentationWorkflow(tmp_path / "missing.json", net, _diffusion(), tmp_path / "out", precision="bf17")
    with pytest.raises(ValueError, match="sampler_kwargs"):
        AugmentationWorkflow(
            [{"image": "x.nii.gz"}], net, _diffusion(), tmp_path / "out", sampler_kwargs={"precision": "bf16"}
        )
    assert DRDMSampler(net, _diffusion(), precision="BF16").precision == "bf16"  # aliases are canonicalised
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- fp32 islands
@pytest.mark.parametrize("d", [2, 3])
def test_fp32_islands_under_bf16_autocast(d):
    net = _net(d).eval()
    x = _image(d, batch=2)
    t = torch.tensor([5, 9])
    field = torch.randn(2, d, *SHAPES[d]) * 1.5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert net.enc[0][0].conv_in(x).dtype == torch.bfloat16  # autocast is really on: convs run in bf16
        assert net.enc[0][0].norm(net.enc[0][0].conv_in(x)).dtype == torch.float32  # instance norm island
        out = net(x, t)
        jac = jacobian_determinant(field.bfloat16())
        fold = folding_fraction(out)
        composed = compose(field.bfloat16(), out)
        warped = warp(x.bfloat16(), field)
    assert out.dtype == jac.dtype == fold.dtype == composed.dtype == warped.dtype == torch.float32
    # an fp32 field gives the identical Jacobian inside and outside autocast (the island really is fp32), and
    # the forward process (pure field composition; its lift uses matrix products) is bitwise unchanged
    diffusion = _diffusion()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = jacobian_determinant(field)
        drawn = diffusion.q_sample(x, 30, torch.Generator().manual_seed(4))
    assert torch.equal(inside, jacobian_determinant(field))
    plain = diffusion.q_sample(x, 30, torch.Generator().manual_seed(4))
    for a, b in zip(drawn[:3], plain[:3]):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("d", [2, 3])
def test_instance_norm_as_group_norm_is_instance_norm(d):
    """``make_norm("instance")`` (GroupNorm, one group per channel) = affine InstanceNorm, same state dict."""
    reference = (nn.InstanceNorm2d if d == 2 else nn.InstanceNorm3d)(6, affine=True)
    nn.init.normal_(reference.weight)
    nn.init.normal_(reference.bias)
    norm = make_norm("instance", d, 6)
    norm.load_state_dict(reference.state_dict())  # strict: identical keys
    x = torch.randn(3, 6, *SHAPES[d]) * 4 + 2
    layout = torch.channels_last if d == 2 else torch.channels_last_3d
    for tensor in (x, x.contiguous(memory_format=layout)):
        assert torch.allclose(norm(tensor), reference(x), atol=1e-4)
    net = RecoveryNet(d, channels=(4, 8, 8))
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 12 and all(type(m).__name__ == "FP32GroupNorm" for m in norms)  # fp32 islands


def test_bf16_field_does_not_poison_the_cached_warp_grid():
    """A bf16 grid cannot address pixel 257; a bf16 call must not leave such a cached grid for later fp32 calls."""
    ramp = torch.arange(300.0).view(1, 1, 300, 1).expand(1, 1, 300, 4).contiguous()
    half = torch.zeros(1, 2, 300, 4)
    half[:, 0] = 0.5
    assert warp(ramp.bfloat16(), half.bfloat16()).dtype == torch.float32  # (bf16 image values are rounded)
    assert torch.allclose(warp(ramp, half)[:, :, :-1], ramp[:, :, :-1] + 0.5, atol=1e-3)


@pytest.mark.parametrize("d", [2, 3])
def test_loss_and_training_step_stay_fp32(d):
    net = _net(d)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [{"image": _image(d, batch=2)}]
    trainer = DRDMTrainer(
        "cpu", 1, batches, net, torch.optim.Adam(net.parameters(), 1e-3), _diffusion(), precision="bf16"
    )
    trainer.run()
    assert trainer.precision == "bf16" and trainer.state.output["pred"].dtype == torch.float32
    assert trainer.state.output["loss"].dtype == torch.float32 and torch.isfinite(trainer.state.output["loss"])
    assert all(v.dtype == torch.float32 for v in net.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(state[k], v) for k, v in net.state_dict().items())  # it did train
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DRDMLoss()(torch.randn(1, d, *SHAPES[d]).bfloat16(), torch.randn(1, d, *SHAPES[d]).bfloat16())
    assert loss.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- bf16 vs fp32
@pytest.mark.parametrize("d", [2, 3])
def test_bf16_recovered_field_agrees_with_fp32(d):
    net = _net(d)
    out = {}
    for precision in ("fp32", "bf16"):
        sampler = DRDMSampler(net, _diffusion(), precision=precision, folding_threshold=None)
        out[precision] = sampler.augment(_image(d), [4, 8], 2, generator=torch.Generator().manual_seed(3))
    for a, b in zip(out["fp32"], out["bf16"]):
        assert torch.equal(a.random_ddf, b.random_ddf)  # same seeds, same random fields
        assert b.ddf.dtype == torch.float32 and b.image.dtype == torch.float32
        moved = (a.ddf - a.random_ddf).norm(dim=1).mean()  # what the network changed, in voxels
        diff = (a.ddf - b.ddf).norm(dim=1)
        # measured: moved 0.15-0.5 vox; bf16-fp32 max 0.001-0.006 vox, mean 2e-4-9e-4 vox (2D and 3D, 4-8 steps)
        assert moved > 0.05
        assert diff.max() < 0.05 and diff.mean() < 0.01 * max(1.0, float(moved))
        mag_a, mag_b = a.ddf.norm(dim=1).mean(), b.ddf.norm(dim=1).mean()
        assert abs(mag_b - mag_a) <= 0.05 * mag_a  # displacement statistics within 5 % (measured < 0.1 %)


# ---------------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("d", [2, 3])
def test_batched_augment_matches_one_by_one(d):
    net = _net(d)
    image, labels = _image(d, batch=2), _labels(d, batch=2)
    runs = {}
    for batch_size in (1, 16):
        sampler = DRDMSampler(net, _diffusion(), batch_size=batch_size, folding_threshold=0.001, max_retries=1)
        runs[batch_size] = sampler.augment(image, [3, 6], 2, labels, torch.Generator().manual_seed(1))
    one, batched = runs[1], runs[16]
    assert [r.t_prime for r in batched] == [3, 3, 6, 6] and all(r.ddf.shape[0] == 2 for r in batched)
    for a, b in zip(one, batched):  # a row depends on its seed only, not on the batching (fp32: rounding only)
        assert torch.allclose(a.ddf, b.ddf, atol=1e-4) and torch.equal(a.random_ddf, b.random_ddf)
        assert torch.equal(a.attempts, b.attempts) and torch.equal(a.accepted, b.accepted)
        assert set(b.labels.unique().tolist()) <= set(labels.unique().tolist())
        assert torch.allclose(b.image, warp(image, b.ddf), atol=1e-5)
    fields = torch.cat([r.ddf for r in batched])  # 8 rows: 2 images x 2 levels x 2 outputs, all distinct draws
    distinct = torch.cdist(fields.flatten(1), fields.flatten(1)) + torch.eye(len(fields)) * 1e9
    assert distinct.min() > 1e-3
    again = DRDMSampler(net, _diffusion(), batch_size=3).augment(
        image, [3, 6], 2, labels, torch.Generator().manual_seed(1)
    )
    assert all(torch.allclose(a.ddf, b.ddf, atol=1e-4) for a, b in zip(again, batched))  # per-seed reproducible


# ---------------------------------------------------------------------------------------------- bundle configs
def _write_case(folder: Path, name: str, shape: tuple[int, ...], seed: int) -> None:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 3, s) for s in shape], indexing="ij")
    img = (100 * sum(np.sin(2 * g + i) for i, g in enumerate(grids)) + rng.normal(0, 1, shape)).astype(np.int16)
    idx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    lab = ((idx[0] // 5) * 2 + (idx[1] // 6) % 2 + 3).astype(np.uint8)
    for sub, arr in (("img", img), ("lab", lab)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, np.eye(4)), folder / sub / f"{name}.nii.gz")


def _workflow(name: str, run_id: str, bundle: Path, data: Path, **overrides) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "drdm_common.json"), str(CONFIGS / name)],
        meta_file=None,
        logging_file=False,
        workflow_type="train" if run_id == "training" else "infer",
        run_id=run_id,
        bundle_root=str(bundle),
        dataset_dir=str(data),
        **{**TINY, **overrides},
    )
    wf.initialize()
    return wf


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bundle_configs_run_with_precision(tmp_path, d, precision):
    data, bundle = tmp_path / "data", tmp_path / "bundle"
    shape = (24, 20) if d == 2 else (16, 16, 12)
    _write_case(data, "a", shape, 0)
    build_volume_datalist(data / "img", data / "datalist.json", data / "lab")
    common = {"spatial_dims": d, "precision": precision}
    roi = [16, 16] if d == 2 else [16, 16, 8]
    train = _workflow("drdm_train.json", "training", bundle, data, roi_size=roi, max_epochs=1, **common)
    train.run()
    assert train.parser.get_parsed_content("train#trainer").precision == precision
    state = torch.load(bundle / "models" / "drdm" / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())  # checkpoints stay fp32
    _workflow("drdm_augment.json", "augment", bundle, data, t_primes=[2, 3], outputs_per_level=2, **common).run()
    reports = json.loads((bundle / "eval" / "drdm_augment" / "outputs.json").read_text())
    assert len(reports) == 4 and {r["precision"] for r in reports} == {precision}
    assert all(r["mean_displacement_mm"] > 0 for r in reports), [r["mean_displacement_mm"] for r in reports]
    pairs = _workflow("drdm_register_pairs.json", "register_pairs", bundle, data, outputs_per_pair=2, **common)
    pairs.run()
    reports = json.loads((bundle / "eval" / "drdm_register_pairs" / "outputs.json").read_text())
    assert len(reports) == 4 and {r["precision"] for r in reports} == {precision}  # 2 level pairs x 2 triplets
    assert (bundle / "eval" / "drdm_register_pairs" / "a_pair01_01_fixed.nii.gz").is_file()


def test_bundle_config_rejects_bad_precision_before_work(tmp_path):
    data = tmp_path / "data"
    _write_case(data, "a", (16, 16, 12), 0)
    build_volume_datalist(data / "img", data / "datalist.json", data / "lab")
    wf = _workflow("drdm_augment.json", "augment", tmp_path / "b", data, checkpoint=None, precision="fp16")
    with pytest.raises(RuntimeError) as err:
        wf.run()
    assert "precision='fp16'" in str(err.value.__cause__)
    assert not (tmp_path / "b" / "eval").exists()
