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


def _tree(root):
    return sorted((p.relative_to(root).as_posix(), p.read_bytes() if p.is_file() else None)
                  for p in root.rglob("*"))


def test_overwrite_replaces_only_a_previous_output_of_the_same_kind(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, kind="sids") as tmp:
        write_manifest(tmp, "sids")
    with atomic_dir(out, overwrite=True, kind="sids") as tmp:  # same kind: replaced
        write_manifest(tmp, "sids", n=2)
    assert read_manifest(out, "sids")["n"] == 2
    # a user's folder (no manifest), another stage's output, or a stage that names no
    # kind: refused in one line, left exactly as it was
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "sub" / "manifest.json").write_text('{"kind": "sids"}')
    before = _tree(tmp_path)
    for folder, kind, problem in [(user, "sids", "has no readable manifest.json"),
                                  (out, "dataset", "holds a 'sids' output"),
                                  (out, None, "holds a 'sids' output")]:
        with pytest.raises(InputError, match=problem) as err:
            with atomic_dir(folder, overwrite=True, kind=kind):
                raise AssertionError("must not start")
        assert str(err.value).startswith(str(folder)) and "\n" not in str(err.value)
    assert _tree(tmp_path) == before
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "manifest.json").write_text("{not json")
    before = _tree(tmp_path)
    with pytest.raises(InputError, match="no readable manifest.json"):
        with atomic_dir(tmp_path / "corrupt", overwrite=True, kind="sids"):
            pass
    assert _tree(tmp_path) == before


def test_output_may_not_overlap_an_input(tmp_path):
    data = tmp_path / "data"
    with atomic_dir(data, kind="sids") as tmp:
        write_manifest(tmp, "sids")
    (tmp_path / "link").symlink_to(data)
    before = _tree(tmp_path)
    for out, inputs, problem in [
        (data, [data], "is the input"),                        # sid-metrics SIDS --out SIDS
        (tmp_path / "link", [data], "is the input"),           # the same folder via a symlink
        (data / "inner", [data], "is inside the input"),
        (tmp_path, [data], "contains the input"),
        (data, [None, tmp_path / "x", tmp_path / "link"], "is the input"),
    ]:
        with pytest.raises(InputError, match=problem) as err:
            with atomic_dir(out, overwrite=True, kind="sids", inputs=inputs):
                raise AssertionError("must not start")
        assert str(err.value).startswith(str(out)) and "\n" not in str(err.value)
    assert _tree(tmp_path) == before
    with atomic_dir(tmp_path / "data2", kind="sids", inputs=[data]) as tmp:  # a sibling is fine
        write_manifest(tmp, "sids")


def test_config_that_is_not_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"steps: 3\n\x89PNG\xff\xfe")
    with pytest.raises(ConfigError, match=r"c.yaml: not a text \(UTF-8\) file: byte 9 is 0x89") as err:
        load_config(Outer, path)
    assert "\n" not in str(err.value)
