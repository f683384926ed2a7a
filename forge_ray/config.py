"""Typed stage configs: YAML files plus ``key=value`` overrides.

Each stage declares a dataclass (nested dataclasses allowed). :func:`load_config`
reads an optional YAML file, applies ``a.b=value`` overrides (values parsed as YAML,
so ``lr=2e-3`` is a float and ``sizes=[256,256]`` a list), rejects unknown keys,
checks every value against its annotation and finally runs the dataclass's own
``__post_init__`` validation. Config objects stay at the edges: builders turn them
into plain arguments for the algorithms.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from forge_ray.errors import ConfigError

T = TypeVar("T")


def load_config(cls: type[T], path: str | os.PathLike | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build a validated ``cls`` from an optional YAML file and ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = os.fspath(path)
        raw = read_yaml(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "override must look like key=value")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip(), parsed, item)
    return from_dict(cls, raw, source)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: ``{}``); one-line errors name the file."""
    source, p = os.fspath(path), Path(path)
    if not p.is_file():
        raise ConfigError(source, "config file not found")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(source, f"not a text (UTF-8) file: byte {e.start} is {e.object[e.start]:#04x}; "
                                  "a config is YAML text") from None
    except yaml.YAMLError as e:
        raise ConfigError(source, f"invalid YAML: {' '.join(str(e).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(source, "config must be a mapping of keys to values")
    return loaded


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s keys laid on top, nested mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(cls: type[T], raw: dict[str, Any], source: str = "<config>", prefix: str = "") -> T:
    """Turn a plain mapping into ``cls``, checking keys and value types."""
    if not isinstance(raw, dict):
        raise ConfigError(source, f"{prefix or 'config'} must be a mapping")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ConfigError(source, f"unknown config key(s) {names} for {cls.__name__}; "
                                  f"known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, source, prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(source, f"{cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-friendly dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write a config dataclass as YAML (the file :func:`load_config` reads back)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def require(cond: bool, message: str) -> None:
    """Validation helper for ``__post_init__``: raise ValueError(message) unless cond."""
    if not cond:
        raise ValueError(message)


def _set_dotted(raw: dict, key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(item, f"{part} is not a nested section")
        node = nxt
    node[parts[-1]] = value


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert only lossless cases."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(source, f"{key}: invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(source, f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(source, f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        out = [_coerce(inner, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, source, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(source, f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(source, f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        raise ConfigError(source, f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(source, f"{key}: expected a string, got {value!r}")
    return value


@dataclasses.dataclass
class ScaleConfig:
    """How a Ray Train stage is spread over the cluster.

    ``deepspeed_config`` names a JSON file (relative paths resolve against the repo's
    ``cluster/deepspeed/``); batch sizes, lr and precision are filled in from the
    stage config, so one JSON serves every model size.

    ``cache_mb``: a training dataset estimated below this many MiB is built once and
    kept in the object store (spilled to disk if that fills), and each train-sid /
    train-gr worker reads its shard of it once and permutes it every epoch (at most
    ``cache_mb`` / workers MiB per worker); a larger one streams from Parquet every
    epoch. Re-running the read and transform costs seconds per epoch, which dominates
    small runs of many short epochs. 0 = always stream. The
    default (1 GiB) holds an Amazon-review dataset's co-occurrence pairs (Beauty's
    131k pairs are 2 x 384 floats each, 385 MiB): streamed, each pair epoch re-read
    them on the cores the workers train on (docs/benchmarks.md, Quantizer training).

    ``torch_threads``: intra-op threads of each worker. Ray sets one per whole CPU of
    the worker's share (one for a fractional share); set it to give a worker more, e.g.
    one worker with 2 threads on a 2-core machine while Ray Data keeps a CPU to schedule.

    ``autocast``: ``bf16`` runs train-gr's training forward passes under
    ``torch.autocast`` in bfloat16 (matmuls in bf16; weights, gradients, optimizer
    state, the loss and the validation passes stay float32). It pays on CPUs with
    bf16 matrix units (Intel AMX, Sapphire Rapids and later: 1.4x per step for the
    Amazon causal decoder on one core, docs/benchmarks.md) and is slow where bf16 is
    emulated. On GPUs DeepSpeed's own ``bf16`` section is the usual choice.
    train-sid refuses it: its InfoNCE logits and nearest-code search were not validated in bf16.
    """

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    deepspeed_config: str = "zero1.json"
    max_failures: int = 1          # worker crashes survived by restarting from the last checkpoint
    checkpoint_every: int = 100    # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    cache_mb: int = 1024
    torch_threads: int = 0  # per worker; 0: Ray's OMP_NUM_THREADS (the worker's whole CPUs, >= 1)
    autocast: Literal["none", "bf16"] = "none"

    def __post_init__(self):
        require(self.num_workers >= 1, "scale.num_workers must be >= 1")
        require(self.torch_threads >= 0, "scale.torch_threads must be >= 0")
        require(self.cache_mb >= 0, "scale.cache_mb must be >= 0")
        require(self.cpus_per_worker > 0, "scale.cpus_per_worker must be > 0")
        require(self.max_failures >= 0, "scale.max_failures must be >= 0")
        require(self.checkpoint_every >= 1, "scale.checkpoint_every must be >= 1")
        require(self.keep_checkpoints >= 1, "scale.keep_checkpoints must be >= 1")
