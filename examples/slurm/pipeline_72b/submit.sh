#!/bin/bash
# The whole pipeline for the real case as dependent SLURM jobs (each starts only if the previous one
# succeeded: --dependency=afterok). Resubmitting a failed step resumes it from its last checkpoint.
#   bash examples/slurm/pipeline_72b/submit.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
S=examples/slurm
sub() { sbatch --parsable ${DEP:+--dependency=afterok:$DEP} "$@"; }
DEP=$(sub --job-name=convert-7b  --nodes=1 --ntasks=1 --cpus-per-task=32 --time=4:00:00 \
      --wrap "soaes convert hf-to-megatron /models/Qwen2.5-7B /ckpt/qwen2.5-7b-tp4 --tp 4")
C72=$(DEP= sub --job-name=convert-72b --nodes=1 --ntasks=1 --cpus-per-task=32 --time=8:00:00 \
      --wrap "soaes convert hf-to-megatron /models/Qwen2.5-72B /ckpt/qwen2.5-72b-tp8pp4 --tp 8 --pp 4")
CPT7=$(sub $S/cpt_qwen2.5_7b.sbatch)
CPT72=$(DEP=$C72 sub $S/cpt_qwen2.5_72b.sbatch)
SFT7=$(DEP=$CPT7 sub $S/sft_stage_7b.sbatch)
SFT72=$(DEP=$CPT72 sub $S/sft_stage_72b.sbatch)
DIST=$(DEP=$SFT7:$SFT72 sub $S/distill_72b_to_7b.sbatch)
EXP=$(DEP=$DIST sub --job-name=export --nodes=1 --ntasks=1 --cpus-per-task=32 --time=4:00:00 --wrap \
  "soaes convert megatron-to-hf /ckpt/soaes/sft-72b/stage3_soae_qa/checkpoints/iter_0003000 /export/soae-72b --dtype bf16 && \
   soaes convert megatron-to-hf /ckpt/soaes/distill-7b/checkpoints/iter_0002000 /export/soae-7b-draft --dtype bf16")
echo "submitted: cpt $CPT7/$CPT72, sft $SFT7/$SFT72, distill $DIST, export $EXP"
