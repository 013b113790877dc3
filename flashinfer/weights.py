"""The model's tensors under canonical names, their shapes, and loading them from an HF checkpoint.

Canonical names (the engine's own, independent of the HF family):
    tok_embeddings.weight [vocab, dim]          pos_embeddings.weight [max_seq + offset, dim] (learned)
    layers.{i}.attn_norm.{weight,bias} [dim]    layers.{i}.ffn_norm.{weight,bias} [dim]
    layers.{i}.attn.wq.{weight [q_dim, dim], bias}   wk/wv [kv_dim, dim]   wo [dim, q_dim]
    layers.{i}.ffn.w_up / w_gate [ffn_dim, dim]      w_down [dim, ffn_dim]
    norm.{weight,bias} [dim]                    lm_head.weight [vocab, dim] (absent when tied)

Matrices are kept as the kernels consume them: float32, or float16 as its raw uint16 bits
(numba has no float16 on the CPU; kernels widen in registers). A bf16 matrix becomes f16 bits
at load, a block of rows at a time: bf16's 8 mantissa bits fit f16's 11, so the values are the
same wherever f16 reaches (2**-14 to 65504; smaller weights round to f16's subnormals) and RAM
stays at the checkpoint's size; one whose values exceed f16's range is widened to float32.
Vectors (norms, biases) are always float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from flashinfer.config import ModelArgs
from storage.errors import CheckpointError, FormatError
from storage.safetensors import Checkpoint, bf16_to_float32

ROWS_INTERLEAVED = 8  # kernels.lanes.ROWS (not imported: `flashinfer --help` stays free of numba)

EMPTY = np.zeros(0, np.float32)  # stands for "no bias" so kernels keep one signature
EMPTY.flags.writeable = False
NO_SCALES = np.zeros((0, 0), np.uint16)  # float matrices have no scales / mins
NO_SCALES.flags.writeable = False


class Matrix(NamedTuple):
    """A weight matrix as the kernels take it: data float32 / f16 bits (uint16) / int8 (q8, q6k) /
    uint8 nibbles (q4, q4a, q4k), and f16-bit scales and mins [rows, K/group] (empty when unused;
    q4k's and q6k's packed scale bytes as storage/quant.py has them, uint8 / int8). data is
    [rows, ...], or for the engine's resident integer matrices [rows / 8, K / 32, 8 x a block's
    code bytes] with scales and mins [rows / 8, ...]: rows in lanes (interleave_rows)."""

    data: np.ndarray
    scales: np.ndarray = NO_SCALES
    mins: np.ndarray = NO_SCALES
    group: int = 0

    @property
    def rows(self) -> int:
        return self.data.shape[0] * ROWS_INTERLEAVED if self.data.ndim == 3 else self.data.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + self.mins.nbytes


def interleave_rows(m: Matrix) -> Matrix:
    """m with its rows in lanes (kernels/lanes.py has the layout): codes [rows / 8, blocks, 8 x a
    block's code bytes], scales and mins [rows / 8, 8 x a row's], so that one vpdpbusd dots eight
    rows with four broadcast activation codes (2-3x the row kernels' rate, prefill and decode). A
    copy; m itself where the kernels would not take it so: float rows, groups other than the
    integer dots', rows not a multiple of 8, and hosts or runs without the intrinsics (no
    AVX512-VNNI or native f16 conversion, NUMBA_DISABLE_JIT)."""
    from numba import config

    from flashinfer.kernels.blocks import uses_int_dots
    from flashinfer.kernels.simd import HAS_VNNI, NATIVE_F16

    data = m.data
    if (data.ndim != 2 or not uses_int_dots(data, m.group) or data.shape[0] % ROWS_INTERLEAVED
            or not (HAS_VNNI and NATIVE_F16) or config.DISABLE_JIT):
        return m
    n, g = data.shape[0], data.shape[0] // ROWS_INTERLEAVED
    if data.dtype == np.int8:  # q8 / q6k: codes + 128 as bytes, k-group by k-group
        codes = (data.view(np.uint8) ^ np.uint8(0x80)).view(np.int8)
        n_blocks = data.shape[1] // 32
        woven = codes.reshape(g, 8, n_blocks, 8, 4).transpose(0, 2, 3, 1, 4).reshape(g, n_blocks, 256)
    else:  # nibbles: k-groups p and p + 4 share a byte
        n_blocks = data.shape[1] // 16
        codes = np.empty((n, n_blocks * 32), np.uint8)
        codes[:, 0::2], codes[:, 1::2] = data & 15, data >> 4
        by_group = codes.reshape(g, 8, n_blocks, 8, 4).transpose(0, 2, 3, 1, 4)
        woven = (by_group[:, :, :4] | (by_group[:, :, 4:] << 4)).reshape(g, n_blocks, 128)
    scales, mins = (_lanes_of(a, n_blocks) for a in (m.scales, m.mins))
    for a in (woven, scales, mins):
        a.flags.writeable = False
    return m._replace(data=np.ascontiguousarray(woven), scales=scales, mins=mins)


def _lanes_of(a: np.ndarray, n_blocks: int) -> np.ndarray:
    """A scales/mins array [rows, W] as rows in lanes [rows / 8, 8 W] (kernels/lanes.py): its
    leading values (lanes.leading_units) one by one, then its f16 multipliers' byte pairs."""
    from flashinfer.kernels.lanes import leading_units

    if a.shape[0] == 0:
        return a
    g, first, per = a.shape[0] // ROWS_INTERLEAVED, leading_units(a.dtype.name, a.shape[1], n_blocks), ROWS_INTERLEAVED
    head = a[:, :first].reshape(g, per, first).transpose(0, 2, 1).reshape(g, -1)
    tail = a[:, first:].reshape(g, per, -1, 2).transpose(0, 2, 1, 3).reshape(g, -1)
    return np.ascontiguousarray(np.concatenate([head, tail], axis=1))


