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

# torch==2.13.0 and vllm==0.32.0 (pyproject's `gpu` extra) as built for CUDA 12.8: vLLM's PyPI
# wheel is compiled against torch's cu128 build, which cluster.yaml installs from this index.
CUDA = "12.8"
TORCH_INDEX = "https://download.pytorch.org/whl/cu128"


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
                f"driver supports CUDA {CUDA} (ImageId in cluster.yaml), or change runner/cuda_pin.py's CUDA and "
                "TORCH_INDEX with cluster.yaml's --extra-index-url to a build the driver runs")
    if installed is not None and installed != CUDA:
        return (f"the installed torch is built for CUDA {installed}, not the pinned {CUDA}: pip took another build; "
                f"reinstall with --extra-index-url {TORCH_INDEX}")
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
