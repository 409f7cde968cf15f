from typing import Literal

import pytest
from pydantic import Field

from pitlm.config import StageConfig, apply_overrides, load_config, recipe_names
from pitlm.errors import ConfigError


class Optim(StageConfig):
    lr: float = Field(3e-4, gt=0)
    betas: list[float] = [0.9, 0.95]


class Toy(StageConfig):
    mode: Literal["scratch", "lora", "full"] = "scratch"
    steps: int = Field(100, ge=1)
    optim: Optim = Optim()


def test_overrides_apply_with_yaml_typing(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("stage: toy\nmode: lora\nsteps: 5\n")
    cfg = load_config(Toy, str(path), ["steps=7", "optim.lr=1e-3", "optim.betas=[0.8, 0.9]"])
    assert cfg.mode == "lora" and cfg.steps == 7 and cfg.optim.lr == 1e-3 and cfg.optim.betas == [0.8, 0.9]


def test_override_does_not_mutate_input():
    base = {"optim": {"lr": 1.0}}
    apply_overrides(base, ["optim.lr=2"])
    assert base == {"optim": {"lr": 1.0}}


@pytest.mark.parametrize("override, expect", [
    (["steps=abc"], "config key 'steps': bad value 'abc'"),
    (["steps=0"], "config key 'steps': bad value 0: Input should be greater than or equal to 1"),
    (["mode=dpo"], "config key 'mode': bad value 'dpo': expected 'scratch', 'lora' or 'full'"),
    (["stpes=3"], "config key 'stpes' is not known"),
    (["optim.lr=-1"], "config key 'optim.lr': bad value -1"),
    (["noequals"], "--set expects key=value"),
])
def test_validation_errors_are_one_line_naming_key_and_value(override, expect):
    with pytest.raises(ConfigError) as e:
        load_config(Toy, None, override)
    msg = str(e.value)
    assert msg.startswith(expect), msg
    assert "\n" not in msg


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_config(Toy, "nope")


def test_shipped_recipes_are_valid_yaml_mappings():
    from pitlm.config import load_recipe

    for name in recipe_names():
        data = load_recipe(name)
        assert isinstance(data, dict) and "stage" in data, name


def test_shipped_train_recipes_pass_the_trainers_checks():
    from pitlm.config import load_recipe
    from pitlm.train.config import TrainConfig, check_config

    checked = 0
    for name in recipe_names():
        data = load_recipe(name)
        if data.get("stage") != "train":
            continue
        cfg = TrainConfig.model_validate({k: v for k, v in data.items() if k != "stage"})
        check_config(cfg, world_size=cfg.nproc)
        checked += 1
    assert checked >= 3
