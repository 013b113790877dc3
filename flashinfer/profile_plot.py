"""`flashinfer profile --plot out.png`: hit rate per layer over tokens, and where each
token's time went. matplotlib is the optional extra `flashinfer[plot]`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flashinfer.errors import ConfigError


def require_matplotlib() -> None:
    """ConfigError now if matplotlib is missing, without importing it."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib: pip install 'flashinfer[plot]' (or pip install matplotlib)")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'flashinfer[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_trace(trace, path: str | Path) -> None:
    """Two panels: a heatmap of the hit rate of each layer at each decode token, and the
    time of each decode token split into I/O, memory management and compute."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    decode = [s.step for s in trace.steps if s.phase == "decode"]
    if not decode:
        raise ConfigError("nothing to plot: the run decoded no tokens after the prompt (raise --max-tokens)")
    column = {step: k for k, step in enumerate(decode)}
    hit = np.full((trace.n_layers, len(decode)), np.nan)
    io, mm, compute = (np.zeros(len(decode)) for _ in range(3))
    for r in trace.layers:
        k = column.get(r.step)
        if k is None:
            continue
        if r.predicted:
            hit[r.layer, k] = r.hits / r.predicted
        io[k] += 1e3 * r.read_s
        mm[k] += 1e3 * r.mm_s
        compute[k] += 1e3 * (r.attn_s + r.ffn_s + r.predict_s)
    wall = np.array([1e3 * s.wall_s for s in trace.steps if s.phase == "decode"])
    other = np.maximum(wall - io - mm - compute, 0.0)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), constrained_layout=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    image = top.imshow(hit, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    top.set_xlabel("decode token")
    top.set_ylabel("layer")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_title("neuron cache hit rate (predicted neurons already resident)")
    fig.colorbar(image, ax=top, label="hit rate")
    x = np.arange(len(decode))
    bottom.bar(x, io, label="I/O (waiting for flash)", color="#d62728")
    bottom.bar(x, mm, bottom=io, label="memory management", color="#ff7f0e")
    bottom.bar(x, compute, bottom=io + mm, label="compute (attention, predictor, FFN)", color="#1f77b4")
    bottom.bar(x, other, bottom=io + mm + compute, label="other", color="#bbbbbb")
    bottom.set_xlabel("decode token")
    bottom.set_ylabel("ms")
    bottom.set_title("time per token")
    bottom.legend(loc="upper right", fontsize="small")
    run = trace.run
    fig.suptitle(f"{Path(str(run.get('model', ''))).name}: predictor {run.get('predictor')}, "
                 f"window {run.get('window')}, {_fmt_tok_s(run.get('decode_tok_s'))}")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt_tok_s(value) -> str:
    return "-" if value is None else f"{value:.2f} tok/s"
