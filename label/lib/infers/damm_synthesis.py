"""DAMM synthesis as a MONAI Label infer task (type ``others``): the study's condition modalities -> the target.

Two kinds of bundle config are served, told apart by what the merged config defines:

- **tiles** (``common.json`` + ``inference.json`` [+ overlays]): the bundle's ``evaluator`` runs on a one-item
  ``dataset#data``; its ``SynthesisWriter`` writes the prediction in the input's format, size and dtype (PNG /
  TIFF; NIfTI on the input grid) and the JSON sidecar.
- **subjects** (``common.json`` + ``train.json`` + ``task_brats.json``): the overlay's ``task#inference`` runs on
  one subject folder (``infer_input_dirs``) and writes the target as NIfTI on the input's grid (affine kept) with
  its sidecar.

The response file is the synthesised modality; the JSON result carries the sidecar (branch routing, sampler,
steps, seed) and ``synthetic: true``. Request parameters: ``sampler`` (ddim / ddpm / pndm / dpm_solver),
``steps``, ``seed``, ``num_samples``, ``branch`` (damm / uni / multi). The loaded network is built once and reused
by every request.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from lib.bundle import BundleConfig
from lib.infers.common import ClientError, LabelInferTask, int_param, timed
from lib.studies import find_modalities, safe_name, stem_and_suffix

__all__ = ["DAMMSynthesis"]

logger = logging.getLogger(__name__)

SAMPLERS = ("ddim", "ddpm", "pndm", "dpm_solver")  # damm.schedulers.SAMPLERS
BRANCHES = ("damm", "uni", "multi")
MAX_SAMPLES = 16


class DAMMSynthesis(LabelInferTask):
    """Synthesise the bundle's ``target`` from its ``conditions``.

    Args:
        bundle: the merged bundle configs (:class:`lib.bundle.BundleConfig`).
        description: shown in ``/info/``.
        preload: build the network now rather than at the first request.
    """

    def __init__(self, bundle: BundleConfig, description: str = "", preload: bool = False) -> None:
        self.bundle = bundle
        parser = bundle.parser()
        self.target = str(parser.get_parsed_content("target"))
        self.conditions = [str(c) for c in parser.get_parsed_content("conditions")]
        self.spatial_dims = int(parser.get_parsed_content("spatial_dims"))
        self.num_train_timesteps = int(parser.get_parsed_content("num_train_timesteps"))
        self.mode = "subjects" if bundle.has("infer_input_dirs") and bundle.has("task#inference") else "tiles"
        self.network_key = "task#inference#model" if self.mode == "subjects" else "network"
        self.volumes = self.spatial_dims == 3 or self.mode == "subjects"
        self.defaults = defaults = {
            "sampler": str(parser.get_parsed_content("sampler")),
            "steps": int(parser.get_parsed_content("num_inference_steps")),
            "seed": int(parser.get_parsed_content("seed")),
            "num_samples": int(parser.get_parsed_content("num_samples")),
            "branch": str(parser.get_parsed_content("branch")),
        }
        super().__init__(
            labels={self.target: 1},
            dimension=3 if self.volumes else 2,
            description=description
            or f"DAMM-Diffusion: synthesise {self.target} from {', '.join(self.conditions)} "
            f"({'whole subjects, NIfTI on the input grid' if self.mode == 'subjects' else 'tiles'})",
            config={**defaults, "samplers": list(SAMPLERS), "branches": list(BRANCHES)},
        )
        if preload:
            self.bundle.cache(self.network_key)

    # ------------------------------------------------------------------------------------------ request handling
    def settings(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request's sampling settings (400 for a bad value, naming the parameter)."""
        sampler = str(request.get("sampler", self.defaults["sampler"])).lower()
        if sampler not in SAMPLERS:
            raise ClientError(f"parameter 'sampler' must be one of {list(SAMPLERS)}, got {sampler!r}", 400)
        branch = str(request.get("branch", self.defaults["branch"])).lower()
        if branch not in BRANCHES:
            raise ClientError(f"parameter 'branch' must be one of {list(BRANCHES)}, got {branch!r}", 400)
        steps_default = self.num_train_timesteps if sampler == "ddpm" else self.defaults["steps"]
        return {
            "sampler": sampler,
            "num_inference_steps": int_param(request, "steps", steps_default, 1, self.num_train_timesteps),
            "seed": int_param(request, "seed", self.defaults["seed"], 0, 2**31 - 1),
            "num_samples": int_param(request, "num_samples", self.defaults["num_samples"], 1, MAX_SAMPLES),
            "branch": branch,
            "progress": False,
        }

    def run(self, request: dict[str, Any], work_dir: Path) -> tuple[Path, dict[str, Any]]:
        settings = self.settings(request)
        image = Path(str(request.get("image") or ""))
        files = find_modalities(image, self.conditions, 3 if self.volumes else 2, work_dir / "channels")
        self.bundle.cache(self.network_key)
        out_dir = work_dir / "out"
        run = self._subject if self.mode == "subjects" else self._tile
        (prediction, sidecar), seconds = timed(lambda: run(image, files, settings, work_dir, out_dir))
        result = {
            "model": request.get("model"),
            "synthetic": True,
            "target": self.target,
            "inputs": {k: p.name for k, p in files.items()},
            **{k: v for k, v in settings.items() if k != "progress"},
            "steps": settings["num_inference_steps"],
            "seconds": round(seconds, 4),
            "sidecar": sidecar,
        }
        return prediction, result

    def _tile(self, image: Path, files: dict[str, Path], settings: dict, work_dir: Path, out_dir: Path):
        """The bundle's ``evaluator`` on one item; the output in the input's format."""
        sample_id = safe_name(stem_and_suffix(image)[0])
        item = {**{k: str(p) for k, p in files.items()}, "id": sample_id}
        parser = self.bundle.parser({**settings, "dataset#data": [item], "output_dir": str(out_dir)})
        if parser.get("initialize"):
            parser.get_parsed_content("initialize")
        parser.get_parsed_content("evaluator").run()
        sidecar_path = out_dir / f"{sample_id}_{self.target}.json"
        sidecar = json.loads(sidecar_path.read_text())
        return out_dir / sidecar["outputs"]["prediction"], sidecar

    def _subject(self, image: Path, files: dict[str, Path], settings: dict, work_dir: Path, out_dir: Path):
        """The task overlay's ``task#inference`` on one subject folder; NIfTI on the input grid."""
        subject = safe_name(stem_and_suffix(image)[0])
        folder = work_dir / "subjects" / subject
        folder.mkdir(parents=True)
        for key, path in files.items():  # the plain BraTS naming (t1.nii.gz, t2.nii.gz, ...), links to the study
            os.symlink(Path(path).resolve(), folder / f"{key}{stem_and_suffix(path)[1]}")
        parser = self.bundle.parser(
            {
                **settings,
                "infer_input_dirs": [str(folder)],
                "infer_output_dir": str(out_dir),
                "overwrite": True,
            }
        )
        import monai

        # the overlay's `initialize` also checks the training data folder, which serving does not need; its
        # determinism step is the one that matters here
        monai.utils.set_determinism(seed=settings["seed"])
        written = parser.get_parsed_content("task#inference").run()
        if not written:
            raise RuntimeError(f"task inference wrote nothing for {image.name}")
        prediction = Path(written[0])
        sidecars = sorted(prediction.parent.glob("*.json"))
        sidecar = json.loads(sidecars[0].read_text()) if sidecars else {}
        return prediction, sidecar
