"""Config loading, overrides and validation: every bad setting on the list fails fast with
its own message."""
import pytest

from apollo_ds.config import ConfigError, load_config, stage_end_steps, validate

BASE = ["data.prefix=x", "data.tokenizer=y"]


def cfg_of(*overrides, check_files=False, world=None):
    cfg = load_config("configs/tiny_cpu.yaml", list(BASE) + list(overrides))
    return validate(cfg, world_size=world, check_files=check_files)


def test_preset_and_overrides_typed():
    cfg = cfg_of("model.layers=6", "train.steps=40", "apollo.stages=[1,3,6]",
                 "apollo.stage_ends=[0.05,0.10]", "train.lr=1e-3", "parallel.tp=2")
    assert cfg.model.layers == 6 and cfg.train.steps == 40
    assert cfg.apollo.stages == [1, 3, 6] and cfg.parallel.tp == 2
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert stage_end_steps(cfg) == [2, 4, 40]


def test_explicit_step_numbers():
    cfg = cfg_of("train.steps=100", "apollo.stage_ends=[5,10,25]")
    assert stage_end_steps(cfg) == [5, 10, 25, 100]


def test_disabled_apollo_is_plain_full_depth():
    cfg = cfg_of("apollo.enabled=false")
    assert cfg.apollo.stages == [cfg.model.layers] and cfg.apollo.stage_ends == []


BAD = [
    (["model.bogus=1"], "unknown config key 'model.bogus'"),
    (["nosuch.key=1"], "unknown config section 'nosuch'"),
    (["model.heads=5"], "model.heads=5 does not divide model.hidden=192"),
    (["train.global_batch=12", "train.micro_batch=8"], "train.global_batch=12 is not divisible"),
    (["data.prefix=", "CHECK"], "data.prefix is not set"),
    (["data.tokenizer=", "CHECK"], "data.tokenizer is not set"),
    (["model.layers=abc"], "model.layers='abc': expected an integer"),
    (["train.lr=0"], "train.lr=0.0 must be > 0"),
    (["apollo.stages=[1,3,3,6]"], "must strictly increase"),
    (["apollo.stages=[1,2,3,5]"], "the last stage must equal model.layers=6"),
    (["apollo.stage_ends=[0.10,0.05,0.25]"], "must be in increasing order"),
    (["apollo.stage_ends=[0.05,0.10,250]"], "end before train.steps=200"),
    (["apollo.stage_ends=[0.05,0.10]"], "must have one entry per stage but the last"),
    (["apollo.sampler=fancy"], "apollo.sampler='fancy' is unknown"),
    (["apollo.grow=blend"], "apollo.grow='blend' is unknown"),
    (["apollo.optimizer_state=keep"], "apollo.optimizer_state='keep' is unknown"),
    (["parallel.tp=3"], "parallel.tp=3 does not divide model.heads=4"),
    (["train.optimizer=sgd"], "train.optimizer='sgd' is unknown"),
    (["bad-override"], "bad override 'bad-override'"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_setting_refused(overrides, message):
    check = "CHECK" in overrides
    with pytest.raises(ConfigError) as e:
        cfg_of(*[o for o in overrides if o != "CHECK"], check_files=check)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_world_size_checks():
    with pytest.raises(ConfigError, match="world size 3 is not a multiple"):
        cfg_of("parallel.tp=2", world=3)
    with pytest.raises(ConfigError, match="data-parallel size 3"):
        cfg_of("train.global_batch=16", "train.micro_batch=8", world=3)


def test_missing_files_named():
    with pytest.raises(ConfigError, match="DeepSpeed config not found: nope.json"):
        cfg_of("train.deepspeed_config=nope.json", check_files=True)
    with pytest.raises(ConfigError, match="config file not found: missing.yaml"):
        load_config("missing.yaml")


def test_bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(p))
