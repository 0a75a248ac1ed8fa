"""apollo_ds: Apollo progressive pretraining of GPT models on DeepSpeed + megatron-core."""
from setuptools import find_packages, setup

# Pinned so a CPU clone reproduces the tested stack; on a CUDA cluster install a CUDA torch
# first (see README), then `pip install -e .`: torch==2.13.0 is then already satisfied.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "deepspeed==0.19.8",
    "megatron-core==0.16.1",
    "sentencepiece==0.2.3",
    "numpy==2.4.6",
    "mpi4py==4.1.2",
    "transformers==5.24.0",
    "accelerate==1.16.0",        # transformers.Trainer (examples/finetune_hf.py)
    "tensorboard",
    "pyyaml",
    "tqdm",
    "tokenizers>=0.20",         # tokenizer.json / GPT-2 BPE tokenizers, byte-level BPE training
    "tiktoken>=0.7",            # tiktoken encoding files as data.tokenizer
]

setup(
    name="apollo_ds",
    version="0.1.0",
    description="Apollo progressive training (LVPS depth sampling, interpolation growth) "
                "for GPT on DeepSpeed and megatron-core",
    packages=find_packages(include=["apollo_ds", "apollo_ds.*"]),
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "mpi": ["mpich==5.0.2"],   # a pip-installed MPI runtime for mpi4py / mpirun
        "test": ["pytest", "pytest-timeout", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "apollo-ds=apollo_ds.cli:main",
        ],
    },
)
