"""Random models written to disk, for tests and benchmarks: a GGUF file or a Hugging Face folder.

`write_gguf` makes a complete, runnable GGUF: real metadata, a small byte-level (gpt2) tokenizer
with ChatML special tokens and a chat template, and random weights in any type lowgear reads.
`write_hf` makes config.json + safetensors (+ tokenizer.json) the way a Hugging Face checkpoint
looks. Both generate and write one tensor at a time, so real shapes (Llama-3-8B: hidden 4096, 32
layers, 32/8 heads, ffn 14336, vocab 128256) are writable without holding the model in memory;
big writes show a tqdm bar.

Quantized tensors are made by gguf-py's quantizer from random normal weights when it has one for
the type and the tensor is small (< QUANTIZE_MAX_ELEMENTS); otherwise as random well-formed
blocks (random bits, scales chosen so weights have about the requested std) — fast enough for an
8B model. A tensor whose row length is not a whole number of blocks is stored as F16 instead, as
llama.cpp's quantizer does.

For llama/mistral GGUFs real files have q/k rows permuted (llama.cpp's converter, for its
interleaved RoPE); random weights have no "unpermuted" original, so nothing is permuted here, and
the GGUF and HF writers do not produce the same model from the same seed.

This module does not import transformers (`lowgear bench` uses it at runtime).
"""

from .common import SCALE_FIELDS, WEIGHT_STD, ByteVocab, byte_alphabet, byte_vocab, random_blocks
from .gguf_writer import write_gguf, write_gguf_tokenizer
from .hf_writer import hf_tokenizer_json, write_hf, write_hf_tokenizer

__all__ = ["SCALE_FIELDS", "WEIGHT_STD", "ByteVocab", "byte_alphabet", "byte_vocab", "hf_tokenizer_json",
           "random_blocks", "write_gguf", "write_gguf_tokenizer", "write_hf", "write_hf_tokenizer"]
