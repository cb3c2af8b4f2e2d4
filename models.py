"""One vision backbone for images and log-mel spectrograms, and its projection head(s).

FSSUAVL trains a single CNN or ViT on both modalities: an image enters through the image stem (or patch
embedding), a spectrogram (a 1-channel image) through the audio stem, or both through one shared stem
(audio repeated to the image's channels). Everything after the stem is shared. No I/O here. A backbone family
(ResNet, ViT) is one BACKBONES entry: its archs, a builder of stems + trunk, and what it needs (memory format,
norm type); the SSL objectives are in losses.py.

    model = build_model(ModelConfig(arch="resnet18"), {"image": (3, 32, 32), "audio": (1, 128, 96)})
    z = model(x, "audio")            # (B, proj_dim), L2-normalised by the objective, not here
    h = model.features(x, "image")   # (B, model.feat_dims["image"]), what downstream tasks use
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from modality_specs import MODALITIES
from settings import ConfigError, check_choice, check_range

# arch -> defaults; ResNet: (base width, blocks per stage), ViT: (dim, depth, heads)
RESNETS = {"resnet18": (64, (2, 2, 2, 2)), "resnet34": (64, (3, 4, 6, 3)),
           "resnet10": (64, (1, 1, 1, 1)), "resnet_tiny": (16, (1, 1, 1, 1))}
VITS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_micro": (64, 4, 2)}


@dataclass
class ModelConfig:
    arch: str = "resnet18"             # an arch of a BACKBONES family: resnet10/18/34/_tiny, vit_micro/tiny/small
    width: Optional[int] = None        # ResNet base width / ViT dim; None = the arch's default
    depth: Optional[int] = None        # ViT depth; None = the arch's default
    stem: str = "auto"                 # ResNet stem: cifar (3x3 s1) | imagenet (7x7 s2 + pool) | auto (cifar below 64 px)
    patch_size: int = 4                # ViT patch size (image and audio)
    input_sharing: str = "per_modality"  # per_modality stems/patch embeddings, or shared (audio repeated to image channels)
    head: str = "shared"               # shared projection head, or per_modality
    proj_hidden: Optional[int] = None  # projection MLP hidden width; None = the trunk's width (8 x width for a ResNet)
    proj_dim: int = 128                # embedding dimension of the common space
    bn_stats: str = "per_modality"     # BatchNorm running statistics in the shared trunk: per_modality | shared
    bn_momentum: Optional[float] = None  # None: running stats = cumulative average over each client's local training; else EMA momentum
    pool: Union[str, dict[str, str]] = "avg"  # read-out of the last feature map, a POOLS key: one for every modality,
                                       # or per modality ({image: avg, audio: time}); used in pretraining and downstream

    def __post_init__(self):
        check_choice("model.arch", self.arch, tuple(a for f in BACKBONES.values() for a in f.archs))
        check_choice("model.stem", self.stem, ("auto", "cifar", "imagenet"))
        check_choice("model.input_sharing", self.input_sharing, ("per_modality", "shared"))
        check_choice("model.head", self.head, ("shared", "per_modality"))
        check_choice("model.bn_stats", self.bn_stats, ("per_modality", "shared"))
        check_range("model.proj_dim", self.proj_dim, lo=1, hi=65536)
        check_range("model.patch_size", self.patch_size, lo=1, hi=1024)
        if self.bn_momentum is not None:
            check_range("model.bn_momentum", self.bn_momentum, lo=0.0, hi=1.0, lo_open=True)
        pools = self.pool if isinstance(self.pool, dict) else {None: self.pool}
        for m, kind in pools.items():
            key = "model.pool" if m is None else f"model.pool.{m}"
            if m is not None:
                check_choice("model.pool (a modality)", m, MODALITIES)
            check_choice(key, kind, tuple(POOLS))
            fam = backbone_family(self.arch)
            if kind not in fam.pools:
                raise ConfigError(f"{key}={kind}: model.arch={self.arch} reads out {' or '.join(fam.pools)} only "
                                  f"(time and flat pool a convolutional feature map: use a resnet arch)")
        if backbone_family(self.arch).norm != "batch" and self.bn_stats != "per_modality":
            # (model.bn_momentum still acts: the projection head's BatchNorm)
            raise ConfigError(f"model.bn_stats={self.bn_stats} acts on the trunk's BatchNorm, but model.arch={self.arch} "
                              f"normalises with {backbone_family(self.arch).norm} norm: drop it")
        for k, hi in (("width", 8192), ("depth", 256), ("proj_hidden", 65536)):
            if getattr(self, k) is not None:
                check_range(f"model.{k}", getattr(self, k), lo=1, hi=hi)


    def pool_for(self, modality: str) -> str:
        """The read-out `modality`'s features use."""
        return self.pool.get(modality, "avg") if isinstance(self.pool, dict) else self.pool


