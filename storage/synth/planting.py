"""Planting the sparsity: random weights generated block by block, and a numpy forward of the
model being written that fits the thresholds.

## How sparsity is planted

Neuron i of a layer should fire (ReLU output > 0) with probability p_i over tokens. The
p_i follow a power law over a random ranking of the neurons, p_i ∝ rank^-hot_skew, clipped
to [1e-4, 0.9] and scaled so that their mean is 1 - sparsity. hot_skew 0 is uniform;
hot_skew 1 puts ~52% of all firings on the top 10% of neurons and ~39% of neurons carry
80% of them (PowerInfer: 43% for ReGLU LLaMA-70B, 26% for OPT-30B).

A neuron fires when its pre-activation w_i·x + b_i > 0, so a threshold θ_i with
P(w_i·x > θ_i) = p_i does it. θ_i is fitted on the real forward pass, not on an idealised
x: the generator runs a small numpy forward of the model it is writing (embeddings →
attention → FFN, layer after layer, with the weights as stored, i.e. after rounding to
f16) on a few random token sequences, and sets θ_i = μ_i + σ_i·Φ⁻¹(1 - p_i) from the mean
and spread of w_i·x over the calibration tokens (w_i·x is a sum of thousands of terms, so
close to normal). Layer l is calibrated on the inputs produced by layers < l as written.

- OPT has biases: fc1's bias is b_i = -θ_i, with x the FFN LayerNorm's output.
- Llama/Mistral have none, so the model carries its own constant: a *bias channel*.
  Residual coordinate c holds the same value A in every token's embedding; no block writes
  to it (row c of o_proj and down_proj is zero) and attention and up_proj ignore it (their
  column c is zero), so it equals A at every layer. Gate column c is -θ_i. After RMSNorm
  the FFN input is x/rms(x), so gate_i·x̂ = (w_i·x_rest - θ_i·A)/rms(x): the ReLU sign
  is exactly that of a biased neuron whatever rms(x) is (θ is fitted on x̂/x̂_c, where the
  per-token scale cancels). Real LLMs grow such constant "massive activation" channels
  themselves (Sun et al. 2024); ReLU(gate)·up is zero exactly when the gate is.

## SwiGLU presets (tiny-silu, mistral-7b)

SiLU has no zeros, so a SwiGLU preset plants the sign of each neuron's gate instead, with the
same machinery (p_i = P(gate_i.x > 0), the bias channel), and gives the gate rows a real model's
spread: defaults measured on SmolLM2-135M-Instruct (SILU_* in presets.py): 37% of gate pre-activations
positive, the hottest 10% of neurons carrying 22% of the positives, a per-neuron gate std of 0.5.
The scale matters for SiLU: at 0.5 a threshold on |silu(g)| (the gate predictor's test) keeps
negative gates too, as on SmolLM2. For the benchmark of the gate predictor under a cap (bench/run.py
--models mistral-7b); the text is noise, as with the ReLU presets.

## Low-rank structure in the rows that decide activity

Gate (fc1 for OPT) rows are not white noise: column j of the matrix is scaled by
s_j ∝ rank_j^-spectrum_decay over a random ranking of the input coordinates (mean square 1),
so the matrix's singular values fall off as a power law and its pre-activations are
close to low-rank, as in trained LLMs (the premise of Deja Vu's and LLM in a flash's
low-rank predictors). With white rows (decay 0) no rank-r predictor can find the firing
neurons: on d=2048, f=5632, 10% active, the rank-128 truncated SVD needs 84% of the
neurons for 0.99 recall; decay 0.5 needs 39%, 0.75 (the default) 16.5%, 1.0 11%
(rank 512 at 0.75: 12.6%) — the default sits where published predictors are (a predicted
set 1.5-2x the active set).

Block outputs (o_proj, down_proj / fc2) are scaled on the calibration tokens so each block
adds a fixed share of the embedding's variance to the residual stream; q/k are scaled so
attention logits have a std of ATTN_LOGIT_STD (fairly sharp attention, so its output does
not shrink with position and the FFN input distribution stays the same along a sequence).

Measurement: a second set of random sequences (not used for fitting) runs through the same
forward; synth.json records per layer the fraction of zero FFN activations and the share of
firings carried by the 10% most active neurons, plus sparsity per position quartile.

Measured (2-core VM, `flashinfer synth PRESET DIR`, defaults sparsity 0.9, hot_skew 1):
the numpy forward above gives 0.897-0.899 zeros on every layer of opt-6.7b, llama-2-7b-relu
and mistral-7b-relu, top-10% share 0.51 (target 0.516); the engine's own forward
(flashinfer.Engine, one other random 64-token sequence) gives 0.897-0.900 on every layer
of all three. Sparsity drifts slowly with position: 0.895 at positions 0-7, 0.9005 at
64-127, 0.905 at 512-999 (1b preset, engine). 0.97 gives 0.968-0.969. Writing takes
~105-130 s per 7B preset (13-14.5 GB, f16) at a peak RSS of ~0.3 GB.
"""

