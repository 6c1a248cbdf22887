"""Shared plumbing: folders, device and dtype, distributed setup, printing, wandb (downloads:
nanochat/download.py)."""
import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input from the user. The CLI prints the message (no traceback) and exits with 1."""


# ---------------------------------------------------------------------------
# Where files live (docs/design.md)

def get_base_dir() -> str:
    """$NANOCHAT_BASE_DIR, default ~/.cache/nanochat; created on first use."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def get_data_dir() -> str:
    """$NANOCHAT_DATA, default $NANOCHAT_BASE_DIR/data. Laid out like ../shared/data. Not created here:
    a read-only data root (e.g. the shared offline copy) must stay untouched."""
    return os.environ.get("NANOCHAT_DATA") or os.path.join(get_base_dir(), "data")


def absolute_env_paths() -> None:
    """Make a relative NANOCHAT_DATA / NANOCHAT_BASE_DIR absolute, against the directory the
    command was started in. Called once at entry (the `nanochat` command), so that every
    subprocess and every later chdir sees the folder the user meant."""
    for key in ("NANOCHAT_DATA", "NANOCHAT_BASE_DIR"):
        value = os.environ.get(key)
        if value:
            os.environ[key] = os.path.abspath(os.path.expanduser(value))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary name beside `path`, fsync, then rename: readers never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a .jsonl file, one per line. A line that is not a whole JSON object
    (the torn or garbled last line a crash leaves, even invalid UTF-8) is skipped."""
    rows = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw.decode("utf-8"))
            except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# Printing

def get_dist_info():
    """(is_distributed, rank, local_rank, world_size) from torchrun's environment variables."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(*args, **kwargs):
    """print on rank 0 only, flushed (logs under torchrun and pipes arrive in time)."""
    if get_dist_info()[1] == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


# ---------------------------------------------------------------------------
# Device, dtype, distributed

def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device_type(device_type: str | None) -> str:
    """'' / None / 'auto' -> autodetect; otherwise check the request is possible."""
    if not device_type or device_type == "auto":
        return autodetect_device_type()
    if device_type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device-type must be cpu, cuda or mps, not '{device_type}'")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda was asked for but torch sees no CUDA device")
    if device_type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device-type mps was asked for but MPS is not available")
    return device_type


_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32",
           "float16": "float16", "fp16": "float16"}


def get_compute_dtype(device_type: str):
    """The dtype the model computes in (its weights stay fp32): bf16 on CUDA with compute
    capability >= 8.0, and on a CPU whose bf16 matmuls are really faster than its fp32 ones (see
    cpu_bf16); fp32 everywhere else. NANOCHAT_DTYPE=bfloat16|float32|float16 overrides."""
    return compute_dtype_choice(device_type)[0]


def compute_dtype_choice(device_type: str):
    """(dtype, why): get_compute_dtype and the reason for it, for logs and the report card."""
    env = os.environ.get("NANOCHAT_DTYPE")
    if env:
        if env.lower() not in _DTYPES:
            raise UserError(f"NANOCHAT_DTYPE must be one of {sorted(set(_DTYPES))}, not '{env}'")
        return getattr(torch, _DTYPES[env.lower()]), f"NANOCHAT_DTYPE={env}"
    if device_type == "cuda":
        major = torch.cuda.get_device_capability()[0]
        return (torch.bfloat16 if major >= 8 else torch.float32), f"CUDA compute capability {major}.x"
    if device_type == "cpu":
        fast, why = cpu_bf16()
        return (torch.bfloat16 if fast else torch.float32), why
    return torch.float32, f"{device_type}: fp32 by default"


CPU_BF16_MIN_SPEEDUP = 1.3  # bf16 must beat fp32 by this much on a matmul to be chosen on a CPU


