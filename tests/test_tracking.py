"""Experiment trackers: what reaches TensorBoard and W&B, and that a tracker never breaks a run."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmforge.train import tracking
from llmforge.train.tracking import Trackers, TrackingConfig, memory_stats, metric_name

LOG = logging.getLogger("tests.tracking")

# Shaped like the training loop's records: every step has loss and lr, some have more.
RECORDS = [
    {"step": 1, "loss": 4.0, "lr": 1e-3},
    {"step": 2, "loss": 3.5, "lr": 2e-3, "grad_norm": 0.9, "tokens_per_s": 2600.0, "mfu": 0.2},
    {"step": 3, "loss": 3.25, "lr": 3e-3, "skipped": "loss spike: 9.000 > 2.0 x mean 3.500"},
    {"step": 4, "loss": 3.0, "lr": 3e-3, "val_loss": 3.4},
    {"step": 5, "loss": 2.75, "lr": 3e-3, "val_loss": 3.1},
]


def read_events(tb_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_metric_names():
    assert [metric_name(k) for k in ("loss", "val_loss", "lr", "eval/mmlu")] == [
        "train/loss", "val/loss", "train/lr", "eval/mmlu"]


def test_tensorboard_scalars_and_text(tmp_path):
    pytest.importorskip("tensorboard")
    with Trackers(TrackingConfig(tensorboard=True), tmp_path, "run", {}, LOG) as trackers:
        assert trackers.active == ["tensorboard"]
        for r in RECORDS:
            trackers.log(r)
    acc = read_events(tmp_path / "tensorboard")
    tags = acc.Tags()["scalars"]
    assert scalars(acc, "train/loss") == [(r["step"], pytest.approx(r["loss"])) for r in RECORDS]
    assert scalars(acc, "val/loss") == [(4, pytest.approx(3.4)), (5, pytest.approx(3.1))]
    assert scalars(acc, "train/grad_norm") == [(2, pytest.approx(0.9))]
    assert "val_loss" not in tags and "train/val_loss" not in tags
    # The skip reason is text, not a scalar.
    assert not any("skipped" in t for t in tags)
    assert [t for t in acc.Tags()["tensors"] if "skipped" in t] == ["train/skipped/text_summary"]
    assert trackers.errors == {}
    trackers.close()  # idempotent


def test_tensorboard_resume_drops_what_was_logged_past_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    with Trackers(TrackingConfig(tensorboard=True), tmp_path, "run", {}, LOG) as trackers:
        for r in RECORDS:  # interrupted after step 5, last checkpoint at step 3
            trackers.log(r)
    with Trackers(TrackingConfig(tensorboard=True), tmp_path, "run", {}, LOG) as trackers:
        for step in (4, 5, 6):
            trackers.log({"step": step, "loss": 1.0})
    acc = read_events(tmp_path / "tensorboard")
    assert scalars(acc, "train/loss") == [(1, 4.0), (2, 3.5), (3, 3.25), (4, 1.0), (5, 1.0),
                                          (6, 1.0)]
    assert acc.Tags()["scalars"].count("val/loss") == 1
    assert scalars(acc, "val/loss") == []  # both points were past the checkpoint


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path,
           "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_CACHE_DIR": tmp_path / "cache",
           "WANDB_DATA_DIR": tmp_path / "data", "WANDB_DISABLE_GIT": "true"}
    for var, value in env.items():
        monkeypatch.setenv(var, str(value))
    yield wandb
    wandb.teardown()  # in case a test failed before closing its run


def wandb_children() -> list[str]:
    """wandb-core service processes started by this process."""
    ps = subprocess.run(["ps", "--ppid", str(os.getpid()), "-o", "cmd="],
                        capture_output=True, text=True)
    return [line for line in ps.stdout.splitlines() if "wandb-core" in line]


def test_wandb_offline_run_and_resume(tmp_path, wandb_offline, caplog):
    log_dir = tmp_path / "train"
    config = {"lr": 3e-3, "max_steps": 5}
    trackers = Trackers(TrackingConfig(wandb=True), log_dir, "tiny-pretrain", config, LOG)
    assert trackers.active == ["wandb"]
    run = trackers.sinks[0].run
    assert run.name == "tiny-pretrain" and run.config["lr"] == 3e-3
    for r in RECORDS:
        trackers.log(r)
    assert run.summary["train/loss"] == 2.75 and run.summary["val/loss"] == 3.1
    # Steps W&B already has (a resume that rewound) are not sent: W&B would drop them anyway.
    with caplog.at_level(logging.INFO, logger=LOG.name):
        trackers.log({"step": 3, "loss": 9.0})
        trackers.log({"step": 4, "loss": 9.0})
    assert run.summary["train/loss"] == 2.75
    assert len([r for r in caplog.records if "already has steps up to 5" in r.getMessage()]) == 1
    trackers.close()
    trackers.close()
    assert trackers.errors == {}
    assert wandb_offline.run is None and not wandb_children()  # nothing left running

    run_id = (log_dir / "wandb_id.txt").read_text().strip()
    (first,) = (log_dir / "wandb").glob("offline-run-*")
    assert first.name.endswith(f"-{run_id}")
    history = (first / f"run-{run_id}.wandb").read_bytes()
    assert b"train/loss" in history and b"val/loss" in history and b"train/skipped" in history

    # A resumed stage (same directory) continues the same W&B run.
    with Trackers(TrackingConfig(wandb=True), log_dir, "tiny-pretrain", config, LOG) as again:
        assert again.sinks[0].run.id == run_id
        again.log({"step": 6, "loss": 2.5})
    runs = sorted((log_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in runs)
    assert all((p / f"run-{run_id}.wandb").is_file() for p in runs)
    # A fresh directory is a new run.
    with Trackers(TrackingConfig(wandb=True), tmp_path / "other", "x", {}, LOG) as other:
        assert other.sinks[0].run.id != run_id


class ExplodingWriter:
    """Stands in for SummaryWriter: a tracker whose disk (or server) has gone away."""

    def __init__(self, *args, **kwargs):
        self.closed = False

    def add_scalar(self, *args, **kwargs):
        raise OSError("disk full")

    add_text = add_scalar

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_a_failing_sink_is_counted_and_warned_about_once(tmp_path, monkeypatch, caplog):
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    monkeypatch.setattr(tensorboard, "SummaryWriter", ExplodingWriter)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        trackers = Trackers(TrackingConfig(tensorboard=True), tmp_path, "run", {}, LOG)
        for r in RECORDS:
            trackers.log(r)  # must not raise
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "tensorboard" in warnings[0] and "disk full" in warnings[0]
        assert trackers.errors == {"tensorboard": len(RECORDS)}
        writer = trackers.sinks[0].writer
        trackers.close()
    assert writer.closed
    assert "5 logging call(s) failed" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("module, package", [("wandb", "wandb"),
                                             ("torch.utils.tensorboard", "tensorboard")])
def test_a_missing_package_warns_and_the_run_goes_on(tmp_path, monkeypatch, caplog, module,
                                                     package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    cfg = TrackingConfig(tensorboard=package == "tensorboard", wandb=package == "wandb")
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        with Trackers(cfg, tmp_path, "run", {}, LOG) as trackers:
            assert trackers.active == []
            trackers.log(RECORDS[0])
    missing = [r.getMessage() for r in caplog.records if "not installed" in r.getMessage()]
    assert len(missing) == 1 and f"pip install {package}" in missing[0]
    assert trackers.errors == {}


def test_nothing_enabled_is_a_no_op(tmp_path):
    with Trackers(TrackingConfig(), tmp_path, "run", {}, LOG) as trackers:
        trackers.log(RECORDS[0])
    assert trackers.active == [] and list(tmp_path.iterdir()) == []


def current_rss_gib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def test_memory_stats_cpu_is_the_peak():
    cpu = torch.device("cpu")
    before = memory_stats(cpu)
    assert set(before) == {"mem_gib"} and before["mem_gib"] > 0
    x = torch.ones(50_000_000)  # 200 MB, touched so it is resident
    after = memory_stats(cpu)["mem_gib"]
    if Path("/proc/self/statm").is_file():  # Linux: the peak covers what is resident now
        now = current_rss_gib()
        assert now > 50_000_000 * 4 / 2**30
        assert after >= round(now, 3) - 0.001  # and so it counts the tensor (and the units fit)
    del x
    assert after >= before["mem_gib"]
    assert memory_stats(cpu)["mem_gib"] >= after  # a peak never drops


def test_memory_stats_cuda_reports_allocated_and_reserved(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30 + 12345)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 4.5 * 2**30)
    assert memory_stats(torch.device("cuda", 0)) == {"mem_gib": 3.0, "mem_reserved_gib": 4.5}


def test_tracking_config_validates():
    with pytest.raises(ValueError, match="wandb_mode"):
        TrackingConfig(wandb=True, wandb_mode="cloud")
    assert TrackingConfig().wandb_mode == "offline"
    assert tracking.WANDB_MODES == ("offline", "online", "disabled")
