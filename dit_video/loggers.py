"""Where a run's metrics go: CSV (metrics.csv in the run folder), Weights & Biases or TensorBoard."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from dit_video.errors import ConfigError


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when its folder is not empty (it always
    is: config.yaml is written first), so a run resumed in its own folder (`+resume=RUN_DIR`) lost
    its history. This one keeps the file, takes its header, and appends."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(header))


class RunCSVLogger(CSVLogger):
    """CSVLogger writing `<run_dir>/metrics.csv` and appending to it on resume."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


def build_logger(cfg: DictConfig, run_dir: Path):
    kind = cfg.logger.kind
    if kind == "csv":
        return RunCSVLogger(save_dir=str(run_dir), name="", version="")
    if kind == "wandb":
        return WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            name=cfg.name,
            save_dir=str(run_dir),
            offline=bool(cfg.logger.offline),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401  (optional: the event-file writer and the video summary proto)
        except ImportError:
            raise ConfigError("logger=tensorboard needs the tensorboard package: "
                              "`pip install tensorboard` (or `pip install -e .[logging]`)") from None
        return TensorBoardLogger(save_dir=str(run_dir), name=str(cfg.logger.subdir), version="",
                                 default_hp_metric=False)
    raise ConfigError(f"logger.kind={kind!r}: use 'csv', 'wandb' or 'tensorboard'")
