"""Self-supervised objectives, one free function each in the paper's symbols, and OBJECTIVES, the registry that
`loss.name` picks from. An objective takes the embeddings of both views of each modality of one local step and
returns one loss per modality (the local update sums them). A new objective is one function and one entry.

    nt_xent  SimCLR's NT-Xent (Chen et al. 2020), the paper's; optionally with cross-modal negatives
    vicreg   VICReg (Bardes et al. 2022): invariance + variance + covariance, no negatives
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from settings import ConfigError, check_choice, check_range


@dataclass
class LossConfig:
    name: str = "nt_xent"       # an OBJECTIVES key: nt_xent | vicreg
    tau: float = 0.2            # NT-Xent temperature
    vicreg_sim: float = 25.0    # VICReg lambda: weight of the invariance (MSE between views) term
    vicreg_var: float = 25.0    # VICReg mu: weight of the variance (hinge on each dimension's std) term
    vicreg_cov: float = 1.0     # VICReg nu: weight of the covariance (off-diagonal) term

    def __post_init__(self):
        check_choice("loss.name", self.name, tuple(OBJECTIVES))
        check_range("loss.tau", self.tau, lo=0.01, hi=100.0)  # below 0.01 the logits overflow bf16 and the run blows up
        for k in ("vicreg_sim", "vicreg_var", "vicreg_cov"):
            check_range(f"loss.{k}", getattr(self, k), lo=0.0, hi=1e4)
        check_objective(self)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.2, reduction: str = "mean") -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1) over 2B embeddings: row i's positive is the other view
    of instance i, its negatives the other 2B-2 rows. Computed in fp32 whatever the autocast dtype.
    z1, z2: (B, D). Returns a scalar, or (2B,) per-row losses with reduction='none'."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent expects two (B, D) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    B = z1.shape[0]
    if B < 2:
        raise ValueError("nt_xent needs at least 2 instances (negatives) per batch")
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    sim = z @ z.t() / tau  # (2B, 2B)
    sim.fill_diagonal_(float("-inf"))
    target = (torch.arange(2 * B, device=z.device) + B) % (2 * B)  # row i's positive; built per call, on the device
    return F.cross_entropy(sim, target, reduction=reduction)


def vicreg(z1: torch.Tensor, z2: torch.Tensor, lam: float = 25.0, mu: float = 25.0, nu: float = 1.0,
           eps: float = 1e-4) -> torch.Tensor:
    """VICReg (Bardes et al. 2022, eq. 6), following the authors' code: lam * MSE(z1, z2) + mu * the mean hinge
    max(0, 1 - std) over dimensions (averaged over the two branches) + nu * the squared off-diagonal covariance
    summed and divided by D (summed over the branches). In fp32. z1, z2: (B, D), B >= 2."""
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"vicreg expects two (B, D) tensors of one shape with B >= 2, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    z1, z2 = z1.float(), z2.float()
    B, D = z1.shape
    invariance = F.mse_loss(z1, z2)
    variance, covariance = 0.0, 0.0
    for z in (z1, z2):
        z = z - z.mean(dim=0)
        variance = variance + F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean() / 2
        cov = z.t() @ z / (B - 1)  # (D, D)
        covariance = covariance + (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / D
    return lam * invariance + mu * variance + nu * covariance


def nt_xent_objective(embeds: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: LossConfig,
                      cross_modal_negatives: bool = False) -> dict[str, torch.Tensor]:
    """NT-Xent inside each modality's batch; with cross_modal_negatives and several modalities in the step, one
    NT-Xent over their concatenation (positives stay within an instance, every other row of either modality is a
    negative), each modality's rows averaged, so the loss keeps the default's scale and only the negatives change."""
    mods = list(embeds)
    if not (cross_modal_negatives and len(mods) > 1):
        return {m: nt_xent(*embeds[m], cfg.tau) for m in mods}
    z1 = torch.cat([embeds[m][0] for m in mods])
    z2 = torch.cat([embeds[m][1] for m in mods])
    rows = nt_xent(z1, z2, cfg.tau, reduction="none")
    sizes = [len(embeds[m][0]) for m in mods]
    per_mod: dict[str, list] = {}
    for half in rows.chunk(2):
        for m, part in zip(mods, half.split(sizes)):
            per_mod.setdefault(m, []).append(part)
    return {m: torch.cat(p).mean() for m, p in per_mod.items()}


def vicreg_objective(embeds: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: LossConfig,
                     cross_modal_negatives: bool = False) -> dict[str, torch.Tensor]:
    return {m: vicreg(z1, z2, cfg.vicreg_sim, cfg.vicreg_var, cfg.vicreg_cov) for m, (z1, z2) in embeds.items()}


@dataclass(frozen=True)
class Objective:
    loss: Callable                 # ({modality: (z1, z2)}, LossConfig, cross_modal_negatives) -> {modality: loss}
    cross_modal_negatives: bool    # whether fed.cross_modal_negatives means anything to it
    reads: tuple[str, ...] = ()    # the LossConfig fields it uses: setting another one is refused as doing nothing
    weights: tuple[str, ...] = ()  # of those, the weights of its terms: all 0 would train nothing


OBJECTIVES = {"nt_xent": Objective(nt_xent_objective, True, ("tau",)),
              "vicreg": Objective(vicreg_objective, False, ("vicreg_sim", "vicreg_var", "vicreg_cov"),
                                  ("vicreg_sim", "vicreg_var", "vicreg_cov"))}


def check_objective(cfg: LossConfig) -> None:
    """Settings of loss.name's objective that would do nothing: another objective's field set away from its default,
    or every term weighted 0."""
    obj = OBJECTIVES[cfg.name]
    unread = [f.name for f in fields(cfg) if f.name != "name" and f.name not in obj.reads
              and getattr(cfg, f.name) != f.default]
    if unread:
        owner = next((n for n, o in OBJECTIVES.items() if unread[0] in o.reads), "another objective")
        raise ConfigError(f"loss.{unread[0]}={getattr(cfg, unread[0])} acts only under loss.name={owner}, but loss.name="
                          f"{cfg.name}: set loss.name={owner}, or drop loss.{unread[0]}")
    if obj.weights and not any(getattr(cfg, w) for w in obj.weights):
        raise ConfigError(f"loss.{', loss.'.join(obj.weights)} are all 0: loss.name={cfg.name} would train nothing; "
                          f"give at least one term a positive weight")
