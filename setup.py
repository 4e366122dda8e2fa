"""megatron-soaes: build with `pip install -e .` (the C++ verify op is built when present in csrc/)."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.6",  # pin torch==2.13.0 on CPU machines (see requirements/ci.txt); clusters bring CUDA torch
    "megatron-core>=0.16.1,<0.20",
    "transformers>=4.45",
    "safetensors>=0.4",
    "sentencepiece>=0.2",
    "tiktoken>=0.7",
    "datasets>=2.19",
    "pybind11>=2.12",
    "pyyaml>=6",
    "pydantic>=2.6",
    "tqdm>=4.66",
    "numpy>=1.26",
    "psutil>=5.9",  # megatron-core dist_checkpointing save workers need it
]

setup(
    name="megatron-soaes",
    version="0.1.0",
    description="Megatron-core based CPT, progressive SFT, distillation and speculative decoding for domain LLMs",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_soaes", "megatron_soaes.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # Transformer Engine needs a CUDA toolkit; NVIDIA apex must be built from its GitHub source
        # (the PyPI package named `apex` is unrelated): see README "GPU extras".
        "gpu": ["transformer-engine[pytorch]>=1.13"],
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
    },
    entry_points={"console_scripts": ["soaes=megatron_soaes.cli:main"]},
)
