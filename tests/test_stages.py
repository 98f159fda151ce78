"""TrainingStage: skip, resume to a larger budget, time-capped stops, retrain."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from damm.stages import TRAINING_TIMES, TrainingStage, budget_reached, read_training_times, record_training_time


class _Trainer:
    """Counts runs; each run 'trains' up to ``stop_at`` iterations (a wall-clock cap stops it there)."""

    def __init__(self, stop_at: int) -> None:
        self.runs = 0
        self.stop_at = stop_at
        self.state = SimpleNamespace(iteration=0)

    def run(self) -> None:
        self.runs += 1
        self.state.iteration = self.stop_at


def _stage(tmp_path: Path, trainer: _Trainer, iterations: int | None, **kw) -> TrainingStage:
    final = tmp_path / "models" / "model.pt"
    final.parent.mkdir(parents=True, exist_ok=True)
    return TrainingStage(
        "stage", trainer, final, export=lambda: final.write_text(str(trainer.state.iteration)), iterations=iterations,
        checkpoint_dir=tmp_path / "ckpt", **kw,
    )  # fmt: skip


def test_budget_reached_hand_cases(tmp_path: Path) -> None:
    assert budget_reached(tmp_path, "s", 10)  # nothing recorded: a final model from elsewhere counts as finished
    record_training_time(tmp_path, "s", 1.0, 8, 10)  # stopped at 8 by a wall-clock cap, budget 10
    assert budget_reached(tmp_path, "s", 10) and budget_reached(tmp_path, "s", None)
    assert not budget_reached(tmp_path, "s", 11)
    record_training_time(tmp_path, "t", 1.0, 8)  # no budget recorded: the iterations count
    assert budget_reached(tmp_path, "t", 8) and not budget_reached(tmp_path, "t", 9)
    assert json.loads((tmp_path / TRAINING_TIMES).read_text())["s"] == {"seconds": 1.0, "iterations": 8, "budget": 10}


def test_stage_trains_then_skips_at_the_same_budget(tmp_path: Path) -> None:
    trainer = _Trainer(stop_at=4)
    assert _stage(tmp_path, trainer, 4).run() is True
    assert _stage(tmp_path, trainer, 4).run() is False
    assert trainer.runs == 1
    assert read_training_times(tmp_path / "models")["stage"]["iterations"] == 4


def test_stage_resumes_for_a_larger_budget_and_keeps_the_old_final_until_export(tmp_path: Path) -> None:
    trainer = _Trainer(stop_at=4)
    _stage(tmp_path, trainer, 4).run()
    first_seconds = 100.0
    record_training_time(tmp_path / "models", "stage", first_seconds, 4, 4)
    final = tmp_path / "models" / "model.pt"
    seen = []
    trainer.run = lambda: (seen.append(final.read_text()), setattr(trainer.state, "iteration", 8))  # type: ignore
    stage = _stage(tmp_path, trainer, 8)
    assert not stage.finished()
    assert stage.run() is True
    assert seen == ["4"]  # the 4-iteration model stayed in place while the stage resumed
    assert final.read_text() == "8"
    entry = read_training_times(tmp_path / "models")["stage"]
    assert (entry["iterations"], entry["budget"]) == (8, 8)
    assert entry["seconds"] >= first_seconds  # the resumed budget's time adds to the first one's
    assert _stage(tmp_path, trainer, 8).finished()


def test_time_capped_stage_is_not_rerun(tmp_path: Path) -> None:
    trainer = _Trainer(stop_at=3)  # the cap stopped it below its budget of 10
    _stage(tmp_path, trainer, 10).run()
    assert _stage(tmp_path, trainer, 10).run() is False
    assert trainer.runs == 1


def test_retrain_removes_checkpoints_and_trains(tmp_path: Path) -> None:
    trainer = _Trainer(stop_at=2)
    _stage(tmp_path, trainer, 2).run()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "checkpoint_1.pt").write_text("x")
    assert _stage(tmp_path, trainer, 2, retrain=True).run() is True
    assert trainer.runs == 2 and not (tmp_path / "ckpt").exists()


def test_no_budget_means_the_final_model_marks_the_stage(tmp_path: Path) -> None:
    trainer = _Trainer(stop_at=2)
    _stage(tmp_path, trainer, None).run()
    record_training_time(tmp_path / "models", "stage", 1.0, 1, 1)
    assert _stage(tmp_path, trainer, None).finished()
