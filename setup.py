"""fastddpm: fused, graph-captured, reproducible DDPM sampling and training for PyTorch.

Nothing is compiled at install time: the C++/CUDA sources in ``csrc/`` ship inside the package
(as ``fastddpm/csrc``) and are built on first use with ``torch.utils.cpp_extension.load`` (ninja),
then cached. The Triton kernels in ``kernels/`` install as ``fastddpm.kernels``.
"""

from pathlib import Path

from setuptools import find_packages, setup

# torch is required but never pinned: an installed torch of any recent version is kept as is.
INSTALL_REQUIRES = ["torch>=2.4", "numpy", "safetensors", "tqdm", "pillow", "scikit-learn", "matplotlib", "ninja"]
EXTRAS = {
    "triton": ["triton>=3.0"],
    "test": ["pytest", "pytest-benchmark", "diffusers==0.42.1", "triton>=3.0", "ruff"],
}

setup(
    name="fastddpm",
    version="0.1.0",
    description="Fused, CUDA-graph-captured, reproducible DDPM/DDIM sampling and training for PyTorch",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastddpm", "fastddpm.*"]) + ["fastddpm.kernels", "fastddpm.csrc"],
    package_dir={"fastddpm.kernels": "kernels", "fastddpm.csrc": "csrc"},
    package_data={
        "fastddpm.csrc": ["*.h", "*.cpp", "*.cu", "*.cuh"],
        "fastddpm.models": ["*/*.json", "*/*.safetensors", "*/*.md"],
        "fastddpm.quality": ["*.safetensors", "*.json"],
    },
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["fastddpm=fastddpm.cli:main"]},
)
