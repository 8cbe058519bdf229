"""LLaVA's `plain` pretraining template (stage 1), token for token.

LLaVA's `preprocess_plain` with the `plain` conversation (separator "\\n") turns an image-caption
pair into the text `<image>` + caption + "\\n", tokenizes it with `tokenizer_image_token` and masks
the labels of everything up to and including the image:

    input_ids  [BOS]? <image>*P  caption tokens...  separator tokens...
    labels     -100   -100*P     caption tokens...  separator tokens...

BOS is there when the tokenizer starts every text with it (Llama/Vicuna do, GPT-2-style
tokenizers do not); nothing is appended (no `</s>`), and the caption is tokenized together with
its separator exactly as LLaVA tokenizes the chunk after `<image>` (the tokenizer's own leading
BOS of that chunk dropped). The template owns that text side; `ProjectorMLLM.caption_nll` puts
the projected image features between `prefix_ids` and the caption ids.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

PLAIN_SEPARATOR = "\n"  # conv_llava_plain.sep
IGNORE_INDEX = -100  # labels that no position is trained to predict


class PlainTemplate:
    """Tokenizes captions the way LLaVA's stage-1 pretraining does for `tokenizer`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_caption_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_caption_tokens = max_caption_tokens
        bos = tokenizer.bos_token_id
        starts_with_bos = bos is not None and tokenizer("")["input_ids"][:1] == [bos]
        self.prefix_ids: list[int] = [bos] if starts_with_bos else []  # what precedes the image
        self.pad_token_id: int = next(
            token for token in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if token is not None
        )

    def caption_token_ids(self, caption: str) -> list[int]:
        """The supervised tokens of one caption: caption + separator, at most `max_caption_tokens`."""
        ids = self.tokenizer(caption + PLAIN_SEPARATOR)["input_ids"]
        return ids[len(self.prefix_ids) :][: self.max_caption_tokens]

    def encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Caption ids [N, L] (supervised tokens, right-padded) and their mask [N, L] (1 = token)."""
        rows = [self.caption_token_ids(caption) for caption in captions]
        length = max((len(row) for row in rows), default=1)
        caption_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        caption_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            caption_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            caption_mask[index, : len(row)] = 1
        return caption_ids, caption_mask

    def llava_inputs(
        self, caption_ids: Tensor, caption_mask: Tensor, image_token_id: int, num_image_tokens: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The whole sequences as transformers' `LlavaForConditionalGeneration` takes them.

        caption_ids, caption_mask: [B, L] from `encode`. Returns input_ids, attention_mask and
        labels, each [B, T] with T = len(prefix_ids) + num_image_tokens + L: BOS, one
        `image_token_id` per image position, the caption; labels IGNORE_INDEX on BOS, image and pads.
        """
        batch = caption_ids.shape[0]
        prefix = torch.tensor(self.prefix_ids, dtype=torch.long).expand(batch, -1)  # [B, 0 or 1]
        image = torch.full((batch, num_image_tokens), image_token_id, dtype=torch.long)  # [B, P]
        input_ids = torch.cat([prefix, image, caption_ids], dim=1)  # [B, T]
        attention_mask = torch.cat([torch.ones_like(prefix), torch.ones_like(image), caption_mask], dim=1)  # [B, T]
        unsupervised = torch.full((batch, prefix.shape[1] + num_image_tokens), IGNORE_INDEX, dtype=torch.long)
        labels = torch.cat([unsupervised, caption_ids.masked_fill(caption_mask == 0, IGNORE_INDEX)], dim=1)  # [B, T]
        return input_ids, attention_mask, labels
