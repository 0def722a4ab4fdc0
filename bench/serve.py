"""The probe service behind a real TorchServe: batching on vs off, batch-invariant vs fast, cold vs warm start. Prints ONE JSON line.

(a) Throughput and p50/p99 latency at 1 and 8 concurrent clients for three configurations:
    `batch_on` (the committed config: its batchSize and maxBatchDelay, batch_invariant true:
    every call at batchSize rows), `batch_on_fast` (batch_invariant false: a call padded to the
    next bucket only, with maxBatchDelay --fast-delay, 3 ms: measured 2026-12-06 on 2 cores, 1 ms
    fragments the 8-client batches (gain 1.66), 5 ms costs a lone client 1.08×) and `batch_off` (batchSize 1). Goals: ≥ 1.8× throughput
    with batching at 8 clients; a lone client's p50 ≤ 1.05× the unbatched one
    (`lone_latency_ratio_p50`); the cost of batch invariance is batch_on vs batch_on_fast.
    Archives that differ only in those settings (built by scripts/build_archives.sh through
    tests/serve_fixtures.build_archive) are served side by side by TorchServes on free
    127.0.0.1 ports; each (clients, configuration) measurement is one warm-up round then the
    timed requests from a thread pool (a closed loop: `clients` requests in flight), and the
    configurations take turns (rotated order) within interleaved rounds, so drift of this shared
    machine's load hits all. The responses' metadata gives the batch sizes formed and the
    server-side denoise (U-Net) time per batch, which explains the gain.
(b) Worker start (torchserve launch → worker READY: JVM, model load, U-Net compile, warm-up) of
    the batching-off archive, side by side: `warm_cache` with TORCHINDUCTOR_CACHE_DIR = the
    repo's .cache/inductor after the batching-on server's start filled it (a worker restarted on
    the same machine), `cold_cache` with a fresh empty folder (nothing compiled before), and
    `archive_cached`: the same archive built with PRECOMPILE=1 (the service compiled once at
    build, its portable compile cache packed as compile-cache.bin) started with another fresh
    empty folder, so only what the archive carries helps (a new machine given the archive).

Everything is bounded: ≤ 64 timed requests per (configuration, clients), a global deadline
(--timeout), per-request timeouts; the servers are stopped by PID in a finally block.

    .venv/bin/python bench/serve.py [--quick] [--rounds 4] [--no-cold] [--timeout 1500]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from serve_fixtures import Server, build_archive, free_port  # noqa: E402

from ldmprobe.jsonout import print_line  # noqa: E402

REPO_CACHE = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or ROOT / ".cache" / "inductor")  # warm cache
DEFAULT_BANK = ROOT / "runs" / "tiny-bank" / "bank.safetensors"
CONFIGS = ("batch_on", "batch_on_fast", "batch_off")
FAST_DELAY_MS = 3  # batch_on_fast's maxBatchDelay (see the docstring)
PORTS = ("inference", "management", "metrics", "worker", "grpc_inference", "grpc_management")
MAX_TIMED = 64  # timed requests per (configuration, clients), all rounds together


@dataclasses.dataclass
class BenchServer(Server):
    """A tests/serve_fixtures Server with its own inductor cache folder."""

    cache: str = str(REPO_CACHE)

    def env(self) -> dict[str, str]:
        return super().env() | {"TORCHINDUCTOR_CACHE_DIR": self.cache}


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self, cap: float = math.inf) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("bench/serve.py: global timeout reached")
        return min(left, cap)


def start_server(root: Path, store: Path, cache: Path, deadline: Deadline, started: list[Server]) -> tuple[Server, float]:
    """Launch TorchServe, wait until the worker is READY; (server, seconds from launch)."""
    srv = BenchServer(root, {k: free_port() for k in PORTS}, cache=str(cache))
    started.append(srv)  # stopped in main's finally, even when start-up fails half-way
    t0 = time.monotonic()
    srv.start(store, timeout=deadline.left())
    return srv, time.monotonic() - t0


def ensure_bank(bank: Path) -> Path:
    """The bank file, fitted first when missing by scripts/serve.sh's command (tiny model, 48
    rendered scenes: the bank `make serve` would fit there); the job's output goes to stderr."""
    if bank.is_file():
        return bank
    print(f"bench/serve.py: fitting a probe bank for the tiny model → {bank}", file=sys.stderr)
    job = ["-m", "training.fit", "--model", "tiny", "--scenes", "48", "--test-scenes", "8", "--out", str(bank.parent)]
    done = subprocess.run([sys.executable, *job, "--no-progress"], cwd=ROOT, stdout=sys.stderr)
    if done.returncode or not bank.is_file():
        raise SystemExit(f"bench/serve.py: fitting the bank into {bank.parent} failed (exit {done.returncode})")
    return bank


