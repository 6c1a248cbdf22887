"""What the benchmark scripts share (run them as `python -m bench.<name>` from the repository
root): a model with random weights built as the commands build theirs, the autocast the
commands use, a timer that waits for the device, and a description of the machine."""
import os
import platform
import time

import torch

from nanochat.common import autocast_ctx, cpu_model, get_compute_dtype, synchronize
from nanochat.gpt import GPT

__all__ = ["autocast_ctx", "machine", "random_model", "timed"]


def random_model(config, device, freeze=True, seed=0):
    """GPT(config) with init weights on `device`: built on the meta device, materialized,
    initialized; frozen in the compute dtype (as chat, serve and the evaluations load a
    checkpoint: eval mode, and on CPU the inference layout) unless freeze=False (training)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if freeze:
        model.freeze(get_compute_dtype(torch.device(device).type))
    return model


def timed(fn, device):
    """(fn(), seconds), the device synchronized before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def machine(device=None):
    """Where a figure was measured: CPU model and count, the GPU if any, torch, the date."""
    info = {"cpu": cpu_model(), "cpus": os.cpu_count(), "arch": platform.machine(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
