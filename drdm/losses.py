"""DRDM training loss (spec drdm.md §2.3): relative distance + angle + regulariser.

With ``ũ = û∘(id + ψ_t)`` (the prediction resampled along the step field), an exact inverse gives
``ũ = -ψ_t``. The data terms are computed in **image-fraction units** (channel ``i`` divided by ``S_i``) so the
official epsilons and the L1 allowance keep their meaning for any image size:

- ``L_dist = mean ||ũ + ψ||² / (||ψ||² + eps_dist)`` (0 for an exact inverse),
- ``L_ang = mean <ũ, ψ> / sqrt(||ũ||² ||ψ||² + eps_ang)`` (-1 for an exact inverse),
- ``L_reg = (1/d) Σ_i mean ReLU(|Δ_i û| - allowance)`` (forward differences, L1 part) plus, unless
  ``reg="l1"`` (the official behaviour, whose "negdetj" term is a no-op), ``negjac_weight · mean ReLU(-det(I + ∇û))``
  on the voxel field: a true folding penalty.

``total = w_dist L_dist + w_ang L_ang + w_reg L_reg``.

The loss is an fp32 island: it upcasts fp16/bf16 inputs and runs with autocast disabled, whatever the caller's
precision setting.
"""

from __future__ import annotations

import torch
from torch import nn

from ddcore.precision import fp32
from drdm.fields import check_field, jacobian_determinant, warp

__all__ = ["DRDMLoss", "l1_gradient_penalty", "negative_jacobian_penalty"]


def _to_fraction(field: torch.Tensor) -> torch.Tensor:
    d = field.shape[1]
    sizes = torch.as_tensor(field.shape[2:], dtype=field.dtype, device=field.device)
    return field / sizes.view(1, d, *([1] * d))


def l1_gradient_penalty(field: torch.Tensor, allowance: float = 1e-4) -> torch.Tensor:
    """Official L1 term: ``(1/d) Σ_i mean ReLU(|Δ_i u| - allowance)`` with forward differences along axis ``i``.

    Args:
        field: ``[B, d, *S]`` (pass image-fraction units to use the official allowance).
        allowance: free gradient magnitude per voxel.

    Returns:
        Scalar.
    """
    d = check_field(field)
    total = field.new_zeros(())
    for axis in range(d):
        diff = torch.diff(field, dim=2 + axis)
        total = total + torch.relu(diff.abs() - allowance).mean()
    return total / d


def negative_jacobian_penalty(field: torch.Tensor) -> torch.Tensor:
    """True folding penalty ``mean ReLU(-det(I + ∇u))`` on a voxel-unit field.

    Args:
        field: ``[B, d, *S]`` voxels.

    Returns:
        Scalar (0 for any non-folding field, 1 for ``u_0 = -2 x_0``).
    """
    return torch.relu(-jacobian_determinant(field)).mean()


class DRDMLoss(nn.Module):
    """Relative distance + angle + regulariser.

    Args:
        w_dist: weight of the relative distance term (official 1).
        w_ang: weight of the angle (cosine) term (official 1).
        w_reg: weight of the regulariser (official 10).
        reg: ``"l1+negjac"`` (default: L1 gradient + true negative-Jacobian penalty) or ``"l1"`` (official).
        negjac_weight: factor of the negative-Jacobian penalty inside the regulariser (official coefficient 2).
        eps_dist: epsilon of the distance denominator in image-fraction² units (official 1e-7).
        eps_ang: epsilon of the cosine denominator (official 1e-24 in raw units, i.e. negligible).
        l1_allowance: free gradient per voxel in image fractions (official 1e-4).
        padding_mode: padding when resampling ``û`` along ``ψ_t`` (official: zeros for CMR, border for lung).
    """

    def __init__(
        self,
        w_dist: float = 1.0,
        w_ang: float = 1.0,
        w_reg: float = 10.0,
        reg: str = "l1+negjac",
        negjac_weight: float = 2.0,
        eps_dist: float = 1e-7,
        eps_ang: float = 1e-24,
        l1_allowance: float = 1e-4,
        padding_mode: str = "border",
    ) -> None:
        super().__init__()
        if reg not in ("l1", "l1+negjac"):
            raise ValueError(f"reg must be 'l1' (official) or 'l1+negjac', got {reg!r}.")
        self.w_dist, self.w_ang, self.w_reg = float(w_dist), float(w_ang), float(w_reg)
        self.reg = reg
        self.negjac_weight = float(negjac_weight)
        self.eps_dist, self.eps_ang = float(eps_dist), float(eps_ang)
        self.l1_allowance = float(l1_allowance)
        self.padding_mode = padding_mode
        self.last_terms: dict[str, float] = {}

    def terms(self, pred: torch.Tensor, step_field: torch.Tensor) -> dict[str, torch.Tensor]:
        """All loss terms as tensors: ``loss``, ``loss_dist``, ``loss_ang``, ``loss_reg``, ``loss_negjac``.

        Args:
            pred: predicted inverse field ``û`` ``[B, d, *S]`` (voxels).
            step_field: forward step field ``ψ_t`` ``[B, d, *S]`` (voxels).

        Returns:
            Dict of scalar float32 (or float64) tensors.
        """
        check_field(pred, "pred")
        check_field(step_field, "step_field", pred.shape[2:])
        low = (torch.float16, torch.bfloat16)
        pred = pred.float() if pred.dtype in low else pred
        step_field = step_field.float() if step_field.dtype in low else step_field
        with fp32(pred.device):
            return self._terms(pred, step_field)

    def _terms(self, pred: torch.Tensor, step_field: torch.Tensor) -> dict[str, torch.Tensor]:
        resampled = _to_fraction(warp(pred, step_field, "bilinear", self.padding_mode))
        psi = _to_fraction(step_field)
        sq = lambda a: (a * a).sum(1)  # noqa: E731
        dist = (sq(resampled + psi) / (sq(psi) + self.eps_dist)).mean()
        ang = ((resampled * psi).sum(1) / torch.sqrt(sq(resampled) * sq(psi) + self.eps_ang)).mean()
        l1 = l1_gradient_penalty(_to_fraction(pred), self.l1_allowance)
        if self.reg == "l1+negjac":
            negjac = negative_jacobian_penalty(pred)
            reg = l1 + self.negjac_weight * negjac
        else:  # official: the folding term is logged but does not act
            with torch.no_grad():
                negjac = negative_jacobian_penalty(pred)
            reg = l1
        total = self.w_dist * dist + self.w_ang * ang + self.w_reg * reg
        return {"loss": total, "loss_dist": dist, "loss_ang": ang, "loss_reg": reg, "loss_negjac": negjac}

    def forward(self, pred: torch.Tensor, step_field: torch.Tensor) -> torch.Tensor:
        """Total loss (the terms of the last call are kept in ``last_terms`` as floats for logging)."""
        out = self.terms(pred, step_field)
        self.last_terms = {k: float(v.detach()) for k, v in out.items()}
        return out["loss"]
