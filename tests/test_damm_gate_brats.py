"""The BraTS gate check's figures and table (``benchmarks.damm_gate_brats``), on hand-built evaluations."""

from __future__ import annotations

import pytest

from benchmarks.damm_gate import VARIANTS
from benchmarks.damm_gate_brats import VARIANT, gate_figures, run
from benchmarks.tables import _gate_brats
from benchmarks.timing import figure


def _final(gated: float, uni: float, multi: float) -> dict:
    def regions(psnr: float) -> dict:
        return {"brain": {"psnr": psnr, "ssim": psnr / 100.0, "mae": 0.1}}

    return {
        "mean": {"damm": regions(gated), "uni": regions(uni), "multi": regions(multi), "copy_t1_linear": regions(9)}
    }


@pytest.mark.parametrize(
    ("gated", "uni", "multi", "delta", "better"),
    [(16.0, 15.0, 16.5, -0.5, "multi"), (15.2, 15.0, 14.0, 0.2, "uni"), (16.0, 15.0, 16.0, 0.0, "multi")],
)
def test_gate_figures_hand_computed(gated, uni, multi, delta, better):
    figs = gate_figures("d", _final(gated, uni, multi), {"dm_iterations": 7})
    by_name = {f["name"]: f for f in figs}
    assert len(figs) == 2
    psnr = by_name["d: gated minus better branch, brain PSNR"]
    assert psnr["value"] == pytest.approx(delta) and psnr["unit"] == "dB"
    assert psnr["params"]["better_branch"] == better and psnr["params"]["dm_iterations"] == 7
    assert by_name["d: gated minus better branch, brain SSIM"]["value"] == pytest.approx(delta / 100.0)
    # the variant's overrides are recorded with every figure
    assert VARIANTS[VARIANT].items() <= psnr["params"].items()


def test_table_row_per_direction():
    figs = gate_figures("a -> b", _final(16.0, 15.0, 16.5), {})
    # direction_figures' routing figures: only the gated sampler's is the gate's share
    for method, fraction in (("damm", 0.9), ("uni", 0.0), ("multi", 1.0)):
        figs.append(figure(f"a -> b: {method} fraction of steps on the multi-modal branch", fraction, "",
                           direction="a -> b", method=method))  # fmt: skip
    for method, psnr in (("damm", 16.0), ("uni", 15.0), ("multi", 16.5), ("unet_baseline", 14.0)):
        for metric, value in (("psnr", psnr), ("ssim", psnr / 100)):
            figs.append(figure(f"a -> b: {method} {metric}", value, "", direction="a -> b", method=method,
                               region="brain", metric=metric))  # fmt: skip
    for method, value in (("copy_t1_linear", 13.0), ("copy_t2_linear", 13.5)):
        figs.append(figure("t", value, "dB", direction="a -> b", method=method, region="brain", metric="psnr"))
    table = _gate_brats({"figures": figs})
    row = table.splitlines()[2]
    assert row.startswith("| a -> b | 16.00 dB / 0.160 | 15.00 dB / 0.150 | 16.50 dB / 0.165 | 14.00 dB / 0.140 |")
    assert "copy_t2_linear 13.50 dB" in row and "-0.50 dB (better: multi)" in row and "90.0 %" in row


def test_absent_data_gives_a_note(monkeypatch):
    monkeypatch.setattr("benchmarks.damm_gate_brats.shared_subjects", lambda: None)
    (only,) = run(quick=True)
    assert "absent" in only["name"]
