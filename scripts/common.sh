# Shared by the table scripts (sourced, not run). They set DATA, REF and NPROC first; EXPS,
# SAMPLES, RESULTS and DRY_RUN may be set in the environment.
#
#   train_generate_evaluate EXP STEPS SAMPLER [TRAIN FLAGS...]
#
# trains $EXPS/EXP to STEPS (re-running resumes, and a run trained further serves every
# earlier milestone: --resume auto), samples 50K images from the checkpoint of step STEPS with
# SAMPLER (nocfg: SDE 250 steps, cfg 1; cfgW: the same with cfg W at every step, e.g. cfg1.35;
# or a generate.py preset: paper-main, ablation), and
# evaluates them against $REF. With DRY_RUN=1 the commands are printed, not run.

EXPS=${EXPS:-exps}
SAMPLES=${SAMPLES:-samples}
RESULTS=${RESULTS:-results}
DRY_RUN=${DRY_RUN:-0}

# Print a command (quoted so that it can be pasted), then run it unless DRY_RUN=1.
run() {
    printf '%q ' "$@" | sed 's/ $//'
    echo
    if [[ "$DRY_RUN" != 1 ]]; then
        "$@"
    fi
}

train_generate_evaluate() {
    local exp=$1 steps=$2 sampler=$3
    shift 3
    local step multi=() preset=()
    step=$(printf '%07d' "$steps")
    local sample_dir="$SAMPLES/$exp-$step-$sampler"
    if [[ "$NPROC" -gt 1 ]]; then
        multi=(--multi_gpu)
    fi
    case "$sampler" in
        nocfg) ;;
        cfg*) preset=(--cfg-scale "${sampler#cfg}") ;;  # SDE 250 steps, guidance at every step
        *) preset=(--preset "$sampler") ;;
    esac
    run accelerate launch "${multi[@]}" --num_processes "$NPROC" train.py --data-dir "$DATA" \
        --output-dir "$EXPS" --exp-name "$exp" --max-train-steps "$steps" --resume auto "$@"
    run torchrun --nproc_per_node="$NPROC" generate.py \
        --ckpt "$EXPS/$exp/checkpoints/$step.pt" --sample-dir "$sample_dir" "${preset[@]}"
    if [[ "$DRY_RUN" != 1 ]]; then
        mkdir -p "$RESULTS"
    fi
    run python evaluations/evaluator.py "$REF" "$sample_dir.npz" \
        --json "$RESULTS/$(basename "$sample_dir").json"
}

# A 100K-step ablation of SiT↓-XL/2 (Tables 5-10), sampled with --preset ablation (Euler ODE
# 50 steps, cfg 1.8 on t in [0, 0.7]). The U-REPA defaults are the run of Tables 3 and 4 at
# step 100K: every table's default row shares it.
ablation() {
    local exp=$1
    shift
    train_generate_evaluate "$exp" 100000 ablation --model SiTDown-XL/2 "$@"
}

usage_error() {
    echo "$USAGE" >&2
    exit 2
}
