"""Designers under load, and faults under that load: the real studio in front of the real local
endpoint (real Triton, tiny weights, CPU), everything on 127.0.0.1.

Each simulated designer is its own gradio_client session on the studio's named API, chaining
generate -> erase (with a mask) -> restyle -> upscale -> restore (the generated PNG back to its
tab's values), again and again until the time is up. Printed: failed requests, p50/p95 latency
per tab, throughput, and the resident memory of the studio, the endpoint, tritonserver and each
model's Python-backend stub, sampled through the run, with whether it grew.

A fault (--fault NAME, or --faults all for each in turn) is injected a third of the way into the
run; for each the script reports what the designers were told, that no accepted job was lost,
that the history is intact, and how long until every tab answered again without a manual step:

  kill-model         SIGKILL the stub of the Generate tab's model
  restart-triton     SIGTERM tritonserver (the endpoint's watchdog starts it again)
  restart-endpoint   SIGTERM the endpoint (graceful; the studio starts it again)
  kill-endpoint      SIGKILL the endpoint; its tritonserver and stubs must not outlive it
  kill-studio        SIGKILL the studio; its endpoint, tritonserver and stubs must not outlive
                     it; the script then starts the studio again, as a supervisor would
  fill-cache         load models the designers do not use until the endpoint must evict theirs
  unreadable-store   make the model store unreadable, crash the Generate model so that it must
                     be loaded from there, then make the store readable again

    python -m bench.load [--designers 4] [--seconds 60] [--fault NAME | --faults all]
                         [--studio-url URL] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from bench.load.designers import SIZE, STEPS
from bench.load.faults import FAULTS, fault_passed
from bench.load.hostile import DEFAULT_RATE_PER_KIND
from bench.load.report import compare_hostile, print_run
from bench.load.run import run_load, warm_up
from bench.load.studio_tree import Studio
from serving.archive import REPO_ROOT

DEFAULT_DESIGNERS, MAX_DESIGNERS = 4, 16
DEFAULT_SECONDS, MAX_SECONDS = 60, 3600
MAX_HOSTILE_RATE = 1000.0
DEFAULT_WORK_DIR = REPO_ROOT / "build" / "load-studio"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designers", type=int, default=DEFAULT_DESIGNERS, help=f"1 to {MAX_DESIGNERS}")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help=f"each run's, up to {MAX_SECONDS}")
    faults = parser.add_mutually_exclusive_group()
    faults.add_argument("--fault", choices=FAULTS)
    faults.add_argument("--faults", choices=["all"], help="the plain load, then each fault in turn")
    faults.add_argument("--hostile", action="store_true",
                        help="a studio with sign-in: the designers alone, then beside strangers who never sign "
                             "in flooding uploads, editor layers, logins and jobs (bench/load/hostile.py)")
    parser.add_argument("--hostile-rate", type=float, default=DEFAULT_RATE_PER_KIND, metavar="N",
                        help=f"with --hostile: requests a second of each kind of stranger, up to {MAX_HOSTILE_RATE:.0f} "
                             f"(default {DEFAULT_RATE_PER_KIND:.0f})")
    parser.add_argument("--studio-url", help="a studio already running on 127.0.0.1 (default: start one)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="the started studio's store, cache, results and logs (emptied first)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    if not 1 <= args.designers <= MAX_DESIGNERS:
        parser.error(f"--designers must be 1 to {MAX_DESIGNERS}")
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be more than 0 and at most {MAX_SECONDS}")
    if not 0 < args.hostile_rate <= MAX_HOSTILE_RATE:
        parser.error(f"--hostile-rate must be more than 0 and at most {MAX_HOSTILE_RATE:.0f}")
    if args.hostile and args.studio_url:
        parser.error("--hostile needs a studio this script starts (with a users file of its own)")
    if args.studio_url and urlparse(args.studio_url).hostname != "127.0.0.1":
        parser.error("--studio-url must be on 127.0.0.1: this script loads only a studio on this machine")
    names = list(FAULTS) if args.faults == "all" else [args.fault] if args.fault else []
    if args.studio_url and "kill-studio" in names:
        if args.fault:
            parser.error("kill-studio needs a studio this script starts (it starts it again): leave out --studio-url")
        names.remove("kill-studio")
        print("kill-studio left out: it needs a studio this script starts (it starts it again)")

    if args.studio_url:
        try:
            with urllib.request.urlopen(args.studio_url, timeout=10):
                pass
        except OSError as error:
            parser.error(f"no studio answers at {args.studio_url}: {error}")
        studio = Studio(args.work_dir, args.studio_url)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        if studio.pid is None:
            print("its process was not found (another user's?): no memory figures, and no fault can be injected")
    else:
        shutil.rmtree(args.work_dir, ignore_errors=True)
        args.work_dir.mkdir(parents=True)
        print(f"starting the studio and its local endpoint (tiny weights) in {args.work_dir} ...", flush=True)
        studio = Studio(args.work_dir, sign_in=args.hostile).start()
    runs = []
    hostile_held = False
    try:
        print(f"studio {studio.url} (pid {studio.pid}); {args.designers} designers, {args.seconds:.0f} s a run, "
              f"{SIZE} px, {STEPS} steps", flush=True)
        warm = time.monotonic()
        warm_up(studio)
        print(f"warm-up (every model loaded once): {time.monotonic() - warm:.0f} s", flush=True)
        for name in ([None] if not names or args.faults else []) + names:
            figures = run_load(studio, designers=args.designers, seconds=args.seconds, fault=name)
            print_run(figures)
            runs.append(figures)
        if args.hostile:
            beside = run_load(studio, designers=args.designers, seconds=args.seconds, hostile=True,
                              hostile_rate=args.hostile_rate)
            print_run(beside)
            runs.append(beside)
            hostile_held = compare_hostile(runs[0], beside)
    except RuntimeError as error:  # a fault this studio cannot take (no local endpoint of its own)
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        studio.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(runs, indent=1))
    healthy = all(run["failed"] == 0 and run["lost"] == 0 for run in runs if "fault" not in run)
    handled = all(fault_passed(run) for run in runs if "fault" in run)
    print(f"\nall requests of the plain load answered: {healthy}; every fault handled: {handled}"
          + (f"; strangers held off: {hostile_held}" if args.hostile else ""))
    return 0 if healthy and handled and (hostile_held or not args.hostile) else 1


if __name__ == "__main__":
    sys.exit(main())
