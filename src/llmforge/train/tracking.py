"""Experiment trackers (TensorBoard, Weights & Biases) fed from the training loop's metric records.

`metrics.jsonl` stays the source of truth; the trackers are optional mirrors of it for live
dashboards. Both are optional installs and both are best-effort: a missing package turns its sink
off with one warning, and an exception from a sink while logging is counted and reported once,
never raised, because a dashboard outage must not kill a training job.

Records are the dicts the loop writes, e.g. {"step": 10, "loss": 3.2, "val_loss": 3.4, ...}.
`step` is the x-axis; keys starting with `val_` go under `val/` (val_loss -> val/loss), keys that
already hold a `/` are kept as they are, and everything else goes under `train/` (loss ->
train/loss). Numbers become scalars; strings (such as `skipped`, the reason an update was
skipped) become text where the sink has text, and are never written as scalars.

Resuming: a stage resumed from a checkpoint logs again from the checkpoint's step. TensorBoard
drops what the interrupted run wrote past that step (the writer's purge_step), as
`StageContext.rewind_metrics` does for metrics.jsonl. W&B continues the same run, because its id
is kept in the log directory (`wandb_id.txt`): a rerun into a fresh directory (new settings,
--force) starts a new W&B run, an interrupted one picks its old run up again.
"""

from __future__ import annotations

import logging
import numbers
import resource
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

WANDB_MODES = ("offline", "online", "disabled")
WANDB_ID_FILE = "wandb_id.txt"


@dataclass
class TrackingConfig:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "llmforge"
    # offline writes the run to disk only (upload later with `wandb sync`); online needs a login
    wandb_mode: str = "offline"

    def __post_init__(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {', '.join(WANDB_MODES)},"
                             f" got {self.wandb_mode!r}")
        if not self.wandb_project:
            raise ValueError("wandb_project must not be empty")


def metric_name(key: str) -> str:
    """The tracker tag for a record key: val_loss -> val/loss, loss -> train/loss."""
    if "/" in key:
        return key
    if key.startswith("val_"):
        return "val/" + key[len("val_"):]
    return "train/" + key


