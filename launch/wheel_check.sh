#!/usr/bin/env bash
# Build the wheel, install it (not editable) into a fresh virtual environment, and use it the way
# a user of `pip install` does: every console script's --help, then a tiny training run and an
# evaluation of its checkpoint from a folder outside the source tree, with a bundled config name.
# Usage: bash launch/wheel_check.sh   (CI runs it after the test suite, about a minute;
#        WHEEL_CHECK_FULL=1 installs the wheel's declared dependencies too, a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --upgrade pip wheel
"$work/venv/bin/pip" wheel --quiet --no-deps --wheel-dir "$work/dist" .
whl=$(ls "$work"/dist/megatron_longact-*.whl)
# The wheel must carry every package and the example configs.
listing=$("$work/venv/bin/python" -c 'import sys, zipfile; print("\n".join(zipfile.ZipFile(sys.argv[1]).namelist()))' "$whl")
for member in megatron_longact/models/__init__.py megatron_longact/training/__init__.py \
              megatron_longact/configs/demo_cpu.yaml megatron_longact/configs/model/tiny.yaml; do
    if ! grep -qx "$member" <<< "$listing"; then
        echo "wheel check: $member is missing from $(basename "$whl")" >&2
        exit 1
    fi
done
if [[ ${WHEEL_CHECK_FULL:-0} == 1 ]]; then
    # The wheel with its declared dependencies, as `pip install` gives a user (minutes).
    "$work/venv/bin/pip" install --quiet "torch==2.13.0" "$whl"
else
    # Quick mode (CI): the wheel alone, its dependencies borrowed from the test environment that
    # launch/test.sh just built. Only the fresh venv's site-packages holds megatron_longact (the
    # test venv's editable-install hook is not loaded through a .pth path line).
    deps=$(.venv-test/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$work/venv/bin/pip" install --quiet --no-deps "$whl"
    echo "$deps" > "$site/zz_test_deps.pth"
fi
# Nothing of the source tree may leak in.
(cd "$work" && "$work/venv/bin/python" -c 'import megatron_longact, sys; p = megatron_longact.__file__; sys.exit(0 if p.startswith(sys.argv[1]) else "megatron_longact imported from " + p)' "$work/venv")
mkdir "$work/elsewhere"
cd "$work/elsewhere"
for cli in longact-train longact-convert longact-plan longact-eval longact-ablate longact-probe; do
    "$work/venv/bin/$cli" --help > /dev/null
done
"$work/venv/bin/longact-train" --config demo_cpu train.steps=1 sft.steps=1 sft.batch_size=4 \
    train.micro_batch_size=4 rl.prompts_per_step=2 rl.group_size=2 data.ruler.num_samples=16 \
    evaluation.lengths=[] longact.heatmap_interval=1 checkpoint.resume=none output.dir=run
"$work/venv/bin/longact-eval" --checkpoint run/checkpoints --lengths 160 --num-samples 1 \
    --tasks niah_single_1 --max-new-tokens 4 --out run/eval
test -f run/eval/results.json
echo "wheel check: $(basename "$whl") installs, its CLIs start and a run from $(pwd) trains and evaluates"
