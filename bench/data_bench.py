"""Data preparation throughput and memory: the job's path against the tokenizer's own floor.

    python bench/data_bench.py [--rows 20000] [--pairs 4] [--rounds 2] [--memory_only]

N synthetic chats (``--pairs`` user/assistant pairs: user ~60 words, assistant ~120) in a JSONL
file. Per round, alternated: the floor (the same rows rendered with ``apply_chat_template`` and
encoded as one batch by the same tokenizer, in one process, the file already in memory), then the
job's ``prepare_data`` (reading the file, masks, caching) with 1 and with 2 worker processes,
each in a fresh process with an empty cache; the same two with the tokenizer on one thread per
worker (a fast tokenizer otherwise encodes a batch on every core, so one worker already uses them).
Then packing (blocks of 2048) and the peak RSS of a one-worker preparation at N and 4N rows.
Prints rows/s and tokens/s, median and min-max over the rounds. The tokenizer is SmolLM2's when
the demo's packages are installed, else a byte-level one with a ChatML template (said in the output).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no what up out into them more "
         "some time could very these two may then do first any my now such like our over man me even most made "
         "after also did many before must through back years where much your way well down should because each "
         "just those people how too little state good very make world still own see men work long get here "
         "between both life being under never day same another know while last might us great old year off come "
         "since against go came right used take three").split()


def tokenizer():
    """SmolLM2's tokenizer when the demo packages are installed, else a byte-level one with ChatML."""
    try:
        from transformers import AutoTokenizer

        from ds_aslora.train.assets import default_model_dir

        return AutoTokenizer.from_pretrained(default_model_dir()), "SmolLM2-135M-Instruct"
    except ImportError:
        from ds_aslora.train.model_setup import byte_tokenizer

        tok = byte_tokenizer()
        tok.chat_template = CHATML
        return tok, "byte-level BPE (the demo packages are not installed)"


def write_chats(path: str, rows: int, pairs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            messages = []
            for _ in range(pairs):
                messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(40, 80)))})
                messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS,
                                                                                      k=rng.randint(90, 150)))})
            f.write(json.dumps({"messages": messages}) + "\n")


def floor(path: str) -> dict:
    """The tokenizer's own speed on the same rows: render with the template, encode as one batch."""
    tok, _ = tokenizer()
    with open(path) as f:
        conversations = [json.loads(line)["messages"] for line in f]
    started = time.perf_counter()
    texts = [tok.apply_chat_template(m, tokenize=False) for m in conversations]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": len(ids), "tokens": sum(map(len, ids))}


class PeakAnonymous:
    """Peak anonymous resident memory (heap, not memory-mapped files) of this process, sampled:
    RSS also counts the pages of the Arrow files datasets maps, which grow with what was read
    and which the kernel reclaims at will."""

    def __init__(self, every: float = 0.02):
        import threading

        self.peak, self.every, self.done = 0, every, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def now_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))

    def _run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.now_kib())
            self.done.wait(self.every)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return max(self.peak, self.now_kib()) / 1024


