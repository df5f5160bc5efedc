"""Two gloo processes on loopback reach the same meta-parameters as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imaml_seg.checkpoint import load_checkpoint
from imaml_seg.meta.trainer import init_theta

TINY = Path(__file__).parents[1] / "fixtures" / "tiny.toml"


@pytest.mark.parametrize("algorithm", ["imaml", "maml"])
def test_two_ranks_match_one(tmp_path, algorithm) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = [
        "-m",
        "imaml_seg",
        "meta-train",
        "--config",
        str(TINY),
        "--algorithm",
        algorithm,
        "--meta-steps",
        "3",
        "-q",
    ]
    subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], check=True, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two")], check=True, env=env)
    one = load_checkpoint(tmp_path / "one" / "checkpoint.safetensors")
    two = load_checkpoint(tmp_path / "two" / "checkpoint.safetensors")
    assert one.step == two.step == 3
    start = init_theta(one.config, torch.device("cpu"))
    assert any(not torch.equal(one.theta[k], start[k]) for k in start)  # training moved theta
    for name, value in one.theta.items():
        torch.testing.assert_close(two.theta[name], value, rtol=1e-5, atol=1e-6)
