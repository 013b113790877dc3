"""Synthetic Hugging Face checkpoints with planted FFN activation sparsity.

Random-weight models with the shapes of real 7B-class checkpoints, for performance work:
the flash store, the neuron cache and the benchmarks need a model whose ReLU FFN fires
sparsely (OPT-6.7B, ReluLLaMA/ProSparse, TurboSparse-Mistral report 90-97% zeros), with a
power-law "hot" set of neurons that fire far more often than the rest (PowerInfer, §3).
They are not language models: the text they generate is noise.

    from storage.synth import synthesize
    report = synthesize("mistral-7b-relu", "models/mistral-relu", sparsity=0.9)
    flashinfer synth mistral-7b-relu models/mistral-relu --sparsity 0.9

Output: an HF directory (config.json as transformers 4.x writes it, safetensors shards of at
most ~1 GB + model.safetensors.index.json, tokenizer.json, tokenizer_config.json,
generation_config.json) and `synth.json` with the preset, the targets and the sparsity
measured on the model itself.

The package: presets.py holds the shapes (PRESETS) and the figures the SwiGLU presets
reproduce, planting.py the random weights and the calibration forward that plants the
sparsity, writing.py `synthesize` and everything it writes (safetensors shards, config.json,
tokenizer, synth.json, GGUF).
"""

from storage.synth import planting, presets, writing  # noqa: F401  (synth.writing.X for a test to patch)
from storage.synth.planting import (  # noqa: F401
    ATTN_LOGIT_STD,
    BLOCK_ELEMS,
    CAL_SEQS,
    EVAL_SEQS,
    P_MAX,
    P_MIN,
    SEQ_LEN,
    firing_probabilities,
    hot10_share,
)
from storage.synth.presets import (  # noqa: F401
    BOS_ID,
    DEFAULT_HOT_SKEW,
    DEFAULT_SPARSITY,
    EOS_ID,
    PRESETS,
    SILU_GATE_STD,
    SILU_HOT_SKEW,
    SILU_NEGATIVE_SHARE,
    UNK_ID,
    SynthShape,
    _tensor_plan,
)
from storage.synth.writing import (  # noqa: F401
    DTYPES,
    FFN_MATRICES,
    GGUF_BLOCK_TYPES,
    GGUF_ROW_MULTIPLE,
    GGUF_SUPER_BLOCK_TYPES,
    GGUF_TYPE_BYTES_PER_256,
    GGUF_TYPES,
    MAX_SHARD_BYTES,
    SYNTH_VERSION,
    Progress,
    SynthReport,
    _hf_config,
    _tokenizer_files,
    gguf_name,
    gguf_permute_rows,
    gguf_tensor_bytes,
    synthesize,
)

