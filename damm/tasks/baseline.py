"""Deterministic baseline: a MONAI ``UNet`` trained by L1 regression from the same condition images.

It sees exactly the training slices / tiles the diffusion model sees (conditions stacked along the channels,
anchor first, all in ``[-1, 1]``) and predicts the target in one forward pass. Training is bounded by a number of
iterations and/or a wall-clock budget, so it can be given the same budget as DAMM-Diffusion's two stages.
:class:`UNetPredictor` has the predictor interface of :mod:`damm.tasks.common` (``[B, n_cond, H, W] -> [B, 1, H,
W]``), so whole-volume and whole-field inference run it exactly like the diffusion model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import nn

from ddcore.atomic import atomic_torch_save

__all__ = [
    "UNetPredictor",
    "baseline_predictors",
    "build_baseline",
    "load_baseline",
    "save_baseline",
    "snapshot_path",
    "stack_items",
    "train_baseline",
    "train_baseline_stage",
]

logger = logging.getLogger(__name__)

#: seconds between two progress lines of :func:`train_baseline` (the other stages show a bar or log per epoch).
PROGRESS_EVERY_S = 20.0


def build_baseline(
    in_channels: int,
    out_channels: int = 1,
    spatial_dims: int = 2,
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 2,
    norm: str = "instance",
) -> UNet:
    """The baseline network (MONAI ``UNet``).

    Args:
        in_channels: number of condition modalities.
        out_channels: target channels.
        spatial_dims: 2.
        channels: features per level.
        strides: downsampling per level (input sizes must be divisible by their product).
        num_res_units: residual units per block.
        norm: MONAI norm name.

    Returns:
        The ``UNet``.
    """
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        channels=tuple(int(c) for c in channels),
        strides=tuple(int(s) for s in strides),
        num_res_units=int(num_res_units),
        norm=norm,
    )


def stack_items(
    items: Sequence[Mapping[str, Any]], conditions: Sequence[str], target: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack in-memory items into ``(x [N, n_cond, H, W], y [N, 1, H, W])``.

    Args:
        items: dicts with ``[1, H, W]`` tensors per modality.
        conditions: condition keys (anchor first).
        target: target key.

    Returns:
        ``(x, y)`` float32 tensors.

    Raises:
        ValueError: no items or a missing key.
    """
    if not items:
        raise ValueError("stack_items: no training items")
    missing = [k for k in [target, *conditions] if k not in items[0]]
    if missing:
        raise ValueError(f"stack_items: items lack {missing}; keys {sorted(items[0])}")
    x = torch.stack([torch.cat([torch.as_tensor(it[k]).float() for k in conditions]) for it in items])
    y = torch.stack([torch.as_tensor(it[target]).float() for it in items])
    return x, y


def train_baseline(
    net: nn.Module,
    items: Sequence[Mapping[str, Any]],
    conditions: Sequence[str],
    target: str,
    max_iterations: int | None = 1000,
    time_budget_s: float | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    snapshot_at: Sequence[int] = (),
    on_snapshot: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """Train ``net`` by L1 regression (Adam), for ``max_iterations`` or until ``time_budget_s`` is spent.

    Args:
        net: the baseline network.
        items: training items (see :func:`stack_items`).
        conditions: condition keys.
        target: target key.
        max_iterations: iteration cap (``None``: only the time budget).
        time_budget_s: wall-clock cap (``None``: only the iteration cap).
        batch_size: batch size (shuffled with a seeded generator, last partial batch dropped).
        lr: Adam learning rate.
        seed: seed of the initialisation-independent shuffling.
        device: training device.
        snapshot_at: iterations after which ``on_snapshot(iteration)`` is called (e.g. to save the network at
            25 % and 50 % of the budget).
        on_snapshot: the snapshot callback.

    Returns:
        ``{"iterations", "seconds", "final_loss"}`` (loss averaged over the last 20 iterations).

    Raises:
        ValueError: neither cap given.
    """
    if max_iterations is None and (time_budget_s is None or time_budget_s <= 0):
        raise ValueError("train_baseline: give max_iterations or a positive time_budget_s")
    x, y = stack_items(items, conditions, target)
    device = torch.device(device)
    net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    bs = min(int(batch_size), x.shape[0])
    it, losses = 0, []
    t0 = last_log = time.perf_counter()
    cap = " / ".join(
        ([f"{int(max_iterations)} iterations"] if max_iterations is not None else [])
        + ([f"{float(time_budget_s):.0f} s"] if time_budget_s else [])
    )
    logger.info(f"UNet baseline: training on {x.shape[0]} items, batch {bs}, until {cap}")
    while True:
        order = torch.randperm(x.shape[0], generator=gen)
        for s in range(0, x.shape[0] - bs + 1, bs):
            idx = order[s : s + bs]
            xb, yb = x[idx].to(device), y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = F.l1_loss(net(xb), yb)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            it += 1
            if on_snapshot is not None and it in snapshot_at:
                net.eval()
                on_snapshot(it)
                net.train()
            if time.perf_counter() - last_log >= PROGRESS_EVERY_S:
                last_log = time.perf_counter()
                recent = losses[-20:]
                logger.info(
                    f"UNet baseline: iteration {it}, {last_log - t0:.0f} s of {cap}, L1 {sum(recent) / len(recent):.4f}"
                )
            done_it = max_iterations is not None and it >= int(max_iterations)
            done_t = time_budget_s is not None and time_budget_s > 0 and time.perf_counter() - t0 >= time_budget_s
            if done_it or done_t:
                net.eval()
                secs = time.perf_counter() - t0
                logger.info(
                    f"UNet baseline: {it} iterations in {secs:.1f} s, L1 {sum(losses[-20:]) / len(losses[-20:]):.4f}"
                )
                return {"iterations": it, "seconds": secs, "final_loss": sum(losses[-20:]) / len(losses[-20:])}


def save_baseline(net: nn.Module, path: str | Path) -> Path:
    """Write the baseline's state dict atomically (plain tensors).

    Args:
        net: the trained network.
        path: destination.

    Returns:
        ``path``.
    """
    return atomic_torch_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, path)


