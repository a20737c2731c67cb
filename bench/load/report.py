"""A run's figures, printed."""

from __future__ import annotations

from bench.load.designers import RECOVERY_LIMIT_S
from bench.load.faults import fault_passed
from bench.load.run import MEMORY_GROWTH_LIMIT


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_run(figures: dict) -> None:
    print(f"\n== {figures['name']}: {figures['seconds']:.0f} s ==")
    print(f"requests: {figures['sent']} sent, {figures['completed']} completed, {figures['failed']} failed, "
          f"{figures['lost']} lost")
    print(f"{'tab':10} {'done':>5} {'p50 s':>7} {'p95 s':>7}")
    for tab, row in figures["tabs"].items():
        print(f"{tab:10} {row['done']:>5} {_s(row['p50_s']):>7} {_s(row['p95_s']):>7}")
    print(f"throughput: {figures['jobs_per_minute']:.1f} jobs/min (generate, erase, restyle and upscale jobs done)")
    print(f"{'process':24} {'RSS MB first third':>19} {'last third':>11} {'ratio':>6}")
    for role, row in sorted(figures["memory"].items()):
        print(f"{role:24} {row['first_mb']:>19.0f} {row['last_mb']:>11.0f} {row['ratio']:>6.2f}"
              + ("  (restarted by the fault: not judged)" if row["restarted"] else ""))
    judged = [row["ratio"] for row in figures["memory"].values() if not row["restarted"]]
    print(f"memory grew: {'YES' if figures['memory_grew'] else 'no'} (largest last/first third median ratio "
          f"{max(judged, default=1.0):.2f} of the processes that ran throughout, limit {MEMORY_GROWTH_LIMIT:.2f})")
    if "fault" not in figures:
        return
    print(f"fault {figures['fault']} at {figures['at_s']:.0f} s: {figures['did']}")
    for key in ("evictions", "filler_failures"):
        if key in figures:
            print(f"  {key.replace('_', ' ')}: {figures[key]}")
    if "orphans" in figures:
        print(f"  its {figures['children']} child processes gone after {figures['children_gone_s']:.1f} s; "
              f"orphans: {figures['orphans'] or 'none'}")
    messages = figures["messages"]
    print(f"  designers were told ({figures['failed']} failed requests): "
          + ("nothing, no request failed" if not messages else ""))
    for message in messages:
        print(f"    - {message}")
    print(f"  clear (no traceback): {all('Traceback' not in m for m in messages)}; "
          f"accepted jobs lost: {figures['lost']} (each other one completed or reported its failure)")
    history = figures["history"]
    print(f"  history: {history['results_served']} earlier results of {history['designers']} designers served "
          f"unchanged, first ones restored: {'intact' if history['intact'] else 'BROKEN ' + str(history['problems'])}")
    recovery = figures["recovery_s"]
    print("  service back without a manual step: " + (f"every tab answered again {recovery:.1f} s after the fault"
          if recovery is not None else f"NO, not within {RECOVERY_LIMIT_S} s"))
    print(f"  fault handled: {'yes' if fault_passed(figures) else 'NO'}")
