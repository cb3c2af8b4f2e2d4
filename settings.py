"""Typed YAML configs: dataclass sections built from YAML with dotted CLI overrides (`--optim.lr=0.1`), a `base:` key
so a variant config is only its differing lines, range and choice checks, and the error a user can fix.

Nothing here runs at import. Every config section is a dataclass next to the code it configures; this module
only knows how to build one from a dict and report what is wrong with it.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (config, data, checkpoint, run directory): the entry scripts print it as one
    line and exit non-zero. Anything else is a bug and keeps its traceback."""


class ConfigError(UserError, ValueError):
    """A config problem, reported as one line naming the key."""


def expand_path(p: str | None, key: str = "path") -> str | None:
    """`~` and $VARIABLES expanded, as a shell would (a config is not read by a shell). A variable that is not set
    is a ConfigError naming `key` (a shell would silently make it empty; Python would keep `$NAME` as a folder)."""
    if p is None:
        return None
    out = os.path.expandvars(os.path.expanduser(p))
    unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", out)
    if unset:
        raise ConfigError(f"{key}={p!r}: the environment variable ${unset[0]} is not set: set it, or write the path out")
    return out


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    amp: str = "bf16"             # bf16 | fp16 | fp32 autocast on CUDA; on CPU bf16 where it is native (AVX512-BF16/AMX), else fp32
    deterministic: typing.Optional[bool] = None  # torch deterministic algorithms; null = on for CPU runs, off on CUDA (slower there)
    threads: int = 0              # torch CPU threads per process; 0 = torch's default. Under torchrun on CPU the ranks of a machine split it
    eval_every: int = 5           # the monitor (kNN, probe, diagnostics) every this many rounds (0 = only at the start and end)
    final_probe: bool = True      # the fast linear probe on frozen features at every evaluation round (round 0: also
                                  # of the raw input) and at the end
    tensorboard: bool = False     # also write every scalar of log.jsonl as TensorBoard event files (OUT_DIR/tensorboard)
    compile: bool = False         # torch.compile the shared trunk in place (optional; first steps compile)
    progress: bool = True         # tqdm bars (hidden anyway when stderr is not a terminal)
    dry_run: bool = False         # build data, partition and model, take one local step on one client, write nothing

    overwrite: bool = False       # a run.out_dir holding another run is moved aside (to OUT_DIR.old-N), never deleted

    def __post_init__(self):
        self.out_dir = expand_path(self.out_dir, "run.out_dir")
        check_choice("run.amp", self.amp, ("bf16", "fp16", "fp32"))
        check_range("run.eval_every", self.eval_every, lo=0)
        check_range("run.threads", self.threads, lo=0, hi=4096)
        check_range("run.seed", self.seed, lo=0, hi=2 ** 63 - 1)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"run.device={self.device!r}: expected auto, cpu, cuda or cuda:N")


