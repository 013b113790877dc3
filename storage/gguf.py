"""Reading a llama.cpp GGUF file (architecture "llama", "qwen2" or "gemma3") as a Hugging Face checkpoint.

The converter (flashinfer/convert.py) needs three things from a model file: its config,
its tensors under HF names as float32 blocks, and its tokenizer. `GGUFCheckpoint` gives
them for a GGUF file, parsed by the `gguf` package's reader (llama.cpp's gguf-py):

    with GGUFCheckpoint.open("model.gguf") as ckpt:
        cfg = ckpt.hf_config()                      # config.json keys, from llama.* / qwen2.* metadata
        ckpt.tensors["model.layers.0.mlp.up_proj.weight"].shape   # HF shape
        up = ckpt.rows_f32("model.layers.0.mlp.up_proj.weight", rows=slice(0, 1024))
        tokenizer_json, tokenizer_config = ckpt.tokenizer_files()

Where GGUF differs from an HF checkpoint:
- names: llama.cpp's (`blk.{i}.attn_q.weight`, see GGUF_NAMES), mapped both ways here;
- dims are listed fastest first: ne[0] is the row length, so an HF [rows, cols] matrix has
  ne = [cols, rows] and its bytes are the same row-major rows;
- in a llama file attn_q / attn_k rows are permuted within each head (convert_hf_to_gguf.py's
  LlamaModel.permute: llama.cpp's rope pairs elements 2i and 2i+1, HF pairs i and i + d/2);
  `rows_f32` undoes it by reading GGUF row `gguf_row_of_hf_row(j)` for HF row j. A qwen2 file
  keeps HF's rows (llama.cpp runs it with NEOX rope, HF's pairing) and adds q/k/v biases;
- weights may be block-quantized (Q8_0: 32 values per 34-byte block, k-quants: 256 per
  block, along a row); `rows_f32` dequantizes with gguf-py's numpy reference dequantizers
  only the blocks a request covers (a column range is widened to whole blocks, then trimmed);
- the FFN activation is not recorded: llama.cpp's llama graph is always SiLU-gated. Files
  written by storage/synth/writing.py carry `flashinfer.hidden_act` ("relu"); llama.cpp ignores it.

storage/gguf_header.py walks the header first with every count bounded by the file's size; then
GGUFReader parses it (metadata and tensor table); its values are copied out and the
reader dropped (it holds a numpy view per array element). Tensor data is read through our own
read-only mmap, so `release(name)` can drop a tensor's pages from RSS and the page cache as
storage/safetensors.py does: converting streams one tensor (or block of neurons) at a time.
Every problem raises CheckpointError naming the file (and the tensor or key at fault).
"""

from __future__ import annotations

import mmap
import os
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.errors import CheckpointError
from storage.gguf_header import check_header

# the GGUF architectures this module maps: Qwen2 is llama's graph with q/k/v biases, its q/k rows
# not permuted (llama.cpp runs it with NEOX rope, HF's rotate_half)
ARCHITECTURES = ("llama", "qwen2", "gemma3")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
FLASHINFER_ACT_KEY = "flashinfer.hidden_act"  # our own key: the FFN activation the weights were made for
# tensor types rows_f32 dequantizes (through gguf-py's numpy reference code, tested upstream
# against ggml); i-quants, ternary and fp4 types are refused until they are tested here
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_TOKENIZERS = ("gpt2", "llama")
# GGUF tensor types whose values a store scheme holds exactly (storage/quant.py: the same
# dequantization formula on the same codes and f16 scales, only the nibble order differs):
# converting keeps their codes instead of rounding the dequantized weights a second time.
# Q5_0 ((q - 16) * d, q of 5 bits, one f16 d per 32) is q8's formula with codes in -16..15: exact
# in q8 (8.5 bits a weight against the file's 5.5), no second rounding
# Q6_K ((q - 32) * d * sc, 16 weights per int8 sc, one f16 d per 256) is q6k's (codes one per byte)
KEPT_SCHEMES = {"F32": "f32", "F16": "f16", "Q8_0": "q8", "Q5_0": "q8", "Q4_0": "q4", "Q4_1": "q4a", "Q4_K": "q4k",
                "Q6_K": "q6k"}
MORE_THAN_4_BITS = ("Q5_1", "Q5_K")  # and Q5_0 and Q6_K, which KEPT_SCHEMES holds exactly
Q4_K_BLOCK_BYTES = 144  # d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
Q6_K_BLOCK_BYTES = 210  # 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, f16 d

# ---- BPE pre-tokenizers: tokenizer.ggml.pre -------------------------------------------------
# llama.cpp splits text before byte-level BPE with a list of regexes per pre-tokenizer type
# (llama-vocab.cpp, llm_tokenizer_bpe's regex_exprs), applied in turn: each piece is split further
# by the next regex, every match and every gap between two matches a piece of its own, which is
# what a Sequence of HF Split(behavior="isolated") does. The regexes are llama.cpp's strings
# (non-ASCII characters written \x{...}); where its engine (unicode.cpp) reads a string otherwise
# than Oniguruma (tokenizers') does, the string here is rewritten to say what llama.cpp does:
# - a regex with a \p{..} class runs on the text with each non-ASCII character collapsed to its
#   category: \p{Lu}, \p{Ll}, \p{Lt}, \p{Lm} and \p{Lo} all mean \p{L}, so their case is lost;
# - a regex without one runs as std::wregex on the text with non-ASCII white space turned into
#   \v: a literal range of characters never takes a space (&&\S here), \d is [0-9];
# - GPT-2's and Llama 3's regexes, Kimi-K2's, AFMoE's and Tiny Aya's digits run as custom code: the
#   first two split as their regex, the others are written here as regexes that split as the code
#   does (Tiny Aya's as llama.cpp was measured to split, tests/fixtures/pretokenizers).
CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"  # llama.cpp's (?i:'s|'t|...)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN2_REGEX = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
BLOOM_REGEX = r" ?[^(\s|.,!?\x{2026}\x{3002}\x{ff0c}\x{3001}\x{964}\x{6d4}\x{60c})]+"
# Chinese, Japanese kana and Korean as DeepSeek writes them (U+0800..U+4E00 holds space characters)
DEEPSEEK_CJK = r"[\x{4e00}-\x{9fa5}\x{800}-\x{4e00}\x{ac00}-\x{d7ff}&&\S]+"
KANJI_KANA = r"[\x{4e00}-\x{9fa5}\x{3040}-\x{309f}\x{30a0}-\x{30ff}]+"
DEEPSEEK3_REGEX = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                   r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# "upper" and "lower" case letters of Tekken's and GPT-4o's regexes as llama.cpp writes them: any
# letter but a-z, any letter but A-Z (so a non-ASCII letter is both)
UPPER, LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
UPPER_M, LOWER_M = r"((?=[\p{L}\p{M}])([^a-z]))", r"((?=[\p{L}\p{M}])([^A-Z]))"
# unicode.cpp's unicode_cpt_is_han: Kimi-K2's \p{Han}
HAN = (r"\x{4e00}-\x{9fff}\x{3400}-\x{4dbf}\x{20000}-\x{2a6df}\x{2a700}-\x{2b73f}\x{2b740}-\x{2b81f}"
       r"\x{2b820}-\x{2ceaf}\x{2ceb0}-\x{2ebef}\x{f900}-\x{faff}\x{2f800}-\x{2fa1f}")