from __future__ import annotations

import math
import queue
import threading
import zlib
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

from storage.synth.presets import BOS_ID, SILU_GATE_STD, SynthShape

if TYPE_CHECKING:
    from storage.synth.writing import _ShardedWriter

BLOCK_ELEMS = 1 << 22  # elements generated per block of rows (16 MB as float32)
P_MIN, P_MAX = 1e-4, 0.9  # per-neuron firing probability bounds
ATTN_LOGIT_STD = 5.0
CAL_SEQS, EVAL_SEQS, SEQ_LEN = 4, 2, 64  # random sequences for fitting / for measuring


# ---- firing probabilities -----------------------------------------------------------

def firing_probabilities(n: int, sparsity: float, hot_skew: float, rng: np.random.Generator) -> np.ndarray:
    """p_i ∝ rank_i^-hot_skew over a random ranking, clipped to [P_MIN, P_MAX], mean 1 - sparsity."""
    mean = 1.0 - sparsity
    p_max = max(P_MAX, mean)
    base = np.arange(1, n + 1, dtype=np.float64) ** -float(hot_skew)
    lo, hi = 1e-12, 1e12
    for _ in range(200):  # the clipped mean grows monotonically with the scale: bisect it
        scale = math.sqrt(lo * hi)
        if np.clip(scale * base, P_MIN, p_max).mean() < mean:
            lo = scale
        else:
            hi = scale
    return np.clip(scale * base, P_MIN, p_max)[rng.permutation(n)]


def hot10_share(counts: np.ndarray) -> float:
    """Share of all firings carried by the 10% most active neurons."""
    top = np.sort(counts)[::-1][: max(1, len(counts) // 10)]
    return float(top.sum() / max(counts.sum(), 1e-30))


_INV_CDF = np.vectorize(NormalDist().inv_cdf, otypes=[np.float64])


# ---- the generator: weights block by block, and a numpy forward to calibrate them ----

def _rmsnorm(x: np.ndarray, eps: float) -> np.ndarray:  # weight is ones
    return (x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps)).astype(np.float32)


def _layernorm(x: np.ndarray, eps: float) -> np.ndarray:  # weight ones, bias zeros
    x64 = x.astype(np.float64)
    x64 -= x64.mean(-1, keepdims=True)
    return (x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + eps)).astype(np.float32)


