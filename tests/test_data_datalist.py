"""Datalist loading (every malformed-input error) and split assignment."""

from __future__ import annotations

import json

import pytest

from ddcore.datalist import assign_splits, load_datalist, load_volume_datalist, write_datalist


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
    assert counts == {"training": 35, "validation": 5, "test": 10}  # per stratum: 40 -> 28/4/8, 10 -> 7/1/2
    assert {strata[t] for t, s in a.items() if s == "test"} == {True, False}
    assert set(assign_splits(["only"], 0.1, 0.1).values()) == {"training"}
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(ids, 0.6, 0.5)


def test_split_counts_hand_computed_and_every_id_assigned():
    # 3 members, 0.1/0.1: rounding gives 0/0, the minimum of one per positive split gives 1/1/1
    a = assign_splits(["x", "y", "z"], 0.1, 0.1)
    assert sorted(a.values()) == ["test", "training", "validation"]
    # 4 members, 0.1/0.1: 1 test, 1 validation, 2 training (MONAI's per-split rounding alone would drop ids)
    assert sorted(assign_splits(list("abcd"), 0.1, 0.1).values()) == ["test", "training", "training", "validation"]
    # 2 members, 0.5/0.4: rounding gives 1 validation + 1 test, training keeps one; validation gives way first
    assert sorted(assign_splits(["p", "q"], 0.5, 0.4).values()) == ["test", "training"]
    assert sorted(assign_splits(["p", "q"], 0.5, 0.2).values()) == ["training", "validation"]
    assert set(assign_splits(list("abc"), 0.0, 0.0).values()) == {"training"}
    for n in range(1, 30):
        ids = [f"i{k}" for k in range(n)]
        out = assign_splits(ids, 0.15, 0.25, seed=n)
        assert set(out) == set(ids)
        assert sum(v == "training" for v in out.values()) >= 1


def test_assign_splits_independent_of_input_order_and_checked():
    ids = [f"s{i:02d}" for i in range(20)]
    strata = {t: i % 3 for i, t in enumerate(ids)}
    a = assign_splits(ids, 0.2, 0.2, seed=3, strata=strata)
    assert a == assign_splits(list(reversed(ids)), 0.2, 0.2, seed=3, strata=strata)
    for label in range(3):  # 7/7/6 members -> 1 validation and 1 test each
        members = [t for t in ids if strata[t] == label]
        assert sorted(a[t] for t in members).count("test") == 1
        assert sorted(a[t] for t in members).count("validation") == 1
    with pytest.raises(ValueError, match="unique"):
        assign_splits(["a", "a"], 0.1, 0.1)
    with pytest.raises(ValueError, match="without a stratum"):
        assign_splits(["a", "b"], 0.1, 0.1, strata={"a": 0})
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(ids, -0.1, 0.1)


def test_other_fields_are_not_rewritten_as_paths(tmp_path):
    # MONAI's loader joins any string naming an existing file to the base folder; only path keys may change
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    path = _write(tmp_path, {"training": [{"id": "a", "note": "a.png", "vessel": "a.png"}]})
    (item,) = load_datalist(path, "training", ["vessel"])
    assert item == {"id": "a", "note": "a.png", "vessel": str(tmp_path / "a.png")}


def test_optional_keys_base_dir_lists_and_empty_split(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("i.nii.gz", "l.nii.gz", "c0.png", "c1.png"):
        (data / name).write_bytes(b"x")
    path = _write(
        tmp_path,
        {
            "training": [
                {"image": "i.nii.gz", "label": "l.nii.gz", "channels": ["c0.png", "c1.png"]},
                {"image": "i.nii.gz", "channels": ["c1.png"]},
            ],
            "validation": [],
        },
    )
    items = load_datalist(path, "training", ["image", "channels"], optional_keys=["label"], base_dir=data)
    assert items[0] == {
        "image": str(data / "i.nii.gz"),
        "label": str(data / "l.nii.gz"),
        "channels": [str(data / "c0.png"), str(data / "c1.png")],
    }
    assert "label" not in items[1]
    assert load_datalist(path, "validation", ["image"], allow_empty=True) == []
    with pytest.raises(FileNotFoundError, match=r"split 'training' item '#0' key 'image'.*i\.nii\.gz"):
        load_datalist(path, "training", ["image"])  # relative to the datalist's folder: not there
    (data / "l.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"item '#0' key 'label'"):
        load_datalist(path, "training", ["image"], optional_keys=["label"], base_dir=data)
    bad = _write(tmp_path, {"training": [{"id": "z", "image": 3}]}, "bad.json")
    with pytest.raises(ValueError, match=r"bad\.json.*item 'z' of split 'training' key 'image' must be a file path"):
        load_datalist(bad, "training", ["image"])
    with pytest.raises(ValueError, match="'keys' is empty"):
        load_datalist(path, "training", [])


def test_volume_datalist(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "case_a.nii.gz").write_bytes(b"x")
    (tmp_path / "img" / "case_b.nii").write_bytes(b"x")
    (tmp_path / "img" / "case_a_seg.nii.gz").write_bytes(b"x")
    path = _write(
        tmp_path,
        {
            "training": [
                {"image": "img/case_a.nii.gz", "label": "img/case_a_seg.nii.gz"},
                {"id": "given", "image": "img/case_b.nii"},
            ],
            "validation": [],
        },
    )
    items = load_volume_datalist(path)
    assert items == [
        {
            "image": str(tmp_path / "img" / "case_a.nii.gz"),
            "label": str(tmp_path / "img" / "case_a_seg.nii.gz"),
            "id": "case_a",
        },
        {"id": "given", "image": str(tmp_path / "img" / "case_b.nii")},
    ]
    assert load_volume_datalist(path, "validation") == []
    with pytest.raises(ValueError, match="no key 'image'"):
        load_volume_datalist(_write(tmp_path, {"training": [{"label": "img/case_a.nii.gz"}]}, "x.json"))
    with pytest.raises(FileNotFoundError, match="datalist not found"):
        load_volume_datalist(tmp_path / "missing.json")


def test_check_batches_names_the_split_size_and_the_settings(tmp_path):
    import json

    from damm.data import check_batches

    items = []
    for i in range(3):
        (tmp_path / f"a{i}.png").write_bytes(b"x")
        items.append({"id": str(i), "a": f"a{i}.png"})
    (tmp_path / "d.json").write_text(json.dumps({"training": items}))
    assert check_batches(tmp_path / "d.json", ["a"], {"ae_batch_size": 3}) == 3
    with pytest.raises(ValueError, match=r"'training' has 3 item\(s\), fewer than dm_batch_size=4; expected at"):
        check_batches(tmp_path / "d.json", ["a"], {"ae_batch_size": 2, "dm_batch_size": 4})
    with pytest.raises(ValueError, match=r"2 item\(s\) \(limited by max_train_items=2\), fewer than ae_batch_size=3"):
        check_batches(tmp_path / "d.json", ["a"], {"ae_batch_size": 3}, max_items=2)
