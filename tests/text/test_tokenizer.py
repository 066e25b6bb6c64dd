"""Server-side tokenization: texts grouped by length run with less padding and come back in their own order."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from app.text.tokenizer import GROUP_SPREAD, PAD_TO_MULTIPLE, TextTokenizer

WORDS = "the quick brown fox jumps over a lazy dog while seven tired owls watch from an old oak tree".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    """A WordPiece tokenizer trained here, with BERT's [CLS] ... [SEP] around every text."""
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.pre_tokenizer = pre_tokenizers.Whitespace()
    trained.train_from_iterator([" ".join(WORDS)] * 20, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    trained.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", trained.token_to_id("[CLS]")),
                                                 ("[SEP]", trained.token_to_id("[SEP]"))])
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    trained.save(str(path))
    return TextTokenizer(path, inputs=["input_ids", "attention_mask", "token_type_ids"], max_length=128, pad_id=0)


def _texts() -> list[str]:
    rng = np.random.default_rng(0)
    # Mostly sentences of a few to 40 words, and two past the model's 128 tokens (as real requests come).
    sizes = [*rng.integers(3, 40, size=30), 150, 300]
    return [" ".join(rng.choice(WORDS, size=int(n))) for n in rng.permutation(sizes)]


def test_groups_hold_texts_of_similar_length_and_every_text_once(tokenizer: TextTokenizer) -> None:
    texts = _texts()
    groups = tokenizer.encode_grouped(texts)
    assert sorted(i for indexes, _ in groups for i in indexes) == list(range(len(texts)))
    assert len(groups) > 1
    for indexes, encoded in groups:
        rounded = [min(128, -(-t // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE) for t in encoded.tokens]
        assert max(rounded) <= GROUP_SPREAD * min(rounded)
        alone = tokenizer.encode([texts[i] for i in indexes])
        for name, array in alone.feeds.items():
            np.testing.assert_array_equal(encoded.feeds[name], array)
    padded = sum(e.feeds["input_ids"].size for _, e in groups)
    assert padded < 0.8 * tokenizer.encode(texts).feeds["input_ids"].size  # less padding computed


def test_merged_groups_are_the_batch_as_one_in_the_texts_order(tokenizer: TextTokenizer) -> None:
    texts = _texts()
    whole, merged = tokenizer.encode(texts), tokenizer.merged(tokenizer.encode_grouped(texts))
    for name, array in whole.feeds.items():
        np.testing.assert_array_equal(merged.feeds[name], array)
    assert merged.tokens == whole.tokens and merged.truncated == whole.truncated
    assert merged.offsets == whole.offsets and merged.special == whole.special
    assert whole.truncated  # texts over 128 tokens are cut, and reported under their own index


def test_one_text_is_one_group(tokenizer: TextTokenizer) -> None:
    [(indexes, encoded)] = tokenizer.encode_grouped(["the fox"])
    assert indexes == [0] and encoded.feeds["input_ids"].shape == (1, PAD_TO_MULTIPLE)
