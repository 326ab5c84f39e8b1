"""punica-playground.

`pip install -e .` works everywhere. The CUDA extension (csrc/) is built only when a CUDA
toolkit and a CUDA build of torch are present and the build is run without isolation
(`pip install -e . --no-build-isolation`); otherwise it is compiled just in time on first use
on a GPU machine (punica_core/ops/cuda_backend.py), and never on a machine without CUDA.
"""
import os
import sys

from setuptools import find_packages, setup


def cuda_extensions():
    """The CUDA extension, when this machine can build it; else nothing."""
    if os.environ.get("PUNICA_NO_CUDA_BUILD"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return [], {}
    if CUDA_HOME is None or torch.version.cuda is None:
        return [], {}
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
    try:
        from build_ext_config import extension_and_cmdclass  # csrc/build_ext_config.py
    except ImportError:
        return [], {}
    return extension_and_cmdclass()


ext_modules, cmdclass = cuda_extensions()

setup(
    name="punica-playground",
    version="0.1.0",
    description="Multi-tenant LoRA serving with SGMV kernels and an interactive playground",
    packages=find_packages(include=["punica_core", "punica_core.*", "app", "app.*"]),
    python_requires=">=3.10",
    install_requires=[line.strip() for line in open("requirements.txt")
                      if line.strip() and not line.startswith("#")],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
