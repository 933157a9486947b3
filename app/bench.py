"""Speed benchmark of the app (not a test): ``python -m app.bench [--json PATH]``.

Measures, for the default model (or ``--model``) on this machine:

* first analysis of one 224 px image: decode, preprocess, SPA forward, dense forward, every view
  (the model is loaded and warmed up first; the caches are empty): what the page shows first;
* the wall-clock measurement the page asks for right after (median of several alternating runs of
  the dense twin and SPA, without tracing), with the numbers it measured;
* re-renders: threshold change (a new SPA forward; the dense pass is cached) and layer change
  (no forward at all);
* each attribution method on one image;
* over HTTP, the layer slider of one client (server and transfer time, without file downloads);
* a load test on loopback: the app in a subprocess on a free port, ``--clients`` gradio_client
  clients each sending ``--requests`` analyses to ``/analyze`` (the views, as the page gets them first;
  cycling images, thresholds and layers, downloading every output file), reporting failures,
  p50/p95 latency, the server's peak resident memory, and the disk used by gradio's cache and the
  app's own folder at the start, at the end and after the server stopped.

Analyses run ``--repeats`` times with empty caches; the minimum wall-clock is the best estimate of
the time on an idle machine (the 2 cores are shared), reported with the median and the median CPU
seconds. Targets on the 2-core CPU: first analysis < 1.5 s, re-render < 0.5 s, attribution < 10 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from spa_viz.analysis.attribution import METHODS
from spa_viz.io.timer import stopwatch

from .examples import build_examples
from .files import disk_usage
from .models import LEARNED_GATE, ModelRegistry
from .service import AnalysisService, SPASettings
from .settings import REPO_ROOT, AppSettings, configure_torch

_log = logging.getLogger(f"{__package__}.bench")  # not __name__: run as ``python -m app.bench`` it is __main__
TARGETS_S = {"first_analysis": 1.5, "threshold_rerender": 0.5, "layer_rerender": 0.5, "attribution": 10.0}


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of ``fn()``; CPU time sums all threads, so on an idle 2-core
    machine wall ~ CPU / 2, and wall >> CPU / 2 means other processes took the cores."""
    with stopwatch() as timing:
        fn()
    return timing.wall, timing.cpu


