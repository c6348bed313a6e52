"""The CUDA build of torch and vLLM that cluster.yaml pins, checked against a node's driver.

cluster.yaml's setup_commands run it twice on every node: with the system python before the venv
is built (`python3 runner/cuda_pin.py`: the driver supports the pinned CUDA) and with the venv's
after it (`--installed`: the installed torch is that build). A node without `nvidia-smi` (the CPU
head) skips both. Standard library only: it runs before anything is installed.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

# torch==2.13.0 and vllm==0.32.0 (pyproject's `gpu` extra) as PyPI builds them: CUDA 13.0. Read from
# the wheels (2026-12-07): torch 2.13.0's manylinux wheel requires cuda-toolkit==13.0.3 and
# nvidia-nccl-cu13; vLLM 0.32.0's requires torch==2.13.0 and cu13 kernels, and its extensions link
# libcudart.so.13 and libnvrtc.so.13, so a torch of another CUDA (a cu12x index) cannot load them.
# cluster.yaml installs both from PyPI, with no other torch index.
CUDA = "13.0"


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def driver_cuda(smi_output: str) -> str | None:
    """The highest CUDA version the driver supports, from `nvidia-smi`'s banner ("CUDA Version: 12.4")."""
    m = re.search(r"CUDA Version:\s*(\d+\.\d+)", smi_output)
    return m.group(1) if m else None


def problem(driver: str | None, installed: str | None = None) -> str | None:
    """Why this node cannot run the pinned build, or None: the driver's CUDA must be at least the
    pin's (same major: a newer driver runs older 12.x builds), and the installed torch the pin's build."""
    if driver is None:
        return "nvidia-smi printed no 'CUDA Version': is the NVIDIA driver loaded?"
    if _version(driver)[0] != _version(CUDA)[0] or _version(driver) < _version(CUDA):
        return (f"the driver supports CUDA {driver}, the pinned torch/vLLM build needs CUDA {CUDA}: use an image whose "
                f"driver supports CUDA {CUDA} (NVIDIA driver 580 or newer; ImageId in cluster.yaml): vLLM 0.32.0's "
                "wheel is built for it")
    if installed is not None and installed != CUDA:
        return (f"the installed torch is built for CUDA {installed}, not the pinned {CUDA}: pip took another build; "
                "reinstall torch==2.13.0 from PyPI, with no other torch index (PIP_EXTRA_INDEX_URL, pip.conf)")
    return None


def main(argv: list[str]) -> int:
    if shutil.which("nvidia-smi") is None:
        print("cuda_pin: no nvidia-smi on this node (a CPU node): the CUDA check is skipped")
        return 0
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
    installed = None
    if "--installed" in argv:
        import torch  # deferred: only in the venv, after the install
        installed = torch.version.cuda
    why = problem(driver_cuda(smi), installed)
    if why:
        print(f"cuda_pin: {why}", file=sys.stderr)
        return 1
    print(f"cuda_pin: driver CUDA {driver_cuda(smi)} runs the pinned CUDA {CUDA} build"
          + (f" (installed torch: CUDA {installed})" if installed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