def prepare(path: str, workers: int, pack_too: bool = False) -> dict:
    """The job's preparation, from the file, into an empty cache."""
    import datasets

    from ds_aslora.train.data import prepare_data
    from ds_aslora.train.packing import pack
    from ds_aslora.train.run_config import DataConfig

    datasets.disable_progress_bars()
    tok, _ = tokenizer()
    anonymous = PeakAnonymous()
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        data = prepare_data(DataConfig(data=path, format="chat", max_seq_length=4096), tok, seed=0,
                            cache_dir=cache, num_proc=workers)
        seconds = time.perf_counter() - started
        out = {"seconds": seconds, "rows": len(data.train), "tokens": int(sum(data.train["length"]))}
        if pack_too:
            started = time.perf_counter()
            blocks = pack(data.train, 2048, cache_file_name=os.path.join(cache, "bench-packed.arrow"))
            out.update(pack_seconds=time.perf_counter() - started, blocks=len(blocks))
    out["peak_anon_mib"] = anonymous.stop()
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def in_fresh_process(what: str, path: str, workers: int = 1, serial_tokenizer: bool = False) -> dict:
    """One measurement per process: the peak RSS is its own and no cache is warm. ``serial_tokenizer``:
    the fast tokenizer encodes a batch on one thread (TOKENIZERS_PARALLELISM=false), so each worker
    uses one core and the workers' own scaling shows."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"TOKENIZERS_PARALLELISM": "false"} if serial_tokenizer else {})}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", what, path, str(workers)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8,.0f}  ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--pairs", type=int, default=4, help="user/assistant pairs per chat")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory_only", action="store_true",
                        help="only the peak memory at N and 4N rows (not timing-sensitive: may run beside other work)")
    parser.add_argument("--measure", nargs=3, metavar=("WHAT", "PATH", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child of in_fresh_process
        what, path, workers = args.measure
        print(json.dumps(floor(path) if what == "floor" else prepare(path, int(workers), pack_too=workers == "1")))
        return
    _, name = tokenizer()
    print(f"tokenizer: {name}; {args.rows:,} chats of {args.pairs} user/assistant pairs; {os.cpu_count()} CPUs; "
          f"{args.rounds} rounds, variants alternated")
    with tempfile.TemporaryDirectory() as work:
        small, large = os.path.join(work, "chats.jsonl"), os.path.join(work, "chats4x.jsonl")
        write_chats(small, args.rows, args.pairs)
        small_run = None if args.memory_only else throughput(small, args.rounds)
        write_chats(large, 4 * args.rows, args.pairs, seed=1)
        memory(small_run or in_fresh_process("prepare", small, 1), in_fresh_process("prepare", large, 1), args.rows)


def throughput(path: str, rounds: int) -> dict:
    """Rows/s of every variant and the packing rate; returns a one-worker run (for ``memory``)."""
    variants = {"floor": ("floor", 1, False), "1 worker": ("prepare", 1, False),
                "2 workers": ("prepare", 2, False), "1 worker, serial tok.": ("prepare", 1, True),
                "2 workers, serial tok.": ("prepare", 2, True)}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (what, workers, serial) in variants.items():
            runs[name].append(in_fresh_process(what, path, workers, serial))
    print(f"\n{'':22} {'rows/s, median (min-max)':>28} {'tokens/s, median':>18}")
    for variant, results in runs.items():
        rows_s = [r["rows"] / r["seconds"] for r in results]
        tokens_s = [r["tokens"] / r["seconds"] for r in results]
        print(f"{variant:22} {spread(rows_s):>28} {statistics.median(tokens_s):>18,.0f}")
    rate = {v: statistics.median(r["rows"] / r["seconds"] for r in results) for v, results in runs.items()}
    print(f"\n1 worker / floor: {rate['1 worker'] / rate['floor']:.2f}x (target >= 0.5x); "
          f"2 workers / 1 worker: {rate['2 workers'] / rate['1 worker']:.2f}x (target >= 1.6x)")
    print(f"with a serial tokenizer (one core per worker): 2 workers / 1 worker: "
          f"{rate['2 workers, serial tok.'] / rate['1 worker, serial tok.']:.2f}x on {os.cpu_count()} CPUs")
    packing = [r["rows"] / r["pack_seconds"] for r in runs["1 worker"]]
    print(f"packing into 2048-token blocks: {spread(packing)} rows/s "
          f"({runs['1 worker'][0]['blocks']:,} blocks from {runs['1 worker'][0]['rows']:,} rows)")
    return runs["1 worker"][-1]


def memory(small_run: dict, large_run: dict, rows: int) -> None:
    for key, what in (("peak_anon_mib", "anonymous memory (heap)"), ("peak_rss_mib", "RSS (with mapped files)")):
        print(f"peak {what} of a one-worker preparation: {small_run[key]:,.0f} MiB at {rows:,} rows, "
              f"{large_run[key]:,.0f} MiB at {4 * rows:,} rows: {large_run[key] / small_run[key]:.2f}x "
              "(target <= 1.3x)")

if __name__ == "__main__":
    main()