def split_record(record: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(scalars, texts) of a record, by tag; `step`, None and other types are left out."""
    scalars: dict[str, float] = {}
    texts: dict[str, str] = {}
    for key, value in record.items():
        if key == "step" or value is None:
            continue
        if isinstance(value, numbers.Real):  # bool included, as 0/1
            scalars[metric_name(key)] = float(value)
        elif isinstance(value, str):
            texts[metric_name(key)] = value
    return scalars, texts


class _TensorBoardSink:
    name = "tensorboard"

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard

        self._make_writer = SummaryWriter
        self.dir = log_dir / "tensorboard"
        self.writer: Any = None

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        if self.writer is None:
            # Opened on the first record, whose step tells where this session starts: events a
            # previous (interrupted) session wrote at this step or later are purged on reading.
            self.writer = self._make_writer(str(self.dir), purge_step=step)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        for tag, text in texts.items():
            self.writer.add_text(tag, text, global_step=step)

    def close(self, exit_code: int) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.flush()
            writer.close()


class _WandbSink:
    name = "wandb"

    def __init__(self, cfg: TrackingConfig, log_dir: Path, run_name: str, config: dict,
                 log: logging.Logger):
        import wandb  # ImportError without wandb

        self.wandb = wandb
        self.logger = log
        self.run_id = wandb_run_id(log_dir)
        self.run = wandb.init(project=cfg.wandb_project, name=run_name, dir=str(log_dir),
                              config=config, mode=cfg.wandb_mode, resume="allow", id=self.run_id)
        self.behind_noted = False

    def log(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        # W&B steps only go up: a resumed online run already holds the steps the interrupted
        # session logged past its checkpoint, and W&B would drop (and warn about) each of them.
        if step < self.run.step:
            if not self.behind_noted:
                self.behind_noted = True
                self.logger.info(f"wandb: run {self.run_id} already has steps up to "
                                 f"{self.run.step - 1}; records before that are not sent again")
            return
        # commit: a record is a whole step, so write it now rather than when the next step comes
        self.run.log({**scalars, **texts}, step=step, commit=True)

    def close(self, exit_code: int) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        run.finish(exit_code=exit_code)  # a failed stage shows as failed in W&B
        # finish() leaves the wandb-core service process running until interpreter exit; stop it
        # unless something else in this process still has a run open.
        if self.wandb.run is None:
            self.wandb.teardown()


def wandb_run_id(log_dir: Path) -> str:
    """The W&B run id of `log_dir`: made once and kept there, so a resumed stage continues the
    same W&B run, and a stage restarted from scratch (its directory wiped) gets a new one."""
    path = log_dir / WANDB_ID_FILE
    if path.is_file():
        run_id = path.read_text().strip()
        if run_id.isalnum():
            return run_id
    run_id = uuid.uuid4().hex[:16]
    log_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


class Trackers:
    """The enabled trackers of one stage. `log(record)` sends a metrics record to each of them;
    nothing here raises into the training loop once constructed (only a bad config does)."""

    def __init__(self, cfg: TrackingConfig, log_dir: Path, run_name: str, config: dict,
                 log: logging.Logger):
        self.logger = log
        self.sinks: list[Any] = []
        self.errors: dict[str, int] = {}  # failed log calls per sink
        self.closed = False
        log_dir = Path(log_dir)
        if cfg.tensorboard:
            self._open("tensorboard", lambda: _TensorBoardSink(log_dir))
        if cfg.wandb:
            self._open("wandb", lambda: _WandbSink(cfg, log_dir, run_name, config, log))

    @property
    def active(self) -> list[str]:
        """Names of the sinks that are logging."""
        return [s.name for s in self.sinks]

    def _open(self, package: str, make: Any) -> None:
        try:
            self.sinks.append(make())
        except ImportError as e:
            self.logger.warning(f"{package} logging is off: the {package!r} package is not "
                              f"installed ({e}); install it with `pip install {package}`")
        except Exception as e:  # e.g. wandb online without a login or network
            self.logger.warning(f"{package} logging is off: it failed to start "
                              f"({type(e).__name__}: {e})")

    def log(self, record: dict[str, Any]) -> None:
        """Send one metrics record (with an integer "step") to every sink."""
        if self.closed or not self.sinks:
            return
        try:
            step = int(record["step"])
        except (KeyError, TypeError, ValueError):
            self._failed("all sinks", ValueError(f"record without an integer step: {record!r}"))
            return
        scalars, texts = split_record(record)
        for sink in self.sinks:
            try:
                sink.log(step, scalars, texts)
            except Exception as e:
                self._failed(sink.name, e, step)

    def _failed(self, name: str, error: Exception, step: int | None = None) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1
        if self.errors[name] == 1:
            at = f" at step {step}" if step is not None else ""
            self.logger.warning(f"{name}: logging failed{at} ({type(error).__name__}: {error}); "
                              "training continues, further failures are only counted")

    def close(self) -> None:
        """Flush and close every sink (finishing the W&B run); safe to call more than once."""
        self._close(exit_code=0)

    def _close(self, exit_code: int) -> None:
        if self.closed:
            return
        self.closed = True
        for sink in self.sinks:
            try:
                sink.close(exit_code)
            except Exception as e:
                self.logger.warning(f"{sink.name}: closing failed ({type(e).__name__}: {e})")
        for name, count in self.errors.items():
            self.logger.warning(f"{name}: {count} logging call(s) failed during this run")

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._close(exit_code=0 if exc_type is None else 1)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory of this process on `device`, in GiB (3 decimals).

    Peak, not current: the peak is the number that decides whether a configuration fits (the
    largest activation + gradient + optimizer footprint during a step), while the current value
    depends on where in the step it is read. CUDA: the most allocated by tensors (`mem_gib`) and
    the most held by the caching allocator (`mem_reserved_gib`, what other processes cannot
    use). Elsewhere (CPU, MPS): the peak resident set size of the whole process, which includes
    Python and library memory and never goes down over the process's life.
    """
    if device.type == "cuda":
        return {"mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
                "mem_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_unit = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return {"mem_gib": round(peak * per_unit / 2**30, 3)}