def _rows_of(a: np.ndarray, n_blocks: int) -> np.ndarray:
    """_lanes_of undone."""
    from flashinfer.kernels.lanes import leading_units

    if a.shape[0] == 0:
        return a
    g, per = a.shape[0], ROWS_INTERLEAVED
    first = leading_units(a.dtype.name, a.shape[1] // per, n_blocks)
    head = a[:, : first * per].reshape(g, first, per).transpose(0, 2, 1).reshape(g * per, first)
    tail = a[:, first * per :].reshape(g, -1, per, 2).transpose(0, 2, 1, 3).reshape(g * per, -1)
    return np.ascontiguousarray(np.concatenate([head, tail], axis=1))


def plain_rows(m: Matrix) -> Matrix:
    """interleave_rows undone: codes, scales and mins a row each (copies), or m itself when they are."""
    if m.data.ndim != 3:
        return m
    g, n_blocks, width = m.data.shape
    if m.data.dtype == np.int8:
        codes = m.data.reshape(g, n_blocks, 8, 8, 4).transpose(0, 3, 1, 2, 4).reshape(g * 8, n_blocks * 32)
        data = (codes.view(np.uint8) ^ np.uint8(0x80)).view(np.int8)
    else:
        packed = m.data.reshape(g, n_blocks, 4, 8, 4)
        by_group = np.concatenate([packed & 15, packed >> 4], axis=2)  # k-groups 0..3, then 4..7
        codes = by_group.transpose(0, 3, 1, 2, 4).reshape(g * 8, n_blocks * 32)
        data = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return m._replace(data=np.ascontiguousarray(data), scales=_rows_of(m.scales, n_blocks),
                      mins=_rows_of(m.mins, n_blocks))


def kernel_product(x: np.ndarray, m: Matrix, bias: np.ndarray) -> np.ndarray:
    """x @ value(m).T + bias through the matmul kernels (predictors.sparsity.Product): a
    predictor's scores computed as the FFN kernels compute the pre-activations."""
    from flashinfer import kernels as K

    out = np.empty((x.shape[0], m.rows), np.float32)
    K.matmul_for(x.shape[0], m.rows, x.shape[1])(x, m.data, m.scales, m.mins, m.group, bias, out)
    return out


def q8_matrix(w: np.ndarray) -> Matrix | None:
    """A float32 [rows, K] matrix as q8 codes in the kernels' form, or None when K is not a
    multiple of the q8 group."""
    from storage import quant

    if w.shape[1] % quant.DEFAULT_GROUP_SIZE:
        return None
    qt = quant.quantize(w, "q8", quant.DEFAULT_GROUP_SIZE)
    return Matrix(qt.data, qt.scales.view(np.uint16), NO_SCALES, quant.DEFAULT_GROUP_SIZE)


def q8_matrix_bytes(rows: int, k: int) -> int | None:
    """nbytes of q8_matrix of a [rows, k] matrix (None where it keeps it float32)."""
    from storage import quant

    if k % quant.DEFAULT_GROUP_SIZE:
        return None
    return rows * quant.scheme_bytes_per_row("q8", k, quant.DEFAULT_GROUP_SIZE)


def weight_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor the model needs, with its shape."""
    d, q, kv, f = args.dim, args.q_dim, args.kv_dim, args.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d)}
    if args.positional == "learned":
        shapes["pos_embeddings.weight"] = (args.max_seq_len + args.learned_pos_offset, d)
    norm_params = ("weight", "bias") if args.norm == "layer" else ("weight",)
    if args.norm_before:
        shapes |= {f"norm.{p}": (d,) for p in norm_params}
    if not args.tie_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        for norm in ("attn_norm", "ffn_norm") + (("attn_post_norm", "ffn_post_norm") if args.sandwich_norm else ()):
            shapes |= {f"{p}{norm}.{n}": (d,) for n in norm_params}
        if args.qk_norm:
            shapes |= {f"{p}attn.q_norm.weight": (args.head_dim,), f"{p}attn.k_norm.weight": (args.head_dim,)}
        attn = {"wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q)}
        ffn = {"w_up": (f, d), "w_down": (d, f)} | ({"w_gate": (f, d)} if args.gated_ffn else {})
        for name, shape in attn.items():
            shapes[f"{p}attn.{name}.weight"] = shape
            if args.attn_bias or (args.qkv_bias and name != "wo"):
                shapes[f"{p}attn.{name}.bias"] = (shape[0],)
        for name, shape in ffn.items():
            shapes[f"{p}ffn.{name}.weight"] = shape
            if args.ffn_bias:
                shapes[f"{p}ffn.{name}.bias"] = (shape[0],)
    return shapes


# canonical FFN tensors a store keeps in each layer's bundles (or as a layer matrix), not resident
IN_FFN_FILES = ("ffn.w_up.weight", "ffn.w_gate.weight", "ffn.w_down.weight", "ffn.w_up.bias", "ffn.w_gate.bias")


def check_store_layout(args: ModelArgs, manifest, where: str) -> None:
    """FormatError unless the store's tensors are exactly the ones `args` (its model_config)
    describes, with the shapes the kernels will index them by: a manifest whose model_config
    and tensors disagree would otherwise run kernels past the ends of their arrays."""
    def refuse(what: str):
        raise FormatError(f"{where}: {what}; model_config and the tensors disagree (the manifest is damaged), "
                          "convert the model again")

    shapes = {name: shape for name, shape in weight_shapes(args).items() if not name.endswith(IN_FFN_FILES)}
    for name, shape in shapes.items():
        t = manifest.resident.get(name)
        if t is None:
            refuse(f"resident tensor {name!r} is missing")
        if tuple(t.shape) != shape:
            refuse(f"resident tensor {name!r} is {list(t.shape)}, not {list(shape)}")
    extra = sorted(set(manifest.resident) - set(shapes))
    if extra:
        refuse(f"resident tensor {extra[0]!r} is not part of the model")
    if len(manifest.ffn_layers) != args.n_layers:
        refuse(f"{len(manifest.ffn_layers)} FFN layers for {args.n_layers} layers")
    want = {"up": args.dim} | ({"gate": args.dim} if args.gated_ffn else {})
    want |= {f"{c}_bias": 1 for c in want} if args.ffn_bias else {}
    for i, layer in enumerate(manifest.ffn_layers):
        if layer.n_neurons != args.ffn_dim:
            refuse(f"FFN layer {i} has {layer.n_neurons} neurons, not ffn_dim = {args.ffn_dim}")
        got = {c.name: c.length for c in layer.components if c.name != "down"}
        got |= {m.name: m.shape[1] for m in layer.matrices if m.name == "gate" and m.shape == (args.ffn_dim, args.dim)}
        down = [c.length == args.dim for c in layer.components if c.name == "down"]
        down += [m.shape == (args.dim, args.ffn_dim) for m in layer.matrices if m.name == "down"]
        if got != want or down != [True]:
            refuse(f"FFN layer {i} holds {sorted(got) + ['down'] * len(down)} of lengths {got}, not {sorted(want)} "
                   f"and one down of {args.dim} x {args.ffn_dim}")


@dataclass
class LayerWeights:
    attn_norm_w: np.ndarray
    attn_norm_b: np.ndarray
    wq: Matrix
    bq: np.ndarray
    wk: Matrix
    bk: np.ndarray
    wv: Matrix
    bv: np.ndarray
    wo: Matrix
    bo: np.ndarray
    ffn_norm_w: np.ndarray
    ffn_norm_b: np.ndarray
    # dense FFN (None when the FFN lives in the store's bundles, read per token)
    w_up: Matrix | None
    b_up: np.ndarray
    w_gate: Matrix | None  # None for ungated FFNs
    b_gate: np.ndarray
    w_down: Matrix | None
    b_down: np.ndarray
    # Gemma 3 (EMPTY elsewhere): per-head q/k norms, and norms of the attention and FFN outputs
    q_norm_w: np.ndarray = field(default_factory=lambda: EMPTY)
    k_norm_w: np.ndarray = field(default_factory=lambda: EMPTY)
    attn_post_norm_w: np.ndarray = field(default_factory=lambda: EMPTY)
    ffn_post_norm_w: np.ndarray = field(default_factory=lambda: EMPTY)


@dataclass
class ModelWeights:
    tok_embeddings: Matrix
    pos_embeddings: Matrix | None  # learned positions only
    layers: list[LayerWeights]
    norm_w: np.ndarray  # EMPTY for post-LN models (no final norm)
    norm_b: np.ndarray
    lm_head: Matrix  # the embedding table itself when tied

    @classmethod
    def from_tensors(cls, args: ModelArgs, get) -> "ModelWeights":
        """Assemble from `get(canonical_name)`: a Matrix for 2-D tensors, an array for 1-D,
        None when absent."""

        def vec(name: str) -> np.ndarray:
            arr = get(name)
            if arr is not None and args.norm_weight_offset and name.endswith("norm.weight"):
                arr = arr + np.float32(args.norm_weight_offset)  # Gemma's (1 + w), once
            return EMPTY if arr is None else arr

        layers = []
        for i in range(args.n_layers):
            p = f"layers.{i}."
            layers.append(LayerWeights(
                attn_norm_w=vec(p + "attn_norm.weight"), attn_norm_b=vec(p + "attn_norm.bias"),
                wq=get(p + "attn.wq.weight"), bq=vec(p + "attn.wq.bias"),
                wk=get(p + "attn.wk.weight"), bk=vec(p + "attn.wk.bias"),
                wv=get(p + "attn.wv.weight"), bv=vec(p + "attn.wv.bias"),
                wo=get(p + "attn.wo.weight"), bo=vec(p + "attn.wo.bias"),
                ffn_norm_w=vec(p + "ffn_norm.weight"), ffn_norm_b=vec(p + "ffn_norm.bias"),
                w_up=get(p + "ffn.w_up.weight"), b_up=vec(p + "ffn.w_up.bias"),
                w_gate=get(p + "ffn.w_gate.weight"), b_gate=vec(p + "ffn.w_gate.bias"),
                w_down=get(p + "ffn.w_down.weight"), b_down=vec(p + "ffn.w_down.bias"),
                q_norm_w=vec(p + "attn.q_norm.weight"), k_norm_w=vec(p + "attn.k_norm.weight"),
                attn_post_norm_w=vec(p + "attn_post_norm.weight"), ffn_post_norm_w=vec(p + "ffn_post_norm.weight"),
            ))
        tok = get("tok_embeddings.weight")
        return cls(
            tok_embeddings=tok,
            pos_embeddings=get("pos_embeddings.weight"),
            layers=layers,
            norm_w=vec("norm.weight"),
            norm_b=vec("norm.bias"),
            lm_head=tok if args.tie_embeddings else get("lm_head.weight"),
        )


def _kernel_array(ckpt: Checkpoint, hf_name: str, is_matrix: bool) -> np.ndarray | Matrix:
    """A read-only array (1-D) or Matrix (2-D) in a dtype the kernels take (see module docstring)."""
    dtype = ckpt.tensors[hf_name].dtype
    if is_matrix and dtype == "F16":
        arr = ckpt.raw(hf_name).view(np.uint16)
    elif is_matrix and dtype == "BF16" and (bits := bf16_as_f16_bits(ckpt.raw(hf_name))) is not None:
        arr = bits
    elif dtype in ("F32", "F16", "BF16", "F64"):
        arr = np.ascontiguousarray(ckpt.as_float32(hf_name))
    else:
        raise CheckpointError(f"{ckpt.tensors[hf_name].path}: tensor {hf_name!r} has dtype {dtype}; "
                              "expected a floating-point weight (F32, F16 or BF16)")
    arr.flags.writeable = False
    return Matrix(arr) if is_matrix else arr


def bf16_as_f16_bits(bf16: np.ndarray, rows_per_block: int = 1024) -> np.ndarray | None:
    """A bf16 matrix (uint16 bits) as f16 bits, or None if a value lies beyond f16's range."""
    out = np.empty(bf16.shape, np.uint16)
    for r in range(0, bf16.shape[0], rows_per_block):
        block = bf16_to_float32(np.ascontiguousarray(bf16[r:r + rows_per_block]))
        if not np.isfinite(block).all() or np.abs(block).max(initial=0.0) > np.finfo(np.float16).max:
            return None
        out[r:r + rows_per_block] = block.astype(np.float16).view(np.uint16)
    return out


def map_hf_tensors(args: ModelArgs, ckpt: Checkpoint) -> dict[str, str]:
    """canonical name -> stored HF name for every tensor the model needs, after checking
    that none is missing, none is extra and every shape matches the config."""
    from flashinfer.arch import FAMILIES

    arch = FAMILIES[args.family]
    present = {arch.normalize_hf_name(n): n for n in ckpt.tensors}  # normalized -> stored name
    wanted = arch.weight_names(args)  # canonical -> normalized HF name
    shapes = weight_shapes(args)
    missing = sorted(hf for hf in wanted.values() if hf not in present)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{ckpt.source}: checkpoint lacks {len(missing)} tensor(s) the config needs: {shown}")
    extra = set(present) - set(wanted.values()) - arch.ignored_names(args, set(present))
    if extra:
        shown = ", ".join(sorted(extra)[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        raise CheckpointError(
            f"{ckpt.source}: checkpoint has {len(extra)} tensor(s) this {args.model_type} config does not use: "
            f"{shown} (does config.json match the weights?)"
        )
    for canonical, hf in wanted.items():
        info = ckpt.tensors[present[hf]]
        if info.shape != shapes[canonical]:
            raise CheckpointError(
                f"{info.path}: tensor {info.name!r} has shape {list(info.shape)}, "
                f"config.json implies {list(shapes[canonical])}"
            )
    return {canonical: present[hf] for canonical, hf in wanted.items()}


def load_hf_weights(args: ModelArgs, ckpt: Checkpoint) -> ModelWeights:
    """Every tensor the model needs, checked, as kernel-ready read-only arrays."""
    stored = map_hf_tensors(args, ckpt)
    shapes = weight_shapes(args)

    def get(canonical: str) -> np.ndarray | Matrix | None:
        name = stored.get(canonical)
        return None if name is None else _kernel_array(ckpt, name, is_matrix=len(shapes[canonical]) == 2)

    return ModelWeights.from_tensors(args, get)


def matrix_from_quantized(qt) -> Matrix:
    """A storage.quant.QuantizedTensor (views into the store) as the kernels take it."""
    if qt.scheme == "f32":
        return Matrix(qt.data)
    if qt.scheme == "f16":
        return Matrix(qt.data.view(np.uint16))
    if qt.scheme == "q4k":  # packed 6-bit scales and mins with their f16 multipliers, as bytes
        return Matrix(qt.data, qt.scales, qt.mins, qt.group_size)
    if qt.scheme == "q6k":  # int8 scales with their f16 multipliers as bytes (the kernels tell q6k by them)
        return Matrix(qt.data, qt.scales, NO_SCALES, qt.group_size)
    mins = NO_SCALES if qt.mins is None else qt.mins.view(np.uint16)
    return Matrix(qt.data, qt.scales.view(np.uint16), mins, qt.group_size)


def load_store_weights(args: ModelArgs, reader) -> ModelWeights:
    """Resident tensors of a flash store as zero-copy views; the FFN stays on flash (None)."""
    from flashinfer.memory import release_freed_heap

    resident = reader.manifest.resident

    def get(canonical: str) -> np.ndarray | Matrix | None:
        if canonical not in resident:
            return None
        tensor = reader.resident_tensor(canonical)
        if isinstance(tensor, np.ndarray):
            return tensor
        matrix = matrix_from_quantized(tensor)
        # the matrices of matmuls, a token's whole read: attention's, and the head (the token
        # table when tied; its lookups gather a row); an untied table is only looked up
        if canonical.endswith(MATMUL_MATRICES) or (canonical == "tok_embeddings.weight" and args.tie_embeddings):
            woven = interleave_rows(matrix)
            if woven is not matrix:  # the store's pages of it would count in RSS beside the copy
                reader.release_resident(canonical)
            return woven
        return matrix

    weights = ModelWeights.from_tensors(args, get)
    release_freed_heap()  # the layout's temporaries (flashinfer/memory.py)
    return weights


MATMUL_MATRICES = ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight", "lm_head.weight")
