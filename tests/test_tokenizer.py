"""The tiny Qwen-style tokenizer: special tokens, byte-level round trips, ChatML template, save / load."""
from __future__ import annotations

import jinja2
import pytest
import transformers

from ruscarl_jax.data.tokenizer import build_tiny_tokenizer

CORPUS = [
    "The patient should drink water and rest. The doctor recommends rest.",
    "Compute the integral of x^2 from 0 to 3; the answer is 9.",
    "Les enfants jouent au football tous les jours.",
    "日本語のテキストも少し含めます。",
] * 30

TEXTS = [
    "Hello, world! The answer is 42.\n\nNew paragraph\twith a tab.",
    "Ünïcödé façade — naïve café, 日本語, emoji 🙂🚀, and a zero-width\u200bspace.",
    "  leading and trailing spaces  ",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(CORPUS, vocab_size=400)


def test_special_tokens(tok):
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == 0
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1 and ids.count(2) == 1
    assert tok("plain text")["input_ids"] == tok("plain text", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert all(0 <= i < len(tok) for i in ids)


def test_learns_merges_from_the_corpus(tok):
    assert len(tok) <= 400
    # "The" and " rest" are frequent in the corpus: single tokens, unlike text never seen
    assert len(tok(" rest", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok("The", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok(" zxqv", add_special_tokens=False)["input_ids"]) >= 4


def test_deterministic():
    a = build_tiny_tokenizer(CORPUS, vocab_size=400)
    b = build_tiny_tokenizer(list(CORPUS), vocab_size=400)
    assert a.get_vocab() == b.get_vocab()
    for text in TEXTS + CORPUS[:4]:
        assert a(text)["input_ids"] == b(text)["input_ids"]


def test_chat_template_is_chatml_without_default_system(tok):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}]
    expected = ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                "<|im_start|>user\nBye<|im_end|>\n")
    assert tok.apply_chat_template(conv, tokenize=False) == expected
    assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
        expected + "<|im_start|>assistant\n"
    with_system = [{"role": "system", "content": "Be brief."}] + conv
    assert tok.apply_chat_template(with_system, tokenize=False) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n" + expected


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(jinja2.TemplateError, match="unknown chat role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    conv = [{"role": "user", "content": TEXTS[1]}]
    assert again.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    for text in TEXTS:
        assert again(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert again.eos_token_id == again.pad_token_id == 0
    assert again.convert_tokens_to_ids("<|im_end|>") == 2


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        build_tiny_tokenizer(CORPUS, vocab_size=100)
