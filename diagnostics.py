"""Representation diagnostics logged beside the accuracy monitor at every evaluation round (docs/evaluation.md):
effective rank of the backbone features (Roy & Vetterli 2007), alignment and uniformity of the embeddings (Wang &
Isola 2020), and the modality gap in the shared space (Liang et al. 2022: the distance between the image and audio
embedding centroids, and how well a linear classifier tells the two modalities apart).

Each function takes plain feature tensors, so it can be checked on hand-made features: a collapsed set has effective
rank 1, two identical modalities have zero gap and a modality classifier at chance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import runtime
from data import stratified_subset
from evaluation import linear_probe
from modality_specs import augment
from runtime import autocast


@torch.no_grad()
def effective_rank(h: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of the centred features (N, D): D for isotropic features, 1
    for features on one line. Centring first, so a shared offset (ReLU features all lean one way) is not counted as
    a dimension."""
    h = h.double()
    s = torch.linalg.svdvals(h - h.mean(0, keepdim=True))
    if s.sum() <= 0:
        return 1.0  # every sample the same point: no spread at all, rank 1 by convention (not 0 or NaN)
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> float:
    """Mean ||f(x) - f(x+)||^alpha over positive pairs (two views of one sample), on L2-normalised embeddings:
    0 = views map to the same point; lower is better."""
    z1, z2 = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    return float((z1 - z2).norm(dim=1).pow(alpha).mean())


@torch.no_grad()
def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """log mean exp(-t ||z_i - z_j||^2) over pairs i != j of L2-normalised embeddings: 0 when all collapse to one
    point, about -4 (t=2) when they spread evenly over a high-dimensional sphere; lower is better."""
    z = F.normalize(z.double(), dim=1)
    n = len(z)
    if n < 2:
        raise ValueError("uniformity needs at least two embeddings")
    sq = torch.cdist(z, z).pow(2)
    off = sq[~torch.eye(n, dtype=torch.bool, device=z.device)]
    return float(torch.logsumexp(-t * off, 0) - torch.log(torch.tensor(float(off.numel()), dtype=torch.float64)))


@torch.no_grad()
def centroid_gap(za: torch.Tensor, zb: torch.Tensor) -> float:
    """||mean(za) - mean(zb)|| of L2-normalised embeddings of two modalities (0..2): 0 when they share a centroid."""
    za, zb = F.normalize(za.double(), dim=1), F.normalize(zb.double(), dim=1)
    return float((za.mean(0) - zb.mean(0)).norm())


def modality_separability(ha: torch.Tensor, hb: torch.Tensor, seed: int = 0) -> float:
    """Test accuracy (%) of a linear classifier telling modality a from modality b by their features: it is trained
    on a random half of each set (the first n of each, n the smaller size) and tested on the rest. 50 =
    indistinguishable; 100 = apart. The classifier is the package's linear probe (its L-BFGS closure enables
    gradients itself, so this runs inside representation_metrics' no_grad)."""
    g = torch.Generator().manual_seed(seed)
    n = min(len(ha), len(hb))
    if n < 4:
        raise ValueError("modality_separability needs at least 4 samples of each modality")
    keep = torch.randperm(n, generator=g).to(ha.device)  # one order for both: identical sets give identical halves
    ha, hb = ha[:n][keep], hb[:n][keep]
    half = n // 2
    x_tr, x_te = torch.cat([ha[:half], hb[:half]]), torch.cat([ha[half:], hb[half:]])
    y_tr = torch.cat([torch.zeros(half), torch.ones(half)]).long().to(ha.device)
    y_te = torch.cat([torch.zeros(n - half), torch.ones(n - half)]).long().to(ha.device)
    return linear_probe(x_tr.float(), y_tr, x_te.float(), y_te, 2, seed=seed, wd_grid=(1e-3,), iters=50)["acc"]


@torch.no_grad()
def representation_metrics(model, data: dict, data_cfg, amp: str = "fp32", seed: int = 0, n: int = 1000) -> dict:
    """The diagnostics of one evaluation round, on a seeded, class-stratified `n` of each modality's test split
    (the same samples and views every round of a seed): per modality `erank_M` (backbone features h, of
    their width), `align_M` (two augmented views, embeddings z) and `unif_M` (z of one view); with two modalities or
    more, per pair `gap_A_B` (centroid distance of z) and `gap_acc_A_B` (modality classifier on h, %; on z where
    the two read-outs differ in width)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out, h_of, z_of = {}, {}, {}
    for m, md in data.items():
        keep = stratified_subset(md.test_y, min(n, len(md.test_y)), runtime.derive_seed(seed, "diagnostics", m))
        x = md.take("test", torch.from_numpy(keep), device)
        g = runtime.make_generator(device, seed, "diagnostics_views", m)
        with autocast(device, amp):
            h = model.features(md.normalize(x), m).float()
            z1 = model(augment(m, x, md, data_cfg, g), m).float()
            z2 = model(augment(m, x, md, data_cfg, g), m).float()
            z = model.project(h.to(z1.dtype), m).float()
        h_of[m], z_of[m] = h, z
        out[f"erank_{m}"] = round(effective_rank(h), 3)
        out[f"align_{m}"] = round(alignment(z1, z2), 4)
        out[f"unif_{m}"] = round(uniformity(z), 4)
    mods = list(data)
    for i, a in enumerate(mods):
        for b in mods[i + 1:]:
            out[f"gap_{a}_{b}"] = round(centroid_gap(z_of[a], z_of[b]), 4)
            # read-outs of other widths (model.pool per modality) are told apart in the common space z instead
            sep = (h_of if h_of[a].shape[1] == h_of[b].shape[1] else z_of)
            out[f"gap_acc_{a}_{b}"] = round(modality_separability(sep[a], sep[b], seed), 2)
    model.train(was_training)
    return out
