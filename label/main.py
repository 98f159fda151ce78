"""MONAI Label app serving the project's bundle: DAMM synthesis and DRDM augmentation (both infer type ``others``).

Start (in the label environment, ``label/setup_env.sh``)::

    monailabel start_server --app label --studies STUDIES --conf models damm_synthesis,drdm_augment

Per model ``NAME`` (all optional):

- ``--conf NAME_bundle DIR``: bundle folder holding ``models/`` (default: the checkout's ``bundle/``);
- ``--conf NAME_configs "a.json,b.json"``: config files in merge order, looked up in ``DIR/configs`` and then in
  the checkout's ``bundle/configs`` (absolute paths allowed); the defaults are below;
- ``--conf NAME_overrides '{"key": value}'``: fixed config overrides (e.g. the network sizes it was trained with);
- ``--conf NAME_kind damm|drdm``: the task (default: ``drdm`` for names starting with ``drdm``, else ``damm``).

``--conf device cpu|cuda:0`` (default ``cpu``), ``--conf preload true`` (build the networks at start-up) and
``--conf torch_threads N`` (intra-op threads; small models run fastest with 1, like ``OMP_NUM_THREADS=1``).
Training through MONAI Label does not fit synthesis; train with ``python -m monai.bundle run`` (no trainers here).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

#: the checkout this app belongs to (``label/`` lies beside ``damm/``, ``drdm/``, ``bundle/``): the bundle configs'
#: ``$import damm`` etc. must import this checkout's packages, whatever else is installed in the label environment
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if CHECKOUT not in sys.path:
    sys.path.insert(0, CHECKOUT)

from fastapi import HTTPException  # noqa: E402
from lib.bundle import REPO_BUNDLE, BundleConfig, config_paths  # noqa: E402
from lib.infers import DAMMSynthesis, DRDMAugment  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_CONFIGS = {
    "damm_synthesis": "common.json,inference.json",
    "damm_brats": "common.json,train.json,task_brats.json",
    "drdm_augment": "drdm_common.json,drdm_augment.json",
}
DEFAULT_MODELS = "damm_synthesis,drdm_augment"


def _true(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


class DAMMDRDMApp(MONAILabelApp):
    """The app: one infer task per name in ``--conf models``."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        meta = json.loads((REPO_BUNDLE / "configs" / "metadata.json").read_text())
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="DAMM-Diffusion and DRDM",
            description="Multi-modal image synthesis (DAMM-Diffusion) and deformation augmentation (DRDM)",
            version=str(meta.get("version", "")),
        )

    def init_infers(self) -> dict[str, InferTask]:
        if self.conf.get("torch_threads"):
            import torch

            torch.set_num_threads(int(self.conf["torch_threads"]))
        names = [n.strip() for n in self.conf.get("models", DEFAULT_MODELS).split(",") if n.strip()]
        device = self.conf.get("device", "cpu")
        preload = _true(self.conf.get("preload", "false"))
        infers: dict[str, InferTask] = {}
        for name in names:
            root = Path(self.conf.get(f"{name}_bundle", str(REPO_BUNDLE)))
            configs = self.conf.get(f"{name}_configs") or DEFAULT_CONFIGS.get(name)
            if not configs:
                raise ValueError(f"model {name!r}: give its config files with --conf {name}_configs a.json,b.json")
            kind = self.conf.get(f"{name}_kind") or ("drdm" if name.startswith("drdm") else "damm")
            files = config_paths(root, configs)
            bundle = BundleConfig(root, files, overrides=self.conf.get(f"{name}_overrides"), device=device)
            logger.info("model %s (%s): bundle %s, configs %s", name, kind, root, [f.name for f in files])
            if kind == "drdm":
                infers[name] = DRDMAugment(bundle)
            elif kind == "damm":
                infers[name] = DAMMSynthesis(bundle, preload=preload)
            else:
                raise ValueError(f"model {name!r}: kind must be 'damm' or 'drdm', got {kind!r}")
        return infers

    def init_strategies(self) -> dict[str, Any]:
        return {}

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """Check the study id (404 naming it) and give DRDM the study's datastore label, then infer."""
        model, image = request.get("model"), request.get("image")
        if model not in self._infers:
            raise HTTPException(404, f"no model {model!r}; this server serves {sorted(self._infers)}")
        store = datastore or self.datastore()
        if isinstance(image, str) and not os.path.exists(image):
            if not image or not store.get_image_uri(image):
                raise HTTPException(404, f"image {image!r} not found in the datastore ({self.studies})")
            if isinstance(self._infers[model], DRDMAugment) and not request.get("label"):
                label = self._datastore_label(store, image)
                if label:
                    request = {**request, "label": label}
        return super().infer(request, datastore)

    @staticmethod
    def _datastore_label(store, image_id: str) -> str | None:
        labels = store.get_labels_by_image_id(image_id)
        for tag in ("final", "original", *labels):
            if tag in labels:
                uri = store.get_label_uri(labels[tag], tag)
                if uri and os.path.exists(uri):
                    return uri
        return None
