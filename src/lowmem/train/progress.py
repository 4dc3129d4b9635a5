"""What a run tells the user: the live progress line, and planned versus measured memory."""

import sys

from lowmem.plan import Plan
from lowmem.spec.units import format_bytes


class Progress:
    """One live line on a terminal (a line per update otherwise): step, loss, lr, tokens/s, time."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total = total_steps
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def update(self, r: dict, done_before: int = 0) -> None:
        if not self.enabled:
            return
        elapsed = r["elapsed_s"]
        left = elapsed / max(r["step"] - done_before, 1) * (self.total - r["step"])
        line = (f"step {r['step']:>{len(str(self.total))}}/{self.total}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  "
                f"{r['tokens_per_s']:,.0f} tok/s  {_clock(elapsed)} elapsed, {_clock(left)} left")
        if "eval_loss" in r:
            line += f"  eval {r['eval_loss']:.4f}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line)
            if "eval_loss" in r:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def memory_report(p: Plan, measured: dict | None, cuda: dict | None = None, rss_added: int | None = None) -> dict:
    """Planned versus measured peak bytes, per component and in total.

    On a CPU `rss_added` (what the run added to the process's peak RSS, `ProcessPeak`) goes into a `process`
    block beside the plan's RSS view (`device_bytes`, what the budget bounds) and the host allocator's figures.

    On a GPU (`cuda`: the measured steps' `max_memory_allocated`, `max_memory_reserved`, `num_alloc_retries`)
    the measured peak is the allocator's `max_memory_allocated`, set against the plan's allocated view (tensors and
    cuBLAS's workspaces), and the plan's reserved and nvidia-smi views sit beside the measured reserved; the
    components stay the live-tensor tracker's.
    """
    planned = p.memory.by_name()
    measured_by = dict(measured["peak_by_category"]) if measured else {}
    measured_peak = measured["peak_bytes"] if measured else 0
    names = list(dict.fromkeys([*planned, *measured_by]))
    rows = [{"component": n, "planned_bytes": planned.get(n, 0), "measured_bytes": measured_by.get(n, 0)}
            for n in names]
    method = "live tensor bytes (TorchDispatchMode)"
    extra = {}
    planned_peak = p.memory.peak_bytes
    if cuda is not None:
        # torch's view against the plan's view of the same thing: the live tensors and cuBLAS's workspaces
        measured_peak, method = cuda["max_memory_allocated"], "torch.cuda.max_memory_allocated"
        planned_peak = p.memory.allocated_bytes
        extra = {"cuda": {**cuda, "reserved_over_allocated": cuda["max_memory_reserved"]
                          / max(cuda["max_memory_allocated"], 1),
                          "planned_reserved_bytes": p.memory.reserved_bytes,
                          "planned_device_bytes": p.memory.device_bytes},
                 "tracked_peak_bytes": measured["peak_bytes"] if measured else 0,
                 "planned_tensor_peak_bytes": p.memory.peak_bytes}
    if cuda is None and rss_added is not None:
        extra = {"process": {"rss_added_bytes": rss_added, "planned_rss_bytes": p.memory.device_bytes,
                             "host_allocator": p.strategies.host_allocator, **_allocator_figures(p)}}
    error = (planned_peak - measured_peak) / measured_peak if measured_peak else None
    return {"device": p.hardware.name, "method": method,
            "planned_peak_bytes": planned_peak, "planned_phase": p.memory.peak_phase,
            "measured_peak_bytes": measured_peak, "error": error, "components": rows, **extra}


def _allocator_figures(p: Plan) -> dict:
    """The caching allocator's peak of mapped blocks and its mappings, where the plan ran on it."""
    from lowmem import hostmem

    if p.strategies.host_allocator != "caching" or not hostmem.installed():
        return {}
    s = hostmem.stats()
    return {"allocator_peak_bytes": s.peak_bytes, "allocator_maps": s.maps, "allocator_hits": s.hits}


def max_stats(a: dict | None, b: dict | None) -> dict | None:
    """The larger of two steps' CUDA memory figures, field by field."""
    if a is None or b is None:
        return b or a
    return {k: max(a[k], b[k]) for k in b}


def describe_memory(report: dict) -> str:
    """Planned versus measured memory as a small table."""
    lines = [f"{'component':<16} {'planned':>12} {'measured':>12}"]
    for row in report["components"]:
        lines.append(f"{row['component']:<16} {format_bytes(row['planned_bytes']):>12} "
                     f"{format_bytes(row['measured_bytes']):>12}")
    lines.append(f"{'peak':<16} {format_bytes(report['planned_peak_bytes']):>12} "
                 f"{format_bytes(report['measured_peak_bytes']):>12}")
    if report["error"] is not None:
        lines.append(f"planned is {report['error']:+.1%} off measured ({report['method']})")
    process = report.get("process")
    if process:
        lines.append(f"process RSS added {format_bytes(process['rss_added_bytes'])} (planned "
                     f"{format_bytes(process['planned_rss_bytes'])}, the budget's view; "
                     f"{'lowmem caching' if process['host_allocator'] == 'caching' else 'glibc'} allocator)")
    cuda = report.get("cuda")
    if cuda:
        lines.append(f"CUDA allocator: reserved {format_bytes(cuda['max_memory_reserved'])} "
                     f"({cuda['reserved_over_allocated']:.2f}x allocated; planned "
                     f"{format_bytes(cuda['planned_reserved_bytes'])}), {cuda['num_alloc_retries']} allocation "
                     "retries")
    return "\n".join(lines)
