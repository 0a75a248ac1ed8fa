"""Rank discovery under srun without Slurm's clients on PATH (the full path, scontrol and two
emulated nodes, runs in tests/e2e/test_slurm.py): torch's variables come from SLURM_*, and the
first node of a compressed node list is expanded by hand."""
from __future__ import annotations

import os

import pytest

from apollo_ds import distributed


@pytest.mark.parametrize("nodelist, want", [("node[1-2]", "node1"), ("gpu[07,09-12]", "gpu07"),
                                            ("a3,b4", "a3"), ("localhost", "localhost")])
def test_slurm_env_without_scontrol(monkeypatch, nodelist, want):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")          # no scontrol
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    distributed._slurm_env()
    got = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                      "MASTER_PORT")}
    assert got == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": want,
                   "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_torch_launcher_wins(monkeypatch):
    """torchrun/deepspeed inside an allocation set RANK themselves: SLURM_* must not override."""
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed._slurm_env()
    assert os.environ["RANK"] == "5" and "WORLD_SIZE" not in os.environ
