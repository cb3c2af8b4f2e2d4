"""Downstream evaluation of a pretrained FSSUAVL backbone: frozen features and the kNN protocol.

    python finetune.py --ckpt runs/default/last.pt
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data import ModalityData
from runtime import autocast


@torch.no_grad()
def extract_features(model, md: ModalityData, split: str, modality: str, limit: int = 0, batch_size: int = 512,
                     amp: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features h (before the projection head) of the first `limit` samples (0 = all) of a split,
    L2-normalised, fp32. The model is put in eval mode and restored afterwards."""
    x = md.train_x if split == "train" else md.test_x
    y = md.train_y if split == "train" else md.test_y
    if limit:
        x, y = x[:limit], y[:limit]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats = []
    for i in range(0, len(x), batch_size):
        with autocast(device, amp):
            feats.append(model.features(md.normalize(x[i:i + batch_size]), modality).float())
    model.train(was_training)
    return F.normalize(torch.cat(feats), dim=1), y


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_y: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Temperature-weighted kNN (Wu et al. 2018, InstDisc): each of the k nearest bank features by
    cosine similarity votes for its label with weight exp(sim / t). Inputs L2-normalised."""
    k = min(k, len(bank))
    preds = []
    for i in range(0, len(queries), chunk):
        sim = queries[i:i + chunk] @ bank.t()  # (q, N)
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(w), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_y[idx], torch.exp(w / t))
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(model, md: ModalityData, modality: str, bank_size: int = 0, queries: int = 0, k: int = 200,
                 t: float = 0.1, amp: str = "fp32") -> float:
    """kNN top-1 accuracy (%) on the test split with a bank of training features."""
    bank, bank_y = extract_features(model, md, "train", modality, bank_size, amp=amp)
    q, q_y = extract_features(model, md, "test", modality, queries, amp=amp)
    pred = knn_predict(bank, bank_y, q, len(md.classes), k, t)
    return 100.0 * (pred == q_y).float().mean().item()