def body_for(i: int, steps: int, side: int, fmt: str) -> dict:
    return {"prompt": f"bench {i}: a red apple on a wooden table", "seed": 1000 + i, "steps": steps,
            "height": side, "width": side, "return_steps": [steps - 1], "format": fmt}


def send(srv: Server, body: dict, deadline: Deadline, local: threading.local) -> dict:
    """One POST; status, client latency and the metadata this bench reads."""
    if not hasattr(local, "session"):
        local.session = requests.Session()
    t0 = time.perf_counter()
    try:
        r = local.session.post(f"{srv.inference}/predictions/probe", json=body, timeout=deadline.left(300),
                               headers={"Authorization": f"Bearer {srv.keys['inference']}"})
        status = r.status_code
        meta = r.json().get("metadata", {}) if status == 200 else {}
    except (requests.RequestException, ValueError):
        status, meta = 0, {}
    return {"status": status, "latency_s": time.perf_counter() - t0, "batch": meta.get("batch", {}),
            "timings_ms": meta.get("timings_ms", {}), "worker": meta.get("worker", {})}


def run_clients(srv: Server, clients: int, bodies: list[dict], deadline: Deadline) -> tuple[list[dict], float]:
    """Send `bodies` with `clients` in flight at a time; (results, wall seconds)."""
    local = threading.local()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: send(srv, b, deadline, local), bodies))
    return results, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of ≤ 64 samples is their maximum)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def worker_info(srv: Server, body: dict, deadline: Deadline) -> dict:
    """The worker's own set-up and warm-up (compile) seconds, from one request's metadata."""
    out = send(srv, body, deadline, threading.local())
    return {"setup_s": out["worker"].get("setup_s"), "warm_s": out["worker"].get("warm_s"), "status": out["status"]}


