"""The test-only fault hook (apollo_ds/training/faults.py): its grammar, and that each injected
fault has exactly the effect the non-finite tests rely on."""
import math

import pytest
import torch

from apollo_ds.training import faults


@pytest.fixture
def fault(monkeypatch):
    def set_(text):
        monkeypatch.setattr(faults, "_ITEMS", faults._parse(text))
    return set_


def test_grammar():
    assert faults._parse("nan_loss@step=3, inf_grad@step=4-6@rank=1,sleep_save@s=0.5") == [
        {"kind": "nan_loss", "steps": (3, 3)},
        {"kind": "inf_grad", "steps": (4, 6), "rank": 1},
        {"kind": "sleep_save", "s": 0.5}]
    assert faults._parse("") == []
    with pytest.raises(ValueError, match="unknown fault 'nan_los'"):
        faults._parse("nan_los@step=3")
    with pytest.raises(ValueError, match="unknown key 'stp'"):
        faults._parse("nan_loss@stp=3")


def _loss_and_grad(step):
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = faults.loss((x * x).sum(), step)
    y.backward()
    return y.item(), x.grad.tolist()


def test_nan_loss_keeps_gradients_finite(fault):
    fault("nan_loss@step=3")
    assert _loss_and_grad(2) == (5.0, [2.0, 4.0])        # another step: untouched
    value, grad = _loss_and_grad(3)
    assert math.isnan(value) and grad == [2.0, 4.0]      # only the loss check can see it


def test_bad_grad_keeps_the_loss_finite(fault):
    fault("nan_grad@step=3-4,inf_grad@step=5")
    value, grad = _loss_and_grad(4)
    assert value == 5.0 and all(math.isnan(g) for g in grad)
    value, grad = _loss_and_grad(5)
    assert value == 5.0 and all(math.isinf(g) for g in grad)


def test_other_rank_untouched(fault):
    fault("nan_loss@step=3@rank=1")    # this process is rank 0 (no process group)
    assert _loss_and_grad(3) == (5.0, [2.0, 4.0])


def test_sleep_announces(fault, capsys):
    fault("sleep_save@s=0.01")
    faults.sleep("save", "step_0000004")
    faults.sleep("expand")           # not asked for: silent
    assert capsys.readouterr().out == "fault: sleep_save 0.01 s step_0000004\n"
