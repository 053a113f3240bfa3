"""Language-model benchmarks, one section each; today: text staging with tokenization.

    make bench-text                                     # installs `datasets` (the peer), then runs this
    python benchmarks/text_bench.py [--max-files 400] [--repeats 3] [--sections tokenize]

Section ``tokenize`` (issue 16), on the built-in ``python-stdlib`` corpus (the standard
library's ``.py`` files in path order; ``--max-files 400`` is the first 400, about 5 MB,
so that a run takes a few minutes on 2 shared cores), with one byte-level BPE tokenizer
(``--vocab-size`` ids) fitted on the same texts before any timing:

* **ours**: ``swarm stage python-stdlib?max_files=N DEST --tokenizer T`` as the flow
  ``stage_dataset`` on a local Dask cluster of 2 single-threaded worker processes reporting
  to a real Prefect server: plan, read the files, tokenize, pack into 1024-id blocks,
  write zstd shards, commit the manifest. Server and cluster start-up are outside the
  timing; everything the flow does is in (the wall time of the call).
* **encode_batch**: the same tokenizer's ``encode_batch`` over the same texts already in
  memory, in this process (all cores, the library's own threads): the limit.
  ``encode_batch_fast`` (no offsets; what staging calls) is timed too and reported beside it.
* **datasets_map**: what users do today: Hugging Face ``datasets``,
  ``load_dataset("text", sample_by="document")`` over the same files, then
  ``.map(tokenize, batched=True, num_proc=2)`` with the same ``tokenizers`` tokenizer, writing
  Arrow files into a fresh cache folder (no packing: that would only add to its time).

Rounds: ``--warmup`` untimed, then ``--repeats`` timed, the paths interleaved; medians count.
Ratios are throughput ratios (peer seconds / our seconds). The last line printed is one JSON
object; each section adds its keys (``tokenize_vs_encode_batch``, ``tokenize_vs_datasets_map``
...). To add a section, write ``def section_NAME(args, work) -> dict`` and list it in
``SECTIONS``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
for path in (str(ROOT), str(Path(__file__).resolve().parent)):
    if path not in sys.path:
        sys.path.insert(0, path)  # this checkout's packages (also for the Dask workers), and stage_bench

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TARGETS = {"tokenize_vs_encode_batch": 0.8, "tokenize_vs_datasets_map": 1.5}
SEQ_LEN = 1024


def timed_rounds(paths: dict[str, Callable[[int], float]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Run every path once per round, interleaved; keep the timed rounds' seconds."""
    runs: dict[str, list[float]] = {name: [] for name in paths}
    for round_ in range(-warmup, repeats):
        for name, run in paths.items():
            seconds = run(round_)
            if round_ >= 0:
                runs[name].append(seconds)
            print(f"  round {round_:>2} {name:<18} {seconds:7.2f} s", flush=True)
    return runs


# --------------------------------------------------------------------------- section: tokenize


def stdlib_corpus(max_files: int) -> tuple[str, list[str], list[str]]:
    import sysconfig

    from tasks.datasets import open_builtin

    source = f"python-stdlib?max_files={max_files}"
    table = open_builtin(source).read(0, max_files)
    root = sysconfig.get_paths()["stdlib"]
    return source, table.column("text").to_pylist(), [os.path.join(root, n) for n in table.column("name").to_pylist()]


def run_ours(source: str, tokenizer: str, dest: Path, dask_address: str) -> tuple[float, object]:
    from flows.stage import stage_dataset
    from tasks.staging import StageConfig

    config = StageConfig(source=source, dest=str(dest), tokenizer=tokenizer, seq_len=SEQ_LEN, dask_address=dask_address)
    started = time.perf_counter()
    result = stage_dataset(config)
    return time.perf_counter() - started, result


def run_encode_batch(tokenizer_json: str, texts: list[str], fast: bool) -> float:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True  # as staging encodes
    encode = tokenizer.encode_batch_fast if fast else tokenizer.encode_batch
    started = time.perf_counter()
    encodings = encode(texts, add_special_tokens=False)
    seconds = time.perf_counter() - started
    assert len(encodings) == len(texts)
    return seconds