DIGITS_IN_THREES = r"\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))"  # a run of digits in groups of 3 from its end
SMOLLM = (r"\p{N}", GPT2_REGEX)  # every digit a piece, then GPT-2's regex
DEEPSEEK3 = (r"\p{N}{1,3}", KANJI_KANA, DEEPSEEK3_REGEX)
GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{UPPER}*{LOWER}+{CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{UPPER}+{LOWER}*{CONTRACTIONS}?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
# llama.cpp's pre-tokenizer types by their LLAMA_VOCAB_PRE_TYPE_ name: the splits applied in turn, each
# a regex whose matches are pieces, or (regex, HF Split behavior); None is GPT-2's own regex, which
# tokenizers' ByteLevel(use_regex=True) applies
BPE_PRE_SPLITS: dict[str, tuple[str | tuple[str, str], ...] | None] = {
    "DEFAULT": (r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **dict.fromkeys(("LLAMA3", "DBRX", "SMAUG", "CHATGLM4"), (LLAMA3_REGEX,)),
    "JAIS2": (CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
              r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",),
    "DEEPSEEK_LLM": (
        r"[\r\n]",
        r"\s?[A-Za-z\x{b5}\x{c0}-\x{d6}\x{d8}-\x{f6}\x{f8}-\x{1ba}\x{1bc}-\x{1bf}\x{1c4}-\x{293}\x{295}-\x{2af}"
        r"\x{370}-\x{373}\x{376}\x{377}\x{37b}-\x{37d}\x{37f}\x{386}\x{388}-\x{38a}\x{38c}\x{38e}-\x{3a1}"
        r"\x{3a3}-\x{3f5}\x{3f7}-\x{481}\x{48a}-\x{52f}\x{531}-\x{556}\x{10a0}-\x{10c5}\x{13a0}-\x{13f5}"
        r"\x{13f8}-\x{13fd}\x{1c90}-\x{1cba}\x{1cbd}-\x{1cbf}\x{1d00}-\x{1d2b}\x{1d6b}-\x{1d77}\x{1d79}-\x{1d9a}"
        r"\x{1e00}-\x{1f15}\x{1f18}-\x{1f1d}\x{1f20}-\x{1f45}\x{1f48}-\x{1f4d}\x{1f50}-\x{1f57}\x{1f59}\x{1f5b}"
        r"\x{1f5d}\x{1f5f}-\x{1f7d}\x{1f80}-\x{1fb4}\x{1fb6}-\x{1fbc}\x{1fbe}\x{1fc2}-\x{1fc4}\x{1fc6}-\x{1fcc}"
        r"\x{1fd0}-\x{1fd3}\x{1fd6}-\x{1fdb}\x{1fe0}-\x{1fec}\x{1ff2}-\x{1ff4}\x{1ff6}-\x{1ffc}\x{2102}\x{2107}"
        r"\x{210a}-\x{2113}\x{2115}\x{2119}-\x{211d}\x{2124}\x{2126}\x{2128}\x{212a}-\x{212d}\x{212f}-\x{2134}"
        r"\x{2139}\x{213c}-\x{213f}\x{2145}-\x{2149}\x{214e}\x{2183}\x{2184}\x{2c00}-\x{2c7b}\x{2c7e}-\x{2ce4}"
        r"\x{2ceb}-\x{2cee}\x{2cf2}\x{2cf3}\x{a640}-\x{a66d}\x{a680}-\x{a69b}\x{a722}-\x{a76f}\x{a771}-\x{a787}"
        r"\x{a78b}-\x{a78e}\x{ab70}-\x{abbf}\x{fb00}-\x{fb06}\x{fb13}-\x{fb17}\x{ff21}-\x{ff3a}\x{ff41}-\x{ff5a}"
        r"\x{10400}-\x{1044f}\x{104b0}-\x{104d3}\x{104d8}-\x{104fb}\x{10c80}-\x{10cb2}\x{10cc0}-\x{10cf2}"
        r"\x{118a0}-\x{118df}\x{1e900}-\x{1e943}]+",
        r"\s?[!-/:-~\x{ff01}-\x{ff0f}\x{ff1a}-\x{ff5e}\x{2018}-\x{201f}\x{3001}-\x{3002}]+",  # U+3000 is a space
        r"\s+$", DEEPSEEK_CJK, r"\p{N}+"),
    **dict.fromkeys(("DEEPSEEK3_LLM", "HUNYUAN_DENSE", "JOYAI_LLM", "HY_V4"), DEEPSEEK3),
    "SPARK2_5": (r"\p{N}{1,3}", KANJI_KANA,
                 r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                 r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+", r"\p{N}"),
    "YOUTU": (
        r"[\x{ac00}-\x{d7a3}\x{3131}-\x{318e}]+|[\x{ff01}\x{2026}\x{201c}\x{201d}\x{2018}\x{2019}\x{2014}\x{ff1a}"
        r"\x{ff1b}\x{ff0c}\x{3001}-\x{303f}\x{fe30}-\x{fe4f}]+|[\x{3105}-\x{312f}]+|" + KANJI_KANA,
        # llama.cpp's [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+ (twice): [\p{L}\p{M}]+
        r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+" + CONTRACTIONS + r"?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"),
    "DEEPSEEK_CODER": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", DEEPSEEK_CJK, r"\p{N}"),
    "FALCON": (r"[\p{P}\$\+<=>\^~\|`]+", GPT2_REGEX, r"[0-9][0-9][0-9]"),
    **dict.fromkeys(("STARCODER", "REFACT", "COMMAND_R", "SMOLLM", "CODESHELL", "EXAONE", "MINERVA", "MELLUM2"),
                    SMOLLM),
    **dict.fromkeys(("GPT2", "MPT", "OLMO", "JAIS", "TRILLION", "GRANITE_DOCLING"), None),
    **dict.fromkeys(("STABLELM2", "QWEN2", "HUNYUAN", "SOLAR_OPEN", "GROK_2"), (QWEN2_REGEX,)),
    "QWEN35": (CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+",),
    **dict.fromkeys(("PORO", "BLOOM", "GPT3_FINNISH"), (BLOOM_REGEX,)),
    "VIKING": (BLOOM_REGEX, r"\p{N}"),
    "TEKKEN": (rf"[^\r\n\p{{L}}\p{{N}}]?{UPPER}*{LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{UPPER}+{LOWER}*"
               r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "CHAMELEON": (r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
                  r"[\p{P}!-/:-@\[-`{-~]", GPT2_REGEX),
    **dict.fromkeys(("GPT4O", "MINIMAX_M2"), GPT4O),
    "GRANITE_EMB_MULTI": (  # GPT-4o's with marks counted as letters
        rf"[^\r\n\p{{L}}\p{{N}}]?{UPPER_M}*{LOWER_M}+{CONTRACTIONS}?"
        rf"|[^\r\n\p{{L}}\p{{N}}]?{UPPER_M}+{LOWER_M}*{CONTRACTIONS}?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "TINY_AYA": (
        DIGITS_IN_THREES,  # llama.cpp's \d{1,3}(?=(?:\d{3})*\b) splits so (measured)
        r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+" + CONTRACTIONS + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"),
    "KIMI_K2": (  # unicode.cpp's unicode_regex_split_custom_kimi_k2
        rf"[{HAN}]+|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}&&[^{HAN}]]+{CONTRACTIONS}?|\p{{N}}{{1,3}}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "SUPERBPE": (r"\p{N}+", r"(?=(?:[0-9]{3})+(?![0-9]))"),
    "BAILINGMOE": (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",),
    "SEED_CODER": (CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                   r"|\s+(?!\S)|\s+",),
    "UFAKZEKA": (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "AFMOE": (
        # unicode.cpp's unicode_regex_split_custom_afmoe: the text before a run of digits (back to
        # the previous run) is one piece with the run's first group
        (DIGITS_IN_THREES, "merged_with_previous"),
        r"[\x{4e00}-\x{9fff}\x{3400}-\x{4dbf}\x{8c48}-\x{faff}\x{3040}-\x{309f}\x{30a0}-\x{30ff}\x{ff65}-\x{ff9f}"
        r"\x{2f00}-\x{2fdf}\x{e40}-\x{e7f}\x{e80}-\x{eff}\x{1780}-\x{17ff}\x{1000}-\x{109f}\x{aa60}-\x{aa7f}"
        r"\x{a9e0}-\x{a9ff}\x{ac00}-\x{d7af}\x{1100}-\x{11ff}]+",
        DEEPSEEK3_REGEX),
    "LAGUNA": (r"[^\n]+|[\n]+", QWEN2_REGEX),
    "EXAONE_MOE": (CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",),
    "MINICPM5": (r"\p{N}{1,3}", CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


@dataclass(frozen=True)
class BpePre:
    """What llama.cpp (llama_vocab::impl::load) makes of one tokenizer.ggml.pre: a pre-tokenizer
    type and the flags it sets with it."""

    llama_type: str  # LLAMA_VOCAB_PRE_TYPE_*, a key of BPE_PRE_SPLITS
    ignore_merges: bool = False  # a piece that is a token is taken whole, not merged up to
    add_bos: bool = False  # BOS prepended when the file has no tokenizer.ggml.add_bos_token


def _pre(llama_type: str, *names: str, **flags) -> dict[str, BpePre]:
    return dict.fromkeys(names, BpePre(llama_type, **flags))


# tokenizer.ggml.pre -> what llama.cpp makes of it
BPE_PRE_TOKENIZERS = {
    **_pre("DEFAULT", "default"),  # also llama.cpp's choice for a file without tokenizer.ggml.pre
    **_pre("LLAMA3", "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
           "jina-v5-nano", ignore_merges=True, add_bos=True),
    **_pre("DEEPSEEK_LLM", "deepseek-llm"), **_pre("DEEPSEEK_CODER", "deepseek-coder"),
    **_pre("DEEPSEEK3_LLM", "deepseek-v3"), **_pre("SPARK2_5", "spark2_5"),
    **_pre("YOUTU", "youtu", ignore_merges=True), **_pre("FALCON", "falcon"), **_pre("MPT", "mpt"),
    **_pre("STARCODER", "starcoder"),
    **_pre("GPT2", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
           "mellum", "modern-bert", "exaone4"),
    **_pre("JAIS2", "jais-2"), **_pre("REFACT", "refact"), **_pre("COMMAND_R", "command-r"),
    **_pre("QWEN2", "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), **_pre("QWEN35", "qwen35"),
    **_pre("STABLELM2", "stablelm2"), **_pre("OLMO", "olmo"), **_pre("DBRX", "dbrx"), **_pre("SMAUG", "smaug-bpe"),
    **_pre("PORO", "poro-chat"),
    # llama.cpp (llama-cpp-python 0.3.36's) takes a GLM-4 token whole, a ChatGLM one not (measured)
    **_pre("CHATGLM4", "glm4", ignore_merges=True), **_pre("CHATGLM4", "chatglm-bpe"),
    **_pre("VIKING", "viking"), **_pre("JAIS", "jais"), **_pre("TEKKEN", "tekken", ignore_merges=True, add_bos=True),
    **_pre("SMOLLM", "smollm"), **_pre("CODESHELL", "codeshell"), **_pre("BLOOM", "bloom"),
    **_pre("GPT3_FINNISH", "gpt3-finnish"), **_pre("EXAONE", "exaone"), **_pre("EXAONE_MOE", "exaone-moe"),
    **_pre("CHAMELEON", "chameleon", add_bos=True), **_pre("MINERVA", "minerva-7b"),
    **_pre("GPT4O", "gpt-4o", "llama4", "kanana2", "talkie"),
    **_pre("GRANITE_EMB_MULTI", "granite-embed-multi-97m", ignore_merges=True),
    **_pre("TINY_AYA", "tiny_aya", "cohere2moe"), **_pre("SUPERBPE", "superbpe"), **_pre("TRILLION", "trillion"),
    **_pre("GRANITE_DOCLING", "granite-docling"), **_pre("BAILINGMOE", "bailingmoe", "bailingmoe2", "llada-moe"),
    **_pre("SEED_CODER", "seed-coder"), **_pre("HUNYUAN", "hunyuan"), **_pre("HUNYUAN_DENSE", "hunyuan-dense"),
    **_pre("HY_V4", "hy_v4"), **_pre("JOYAI_LLM", "joyai-llm"), **_pre("KIMI_K2", "kimi-k2"),
    **_pre("UFAKZEKA", "ufakzeka"), **_pre("GROK_2", "grok-2"), **_pre("AFMOE", "afmoe"), **_pre("LAGUNA", "laguna"),
    **_pre("MINIMAX_M2", "minimax-m2"), **_pre("SOLAR_OPEN", "solar-open"), **_pre("MELLUM2", "mellum2"),
    **_pre("MINICPM5", "minicpm5", ignore_merges=True),
}
# tokenizer.ggml.pre values llama.cpp knows whose pre-tokenizer is more than regex splits before
# byte-level BPE, and what more
UNSUPPORTED_PRE_TOKENIZERS = {
    **dict.fromkeys(("gemma4", "granite-embed-multi-311m", "sarvam-moe"),
                    "SentencePiece-style BPE on raw UTF-8: spaces written as U+2581, <0xXX> byte tokens"),
    "whitespace": "split at white space, no byte-level encoding",
    **dict.fromkeys(("jina-v1-en", "jina-v2-code", "roberta-bpe"),
                    "GPT-2's, but llama.cpp appends a SEP token to every text (an encoder's add_sep)"),
}
# gguf TokenType values
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
# control tokens llama.cpp treats as the end of a generation by their text (llama-vocab.cpp, special_eog_ids)
END_OF_TURN = frozenset(("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                         "<EOT>", "_<EOT>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>"))

# ---- names --------------------------------------------------------------------------------

# HF suffix after model.layers.{i}. -> llama.cpp's after blk.{i}., as convert_hf_to_gguf.py maps LlamaForCausalLM
GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",  # Qwen2's
}
GGUF_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}
# Gemma 3's four norms a block: llama.cpp's ffn_norm is its pre-FFN norm (Llama's post-attention one)
GEMMA3_NAMES = {k: v for k, v in GGUF_NAMES.items() if k != "post_attention_layernorm.weight"} | {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
}
LAYER_NAMES = {"llama": GGUF_NAMES, "qwen2": GGUF_NAMES, "gemma3": GEMMA3_NAMES}
_HF_SUFFIX = {arch: {v: k for k, v in names.items()} for arch, names in LAYER_NAMES.items()}
_HF_GLOBAL = {v: k for k, v in GGUF_GLOBAL_NAMES.items()}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 rope scaling, written as per-frequency divisors
PERMUTED = ("attn_q.weight", "attn_k.weight")
# llama.cpp's Gemma 3 converter stores every norm weight plus 1 (Gemma3RMSNorm scales by 1 + w);
# the reader takes the 1 off again, so the store holds HF's values whatever it was made from
GEMMA3_NORM_SHIFT = 1.0
GEMMA3_LOCAL_ROPE_BASE = 10_000.0  # llama.cpp's rope_freq_base_train_swa for gemma3 (not in the file)
GEMMA3_SWA_PATTERN = 6  # every 6th layer global, as llama.cpp's set_swa_pattern(6)


def gguf_name(name: str, arch: str = "llama") -> str:
    """llama.cpp's name of an HF tensor of architecture `arch`."""
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    _, _, layer, suffix = name.split(".", 3)  # model.layers.{i}.{suffix}
    return f"blk.{layer}.{LAYER_NAMES[arch][suffix]}"


def hf_name(name: str, arch: str = "llama") -> str | None:
    """The HF name of a llama.cpp tensor of architecture `arch`, None for a name outside its table."""
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _HF_SUFFIX[arch]:
        return f"model.layers.{parts[1]}.{_HF_SUFFIX[arch][parts[2]]}"
    return None


def q4k_from_ggml_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml Q4_K blocks uint8 [rows, super-blocks, 144] as storage.quant's q4k arrays (data,
    scales, mins): the same d, dmin, 6-bit scales/mins and nibbles, unpacked and reordered (ggml
    packs the 6-bit values into 12 bytes and puts element l and 32 + l of each 64 in byte l)."""
    from storage import quant

    rows, n_super, _ = blocks.shape
    d, dmin = blocks[:, :, 0:2], blocks[:, :, 2:4]
    packed = blocks[:, :, 4:16].astype(np.uint8)
    lo, hi, mixed = packed[:, :, 0:4], packed[:, :, 4:8], packed[:, :, 8:12]
    sc = np.concatenate([lo & 0x3F, (mixed & 0x0F) | ((lo >> 2) & 0x30)], axis=2)  # ggml's get_scale_min_k4
    m = np.concatenate([hi & 0x3F, (mixed >> 4) | ((hi >> 2) & 0x30)], axis=2)
    qs = blocks[:, :, 16:].reshape(rows, n_super, 4, 1, 32)
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(rows, n_super * quant.SUPER_BLOCK)
    return (quant.pack_nibbles(values), np.concatenate([sc.reshape(rows, -1), d.reshape(rows, -1)], axis=1),
            np.concatenate([m.reshape(rows, -1), dmin.reshape(rows, -1)], axis=1))


def q5_0_codes(blocks: np.ndarray) -> np.ndarray:
    """The signed codes q - 16 (int8, -16..15) of ggml Q5_0 blocks [..., 22 bytes]: f16 d, 4 bytes
    of high bits (bit j of element j, little-endian), 16 bytes of low nibbles (element j in byte j's
    low nibble, element j + 16 in its high one), as ggml's dequantize_row_q5_0 reads them."""
    high = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little")  # [..., 32]: bit j = element j
    low = np.concatenate([blocks[..., 6:22] & 0x0F, blocks[..., 6:22] >> 4], axis=-1)
    return ((low | (high << 4)).astype(np.int16) - 16).astype(np.int8)


def q6k_from_ggml_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml Q6_K blocks uint8 [rows, super-blocks, 210] as storage.quant's q6k arrays (data,
    scales): the codes q - 32 one per int8, the int8 scales, then each d's f16 bytes. ggml's
    order, per 128 weights: byte l of its 64 low-nibble bytes holds element l (low nibble) and
    l + 64 (high); byte l of its 32 high-bit bytes holds bits 4-5 of elements l, l + 32, l + 64
    and l + 96 (bit pairs 0-1, 2-3, 4-5, 6-7), as dequantize_row_q6_K reads them."""
    rows, n_super, _ = blocks.shape
    ql = blocks[:, :, 0:128].reshape(rows, n_super, 2, 64)
    qh = blocks[:, :, 128:192].reshape(rows, n_super, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=3)  # [.., 2, 128]
    high = ((qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 0x03).reshape(rows, n_super, 2, 128)
    codes = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8).reshape(rows, -1)
    scales = blocks[:, :, 192:208].view(np.int8).reshape(rows, -1)
    d = blocks[:, :, 208:210].view(np.int8).reshape(rows, -1)
    return codes, np.concatenate([scales, d], axis=1)


def q6k_to_ggml_blocks(qt) -> np.ndarray:
    """A storage.quant q6k QuantizedTensor as ggml Q6_K blocks uint8 [rows, K / 256 * 210] (the
    inverse of q6k_from_ggml_blocks: what a GGUF writer stores)."""
    from storage import quant

    rows, k = qt.shape
    n_super, n_groups = k // quant.SUPER_BLOCK, k // quant.Q6K_GROUP
    q = (qt.data.astype(np.int16) + 32).astype(np.uint8).reshape(rows, n_super, 2, 128)
    low, high = q & 0x0F, (q >> 4).reshape(rows, n_super, 2, 4, 32)
    ql = (low[..., :64] | (low[..., 64:] << 4)).reshape(rows, n_super, 128)
    qh = (high[:, :, :, 0] | (high[:, :, :, 1] << 2) | (high[:, :, :, 2] << 4) | (high[:, :, :, 3] << 6))
    scales = qt.scales[:, :n_groups].view(np.uint8).reshape(rows, n_super, 16)
    d = qt.scales[:, n_groups:].view(np.uint8).reshape(rows, n_super, 2)
    return np.concatenate([ql, qh.reshape(rows, n_super, 64), scales, d], axis=2).reshape(rows, -1)


def q4k_to_ggml_blocks(qt) -> np.ndarray:
    """A storage.quant q4k QuantizedTensor as ggml Q4_K blocks uint8 [rows, K / 256 * 144] (the
    inverse of q4k_from_ggml_blocks: what a GGUF writer stores)."""
    from storage import quant

    rows, k = qt.shape
    n_super, n_groups = k // quant.SUPER_BLOCK, k // 32
    sc = qt.scales[:, :n_groups].reshape(rows, n_super, 8)
    m = qt.mins[:, :n_groups].reshape(rows, n_super, 8)
    packed = np.concatenate([sc[:, :, :4] | ((sc[:, :, 4:] >> 4) << 6), m[:, :, :4] | ((m[:, :, 4:] >> 4) << 6),
                             (sc[:, :, 4:] & 0x0F) | ((m[:, :, 4:] & 0x0F) << 4)], axis=2).astype(np.uint8)
    values = np.empty((rows, k), np.uint8)
    values[:, 0::2], values[:, 1::2] = qt.data & 0x0F, qt.data >> 4
    halves = values.reshape(rows, n_super, 4, 2, 32)
    qs = (halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)).reshape(rows, n_super, 128)
    d = qt.scales[:, n_groups:].reshape(rows, n_super, 2)
    dmin = qt.mins[:, n_groups:].reshape(rows, n_super, 2)
    return np.concatenate([d, dmin, packed, qs], axis=2).reshape(rows, -1)


def gguf_permute_rows(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute on whole heads: HF pairs element i of a
    head with i + head_dim/2 (rotate_half); llama.cpp's LLAMA rope pairs 2i with 2i+1."""
    n = rows.shape[0] // head_dim
    return rows.reshape(n, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_row_of_hf_row(hf_rows: np.ndarray, head_dim: int) -> np.ndarray:
    """The GGUF row holding HF row j of a permuted q/k matrix: the inverse of
    gguf_permute_rows as an index, so any range of HF rows reads only its own rows."""
    half = head_dim // 2
    within = hf_rows % head_dim
    return hf_rows - within + 2 * (within % half) + within // half


# ---- the file -----------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: `shape` in HF orientation, `offset`/`nbytes` of its data in the file."""

    name: str  # llama.cpp's name (errors speak of what the file holds)
    hf_name: str
    type_name: str  # GGMLQuantizationType name: "F16", "Q8_0", ...
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    path: Path
    block_size: int  # values per quantization block along a row (1 for float types)
    block_bytes: int


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the `gguf` package (llama.cpp's gguf-py): "
                              "pip install gguf") from None
    return gguf


class GGUFCheckpoint:
    """A GGUF file as the converter reads a checkpoint: `tensors` by HF name, `source`,
    `rows_f32`, `release`, `close`, plus `hf_config()` and `tokenizer_files()`."""

    def __init__(self, path: Path, metadata: dict, tensor_infos: list[tuple], big_endian: bool = False):
        self.path = self.source = path
        self.metadata = metadata  # every key/value of the file, as Python values
        self.big_endian = big_endian
        self.tensors: dict[str, GGUFTensor] = {}
        self.rope_freqs: np.ndarray | None = None  # Llama 3.1's rope scaling divisors, if the file has them
        self.head_dim = 0
        self.arch = "llama"  # general.architecture, once _check_model has accepted it
        self._tensor_infos = tensor_infos
        self._file = open(path, "rb")
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    @classmethod
    def open(cls, path: str | Path) -> "GGUFCheckpoint":
        gguf = _import_gguf()
        path = Path(path)
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
        if magic != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with the GGUF magic); "
                                  "expected a llama.cpp .gguf file or a Hugging Face model directory")
        try:
            check_header(path)  # bounds first: GGUFReader sizes its loops from the header's counts
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        try:
            # GGUFReader keeps a numpy view per array element (~1 KB each, 0.5 GB for Llama 3's
            # 128k tokens and 280k merges): take plain values and let it go before any tensor is read
            reader = gguf.GGUFReader(path)
            metadata = {k: f.contents() for k, f in reader.fields.items()}
            tensor_infos = [(t.name, t.tensor_type, [int(d) for d in t.shape], int(t.data_offset), int(t.n_bytes))
                            for t in reader.tensors]
            big_endian = reader.byte_order != "I"
            del reader
        except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
            # GGUFReader slices its memmap: a short file shows up as short arrays failing to
            # index or reshape; a tensor type id this gguf version does not know, as a ValueError
            if "GGMLQuantizationType" in str(e):
                raise CheckpointError(
                    f"{path}: a tensor has a type id the installed gguf package does not know ({e}); "
                    f"flashinfer converts {', '.join(SUPPORTED_TYPES)}") from None
            raise CheckpointError(f"{path}: damaged or truncated GGUF file ({path.stat().st_size} bytes), cannot "
                                  f"parse its header and tensor table{_reader_reason(e)}; re-download or re-export it"
                                  ) from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        ckpt = cls(path, metadata, tensor_infos, big_endian)
        try:
            ckpt._check_model()
            ckpt._index_tensors(gguf.GGML_QUANT_SIZES)
        except BaseException:
            ckpt.close()
            raise
        return ckpt

    def _check_model(self) -> None:
        """Refuse what the llama family cannot run, before anything is read."""
        if self.big_endian:
            raise CheckpointError(f"{self.path}: a big-endian GGUF file; flashinfer reads little-endian GGUF only")
        if int(self.meta("split.count", 1) or 1) > 1:
            raise CheckpointError(f"{self.path}: one part of a split GGUF (split.count={self.meta('split.count')}); "
                                  "merge the parts first (llama-gguf-split --merge)")
        arch = self.meta("general.architecture")
        if arch not in ARCHITECTURES:
            raise CheckpointError(f"{self.path}: GGUF architecture {arch!r} is not supported "
                                  f"(supported: {', '.join(ARCHITECTURES)})")
        self.arch = a = arch
        if int(self.meta(f"{a}.expert_count", 0) or 0) > 0:
            raise CheckpointError(f"{self.path}: a mixture-of-experts llama ({self.meta(f'{a}.expert_count')} "
                                  "experts) is not supported")
        dim, n_heads = self._need(f"{a}.embedding_length"), self._need(f"{a}.attention.head_count")
        n_kv_heads = self.meta(f"{a}.attention.head_count_kv", n_heads)
        if not all(isinstance(v, int) and v > 0 for v in (dim, n_heads, n_kv_heads)):
            raise CheckpointError(f"{self.path}: {a}.embedding_length, .attention.head_count and head_count_kv "
                                  f"must be positive integers, got {dim!r}, {n_heads!r}, {n_kv_heads!r} "
                                  "(per-layer head counts are not supported)")
        self.head_dim = self.meta(f"{a}.attention.key_length", dim // n_heads)
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise CheckpointError(f"{self.path}: {a}.attention.key_length (the head size) must be a positive even "
                                  f"integer, got {self.head_dim!r}")
        if int(self.meta(f"{a}.attention.value_length", self.head_dim)) != self.head_dim:
            raise CheckpointError(f"{self.path}: {a}.attention.value_length != key_length is not supported")
        rope_dims = int(self.meta(f"{a}.rope.dimension_count", self.head_dim))
        if rope_dims != self.head_dim:
            raise CheckpointError(f"{self.path}: rope on {rope_dims} of {self.head_dim} head dims "
                                  "(partial rotary) is not supported")

    def _index_tensors(self, quant_sizes) -> None:
        unknown = []
        for name, tensor_type, ne, offset, nbytes in self._tensor_infos:
            type_name = tensor_type.name
            if name == ROPE_FREQS:
                if type_name != "F32":
                    raise CheckpointError(f"{self.path}: tensor {name!r} has type {type_name}, expected F32")
                self.rope_freqs = np.frombuffer(self._mmap, np.float32, ne[0], offset).copy()
                continue
            hf = hf_name(name, self.arch)
            if hf is None:
                unknown.append(name)
                continue
            if type_name not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has type {type_name}, which flashinfer cannot convert "
                    f"(supported: {', '.join(SUPPORTED_TYPES)}); re-quantize the GGUF to Q8_0 or F16 "
                    "(llama-quantize) or convert the Hugging Face checkpoint instead")
            if len(ne) > 2:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {len(ne)} dims {ne}; expected at most 2")
            block_size, block_bytes = quant_sizes[tensor_type]
            self.tensors[hf] = GGUFTensor(name, hf, type_name, tuple(reversed(ne)), offset, nbytes, self.path,
                                          block_size, block_bytes)
        if unknown:
            shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            raise CheckpointError(f"{self.path}: {len(unknown)} tensor(s) that are not part of a plain llama "
                                  f"model flashinfer converts: {shown}")

    # ---- metadata -------------------------------------------------------------------
    def meta(self, key: str, default=None):
        return self.metadata.get(key, default)

    def _need(self, key: str):
        value = self.meta(key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
        return value

    def hf_config(self) -> dict:
        """config.json keys (as transformers writes them for LlamaForCausalLM, Qwen2ForCausalLM,
        Gemma3ForCausalLM) from the metadata."""
        a = self.arch
        n_heads = self._need(f"{a}.attention.head_count")
        tokens = self.meta("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens)
        elif "model.embed_tokens.weight" in self.tensors:
            vocab = self.tensors["model.embed_tokens.weight"].shape[0]
        else:
            raise CheckpointError(f"{self.path}: no token list and no token_embd.weight: cannot tell the vocab size")
        eos = self._end_token_ids()
        act = self.meta(FLASHINFER_ACT_KEY, "silu")  # llama.cpp's llama graph: always SiLU
        if a == "gemma3":
            return self._gemma3_config(vocab, eos)
        return {
            "architectures": [HF_ARCHITECTURES[a]],
            "model_type": a,
            "hidden_size": int(self._need(f"{a}.embedding_length")),
            "num_hidden_layers": int(self._need(f"{a}.block_count")),
            "intermediate_size": int(self._need(f"{a}.feed_forward_length")),
            "num_attention_heads": int(n_heads),
            "num_key_value_heads": int(self.meta(f"{a}.attention.head_count_kv", n_heads)),
            "head_dim": self.head_dim,
            "max_position_embeddings": int(self.meta(f"{a}.context_length", 2048)),
            "rms_norm_eps": _f32(self.meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": _f32(self.meta(f"{a}.rope.freq_base", 10000.0)),
            "rope_scaling": self._rope_scaling(),
            "sliding_window": self.meta(f"{a}.attention.sliding_window"),  # Mistral's; llama.cpp may ignore it
            "hidden_act": act,
            "vocab_size": vocab,
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.meta("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        }

    def _end_token_ids(self) -> list:
        """The EOS, EOT and EOM ids the metadata names, in that order, once each: llama.cpp ends
        generation at any of them (Llama 3 instruct: <|eot_id|>)."""
        ids = [self.meta(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def _gemma3_config(self, vocab: int, eos: list[int]) -> dict:
        """Gemma3ForCausalLM's config.json (model_type gemma3_text) from gemma3.* metadata, with what
        llama.cpp's gemma3 graph takes for granted: windowed layers between every 6th (global) one,
        their RoPE base 10000, queries scaled by head_dim**-0.5 (n_embd / n_head for the 62-layer
        27B), GELU-tanh."""
        a = "gemma3"
        n_layers, dim = int(self._need(f"{a}.block_count")), int(self._need(f"{a}.embedding_length"))
        n_heads = int(self._need(f"{a}.attention.head_count"))
        pattern = self.meta(f"{a}.attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
        if isinstance(pattern, list):  # one flag per layer (newer files)
            sliding = [bool(p) for p in pattern]
        else:
            sliding = [bool((i + 1) % int(pattern)) for i in range(n_layers)]
        full = {"rope_type": "default", "rope_theta": _f32(self.meta(f"{a}.rope.freq_base", 1_000_000.0))}
        if self._rope_scaling() is not None:
            full = {**full, **self._rope_scaling()}  # the arch module says which it runs
        window = self.meta(f"{a}.attention.sliding_window")
        return {
            "architectures": [HF_ARCHITECTURES[a]], "model_type": "gemma3_text", "hidden_size": dim,
            "num_hidden_layers": n_layers, "intermediate_size": int(self._need(f"{a}.feed_forward_length")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(self.meta(f"{a}.attention.head_count_kv", n_heads)),
            "head_dim": self.head_dim, "max_position_embeddings": int(self.meta(f"{a}.context_length", 131_072)),
            "rms_norm_eps": _f32(self.meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_parameters": {"full_attention": full,
                                "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE_BASE}},
            "sliding_window": int(window) if window else 4096,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "query_pre_attn_scalar": dim // n_heads if n_layers == 62 else self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh", "vocab_size": vocab,
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "bos_token_id": self.meta("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        }

    def _rope_scaling(self) -> dict | None:
        a = self.arch
        kind, factor = self.meta(f"{a}.rope.scaling.type"), self.meta(f"{a}.rope.scaling.factor")
        if kind is None and self.meta(f"{a}.rope.scale_linear") is not None:  # the key before rope.scaling.*
            kind, factor = "linear", self.meta(f"{a}.rope.scale_linear")
        if self.rope_freqs is not None:
            # convert_hf_to_gguf.py writes Llama 3.1's scaling only as the per-frequency
            # divisors: propose Llama 3's parameters; flashinfer/convert.py checks that they
            # reproduce the divisors before it trusts them
            original_ctx = int(self.meta(f"{a}.rope.scaling.original_context_length", 8192))
            return {"rope_type": "llama3", "factor": float(self.rope_freqs.max()), "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": original_ctx}
        if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": _f32(factor)}
        raise CheckpointError(f"{self.path}: rope scaling {kind!r} is not supported (supported: none, linear, "
                              "and Llama 3's rope_freqs)")

    # ---- tensor data ----------------------------------------------------------------
    def rows_f32(self, name: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        """HF tensor `name` (or a range of its rows / columns; of its elements for a vector) as
        float32 in HF orientation: dequantized, q/k rows un-permuted, never a view of the file.
        Touches only the bytes it needs."""
        t = self.tensors[name]
        if len(t.shape) == 1:
            n_rows, n_cols = 1, t.shape[0]
            rows, cols = None, rows if cols is None else cols
        else:
            n_rows, n_cols = t.shape
        r0, r1, _ = (rows or slice(None)).indices(n_rows)
        c0, c1, _ = (cols or slice(None)).indices(n_cols)
        if r1 <= r0 or c1 <= c0:
            return np.zeros((max(r1 - r0, 0), max(c1 - c0, 0)) if len(t.shape) == 2 else max(c1 - c0, 0), np.float32)
        data, picked = self._file_rows(t, n_rows, n_cols, r0, r1)
        b0, b1 = c0 // t.block_size, -(-c1 // t.block_size)  # whole blocks around the columns
        blocks = np.ascontiguousarray(picked[:, b0 * t.block_bytes : b1 * t.block_bytes])
        values = _dequantize(blocks, t.type_name)
        if np.may_share_memory(values, data):  # F32 comes back as a view of the mapping
            values = values.copy()
        values = values[:, c0 - b0 * t.block_size : c1 - b0 * t.block_size]
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            values = values - np.float32(GEMMA3_NORM_SHIFT)
        return values.reshape(-1) if len(t.shape) == 1 else values

    def kept_scheme(self, name: str) -> str | None:
        """The store scheme that holds tensor `name` exactly as the file does, or None."""
        return KEPT_SCHEMES.get(self.tensors[name].type_name)

    def fallback_scheme(self, name: str) -> str | None:
        """For a tensor no scheme keeps exactly: q8 where the file spends more than 4 bits a
        weight (Q5_1, Q5_K: a Q5_K_M file's), so --quant auto rounds it onto
        a finer grid than its own instead of a coarser one; None otherwise (the caller's default)."""
        return "q8" if self.tensors[name].type_name in MORE_THAN_4_BITS else None

    def rows_quantized(self, name: str, rows: slice | None = None):
        """Rows of 2-D tensor `name` (HF orientation, q/k un-permuted) as a storage.quant
        QuantizedTensor in kept_scheme(name), bit for bit the file's values: Q8_0 blocks are q8
        (the same int8 codes and f16 scale), Q5_0 blocks q8 too (q5_0_codes), Q4_K blocks q4k
        (q4k_from_ggml_blocks), Q6_K blocks q6k (q6k_from_ggml_blocks), Q4_0 blocks q4 and Q4_1 blocks q4a (the same nibbles, scales and
        mins; ggml puts element j and j+16 in byte j, the store 2j and 2j+1)."""
        from storage import quant

        t = self.tensors[name]
        scheme = self.kept_scheme(name)
        if scheme is None or len(t.shape) != 2:
            raise CheckpointError(f"{self.path}: tensor {t.name!r} ({t.type_name}) has no exact store scheme")
        n_rows, n_cols = t.shape
        r0, r1, _ = (rows or slice(None)).indices(n_rows)
        _, picked = self._file_rows(t, n_rows, n_cols, r0, r1)
        n = max(r1 - r0, 0)
        if scheme in ("f32", "f16"):
            values = np.ascontiguousarray(picked).view("<f4" if scheme == "f32" else "<f2").reshape(n, n_cols)
            return quant.QuantizedTensor(scheme, 0, (n, n_cols), values.copy(), None, None)
        if scheme == "q4k":
            data, scales, mins = q4k_from_ggml_blocks(np.ascontiguousarray(picked).reshape(n, -1, Q4_K_BLOCK_BYTES))
            return quant.QuantizedTensor("q4k", 32, (n, n_cols), data, scales, mins)
        if scheme == "q6k":
            data, scales = q6k_from_ggml_blocks(np.ascontiguousarray(picked).reshape(n, -1, Q6_K_BLOCK_BYTES))
            return quant.QuantizedTensor("q6k", quant.Q6K_GROUP, (n, n_cols), data, scales, None)
        blocks = np.ascontiguousarray(picked).reshape(n, n_cols // 32, t.block_bytes)
        scales = blocks[:, :, 0:2].copy().view("<f2")[:, :, 0]
        if t.type_name == "Q5_0":
            return quant.QuantizedTensor("q8", 32, (n, n_cols), q5_0_codes(blocks).reshape(n, n_cols), scales, None)
        if scheme == "q8":
            codes = blocks[:, :, 2:].copy().view(np.int8).reshape(n, n_cols)
            return quant.QuantizedTensor("q8", 32, (n, n_cols), codes, scales, None)
        mins = blocks[:, :, 2:4].copy().view("<f2")[:, :, 0] if scheme == "q4a" else None
        packed = blocks[:, :, 4 if scheme == "q4a" else 2:]  # [n, groups, 16]
        values = np.concatenate([packed & 0x0F, packed >> 4], axis=2)  # elements 0..15, then 16..31
        return quant.QuantizedTensor(scheme, 32, (n, n_cols), quant.pack_nibbles(values.reshape(n, n_cols)), scales, mins)

    def _file_rows(self, t, n_rows: int, n_cols: int, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """(the tensor's bytes in the mapping [n_rows, row bytes], its rows r0..r1-1 in HF order:
        q/k rows un-permuted, the others a view)."""
        row_bytes = n_cols // t.block_size * t.block_bytes
        data = np.frombuffer(self._mmap, np.uint8, n_rows * row_bytes, t.offset).reshape(n_rows, row_bytes)
        if self.arch == "llama" and t.name.endswith(PERMUTED):
            return data, data[gguf_row_of_hf_row(np.arange(r0, r1), self.head_dim)]
        return data, data[r0:r1]

    def release(self, name: str) -> None:
        """Drop a tensor's pages from RSS and the page cache (see storage/safetensors.py)."""
        t = self.tensors[name]
        start = t.offset - t.offset % mmap.PAGESIZE
        length = t.offset + t.nbytes - start
        if length <= 0:
            return
        if hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, length)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file.fileno(), start, length, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        # arrays handed out are copies, so the mapping can go
        try:
            self._mmap.close()
        except BufferError:  # a view is still alive somewhere: leave the mapping to the GC
            pass
        self._file.close()

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- tokenizer ------------------------------------------------------------------
    def tokenizer_files(self) -> tuple[str, dict]:
        """(tokenizer.json text, tokenizer_config.json dict) rebuilt from tokenizer.ggml.*:
        "gpt2" (byte-level BPE from tokens + merges) and "llama" (SentencePiece BPE from
        tokens + scores, with byte fallback) as transformers' converters write them."""
        tokens = self.meta("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError(f"{self.path}: no tokenizer in the GGUF (tokenizer.ggml.tokens); "
                                  "pass --tokenizer DIR with the model's tokenizer.json")
        embedded = self.meta("tokenizer.huggingface.json")
        kind = self.meta("tokenizer.ggml.model")
        types = self.meta("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        self._check_vocabulary(tokens, types, embedded)
        if embedded is not None:
            tokenizer_json = embedded
        elif kind in ("gpt2", "llama"):
            try:
                tokenizer_json = (self._bpe_tokenizer if kind == "gpt2" else self._spm_tokenizer)(tokens, types)
            except CheckpointError:
                raise
            except Exception as e:  # tokenizers raises plain Exceptions from Rust
                raise CheckpointError(f"{self.path}: its vocabulary does not make a tokenizer ({e}); the file's "
                                      "tokenizer metadata is damaged, or pass --tokenizer DIR") from None
        else:
            raise CheckpointError(f"{self.path}: tokenizer.ggml.model {kind!r} cannot be rebuilt as tokenizer.json "
                                  f"(supported: {', '.join(SUPPORTED_TOKENIZERS)}); "
                                  "pass --tokenizer DIR with the model's tokenizer.json")
        return tokenizer_json, self.tokenizer_config(tokens)

    def tokenizer_config(self, tokens: list[str] | None = None) -> dict:
        """tokenizer_config.json: the BOS/EOS/UNK strings, whether to prepend BOS, the chat template."""
        tokens = tokens if tokens is not None else self.meta("tokenizer.ggml.tokens") or []

        def token(key: str) -> str | None:
            i = self.meta(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        # llama.cpp prepends BOS by default for SentencePiece vocabularies, and for BPE ones of the
        # pre-tokenizer types that say so (Llama 3's, Tekken's, Chameleon's)
        kind = self.meta("tokenizer.ggml.model")
        pre = BPE_PRE_TOKENIZERS.get(self.meta("tokenizer.ggml.pre", "default"))
        bpe_bos = kind == "gpt2" and pre is not None and pre.add_bos
        add_bos = self.meta("tokenizer.ggml.add_bos_token", kind == "llama" or bpe_bos)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("bos"), "eos_token": token("eos"),
                  "unk_token": token("unknown"), "add_bos_token": bool(add_bos),
                  "model_max_length": int(self.meta(f"{self.arch}.context_length", 2048))}
        template = self.meta("tokenizer.chat_template")
        if template is not None:
            config["chat_template"] = template
        return {k: v for k, v in config.items() if v is not None}

    def generation_config(self) -> dict:
        """generation_config.json: the end-of-generation ids as llama.cpp finds them (llama-vocab.cpp):
        the EOS, EOT and EOM ids of the metadata, and control tokens spelled as a known end of turn
        (a chat model's <|im_end|> ends its turn while its EOS may be <|endoftext|>)."""
        tokens = self.meta("tokenizer.ggml.tokens") or []
        types = self.meta("tokenizer.ggml.token_type") or []
        ids = {i for i in self._end_token_ids() if isinstance(i, int) and 0 <= i < len(tokens)}
        ids |= {i for i, (text, kind) in enumerate(zip(tokens, types)) if kind == TOKEN_CONTROL and text in END_OF_TURN}
        return {"eos_token_id": sorted(ids)} if ids else {}

    def _check_vocabulary(self, tokens, types, embedded) -> None:
        """tokenizer.ggml.* of the types the rebuilders read: a list of strings, one int type
        per token, merges as strings, one float score per token."""
        def bad(key: str, what: str):
            raise CheckpointError(f"{self.path}: metadata {key} must be {what}; the file's tokenizer metadata "
                                  "is damaged (re-download it, or pass --tokenizer DIR)")

        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            bad("tokenizer.ggml.tokens", "a list of strings")
        if not isinstance(types, list) or len(types) != len(tokens) or not all(isinstance(t, int) for t in types):
            bad("tokenizer.ggml.token_type", f"{len(tokens)} integers, one per token")
        merges = self.meta("tokenizer.ggml.merges")
        if merges is not None and (not isinstance(merges, list) or not all(isinstance(m, str) for m in merges)):
            bad("tokenizer.ggml.merges", "a list of strings")
        scores = self.meta("tokenizer.ggml.scores")
        if scores is not None and (not isinstance(scores, list) or len(scores) != len(tokens)
                                   or not all(isinstance(v, (int, float)) for v in scores)):
            bad("tokenizer.ggml.scores", f"{len(tokens)} numbers, one per token")
        if embedded is not None and not isinstance(embedded, str):
            bad("tokenizer.huggingface.json", "a string")

    def _bpe_tokenizer(self, tokens: list[str], types: list[int]) -> str:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        pre = self.meta("tokenizer.ggml.pre", "default")  # llama.cpp's choice for a file without the key
        if pre in UNSUPPORTED_PRE_TOKENIZERS:
            raise CheckpointError(
                f"{self.path}: BPE pre-tokenizer tokenizer.ggml.pre={pre!r} cannot be rebuilt as tokenizer.json "
                f"({UNSUPPORTED_PRE_TOKENIZERS[pre]}); pass --tokenizer DIR with the model's tokenizer.json")
        if pre not in BPE_PRE_TOKENIZERS:
            raise CheckpointError(
                f"{self.path}: BPE pre-tokenizer tokenizer.ggml.pre={pre!r} is not known to flashinfer "
                f"(storage/gguf.py BPE_PRE_TOKENIZERS lists the {len(BPE_PRE_TOKENIZERS)} of llama.cpp's it rebuilds); "
                "pass --tokenizer DIR with the model's tokenizer.json")
        pre_type = BPE_PRE_TOKENIZERS[pre]
        merges = []
        for m in self.meta("tokenizer.ggml.merges") or []:
            pair = m.split(" ")
            if len(pair) != 2:
                raise CheckpointError(f"{self.path}: tokenizer.ggml.merges entry {m!r} is not 'left right'")
            merges.append((pair[0], pair[1]))
        model = models.BPE(vocab=_vocab(tokens), merges=merges, ignore_merges=pre_type.ignore_merges)
        tok = Tokenizer(model)
        splits = BPE_PRE_SPLITS[pre_type.llama_type]
        if splits is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            splits = [(s, "isolated") if isinstance(s, str) else s for s in splits]
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(regex), behavior=behavior, invert=False) for regex, behavior in splits]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        _add_special(tok, tokens, types)
        return tok.to_str(pretty=True)

    def _spm_tokenizer(self, tokens: list[str], types: list[int]) -> str:
        """transformers' LlamaConverter (legacy normalizer, as llama.cpp tokenizes: a space
        before the text and after every special token)."""
        from tokenizers import Tokenizer, decoders, models, normalizers

        scores = self.meta("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise CheckpointError(f"{self.path}: a SentencePiece vocabulary needs tokenizer.ggml.scores, "
                                  "one per token")
        unk_id = self.meta("tokenizer.ggml.unknown_token_id")
        if unk_id is None:
            unk_id = next((i for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
        model = models.BPE(vocab=_vocab(tokens), merges=spm_merges(tokens, scores),
                           unk_token=None if unk_id is None else tokens[unk_id], fuse_unk=True, byte_fallback=True)
        tok = Tokenizer(model)
        add_prefix = bool(self.meta("tokenizer.ggml.add_space_prefix", True))
        replace = normalizers.Replace(" ", "▁")
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if add_prefix else replace
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
        _add_special(tok, tokens, types)
        return tok.to_str(pretty=True)


def _reader_reason(e: Exception) -> str:
    """GGUFReader's own message when it raised one on purpose ("Sorry, file appears to be
    version 9 ..."); nothing when numpy failed on a short array (that says only "truncated")."""
    frames = traceback.extract_tb(e.__traceback__)
    return f" ({e})" if frames and (frames[-1].line or "").startswith("raise") else ""


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _dequantize(blocks: np.ndarray, type_name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(blocks, GGMLQuantizationType[type_name])


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id (the model never emits the others)
    return vocab


def _add_special(tok, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens are special (never split, skipped in decoding); user-defined
    ones are matched whole in text, as llama.cpp does."""
    from tokenizers import AddedToken

    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE vocabulary, as transformers' generate_merges makes
    them: every split (l, r) of a piece into two pieces, ranked by the piece's score (the
    higher the earlier; llama.cpp's SPM tokenizer merges the best-scoring pair first too)."""
    vocab = _vocab(tokens)
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]
