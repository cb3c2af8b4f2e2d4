"""The modalities a backbone learns from, one spec each: how a batch is held on the device, how a view is made,
where its augmentation settings live and how large its local batches are. A new modality is one spec here (plus
its augmentation function and config section, and a dataset that yields it); everything else reads this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from augment import augment_audio, augment_image


@dataclass(frozen=True)
class ModalitySpec:
    input_kind: str           # what the device holds per sample, before a view is made
    aug_section: str          # the DataConfig field holding this modality's augmentation config
    augment: Callable         # (x, ModalityData, aug config, generator) -> one normalised float32 view
    batch_size: Callable      # OptimConfig -> this modality's local batch size


MODALITY_SPECS = {
    "image": ModalitySpec("uint8 (C, H, W)", "image_aug", augment_image, lambda optim: optim.batch_size),
    # audio sets are often far smaller than image sets: optim.batch_size_audio (0 = batch_size)
    "audio": ModalitySpec("float16 log-mel (1, n_mels, frames)", "audio_aug", augment_audio,
                          lambda optim: optim.batch_size_audio or optim.batch_size),
}
MODALITIES = tuple(MODALITY_SPECS)


def augment(modality: str, x, md, data_cfg, g):
    """One view of the batch `x` of `modality`, with that modality's augmentation settings from `data_cfg`."""
    spec = MODALITY_SPECS[modality]
    return spec.augment(x, md, getattr(data_cfg, spec.aug_section), g)
