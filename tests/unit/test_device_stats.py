"""The step line's per-device figures (apollo_ds.training.metrics.DeviceStats): model TFLOP/s
per device, MFU against the card's dense bf16 peak looked up by device name, peak memory (host
RSS on CPU)."""
import resource

import pytest
import torch

from apollo_ds.training.metrics import DeviceStats, peak_for


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A10", 125),
    ("NVIDIA A10G", None), ("NVIDIA L40S", 362), ("NVIDIA L4", 121), ("Some New Card", None)])
def test_peak_table(name, peak):
    assert peak_for(name)[0] == peak


def test_cpu_fields_and_text():
    st = DeviceStats(torch.device("cpu"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    f = st.fields(6e12, 3)          # 6 TFLOP/s over 3 processes
    assert f["tflops_per_device"] == pytest.approx(2.0)
    assert f["mfu"] is None and f["peak_mem_kind"] == "host_rss"
    assert rss <= f["peak_mem_gib"] < rss + 0.5   # peak RSS only grows
    text = st.text(6e12, 3)
    assert text.startswith("2.000 TFLOP/s/proc | MFU n/a | peak mem ") and text.endswith(" GiB RSS")


def test_mfu_with_a_known_peak():
    st = DeviceStats(torch.device("cpu"), peak_tflops=400.0)
    assert st.fields(8 * 200e12, 8)["mfu"] == pytest.approx(0.5)
    assert "MFU 50.0%" in st.text(8 * 200e12, 8)