# ----------------------------------------------------------------------------- read-outs

def pool_avg(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling: (B, C, H, W) -> (B, C)."""
    return x.mean(dim=(2, 3))


def pool_time(x: torch.Tensor) -> torch.Tensor:
    """Keep the order along the last axis (time, on a log-mel): channels x frequency flattened, then mean and max
    over time, as BYOL-A and COLA read out audio. (B, C, F, T) -> (B, 2 C F)."""
    x = x.flatten(1, 2)  # (B, C F, T)
    return torch.cat([x.mean(-1), x.amax(-1)], dim=1)


def pool_flat(x: torch.Tensor) -> torch.Tensor:
    """No pooling: the whole map, (B, C, H, W) -> (B, C H W)."""
    return x.flatten(1)


# a read-out: (B, C, H, W) feature map -> (B, D) features. A backbone family lists the ones it supports.
POOLS = {"avg": pool_avg, "time": pool_time, "flat": pool_flat}


# ----------------------------------------------------------------------------- ResNet

class BatchNorm(nn.Module):
    """BatchNorm for (B, C) or (B, C, H, W) inputs whose training step never waits on the device and never
    changes a Python constant (so torch.compile compiles it once).

    momentum=None keeps a cumulative average, as nn.BatchNorm does, but stock BatchNorm computes its factor as
    1 / float(num_batches_tracked): a host sync per layer per step on CUDA. Here the batch statistics are
    written by F.batch_norm with the constant momentum 1.0 into scratch buffers, and the running statistics move
    toward them by torch.lerp_ with the factor 1 / num_batches_tracked computed on the device.

    modalities=None: one set of running statistics under the stock names (running_mean, running_var,
    num_batches_tracked). modalities=(...): one set per modality (running_mean_image, ...) and one shared affine
    (gamma, beta), so it is still one backbone; `modality` (set by FSSUAVLModel.features) picks the set.
    Training normalises with batch statistics either way; averaged over image and audio batches, eval-mode
    statistics would fit neither."""

    def __init__(self, num_features: int, momentum: Optional[float] = 0.1, eps: float = 1e-5,
                 modalities: tuple[str, ...] | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.momentum, self.eps = momentum, eps
        self.modalities = tuple(modalities) if modalities else None
        self.modality = self.modalities[0] if self.modalities else None
        for suffix in ([f"_{m}" for m in self.modalities] if self.modalities else [""]):
            self.register_buffer(f"running_mean{suffix}", torch.zeros(num_features))
            self.register_buffer(f"running_var{suffix}", torch.ones(num_features))
            self.register_buffer(f"num_batches_tracked{suffix}", torch.tensor(0, dtype=torch.long))
        if momentum is None:  # the batch statistics of the current step (not saved)
            self.register_buffer("batch_mean", torch.zeros(num_features), persistent=False)
            self.register_buffer("batch_var", torch.ones(num_features), persistent=False)

    def _suffix(self, modality: Optional[str]) -> str:
        return f"_{modality}" if self.modalities else ""

    def reset_running_stats(self, modality: Optional[str] = None) -> None:
        sfx = self._suffix(modality)
        self._buffers[f"running_mean{sfx}"].zero_()
        self._buffers[f"running_var{sfx}"].fill_(1)
        self._buffers[f"num_batches_tracked{sfx}"].zero_()

    def forward(self, x):
        sfx = self._suffix(self.modality)
        rm, rv = self._buffers[f"running_mean{sfx}"], self._buffers[f"running_var{sfx}"]
        if not self.training:
            return F.batch_norm(x, rm, rv, self.weight, self.bias, False, 0.0, self.eps)
        nbt = self._buffers[f"num_batches_tracked{sfx}"]
        nbt.add_(1)
        if self.momentum is not None:
            return F.batch_norm(x, rm, rv, self.weight, self.bias, True, self.momentum, self.eps)
        out = F.batch_norm(x, self.batch_mean, self.batch_var, self.weight, self.bias, True, 1.0, self.eps)
        with torch.no_grad():  # cumulative average: running += (batch - running) / n, n on the device
            f = nbt.reciprocal().to(rm.dtype)
            rm.lerp_(self.batch_mean, f)
            rv.lerp_(self.batch_var, f)
        return out


def make_norm(modalities: tuple[str, ...] | None, momentum: Optional[float]):
    """BatchNorm factory: per-modality running statistics when given more than one modality."""
    if modalities and len(modalities) > 1:
        return lambda c: BatchNorm(c, momentum, modalities=modalities)
    return lambda c: BatchNorm(c, momentum)


def key_modality(name: str, modalities=MODALITIES) -> Optional[str]:
    """The modality a parameter/buffer belongs to (its stem, its head, its per-modality BN statistics),
    or None for what every modality trains. Used to weight FedAvg by the samples that touched a key."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] in ("stems", "heads") and parts[1] in modalities:
        return parts[1]
    return next((m for m in modalities if parts[-1].endswith("_" + m)), None)


def reset_bn_stats(model: nn.Module, modalities) -> None:
    """Restart the cumulative running statistics (BN layers with momentum=None) that a client training
    on `modalities` will update, so the statistics it returns describe this round's weights."""
    for name, mod in model.named_modules():
        if not isinstance(mod, BatchNorm) or mod.momentum is not None:
            continue
        if mod.modalities:
            for m in set(modalities) & set(mod.modalities):
                mod.reset_running_stats(m)
        else:
            owner = key_modality(name + ".x")
            if owner is None or owner in modalities:
                mod.reset_running_stats()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm=BatchNorm):  # norm: channels -> module
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet_stem(kind: str, cin: int, width: int, momentum: Optional[float] = 0.1) -> nn.Module:
    if kind == "cifar":  # He et al. CIFAR variant: keeps full resolution for 32 px inputs
        return nn.Sequential(nn.Conv2d(cin, width, 3, 1, 1, bias=False), BatchNorm(width, momentum), nn.ReLU())
    return nn.Sequential(nn.Conv2d(cin, width, 7, 2, 3, bias=False), BatchNorm(width, momentum), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1))


