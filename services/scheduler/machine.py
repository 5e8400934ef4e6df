"""This machine as a node of the default pool: CPU cores, memory, and GPUs from ``nvidia-smi`` (or torch.cuda)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass

__all__ = [
    "MachineCapacity",
    "detect_machine",
    "machine_cores",
    "machine_memory_bytes",
    "parse_nvidia_smi",
    "gpu_type_name",
    "NVIDIA_SMI_QUERY",
]

log = logging.getLogger(__name__)

#: The nvidia-smi arguments whose output ``parse_nvidia_smi`` reads.
NVIDIA_SMI_QUERY = ("--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits")
_FORM_FACTORS = {"sxm", "sxm2", "sxm4", "sxm5", "pcie", "nvl", "hbm3", "tensor", "core", "gpu", "nvidia", "tesla"}
#: Families whose price depends on the memory size (a type name carries it, like the price book's).
_SIZED = {"a100", "h100", "h200", "a800", "h800"}


@dataclass(frozen=True)
class MachineCapacity:
    cpu_millicores: int
    memory_bytes: int
    gpus: int = 0
    gpu_type: str = ""


def gpu_type_name(model: str, memory_mib: int) -> str:
    """The platform's GPU type for a device name: "NVIDIA A100-SXM4-80GB" -> "nvidia-a100-80gb", "NVIDIA L4" ->
    "nvidia-l4" (the price book's names)."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", model.lower()) if t and t not in _FORM_FACTORS]
    sized = [t for t in tokens if re.fullmatch(r"\d+gb", t)]
    tokens = [t for t in tokens if t not in sized]
    if tokens and tokens[0] in _SIZED:
        size = sized[0] if sized else f"{round(memory_mib / 1024)}gb"
        tokens = [*tokens, size]
    return "nvidia-" + "-".join(tokens) if tokens else "nvidia-gpu"


def parse_nvidia_smi(output: str) -> tuple[int, str]:
    """(count, type) of the GPUs in ``nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits``
    output. A node has one GPU type: with mixed models only the most common type is offered."""
    types = []
    for line in output.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        memory = int(parts[2]) if parts[2].isdigit() else 0
        types.append(gpu_type_name(parts[1], memory))
    if not types:
        return 0, ""
    (kind, count), *others = Counter(types).most_common()
    if others:
        log.warning("mixed GPU models on this machine: offering the %d %s only", count, kind)
    return count, kind


def _detect_gpus() -> tuple[int, str]:
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            result = subprocess.run([smi, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=20, check=True)
            return parse_nvidia_smi(result.stdout)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("nvidia-smi failed (%s): no GPUs offered", exc)
            return 0, ""
    if not os.path.exists("/dev/nvidia0"):
        return 0, ""  # no driver device: don't pay torch's import to learn that
    try:
        import torch  # noqa: PLC0415 - heavy and optional; only on machines with an NVIDIA device

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            memory = [torch.cuda.get_device_properties(i).total_memory // 2**20 for i in range(len(names))]
            lines = "\n".join(f"{i}, {n}, {m}" for i, (n, m) in enumerate(zip(names, memory, strict=True)))
            return parse_nvidia_smi(lines)
    except Exception as exc:  # noqa: BLE001 - a broken CUDA install must not stop the scheduler
        log.warning("torch.cuda detection failed (%s): no GPUs offered", exc)
    return 0, ""


def machine_memory_bytes() -> int:
    """This machine's memory (MemTotal)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def detect_machine(cpu_millicores: int = 0, memory_bytes: int = 0) -> MachineCapacity:
    """This machine's capacity; non-zero arguments override what is detected."""
    gpus, gpu_type = _detect_gpus()
    cpus = cpu_millicores or machine_cores() * 1000
    return MachineCapacity(cpus, memory_bytes or machine_memory_bytes(), gpus, gpu_type)


def machine_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