def run_datasets_map(tokenizer_path: str, files: list[str], cache: Path) -> float:
    import datasets
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    tokenizer = Tokenizer.from_file(tokenizer_path)

    def tokenize(batch):
        return {"input_ids": [e.ids for e in tokenizer.encode_batch(batch["text"], add_special_tokens=False)]}

    started = time.perf_counter()
    ds = datasets.load_dataset("text", data_files=files, sample_by="document", encoding_errors="replace",
                               split="train", cache_dir=str(cache))  # as the built-in decodes
    ds = ds.map(tokenize, batched=True, num_proc=2, remove_columns=["text"])
    seconds = time.perf_counter() - started
    assert ds.num_rows == len(files) and list(cache.rglob("*.arrow"))
    return seconds


def section_tokenize(args: argparse.Namespace, work: Path) -> dict:
    from stage_bench import Services
    from tasks.text.tokenizer import fit_bpe, from_json

    source, texts, files = stdlib_corpus(args.max_files)
    text_bytes = sum(len(t.encode()) for t in texts)
    print(f"tokenize: {len(texts)} files of the standard library, {text_bytes / 1e6:.1f} MB; fitting the tokenizer ...",
          flush=True)
    tokenizer_json = fit_bpe(texts, args.vocab_size)
    tokenizer_path = work / "tokenizer.json"
    tokenizer_path.write_text(tokenizer_json)
    tokens = sum(len(e.ids) for e in from_json(tokenizer_json).encode_batch_fast(texts, add_special_tokens=False))
    try:
        import datasets  # noqa: F401
        have_peer = True
    except ImportError:
        have_peer = False
        print("note: `datasets` is not installed, so its path is skipped: run `make bench-text`", flush=True)
    services = Services(work)
    results = {}

    def ours(round_: int) -> float:
        seconds, results["ours"] = run_ours(source, str(tokenizer_path), work / "out" / f"ours-{round_}",
                                            services.address)
        shutil.rmtree(work / "out" / f"ours-{round_}")
        return seconds

    paths = {
        "ours": ours,
        "encode_batch": lambda r: run_encode_batch(tokenizer_json, texts, fast=False),
        "encode_batch_fast": lambda r: run_encode_batch(tokenizer_json, texts, fast=True),
    }
    if have_peer:
        paths["datasets_map"] = lambda r: run_datasets_map(str(tokenizer_path), files, work / "hf-cache" / str(r))
    load_before = os.getloadavg()[0]
    try:
        runs = timed_rounds(paths, args.warmup, args.repeats)
    finally:
        services.close()
    median = {name: statistics.median(times) for name, times in runs.items()}
    ratio = {name: round(median[name] / median["ours"], 3) for name in median if name != "ours"}
    staged = results["ours"]
    print(f"\n{'path':<20}{'seconds':>9}{'MB/s':>8}{'tokens/s':>12}")
    for name, seconds in median.items():
        print(f"{name:<20}{seconds:>9.2f}{text_bytes / 1e6 / seconds:>8.2f}{tokens / seconds:>12,.0f}")
    print(f"ours vs encode_batch {ratio['encode_batch']}x (target >= {TARGETS['tokenize_vs_encode_batch']}), "
          f"vs encode_batch_fast {ratio['encode_batch_fast']}x, "
          f"vs datasets map {ratio.get('datasets_map', 'skipped')}x (target >= {TARGETS['tokenize_vs_datasets_map']})")
    return {
        "tokenize_vs_encode_batch": ratio["encode_batch"],
        "tokenize_vs_encode_batch_fast": ratio["encode_batch_fast"],
        "tokenize_vs_datasets_map": ratio.get("datasets_map"),
        "tokenize": {
            "corpus": source, "files": len(texts), "text_bytes": text_bytes, "tokens": tokens,
            "vocab_size": args.vocab_size, "seq_len": SEQ_LEN, "shards": staged.shards, "blocks": staged.rows,
            "seconds_median": {k: round(v, 3) for k, v in median.items()},
            "seconds_all": {k: [round(x, 3) for x in v] for k, v in runs.items()},
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
    }


SECTIONS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {"tokenize": section_tokenize}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--max-files", type=int, default=1000, help="python-stdlib files (in path order)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="keep files here (default: a temporary folder)")
    args = parser.parse_args()
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="text-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    summary: dict = {"cpus": os.cpu_count()}
    try:
        for name in args.sections.split(","):
            (work / name).mkdir(parents=True, exist_ok=True)
            summary.update(SECTIONS[name](args, work / name))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    met = {k: summary.get(k) is not None and summary[k] >= v for k, v in TARGETS.items() if k in summary}
    summary["targets"] = {k: f">= {v}" for k, v in TARGETS.items() if k in summary}
    summary["target_met"] = met
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