class ResNetTrunk(nn.Module):
    """Stages 1-4 of a ResNet and a read-out (POOLS): (B, width, H, W) -> (B, D); D = 8*width with pool=avg."""

    def __init__(self, width: int, blocks: tuple[int, ...], modalities: tuple[str, ...] | None = None,
                 momentum: Optional[float] = 0.1):
        super().__init__()
        layers, cin = [], width
        norm = make_norm(modalities, momentum)
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1, norm))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_dim = cin

    def forward(self, x, pool: str = "avg"):
        return POOLS[pool](self.layers(x))


# ----------------------------------------------------------------------------- ViT

class PatchEmbed(nn.Module):
    """Conv patchify + learned positional embedding for one input grid (vit-pytorch / ViT paper)."""

    def __init__(self, cin: int, hw: tuple[int, int], patch: int, dim: int):
        super().__init__()
        if hw[0] < patch or hw[1] < patch:
            raise ConfigError(f"model.patch_size={patch} is larger than the input {hw[0]}x{hw[1]}")
        self.proj = nn.Conv2d(cin, dim, patch, patch)
        self.grid = (hw[0] // patch, hw[1] // patch)
        self.pos = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1], dim) * 0.02)

    def forward(self, x):
        x = self.proj(x)  # (B, D, gh, gw)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        pos = self.pos
        if tuple(grid) != self.grid:  # another modality or size through a shared embedding
            pos = pos.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=tuple(grid), mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        return x + pos


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


