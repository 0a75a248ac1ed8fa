"""apollo_ds: Apollo progressive pretraining of GPT models on DeepSpeed + megatron-core."""
from setuptools import find_packages, setup

# Ranges, not pins: installing into a machine's own CUDA PyTorch (an NGC container, a cluster
# module) must never replace its torch. The tested set is pinned in constraints.txt (pip -c);
# the CPU torch build the tests use is pinned in the Makefile's venv recipe. torch >= 2.11:
# apollo_ds uses no torch API newer than 2.11.
INSTALL_REQUIRES = [
    "torch>=2.11,<2.14",
    "deepspeed>=0.19.8,<0.20",
    "megatron-core>=0.16.1,<0.17",
    "sentencepiece>=0.2",
    "numpy>=1.26",
    "mpi4py>=4.0",
    "transformers>=5.0,<6",
    "accelerate>=1.0",          # transformers.Trainer (examples/finetune_hf.py)
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
        "mpi": ["mpich>=4"],       # a pip-installed MPI runtime for mpi4py / mpirun
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "matplotlib"],
        # optional: metrics.jsonl is always written; TensorBoard event files when installed
        # (left out of the offline wheelhouse: with grpcio and pillow it is 20 MiB)
        "tensorboard": ["tensorboard"],
    },
    entry_points={
        "console_scripts": [
            "apollo-ds=apollo_ds.cli:main",
        ],
    },
)
