"""What a resume refuses (model, Apollo schedule, seed, global batch, tokenizer, data) and what
it accepts and reports (layout, train.steps, intervals): apollo_ds.training.resume on a
recorded run state, no process group needed."""
import pytest

from apollo_ds.config import ConfigError, load_config
from apollo_ds.training import resume

LAYOUT = {"dp": 2, "tp": 1, "pp": 1, "zero": 1, "dtype": "torch.float32"}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "spm.model").write_bytes(b"tokenizer one")
    (tmp_path / "text.bin").write_bytes(b"\0" * 64)
    (tmp_path / "text.idx").write_bytes(b"index one")
    return tmp_path


def cfg(files, *overrides):
    base = [f"data.prefix={files / 'text'}", f"data.tokenizer={files / 'spm.model'}",
            "model.layers=4", "train.steps=20", "train.micro_batch=2", "train.global_batch=8",
            "apollo.enabled=true", "apollo.stages=[1,2,4]", "apollo.stage_ends=[0.25,0.5]"]
    return load_config(None, base + list(overrides))


def saved(files, *overrides):
    return resume.record(cfg(files, *overrides), LAYOUT)


def refusal(state, c, layout=LAYOUT) -> str:
    with pytest.raises(ConfigError) as e:
        resume.check(state, c, layout, "ckpt/step_0000010")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot resume from ckpt/step_0000010: ")
    return msg


@pytest.mark.parametrize("override,expected", [
    ("model.hidden=64", "model.hidden was 128, this run has 64"),
    ("model.layers=8", "model.layers was 4, this run has 8"),
    ("apollo.stages=[2,4]", "apollo.stages was [1, 2, 4], this run has [2, 4]"),
    ("apollo.sampler=constant_low", "apollo.sampler was lvps, this run has constant_low"),
    ("apollo.stage_ends=[0.3,0.5]", "apollo.stage_ends (in steps) was [5, 10], this run has [6, 10]"),
    ("train.seed=7", "train.seed was 1234, this run has 7"),
    ("train.global_batch=16", "train.global_batch was 8, this run has 16"),
    ("data.split=90,10,0", "data.split was 98,2,0, this run has 90,10,0"),
])
def test_changed_settings_are_refused_with_old_and_new_values(files, override, expected):
    msg = refusal(saved(files), cfg(files, override))
    assert expected in msg, msg
    assert "restore the checkpoint's setting to resume, or use a new train.out_dir" in msg


def test_more_steps_with_fractional_stage_ends_is_refused_with_the_step_numbers(files):
    # 0.25 and 0.5 of 20 steps are steps 5 and 10; of 40 steps they would be 10 and 20
    msg = refusal(saved(files), cfg(files, "train.steps=40"))
    assert "apollo.stage_ends (in steps) was [5, 10], this run has [10, 20]" in msg
    assert msg.endswith("pass the ends as step numbers: apollo.stage_ends=[5,10]")
    v = resume.check(saved(files), cfg(files, "train.steps=40", "apollo.stage_ends=[5,10]"),
                     LAYOUT, "ckpt")
    assert v.same_layout and v.notes == ["train.steps changed on resume: 20 -> 40"]


def test_another_tokenizer_or_corpus_is_refused_even_under_the_same_paths(files):
    state = saved(files)
    (files / "spm.model").write_bytes(b"tokenizer two")
    assert "data.tokenizer was " in refusal(state, cfg(files))
    (files / "spm.model").write_bytes(b"tokenizer one")
    (files / "text.idx").write_bytes(b"index two")
    assert f"data.prefix was {files / 'text'}" in refusal(state, cfg(files))


def test_several_changes_name_the_first_and_count_the_rest(files):
    msg = refusal(saved(files), cfg(files, "model.hidden=64", "train.seed=7"))
    assert "model.hidden was 128" in msg and "(and 1 more: train.seed)" in msg


def test_layout_and_interval_changes_are_accepted_and_reported(files):
    state = saved(files)
    assert resume.check(state, cfg(files), LAYOUT, "ckpt") == resume.Verdict(True, [])
    tp2 = dict(LAYOUT, dp=1, tp=2, zero=3)
    v = resume.check(state, cfg(files, "train.micro_batch=4", "train.save_interval=5",
                                "train.stop_after=3"), tp2, "ckpt")
    assert not v.same_layout
    assert v.notes == [
        "resuming under another layout (dp 2 -> 1, tp 1 -> 2, zero 1 -> 3): loading the "
        "layout-free per-parameter state",
        "train.micro_batch changed on resume: 2 -> 4",
        "train.save_interval changed on resume: 0 -> 5"]   # stop_after is per invocation


def test_another_dp_wide_micro_batch_is_reported(files):
    v = resume.check(saved(files), cfg(files), dict(LAYOUT, dp=1), "ckpt")
    assert not v.same_layout
    assert v.notes[-1].startswith("the data-parallel-wide micro-batch changed (4 -> 2 samples)")
