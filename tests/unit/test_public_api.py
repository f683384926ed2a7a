"""The public surface: every name in ``forge_ray.__all__`` resolves, and the stages
are called alike: ``stage(inputs..., out, cfg=None, *, overwrite=False)``."""

from __future__ import annotations

import inspect

import forge_ray

# stage -> its inputs, in order, before ``out``
STAGES = {"synth": (), "ingest": ("paths",), "embed": ("dataset",), "train_sid": ("dataset",),
          "assign": ("model_dir", "dataset"), "sid_metrics": ("sids_dir", "dataset"),
          "sweep": ("data",)}
# assign.py is being rewritten in another change that makes its ``overwrite`` keyword-only.
OVERWRITE_POSITIONAL = {"assign"}


def test_every_public_name_resolves():
    for name in forge_ray.__all__:
        value = getattr(forge_ray, name)
        assert value is not None, name
        if name != "__version__":
            assert callable(value) or inspect.isclass(value), name


def test_stages_take_inputs_then_out_then_cfg():
    for stage, inputs in STAGES.items():
        assert stage in forge_ray.__all__, stage
        params = list(inspect.signature(getattr(forge_ray, stage)).parameters.values())
        names = [p.name for p in params]
        assert names[:len(inputs) + 2] == [*inputs, "out", "cfg"], (stage, names)
        assert params[len(inputs) + 1].default is None, stage
        if stage in OVERWRITE_POSITIONAL:
            continue
        for p in params[len(inputs) + 2:]:
            assert p.kind is p.KEYWORD_ONLY, (stage, p.name)  # overwrite, resume, ...
