"""DRDM augmentation as a MONAI Label infer task (type ``others``): image + its label -> one deformed pair.

The bundle's ``augmenter`` (``drdm_common.json`` + ``drdm_augment.json``) runs on a one-item datalist with
``t_primes = [T']`` and one output. The deformed image and label are written on the input's grid (NIfTI, affine
kept); labels are warped label-safely (the bundle's ``sampler_kwargs#label_mode``), so the output label set is a
subset of the input's.

The response file is the deformed image (``result: "image"``, default) or the deformed label
(``result: "label"``); the JSON result carries the bundle's report (T', displacement statistics, folding, guard
outcome) and, so that one request returns both, the other file as gzip NIfTI in base64 (``label_nii_gz_base64``
or ``image_nii_gz_base64``). Request parameters: ``t_prime``, ``seed``, ``result``. The label is the request's
uploaded ``label``, else the study's datastore label (``final``, else ``original`` tag; see ``main.py``), else none
(the image alone is deformed).
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

from lib.bundle import BundleConfig
from lib.infers.common import ClientError, LabelInferTask, int_param, timed
from lib.studies import StudyError, is_nifti, safe_name, stem_and_suffix

__all__ = ["DRDMAugment"]

logger = logging.getLogger(__name__)

MAX_INLINE_BYTES = 32 * 2**20


class DRDMAugment(LabelInferTask):
    """Deform one image (and its label) with the bundle's recovery network.

    Args:
        bundle: the merged DRDM configs.
        description: shown in ``/info/``.
    """

    def __init__(self, bundle: BundleConfig, description: str = "") -> None:
        self.bundle = bundle
        parser = bundle.parser()
        self.num_timesteps = int(parser.get_parsed_content("num_timesteps"))
        self.spatial_dims = int(parser.get_parsed_content("spatial_dims"))
        t_primes = parser.get_parsed_content("t_primes")
        self.defaults = {"t_prime": int(t_primes[0]), "seed": int(parser.get_parsed_content("seed"))}
        super().__init__(
            labels=None,
            dimension=self.spatial_dims,
            description=description
            or f"DRDM: one topology-preserving deformation of an image and its label ({self.spatial_dims}D, NIfTI)",
            config={**self.defaults, "result": "image", "t_prime_range": [1, self.num_timesteps]},
        )

    def run(self, request: dict[str, Any], work_dir: Path) -> tuple[Path, dict[str, Any]]:
        t_prime = int_param(request, "t_prime", self.defaults["t_prime"], 1, self.num_timesteps)
        seed = int_param(request, "seed", self.defaults["seed"], 0, 2**31 - 1)
        want = str(request.get("result", "image")).lower()
        if want not in ("image", "label"):
            raise ClientError(f"parameter 'result' must be 'image' or 'label', got {want!r}", 400)
        image = Path(str(request.get("image") or ""))
        if not image.is_file():
            raise StudyError(f"study image not found: {image}")
        if not is_nifti(image):
            raise StudyError(f"{image.name}: DRDM augmentation reads NIfTI volumes (.nii/.nii.gz)")
        label = request.get("label")
        label = Path(label) if isinstance(label, (str, Path)) and str(label) else None
        if label is not None and not label.is_file():
            raise StudyError(f"label of {image.name} not found: {label}")
        if want == "label" and label is None:
            raise ClientError(f"result 'label' asked for, but study {image.name} has no label", 422)
        sample_id = safe_name(stem_and_suffix(image)[0])
        item = {"image": str(image), "id": sample_id, **({"label": str(label)} if label else {})}
        out_dir = work_dir / "out"
        parser = self.bundle.parser(
            {
                "datalist": [item],
                "t_primes": [t_prime],
                "outputs_per_level": 1,
                "seed": seed,
                "output_dir": str(out_dir),
            }
        )
        if parser.get("initialize"):
            parser.get_parsed_content("initialize")
        reports, seconds = timed(lambda: parser.get_parsed_content("augmenter").run())
        report = reports[0]
        files = {k: out_dir / v for k, v in report["files"].items()}
        result = {
            "model": request.get("model"),
            "synthetic": True,
            "t_prime": t_prime,
            "seed": seed,
            "source_image": image.name,
            "source_label": label.name if label else None,
            "seconds": round(seconds, 4),
            "report": json.loads(json.dumps(report, default=str)),
        }
        other = "label" if want == "image" else "image"
        if other in files:
            data = files[other].read_bytes()
            if len(data) <= MAX_INLINE_BYTES:
                result[f"{other}_nii_gz_base64"] = base64.b64encode(data).decode("ascii")
            else:
                result[f"{other}_omitted"] = f"{len(data)} bytes; ask again with result={other!r} and the same seed"
        return files[want], result
