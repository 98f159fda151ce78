"""Datalist loading (every malformed-input error) and split assignment."""

from __future__ import annotations

import json

import pytest

from data_prep.datalist import assign_splits, load_datalist, write_datalist


def _write(tmp_path, data, name="dl.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture
def datalist(tmp_path):
    (tmp_path / "img").mkdir()
    for n in ("a", "b"):
        (tmp_path / "img" / f"{n}.png").write_bytes(b"x")
    data = {
        "modalities": ["vessel"],
        "training": [{"id": "a", "vessel": "img/a.png", "flag": True}],
        "validation": [{"id": "b", "vessel": str(tmp_path / "img" / "b.png")}],
        "test": [],
    }
    return _write(tmp_path, data)


def test_paths_resolved_and_fields_kept(datalist, tmp_path):
    (item,) = load_datalist(datalist, "training", ["vessel"])
    assert item == {"id": "a", "vessel": str(tmp_path / "img" / "a.png"), "flag": True}
    (item,) = load_datalist(datalist, "validation", "vessel")
    assert item["vessel"] == str(tmp_path / "img" / "b.png")


@pytest.mark.parametrize(
    ("content", "exc", "match"),
    [
        ("", ValueError, "is empty"),
        ("{not json", ValueError, "not valid JSON"),
        ("[1, 2]", ValueError, "JSON object"),
        ('{"training": {"id": 1}}', ValueError, "list of objects"),
    ],
)
def test_malformed_datalist(tmp_path, content, exc, match):
    with pytest.raises(exc, match=match):
        load_datalist(_write(tmp_path, content), "training", ["vessel"])


def test_missing_datalist_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_datalist(tmp_path / "nope.json", "training", ["vessel"])


def test_unknown_and_empty_split(datalist):
    with pytest.raises(ValueError, match=r"no split 'train'.*training"):
        load_datalist(datalist, "train", ["vessel"])
    with pytest.raises(ValueError, match="'test' is empty"):
        load_datalist(datalist, "test", ["vessel"])


def test_requested_modality_missing(datalist):
    with pytest.raises(ValueError, match=r"item 'a'.*no key 'nuclei'.*modalities are \['vessel'\]"):
        load_datalist(datalist, "training", ["vessel", "nuclei"])


def test_referenced_file_missing(datalist, tmp_path):
    (tmp_path / "img" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"item 'a' key 'vessel'.*a\.png"):
        load_datalist(datalist, "training", ["vessel"])


def test_write_datalist_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="no item"):
        write_datalist({"training": [], "test": []}, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_assign_splits_stratified_and_deterministic():
    ids = [f"t{i}" for i in range(50)]
    strata = {t: i % 5 == 0 for i, t in enumerate(ids)}  # 10 "divergent"
    a = assign_splits(ids, 0.1, 0.2, seed=1, strata=strata)
    assert a == assign_splits(ids, 0.1, 0.2, seed=1, strata=strata)
    assert a != assign_splits(ids, 0.1, 0.2, seed=2, strata=strata)
    counts = {s: sum(v == s for v in a.values()) for s in ("training", "validation", "test")}
    assert counts == {"training": 35, "validation": 5, "test": 10}  # per stratum: 40 -> 32/4/8, 10 -> 7/1/2
    assert {strata[t] for t, s in a.items() if s == "test"} == {True, False}
    assert set(assign_splits(["only"], 0.1, 0.1).values()) == {"training"}
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(ids, 0.6, 0.5)
