"""Structure and device rules that hold without running a job: model/ knows nothing of
training/ (or apollo/, data/, convert/), the CUDA device of a rank honours the visible
devices, bf16 DeepSpeed configs accumulate and reduce gradients in fp32, and bf16 at ZeRO 0 is
refused before launch."""
import ast
import json
from pathlib import Path

import pytest

from apollo_ds.config import ConfigError, RunConfig
from apollo_ds.distributed import device_index
from apollo_ds.training.engine import load_ds_config

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_model_imports_nothing_from_the_layers_above():
    banned = ("apollo_ds.training", "apollo_ds.apollo", "apollo_ds.data", "apollo_ds.convert")
    files = sorted((REPO / "apollo_ds" / "model").glob("*.py"))
    assert len(files) >= 4
    bad = [(f.name, m) for f in files for m in _imports(f) if m.startswith(banned)]
    assert bad == []


def test_device_index_honours_visible_devices():
    # one visible GPU per task (--gpus-per-task=1): always device 0
    assert [device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]
    # all 8 GPUs of a node visible to each task: LOCAL_RANK picks one
    assert [device_index(r, 8) for r in (0, 3, 7)] == [0, 3, 7]
    # 2 visible per task (CUDA_VISIBLE_DEVICES=2,3 for local ranks 2 and 3)
    assert [device_index(r, 2) for r in (2, 3)] == [0, 1]
    with pytest.raises(RuntimeError, match="no device is visible"):
        device_index(0, 0)


def _cfg(tmp_path, ds: dict, pp: int = 1) -> RunConfig:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = RunConfig()
    cfg.train.deepspeed_config = str(path)
    cfg.parallel.pp = pp
    return cfg


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_bf16_configs_accumulate_and_reduce_in_fp32(stage):
    ds = json.loads((REPO / "ds_configs" / f"zero{stage}_bf16.json").read_text())
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["communication_data_type"] == "fp32"


def test_user_bf16_config_gets_fp32_accumulation(tmp_path):
    cfg = _cfg(tmp_path, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
    ds = load_ds_config(cfg, dp=1)
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["communication_data_type"] == "fp32"


def test_bf16_accumulation_in_bf16_refused(tmp_path):
    cfg = _cfg(tmp_path, {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True},
                          "data_types": {"grad_accum_dtype": "bf16"}})
    with pytest.raises(ConfigError, match=r"data_types.grad_accum_dtype='bf16'.*fp32"):
        load_ds_config(cfg, dp=1)


def test_zero0_bf16_refused_before_launch(tmp_path):
    cfg = _cfg(tmp_path, {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"bf16 needs ZeRO stage >= 1.*zero1_bf16.json"):
        load_ds_config(cfg, dp=1)
