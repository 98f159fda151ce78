"""The BraTS gate check's figures and table (``benchmarks.damm_gate_brats``), on hand-built evaluations."""

from __future__ import annotations

import pytest

from benchmarks.damm_gate import VARIANTS
from benchmarks.damm_gate_brats import BRANCHES, VARIANT, gate_figures, run
from benchmarks.tables import _gate_brats
from benchmarks.timing import figure


def _final(gated: float, uni: float, multi: float, blend: float | None = None) -> dict:
    def regions(psnr: float) -> dict:
        return {"brain": {"psnr": psnr, "ssim": psnr / 100.0, "mae": 0.1}}

    mean = {"damm": regions(gated), "uni": regions(uni), "multi": regions(multi), "copy_t1_linear": regions(9)}
    if blend is not None:
        mean["damm_blend"] = regions(blend)
    return {"mean": mean}


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
    assert psnr["params"]["gate_decision"] == "per_step"


def test_gate_figures_per_decision():
    figs = gate_figures("d", _final(16.0, 15.0, 16.5, blend=16.7), {})
    by_name = {f["name"]: f for f in figs}
    assert len(figs) == 4
    blend = by_name["d: gated (blend) minus better branch, brain PSNR"]
    assert blend["value"] == pytest.approx(0.2) and blend["params"]["gate_decision"] == "blend"
    assert blend["params"]["method"] == "damm_blend" and blend["params"]["better_branch"] == "multi"
    assert by_name["d: gated minus better branch, brain PSNR"]["value"] == pytest.approx(-0.5)
    assert set(BRANCHES) == {"damm", "damm_blend", "uni", "multi"}


@pytest.mark.parametrize("blend", [None, 16.75])
def test_table_row_per_direction(blend):
    figs = gate_figures("a -> b", _final(16.0, 15.0, 16.5, blend=blend), {})
    # direction_figures' routing figures: only the gated sampler's is the gate's share
    for method, fraction in (("damm", 0.9), ("uni", 0.0), ("multi", 1.0)):
        figs.append(figure(f"a -> b: {method} fraction of steps on the multi-modal branch", fraction, "",
                           direction="a -> b", method=method))  # fmt: skip
    scored = [("damm", 16.0), ("uni", 15.0), ("multi", 16.5), ("unet_baseline", 14.0)]
    for method, psnr in scored + ([("damm_blend", blend)] if blend is not None else []):
        for metric, value in (("psnr", psnr), ("ssim", psnr / 100)):
            figs.append(figure(f"a -> b: {method} {metric}", value, "", direction="a -> b", method=method,
                               region="brain", metric=metric))  # fmt: skip
    for method, value in (("copy_t1_linear", 13.0), ("copy_t2_linear", 13.5)):
        figs.append(figure("t", value, "dB", direction="a -> b", method=method, region="brain", metric="psnr"))
    table = _gate_brats({"figures": figs})
    row = table.splitlines()[2]
    blend_cell = "16.75 dB / 0.168" if blend is not None else "—"
    assert row.startswith(
        f"| a -> b | 16.00 dB / 0.160 | {blend_cell} | 15.00 dB / 0.150 | 16.50 dB / 0.165 | 14.00 dB / 0.140 |"
    )
    blend_delta = "+0.25 dB (better: multi)" if blend is not None else "—"
    assert row.endswith(f"| copy_t2_linear 13.50 dB | -0.50 dB (better: multi) | {blend_delta} | 90.0 % |")


def test_absent_data_gives_a_note(monkeypatch):
    monkeypatch.setattr("benchmarks.damm_gate_brats.shared_subjects", lambda: None)
    (only,) = run(quick=True)
    assert "absent" in only["name"]
