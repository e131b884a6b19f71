#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (about 5 minutes on an H200):
#   the CUDA tests (CUDA = CPU masks bit for bit, state that follows the model to CUDA, the 2:4
#   export), FSDP2 on CUDA over NCCL and in 2 processes over gloo (tests/test_sharded.py -k cuda) and bench/sharded.py on CUDA, then bench/gpu.py,
#   then the fsdp2_gpt2 recipe on the GPUs if hydra and transformers are there; with OLD=<a tree holding an older lit_prune/ and bench/gpu.py>,
#   the same benchmark of that tree, for a side-by-side table.  Logs go to $OUT (or /tmp/gpu_checks).
#
#   bash bench/gpu_checks.sh
#   OLD=.bench_old bash bench/gpu_checks.sh   # mkdir .bench_old; git archive REV lit_prune bench/gpu.py | tar -x -C .bench_old
set -uo pipefail
out=${OUT:-/tmp/gpu_checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_pipeline.py tests/test_nm.py \
    tests/test_hardening.py -k "cuda or CUDA or semi_structured or deferred" 2>&1 | tee "$out/tests.log"
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_sharded.py -k cuda 2>&1 | tee "$out/sharded.log"
timeout 240 python3 bench/sharded.py --device cuda --backend nccl --world 1 2>&1 | tee "$out/sharded_nccl.md"
timeout 240 python3 bench/sharded.py --device cuda --backend gloo --world 2 2>&1 | tee "$out/sharded_gloo.md"
timeout 240 python3 bench/gpu.py 2>&1 | tee "$out/gpu_new.md"
# the FSDP2 recipe on the GPUs (NCCL), where hydra and transformers are installed (carry their wheels)
if python3 -c "import hydra, omegaconf, transformers" 2>/dev/null; then
    timeout 300 python3 -m lit_prune --config-dir recipes --config-name fsdp2_gpt2 trainer=fsdp2_gpu \
        dense_baseline=false trainer.max_epochs=6 hydra.run.dir="$out/fsdp2_gpt2" 2>&1 | tail -30 | tee "$out/fsdp2_gpt2.log"
else
    echo "skipped: the fsdp2_gpt2 recipe needs hydra-core, omegaconf and transformers" | tee "$out/fsdp2_gpt2.log"
fi
if [ -n "${OLD:-}" ]; then
    (cd "$OLD" && PYTHONPATH=$PWD timeout 240 python3 bench/gpu.py 2>&1) | tee "$out/gpu_old.md"
fi
