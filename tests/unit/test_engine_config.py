"""load_ds_config's settings for the hot path: DeepSpeed's throughput timer (it synchronizes the
device twice per micro-batch) is off in every shipped config and in a user's config that does
not mention it; train.compile is refused with ZeRO-3 in one line naming the fix."""
import glob
import json

import pytest

from apollo_ds.config import ConfigError, load_config
from apollo_ds.training.engine import load_ds_config


@pytest.mark.parametrize("path", sorted(glob.glob("ds_configs/*.json")))
def test_shipped_configs_turn_the_timer_off(path):
    with open(path) as f:
        ds = json.load(f)
    assert ds["timers"]["throughput"] == {"enabled": False, "synchronized": False}
    assert ds["wall_clock_breakdown"] is False


def test_user_config_gets_the_timer_off(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    ds = load_ds_config(load_config(None, [f"train.deepspeed_config={p}"]), 1)
    assert ds["timers"]["throughput"]["enabled"] is False
    p.write_text(json.dumps({"zero_optimization": {"stage": 1},
                             "timers": {"throughput": {"enabled": True}}}))
    ds = load_ds_config(load_config(None, [f"train.deepspeed_config={p}"]), 1)
    assert ds["timers"]["throughput"]["enabled"] is True      # an explicit choice is kept


def test_compile_refused_with_zero3():
    cfg = load_config(None, ["train.compile=true",
                             "train.deepspeed_config=ds_configs/zero3_bf16.json"])
    with pytest.raises(ConfigError) as e:
        load_ds_config(cfg, 1)
    assert str(e.value) == ("ds_configs/zero3_bf16.json: train.compile=true is not supported "
                            "with ZeRO stage 3; use ZeRO 1 or 2 (ds_configs/zero2_bf16.json) or "
                            "train.compile=false")
    cfg = load_config(None, ["train.compile=true",
                             "train.deepspeed_config=ds_configs/zero2_bf16.json"])
    assert load_ds_config(cfg, 1)["zero_optimization"]["stage"] == 2


def test_zero1_contiguous_gradients_off_unless_set(tmp_path):
    """ZeRO-1 skips DeepSpeed's per-gradient copy into a contiguous bucket (every gradient stays
    whole until the reduction there); an explicit choice is kept, other stages untouched."""
    def ds_for(zero: dict) -> dict:
        p = tmp_path / "ds.json"
        p.write_text(json.dumps({"zero_optimization": zero}))
        return load_ds_config(load_config(None, [f"train.deepspeed_config={p}"]), 1)
    assert ds_for({"stage": 1})["zero_optimization"]["contiguous_gradients"] is False
    assert ds_for({"stage": 1, "contiguous_gradients": True})[
        "zero_optimization"]["contiguous_gradients"] is True
    assert "contiguous_gradients" not in ds_for({"stage": 2})["zero_optimization"]
    cfg = load_config(None, ["train.deepspeed_config=ds_configs/zero1_fp32.json"])
    assert load_ds_config(cfg, 1)["zero_optimization"]["contiguous_gradients"] is False
