#!/usr/bin/env bash
# `make gpu-check`: the checks that need a GPU, for a machine with CUDA and a Python that already holds PyTorch
# and scaleforge's requirements (no package index is needed: the source tree runs from src/). Each step trains or
# generates on the GPU, writes its log under $OUT (default gpu-check/), and prints its figures: samples/s and peak
# memory from the run's summary.json, tokens/s of a generation and of each way `scaleforge bench generate` measures
# on the gpt (its JSON in $OUT/bench-generate/). DEVICE=cpu STEPS=5 runs the same steps on a CPU, to check the script
# itself. Exit status 1 if any step failed; every step runs regardless.
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-300}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
status=0

step() {  # step NAME COMMAND...: run it with a 5-minute limit, its output in $OUT/NAME.log
    local name=$1
    shift
    echo "== $name"
    if timeout 300 "$@" >"$OUT/$name.log" 2>&1; then
        echo "ok"
    else
        echo "FAILED (exit $?), last lines:"
        tail -n 15 "$OUT/$name.log"
        status=1
        return 1
    fi
}

figures() {  # figures RUN_DIR: what its summary says about speed and memory
    "$PY" - "$1" <<'PY'
import json, sys
summary = json.load(open(f"{sys.argv[1]}/summary.json"))
keep = ("steps", "samples_per_s", "data_wait_share", "device", "precision", "memory_per_process")
print(json.dumps({key: summary.get(key) for key in keep}))
PY
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
"$PY" -c "import scaleforge.cli" || { echo "scaleforge does not import here: a requirement is missing"; exit 1; }

train=("$PY" -m scaleforge train "hardware.device=$DEVICE" "training.max_steps=$STEPS" logging.every_steps=50)
images=(model.architecture=resnet18 data.dataset=synthetic data.kind=images data.image_size=64 data.num_samples=8192
    training.batch_size=256)

step mlp "${train[@]}" --run-dir "$OUT/runs/mlp" && figures "$OUT/runs/mlp"
step resnet18 "${train[@]}" "${images[@]}" --run-dir "$OUT/runs/resnet18" && figures "$OUT/runs/resnet18"
step resnet18-compiled "${train[@]}" "${images[@]}" training.compile=true --run-dir "$OUT/runs/resnet18-compiled" &&
    figures "$OUT/runs/resnet18-compiled"
cat docs/*.md >"$OUT/corpus.txt"
step gpt "${train[@]}" model.architecture=gpt data.dataset=text "data.path=$OUT/corpus.txt" data.seq_len=256 \
    training.batch_size=64 --run-dir "$OUT/runs/gpt" && figures "$OUT/runs/gpt"
step generate "$PY" - "$OUT/runs/gpt" "$DEVICE" <<'PY' && tail -n 1 "$OUT/generate.log"
import sys, time
from scaleforge.generation.language_model import LanguageModel
from scaleforge.generation.sampling import SamplingOptions
from scaleforge.runs import Trust, open_run

model = LanguageModel(open_run(sys.argv[1], Trust(False, None)), sys.argv[2])
"".join(model.generate("The ", SamplingOptions(max_new_tokens=16, temperature=0)))  # warm-up
generation = model.generate("The ", SamplingOptions(max_new_tokens=200, temperature=0))
started = time.perf_counter()
"".join(generation)
seconds = time.perf_counter() - started
count = len(generation.tokens)
print(f"{count} tokens in {seconds:.3f} s: {count / seconds:,.0f} tokens/s, greedy, one sequence")
PY
# prompt and new tokens within the gpt's context of 256, so that the run's own weights are measured
step bench-generate "$PY" -m scaleforge bench generate "$OUT/runs/gpt" --device "$DEVICE" --prompt-tokens 16 \
    --new-tokens 200 --repeats 2 --streams 1,4 --requests-per-stream 2 --server-max-tokens 64 \
    --out "$OUT/bench-generate" && "$PY" - "$OUT/bench-generate/generate.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
rows = {f"{row['part']}: {row['way']} x{row['streams']}": round(row["tokens_per_s"]) for row in result["rows"]}
print(json.dumps({"device": result["device"], "gpu": result["cuda"], "tokens_per_s": rows}))
print(json.dumps({"server": result["server"].get("skipped", "measured"), "onnxruntime": result["targets"].get("onnxruntime", "measured")}))
PY
exit $status
