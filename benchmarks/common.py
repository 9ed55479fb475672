"""Shared plumbing of the benchmarks: every one runs as ``python -m benchmarks.NAME [--quick] --out FILE.json``,
prints a short table and writes its figures as JSON. Timings are medians of repeated runs measured side
by side in one process, because this machine is shared and noisy."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def parse_args(description: str, argv: list[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smaller run that finishes in about a minute")
    p.add_argument("--out", default=None, help="write the figures as JSON to this file")
    if extra:
        extra(p)
    return p.parse_args(argv)


def machine() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_json(path: str | None, results: dict[str, Any]) -> None:
    results = {**results, "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = json.dumps(results, indent=2, default=float)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"wrote {path}")


def time_it(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None,
            stat: Callable[[list[float]], float] = statistics.median) -> float:
    """Seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls, summarised by ``stat`` (median;
    ``min`` estimates the cost without interference from other load)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return stat(times)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


class PeakRSS:
    """Samples the summed resident memory of a process tree (the current process and its children, or
    the given pids) in a background thread; ``peak`` is the largest sum seen."""

    def __init__(self, pids: Callable[[], list[int]] | None = None, interval: float = 0.05):
        self.pids = pids
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        procs: list[psutil.Process] = []
        if self.pids is not None:
            for pid in self.pids():
                try:
                    procs.append(psutil.Process(pid))
                except psutil.Error:
                    pass
        else:
            me = psutil.Process()
            procs = [me, *me.children(recursive=True)]
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


SYNTHETIC_SEQ = 32
SYNTHETIC_VOCAB = 256


def synthetic_shards(root: str, num_shards: int = 2, rows: int = 64) -> dict[str, Any]:
    """Packed shards with learnable structure (token ``(k * (i % 7 + 1) + i + shard) % 200`` at position ``k``
    of row ``i``), in the shard stage's layout, ``manifest.json`` included, at any storage URI; returns the
    manifest. The pretraining tests and the fault benchmark train on them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import storage

    fs, path = storage.resolve(root)
    fs.create_dir(path, recursive=True)
    shards = []
    for s in range(num_shards):
        data = [((np.arange(SYNTHETIC_SEQ + 1) * (i % 7 + 1) + i + s) % 200).astype(np.int32) for i in range(rows)]
        table = pa.table({"input_ids": pa.array([list(r) for r in data], type=pa.list_(pa.int32()))})
        with fs.open_output_stream(f"{path}/train-{s:05d}.parquet") as f:
            pq.write_table(table, f, row_group_size=16)
        shards.append({"path": f"train-{s:05d}.parquet", "num_rows": rows})
    splits = {"train": {"num_windows": rows * num_shards, "shards": shards},
              "val": {"num_windows": rows, "shards": shards[:1]}}
    manifest = {"seq_len": SYNTHETIC_SEQ, "vocab_size": SYNTHETIC_VOCAB, "config_hash": "synthetic",
                "tokenizer_sha256": "synthetic", "splits": splits}
    storage.write_bytes(storage.join(root, "manifest.json"), json.dumps(manifest).encode())
    return manifest


def flat_tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every tensor in nested dicts and lists, by its path (``/model/w``): for comparing training states."""
    import torch

    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}/{i}"))
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj
    return out