def int_at_least(lo: int, hi: int | None = None):
    """An argparse type for a command-line count: an integer >= lo (and <= hi), refused in one line otherwise."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: expected {lo}" + (f" to {hi}" if hi is not None
                                                                                      else " or more"))
        return v
    return parse


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, choices))}")


def check_range(key: str, value, lo=None, hi=None, lo_open=False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: expected a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{key}={value!r}: must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value!r}: must be <= {hi}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value, tp):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected and
    lists where tuples are. Returns the value converted to the annotated container type."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                # a mapping or list of the right kind with a wrong element: name the element, not the union
                if isinstance(value, (dict, list, tuple)) and typing.get_origin(a) in ((dict,) if isinstance(value, dict)
                                                                                        else (list, tuple)):
                    raise e
        raise ConfigError(f"{key}={value!r}: expected {' or '.join(_type_name(a) for a in args)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed length: tuple[float, float]
            if len(value) != len(args):
                raise ConfigError(f"{key}={list(value)}: expected a list of {len(args)} "
                                  f"({', '.join(_type_name(a) for a in args)})")
            return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else typing.Any
        items = [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        kt, vt = typing.get_args(tp) or (typing.Any, typing.Any)
        return {_coerce(f"{key} (a key)", k, kt): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if tp is typing.Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a string, and {value!r} reads as a number: quote it "
                              f"(--{key}=\"'{value}'\" on the command line, {key.rsplit('.', 1)[-1]}: '{value}' in YAML)")
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    raise TypeError(f"unsupported config annotation {tp} for {key}")


def build_dataclass(cls, data: dict | None, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError naming
    the dotted key. Nested dataclass fields take nested dicts."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    if hasattr(cls, "upgrade"):  # a section that renamed or moved keys reads its older spelling
        data = cls.upgrade(dict(data))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' "
                          f"(known keys in this section: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, data[name], tp)
    return cls(**kwargs)


def parse_value(text: str):
    """A CLI override value: a Python/YAML literal where it parses as one, else the plain string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null", "~"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if text.strip()[:1] in "[{":  # YAML flow syntax, so --data.modalities=[image, audio] needs no quotes
        import yaml
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse value {text!r}: {e}") from e
    return text


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--section.key=value` overrides from the other arguments before argparse sees them
    (argparse takes an argument containing a space, like `--x.y=[1, 2]`, for a positional)."""
    def is_override(a):
        return a.startswith("--") and "=" in a and "." in a.split("=", 1)[0]
    return [a for a in argv if not is_override(a)], [a for a in argv if is_override(a)]


def parse_with_overrides(parser, argv: list[str]):
    """argparse for an entry script whose other arguments are dotted overrides: (args, overrides)."""
    argv, overrides = split_overrides(list(argv))
    args, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unrecognised argument {rest[0]!r}: overrides look like --section.key=value")
    return args, overrides


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--a.b=value` overrides to a nested dict (in place) and return it."""
    for ov in overrides:
        if not ov.startswith("--") or "=" not in ov:
            raise ConfigError(f"cannot parse override {ov!r}: use --section.key=value")
        key, text = ov[2:].split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: '{p}' is not a section")
        node[parts[-1]] = parse_value(text)
    return data


def read_yaml(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML config file as a dict of sections. `base: OTHER.yaml` (relative to this file's folder) inherits
    OTHER's sections, and this file's keys replace OTHER's key by key, so a variant config is its differing
    lines. A missing file, bad bytes, broken YAML, a top level that is not a mapping or a loop of bases is a
    ConfigError naming the file (and the line)."""
    p = Path(expand_path(str(path), "config"))
    if p.is_dir():
        raise ConfigError(f"config {p} is a directory: give a YAML file (e.g. configs/default.yaml)")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    import yaml
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_unique_keys_loader())
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}): save the config as UTF-8") from e
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        hint = " (YAML indents with spaces, never tabs)" if "\t" in p.read_text(encoding="utf-8") else ""
        raise ConfigError(f"{p}: invalid YAML{at}: {getattr(e, 'problem', None) or e}{hint}") from e
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror or e}") from e
    if data is None:
        raise ConfigError(f"{p} is empty: give at least one section, or `base: default.yaml` for the default experiment")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{p}: base={base!r}: expected the path of another config file")
    parent = (p.parent / expand_path(base)).resolve()
    if parent in _seen + (p.resolve(),):
        raise ConfigError(f"{p}: base {base} leads back to {parent}: configs inherit in a loop")
    return merge(read_yaml(parent, _seen + (p.resolve(),)), data)


def _unique_keys_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise ConfigError(f"key {key!r} appears twice in one section (line {key_node.start_mark.line + 1}): "
                                      f"YAML would keep only the last; merge them into one")
                seen.add(key)
            return super().construct_mapping(node, deep)
    return UniqueKeys


def merge(base: dict, over: dict) -> dict:
    """`base` with `over` applied key by key: nested mappings merge, any other value replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path: str | os.PathLike | None, overrides: list[str] = ()):
    """YAML file (optional) + dotted overrides -> dataclass `cls`, validated."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    return build_dataclass(cls, data)


def to_dict(cfg) -> dict:
    """Dataclass -> plain dict of primitives/lists (YAML- and checkpoint-safe)."""
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


def dict_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += dict_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out