def _series(timings: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Min and median wall-clock (the min is the best estimate of the uncontended time) and median CPU."""
    walls = [w for w, _ in timings]
    return {
        "min_wall_s": round(min(walls), 3),
        "median_wall_s": round(statistics.median(walls), 3),
        "median_cpu_s": round(statistics.median(c for _, c in timings), 3),
    }


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def bench_service(model: str | None, repeats: int, threads: int) -> dict[str, Any]:
    """In-process timings of the analysis service (no HTTP), each ``repeats`` times with empty caches."""
    settings = AppSettings(default_model=model, threads=threads)
    configure_torch(settings)
    examples = build_examples(settings.examples_dir)
    registry = ModelRegistry(settings.torch_device, settings.allow_dirs, settings.model_cache_size, None, model)
    name = registry.default()
    load_s, _ = _timed(lambda: registry.get(name))
    entry = registry.get(name)
    selector = None if entry.trained_gates else "cls_attention"
    spa = SPASettings(selector=selector, selector_amount=0.9)
    moved = replace(spa, threshold=0.6, selector_amount=0.8)
    photo, layers = examples.photos[0], entry.spa_layers
    services = [AnalysisService(settings, registry, examples)]
    services[0].analyze([examples.photos[-1]], name, spa)  # warm-up allocations
    first, measure, layer, threshold = [], [], [], []
    for r in range(repeats):
        service = AnalysisService(settings, registry, examples)  # empty image, input, forward and timing caches
        services.append(service)
        first.append(_timed(lambda s=service: s.analyze([photo], name, spa, measure=False)))
        measure.append(_timed(lambda s=service: s.measure([photo], name, spa)))
        layer.append(
            _timed(
                lambda s=service, r=r: s.analyze(
                    [photo], name, spa, layer=layers[1 + r % (len(layers) - 1)], measure=False
                )
            )
        )
        threshold.append(_timed(lambda s=service: s.analyze([photo], name, moved, measure=False)))
    clock = services[-1].measure([photo], name, spa)
    attribution = {}
    for method in METHODS:
        service = AnalysisService(settings, registry, examples)
        services.append(service)
        service.analyze([photo], name, spa, measure=False)
        wall, cpu = _timed(lambda s=service, m=method: s.attribute([photo], name, spa, 0, m))
        attribution[method] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
        _log.info("attribution %-21s %.2f s", method, wall)
    for service in services:
        service.close()
    return {
        "model": name,
        "task": entry.adapter.task,
        "selector": selector or LEARNED_GATE,
        "model_load_s": round(load_s, 2),
        "repeats": repeats,
        "first_analysis": _series(first),
        "wall_clock_measurement": _series(measure),
        "measured_wall_clock_ms": clock.to_dict(),
        "threshold_rerender": _series(threshold),
        "layer_rerender": _series(layer),
        "attribution": attribution,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wait_until_up(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with code {process.returncode} before serving")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the app did not answer at {url} within {timeout_s:.0f} s")


def _http_layer_rerender(url: str, photo: Path, repeats: int = 5) -> list[tuple[float, float]]:
    """One client moving the layer slider over HTTP: server time and transfer, not the file downloads
    (a browser fetches the changed images in parallel)."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=False)
    files = [handle_file(str(photo))]
    client.predict(files=files, selector=LEARNED_GATE, api_name="/analyze")
    return [
        _timed(lambda k=k: client.predict(files=files, selector=LEARNED_GATE, layer=4 + k % 4, api_name="/analyze"))
        for k in range(1, repeats + 1)
    ]


#: the server's folders below its temporary folder: gradio's private cache and the app's own files
SERVER_FOLDERS = {"gradio_cache": "spa-viz-gradio-*", "app_files": "spa-viz-app-*"}


def _disk(tmp: Path) -> dict[str, dict[str, float]]:
    """Files and megabytes in each of the server's folders below its temporary folder ``tmp``."""
    usage = {}
    for name, pattern in SERVER_FOLDERS.items():
        found = [disk_usage(folder) for folder in tmp.glob(pattern)]
        files, size = sum(u.files for u in found), sum(u.bytes for u in found)
        usage[name] = {"folders": len(found), "files": files, "mb": round(size / 1e6, 2)}
    return usage


def load_test(
    model: str | None, clients: int, requests: int, threads: int, cache_age_s: int, cache_check_s: int
) -> dict[str, Any]:
    """``clients`` concurrent gradio_client clients x ``requests`` analyses against a launched app."""
    from gradio_client import Client, handle_file

    examples = build_examples(AppSettings().examples_dir)
    port = _free_port()
    command = [sys.executable, "-m", __package__, "--port", str(port), "--threads", str(threads)]
    command += ["--cache-age", str(cache_age_s), "--cache-check", str(cache_check_s)]
    command += ["--model", model] if model else []
    # the server's disk, watched from outside: its temporary folder holds gradio's cache and the app's files
    scratch = Path(tempfile.mkdtemp(prefix="spa-viz-app-bench-"))
    server_tmp, downloads = scratch / "server-tmp", scratch / "client-downloads"  # downloads: not counted
    server_tmp.mkdir()
    downloads.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    env |= {"GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(server_tmp)}
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}/"
    latencies: list[float] = []
    failures: list[str] = []
    peak_rss = [0.0]
    done = threading.Event()
    lock = threading.Lock()

    def sample_memory() -> None:
        while not done.wait(0.5):
            peak_rss[0] = max(peak_rss[0], _rss_mb(process.pid))

    def client_run(index: int) -> None:
        client = Client(url, verbose=False, download_files=str(downloads))
        for i in range(requests):
            photo = examples.photos[(index + i) % len(examples.photos)]
            threshold = (0.3, 0.5, 0.7)[(index + i) % 3]
            try:
                with stopwatch() as timing:
                    client.predict(
                        files=[handle_file(str(photo))],
                        threshold=threshold,
                        selector=LEARNED_GATE,
                        layer=4 + i % 4,
                        api_name="/analyze",
                    )
            except Exception as err:  # every failure is counted and reported
                with lock:
                    failures.append(f"client {index} request {i}: {type(err).__name__}: {err}")
            else:
                with lock:
                    latencies.append(timing.wall)

    try:
        _wait_until_up(url, process, timeout_s=300)
        disk_start = _disk(server_tmp)
        http_layer = _http_layer_rerender(url, examples.photos[0])
        rss_start = _rss_mb(process.pid)
        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=client_run, args=(i,)) for i in range(clients)]
        with stopwatch() as run:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        wall = run.wall
        done.set()
        sampler.join()
        rss_end = _rss_mb(process.pid)
        disk_end = _disk(server_tmp)
    finally:
        process.terminate()  # SIGTERM: the app stops its server and removes its files
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    disk_stopped = _disk(server_tmp)
    shutil.rmtree(scratch, ignore_errors=True)
    for moment, usage in (("start", disk_start), ("end", disk_end), ("stopped", disk_stopped)):
        _log.info(
            "server disk at the %-7s %s",
            moment,
            ", ".join(f"{k} {v['files']} files {v['mb']} MB" for k, v in usage.items()),
        )
    return {
        "clients": clients,
        "requests_per_client": requests,
        "succeeded": len(latencies),
        "failed": len(failures),
        "failures": failures[:5],
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(_percentile(latencies, 0.95), 3) if latencies else None,
        "max_s": round(max(latencies), 3) if latencies else None,
        "wall_s": round(wall, 1),
        "http_layer_rerender": {k: v for k, v in _series(http_layer).items() if "wall" in k},
        "server_rss_mb": {"start": round(rss_start), "peak": round(peak_rss[0]), "end": round(rss_end)},
        "server_disk": {
            "cache_age_s": cache_age_s,
            "cache_check_s": cache_check_s,
            "start": disk_start,
            "end": disk_end,
            "after_stop": disk_stopped,
        },
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m app.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model to benchmark (default: the app's default)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each analysis timing (min and median)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10, help="analyses per client in the load test")
    parser.add_argument(
        "--threads", type=int, default=AppSettings.threads, help="torch threads, as python -m app --threads"
    )
    parser.add_argument("--skip-load-test", action="store_true")
    parser.add_argument(
        "--cache-age", type=int, default=AppSettings.cache_age_s, help="the served app's --cache-age (seconds)"
    )
    parser.add_argument(
        "--cache-check", type=int, default=AppSettings.cache_check_s, help="the served app's --cache-check (seconds)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "gradio_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": args.threads or torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
            "cuda": torch.cuda.is_available(),
        },
        "targets_s": TARGETS_S,
        "service": bench_service(args.model, args.repeats, args.threads),
    }
    if not args.skip_load_test:
        result["load_test"] = load_test(
            args.model, args.clients, args.requests, args.threads, args.cache_age, args.cache_check
        )
    result["machine"]["load_average_end"] = os.getloadavg()
    _log.info("%s", json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