def _row_blocks(rows: int, cols: int):
    """Row ranges of the blocks a matrix is generated in: ~BLOCK_ELEMS elements, whole
    multiples of 256 rows (so whole attention heads, for the GGUF q/k permutation)."""
    step = max(1, BLOCK_ELEMS // cols)
    step = max(256, step - step % 256) if rows > 256 else rows
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


class _Noise:
    """N(0, 1) float32 blocks of every matrix in plan order, drawn ahead by a background thread.

    Tensor `name` draws from default_rng([seed, crc32(name)]), its blocks in row order, so
    the values do not depend on anything computed. numpy's normal sampler holds the GIL but
    the casts, matmuls and writes of the consumer release it, so the two overlap (mistral-7b:
    130 s -> 110 s).
    """

    def __init__(self, plan, seed: int, depth: int = 3):
        self.matrices = [(name, shape) for name, shape in plan if len(shape) == 2]
        self.seed = seed
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="synth-noise", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        try:
            for name, (rows, cols) in self.matrices:
                rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
                for r0, r1 in _row_blocks(rows, cols):
                    if not self._put((name, r0, rng.standard_normal((r1 - r0, cols), dtype=np.float32))):
                        return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(("error", 0, e))

    def _put(self, item) -> bool:
        """Queue `item` unless the consumer has stopped (then False)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def next(self, name: str, r0: int) -> np.ndarray:
        got_name, got_r0, block = self.queue.get()
        if got_name == "error":
            raise block
        if (got_name, got_r0) != (name, r0):
            raise AssertionError(f"synth noise: got {got_name}[{got_r0}:], expected {name}[{r0}:]")
        return block

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class _Generator:
    """Generates every tensor in plan order, runs the calibration forward alongside, and
    sets the thresholds that plant the sparsity."""

    def __init__(self, shape: SynthShape, plan, writer: _ShardedWriter, sparsity: float, hot_skew: float,
                 spectrum_decay: float, seed: int):
        self.s, self.writer, self.sparsity, self.hot_skew, self.seed = shape, writer, sparsity, hot_skew, seed
        self.spectrum_decay = spectrum_decay
        self.shapes = dict(plan)
        self.noise = _Noise(plan, seed)
        meta = np.random.default_rng([seed, 0x5EED])
        n_seq = CAL_SEQS + EVAL_SEQS
        tokens = meta.integers(3, shape.vocab, size=(n_seq, SEQ_LEN))
        tokens[:, 0] = BOS_ID  # as the engine's tokenizer starts every prompt
        self.tokens = tokens.reshape(-1)  # activations are [tokens, features], sequence after sequence
        self.n_cal = CAL_SEQS * SEQ_LEN  # the first n_cal tokens fit thresholds and scales, the rest measure
        self.bias_channel = int(meta.integers(shape.hidden)) if shape.family == "llama" else None
        self.probs = [firing_probabilities(shape.ffn, sparsity, hot_skew, np.random.default_rng([seed, 0xF1E, i]))
                      for i in range(shape.n_layers)]
        # the scale of the residual stream is free (norms remove it); 4 puts o_proj/down_proj at
        # std ~0.015 as in Llama-2-7B, rather than near f16's subnormal range
        self.embed_std = 4.0
        # each of the 2L blocks adds embed_std^2 / L of variance: the residual ends at ~3x the embedding's
        self.block_std = self.embed_std / math.sqrt(shape.n_layers)
        self.zeros_by_layer: list[float] = []
        self.hot_by_layer: list[float] = []
        self.zeros_by_position = np.zeros(SEQ_LEN)

    # -- generation primitives

    def _matrix(self, name: str, std: float, x: np.ndarray | None, edit=None, on_stored=None,
                bias_col_zero: bool = False, bias_row_zero: bool = False) -> np.ndarray | None:
        """Generate N(0, std) rows of `name` block by block, let `edit(r0, block)` plant what
        it must, write them, hand the stored values to `on_stored(r0, stored)`, and return
        x @ W.T computed with the stored values (if x is given)."""
        rows_total, cols = self.shapes[name]
        out = None if x is None else np.empty((x.shape[0], rows_total), np.float32)
        c = self.bias_channel
        for r0, r1 in _row_blocks(rows_total, cols):
            block = self.noise.next(name, r0)
            block *= np.float32(std)
            if bias_col_zero:  # this projection ignores the bias channel
                block[:, c] = 0.0
            if bias_row_zero and r0 <= c < r1:  # this block never writes into the bias channel
                block[c - r0] = 0.0
            if edit is not None:
                edit(r0, block)
            stored = self.writer.write(name, block)
            if on_stored is not None:
                on_stored(r0, stored)
            if out is not None:
                out[:, r0:r1] = x @ stored.T
        return out

    def _vector(self, name: str, values: np.ndarray | float) -> np.ndarray:
        (n,) = self.shapes[name]
        return self.writer.write(name, np.broadcast_to(np.float32(values), (n,)).copy() if np.isscalar(values)
                                 else values.astype(np.float32))

    def _scale_for(self, a: np.ndarray, target_std: float) -> float:
        """Weight std so that rows · a have std target_std over the calibration tokens."""
        return target_std / math.sqrt(float((a[: self.n_cal].astype(np.float64) ** 2).sum(-1).mean()))

    # -- the model
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.noise.close()

    def _run(self) -> dict:
        s = self.s
        x = self._embeddings()
        for i in range(s.n_layers):
            x = self._layer(i, x)
        if s.family == "opt":  # lm_head is the embedding: this final norm weight gives logits std ~3
            self._vector("model.decoder.final_layer_norm.weight", 3.0 / (self.embed_std * math.sqrt(s.hidden)))
            self._vector("model.decoder.final_layer_norm.bias", 0.0)
        else:
            self._vector("model.norm.weight", 1.0)
            self._matrix("lm_head.weight", 3.0 / math.sqrt(s.hidden), None)  # logits std ~3
        target = [hot10_share(p) for p in self.probs]
        eval_tokens = EVAL_SEQS * SEQ_LEN
        return {
            "mechanism": ("fc1 bias calibrated per neuron" if s.family == "opt" else
                          "bias channel: constant residual coordinate, gate column calibrated per neuron"),
            "bias_channel": self.bias_channel,
            "hot10_share_target": round(float(np.mean(target)), 4),
            "calibration": {"sequences": CAL_SEQS, "eval_sequences": EVAL_SEQS, "seq_len": SEQ_LEN,
                            "attn_logit_std": ATTN_LOGIT_STD},
            "measured": {
                "what": f"numpy forward of the stored weights on {EVAL_SEQS} random sequences x {SEQ_LEN} tokens "
                        "(not used for calibration), every layer",
                "mean_sparsity": round(float(np.mean(self.zeros_by_layer)), 4),
                "layer_sparsity": [round(v, 4) for v in self.zeros_by_layer],
                "layer_hot10_share": [round(v, 4) for v in self.hot_by_layer],
                "sparsity_by_position_quartile": [
                    round(float(q.mean()) / (eval_tokens // SEQ_LEN * s.ffn * s.n_layers), 4)
                    for q in np.array_split(self.zeros_by_position, 4)],
            },
        }

    def _embeddings(self) -> np.ndarray:
        s = self.s
        x = np.zeros((len(self.tokens), s.hidden), np.float32)
        c = self.bias_channel
        anchor = self.embed_std * math.sqrt(s.hidden)  # the bias channel holds as much energy as the rest

        def set_channel(r0, block):
            block[:, c] = anchor

        def gather(r0, stored):
            hit = (self.tokens >= r0) & (self.tokens < r0 + len(stored))
            x[hit] = stored[self.tokens[hit] - r0]

        if s.family == "llama":
            self._matrix("model.embed_tokens.weight", self.embed_std, None, edit=set_channel, on_stored=gather)
            return x
        self._matrix("model.decoder.embed_tokens.weight", self.embed_std, None, on_stored=gather)

        def add_positions(r0, stored):  # OPT looks position p up at row p + 2
            lo, hi = max(r0, 2), min(r0 + len(stored), SEQ_LEN + 2)
            if lo < hi:
                x.reshape(-1, SEQ_LEN, s.hidden)[:, lo - 2 : hi - 2] += stored[lo - r0 : hi - r0]

        self._matrix("model.decoder.embed_positions.weight", 0.5 * self.embed_std, None, on_stored=add_positions)
        return x

    def _layer(self, i: int, x: np.ndarray) -> np.ndarray:
        s = self.s
        opt = s.family == "opt"
        p = f"model.decoder.layers.{i}." if opt else f"model.layers.{i}."
        attn_p = p + "self_attn."
        norm = (lambda v: _layernorm(v, s.norm_eps)) if opt else (lambda v: _rmsnorm(v, s.norm_eps))

        # attention
        if opt:
            self._vector(p + "self_attn_layer_norm.weight", 1.0)
            self._vector(p + "self_attn_layer_norm.bias", 0.0)
        else:
            self._vector(p + "input_layernorm.weight", 1.0)
        xb = norm(x)
        llama = not opt
        xb_eff = xb.copy()
        if llama:
            xb_eff[:, self.bias_channel] = 0.0
        in_std = self._scale_for(xb_eff, 1.0)  # unit-variance outputs
        qk_std = in_std * math.sqrt(ATTN_LOGIT_STD)  # q·k/sqrt(head_dim) then has std ATTN_LOGIT_STD
        q = self._matrix(attn_p + "q_proj.weight", qk_std, xb, bias_col_zero=llama)
        if opt:
            self._vector(attn_p + "q_proj.bias", 0.0)
        k = self._matrix(attn_p + "k_proj.weight", qk_std, xb, bias_col_zero=llama)
        if opt:
            self._vector(attn_p + "k_proj.bias", 0.0)
        v = self._matrix(attn_p + "v_proj.weight", in_std, xb, bias_col_zero=llama)
        if opt:
            self._vector(attn_p + "v_proj.bias", 0.0)
        attn = self._attention(q, k, v)
        o_name = attn_p + ("out_proj.weight" if opt else "o_proj.weight")
        x = x + self._matrix(o_name, self._scale_for(attn, self.block_std), attn, bias_row_zero=llama)
        if opt:
            self._vector(attn_p + "out_proj.bias", 0.0)

        # FFN
        if opt:
            self._vector(p + "final_layer_norm.weight", 1.0)
            self._vector(p + "final_layer_norm.bias", 0.0)
        else:
            self._vector(p + "post_attention_layernorm.weight", 1.0)
        xb = norm(x)
        hidden = self._ffn_up(i, p, xb)
        down_name = p + ("fc2.weight" if opt else "mlp.down_proj.weight")
        x = x + self._matrix(down_name, self._scale_for(hidden, self.block_std), hidden, bias_row_zero=llama)
        if opt:
            self._vector(p + "fc2.bias", 0.0)
        return x

    def _thresholds(self, pre: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """θ_i with P(pre_i > θ_i) = p_i, from the mean and spread over calibration tokens `pre`."""
        cal = pre.astype(np.float64)
        return cal.mean(0) + cal.std(0) * _INV_CDF(1.0 - probs)

    def _column_scale(self, i: int) -> np.ndarray:
        """Layer i's per-input-column scale of the activity-deciding rows: a power law over a
        random ranking of the columns, mean square 1 (so pre-activations keep their std)."""
        d = self.s.hidden
        rng = np.random.default_rng([self.seed, 0x5BEC, i])
        scale = np.arange(1, d + 1, dtype=np.float64) ** -float(self.spectrum_decay)
        scale /= math.sqrt(float((scale**2).mean()))
        return scale[rng.permutation(d)].astype(np.float32)

    def _ffn_up(self, i: int, p: str, xb: np.ndarray) -> np.ndarray:
        """Write the up (and gate) projection with planted thresholds; return the FFN activation."""
        s = self.s
        probs = self.probs[i]
        col_scale = self._column_scale(i)
        xb_eff = xb.copy()
        if s.family == "llama":
            xb_eff[:, self.bias_channel] = 0.0
        w_std = self._scale_for(xb_eff, 1.0)
        if s.family == "opt":
            bias = np.zeros(s.ffn, np.float32)

            def plant_bias(r0, block):
                block *= col_scale
                bias[r0 : r0 + len(block)] = -self._thresholds(xb[: self.n_cal] @ block.T, probs[r0 : r0 + len(block)])

            pre = self._matrix(p + "fc1.weight", w_std, xb, edit=plant_bias)
            pre += self._vector(p + "fc1.bias", bias)
            self._measure(pre > 0.0)
            return np.maximum(pre, 0.0)
        c = self.bias_channel
        # firing <=> w_i·(x̂/x̂_c) > θ_i: dividing by the (positive) channel value removes rms(x)
        z = xb[: self.n_cal] / xb[: self.n_cal, c : c + 1]

        def plant_channel(r0, block):
            block *= col_scale  # column c is overwritten just below
            block[:, c] = -self._thresholds(z @ block.T, probs[r0 : r0 + len(block)])

        # ReLU only needs the gate's sign; SiLU bends near 0, so its gates get a real model's spread
        gate_std = w_std * (SILU_GATE_STD if s.act == "silu" else 1.0)
        gate = self._matrix(p + "mlp.gate_proj.weight", gate_std, xb, edit=plant_channel, bias_col_zero=True)
        up = self._matrix(p + "mlp.up_proj.weight", w_std, xb, bias_col_zero=True)
        self._measure(gate > 0.0)
        if s.act == "silu":
            return (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32)
        return np.maximum(gate, 0.0) * up

    def _measure(self, firing: np.ndarray) -> None:
        """firing: bool [tokens, n_neurons], the pre-activation (gate or fc1) > 0: ReLU's non-zeros."""
        zero = ~firing[self.n_cal :]
        self.zeros_by_layer.append(float(zero.mean()))
        self.hot_by_layer.append(hot10_share((~zero).sum(0).astype(np.float64)))
        self.zeros_by_position += zero.reshape(EVAL_SEQS, SEQ_LEN, -1).sum((0, 2))

    def _attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Causal (sliding-window) GQA attention as the engine computes it, RoPE for llama."""
        s = self.s
        n_pos = SEQ_LEN
        n_seq = q.shape[0] // n_pos
        hd = s.head_dim
        q = q.reshape(n_seq, n_pos, s.n_heads, hd)
        k = k.reshape(n_seq, n_pos, s.n_kv_heads, hd)
        v = v.reshape(n_seq, n_pos, s.n_kv_heads, hd)
        if s.family == "llama":
            inv_freq = 1.0 / (s.rope_theta ** (np.arange(0, hd // 2, dtype=np.float64) * 2.0 / hd))
            angle = np.arange(n_pos, dtype=np.float64)[:, None] * inv_freq[None, :]
            cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]

            def rope(t):
                a, b = t[..., : hd // 2], t[..., hd // 2 :]
                return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1).astype(np.float32)

            q, k = rope(q), rope(k)
        rep = s.n_heads // s.n_kv_heads
        k = np.repeat(k, rep, axis=2)
        v = np.repeat(v, rep, axis=2)
        scores = np.einsum("sthd,sjhd->shtj", q, k) / np.float32(math.sqrt(hd))
        t_idx, j_idx = np.arange(n_pos)[:, None], np.arange(n_pos)[None, :]
        visible = j_idx <= t_idx
        if s.sliding_window:
            visible &= t_idx - j_idx < s.sliding_window
        scores = np.where(visible, scores, -np.inf)
        scores -= scores.max(-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("shtj,sjhd->sthd", weights, v)
        return out.reshape(n_seq * n_pos, s.n_heads * hd).astype(np.float32)
