"""The machine a run is on, and the choices that depend on it. Each choice is made by a documented capability check
(`native_bf16_matmul`, `expert_gemm_path`), never by assuming the developer's CPU: a bf16 matmul is ~2x faster than
fp32 on a CPU with AVX-512 bf16 instructions and ~7x slower on one with AVX2 only.

Imports nothing else of nanoKimi: the model and the optimizer both ask it."""

import functools
import getpass
import os
import tempfile

import torch

from .errors import UserError


def cpu_kind():
    """The CPU level torch runs at (DEFAULT, AVX2, AVX512, ...) and the bf16/AMX matrix instructions it uses, e.g.
    "AVX512 + bf16" (AVX-512 with native bf16 dot products) or "AVX2" (bf16 only by emulation). What torch runs, not
    what CPUID reports: under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 an AVX-512 CPU says "AVX2"."""
    extras = (
        [
            name
            for name, has in (("bf16", torch.cpu._is_avx512_bf16_supported), ("AMX", torch.cpu._is_amx_tile_supported))
            if has()
        ]
        if cpu_bf16_matmul()
        else []
    )
    return " + ".join([torch.backends.cpu.get_cpu_capability(), *extras])


def cpu_bf16_matmul():
    """Whether torch multiplies bf16 matrices on this CPU with native instructions: the CPU has them (CPUID: AVX-512
    bf16 or AMX), ATen dispatches at an AVX-512 level (ATEN_CPU_CAPABILITY can lower it) and oneDNN, which runs CPU
    bf16 matmuls, offers bf16 (ONEDNN_MAX_CPU_ISA can take it away; asked only where this torch has oneDNN). CPUID
    alone is fooled by those variables: it chose bf16, which then ran emulated at ~50x fp32's cost."""
    return (
        (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        and (not torch.backends.mkldnn.is_available() or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    )


def describe(device):
    """One line naming the hardware behind `device`: the CPU kind and threads, and the GPU's name and compute
    capability when it is one."""
    line = f"CPU {cpu_kind()}, {torch.get_num_threads()} threads"
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        line += f"; GPU {torch.cuda.get_device_name(device)} (sm{major}{minor})"
    return line


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def native_bf16_matmul(device):
    """Whether `device` multiplies bf16 matrices in hardware (and so faster than fp32), by capability: a CUDA GPU of
    compute capability >= 8.0 (Ampere on), a CPU where torch runs bf16 natively (`cpu_bf16_matmul`: AVX-512 bf16 or
    AMX, at the level torch dispatches at). Elsewhere bf16 is emulated:
    ~7x slower than fp32 on an AVX2 CPU (BENCHMARKS, step). A rule, not a timing: a timing taken while other work
    loads the cores flipped from start to start (5 identical starts chose bf16, fp32, fp32, fp32, bf16)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return cuda_capability(index) >= (8, 0)
    if device.type == "cpu":
        return cpu_bf16_matmul()
    return False


@functools.cache
def cuda_capability(index):
    return torch.cuda.get_device_capability(index)


def expert_gemm_path(device, dtype, widths):
    """How the routed experts' GEMMs run: "grouped" (torch._grouped_mm, one call per projection) or "loop" (one
    matmul per expert's slice of tokens, with a host sync for the slice bounds; works everywhere).

    A capability check, from torch's documented limits: torch._grouped_mm needs every row 16-byte aligned (each
    width in `widths` times the element size) on every device; on CUDA its kernel needs bf16 and compute capability
    >= 8.0 (its fast kernel sm90; older GPUs and fp16 would crash or fall back to torch's own per-expert loop, so
    the loop here is the known-good path). On CPU torch loops over the experts in C++, faster than ours."""
    device = torch.device(device)
    if not hasattr(torch, "_grouped_mm") or device.type not in ("cpu", "cuda"):
        return "loop"
    if any(w * dtype.itemsize % 16 for w in widths):
        return "loop"
    index = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else 0
    if device.type == "cuda" and (dtype != torch.bfloat16 or cuda_capability(index) < (8, 0)):
        return "loop"
    return "grouped"


def available_memory(device):
    """Bytes a new allocation can take on `device`: the GPU's free memory, else the OS's available memory (Linux's
    MemAvailable, or all physical memory where that is not reported); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_device(device):
    """A device this machine has, or a UserError naming the one it lacks."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={device} but no CUDA GPU is visible: use --device=cpu")
    if device.startswith("cuda:") and not (device[5:].isdigit() and int(device[5:]) < torch.cuda.device_count()):
        raise UserError(f"--device={device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps but Apple's MPS backend is not available here: use --device=cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise UserError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps")


def compile_model(module):
    """torch.compile(module), its kernels cached in a folder of the CPU capability ATen runs at (unless
    TORCHINDUCTOR_CACHE_DIR names one): torch 2.13 keys its cached CPU kernels without it, so kernels compiled under
    ATEN_CPU_CAPABILITY=avx2 (how an AVX2 CPU is measured on an AVX-512 one) are loaded by a later AVX-512 run of
    the same code, which then aborts ("free(): invalid next size", measured on Zen 4). torch's default folder counts
    as none named: importing torch._inductor writes it into the environment."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    default = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")  # torch's own, once torch._inductor loads
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default) == default:
        capability = torch.backends.cpu.get_cpu_capability().lower()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default}_{capability}"
    return torch.compile(module)
