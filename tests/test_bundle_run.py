"""End-to-end runs of every bundle run id at tiny size (ConfigWorkflow, subprocess, torchrun, resume, bad input)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from PIL import Image
from tiny_bundle import TINY, TINY_NET

from data_prep.synthetic_np import ensure_dataset

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COMMON = str(CONFIGS / "common.json")  # the shared network/diffusion part, merged first
TRAIN = [COMMON, str(CONFIGS / "train.json")]
INFER = [COMMON, str(CONFIGS / "inference.json")]
META = str(CONFIGS / "metadata.json")
LOGGING = str(CONFIGS / "logging.conf")

NET = TINY_NET


def _overrides(root: Path, data: Path, **extra) -> dict:
    return {"bundle_root": str(root), "dataset_dir": str(data), **TINY, **extra}


def _workflow(config, root: Path, data: Path, run_id: str = "training", workflow_type: str = "train", **extra):
    return ConfigWorkflow(
        config_file=config,
        meta_file=META,
        logging_file=LOGGING,
        run_id=run_id,
        workflow_type=workflow_type,
        **_overrides(root, data, **extra),
    )


def _run(wf: ConfigWorkflow) -> None:
    wf.initialize()
    try:
        wf.run()
    finally:
        wf.finalize()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "synthetic_np"
    ensure_dataset(folder, **TINY["synthetic_args"])
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data) -> Path:
    """The `training` run id (both stages + evaluation) through ConfigWorkflow."""
    root = tmp_path_factory.mktemp("bundle")
    wf = _workflow(TRAIN, root, tiny_data)
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    return root


def test_training_writes_models_and_evaluation(trained):
    ae = torch.load(trained / "models" / "model_autoencoder.pt", weights_only=True)
    model = torch.load(trained / "models" / "model.pt", weights_only=True)
    for m in ("np_signal", "vessel", "nuclei"):
        sf = float(ae[f"{m}.scale_factor"])
        assert sf > 0 and abs(sf - 1.0) > 1e-6  # computed once from the training latents
        assert float(model[f"autoencoders.{m}.scale_factor"]) == pytest.approx(sf)
    assert any(k.startswith("denoiser.") for k in model)
    results = json.loads((trained / "eval" / "evaluation.json").read_text())
    methods = results["methods"]
    for name in ("autoencoder_ceiling", "damm", "uni", "multi", "damm_mean2"):
        for subset in ("all", "consistent", "divergent"):
            assert np.isfinite(methods[name][subset]["psnr"]), (name, subset)
    assert 0.0 <= methods["damm"]["gated_multi_fraction"]["all"] <= 1.0
    table = (trained / "eval" / "evaluation.md").read_text()
    assert "| damm |" in table and "autoencoder_ceiling" in table
    montage = Image.open(trained / "eval" / "montage.png")
    assert montage.size[0] > 6 * 32 and montage.size[1] > 2 * 32
    assert (trained / "eval" / "tensorboard" / "diffusion").is_dir()


def test_rerun_skips_finished_stages(trained, tiny_data):
    before = {p: p.stat().st_mtime_ns for p in (trained / "models").glob("*.pt")}
    for run_id in ("train_autoencoder", "train_diffusion"):
        _run(_workflow(TRAIN, trained, tiny_data, run_id=run_id))
    after = {p: p.stat().st_mtime_ns for p in (trained / "models").glob("*.pt")}
    assert before == after


def test_finished_stage_from_other_configuration_fails_clearly(trained, tiny_data):
    wf = _workflow(TRAIN, trained, tiny_data, run_id="train_diffusion", dm_channels=[16, 16, 16, 16])
    with pytest.raises(RuntimeError) as err:
        _run(wf)
    assert "does not match the configured" in str(err.value.__cause__)


class _Interrupted(Exception):
    pass


def _interrupt_at(wf: ConfigWorkflow, trainer_id: str, iteration: int) -> None:
    trainer = wf.parser.get_parsed_content(trainer_id)

    def _stop(engine):
        raise _Interrupted("simulated interruption")

    trainer.add_event_handler(Events.ITERATION_STARTED(once=iteration), _stop)


def test_resume_after_interruption(tmp_path, tiny_data):
    root = tmp_path / "bundle"
    for run_id, trainer_id, budget_key, ckpt in (
        ("train_autoencoder", "autoencoder::trainer", "ae_iterations", "autoencoder_checkpoints"),
        ("train_diffusion", "train::trainer", "dm_iterations", "diffusion_checkpoints"),
    ):
        extra = {budget_key: 8}  # two epochs of the tiny split (4 iterations each)
        wf = _workflow(TRAIN, root, tiny_data, run_id=run_id, **extra)
        wf.initialize()
        epoch_length = wf.parser.get_parsed_content(trainer_id).state.epoch_length
        _interrupt_at(wf, trainer_id, epoch_length + 1)  # during the second epoch
        with pytest.raises(RuntimeError):
            wf.run()
        assert (root / "models" / ckpt / "checkpoint_epoch=1.pt").is_file()
        wf = _workflow(TRAIN, root, tiny_data, run_id=run_id, **extra)
        wf.initialize()
        trainer = wf.parser.get_parsed_content(trainer_id)
        started: list[int] = []
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e, seen=started: seen.append(e.state.epoch))
        wf.run()
        assert started == [2]  # epoch 1 restored from the checkpoint, only epoch 2 trained
        assert trainer.state.iteration == 2 * epoch_length
    assert (root / "models" / "model.pt").is_file()


def test_datalist_without_configured_modality_fails_early(tmp_path, tiny_data):
    datalist = json.loads((tiny_data / "datalist.json").read_text())
    for item in datalist["training"]:
        item.pop("nuclei")
        for k in ("np_signal", "vessel"):
            item[k] = str(tiny_data / item[k])
    bad = tmp_path / "bad_datalist.json"
    bad.write_text(json.dumps(datalist))
    wf = _workflow(TRAIN, tmp_path / "bundle", tiny_data, datalist=str(bad))
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    message = str(err.value.__cause__)
    assert "nuclei" in message and "bad_datalist.json" in message
    assert not (tmp_path / "bundle" / "models").exists()


def test_inference_workflow_properties_and_geometry(trained, tiny_data, tmp_path):
    """`inference` through ConfigWorkflow (properties) and a subprocess from a foreign working directory."""
    wf = ConfigWorkflow(
        config_file=INFER,
        meta_file=META,
        logging_file=LOGGING,
        workflow_type="infer",
        bundle_root=str(trained),
        dataset_dir=str(tiny_data),
        **NET,
    )
    wf.initialize()
    assert wf.check_properties() == []
    out = tmp_path / "out"
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    args = ["--bundle_root", str(trained), "--dataset_dir", str(tiny_data), "--output_dir", str(out)]
    args += ["--num_inference_steps", "3", "--num_samples", "2", "--progress", "False", "--max_items", "2"]
    for k, v in NET.items():
        args += [f"--{k}", json.dumps(v)]
    config = "[" + ",".join(f"'{c}'" for c in INFER) + "]"  # the CLI's list syntax: merged in order
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", config]
    cmd += ["--meta_file", META, "--logging_file", LOGGING, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=foreign, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sidecars = sorted(out.glob("*_np_signal.json"))
    assert len(sidecars) == 2
    for sidecar in sidecars:
        meta = json.loads(sidecar.read_text())
        ref = np.asarray(Image.open(meta["reference_geometry"]))
        pred = np.asarray(Image.open(out / meta["outputs"]["prediction"]))
        assert pred.shape == ref.shape and pred.dtype == ref.dtype  # 16-bit PNG like the input
        import tifffile

        conf = tifffile.imread(out / meta["outputs"]["confidence"])
        assert conf.shape == ref.shape and conf.min() >= 0.0 and conf.max() <= 1.0
        assert meta["sampling"]["num_inference_steps"] == 3 and meta["sampling"]["num_samples"] == 2
        assert len(meta["branch_statistics"]["steps_first_sample"]) == 3
    assert not list(foreign.iterdir())  # nothing written into the working directory


def test_evaluate_overlay_compares_ddim_with_ddpm(trained, tiny_data):
    wf = _workflow([*TRAIN, str(CONFIGS / "evaluate.json")], trained, tiny_data, run_id="evaluating", eval_ddpm_items=1)
    _run(wf)
    results = json.loads((trained / "eval" / "evaluate" / "evaluation.json").read_text())
    assert "damm_ddpm-1000_subset" in results["methods"] and "damm_ddim-3_subset" in results["methods"]


def test_ddp_overlay_with_two_gloo_processes(tmp_path, tiny_data):
    root = tmp_path / "ddp"
    args = ["--bundle_root", str(root), "--dataset_dir", str(tiny_data)]
    for k, v in TINY.items():
        args += [f"--{k}", json.dumps(v)]
    tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    if HAS_MLFLOW:  # MLflow tracking under torchrun: one run per stage, written by rank 0 only
        args += ["--tracking", str(CONFIGS / "mlflow.json"), "--tracking_uri", tracking_uri]
    config = "[" + ",".join(f"'{c}'" for c in [*TRAIN, str(CONFIGS / "multi_gpu_train.json")]) + "]"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["-m", "monai.bundle", "run", "training", "--config_file", config, "--meta_file", META]
    cmd += ["--logging_file", LOGGING, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert (root / "models" / "model.pt").is_file()
    assert (root / "eval" / "evaluation.json").is_file()
    # rank-0 logging only: one progress/stat line per logged iteration, not two
    assert proc.stdout.count("| damm |") == 1
    # rank-0 writing only: every TensorBoard event file of a stage comes from one process (rank 1 used to add
    # empty ones); the file name is events.out.tfevents.<time>.<host>.<pid>.<n>
    for stage in ("autoencoder", "diffusion"):
        files = list((root / "eval" / "tensorboard" / stage).glob("events.out.tfevents.*"))
        assert files and len({f.name.split(".")[-2] for f in files}) == 1, (stage, files)
    if HAS_MLFLOW:
        import mlflow

        client = mlflow.tracking.MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name("damm")
        names = sorted(r.info.run_name for r in client.search_runs([experiment.experiment_id]))
        assert names == ["evaluation", "stage1_autoencoder", "stage2_diffusion"]
