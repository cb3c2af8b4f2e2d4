"""SSL objectives (losses.py): NT-Xent and VICReg against naive loop references, the cross-modal-negatives
composition, and the objective registry end to end."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import OBJECTIVES, LossConfig, nt_xent, nt_xent_objective, vicreg
from settings import ConfigError


def nt_xent_loop(z1, z2, tau):
    """Naive NT-Xent straight from SimCLR eq. 1: l(i, j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t)."""
    z = torch.cat([z1, z2]).double()
    n = len(z)
    B = len(z1)
    total = 0.0
    for i in range(n):
        j = (i + B) % n
        denom = sum(torch.exp(F.cosine_similarity(z[i], z[k], dim=0) / tau) for k in range(n) if k != i)
        total += -torch.log(torch.exp(F.cosine_similarity(z[i], z[j], dim=0) / tau) / denom)
    return total / n


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_naive_loop(tau):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert torch.allclose(nt_xent(z1, z2, tau).double(), nt_xent_loop(z1, z2, tau), atol=1e-5)


def test_nt_xent_per_row_and_perfect_views():
    z = torch.eye(4)
    rows = nt_xent(z, z.clone(), 0.1, reduction="none")
    assert rows.shape == (8,)
    # identical views of orthogonal instances: positive similarity 1, negatives 0 (and one other copy at 1)
    expected = -torch.log(torch.exp(torch.tensor(10.0)) / (torch.exp(torch.tensor(10.0)) + 6))
    assert torch.allclose(rows, expected.expand(8), atol=1e-5)


def test_nt_xent_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="one shape"):
        nt_xent(torch.randn(3, 4), torch.randn(2, 4))


def vicreg_loop(z1, z2, lam, mu, nu, eps=1e-4):
    """VICReg term by term with Python loops over dimensions, in float64."""
    z1, z2 = z1.double(), z2.double()
    B, D = z1.shape
    inv = sum((z1[i, d] - z2[i, d]) ** 2 for i in range(B) for d in range(D)) / (B * D)
    var = cov = 0.0
    for z in (z1, z2):
        mean = [sum(z[i, d] for i in range(B)) / B for d in range(D)]
        c = [[sum((z[i, a] - mean[a]) * (z[i, b] - mean[b]) for i in range(B)) / (B - 1) for b in range(D)]
             for a in range(D)]
        var += sum(max(0.0, 1 - math.sqrt(c[d][d] + eps)) for d in range(D)) / D / 2
        cov += sum(c[a][b] ** 2 for a in range(D) for b in range(D) if a != b) / D
    return lam * inv + mu * var + nu * cov


@pytest.mark.parametrize("scale", [0.3, 3.0])   # below and above the variance hinge
def test_vicreg_matches_naive_loop(scale):
    g = torch.Generator().manual_seed(1)
    z1, z2 = scale * torch.randn(6, 5, generator=g), scale * torch.randn(6, 5, generator=g)
    ref = vicreg_loop(z1, z2, 25.0, 25.0, 1.0)
    assert vicreg(z1, z2).item() == pytest.approx(float(ref), rel=1e-5)
    assert vicreg(z1, z2, 2.0, 0.0, 0.0).item() == pytest.approx(2 * float(((z1 - z2) ** 2).mean()), rel=1e-6)


def test_vicreg_variance_term_catches_collapse():
    """A collapsed batch (every row the same) pays the full variance hinge, mu * 1; spread-out views pay none."""
    z = torch.ones(8, 4)
    assert vicreg(z, z.clone(), 25.0, 1.0, 1.0).item() == pytest.approx(1 - math.sqrt(1e-4), abs=1e-6)
    g = torch.Generator().manual_seed(0)
    wide = 10 * torch.randn(64, 4, generator=g)
    assert vicreg(wide, wide.clone(), 25.0, 1.0, 0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_cross_modal_negatives_is_one_nt_xent_over_both_modalities():
    g = torch.Generator().manual_seed(2)
    e = {"image": (torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)),
         "audio": (torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g))}
    cfg = LossConfig(tau=0.5)
    within = nt_xent_objective(e, cfg)
    assert within["image"].item() == pytest.approx(nt_xent(*e["image"], 0.5).item())
    cross = nt_xent_objective(e, cfg, cross_modal_negatives=True)
    rows = nt_xent(torch.cat([e["image"][0], e["audio"][0]]), torch.cat([e["image"][1], e["audio"][1]]), 0.5,
                   reduction="none")  # rows 0-3 image view 1, 4-6 audio view 1, 7-10 image view 2, 11-13 audio view 2
    assert cross["image"].item() == pytest.approx(torch.cat([rows[0:4], rows[7:11]]).mean().item())
    assert cross["audio"].item() == pytest.approx(torch.cat([rows[4:7], rows[11:14]]).mean().item())
    assert cross["image"].item() > within["image"].item()  # more negatives, same positives


def test_objective_registry_and_its_config_errors():
    assert set(OBJECTIVES) == {"nt_xent", "vicreg"}
    assert OBJECTIVES["nt_xent"].cross_modal_negatives and not OBJECTIVES["vicreg"].cross_modal_negatives
    with pytest.raises(ConfigError, match=r"loss.name='simsiam': expected one of nt_xent, vicreg"):
        LossConfig(name="simsiam")
    from engine import PretrainConfig
    from federation import FedConfig
    with pytest.raises(ConfigError, match=r"cross_modal_negatives=true means nothing to loss.name=vicreg"):
        PretrainConfig(loss=LossConfig(name="vicreg"), fed=FedConfig(order="sum", cross_modal_negatives=True))
