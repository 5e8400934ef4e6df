"""This machine as the default pool's node: the nvidia-smi parser on captured output (no GPU here), GPU type names
as the price book spells them, and the detected CPU and memory."""

from __future__ import annotations

import os

import pytest

from services.scheduler.machine import detect_machine, gpu_type_name, parse_nvidia_smi

# `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits` on a DGX A100 and on a g6 (L4).
DGX_A100 = """0, NVIDIA A100-SXM4-80GB, 81920
1, NVIDIA A100-SXM4-80GB, 81920
2, NVIDIA A100-SXM4-80GB, 81920
3, NVIDIA A100-SXM4-80GB, 81920
4, NVIDIA A100-SXM4-80GB, 81920
5, NVIDIA A100-SXM4-80GB, 81920
6, NVIDIA A100-SXM4-80GB, 81920
7, NVIDIA A100-SXM4-80GB, 81920
"""
G6_L4 = "0, NVIDIA L4, 23034\n"
MIXED = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\n2, Tesla T4, 15360\n"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (DGX_A100, (8, "nvidia-a100-80gb")),
        (G6_L4, (1, "nvidia-l4")),
        (MIXED, (2, "nvidia-h100-80gb")),
        ("", (0, "")),
        ("No devices were found\n", (0, "")),
    ],
)
def test_nvidia_smi_output_is_parsed_into_count_and_type(output: str, expected: tuple[int, str]) -> None:
    assert parse_nvidia_smi(output) == expected


@pytest.mark.parametrize(
    ("model", "memory_mib", "expected"),
    [
        ("NVIDIA A100-PCIE-40GB", 40960, "nvidia-a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", 81920, "nvidia-a100-80gb"),
        ("NVIDIA H100 PCIe", 81559, "nvidia-h100-80gb"),
        ("Tesla T4", 15360, "nvidia-t4"),
        ("NVIDIA GeForce RTX 4090", 24564, "nvidia-geforce-rtx-4090"),
    ],
)
def test_gpu_types_are_named_like_the_price_book(model: str, memory_mib: int, expected: str) -> None:
    assert gpu_type_name(model, memory_mib) == expected


def test_this_machine_offers_its_cores_and_memory_and_no_gpu() -> None:
    machine = detect_machine()
    assert machine.cpu_millicores == len(os.sched_getaffinity(0)) * 1000
    assert machine.memory_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") or machine.memory_bytes > 0
    assert (machine.gpus, machine.gpu_type) == (0, "")  # no NVIDIA device on these machines
    assert detect_machine(1500, 2**30).cpu_millicores == 1500
