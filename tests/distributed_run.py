"""Train recipes one after another in this process: ``python tests/distributed_run.py RUNS_JSON``.

``RUNS_JSON`` is a JSON list of ``{"recipe": name, "overrides": [...]}``. tests/test_distributed.py launches it
with ``accelerate launch --num_processes 2 --cpu`` so that one pair of processes trains several recipes.
"""

from __future__ import annotations

import json
import logging
import sys

import torch

from alignkit.compose import load_run_config
from alignkit.distributed import end_process_group
from alignkit.trainer import Trainer


def projection(samples: torch.Tensor, prompts: list[str], metadata: list[dict]) -> list[float]:
    """A smooth reward with a wide spread between samples: a fixed random projection of the pixels.

    Unlike JPEG size it does not jump when samples differ in the last bits (one or two processes encode
    prompts in batches of different sizes, which changes the text encoders' last bits); unlike the mean
    brightness its spread is large, so group normalisation does not magnify those bits.
    """
    flat = samples.flatten(1).double()  # [B, D]
    w = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # [D]
    return (flat @ w / flat.shape[1] ** 0.5).tolist()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    for run in json.loads(sys.argv[1]):
        Trainer(load_run_config(run["recipe"], run["overrides"]), tensorboard=False).train()
    end_process_group()
