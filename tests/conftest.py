import os
import warnings

# Keep test output readable: megatron-core warns about missing Apex/TE on every import.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite runs megatron-core on the CPU on purpose, also on machines that have GPUs.
os.environ.setdefault("MEGATRON_LONGACT_CPU", "1")
