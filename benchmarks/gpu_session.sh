#!/usr/bin/env bash
# The GPU checks n3jax owes, in parts that each fit one 10-minute device call. Results go to $OUT/<part>.log
# (the device tool copies $OUT back); commit them under benchmarks/results/ with machine and date.
#
#   bash benchmarks/gpu_session.sh first      # with 15 min of device time: the Mosaic GPU kernels compiled, then SSD
#                                             and gmm at their anchor shape against mamba_ssm / torch (< 9 min)
#   bash benchmarks/gpu_session.sh kernels    # compiled Pallas kernel tests (SSD, MoE gmm and attention; Triton + Mosaic GPU), ~5 min
#   bash benchmarks/gpu_session.sh ssd        # benchmarks/ssd.py: Triton + Mosaic GPU kernels vs jnp reference and mamba_ssm (ANCHORS + Nano/Super);
#                                             ssd_memory_bound.py: decode update + conv1d bandwidth
#   bash benchmarks/gpu_session.sh attention  # benchmarks/attention.py vs XLA, cuDNN and torch SDPA
#   bash benchmarks/gpu_session.sh moe        # benchmarks/moe.py vs ragged_dot, torch._grouped_mm (+ the MoE layer)
#   bash benchmarks/gpu_session.sh moe_decode # a decoding step's routed experts (1, 8, 64 tokens): sorted gmm vs gathered experts
#   bash benchmarks/gpu_session.sh moe_sweep  # tile sweep of the Triton and Mosaic GPU grouped matmuls (anchor shape)
#   bash benchmarks/gpu_session.sh train      # benchmarks/train_step.py vs anchor_hf_train.py (reduced-depth Nano)
#   bash benchmarks/gpu_session.sh generate   # benchmarks/generate.py vs anchor_hf_generate.py (Nano-4B, prompt 1k: the anchor's)
#   bash benchmarks/gpu_session.sh generate_8k  # the same at prompt 8k (batch 1, 8, 64; no anchor), one call of its own
#   bash benchmarks/gpu_session.sh generate_pallas  # prompt 1k, batch 1 and 64, ssd_backend="pallas" (Triton scan + decode kernel)
#   bash benchmarks/gpu_session.sh generate_moe  # Nemotron 3 Nano (30B-A3B) decoding, batch 1 and 8: sorted dispatch vs
#                                             gathered experts (moe_gather_max_rows), the Triton conv + SSM kernel in both
#   bash benchmarks/gpu_session.sh quant      # benchmarks/quant.py: bf16 vs fp8 (native) vs nvfp4 (emulated)
#
# mamba_ssm's Triton sources (for `ssd`): fetch state-spaces/mamba, extract its `mamba_ssm/` into
# third_party/mamba/ (git-ignored), empty third_party/mamba/mamba_ssm/__init__.py (ANCHORS.md: no compiled
# extension is imported), and pass `carry: ["third_party"]` to the device call.
# The anchor scripts are read from $ANCHOR_DIR (default: ../shared/bench, else shared/bench).
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:?part: first | kernels | ssd | attention | moe | moe_decode | moe_sweep | train | generate | generate_8k | generate_pallas | generate_moe | quant}"
out="${OUT:-/tmp/n3jax_gpu}"
mkdir -p "$out"
anchors="${ANCHOR_DIR:-$( [ -d ../shared/bench ] && echo ../shared/bench || echo shared/bench )}"
py="${PYTHON:-python}"
# The device image has jax with CUDA; n3jax itself is used from the working tree.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$out/$part.log"
{
  echo "# n3jax GPU part '$part' $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
  case "$part" in
    first)  # each step time-boxed, so that the later ones still run
      XLA_FLAGS= JAX_PLATFORMS= timeout 240 "$py" -m pytest -q -p no:cacheprovider -x \
        "pallas_kernels/ssd/ops_mgpu_test.py::SsdMosaicGpuTest" "pallas_kernels/moe/gmm_mgpu_test.py::GmmMgpuTest" \
        "pallas_kernels/attention/ops_test.py::test_mosaic_gpu_matches_reference" -rs
      timeout 150 "$py" benchmarks/ssd.py --mamba_path="${MAMBA_PATH:-third_party/mamba}" \
        --shapes=anchor1_nano_b2 --skip_reference --iters=10
      timeout 120 "$py" benchmarks/moe.py --shapes=anchor_nano_up --skip_layer ;;
    kernels)
      # Compiled classes only (their interpret twins run in the CPU suite).
      XLA_FLAGS= JAX_PLATFORMS= "$py" -m pytest -q -p no:cacheprovider \
        "pallas_kernels/ssd/ops_test.py::SsdTest" "pallas_kernels/ssd/ops_decode_test.py::DecodeTest" \
        "pallas_kernels/ssd/ops_decode_test.py::ConvDecodeTest" "pallas_kernels/moe/gmm_test.py::GmmTest" \
        "pallas_kernels/moe/gathered_test.py::GatheredTritonTest" \
        "pallas_kernels/moe/gmm_mgpu_test.py::GmmMgpuTest" "pallas_kernels/ssd/ops_mgpu_test.py::SsdMosaicGpuTest" \
        "pallas_kernels/attention/ops_test.py" -rs ;;
    ssd)
      "$py" benchmarks/ssd.py --mamba_path="${MAMBA_PATH:-third_party/mamba}"
      "$py" benchmarks/ssd_memory_bound.py ;;
    attention)
      "$py" benchmarks/attention.py ;;
    moe)  # times torch._grouped_mm itself, in the same process
      "$py" benchmarks/moe.py ;;
    moe_sweep)  # forward of every candidate tile, next to torch._grouped_mm
      "$py" benchmarks/moe.py --shapes=anchor_nano_up --sweep --skip_layer ;;
    moe_decode)
      "$py" benchmarks/moe.py --decode_batches=1,8,64 ;;
    train)  # the model's defaults, then with the Pallas kernels (SSD and gmm on Mosaic GPU, flash attention)
      "$py" benchmarks/train_step.py
      "$py" benchmarks/train_step.py --ssd_backend=pallas_mgpu --moe_backend=pallas_mgpu --attention_impl=flash
      [ -f "$anchors/anchor_hf_train.py" ] && PYTHONPATH="${MAMBA_PATH:-$PWD/third_party/mamba}:$PYTHONPATH" \
        "$py" "$anchors/anchor_hf_train.py" ;;
    generate)  # 6 compiles of the unrolled 42-layer model (prefill chunk + decode step per batch) and the anchor
      "$py" benchmarks/generate.py --prompts=1024 --anchor=on --anchor_script="$anchors/anchor_hf_generate.py" ;;
    generate_pallas)  # the same with ssd_backend="pallas": the Triton SSD scan in prefill, the one-token kernel in decode
      "$py" benchmarks/generate.py --prompts=1024 --anchor=off --batches=1,64 --ssd_backend=pallas ;;
    generate_moe)  # 63 GB of bf16 weights on one H100; 64 steps per case (4 compiles each)
      for rows in 0 64; do
        "$py" benchmarks/generate.py --preset=nemotron-3-nano-30b-a3b --prompts=1024 --batches=1,8 --new_tokens=64 \
          --anchor=off --ssd_backend=pallas --moe_gather_max_rows=$rows
      done ;;
    generate_8k)
      "$py" benchmarks/generate.py --prompts=8192 --anchor=off ;;
    quant)
      "$py" benchmarks/quant.py --out="$out/quant.json" ;;
    *)
      echo "unknown part '$part'" >&2; exit 2 ;;
  esac
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
