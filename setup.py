"""megatron-soaes: `pip install --no-build-isolation .` (or `-e .`) after torch is installed.

The tree-verify op in csrc/ is always built for the CPU; its CUDA kernel too when the installed
torch is a CUDA build and nvcc is found (SOAES_NO_CUDA=1 skips it). Without build isolation the
build uses the torch already installed, so a CPU machine never pulls a CUDA torch to build.
"""

import os

from setuptools import find_packages, setup


def _extensions():
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("megatron-soaes: torch not importable at build time; the native verify op is not built "
              "(install torch first and use --no-build-isolation)")
        return [], {}
    sources = ["csrc/tree_verify.cpp"]
    flags = {"cxx": ["-O3", "-std=c++17"]}
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and not os.environ.get("SOAES_NO_CUDA"))
    if use_cuda:
        flags["cxx"].append("-DSOAES_WITH_CUDA")
        flags["nvcc"] = ["-O3", "-DSOAES_WITH_CUDA", "-std=c++17"]
        ext = CUDAExtension("megatron_soaes._C", sources + ["csrc/tree_verify_cuda.cu"], extra_compile_args=flags)
    else:
        ext = CppExtension("megatron_soaes._C", sources, extra_compile_args=flags)
    return [ext], {"build_ext": BuildExtension}


EXT_MODULES, CMDCLASS = _extensions()

INSTALL_REQUIRES = [
    "torch>=2.6",  # pin torch==2.13.0 on CPU machines (requirements/cpu.txt); clusters bring CUDA torch
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
    "xxhash>=3.0",  # checkpoint manifests: a 128-bit checksum of every file at ~10 GB/s per core
    "jieba>=0.42",  # word-level Rouge (character-level is the default)
    "sacrebleu>=2.4",  # BLEU-4 (Chinese tokenizer)
    "matplotlib>=3.8",  # loss curves, metric and speedup plots
    "datasketch>=2.0",  # curation: MinHash + LSH near-duplicates
]

setup(
    name="megatron-soaes",
    version="0.1.0",
    description="Megatron-core based CPT, progressive SFT, distillation and speculative decoding for domain LLMs",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_soaes", "megatron_soaes.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # Transformer Engine needs a CUDA toolkit; NVIDIA apex must be built from its GitHub source
        # (the PyPI package named `apex` is unrelated): see README "GPU extras".
        "gpu": ["transformer-engine[pytorch]>=1.13"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "rouge-chinese==1.0.3", "peft>=0.13"],
        # pretrained models shipped as GGUF (base.hf: smollm2-135m-instruct, make pipeline)
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],
    },
    entry_points={"console_scripts": ["soaes=megatron_soaes.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
