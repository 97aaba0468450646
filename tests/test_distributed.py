"""Pretraining as users launch it: real processes, torchrun with gloo on CPU, SIGKILL and resume.

Every run here is a subprocess of `llmforge pretrain` on the tiny recipe, started alone or under
`torchrun --nproc_per_node 2`, on token shards made once for the module.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmforge.cli import main
from llmforge.model.io import load_model
from llmforge.train import checkpoint
from llmforge.train.loop import TrainConfig, make_optimizers

TINY = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
UPSTREAM = ("data", "tokenizer", "tokenize")
# fp32 so that one process and two agree to float tolerance; a short schedule with checkpoints.
TRAIN = ["train.dtype=fp32", "train.max_steps=16", "train.eval_every=8", "train.ckpt_every=8",
         "train.log_every=4"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A run root holding finished data, tokenizer and tokenize stages."""
    root = tmp_path_factory.mktemp("upstream")
    assert main(["run", str(TINY), f"run_dir={root}", f"stages=[{','.join(UPSTREAM)}]"]) == 0
    return root / "tiny"


def launch(run_dir: Path, nproc: int, *overrides: str) -> subprocess.Popen:
    """`llmforge pretrain` on the tiny recipe in its own process(es)."""
    cli = ["-m", "llmforge.cli", "pretrain", str(TINY), f"run_dir={run_dir}", *TRAIN, *overrides]
    if nproc > 1:
        cli = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *cli], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def pretrain(tmp_path: Path, shards: Path, name: str, nproc: int, *overrides: str) -> Path:
    """Run pretraining to the end on a copy of the shared shards; return its run root."""
    root = tmp_path / name
    if shards is not None:
        shutil.copytree(shards, root / "tiny")
    proc = launch(root, nproc, *overrides)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return root / "tiny"


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "pretrain/metrics.jsonl").open()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "pretrain/model/model.safetensors")


def test_two_ranks_match_one_process_at_the_same_global_batch(tmp_path, shards):
    single = pretrain(tmp_path, shards, "single", 1, "train.batch_size=8")
    # DDP from an empty run directory: rank 0 alone makes data, tokenizer and shards while
    # rank 1 waits, then both train on their halves of each global batch.
    ddp = pretrain(tmp_path, None, "ddp", 2, "train.batch_size=4")
    fsdp = pretrain(tmp_path, shards, "fsdp", 2, "train.batch_size=4", "train.parallel=fsdp")
    for stage in UPSTREAM:
        assert (ddp / stage / "summary.json").is_file()
    assert (ddp / "tokenize/train.bin").read_bytes() == (shards / "tokenize/train.bin").read_bytes()
    reference = losses(single)
    assert len(reference) == 16 and reference[-1] < reference[0]
    for run in (ddp, fsdp):
        assert losses(run) == pytest.approx(reference, rel=1e-4)
        summary = json.loads((run / "pretrain/summary.json").read_text())
        assert summary["world_size"] == 2 and summary["tokens_seen"] == 16 * 8 * 128
        for name, tensor in weights(run).items():
            torch.testing.assert_close(tensor, weights(single)[name], rtol=1e-3, atol=1e-5)


def test_fsdp_with_muon_and_document_masking_matches_one_process(tmp_path, shards):
    options = ("train.optimizer=muon", "train.doc_masking=true")
    single = pretrain(tmp_path, shards, "single", 1, "train.batch_size=8", *options)
    fsdp = pretrain(tmp_path, shards, "fsdp", 2, "train.batch_size=4", "train.parallel=fsdp",
                    *options)
    assert losses(fsdp) == pytest.approx(losses(single), rel=1e-4)

    # The checkpoint two FSDP2 ranks wrote loads into one plain process: weights and optimizer.
    step_dir = fsdp / "pretrain/checkpoints/step_0000016"
    assert sorted(p.name for p in step_dir.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    model = load_model(fsdp / "pretrain/model")
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    checkpoint.load_weights(step_dir, model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights(fsdp)[name]), name
    optimizers = make_optimizers(model, TrainConfig(optimizer="muon"))
    step, state = checkpoint.resume(fsdp / "pretrain/checkpoints", model, optimizers)
    assert (step, state["world_size"]) == (16, 2)
    muon_state = optimizers[0].state[model.layers[0].attn.wq.weight]
    assert muon_state["momentum_buffer"].shape == model.layers[0].attn.wq.weight.shape
    assert muon_state["momentum_buffer"].abs().sum() > 0


def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(tmp_path, shards):
    options = ("train.max_steps=40", "train.ckpt_every=3", "train.batch_size=8",
               "train.spike_factor=3.0")
    reference = pretrain(tmp_path, shards, "uninterrupted", 1, *options)

    root = tmp_path / "killed"
    shutil.copytree(shards, root / "tiny")
    metrics = root / "tiny/pretrain/metrics.jsonl"
    kill_at = random.randint(4, 34)
    proc = launch(root, 1, *options)
    while proc.poll() is None and _last_step(metrics) < kill_at:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_after = _last_step(metrics)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before step {kill_at}"
    assert not (root / "tiny/pretrain/summary.json").exists()

    resumed = pretrain(tmp_path, None, "killed", 1, *options)
    log = (resumed / "pretrain/log.txt").read_text()
    if killed_after >= 3:
        assert "resumed from step" in log, (kill_at, killed_after)
    assert losses(resumed) == losses(reference)
    expected = weights(reference)
    for name, tensor in weights(resumed).items():
        assert torch.equal(tensor, expected[name]), (name, kill_at, killed_after)


def _last_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if line.endswith("}")]
    return max(steps, default=0)