def java_version() -> str:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
        return (out.stderr or out.stdout).splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def probe_heads_per_step(bank_path: Path, rows: int, side: int, repeats: int = 20) -> dict:
    """The probe heads of one step of a full batch, in-process on the service's bank: one
    `bank.apply` per (request row, layer), as the service ran them before, vs ONE grouped call
    for all rows × layers × properties (what it runs now). Median ms over `repeats`."""
    import torch

    from ldmprobe.models import load_model
    from ldmprobe.probes import ProbeBank

    model = load_model("tiny")
    bank = ProbeBank.load(bank_path, model)
    registry = model.registry(side, side)
    step = max(bank.steps)
    pairs = [(prop, layer) for prop, (layer, _) in bank.best_layers().items()]
    layers = list(dict.fromkeys(layer for _, layer in pairs))
    gen = torch.Generator().manual_seed(0)
    acts = {la: torch.randn(rows, registry[la].height * registry[la].width, registry[la].channels, generator=gen)
            for la in layers}

    def before():
        for row in range(rows):
            for la in layers:
                props = [p for p, layer in pairs if layer == la]
                bank.apply({la: acts[la][row:row + 1]}, step, properties=props, layers=[la], registry=registry)

    def after():
        bank.apply(acts, step, pairs=pairs, registry=registry)

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1e3, 3)

    ms_before, ms_after = median_ms(before), median_ms(after)
    return {"rows": rows, "layers": layers, "pairs": len(pairs), "calls_before": rows * len(layers), "calls_after": 1,
            "before_ms": ms_before, "after_ms": ms_after, "speedup": round(ms_before / ms_after, 2) if ms_after else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 rounds of 2 + 8 timed requests (1 + 8 clients), no cold start; its "
                             "ratios mean little (default: off)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 4; 2 with --quick)")
    parser.add_argument("--c1-requests", type=int, default=None,
                        help="timed requests per round at 1 client (default: 3; 2 with --quick)")
    parser.add_argument("--c8-requests", type=int, default=None,
                        help="timed requests per round at 8 clients (default: 12; 8 with --quick)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per request (default: 4)")
    parser.add_argument("--side", type=int, default=128, help="image height = width in pixels (default: 128, tiny's)")
    parser.add_argument("--format", default="array", choices=("array", "png"),
                        help="probe map format of the requests (default: array)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batching-on batchSize (default: handlers/probe-config.yaml's)")
    parser.add_argument("--bank", default=str(DEFAULT_BANK),
                        help="probe bank of the tiny model, fitted there by training.fit when missing "
                             "(default: runs/tiny-bank/bank.safetensors, the one `make serve` uses)")
    parser.add_argument("--fast-delay", type=int, default=FAST_DELAY_MS,
                        help="maxBatchDelay (ms) of batch_on_fast: what a user who sets batch_invariant false also sets; "
                             f"a shorter wait suits a call computing only its real rows (default: {FAST_DELAY_MS})")
    parser.add_argument("--no-cold", action="store_true",
                        help="skip the cold-cache worker start, minutes on CPU (default: off; on with --quick)")
    parser.add_argument("--timeout", type=float, default=1500, help="global deadline in seconds (default: 1500)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 4)
    per_round = {1: args.c1_requests or (2 if args.quick else 3), 8: args.c8_requests or (8 if args.quick else 12)}
    for c, n in per_round.items():
        if n * rounds > MAX_TIMED:
            parser.error(f"{n} × {rounds} rounds > {MAX_TIMED} timed requests at {c} client(s)")
    args.no_cold = args.no_cold or args.quick
    if not Path(args.bank).is_file() and Path(args.bank).name != "bank.safetensors":
        parser.error(f"--bank: no file at {args.bank}, and training.fit can only fit one named OUT/bank.safetensors")
    bank = ensure_bank(Path(args.bank))
    committed = yaml.safe_load((ROOT / "handlers" / "probe-config.yaml").read_text())
    batch_on = args.batch_size or int(committed["batchSize"])
    buckets = [b for b in (1, 2, 4, 8, 16, 32) if b < batch_on] + [batch_on]
    # identical but for batchSize: the handler warms the buckets ≤ its batchSize (batching off: 1)
    shared = {"handler": {"warm_batch_sizes": buckets,
                          "warm_settings": {"steps": 2, "height": args.side, "width": args.side}}}
    deadline = Deadline(args.timeout)
    t_begin = time.monotonic()
    load_before = os.getloadavg()
    started: list[Server] = []
    tmp = Path(tempfile.mkdtemp(prefix="ldmprobe-bench-serve-"))
    results: dict[str, dict[int, list[dict]]] = {c: defaultdict(list) for c in CONFIGS}
    walls: dict[str, dict[int, list[float]]] = {c: defaultdict(list) for c in CONFIGS}
    load_at: list[dict] = []
    start_s: dict[str, float] = {}
    workers: dict[str, dict] = {}
    cold_error = "skipped (--no-cold)" if args.no_cold else None
    precompile_s = None
    try:
        stores = {}
        variants = {"batch_on": {"batchSize": batch_on},
                    "batch_on_fast": {"batchSize": batch_on, "maxBatchDelay": args.fast_delay,
                                      "handler": shared["handler"] | {"batch_invariant": False}},
                    "batch_off": {"batchSize": 1}}
        for name in CONFIGS:
            stores[name] = build_archive(tmp / f"store-{name}", bank, shared | variants[name]).parent
        probe = body_for(10_000, args.steps, args.side, args.format)
        servers = {}
        # batching on first: its start fills the repo cache for every bucket (incl. 1), so the
        # batching-off start right after is a warm-cache start
        for name in CONFIGS:
            servers[name], start_s[name] = start_server(tmp / name, stores[name], REPO_CACHE, deadline, started)
            workers[name] = worker_info(servers[name], probe, deadline)
        i = 0
        for r in range(rounds):
            for k, clients in enumerate(per_round):
                shift = (r + k) % len(CONFIGS)
                order = CONFIGS[shift:] + CONFIGS[:shift]
                for name in order:
                    srv = servers[name]
                    run_clients(srv, clients, [body_for(i + j, args.steps, args.side, args.format)
                                               for j in range(clients)], deadline)  # warm-up round
                    bodies = [body_for(i + clients + j, args.steps, args.side, args.format)
                              for j in range(per_round[clients])]
                    load_at.append({"config": name, "clients": clients, "round": r,
                                    "loadavg_1m": round(os.getloadavg()[0], 2)})
                    out, wall = run_clients(srv, clients, bodies, deadline)
                    results[name][clients] += out
                    walls[name][clients].append(wall)
                i += clients + per_round[clients]  # both configurations see the same requests
        for srv in started:
            srv.stop()
        started.clear()
        if not args.no_cold:  # last, alone on the machine; a failure here still reports the rest
            try:
                srv, start_s["batch_off_cold"] = start_server(tmp / "cold", stores["batch_off"], tmp / "cold-cache",
                                                              deadline, started)
                workers["batch_off_cold"] = worker_info(srv, probe, deadline)
                srv.stop()
                t0 = time.monotonic()
                stores["batch_off_precompiled"] = build_archive(
                    tmp / "store-precompiled", bank, shared | variants["batch_off"],
                    env={"PRECOMPILE": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp / "precompile-cache")}).parent
                precompile_s = time.monotonic() - t0
                srv, start_s["batch_off_archive"] = start_server(tmp / "archive", stores["batch_off_precompiled"],
                                                                 tmp / "archive-cache", deadline, started)
                workers["batch_off_archive"] = worker_info(srv, probe, deadline)
            except (TimeoutError, RuntimeError) as exc:
                cold_error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                print(started[-1].logs(40), file=sys.stderr)
    except BaseException:
        for srv in started:
            print(srv.logs(40), file=sys.stderr)
        raise
    finally:
        for srv in started:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def summary(fn):
        return {name: {f"c{c}": fn(name, c) for c in per_round} for name in CONFIGS}

    def ok(name, c):
        return [x for x in results[name][c] if x["status"] == 200]

    def by_rows(name, key):
        """Median server-side ms by the generate rows of the batch (all timed responses)."""
        groups = defaultdict(list)
        for c in per_round:
            for x in ok(name, c):
                rows = x["batch"].get("generate_rows", 0)
                value = x["timings_ms"].get(key)
                if value is not None:
                    groups[rows].append(value)
        return {str(k): round(statistics.median(v), 1) for k, v in sorted(groups.items())}

    throughput = summary(lambda n, c: round(len(results[n][c]) / sum(walls[n][c]), 3))
    p50 = summary(lambda n, c: round(pct([x["latency_s"] for x in results[n][c]], 0.50) * 1e3, 1))
    p99 = summary(lambda n, c: round(pct([x["latency_s"] for x in results[n][c]], 0.99) * 1e3, 1))
    batching = [n for n in CONFIGS if n != "batch_off"]
    heads = probe_heads_per_step(bank, batch_on, args.side)
    denoise = {name: by_rows(name, "denoise") for name in CONFIGS}
    print_line({
        "bench": "serve", "quick": args.quick,
        "model": "tiny", "device": "cpu", "bank": str(bank.relative_to(ROOT) if bank.is_relative_to(ROOT) else bank),
        "request": body_for(0, args.steps, args.side, args.format) | {"prompt": "bench {i}: …", "seed": "1000 + i"},
        "batch_size": {"batch_on": batch_on, "batch_on_fast": batch_on, "batch_off": 1},
        "max_batch_delay_ms": {"batch_on": committed["maxBatchDelay"], "batch_on_fast": args.fast_delay,
                               "batch_off": committed["maxBatchDelay"]},
        "batch_invariant": {"batch_on": True, "batch_on_fast": False, "batch_off": "n/a (1 row)"},
        "warm_batch_sizes": {"batch_on": [batch_on], "batch_on_fast": buckets, "batch_off": [1]},
        "rounds": rounds, "warmup_requests_per_measurement": {f"c{c}": c for c in per_round},
        "requests": summary(lambda n, c: len(results[n][c])),
        "throughput_rps": throughput,
        "throughput_rps_per_round": summary(lambda n, c: [round(per_round[c] / w, 3) for w in walls[n][c]]),
        "p50_ms": p50,
        "p99_ms": p99,
        "batching_throughput_gain": {n: round(throughput[n]["c8"] / throughput["batch_off"]["c8"], 3) for n in batching},
        # the same ratio from each round's adjacent measurements: their spread shows the noise
        "batching_throughput_gain_per_round": {n: [round(walls["batch_off"][8][r] / walls[n][8][r], 3)
                                                   for r in range(rounds)] for n in batching},
        "batching_throughput_ratio_c1": {n: round(throughput[n]["c1"] / throughput["batch_off"]["c1"], 3)
                                         for n in batching},
        # a lone client: its latency with batching on over batching off
        "lone_latency_ratio_p50": {n: round(p50[n]["c1"] / p50["batch_off"]["c1"], 3) for n in batching},
        "lone_latency_ratio_p99": {n: round(p99[n]["c1"] / p99["batch_off"]["c1"], 3) for n in batching},
        # what batch invariance costs: the invariant configuration over the fast one
        "invariance_cost": {"throughput_c8": round(throughput["batch_on"]["c8"] / throughput["batch_on_fast"]["c8"], 3),
                            "throughput_c1": round(throughput["batch_on"]["c1"] / throughput["batch_on_fast"]["c1"], 3),
                            "p50_c1": round(p50["batch_on"]["c1"] / p50["batch_on_fast"]["c1"], 3),
                            "p50_c8": round(p50["batch_on"]["c8"] / p50["batch_on_fast"]["c8"], 3),
                            "p99_c8": round(p99["batch_on"]["c8"] / p99["batch_on_fast"]["c8"], 3)},
        "errors": sum(x["status"] != 200 for name in CONFIGS for c in per_round for x in results[name][c]),
        "error_statuses": dict(Counter(str(x["status"]) for name in CONFIGS for c in per_round
                                       for x in results[name][c] if x["status"] != 200)),
        # responses per generate-rows of the batch they ran in (a batch of 4 answers 4 responses)
        "batch_rows_formed": summary(lambda n, c: dict(sorted(Counter(
            str(x["batch"].get("generate_rows")) for x in ok(n, c)).items()))),
        "server_denoise_ms_by_rows": denoise,
        "server_denoise_ms_per_request_by_rows": {
            name: {k: round(v / int(k), 1) for k, v in d.items() if int(k) > 0} for name, d in denoise.items()},
        "server_total_ms_by_rows": {name: by_rows(name, "total") for name in CONFIGS},
        # in-process, one step of a full batch: the service's probe heads before (one call per
        # request row and layer) and now (one grouped call per step)
        "probe_heads_per_step": heads,
        "worker_start_s": {"cold_cache": round(start_s["batch_off_cold"], 1) if "batch_off_cold" in start_s else None,
                           "warm_cache": round(start_s["batch_off"], 1),
                           "archive_cached": (round(start_s["batch_off_archive"], 1)
                                              if "batch_off_archive" in start_s else None)},
        "archive_precompile_s": round(precompile_s, 1) if precompile_s is not None else None,
        "cold_start_error": cold_error,
        "worker_start_what": "batching-off archive, torchserve launch → worker READY (model load + compile + "
                             "warm-up of batch 1); cold = empty temp TORCHINDUCTOR_CACHE_DIR, warm = .cache/inductor, "
                             "archive_cached = built with PRECOMPILE=1 (archive_precompile_s: that build), started "
                             "with another empty cache folder",
        "batch_on_start_s_warm_cache": round(start_s["batch_on"], 1),
        "worker_self_reported_s": workers,
        "loadavg": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()],
                    "at_each_measurement": load_at},
        "load_note": "2 shared CPU cores: other processes' load slows every configuration; they take turns in "
                     "interleaved rounds so drift hits all, and the per-round throughputs show the spread",
        "torch": version("torch"), "torchserve": version("torchserve"), "java": java_version(),
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "wall_s": round(time.monotonic() - t_begin, 1),
        "goals": {"batching_throughput_gain": ">= 1.8", "lone_latency_ratio_p50": "<= 1.05"},
    })


if __name__ == "__main__":
    main()
