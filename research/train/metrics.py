"""Metrics to a ``metrics.jsonl`` file and TensorBoard event files, from process 0 only."""

from __future__ import annotations

import json
import os

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> dict:
        values = {k: float(np.asarray(v)) for k, v in metrics.items()}
        if self.enabled:
            self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
            if self._tb is not None:
                for key, value in values.items():
                    self._tb.add_scalar(key, value, int(step))
        return values

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
