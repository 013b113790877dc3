"""The forward pass: tokens in, logits out, over a preallocated KV cache.

llama2.c style: every buffer is allocated once in `RunState` and reused for every chunk
of tokens; `forward` reads top to bottom. Prompts are processed in chunks of up to
`RunState.chunk` tokens (prefill) and then one token at a time (decode), both through the
same code. The FFN is a separate method so the sparse path (neuron cache + predictor) can
take its place without touching attention.
"""

from __future__ import annotations

import os

import numpy as np

from flashinfer import kernels as K
from flashinfer.config import ModelArgs
from flashinfer.errors import GenerationError
from flashinfer.weights import EMPTY, LayerWeights, Matrix, ModelWeights

# "0": every decode step through the per-kernel path, never kernels.decode_layer's one compiled
# call (to rule it out when a decode differs; the default test suite, where each model type's
# decode_layer is a cold compile of 20-80 s that tests/test_store_decode.py checks once against
# the per-kernel path)
FUSED_DECODE_ENV = "FLASHINFER_FUSED_DECODE"
DEFAULT_CHUNK = 64  # prefill tokens per pass: big enough to reuse each weight row, small scratch


def linear(x: np.ndarray, m: Matrix, bias: np.ndarray, out: np.ndarray) -> None:
    if m.data.dtype == np.float32:  # BLAS: 1.5x the numba loop for one token, 2.2x for 64 (RESULTS.md)
        np.matmul(x, m.data.T, out=out)
        if bias.size:
            out += bias
        return
    K.matmul_for(x.shape[0], m.rows, x.shape[1])(x, m.data, m.scales, m.mins, m.group, bias, out)


def add_rows(out: np.ndarray, m: Matrix, rows: np.ndarray) -> None:
    K.add_rows(out, m.data, m.scales, m.mins, m.group, rows)


