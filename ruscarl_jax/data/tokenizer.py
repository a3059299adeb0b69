"""A tiny Qwen-style tokenizer trained on a given corpus, for tests and the tiny CPU config.

It mirrors the pieces of a Qwen2.5 tokenizer that the rest of the framework relies on: byte-level BPE
behind Qwen2's pre-tokenisation regex (so any text, in any script, round-trips), the special tokens
`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, and a ChatML chat template rendered by `transformers`.
Everything is built locally with the `tokenizers` library; nothing is downloaded.

Deliberate difference from Qwen2.5's template: it never inserts a default system message ("You are
Qwen, ..."/"You are a helpful assistant.") when the conversation has none. The rendered prompt is
exactly the given messages, so tests can check what the scaffold added and nothing else.
"""
from __future__ import annotations

from typing import Iterable

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

# Qwen2's pre-tokenisation split (contractions, letter runs, single digits, punctuation runs, newlines,
# whitespace). A fact about the Qwen2 tokenizer, reproduced so the tiny tokenizer segments text alike.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, one turn per message, no default system message; `add_generation_prompt` opens an
# assistant turn. Roles other than system/user/assistant are rejected at render time.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_NUM_BYTES = 256


def build_tiny_tokenizer(
    corpus: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` and wrap it as a Qwen-style Hugging Face tokenizer.

    The vocabulary holds the 256 byte symbols, the merges learned from the corpus (up to
    `vocab_size` in total) and the three special tokens (ids 0, 1, 2). `<|endoftext|>` is both pad and
    eos. The same corpus and arguments always give the same ids. The result supports
    `apply_chat_template(..., add_generation_prompt=True)`, `save_pretrained` and reloading with
    `transformers.AutoTokenizer.from_pretrained`.
    """
    minimum = _NUM_BYTES + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + 3 special tokens), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(iter(corpus), trainer=trainer)
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
