"""Config loading, overrides and validation: every bad setting on the list fails fast with
its own message."""
from pathlib import Path

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
    (["apollo.growth_noise=-0.1"], "apollo.growth_noise=-0.1 must be in [0, 1]"),
    (["apollo.growth_noise=2"], "apollo.growth_noise=2.0 must be in [0, 1]"),
    (["apollo.update_scale=sqrt"], "apollo.update_scale='sqrt' is unknown"),
    (["train.lr_schedule=linear"], "train.lr_schedule='linear' is unknown"),
    (["train.decay=-1"], "train.decay=-1.0 must be >= 0"),
    (["train.decay=0.2"], "train.decay=0.2 applies to train.lr_schedule=wsd only"),
    # stages end at 10, 20, 50 of 200: a decay over the last 80% starts before step 50
    (["train.lr_schedule=wsd", "train.decay=0.8"], "starts the wsd decay after step 40"),
    (["train.lr_schedule=wsd", "train.decay=200"], "outside steps 50..199"),
    (["train.rewarmup_steps=-2"], "train.rewarmup_steps=-2 must be >= 0"),
    (["train.rewarmup_steps=11"], "train.rewarmup_steps=11 is longer than the shortest stage"),
    (["train.lr_after_growth=0"], "train.lr_after_growth=0.0 must be in (0, 100]"),
    (["train.lr_after_growth=nan"], "train.lr_after_growth=nan must be in (0, 100]"),
    (["model.arch=bert"], "model.arch='bert' is unknown; choose one of gpt2, llama"),
    (["model.arch=llama", "model.kv_heads=3"], "model.kv_heads=3 must divide model.heads=4"),
    (["model.kv_heads=2"], "grouped-query attention needs model.arch=llama"),
    (["model.tie_embeddings=false"], "model.tie_embeddings=false needs model.arch=llama"),
    (["model.arch=llama", "model.tie_embeddings=maybe"], "expected true or false"),
    (["model.arch=llama", "model.kv_heads=2", "parallel.tp=4"],
     "parallel.tp=4 does not divide model.kv_heads=2"),
    (["model.arch=llama", "model.ffn_hidden=102", "parallel.tp=4"],
     "parallel.tp=4 does not divide the MLP width 102"),
    (["model.arch=llama", "model.hidden=20", "model.heads=4"], "must be even"),
    (["train.on_nonfinite=ignore"], "train.on_nonfinite='ignore' is unknown; choose one of "
                                    "stop, skip"),
    (["train.max_skipped=-1"], "train.max_skipped must be >= 0"),
    (["train.recompute=attention"], "train.recompute='attention' is unknown; choose one of "
                                    "none, selective, full"),
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


def test_new_levers_accepted():
    cfg = cfg_of("apollo.optimizer_state=release", "apollo.growth_noise=0.01",
                 "apollo.update_scale=inv_uses", "train.lr_schedule=wsd", "train.decay=0.5",
                 "train.rewarmup_steps=10")
    assert cfg.apollo.optimizer_state == "release" and cfg.train.decay == 0.5
    for mode in ("copy", "copy_scaled", "reset", "release"):
        assert cfg_of(f"apollo.optimizer_state={mode}").apollo.optimizer_state == mode


@pytest.mark.parametrize("stages", [[6, 12], [3, 12]])
def test_a_single_later_growth(stages):
    # growth factor and timing need no new option: one expansion (2x or 4x) at 25% of 200 steps
    cfg = validate(load_config("configs/tiny_cpu.yaml", BASE + [
        "model.layers=12", f"apollo.stages={stages}", "apollo.stage_ends=[0.25]"]),
        check_files=False)
    assert cfg.apollo.stages == stages and stage_end_steps(cfg) == [50, 200]


def test_release_tiny_preset_states_the_release_settings():
    cfg = validate(load_config("configs/release_tiny.yaml"), check_files=False)
    m, a, t = cfg.model, cfg.apollo, cfg.train
    assert (m.layers, m.hidden, m.seq_len, m.vocab_size) == (12, 128, 128, 1024)
    assert (a.stages, a.stage_ends, a.sampler, a.grow) == (
        [1, 3, 6, 12], [0.05, 0.10, 0.25], "lvps", "interpolate")
    assert (a.optimizer_state, a.growth_noise, a.update_scale) == ("release", 0.0, "none")
    assert (t.steps, t.global_batch, t.lr, t.lr_schedule, t.warmup, t.rewarmup_steps) == (
        400, 16, 1e-3, "cosine", 0.025, 0)
    assert (t.beta2, t.weight_decay, t.min_lr) == (0.999, 0.01, 0.0)
    assert stage_end_steps(cfg) == [20, 40, 100, 400]


def test_llama_defaults():
    from apollo_ds.config import ffn_width, kv_heads_of, tied
    cfg = cfg_of("model.arch=llama")
    m = cfg.model
    # 8/3 x 192 = 512 exactly; kv_heads 0 means one per query head; untied head by default
    assert (ffn_width(m), kv_heads_of(m), tied(m)) == (512, 4, False)
    m.hidden = 200
    assert ffn_width(m) == 576                   # 533.3 rounded up to a multiple of 64
    assert tied(cfg_of().model) and ffn_width(cfg_of().model) == 4 * 192


PRESETS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("*.yaml")))
def test_every_shipped_preset_validates(preset):
    # world sizes the presets name: 2 CPU processes, or 8 GPUs for the *_small_* ones
    world = 8 if "small" in preset else 2
    cfg = validate(load_config(str(PRESETS / preset)), world_size=world, check_files=False)
    assert cfg.train.global_batch % (cfg.train.micro_batch * world) == 0
