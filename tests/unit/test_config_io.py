"""The typed config loader and atomic output folders."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from forge_ray.config import load_config, require
from forge_ray.errors import ConfigError, InputError
from forge_ray.io import atomic_dir, read_manifest, write_manifest


@dataclasses.dataclass
class Inner:
    sizes: list[int] = dataclasses.field(default_factory=lambda: [256, 256])
    lr: float = 1e-3


@dataclasses.dataclass
class Outer:
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    steps: int = 10
    seed: int | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)

    def __post_init__(self):
        require(self.steps > 0, "steps must be positive")


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: run\ninner:\n  lr: 2e-3\n")
    cfg = load_config(Outer, f, ["steps=5", "inner.sizes=[8, 4]", "mode=b"])
    assert cfg == Outer(name="run", mode="b", steps=5, inner=Inner(sizes=[8, 4], lr=2e-3))


@pytest.mark.parametrize("override, needle", [
    ("nope=1", "unknown config key(s) nope"),
    ("inner.nope=1", "inner.nope"),
    ("steps=abc", "steps: expected an integer"),
    ("mode=c", "mode: 'c' is not one of"),
    ("steps=0", "steps must be positive"),
    ("inner.sizes=[1, x]", "inner.sizes[1]: expected an integer"),
    ("steps", "override must look like key=value"),
])
def test_bad_values_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_atomic_dir_success_and_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        write_manifest(tmp, "dataset", counts={"items": 3})
    assert read_manifest(out, "dataset")["counts"] == {"items": 3}
    with pytest.raises(InputError, match="already exists"):
        with atomic_dir(out):
            pass
    with pytest.raises(InputError, match="expected a 'model' output"):
        read_manifest(out, "model")
