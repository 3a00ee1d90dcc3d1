from setuptools import find_packages, setup

setup(
    name="miss_ds",
    version="0.1.0",
    description="MiSS (Matrix Shard Sharing) fine-tuning for DeepSpeed and tensor parallelism",
    packages=find_packages(include=["miss_ds", "miss_ds.*"]),
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.8,<0.20",  # private internals: miss_ds/ds_compat.py
        "transformers>=5.0,<6",  # model internals: modeling.py, loading.py
        "datasets>=4.3",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "mpi4py>=4.0",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
        "psutil>=5.9",
        "peft>=0.17",  # the PEFT MiSS and LoRA exports, and generating with them
    ],
    # The commands (miss_ds/cli/); launch/train.py and tools/*.py wrap the same functions.
    entry_points={"console_scripts": [
        "miss-ds-train=miss_ds.cli.train:run",
        "miss-ds-convert=miss_ds.cli.convert:main",
        "miss-ds-reshard=miss_ds.cli.reshard:main",
        "miss-ds-generate=miss_ds.cli.generate:main",
        "miss-ds-eval=miss_ds.cli.evaluate:run",
        "miss-ds-plan-memory=miss_ds.cli.plan_memory:main",
    ]},
    # megatron-core: its tensor-parallel linears, wrapped by miss_ds.parallel.megatron, run on CPU too.
    # liger-kernel: model.kernels=liger (miss_ds/fused_kernels.py), fused Triton kernels for CUDA GPUs.
    extras_require={"test": ["pytest>=8", "megatron-core>=0.12,<0.17"], "liger": ["liger-kernel>=0.8.5,<0.9"]},
)
