"""Client partitioning: which clients hold which modality (every holding kind, e.g. image only, audio only,
both, at configured fractions) and how each modality's samples are split over its holders: IID, Dirichlet label
skew, McMahan's pathological shards, or natural groups (speakers, folds, kits). Pure functions of a seed.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np

from modality_specs import MODALITIES
from settings import ConfigError


def holding_kinds(modalities: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The sets of modalities a client can hold, in the order fed.modality_fractions lists them: each modality
    alone (in registry order), then every pair, ..., then all of them. Two modalities: image, audio, both."""
    mods = [m for m in MODALITIES if m in modalities]
    return [kind for n in range(1, len(mods) + 1) for kind in combinations(mods, n)]


def iid_partition(n: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(rng.permutation(n), n_clients)]


def dirichlet_partition(labels: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator, *,
                        min_size: int = 2, max_tries: int = 1000) -> list[np.ndarray]:
    """Label skew: for each class, split its samples over clients in proportions ~ Dir(alpha), redrawn
    until every client holds at least `min_size` samples (the NIID-Bench recipe)."""
    labels = np.asarray(labels)
    if n_clients * min_size > len(labels):
        raise ConfigError(f"cannot give {n_clients} clients at least {min_size} samples each from "
                          f"{len(labels)} samples: use fewer clients (fed.clients)")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.nonzero(labels == c)[0])
            prop = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(prop)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        sizes = [sum(len(c) for c in p) for p in parts]
        if min(sizes) >= min_size:
            return [np.sort(np.concatenate(p)) for p in parts]
    raise ConfigError(f"Dirichlet(alpha={alpha}) could not give all {n_clients} clients {min_size} samples "
                      f"in {max_tries} draws: raise fed.alpha or lower fed.clients")


def pathological_partition(labels: np.ndarray, n_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al.'s pathological non-IID split: sort by label, cut into n_clients * k shards, give
    every client k random shards (so about k classes each)."""
    labels = np.asarray(labels)
    if n_clients * k > len(labels):
        raise ConfigError(f"cannot cut {len(labels)} samples into {n_clients} x {k} shards: lower fed.clients "
                          f"or fed.classes_per_client")
    order = np.argsort(labels + rng.random(len(labels)) * 0.5, kind="stable")  # by label, shuffled inside
    shards = np.array_split(order, n_clients * k)
    perm = rng.permutation(len(shards))
    return [np.sort(np.concatenate([shards[j] for j in perm[i * k:(i + 1) * k]])) for i in range(n_clients)]


def group_partition(groups: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Natural partition: whole groups (speakers, folds, kits) go to clients, as evenly as possible."""
    groups = np.asarray(groups)
    uniq = rng.permutation(np.unique(groups))
    if len(uniq) < n_clients:
        raise ConfigError(f"the data has {len(uniq)} speakers/groups, fewer than the {n_clients} clients "
                          f"that hold this modality: use fewer clients or another fed.partition")
    owner = {g: k % n_clients for k, g in enumerate(uniq)}
    client = np.array([owner[g] for g in groups])
    return [np.nonzero(client == k)[0] for k in range(n_clients)]


def assign_modalities(n_clients: int, modalities: tuple[str, ...], fractions: tuple[float, ...],
                      rng: np.random.Generator) -> list[tuple[str, ...]]:
    """Which modalities each client holds. With several modalities, `fractions` gives each holding kind's share
    of the clients in `holding_kinds` order (two modalities: image only, audio only, both), rounded so that every
    kind with a positive fraction gets at least one client; with one modality every client holds it."""
    if len(modalities) == 1:
        return [tuple(modalities)] * n_clients
    kinds = holding_kinds(modalities)
    if len(fractions) != len(kinds):
        raise ConfigError(f"fed.modality_fractions={list(fractions)}: expected {len(kinds)} fractions, one per holding "
                          f"kind ({', '.join('+'.join(k) for k in kinds)})")
    counts = np.floor(np.asarray(fractions) / sum(fractions) * n_clients).astype(int)
    counts = np.maximum(counts, (np.asarray(fractions) > 0).astype(int))
    while counts.sum() > n_clients:
        counts[np.argmax(counts)] -= 1
    while counts.sum() < n_clients:
        counts[np.argmax(np.asarray(fractions) * n_clients - counts)] += 1
    held = [k for k, c in zip(kinds, counts) for _ in range(c)]
    return [held[i] for i in rng.permutation(n_clients)]


def partition(data: dict, n_clients: int, scheme: str, alpha: float,
              fractions: tuple[float, ...], *, seed: int, min_size: int = 2,
              classes_per_client: int = 2, federation: tuple[str, ...] | None = None) -> list[dict[str, np.ndarray]]:
    """Client k's data: {modality: indices into data[modality].train_x}. Each modality is split only
    over the clients that hold it; unpaired by construction (image and audio indices are independent).
    scheme: iid | dirichlet | pathological (k classes per client) | natural (whole speakers/folds/kits
    per client where the data has such ids, Dirichlet otherwise).

    federation: the modalities the clients hold (default: those in `data`). Which client holds what is
    drawn over the federation's modalities, and each modality is split with its own random stream, so a
    run on a subset of them (an image-only baseline of an image+audio federation) gets exactly the same
    clients and indices for the modalities it keeps."""
    federation = tuple(federation or data)
    if set(data) - set(federation):
        raise ValueError(f"data holds {sorted(data)}, not all in the federation's modalities {federation}")
    holds = assign_modalities(n_clients, federation, fractions, np.random.default_rng([seed, 0]))
    clients = [dict() for _ in range(n_clients)]
    for m, md in data.items():
        rng = np.random.default_rng([seed, 1 + MODALITIES.index(m)])
        owners = [k for k in range(n_clients) if m in holds[k]]
        labels = md.train_y.cpu().numpy()
        if len(owners) * min_size > len(labels):
            raise ConfigError(f"cannot give {len(owners)} clients at least {min_size} {m} samples each from "
                              f"{len(labels)} samples: use fewer clients (fed.clients)")
        if scheme == "iid":
            parts = iid_partition(len(labels), len(owners), rng)
        elif scheme == "natural" and md.train_group is not None:
            parts = group_partition(md.train_group.cpu().numpy(), len(owners), rng)
        elif scheme == "pathological":
            parts = pathological_partition(labels, len(owners), classes_per_client, rng)
        else:
            parts = dirichlet_partition(labels, len(owners), alpha, rng, min_size=min_size)
        for k, idx in zip(owners, parts):
            clients[k][m] = idx
    return clients


def describe_partition(clients: list[dict[str, np.ndarray]], data: dict) -> str:
    """Per-client sample counts per modality and class, as a text table."""
    lines = []
    for m, md in data.items():
        y = md.train_y.cpu().numpy()
        ncls = len(md.classes)
        lines.append(f"{m}: client | n | per-class counts ({ncls} classes)")
        for k, c in enumerate(clients):
            if m in c:
                counts = np.bincount(y[c[m]], minlength=ncls)
                lines.append(f"  {k:4d} | {len(c[m]):6d} | {' '.join(f'{v:4d}' for v in counts)}")
    return "\n".join(lines)


