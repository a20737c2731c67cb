"""A run's figures, printed."""

from __future__ import annotations

from bench.load.designers import RECOVERY_LIMIT_S
from bench.load.faults import fault_passed
from bench.load.run import MEMORY_GROWTH_LIMIT

# The hostile mode's goals: beside the strangers, designers' p95 per tab and the studio's memory
# grow at most this much over the same designers' run alone (issue: a public Space).
HOSTILE_P95_LIMIT = 1.5
HOSTILE_MEMORY_LIMIT = 1.2


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
    if "strangers" in figures:
        strangers = figures["strangers"]
        print(f"strangers: {strangers['sent']} requests without signing in ({strangers['cpu_s']:.1f} s of CPU "
              "on this machine, taken from the studio's two cores); answered:")
        for kind, answers in strangers["answers"].items():
            print(f"  {kind:8} {sum(answers.values()):>6}  " + ", ".join(f"{a}: {n}" for a, n in sorted(answers.items()))
                  + f"  let in: {strangers['let_in'][kind]}")
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


def compare_hostile(alone: dict, beside: dict) -> bool:
    """The designers alone and beside the strangers, side by side; whether the goals held."""
    print("\n== designers alone vs beside strangers ==")
    print(f"{'tab':10} {'p50 s':>7} {'p50 s':>7} {'p95 s':>7} {'p95 s':>7} {'p95 ratio':>10}")
    ratios = []
    for tab, row in alone["tabs"].items():
        other = beside["tabs"].get(tab, {})
        ratio = (other.get("p95_s") or 0) / row["p95_s"] if row.get("p95_s") else None
        ratios.append(ratio)
        print(f"{tab:10} {_s(row['p50_s']):>7} {_s(other.get('p50_s')):>7} {_s(row['p95_s']):>7} "
              f"{_s(other.get('p95_s')):>7} {_s(ratio):>10}")
    memory = {name: run["memory"].get("studio", {}).get("last_mb") for name, run in (("alone", alone), ("beside", beside))}
    memory_ratio = memory["beside"] / memory["alone"] if memory["alone"] and memory["beside"] else None
    print(f"studio RSS (median of the last third): {_s(memory['alone'])} MB alone, {_s(memory['beside'])} MB beside "
          f"strangers, ratio {_s(memory_ratio)} (goal at most {HOSTILE_MEMORY_LIMIT})")
    let_in = sum(beside.get("strangers", {}).get("let_in", {}).values())
    checks = {
        "no signed-in job failed": beside["failed"] == 0 and beside["lost"] == 0,
        f"p95 per tab at most {HOSTILE_P95_LIMIT}x": all(r is not None and r <= HOSTILE_P95_LIMIT for r in ratios),
        f"studio memory at most {HOSTILE_MEMORY_LIMIT}x": memory_ratio is not None and memory_ratio <= HOSTILE_MEMORY_LIMIT,
        "no stranger's request let in": let_in == 0,
    }
    for check, held in checks.items():
        print(f"  {check}: {'yes' if held else 'NO'}")
    return all(checks.values())
