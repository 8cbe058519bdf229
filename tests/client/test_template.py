"""LLaVA's `plain` template: fedcmp's sequences and labels equal LLaVA's own, token by token.

The reference below restates LLaVA's published stage-1 rules (`preprocess_plain` with
`conv_llava_plain`, `tokenizer_image_token`, and the image expansion of
`prepare_inputs_labels_for_multimodal`) for any tokenizer; the Vicuna-style tokenizer is a
Llama BPE with byte fallback built here (Llama's layout: <unk> 0, <s> 1, </s> 2, the 256 byte
tokens from 3, so "\\n" is <0x0A> = 13, BOS added, no EOS).
"""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from fedcmp.client.template import IGNORE_INDEX, PlainTemplate

IMAGE_TOKEN_ID = 999  # the id fedcmp gives <image> in these sequences
NUM_IMAGE_TOKENS = 5  # P: features per image
CAPTIONS = [
    "a red square on the left.",
    "the big blue circle",
    "zebra crossing, Ünïcode ✓",  # words the vocabulary lacks: byte fallback
    "a red",
]
WORDS = ["a", "red", "square", "on", "the", "left", "big", "blue", "circle", "."]


def vicuna_style_tokenizer() -> LlamaTokenizer:
    """A Llama/Vicuna tokenizer in miniature: SentencePiece-style BPE, byte fallback, BOS, no EOS."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{byte:02X}>": 3 + byte for byte in range(256)}
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        piece = "▁" if word != "." else ""
        for char in word:
            vocab.setdefault(char, len(vocab))
            if piece:
                vocab.setdefault(piece, len(vocab))
                merges.append((piece, char))
            piece += char
        vocab.setdefault(piece, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), add_bos_token=True, add_eos_token=False)


def gpt2_style_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE that adds no special token (GPT-2, Qwen): no BOS in the template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CAPTIONS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def llava_plain_reference(caption: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """LLaVA's stage-1 (input_ids, labels) of one caption, after the image is expanded to P positions.

    The text is "<image>" + caption + "\\n"; it is split at "<image>", every chunk tokenized with
    the tokenizer's defaults; when the first chunk starts with BOS, BOS is kept once at the front
    and dropped from every chunk; the image placeholder goes between the chunks; labels ignore as
    many leading positions as "<image>" alone tokenizes to. The placeholder then becomes P image
    positions, all ignored.
    """
    placeholder = -200
    chunks = [tokenizer(chunk)["input_ids"] for chunk in ("<image>" + caption + "\n").split("<image>")]
    bos = tokenizer.bos_token_id
    offset = 1 if chunks[0][:1] == [bos] and bos is not None else 0
    ids: list[int] = [bos] if offset else []
    for index, chunk in enumerate(chunks):
        if index > 0:
            ids.append(placeholder)
        ids.extend(chunk[offset:])
    masked = len([bos] if offset else []) + 1  # "<image>" alone: [BOS] + placeholder
    labels = [IGNORE_INDEX] * masked + ids[masked:]
    at = ids.index(placeholder)
    expanded_ids = ids[:at] + [IMAGE_TOKEN_ID] * NUM_IMAGE_TOKENS + ids[at + 1 :]
    expanded_labels = labels[:at] + [IGNORE_INDEX] * NUM_IMAGE_TOKENS + labels[at + 1 :]
    return expanded_ids, expanded_labels


def _fedcmp_sequences(tokenizer: PreTrainedTokenizerBase) -> list[tuple[list[int], list[int]]]:
    template = PlainTemplate(tokenizer, max_caption_tokens=64)
    input_ids, attention_mask, labels = template.llava_inputs(
        *template.encode(CAPTIONS), IMAGE_TOKEN_ID, NUM_IMAGE_TOKENS
    )  # [B, T] each, right-padded
    lengths = attention_mask.sum(dim=1).tolist()
    return [(input_ids[row, :n].tolist(), labels[row, :n].tolist()) for row, n in enumerate(lengths)]


@pytest.mark.parametrize("make_tokenizer", [vicuna_style_tokenizer, gpt2_style_tokenizer])
def test_sequences_and_labels_equal_llavas(make_tokenizer) -> None:
    tokenizer = make_tokenizer()
    for caption, ours in zip(CAPTIONS, _fedcmp_sequences(tokenizer)):
        assert ours == llava_plain_reference(caption, tokenizer), caption


def test_vicuna_style_layout_spelled_out() -> None:
    tokenizer = vicuna_style_tokenizer()
    pieces = tokenizer.convert_tokens_to_ids(["▁a", "▁red", "<0x0A>"])
    assert pieces[2] == 13  # "\n" is Llama's byte token <0x0A>
    input_ids, labels = _fedcmp_sequences(tokenizer)[3]  # "a red"
    image = [IMAGE_TOKEN_ID] * NUM_IMAGE_TOKENS
    assert input_ids == [1, *image, *pieces]  # BOS, the image, caption, separator; no </s>
    assert labels == [IGNORE_INDEX] * (1 + NUM_IMAGE_TOKENS) + pieces


def test_no_bos_when_the_tokenizer_adds_none() -> None:
    template = PlainTemplate(gpt2_style_tokenizer(), max_caption_tokens=64)
    assert template.prefix_ids == []
    assert PlainTemplate(vicuna_style_tokenizer(), max_caption_tokens=64).prefix_ids == [1]


def test_padding_and_truncation() -> None:
    template = PlainTemplate(vicuna_style_tokenizer(), max_caption_tokens=3)
    caption_ids, caption_mask = template.encode(["a red square on the left.", "a"])
    assert caption_ids.shape == (2, 3)
    assert caption_mask.tolist() == [[1, 1, 1], [1, 1, 0]]  # "▁a <0x0A>" + a pad
    _, _, labels = template.llava_inputs(caption_ids, caption_mask, IMAGE_TOKEN_ID, NUM_IMAGE_TOKENS)
    assert labels[1, -1].item() == IGNORE_INDEX  # a pad is never supervised
    assert torch.equal(labels[0, -3:], caption_ids[0])
