"""Steps/s and peak memory of every train_edm.py method, on the toy network and on the full-size CIFAR-10 DDPM++.

    python bench/bench_train_edm.py                      # CPU, batch 8, 6 timed steps per method (a few minutes)
    python bench/bench_train_edm.py --configs toy --batch 32 --steps 20

Each method runs `train_edm.py` in a fresh process (random initialisation, toy data, distillation methods with a
teacher of the same architecture), so the peak resident memory it reports is that method's alone. The first two
steps are excluded from the timing (allocator and autograd warm-up). dmd2/fdistill alternate four critic steps (fake
score and GAN heads on three feature levels) with one generator step; their s/step is the mean over whole cycles, and
the two kinds of step are also shown apart.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"toy": "toy", "cifar10": "edm-cifar10-32x32-cond-vp"}
METHODS = {"sft": [], "cm": ["--cd"], "scm": ["--cd"], "tcm": [], "meanflow": ["--cd"], "dmd2": ["--disc_features", "0,1,2"], "fdistill": ["--disc_features", "0,1,2"]}  # fmt: skip
DM_METHODS = ("dmd2", "fdistill")  # one generator step and four critic steps per cycle (student_update_freq 5)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--configs", default="toy,cifar10", help="comma list of: " + ", ".join(CONFIGS))
parser.add_argument("--methods", default=",".join(METHODS))
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--steps", type=int, default=6, help="timed steps per method (after 2 warm-up steps)")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()

# Run train_edm.py in-process inside a fresh interpreter and report its own peak RSS at exit.
RUNNER = (
    "import resource, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path('train_edm.py', run_name='__main__'); "
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


def run(flags, out_dir):
    cmd = [sys.executable, "-c", RUNNER, "train_edm.py", *flags, "--out_dir", out_dir]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-2000:])
    return int(result.stdout.split("MAXRSS_KB")[-1].split()[0])


print(f"batch {args.batch}, {args.threads} CPU threads, fp32; median seconds per step over {args.steps} steps")
print(
    f"{'config':8} {'method':9} {'s/step':>8} {'steps/s':>8} {'peak RSS':>9}  (dmd2/fdistill: critic, generator s/step)"
)
with tempfile.TemporaryDirectory() as tmp:
    for config in args.configs.split(","):
        common = ["--data", "toy", "--arch", CONFIGS[config], "--batch_size", str(args.batch), "--eval_every", "0", "--eval_n", "0", "--num_threads", str(args.threads), "--max_steps", str(args.steps + 2)]  # fmt: skip
        stage1 = os.path.join(tmp, f"{config}_stage1")
        run([*common, "--method", "cm", "--max_steps", "1", "--save_every", "1"], stage1)
        for method in args.methods.split(","):
            out = os.path.join(tmp, f"{config}_{method}")
            extra = ["--stage1", os.path.join(stage1, "ckpt_0000001", "student.safetensors")] if method == "tcm" else []
            steps = ["--max_steps", str(2 + 5 * max(1, round(args.steps / 5)))] if method in DM_METHODS else []
            rss_kb = run([*common, "--method", method, "--save_every", "0", *METHODS[method], *extra, *steps], out)
            with open(os.path.join(out, "metrics.jsonl")) as f:
                records = [json.loads(line) for line in f if '"loss"' in line][2:]
            seconds = lambda rs: sorted(args.batch / r["images_per_s"] for r in rs)
            if method in DM_METHODS:
                critic = seconds([r for r in records if "fake_score_loss" in r])
                generator = seconds([r for r in records if "vsd_loss" in r])
                median = (4 * critic[len(critic) // 2] + generator[len(generator) // 2]) / 5
                detail = f"  ({critic[len(critic) // 2]:.3f}, {generator[len(generator) // 2]:.3f})"
            else:
                times = seconds(records)
                median, detail = times[len(times) // 2], ""
            print(f"{config:8} {method:9} {median:8.3f} {1 / median:8.2f} {rss_kb / 1024:7.0f} MB{detail}")