def cpu_flags() -> set:
    """The feature flags of this machine's CPU (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _bf16_matmul_speedup(n=768, repeats=5):
    """fp32 matmul seconds / bf16 matmul seconds on an n x n problem, best of `repeats`,
    interleaved so that a busy machine slows both alike."""
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for _ in range(repeats + 1):  # the first round warms up both kernels
        for dtype, (a, b) in ((torch.float32, (a32, b32)), (torch.bfloat16, (a16, b16))):
            t0 = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


_CPU_BF16 = {}


def cpu_bf16():
    """(bf16 is the faster CPU dtype here?, why). Only a CPU with bf16 matrix instructions (AMX
    or AVX512-BF16) can win, and some that have them still do not: a short matmul probe decides,
    cached per process and in $NANOCHAT_BASE_DIR/cpu_dtype.json (per CPU model, torch version and
    thread count), so every stage of a pipeline makes the same choice."""
    key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    if key in _CPU_BF16:
        return _CPU_BF16[key]
    flags = cpu_flags()
    kind = "AMX" if "amx_bf16" in flags else ("AVX512-BF16" if "avx512_bf16" in flags else None)
    if kind is None:
        _CPU_BF16[key] = (False, "CPU without bf16 matrix instructions (AMX, AVX512-BF16): fp32")
        return _CPU_BF16[key]
    path = os.path.join(get_base_dir(), "cpu_dtype.json")
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        cached = {}
    speedup = cached.get(key) if isinstance(cached, dict) else None
    if not isinstance(speedup, (int, float)):
        speedup = _bf16_matmul_speedup()
        cached = (cached if isinstance(cached, dict) else {}) | {key: speedup}
        try:
            atomic_write_text(path, json.dumps(cached, indent=1))
        except OSError:
            pass  # a read-only base dir: probe again next time
    fast = speedup >= CPU_BF16_MIN_SPEEDUP
    _CPU_BF16[key] = (fast, f"CPU with {kind}: a bf16 matmul runs {speedup:.1f}x the fp32 one"
                            f" -> {'bf16' if fast else 'fp32'} (threshold {CPU_BF16_MIN_SPEEDUP}x)")
    return _CPU_BF16[key]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; else what platform knows), for logs and benchmarks."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def autocast_ctx(device):
    """bf16 autocast where the compute dtype is bf16/fp16 (CUDA); a no-op context on CPU/fp32."""
    dtype = get_compute_dtype(device.type)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


CUDA_ALLOC_CONF = "expandable_segments:True"


def set_cuda_alloc_conf(env=os.environ) -> str:
    """Give the CUDA caching allocator expandable segments (upstream does too: segments grow in
    place instead of fragmenting into fixed blocks, so a training step's varying tensor sizes
    waste less memory) unless the user configured the allocator. The allocator reads its
    configuration once, when it starts: call this before the first CUDA allocation.
    Returns the configuration in effect."""
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # torch reads both names
        if env.get(name):
            return env[name]
    env["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_CONF
    return CUDA_ALLOC_CONF


GC_COLLECT_EVERY = 5000  # steps between full collections once automatic collection is off


def gc_step(step: int) -> None:
    """Call once per training step with the number of steps done. After the first step (the
    model, optimizer, loaders and compiled graphs all exist) every live object is moved out of the
    collector's reach (gc.freeze) and automatic collection is turned off: upstream measured
    ~500 ms full scans of those objects at random steps. The loop allocates few reference cycles;
    a full collection every GC_COLLECT_EVERY steps frees them."""
    if step == 1:
        gc.collect()
        gc.freeze()
        gc.disable()
    elif step > 1 and step % GC_COLLECT_EVERY == 0:
        gc.collect()


def gc_restore() -> None:
    """Undo gc_step's freeze: automatic collection back on (tests, and a process that goes on
    after training)."""
    gc.unfreeze()
    gc.enable()


def compute_init(device_type: str | None = None, seed: int = 42):
    """Set up the device (and the process group under torchrun).
    Returns (is_distributed, rank, local_rank, world_size, device)."""
    device_type = resolve_device_type(device_type)
    is_dist, rank, local_rank, world_size = get_dist_info()
    torch.manual_seed(seed)
    if device_type == "cuda":
        set_cuda_alloc_conf()  # before the first allocation on the device
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if is_dist and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            dist.init_process_group(backend=backend, device_id=device)
        else:
            dist.init_process_group(backend=backend)
        dist.barrier()
    return is_dist, rank, local_rank, world_size, device


def compute_cleanup():
    """End of a (torchrun) process. On a normal exit every rank first waits for the others (a rank
    that tears down its process group while another still writes its results can abort it).
    Called from a `finally` while an exception is on its way out, there is no barrier: the other
    ranks may never arrive."""
    gc_restore()  # a training loop's gc_step froze the collector: on again, also after an error
    if dist.is_available() and dist.is_initialized():
        if sys.exc_info()[1] is None and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def get_peak_flops(device) -> float | None:
    """Peak dense bf16 FLOP/s of one accelerator, for MFU. None when unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))[1]


def peak_flops_of(device_name: str):
    """(table key, dense bf16 FLOP/s) for a GPU name as torch reports it, (None, None) if unlisted."""
    name = device_name.lower()
    for key, flops in GPU_PEAK_BF16_FLOPS:
        if key in name:
            return key, flops
    return None, None


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets. First match wins,
# so a name that contains another comes first ("gh200" holds "h200", "h100 nvl" holds "h100").
GPU_PEAK_BF16_FLOPS = [
    ("gb200", 2.5e15),
    ("b200", 2.25e15),
    ("b100", 1.75e15),
    ("gh200", 989e12),
    ("h200 nvl", 835e12),  # the PCIe-card H200 and H100 NVL run at lower clocks than SXM
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h200", 989e12),   # SXM
    ("h100", 989e12),   # SXM / HBM3
    ("h800", 989e12),
    ("h20", 148e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("a10g", 70e12),    # AWS A10G is slower than the A10
    ("a10", 125e12),
    ("a6000", 155e12),  # RTX A6000
    ("l40s", 362e12),
    ("l40", 181e12),
    ("l4", 121e12),
    ("rtx 6000 ada", 364e12),
    ("5090", 209e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("v100", 125e12),   # fp16 tensor cores (V100 has no bf16)
    ("t4", 65e12),
    ("mi300x", 1307e12),
    ("mi250x", 383e12),
]


# ---------------------------------------------------------------------------
# Flags that mean the same in every stage (docs/design.md)

def add_common_flags(parser: argparse.ArgumentParser, model: bool = True) -> None:
    parser.add_argument("--device-type", default="", choices=["", "cpu", "cuda", "mps"],
                        help="cpu|cuda|mps (default: autodetect)")
    parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' = wandb off)")
    if model:
        parser.add_argument("--model-tag", default=None, help="checkpoint folder name (training: d<depth>; loading: the largest model)")
        parser.add_argument("--step", type=int, default=None, help="checkpoint step to load (default: latest)")


class DummyWandb:
    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run: str, project: str, config: dict, master: bool = True):
    """wandb when --run names a run and wandb is installed, else a no-op logger."""
    if run == "dummy" or not master:
        return DummyWandb()
    try:
        import wandb
    except ImportError:
        print0("wandb is not installed (pip install wandb); logging only to metrics.jsonl")
        return DummyWandb()
    return wandb.init(project=project, name=run, config=config)