def load_baseline(net: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict written by :func:`save_baseline`.

    Args:
        net: a network built with the same settings.
        path: checkpoint.

    Returns:
        ``net`` in eval mode.

    Raises:
        FileNotFoundError: missing checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"baseline checkpoint '{path}' not found")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


class UNetPredictor:
    """Predictor interface for the baseline: ``[B, n_cond, H, W] -> [B, 1, H, W]`` clamped to ``[-1, 1]``.

    Args:
        net: the trained UNet.
        batch_size: images per forward pass.
    """

    def __init__(self, net: nn.Module, batch_size: int = 32) -> None:
        self.net = net
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Predict.

        Args:
            x: stacked conditions.

        Returns:
            The prediction on ``x``'s device.
        """
        self.net.eval()
        device = next(self.net.parameters()).device
        outs = [
            self.net(x[s : s + self.batch_size].to(device).float()).clamp(-1.0, 1.0)
            for s in range(0, x.shape[0], self.batch_size)
        ]
        return torch.cat(outs).to(x.device)


def train_baseline_stage(
    items: Sequence[Mapping[str, Any]],
    conditions: Sequence[str],
    target: str,
    path: str | Path,
    retrain: bool = False,
    max_iterations: int | None = 1000,
    time_budget_s: float | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    snapshot_fractions: Sequence[float] = (),
    **net_kwargs: Any,
) -> Path:
    """Bundle run id ``train_baseline``: train the UNet on the task's training items and save it (skip if done).

    Args:
        items: training items.
        conditions: condition keys.
        target: target key.
        path: checkpoint destination (``models/baseline_unet.pt``).
        retrain: train even if ``path`` exists.
        max_iterations: iteration cap.
        time_budget_s: wall-clock cap.
        batch_size: batch size.
        lr: learning rate.
        seed: seed (initialisation and shuffling).
        device: device.
        snapshot_fractions: also save the network at these fractions of ``max_iterations``
            (:func:`snapshot_path`, for quality-against-iterations curves).
        **net_kwargs: :func:`build_baseline` arguments.

    Returns:
        ``path``.
    """
    path = Path(path)
    if path.is_file() and not retrain:
        logger.info(f"UNet baseline: {path} exists; skipping (set retrain to train again)")
        return path
    torch.manual_seed(int(seed))
    net = build_baseline(len(conditions), **net_kwargs)
    at = [round(float(f) * int(max_iterations)) for f in snapshot_fractions] if max_iterations else []
    stats = train_baseline(
        net, items, conditions, target, max_iterations, time_budget_s, batch_size, lr, seed, device,
        snapshot_at=[a for a in at if a > 0],
        on_snapshot=lambda it: save_baseline(net, snapshot_path(path, it)),
    )  # fmt: skip
    save_baseline(net, path)
    from damm.stages import record_training_time

    record_training_time(path.parent, "UNet baseline", stats["seconds"], stats["iterations"])
    logger.info(f"UNet baseline written to {path}: {stats}")
    return path


def snapshot_path(path: str | Path, iteration: int) -> Path:
    """Where the baseline's snapshot at ``iteration`` lies: ``<stem>_iteration=<n>.pt`` beside ``path``.

    Args:
        path: the final baseline checkpoint.
        iteration: the snapshot's iteration.

    Returns:
        The path.
    """
    path = Path(path)
    return path.with_name(f"{path.stem}_iteration={int(iteration)}{path.suffix}")


def baseline_predictors(
    path: str | Path | None, in_channels: int, batch_size: int = 32, **net_kwargs: Any
) -> dict[str, UNetPredictor]:
    """``{"unet_baseline": predictor}`` when a trained baseline exists at ``path``, else ``{}``.

    Args:
        path: checkpoint.
        in_channels: number of conditions.
        batch_size: images per forward pass.
        **net_kwargs: :func:`build_baseline` arguments (must match training).

    Returns:
        The predictors to evaluate beside DAMM.
    """
    if path is None or not Path(path).is_file():
        return {}
    net = load_baseline(build_baseline(in_channels, **net_kwargs), path)
    return {"unet_baseline": UNetPredictor(net, batch_size)}
