"""What `flashinfer profile` prints: the summary table of a Trace, sweep parsing and rows.

Kept apart from flashinfer/profile.py (which records) so the recording side stays small
and the formatting can change without touching the engine's hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

from flashinfer.errors import ConfigError

MiB = 2**20
SWEEP_KEYS = ("window", "dram", "predictor", "flash-bw")
SPLIT_LABELS = (("io", "I/O"), ("memory_management", "memory mgmt"), ("predictor", "predictor"),
                ("attention", "attention"), ("ffn_compute", "FFN compute"), ("other", "other"))


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def summary_table(summary: dict, run: dict) -> str:
    """The per-layer table and the totals, as `flashinfer profile` prints them."""
    lines = []
    cap = run.get("cap_bytes")
    peak = run.get("peak_rss_bytes") or 0
    rss = f"peak RSS {peak / MiB:.0f} MiB"
    if cap:
        rss += f", {'within' if peak <= cap else 'OVER'} the {cap / MiB:.0f} MiB cap"
    lines.append(
        f"JIT/compile (first call) {run.get('jit_s', 0):.2f} s | prefill {summary['prefill_tokens']} tokens "
        f"{summary['prefill_s']:.2f} s | decode {summary['decode_tokens']} tokens, "
        f"{_fmt(summary['decode_tok_s'], '.2f')} tok/s | {rss}")
    resident = run.get("resident_ffn_layers")
    if resident is not None:
        n_layers = run.get("n_layers") or len(summary["layers"])
        gate = run.get("predictor") == "gate"  # whole layers with their W_gate, the gate deciding per neuron
        what = "gate predictor over whole FFN layers" if gate else "dense FFN"
        lines.append(f"{what}: {len(resident)} of {n_layers} layers resident in DRAM after their first read"
                     + (f" ({_ranges(resident)}); the others stream from flash every token" if 0 < len(resident) < n_layers
                        else "; nothing is read from flash per token" if resident else "; every layer streams from flash"))
        if resident and not gate:  # kernels/layer.py: the untraced engine runs such a block's decode step as one call
            lines.append("traced per kernel: an untraced decode runs each resident block as one compiled call "
                         "(kernels.decode_layer), without the Python between kernels counted in 'other' here")
    lines.append("")
    head = (f"{'layer':>5} {'hit rate':>8} {'neurons/tok':>11} {'MB read/tok':>11} {'ms I/O/tok':>10} "
            f"{'ms compute/tok':>14} {'evicted/tok':>11} {'cache rows':>13}")
    lines.append(head)
    for row in summary["layers"]:
        rows = f"{row['occupancy']}/{row['capacity']}" if row["capacity"] else "-"
        lines.append(
            f"{row['layer']:>5} {_fmt(row['hit_rate'], '.3f'):>8} {row['predicted_per_token']:>11.1f} "
            f"{row['bytes_read_per_token'] / 1e6:>11.3f} {row['io_ms_per_token']:>10.2f} "
            f"{row['compute_ms_per_token']:>14.2f} {row['evicted_per_token']:>11.1f} {rows:>13}")
    layers = summary["layers"]
    lines.append(
        f"{'all':>5} {_fmt(summary['hit_rate'], '.3f'):>8} {sum(r['predicted_per_token'] for r in layers):>11.1f} "
        f"{summary['bytes_read_per_token'] / 1e6:>11.3f} {sum(r['io_ms_per_token'] for r in layers):>10.2f} "
        f"{sum(r['compute_ms_per_token'] for r in layers):>14.2f} {sum(r['evicted_per_token'] for r in layers):>11.1f}")
    lines.append("")
    ms = summary["ms_per_token"]
    total = ms["total"] or 1e-30
    parts = " | ".join(f"{label} {ms[key]:.2f} ({100 * ms[key] / total:.0f}%)" for key, label in SPLIT_LABELS)
    lines.append(f"latency per decode token: {ms['total']:.2f} ms = {parts}")
    lines.append("(hit rate: predicted neurons already resident; I/O: waiting for flash; memory mgmt: "
                 "neuron cache bookkeeping; compute columns: attention + predictor + FFN kernel)")
    return "\n".join(lines)


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> "layers 0-2, 5"."""
    parts, start = [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return "layers " + ", ".join(parts)


@dataclass(frozen=True)
class Sweep:
    key: str  # one of SWEEP_KEYS
    values: list  # parsed: ints for window, strings otherwise (sizes checked)

    @property
    def knob(self) -> str:
        """The Engine.open keyword."""
        return self.key.replace("-", "_")


def parse_sweep(text: str) -> Sweep:
    """'window=1,2,4' -> Sweep; clear errors for anything else."""
    from storage.errors import ConfigValueError
    from storage.units import parse_bandwidth, parse_size

    key, sep, values = text.partition("=")
    key = key.strip().replace("_", "-")
    if not sep or key not in SWEEP_KEYS:
        raise ConfigError(f"--sweep {text!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not items:
        raise ConfigError(f"--sweep {text!r}: no values after '='")
    parsed = []
    for item in items:
        if key == "window":
            if not item.isdigit() or int(item) < 1:
                raise ConfigError(f"--sweep {text!r}: window values must be positive integers, got {item!r}")
            parsed.append(int(item))
        elif key in ("dram", "flash-bw"):
            try:
                (parse_size if key == "dram" else parse_bandwidth)(item)
            except ConfigValueError as e:
                raise ConfigError(f"--sweep {text!r}: {e}") from None
            parsed.append(item)
        else:
            parsed.append(item)
    return Sweep(key, parsed)


def _mib(n):
    return None if n is None else n / MiB


def sweep_table(sweep: Sweep, rows: list[dict]) -> str:
    """rows: {"value", "summary"} or {"value", "error"}; one line each, in sweep order."""
    lines = [f"{sweep.key:>10} {'hit rate':>8} {'MB read/tok':>11} {'ms I/O/tok':>10} {'ms/tok':>8} {'tok/s':>7} "
             f"{'peak RSS MiB':>12}"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['value']!s:>10} refused: {row['error']}")
            continue
        s = row["summary"]
        lines.append(f"{row['value']!s:>10} {_fmt(s['hit_rate'], '.3f'):>8} {s['bytes_read_per_token'] / 1e6:>11.3f} "
                     f"{s['ms_per_token']['io']:>10.2f} {s['ms_per_token']['total']:>8.2f} "
                     f"{_fmt(s['decode_tok_s'], '.2f'):>7} {_fmt(_mib(row.get('run', {}).get('peak_rss_bytes')), '.0f'):>12}")
    return "\n".join(lines)
