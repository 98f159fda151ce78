"""The shared precision helpers: names, autocast contexts, fp32 islands and fp32 normalisation layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddcore.precision import (
    FP32BatchNorm2d,
    FP32GroupNorm,
    FP32InstanceNorm3d,
    FP32LayerNorm,
    autocast,
    autocast_dtype,
    canonical_precision,
    check_precision,
    fp32,
    keep_norms_fp32,
    make_grad_scaler,
)


@pytest.mark.parametrize(
    ("given", "expected"), [("fp32", "fp32"), ("BF16", "bf16"), ("bfloat16", "bf16"), ("float32", "fp32")]
)
def test_check_precision_canonical_names(given: str, expected: str) -> None:
    assert check_precision(given, "cpu") == expected


def test_check_precision_rejects_unknown_and_cpu_fp16_naming_the_setting() -> None:
    with pytest.raises(ValueError, match=r"dm_precision='fp8'.*fp32"):
        check_precision("fp8", "cpu", setting="dm_precision")
    with pytest.raises(ValueError, match=r"precision='fp16' needs a CUDA device"):
        check_precision("fp16", "cpu")


def test_autocast_dtypes_and_fp32_is_a_no_op() -> None:
    assert autocast_dtype("fp32") is None
    assert autocast_dtype("bf16") is torch.bfloat16
    assert autocast_dtype("fp16") is torch.float16
    conv = nn.Conv2d(2, 2, 3)
    x = torch.randn(1, 2, 8, 8)
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert conv(x).dtype == torch.float32
    with autocast("bf16", torch.device("cpu")):
        assert conv(x).dtype == torch.bfloat16
        with fp32("cpu"):
            assert not torch.is_autocast_enabled("cpu")
            assert conv(x).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_keep_norms_fp32_swaps_classes_keeps_state_and_values(spatial_dims: int) -> None:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    torch.manual_seed(0)
    net = nn.Sequential(conv(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), conv(8, 8, 1))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, *([8] * spatial_dims))
    with torch.no_grad():
        before = net(x)
    assert keep_norms_fp32(net) is net
    assert type(net[1]) is FP32GroupNorm and isinstance(net[1], nn.GroupNorm)
    assert list(net.state_dict()) == list(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        after = net(x)
    assert torch.equal(before, after)  # outside autocast nothing changes
    outputs: list[torch.dtype] = []
    net[1].register_forward_hook(lambda m, i, o: outputs.append(o.dtype))
    with torch.no_grad(), autocast("bf16", "cpu"):
        low = net(x)
    assert outputs == [torch.float32]  # the norm ran (and returned) fp32 on a bf16 conv output
    assert low.dtype == torch.bfloat16  # the last conv still runs in bf16
    assert (low.float() - after).abs().max() < 0.05 * after.abs().max()


def test_keep_norms_fp32_covers_layer_batch_and_instance_norm() -> None:
    net = keep_norms_fp32(
        nn.Sequential(
            nn.Linear(4, 4),
            nn.LayerNorm(4),
            nn.Conv2d(1, 2, 1),
            nn.BatchNorm2d(2),
            nn.Conv3d(1, 2, 1),
            nn.InstanceNorm3d(2),
        )
    )
    assert type(net[1]) is FP32LayerNorm and type(net[3]) is FP32BatchNorm2d and type(net[5]) is FP32InstanceNorm3d
    with autocast("bf16", "cpu"):
        assert net[1](net[0](torch.randn(3, 4))).dtype == torch.float32
        assert net[3](net[2](torch.randn(2, 1, 4, 4))).dtype == torch.float32
        assert net[5](net[4](torch.randn(2, 1, 4, 4, 4))).dtype == torch.float32


def test_canonical_precision_checks_the_name_only() -> None:
    assert canonical_precision("float16") == "fp16"  # valid name, whatever the device
    with pytest.raises(ValueError, match="ae_precision='int8'"):
        canonical_precision("int8", setting="ae_precision")


def test_grad_scaler_only_for_fp16() -> None:
    assert make_grad_scaler("fp32", "cpu") is None
    assert make_grad_scaler("bf16", "cpu") is None
    with pytest.raises(ValueError, match="CUDA"):
        make_grad_scaler("fp16", "cpu")


def test_skip_nonfinite_steps_keeps_weights_finite_and_counts() -> None:
    from ddcore.precision import skip_nonfinite_steps

    lin = nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    handle = skip_nonfinite_steps(opt)
    before = [p.detach().clone() for p in lin.parameters()]
    lin(torch.tensor([[float("nan"), 1.0, 2.0]])).sum().backward()
    opt.step()
    assert opt.skipped_nonfinite_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))  # the NaN step changed nothing
    opt.zero_grad()
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert opt.skipped_nonfinite_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))  # a finite step updates
    assert all(torch.isfinite(p).all() for p in lin.parameters())
    handle.remove()
