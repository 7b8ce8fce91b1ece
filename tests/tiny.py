"""Tiny random causal LMs for unit tests: a 2-layer Llama and a BPE tokenizer trained on the spot.

Unit tests must not need a model hub or a packaged model, and must run in seconds on one CPU core.
:func:`make_tiny_llama` writes a folder that ``transformers.AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load like any real chat model:

- a byte-level BPE tokenizer trained on a small built-in corpus (plus any text the test passes), so
  every string encodes, JSON punctuation included, with ChatML special tokens and a ChatML chat
  template (the template SmolLM2 and Qwen use, so prompt/completion splitting behaves the same);
- a Llama with random weights (2 layers, hidden size 32 by default) whose vocabulary matches the
  tokenizer.

Building takes well under a second; :func:`tiny_llama` caches one folder per process so that tests
can copy it instead of rebuilding.

Example::

    from tests.tiny import make_tiny_llama
    path = make_tiny_llama(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: ChatML, as SmolLM2-Instruct and Qwen2.5 write it (without their default system prompts)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

_CORPUS = [
    '{"user_query": "how do vaccines train the immune system", "positive_document": "Vaccines expose',
    ' the body to a harmless part of a pathogen.", "hard_negative_document": "Vitamins support health."}',
    '{"input_text": "The battery died after two days.", "label": "negative", "misleading_label": "positive"}',
    '{"S1": "A man plays a guitar.", "S2": "Someone is playing guitar.", "S3": "A man sells a guitar."}',
    '{"reason": "Candidate 2 follows the task; candidate 4 copies the query.", "best": 2, "worst": 4}',
    '{"reason": "The document was too short.", "revised": {"input": "text", "positive_document": "text"}}',
    "List five distinct retrieval tasks tied to the topic below, one sentence each, saying what the "
    "query is and what the documents are: match a hiking question to trail reports, or a recipe name "
    "to cooking instructions.",
    "Write one example of the task as a JSON object with these fields: the query a user would type, a "
    "document that answers it, and a document that looks relevant but does not.",
    "Classify the sentiment of a product review. Given a news headline, find articles on the same event.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>-_/\\@#$%^&*+=~`|",
    "system user assistant Instruct: Query: Candidate worst best reason revised task topic",
]


def build_tokenizer(extra_text: Iterable[str] = (), vocab_size: int = 512):
    """A fast byte-level BPE tokenizer with ChatML tokens and template.

    Args:
        extra_text: more text to train on (makes the test's own strings shorter in tokens).
        vocab_size: target vocabulary size, special tokens included.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with eos ``<|im_end|>`` and pad ``<pad>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*_CORPUS, *extra_text], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 20  # tests may use long synthetic texts
    return fast


def make_tiny_llama(
    path: str | Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    extra_text: Iterable[str] = (),
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a tiny random Llama chat model (weights, config, tokenizer) into ``path``.

    Args:
        path: the folder to create (parents too); existing files are overwritten.
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: attention heads (also the key/value heads).
        extra_text: more tokenizer training text.
        vocab_size: tokenizer vocabulary size.
        seed: torch seed of the random weights.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(extra_text, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=16384,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


_CACHED: Path | None = None


def tiny_llama(dest: str | Path | None = None) -> Path:
    """A tiny Llama folder built once per process; copied to ``dest`` when given.

    Tests that train should pass ``dest`` (their ``tmp_path``) so that they never share weights.
    """
    global _CACHED
    if _CACHED is None or not _CACHED.exists():
        _CACHED = make_tiny_llama(Path(tempfile.mkdtemp(prefix="speed-tiny-")) / "tiny-llama")
    if dest is None:
        return _CACHED
    dest = Path(dest)
    shutil.copytree(_CACHED, dest, dirs_exist_ok=True)
    return dest


#: plain words the tests build their sentences from
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "bird",
    "fish",
    "sat",
    "on",
    "mat",
    "tree",
    "sun",
    "rises",
    "in",
    "east",
    "water",
    "is",
    "wet",
    "fire",
    "hot",
    "ice",
    "cold",
    "what",
    "where",
    "who",
    "why",
    "how",
    "does",
    "do",
    "are",
    "sky",
    "blue",
    "grass",
    "green",
    "red",
    "car",
    "fast",
    "slow",
    "big",
    "small",
    "house",
    "river",
    "flows",
    "sea",
    "find",
]

#: a word-level vocabulary big enough for the tests' instructions, queries and labels
BERT_WORDS = [
    "instruct",
    "query",
    "documents",
    "for",
    "task",
    "positive",
    "document",
    "number",
    "hard",
    "negative",
    "about",
    *WORDS,
]


def make_tiny_bert(folder: str | Path, words: Iterable[str] = ()) -> Path:
    """A 2-layer BERT (random weights, hidden size 32) with a word-level vocabulary built here.

    Args:
        folder: where to save the model and tokenizer.
        words: extra vocabulary beside :data:`BERT_WORDS`, digits and punctuation.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = list(dict.fromkeys([*specials, *BERT_WORDS, *words, ":", ".", "?", *map(str, range(20))]))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    folder = Path(folder)
    BertModel(cfg).save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder


#: the vocabulary of :func:`bow_model`
BOW_WORDS = [
    "cat",
    "dog",
    "mat",
    "tree",
    "sun",
    "moon",
    "rain",
    "snow",
    "river",
    "sea",
    "ship",
    "car",
    "road",
    "bread",
    "milk",
    "cheese",
    "apple",
    "pear",
    "king",
    "queen",
    "castle",
    "sword",
    "gold",
    "coin",
    "book",
    "page",
    "ink",
    "pen",
    "lamp",
    "light",
    "night",
    "star",
]


def bow_model(words: Iterable[str] = BOW_WORDS) -> Any:
    """A SentenceTransformer whose embedding is the mean of one-hot word vectors (no training)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    import numpy as np

    weights = np.eye(len(vocab), dtype=np.float32)
    weights[0] = 0.0  # unknown words count for nothing
    return SentenceTransformer(modules=[StaticEmbedding(tok, embedding_weights=weights)], device="cpu")