class ViTTrunk(nn.Module):
    """CLS token + transformer blocks + final norm: (B, N, D) tokens -> (B, D)."""

    def __init__(self, dim: int, depth: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model.width={dim} must be divisible by the number of heads ({heads})")
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, tokens):  # the CLS token: the ViT's one read-out (model.pool=avg)
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.norm(self.blocks(x))[:, 0]


# ----------------------------------------------------------------------------- the model

def projection_head(din: int, hidden: int, dout: int, momentum: Optional[float] = 0.1) -> nn.Module:
    """SimCLR's 2-layer MLP head."""
    return nn.Sequential(nn.Linear(din, hidden), BatchNorm(hidden, momentum), nn.ReLU(), nn.Linear(hidden, dout))


class FSSUAVLModel(nn.Module):
    """stems[modality] -> shared trunk -> h (features) -> heads[modality or 'shared'] -> z.

    `stems` holds one entry per modality, or the single key 'shared' (then an audio input with fewer
    channels than the image is repeated to match)."""

    def __init__(self, stems: nn.ModuleDict, trunk: nn.Module, heads: nn.ModuleDict, input_shapes: dict,
                 pools: dict[str, str]):
        super().__init__()
        self.stems, self.trunk, self.heads = stems, trunk, heads
        self.input_shapes = {m: tuple(s) for m, s in input_shapes.items()}  # modality -> (C, H, W)
        self.in_channels = {m: s[0] for m, s in self.input_shapes.items()}
        self.pools: dict[str, str] = {}       # modality -> its read-out (a POOLS key)
        self.feat_dims: dict[str, int] = {}   # modality -> the width of its features h
        self.set_pools(pools)
        self._modality_norms = [m for m in self.modules() if isinstance(m, BatchNorm) and m.modalities]

    def features(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        if modality not in self.in_channels:
            raise ValueError(f"modality {modality!r} not in this model ({', '.join(self.in_channels)})")
        for norm in self._modality_norms:
            norm.modality = modality
        if "shared" in self.stems:
            c = max(self.in_channels.values())
            if x.shape[1] == 1 and c > 1:  # fully shared input: audio repeated to the image's channels
                x = x.expand(-1, c, -1, -1)
            return self._read(self.stems["shared"](x), modality)
        return self._read(self.stems[modality](x), modality)

    def _read(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        pool = self.pools[modality]  # trunk(x) reads out avg; a family listing other pools takes trunk(x, pool)
        return self.trunk(x) if pool == "avg" else self.trunk(x, pool)

    def set_pools(self, pools: dict[str, str]) -> None:
        """Read `modality`'s features out with another POOLS entry ({modality: pool}). Downstream (eval.pool) this
        reads a trained map another way; the projection heads keep the width they were built for."""
        for m, kind in pools.items():
            self.pools[m] = kind
            self.feat_dims[m] = self.trunk.out_dim if kind == "avg" else _readout_dim(
                self.stems["shared" if "shared" in self.stems else m], self.trunk, self.input_shapes[m], kind)

    def project(self, h: torch.Tensor, modality: str) -> torch.Tensor:
        return self.heads["shared" if "shared" in self.heads else modality](h)

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return self.project(self.features(x, modality), modality)


def build_resnet(cfg: ModelConfig, stem_inputs: dict, modalities: tuple[str, ...]):
    """Stems (one per key of stem_inputs) and the trunk of a ResNet."""
    width, blocks = RESNETS[cfg.arch]
    width = cfg.width or width
    trunk = ResNetTrunk(width, blocks, modalities if cfg.bn_stats == "per_modality" else None, cfg.bn_momentum)

    def stem_kind(hw):
        return cfg.stem if cfg.stem != "auto" else ("cifar" if min(hw) < 64 else "imagenet")
    stems = nn.ModuleDict({k: resnet_stem(stem_kind(s[1:]), s[0], width, cfg.bn_momentum)
                           for k, s in stem_inputs.items()})
    return stems, trunk


def build_vit(cfg: ModelConfig, stem_inputs: dict, modalities: tuple[str, ...]):
    """Patch embeddings (one per key of stem_inputs) and the trunk of a ViT."""
    dim, depth, heads = VITS[cfg.arch]
    dim, depth = cfg.width or dim, cfg.depth or depth
    trunk = ViTTrunk(dim, depth, heads)
    stems = nn.ModuleDict({k: PatchEmbed(s[0], s[1:], cfg.patch_size, dim) for k, s in stem_inputs.items()})
    return stems, trunk


@dataclass(frozen=True)
class BackboneFamily:
    """What a backbone family is and needs. A new family is one builder and one BACKBONES entry."""
    archs: dict                              # arch name -> its default sizes, read by `build`
    build: Callable                          # (ModelConfig, {stem key: (C, H, W)}, modalities) -> (stems, trunk)
    memory_format: torch.memory_format = torch.contiguous_format  # the layout its layers run fastest in
    norm: str = "batch"                      # batch: BatchNorm in the trunk (model.bn_* apply) | layer: LayerNorm
    pools: tuple[str, ...] = ("avg",)        # its read-outs (POOLS keys): trunk(x) is avg, trunk(x, pool) the others


BACKBONES = {"resnet": BackboneFamily(RESNETS, build_resnet, torch.channels_last, "batch", tuple(POOLS)),  # NHWC: cuDNN, oneDNN
             "vit": BackboneFamily(VITS, build_vit, torch.contiguous_format, "layer", ("avg",))}  # avg: the CLS token


def backbone_family(arch: str) -> BackboneFamily:
    fam = next((f for f in BACKBONES.values() if arch in f.archs), None)
    if fam is None:
        raise ConfigError(f"model.arch={arch!r}: expected one of "
                          f"{', '.join(a for f in BACKBONES.values() for a in f.archs)}")
    return fam


def build_model(cfg: ModelConfig, input_shapes: dict[str, tuple[int, int, int]]) -> FSSUAVLModel:
    """`input_shapes` maps each modality the model sees to its (C, H, W) input, e.g.
    {"image": (1, 28, 28), "audio": (1, 40, 96)}."""
    if not input_shapes or set(input_shapes) - set(MODALITIES):
        raise ValueError(f"input_shapes must map a subset of {MODALITIES} to (C, H, W), got {input_shapes}")
    in_ch = {m: s[0] for m, s in input_shapes.items()}
    for m, s in input_shapes.items():
        if len(s) != 3:
            raise ValueError(f"input_shapes[{m!r}]={s}: expected (C, H, W)")
    if cfg.input_sharing == "shared":
        first = input_shapes.get(MODALITIES[0], next(iter(input_shapes.values())))
        stem_inputs = {"shared": (max(in_ch.values()), *first[1:])}
    else:
        stem_inputs = dict(input_shapes)
    stems, trunk = backbone_family(cfg.arch).build(cfg, stem_inputs, tuple(input_shapes))
    model = FSSUAVLModel(stems, trunk, nn.ModuleDict(), input_shapes, {m: cfg.pool_for(m) for m in input_shapes})
    dims = model.feat_dims
    if cfg.head == "shared" and len(set(dims.values())) > 1:
        raise ConfigError(f"model.pool={cfg.pool} gives features of {', '.join(f'{d} ({m})' for m, d in dims.items())} "
                          f"dimensions, but one shared projection head needs one width: set model.head=per_modality, "
                          f"or one model.pool for every modality")
    hidden = cfg.proj_hidden or trunk.out_dim  # a wide read-out keeps the head's hidden layer at the trunk's width
    model.heads = nn.ModuleDict({"shared": projection_head(max(dims.values()), hidden, cfg.proj_dim, cfg.bn_momentum)}
                                if cfg.head == "shared" else
                                {m: projection_head(dims[m], hidden, cfg.proj_dim, cfg.bn_momentum) for m in input_shapes})
    model.apply(_init_weights)
    return model


@torch.no_grad()
def _readout_dim(stem: nn.Module, trunk: nn.Module, shape: tuple, pool: str) -> int:
    """The width of the features of inputs of `shape` under `pool`, from one forward pass of a zero input in eval
    mode (which moves no statistics and draws no random numbers)."""
    c = stem[0].in_channels if isinstance(stem, nn.Sequential) else shape[0]
    was = stem.training, trunk.training
    stem.eval(), trunk.eval()
    d = trunk(stem(torch.zeros(1, c, *shape[1:])), pool).shape[1]
    stem.train(was[0]), trunk.train(was[1])
    return d


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm, BatchNorm)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
