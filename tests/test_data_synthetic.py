"""Synthetic NP generator: determinism, files, splits, and the statistics that make it useful."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from data_prep import synthetic_np
from data_prep.synthetic_np import ensure_dataset, generate, simulate
from ddcore.datalist import SPLITS, load_datalist


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiles():
    return simulate(n=40, size=64, divergent_fraction=0.5, seed=3)


def test_generate_deterministic_and_layout(tmp_path):
    a = generate(tmp_path / "a", n=10, size=32, divergent_fraction=0.3, seed=1)
    b = generate(tmp_path / "b", n=10, size=32, divergent_fraction=0.3, seed=1)
    c = generate(tmp_path / "c", n=10, size=32, divergent_fraction=0.3, seed=2)
    assert _digest(a.parent) == _digest(b.parent)
    assert _digest(a.parent) != _digest(c.parent)
    data = json.loads(a.read_text())
    assert data["modalities"] == ["np_signal", "vessel", "nuclei"]
    items = [i for s in SPLITS for i in data[s]]
    assert len(items) == 10 and len({i["id"] for i in items}) == 10
    assert sum(i["divergent"] for i in items) == 3
    for item in items:
        assert (item["divergence_kind"] is None) == (not item["divergent"])
        for key, folder in (("np_signal", "np"), ("vessel", "vessel"), ("nuclei", "nuclei")):
            assert item[key] == f"{folder}/{item['id']}.png"
            img = Image.open(a.parent / item[key])
            assert img.mode == "I;16" and img.size == (32, 32)
    assert (a.parent / "preview.png").is_file()
    # no temporary folders left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_split_stratified_test_has_both_kinds(tmp_path):
    path = generate(tmp_path / "d", n=40, size=16, divergent_fraction=0.3, seed=0, preview=False)
    data = json.loads(path.read_text())
    assert [len(data[s]) for s in SPLITS] == [32, 4, 4]
    for s in ("validation", "test"):
        kinds = {i["divergent"] for i in data[s]}
        assert kinds == {True, False}
    items = load_datalist(path, "test", ["np_signal", "vessel", "nuclei"])
    assert all(i["np_signal"].startswith(str(tmp_path)) for i in items)


def test_ensure_dataset_reuses_regenerates_and_refuses(tmp_path):
    out = tmp_path / "ds"
    path = ensure_dataset(out, n=6, size=16, seed=0)
    stamp = path.stat().st_mtime_ns
    assert ensure_dataset(out, n=6, size=16, seed=0) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not regenerated
    next((out / "np").iterdir()).unlink()  # incomplete -> regenerated
    ensure_dataset(out, n=6, size=16, seed=0)
    assert len(list((out / "np").iterdir())) == 6
    ensure_dataset(out, n=7, size=16, seed=0)  # other parameters -> regenerated
    assert len(list((out / "np").iterdir())) == 7
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="foreign"):
        ensure_dataset(foreign, n=4, size=16)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_bundle_datalist_resolution_takes_the_generator(tmp_path):
    """``damm.data.resolve_datalist`` generates through the generator train.json passes (the runtime never
    imports ``data_prep``), lets an explicit datalist win, and fails clearly without a datalist or generator."""
    from damm.data import check_splits, resolve_datalist

    calls = []

    def generator(folder, **kwargs):
        calls.append((folder, kwargs))
        return ensure_dataset(folder, **kwargs)

    out = tmp_path / "ds"
    path = resolve_datalist(None, out, True, {"n": 6, "size": 16, "seed": 0}, generator=generator)
    assert path == str(out / "datalist.json") and calls == [(out, {"n": 6, "size": 16, "seed": 0})]
    assert check_splits(path, ["np_signal", "vessel", "nuclei"], ["training"]) == {"training": 4}
    assert resolve_datalist(path, tmp_path / "elsewhere", True, {"n": 1}, generator=generator) == path
    assert resolve_datalist(None, out, False) == path  # the folder's datalist.json, nothing generated
    assert len(calls) == 1
    with pytest.raises(ValueError, match="no 'generator'"):
        resolve_datalist(None, tmp_path / "new", True, {"n": 6})
    with pytest.raises(FileNotFoundError, match="datalist not found"):
        resolve_datalist(None, tmp_path / "new", False)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n": 0}, "n "), ({"size": 8}, "size"), ({"divergent_fraction": 1.5}, "divergent_fraction")],
)
def test_bad_arguments_write_nothing(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tmp_path / "x", **{"n": 4, "size": 16, **kwargs})
    assert not any(tmp_path.iterdir())


def test_cli(tmp_path, capsys):
    assert synthetic_np.main(["--out", str(tmp_path / "cli"), "--n", "5", "--size", "16", "--seed", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        synthetic_np.main(["--out", str(tmp_path / "bad"), "--n", "-1"])
    assert err.value.code == 2


def test_np_signal_excluded_from_nuclei(tiles):
    ratios = []
    for t in tiles:
        outside = ~t.nuclei_mask & ~t.vessel_mask
        dilated = ndimage.binary_dilation(~outside, iterations=2)
        # compare nuclei with the extracellular space at a similar distance from the vessel
        near = ndimage.distance_transform_edt(~t.vessel_mask) < 3 * t.length_scale
        core = ndimage.binary_erosion(t.nuclei_mask)  # nucleus interiors (edges are anti-aliased)
        ratios.append(t.np_signal[core & near].mean() / t.np_signal[~dilated & near].mean())
    assert np.median(ratios) < 0.25


def test_np_signal_decays_from_vessels(tiles):
    for t in tiles[:10]:
        d = ndimage.distance_transform_edt(~t.vessel_mask)
        free = ~t.nuclei_mask & ~t.vessel_mask
        close, far = free & (d < 2), free & (d > 4 * t.length_scale)
        if close.sum() > 10 and far.sum() > 10:
            assert t.np_signal[close].mean() > 3 * t.np_signal[far].mean()


def test_nuclei_avoid_lumens_and_cluster_near_vessels(tiles):
    consistent = [t for t in tiles if t.divergence_kind is None]
    divergent = [t for t in tiles if t.divergence_kind is not None]
    assert len(divergent) == 20 and {t.divergence_kind for t in divergent} == {"swapped", "shifted", "rotated"}

    def lumen_overlap(t):
        return (t.shown_nuclei_mask & t.lumen_mask).sum() / max(1, t.lumen_mask.sum())

    cons = np.mean([lumen_overlap(t) for t in consistent])
    div = np.mean([lumen_overlap(t) for t in divergent])
    assert cons < 0.01
    assert div > 10 * max(cons, 0.005)
    # density near vessels (outside them) is higher than far away
    near_frac, far_frac = [], []
    for t in consistent:
        d = ndimage.distance_transform_edt(~t.vessel_mask)
        near_frac.append(t.nuclei_mask[(d > 2) & (d < 8)].mean())
        far_frac.append(t.nuclei_mask[d > 16].mean() if (d > 16).any() else np.nan)
    assert np.nanmean(near_frac) > np.nanmean(far_frac)


def test_divergent_nuclei_image_differs_and_channels_coregistered(tiles):
    for t in tiles:
        assert t.np_signal.shape == t.vessel.shape == t.nuclei.shape == (64, 64)
        same = np.array_equal(t.shown_nuclei_mask, t.nuclei_mask)
        assert same == (t.divergence_kind is None)


def test_large_tiles_work():
    (t,) = simulate(n=1, size=256, divergent_fraction=0.0, seed=0)
    assert t.np_signal.shape == (256, 256) and t.nuclei_mask.sum() > 100 and t.vessel_mask.any()
