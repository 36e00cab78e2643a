from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import pytest

from common.config import from_mapping, load_mapping, save_config, to_mapping


@dataclass(frozen=True, kw_only=True)
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str
    steps: int = 3
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    tags: tuple[str, ...] = ()
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def test_builds_nested_frozen_dataclasses():
    cfg = from_mapping(Outer, {"name": "x", "inner": {"lr": "1e-5", "betas": [0.5, 0.6]}, "tags": ["p"]})
    assert cfg.inner.lr == 1e-5 and cfg.inner.betas == (0.5, 0.6) and cfg.tags == ("p",)
    assert from_mapping(Outer, to_mapping(cfg)) == cfg
    with pytest.raises(AttributeError):
        cfg.steps = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "stepz": 1}, "unknown config key(s) stepz"),
        ({"name": "x", "inner": {"lrr": 1}}, "inner.lrr"),
        ({"name": "x", "steps": "3"}, "steps: expected int"),
        ({"name": "x", "steps": True}, "steps: expected int"),
        ({"name": "x", "flag": 1}, "flag: expected bool"),
        ({"name": "x", "mode": "c"}, "mode: 'c' is not one of"),
        ({"name": "x", "inner": {"betas": [1.0]}}, "inner.betas: expected 2 items"),
        ({"name": "x", "inner": {"lr": "fast"}}, "inner.lr: expected float"),
        ({"steps": 1}, "missing required config key(s) name"),
        ({"name": "x", "steps": -1}, "steps must be >= 0"),
    ],
)
def test_rejects_bad_keys_and_types_naming_the_key(data, message):
    with pytest.raises(ValueError, match=None) as err:
        from_mapping(Outer, data)
    assert message in str(err.value)


def test_dotted_overrides_on_yaml_and_toml(tmp_path):
    (tmp_path / "c.yaml").write_text("outer:\n  name: x\n  inner:\n    lr: 1e-3\n")
    (tmp_path / "c.toml").write_text('[outer]\nname = "x"\n[outer.inner]\nlr = 0.001\n')
    for name in ("c.yaml", "c.toml"):
        data = load_mapping(tmp_path / name, ["outer.inner.lr=1e-5", "outer.steps=7", "outer.tags=[a, b]"])
        cfg = from_mapping(Outer, data["outer"], where="outer")
        assert (cfg.inner.lr, cfg.steps, cfg.tags) == (1e-5, 7, ("a", "b"))
    with pytest.raises(ValueError, match=r"dotted\.key=value"):
        load_mapping(tmp_path / "c.yaml", ["outer.steps"])
    with pytest.raises(ValueError, match=r"outer\.name is not a table"):
        load_mapping(tmp_path / "c.yaml", ["outer.name.x=1"])


def test_unknown_file_and_suffix(tmp_path):
    with pytest.raises(ValueError, match="neither a shipped config"):
        load_mapping(tmp_path / "nope.yaml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.toml"):
        load_mapping(tmp_path / "c.json")


def test_save_config_round_trips(tmp_path):
    cfg = from_mapping(Outer, {"name": "x", "tags": ["a"]})
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert from_mapping(Outer, load_mapping(path)) == cfg


@pytest.mark.parametrize("raw", [".inf", "-.inf", ".nan", "inf", "nan", "-Infinity"])
def test_non_finite_numbers_are_rejected_naming_the_key(tmp_path, raw):
    (tmp_path / "c.yaml").write_text("outer:\n  name: x\n")
    data = load_mapping(tmp_path / "c.yaml", [f"outer.inner.lr={raw}"])
    with pytest.raises(ValueError, match=r"outer\.inner\.lr: must be a finite number"):
        from_mapping(Outer, data["outer"], where="outer")
    with pytest.raises(ValueError, match=r"inner\.betas\[1\]: must be a finite number"):
        from_mapping(Outer, {"name": "x", "inner": {"betas": [0.9, float(raw.replace(".", ""))]}})


def test_every_shipped_job_rejects_a_non_finite_float_anywhere():
    """Each float key of the real job configs (learner, reward, ...), not only the toy classes above."""
    from rollout.job import load_job

    keys = ("learner.loss.omega", "learner.lr", "cluster.reward.timeout_s", "model.lora_alpha", "reward.filter_std")
    for key in keys:
        with pytest.raises(ValueError, match=f"{re.escape(key)}: must be a finite number"):
            load_job("tiny", [f"{key}=.nan"])