class RunState:
    """Scratch activations for up to `chunk` tokens, and the KV cache for `ctx` positions in
    `kv_cache` elements (kernels.KV_DTYPES: "f16", "f32" or "q8")."""

    def __init__(self, args: ModelArgs, ctx: int, chunk: int, kv_cache: str = "f16"):
        self.chunk = chunk
        f32 = np.float32
        self.x = np.zeros((chunk, args.dim), f32)  # residual stream
        self.xb = np.zeros((chunk, args.dim), f32)  # normed input of a block
        self.block_out = np.zeros((chunk, args.dim), f32)  # attention / FFN output
        self.q = np.zeros((chunk, args.q_dim), f32)
        self.k = np.zeros((chunk, args.kv_dim), f32)  # new keys, stored transposed into k_cache_t
        self.v = np.zeros((chunk, args.kv_dim), f32)  # new values, stored into v_cache
        self.attn = np.zeros((chunk, args.q_dim), f32)
        self.hidden = np.zeros((chunk, args.ffn_dim), f32)  # act(gate) * up, or act(up)
        self.up = np.zeros((chunk, args.ffn_dim) if args.gated_ffn else (0, 0), f32)
        # attention scores: a row per head (heads run in parallel), or per (head, token) of a
        # chunk for the BLAS path (kernels/attention.py)
        self.scores = np.zeros((max(args.n_heads, args.n_heads // args.n_kv_heads * chunk), ctx), f32)
        self.positions = np.arange(ctx, dtype=np.int64)
        self.logits = np.zeros((1, args.vocab_size), f32)
        # keys transposed ([kv_dim, ctx] per layer), so attention's scores run along positions
        kv = K.KV_DTYPES[kv_cache]
        self.k_cache_t = np.zeros((args.n_layers, args.kv_dim, ctx), kv)
        self.v_cache = np.zeros((args.n_layers, ctx, args.kv_dim), kv)
        # per layer: its caches, and a q8 cache's scales (the kernels take them as one LayerKV)
        self.kv = [K.layer_kv(self.k_cache_t[i], self.v_cache[i], args.head_dim) for i in range(args.n_layers)]

    @property
    def nbytes(self) -> int:
        scales = sum(kv.k_scale.nbytes + kv.v_scale.nbytes for kv in self.kv)
        return scales + sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))

    @staticmethod
    def scratch_bytes(args: ModelArgs, ctx: int, chunk: int = DEFAULT_CHUNK) -> int:
        """What __init__ allocates besides the KV cache, for the DRAM planner (tested equal)."""
        per_token = 3 * args.dim + 2 * args.q_dim + 2 * args.kv_dim + args.ffn_dim * (2 if args.gated_ffn else 1)
        score_rows = max(args.n_heads, args.n_heads // args.n_kv_heads * chunk)
        return 4 * (chunk * per_token + args.vocab_size) + ctx * (4 * score_rows + 8)


class Model:
    def __init__(self, args: ModelArgs, weights: ModelWeights, ctx: int, chunk: int = DEFAULT_CHUNK, flash_ffn=None,
                 kv_cache: str = "f16"):
        """`flash_ffn`: an object whose forward(layer, x, out) computes the FFN from flash
        (flashinfer/flash_ffn.py); None computes it from the dense matrices in `weights`.
        `kv_cache`: the KV cache's element type, "f16" (default, as llama.cpp's), "f32" or "q8"."""
        if ctx > args.max_seq_len and args.positional == "learned":
            raise GenerationError(f"ctx {ctx} exceeds this model's {args.max_seq_len} learned positions")
        K.one_blas_thread()  # numba's threads do the parallel work (kernels/__init__.py says why)
        self.args = args
        self.weights = weights
        self.ctx = ctx
        self.state = RunState(args, ctx, chunk, kv_cache)
        # per layer (Gemma 3 interleaves sliding-window layers, with their own RoPE base, between global ones)
        self.layer_windows = [args.layer_window(i) for i in range(args.n_layers)]
        self.layer_inv_freq = [args.layer_inv_freq(i) for i in range(args.n_layers)]
        self.act = K.ACTS[args.act]
        self.n_past = 0  # positions filled in the KV cache
        self.flash_ffn = flash_ffn
        if getattr(flash_ffn, "hidden", None) is not None:  # FlashFFN's down-rows layers use the run state's
            flash_ffn.hidden.use(self.state.hidden, self.state.up)
        self.ffn_input_observer = None  # callback(layer, x) before each FFN: calibration collects inputs
        self.tracer = None  # flashinfer.profile.Tracer while a traced generation runs
        # callable dropping the embedding table's touched pages, at each new sequence (Engine sets
        # it under a DRAM cap: the plan counts the rows of one context, a server's life touches more)
        self.release_lookup_pages = None
        # Blocks whose decode step runs as one compiled call (kernels.decode_layer) once their
        # FFN is resident: pre-norm blocks whose attention matrices the numba kernels take
        # (float32 ones go through BLAS, which compiled code cannot call without SciPy).
        # (Gemma 3's q/k norms, query scale, sandwich norms and per-layer windows and RoPE bases
        # included; its sandwich norms are RMSNorms there, as every model with them has)
        self.fused_decode = (os.environ.get(FUSED_DECODE_ENV) != "0" and args.norm_before
                             and hasattr(flash_ffn, "resident_views")
                             and not (args.sandwich_norm and args.norm != "rms"))
        self._fusable = [self.fused_decode and all(m.data.dtype != np.float32 for m in (l.wq, l.wk, l.wv, l.wo))
                         for l in weights.layers]
        self._fused_operands: list[tuple | None] = [None] * args.n_layers  # (compiled call, _block_operands), once resident
        # q, k and v of one dtype, group and layout (rows or lanes) take one prepared input (kernels.matmul3)
        self._shared_qkv = [l.wq.data.dtype == l.wk.data.dtype == l.wv.data.dtype and l.wq.group == l.wk.group == l.wv.group
                            and l.wq.data.ndim == l.wk.data.ndim == l.wv.data.ndim for l in weights.layers]

    def reset(self) -> None:
        """Start a new sequence: empty KV cache and, for the sparse path, cold neuron caches
        (so a sequence's output never depends on what ran before it)."""
        self.n_past = 0
        if hasattr(self.flash_ffn, "reset"):
            self.flash_ffn.reset()
        if self.release_lookup_pages is not None:
            self.release_lookup_pages()

    def forward(self, tokens: np.ndarray, logits_out: np.ndarray | None = None) -> np.ndarray:
        """Run `tokens` at positions n_past.. and append them to the KV cache.

        With `logits_out` [len(tokens), vocab] fills the logits of every token; otherwise
        returns the last token's logits (a view of a reused buffer: copy to keep it).
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        if self.n_past + len(tokens) > self.ctx:
            raise GenerationError(
                f"{self.n_past + len(tokens)} tokens exceed the context of {self.ctx}; "
                "open the engine with a larger ctx (up to the model's max_position_embeddings)"
            )
        chunk = self.state.chunk
        for begin in range(0, len(tokens), chunk):
            piece = tokens[begin : begin + chunk]
            if logits_out is not None:
                out = logits_out[begin : begin + len(piece)]
            elif begin + chunk >= len(tokens):  # only the last token's logits are wanted
                out = self.state.logits
            else:
                out = None
            self._forward_chunk(piece, out)
        return self.state.logits[0]

    def _norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
        if self.args.norm == "rms":
            K.rmsnorm(x, weight, self.args.norm_eps, out)
        else:
            K.layernorm(x, weight, bias, self.args.norm_eps, out)

    def _forward_chunk(self, tokens: np.ndarray, logits_out: np.ndarray | None) -> None:
        a, w, s = self.args, self.weights, self.state
        n = len(tokens)
        start = self.n_past
        x, xb, block_out = s.x[:n], s.xb[:n], s.block_out[:n]
        positions = s.positions[start : start + n]

        x[:] = 0.0
        add_rows(x, w.tok_embeddings, tokens)
        if a.embed_scale != 1.0:
            x *= np.float32(a.embed_scale)
        if a.positional == "learned":
            add_rows(x, w.pos_embeddings, positions + a.learned_pos_offset)

        fused = n == 1 and self.tracer is None and self.ffn_input_observer is None
        for i, layer in enumerate(w.layers):
            if fused and self._fusable[i] and self._decode_fused(i, layer, start):
                continue
            # attention block: pre-LN adds attn(norm(x)); post-LN (OPT-350m) norms after the add
            if a.norm_before:
                self._norm(x, layer.attn_norm_w, layer.attn_norm_b, xb)
            else:
                xb[:] = x
            if self.tracer is None:
                self._attention(i, layer, xb, start, block_out)
            else:
                t0 = self.tracer.now()
                self._attention(i, layer, xb, start, block_out)
                self.tracer.attention(i, t0, self.tracer.now(), n)
            if a.sandwich_norm:
                self._norm(block_out, layer.attn_post_norm_w, EMPTY, block_out)
            x += block_out
            if not a.norm_before:
                self._norm(x, layer.attn_norm_w, layer.attn_norm_b, x)

            # FFN block
            if a.norm_before:
                self._norm(x, layer.ffn_norm_w, layer.ffn_norm_b, xb)
            else:
                xb[:] = x
            self._ffn(i, layer, xb, block_out)
            if a.sandwich_norm:
                self._norm(block_out, layer.ffn_post_norm_w, EMPTY, block_out)
            x += block_out
            if not a.norm_before:
                self._norm(x, layer.ffn_norm_w, layer.ffn_norm_b, x)

        self.n_past += n
        if logits_out is None:
            return
        rows = x[-logits_out.shape[0] :]
        if a.norm_before:  # post-LN models end normed already
            self._norm(rows, w.norm_w, w.norm_b, xb[: len(rows)])
            rows = xb[: len(rows)]
        linear(rows, w.lm_head, EMPTY, logits_out)

    def fuses_decode(self) -> bool:
        """Whether the next decode token runs some block as one compiled call (_decode_fused):
        a fusable block whose FFN is resident by now."""
        return any(fusable and self.flash_ffn.resident_views(i) is not None for i, fusable in enumerate(self._fusable))

    def _decode_fused(self, i: int, layer: LayerWeights, start: int) -> bool:
        """Block i of a decode step as one compiled call, once its FFN is resident; False
        (nothing done) before: the per-kernel path below reads it first."""
        operands = self._fused_operands[i]
        if operands is None:
            views = self.flash_ffn.resident_views(i)
            if views is None:
                return False
            before, after = self._block_operands(i, layer, views)
            K.decode_layer(*before, start, *after)  # compiles or loads the kernel, then its machine code is called
            self._fused_operands[i] = (K.compiled_call(K.decode_layer, (*before, start, *after)), before, after)
            return True
        call, before, after = operands
        call(*before, start, *after)
        return True

    def _block_operands(self, i: int, layer: LayerWeights, views) -> tuple[tuple, tuple]:
        """decode_layer's operands before and after `start`: the same objects every step (views of
        the run state's buffers, the block's weights), built once; building them per call was
        most of the 13 us of Python a block cost."""
        a, s, ffn = self.args, self.state, self.flash_ffn
        before = (s.x[:1], s.xb[:1], s.q[:1], s.k[:1], s.v[:1], s.attn[:1], s.block_out[:1], s.kv[i])
        # the scratch's dimensions tell decode_layer which FFN the block runs (kernels.NO_DOWN_ROWS)
        scratch = (s.up, s.hidden) if views.down_rows else (K.NO_DOWN_ROWS, K.NO_DOWN_ROWS)
        after = (s.positions, self.layer_inv_freq[i], a.norm == "rms", a.norm_eps, layer.attn_norm_w, layer.attn_norm_b,
                 layer.ffn_norm_w, layer.ffn_norm_b, layer.wq, layer.bq, layer.wk, layer.bk, layer.wv, layer.bv,
                 layer.wo, layer.bo, a.positional == "rope", a.head_dim, a.n_kv_heads, self.layer_windows[i], s.scores, views,
                 ffn.layers[i].n_neurons, self.act, ffn.runs_parallel(i, a.dim), ffn.partial.get(1), layer.b_down,
                 self._shared_qkv[i], *scratch, a.qk_norm, layer.q_norm_w, layer.k_norm_w,
                 np.float32(a.query_scale), a.sandwich_norm, layer.attn_post_norm_w, layer.ffn_post_norm_w)
        return before, after

    def _attention(self, i: int, layer: LayerWeights, xb: np.ndarray, start: int, out: np.ndarray) -> None:
        a, s = self.args, self.state
        n = xb.shape[0]
        q = s.q[:n]
        k = s.k[:n]
        v = s.v[:n]
        linear(xb, layer.wq, layer.bq, q)
        linear(xb, layer.wk, layer.bk, k)
        linear(xb, layer.wv, layer.bv, v)
        if a.qk_norm:  # each head of q and k normed on its own (Gemma 3)
            K.rmsnorm(q.reshape(-1, a.head_dim), layer.q_norm_w, a.norm_eps, q.reshape(-1, a.head_dim))
            K.rmsnorm(k.reshape(-1, a.head_dim), layer.k_norm_w, a.norm_eps, k.reshape(-1, a.head_dim))
        if a.query_scale != 1.0:
            q *= np.float32(a.query_scale)
        if a.positional == "rope":
            positions = s.positions[start : start + n]
            K.rope_qk(q, k, positions, self.layer_inv_freq[i], a.head_dim)
        K.store_kv(k, v, s.kv[i], start)
        attn = s.attn[:n]
        K.attention_for(n, start + n, a.q_dim)(q, s.kv[i], start, a.n_kv_heads, a.head_dim,
                                               self.layer_windows[i], s.scores, attn)
        linear(attn, layer.wo, layer.bo, out)

    def _ffn(self, i: int, layer: LayerWeights, xb: np.ndarray, out: np.ndarray) -> None:
        """down(act(gate(x)) * up(x)) or down(act(up(x))), from flash or from dense matrices."""
        if self.ffn_input_observer is not None:
            self.ffn_input_observer(i, xb)
        if self.flash_ffn is not None:
            self.flash_ffn.forward(i, xb, out)
            if layer.b_down.size:
                out += layer.b_down
            return
        t0 = None if self.tracer is None else self.tracer.now()
        n = xb.shape[0]
        hidden = self.state.hidden[:n]
        if self.args.gated_ffn:
            up = self.state.up[:n]
            linear(xb, layer.w_up, layer.b_up, up)
            linear(xb, layer.w_gate, layer.b_gate, hidden)
            K.gated_act(hidden, up, self.act)
        else:  # OPT: ReLU only (the config refuses other ungated activations)
            linear(xb, layer.w_up, layer.b_up, hidden)
            K.relu_(hidden)
        linear(hidden, layer.w_down, layer.b_down, out)
        if t0 is not None:  # the FFN sources from flash trace their own parts
            self.tracer.ffn_part(i, "ffn", t0, self.tracer.now())
