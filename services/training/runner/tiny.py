"""Test and benchmark support: a tiny random BERT with a WordPiece tokenizer trained offline, saved as a Hugging Face
model directory, and an easy synthetic classification dataset whose label is decided by a keyword."""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

__all__ = ["KEYWORDS", "build_tiny_bert", "keyword_dataset", "to_csv", "to_jsonl"]

# Each label's keywords; a sentence carries exactly one keyword among neutral filler words.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "positive": ("wonderful", "excellent", "delightful", "superb"),
    "negative": ("terrible", "awful", "dreadful", "horrible"),
    "neutral": ("scheduled", "located", "measured", "listed"),
}
_FILLER = (
    "the train the meeting a report this morning our team that package my phone the weather a new office "
    "the garden his book her car their house some coffee the river an email the market yesterday today "
    "was is seemed looked felt really quite rather very and then also"
).split()


def keyword_dataset(count: int, seed: int = 0, labels: Sequence[str] = tuple(KEYWORDS)) -> list[tuple[str, str]]:
    """(text, label) rows, balanced over labels; the label is recoverable from one keyword in the text."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = labels[i % len(labels)]
        words = [rng.choice(_FILLER) for _ in range(rng.randint(4, 12))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(KEYWORDS[label]))
        rows.append((" ".join(words), label))
    rng.shuffle(rows)
    return rows


def to_csv(rows: Iterable[tuple[str, str]], text_column: str = "text", label_column: str = "label") -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([text_column, label_column])
    writer.writerows(rows)
    return out.getvalue().encode()


def to_jsonl(rows: Iterable[tuple[str, str]], text_column: str = "text", label_column: str = "label") -> bytes:
    return "".join(json.dumps({text_column: t, label_column: y}) + "\n" for t, y in rows).encode()


def build_tiny_bert(
    directory: Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 128,
    seed: int = 0,
) -> Path:
    """A randomly initialised BertModel and a WordPiece tokenizer trained on texts, loadable with from_pretrained
    like any downloaded base model (config.json, model.safetensors, tokenizer files). Takes about a second."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    directory.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_position_embeddings,
    ).save_pretrained(directory)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.token_to_id("[PAD]"),
    )
    # A seeded fork: building the model must not move the caller's global RNG.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(directory)
    return directory
