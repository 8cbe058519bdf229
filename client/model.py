"""The client's MLLM: transformers' `LlavaForConditionalGeneration` with only its projector trainable.

The composed model is built from a separately loaded vision tower and causal LM (a local
folder, a hub id, or "micro" for the embedded zoo): their pretrained modules become the Llava
model's `model.vision_tower`, `model.language_model` and `lm_head`, and a fresh projector
(`fedcmp.common.projector`, keyed like transformers' `multi_modal_projector`) sits between them.
Everything but the projector is frozen.

`image_features` computes the frozen features of preprocessed images (layer
`vision_feature_layer`, CLS dropped under the `default` strategy, exactly as
`LlavaModel.get_image_features` selects them; `fedcmp.client.features` caches them or runs it
per batch) and `caption_nll` feeds their projection to the LM as input embeddings, after BOS and
before the caption, as LLaVA's `plain` pretraining template (`fedcmp.client.template`) lays them
out.

Precision (`fedcmp.client.precision`): under bf16/fp16 the frozen backbones are held in that
dtype, loaded straight onto their device, and forwards run under autocast; the projector's
(master) weights stay float32. `gradient_checkpointing` recomputes the frozen LM's layer
activations in the backward instead of storing them (gradients still flow through the LM to the
projector, so a 7B LM's activations would otherwise dominate memory).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    BaseImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedcmp.client.data import IMAGE_TOKEN
from fedcmp.client.precision import DTYPES, autocast, enable_tf32, resolve_precision
from fedcmp.client.sources.images import load_rgb
from fedcmp.client.template import PlainTemplate
from fedcmp.common.projector import build_projector, describe_shapes, init_projector_params, projector_shapes
from fedcmp.common.recipe import Recipe


class ProjectorMLLM:
    """A frozen vision tower + frozen causal LM around a trainable LLaVA projector."""

    def __init__(
        self,
        llava: LlavaForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: BaseImageProcessor,
        recipe: Recipe,
        device: str,
    ) -> None:
        self.llava = llava
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = torch.device(device)
        self.precision = resolve_precision(recipe.precision, self.device)
        self.projector_type = recipe.projector_type
        self.template = PlainTemplate(tokenizer, recipe.max_caption_tokens)

        config = llava.config
        self.vision_hidden: int = config.vision_config.hidden_size
        self.text_hidden: int = config.text_config.hidden_size
        self.num_image_tokens: int = config.image_seq_length
        self.image_token_id: int = config.image_token_id

    @classmethod
    def from_pretrained(
        cls, vision: str, llm: str, recipe: Recipe, device: str = "cpu", cache_dir: Path | None = None
    ) -> ProjectorMLLM:
        """Load both backbones, compose the Llava model around a seeded projector, freeze the rest."""
        torch_device = torch.device(device)
        dtype = DTYPES[resolve_precision(recipe.precision, torch_device)]
        enable_tf32(torch_device)
        vision_path = _resolve(vision, "vision", cache_dir)
        llm_path = _resolve(llm, "llm", cache_dir)

        vision_tower = _load_vision_tower(vision_path, dtype, torch_device, cache_dir)
        image_processor = AutoImageProcessor.from_pretrained(vision_path, cache_dir=cache_dir)
        causal_lm = AutoModelForCausalLM.from_pretrained(
            llm_path, dtype=dtype, device_map=torch_device, cache_dir=cache_dir
        )  # straight onto the device: no full CPU copy first
        tokenizer = AutoTokenizer.from_pretrained(llm_path, cache_dir=cache_dir)
        image_token_id = _ensure_image_token(tokenizer, causal_lm)

        config = LlavaConfig(
            vision_config=vision_tower.config,
            text_config=causal_lm.config,
            image_token_id=image_token_id,
            image_seq_length=_num_image_tokens(vision_tower.config, recipe.vision_feature_select),
            projector_hidden_act="gelu",
            vision_feature_layer=recipe.vision_feature_layer,
            vision_feature_select_strategy=recipe.vision_feature_select,
        )
        # Build the shell on the meta device (no memory, no random init), then move the loaded
        # pretrained modules into it: weights are shared, never copied.
        with torch.device("meta"):
            llava = LlavaForConditionalGeneration(config)
        llava.model.vision_tower = vision_tower
        llava.model.language_model = causal_lm.get_decoder()
        llava.lm_head = causal_lm.get_output_embeddings()

        vision_hidden, text_hidden = vision_tower.config.hidden_size, causal_lm.config.hidden_size
        projector = build_projector(recipe.projector_type, vision_hidden, text_hidden)
        projector.load_state_dict(init_projector_params(recipe.projector_type, vision_hidden, text_hidden, recipe.seed))
        llava.model.multi_modal_projector = projector

        llava.to(torch_device)
        projector.float()  # master weights stay float32 under bf16 backbones
        llava.requires_grad_(False)
        projector.requires_grad_(True)
        llava.eval()  # always: no dropout anywhere, so training is deterministic
        if recipe.gradient_checkpointing:
            _checkpoint_layers(llava.model.language_model)
        return cls(llava, tokenizer, image_processor, recipe, device)

    @property
    def projector(self) -> nn.Module:
        return self.llava.model.multi_modal_projector

    def signature(self) -> dict[str, tuple[int, ...]]:
        return projector_shapes(self.projector_type, self.vision_hidden, self.text_hidden)

    def projector_params(self) -> dict[str, Tensor]:
        """Detached CPU float32 copies of the projector tensors, keyed `linear_1.weight`, ..."""
        state = self.projector.state_dict()
        return {key: value.detach().to("cpu", torch.float32).clone() for key, value in state.items()}

    def load_projector_params(self, params: dict[str, Tensor]) -> None:
        """Copy `params` into the projector; refuse any missing, extra or wrongly shaped tensor."""
        expected = self.signature()
        got = {key: tuple(value.shape) for key, value in params.items()}
        if got != expected:
            problems = [f"missing {key}" for key in sorted(expected.keys() - got.keys())]
            problems += [f"unexpected {key}" for key in sorted(got.keys() - expected.keys())]
            problems += [
                f"{key}: expected {describe_shapes({key: expected[key]})}, got {describe_shapes({key: got[key]})}"
                for key in sorted(expected.keys() & got.keys())
                if expected[key] != got[key]
            ]
            raise ValueError(
                f"projector parameters do not fit this {self.projector_type} projector ({'; '.join(problems)}); "
                f"expected {describe_shapes(expected)}, got {describe_shapes(got)}"
            )
        with torch.no_grad():
            for key, parameter in self.projector.named_parameters():
                parameter.copy_(params[key])

    @torch.no_grad()
    def encode_images(self, paths: Sequence[Path], batch_size: int, show_progress: bool = False) -> Tensor:
        """Frozen vision features [N, P, vision_hidden] of image files; float32 on CPU."""
        chunks: list[Tensor] = [torch.empty(0, self.num_image_tokens, self.vision_hidden)]
        starts = range(0, len(paths), batch_size)
        for start in tqdm(starts, desc="encoding images", unit="batch", disable=None if show_progress else True):
            images = [load_rgb(Path(path), str(path)) for path in paths[start : start + batch_size]]
            pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
            chunks.append(self.image_features(pixel_values).to("cpu", torch.float32))
        return torch.cat(chunks)

    @torch.no_grad()
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Frozen vision features [b, P, vision_hidden] of preprocessed images [b, 3, H, W], on the model's device.

        Layer `vision_feature_layer`, CLS dropped under the `default` strategy, exactly as
        `LlavaModel.get_image_features` selects them.
        """
        with self._autocast():
            features = tower_hidden_state(self.llava.model.vision_tower, pixel_values.to(self.device),
                                          self.llava.config.vision_feature_layer)  # [b, 1 + patches, vision_hidden]
        if self.llava.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]  # drop CLS -> [b, patches, vision_hidden]
        return features

    def tokenize_captions(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Supervised caption ids [N, L] (caption + "\\n", right-padded) and their mask [N, L]."""
        return self.template.encode(captions)

    def caption_nll(
        self, features: Tensor, caption_ids: Tensor, caption_mask: Tensor, projector: nn.Module | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-example summed caption NLL [B] (float32) and supervised token counts [B].

        `projector`: the module to run the projector through (e.g. its DDP wrapper); default the projector.

        LLaVA `plain` template: the sequence is [BOS] + <image> + caption + "\\n", where <image>
        stands for the P projected features placed as input embeddings right after BOS (if the
        tokenizer uses one); only the caption ids (caption and separator) are supervised.
        """
        features = features.to(self.device)  # [B, P, vision_hidden]
        caption_ids = caption_ids.to(self.device)  # [B, L]
        caption_mask = caption_mask.to(self.device)  # [B, L]
        # Right padding: columns past this batch's longest caption hold no token; drop them.
        length = int(caption_mask.sum(dim=1).max())
        caption_ids, caption_mask = caption_ids[:, :length], caption_mask[:, :length]  # [B, L], L = longest caption
        batch, patches = features.shape[:2]
        prefix_ids = torch.tensor(self.template.prefix_ids, dtype=torch.long, device=self.device).expand(batch, -1)  # [B, b]
        head = prefix_ids.shape[1] + patches  # positions before the caption: BOS and image
        embed = self.llava.get_input_embeddings()
        with self._autocast():
            text_embeds = embed(torch.cat([prefix_ids, caption_ids], dim=1))  # [B, b + L, text_hidden]
            image_embeds = (projector or self.projector)(features).to(text_embeds.dtype)  # [B, P, text]
            prefix_embeds, caption_embeds = text_embeds.split([prefix_ids.shape[1], length], dim=1)
            inputs_embeds = torch.cat([prefix_embeds, image_embeds, caption_embeds], dim=1)  # [B, head + L, text_hidden]
            attention_mask = torch.cat([caption_mask.new_ones(batch, head), caption_mask], dim=1)  # [B, head + L]
            hidden = self.llava.model.language_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state  # [B, head + L, text_hidden]; no KV cache: nothing is generated (LLaVA's train.py too)
            # LLaVA's labels are -100 on BOS and the image, then the caption ids (pads -100), and
            # position t predicts token t + 1: positions head - 1 .. head + L - 2 predict the L
            # caption tokens, so logits are computed only there.
            logits = self.llava.lm_head(hidden[:, head - 1 : -1])  # [B, L, vocab]
        token_nll = F.cross_entropy(logits.float().flatten(0, 1), caption_ids.flatten(), reduction="none")  # [B * L]
        token_nll = token_nll.view_as(caption_ids).masked_fill(caption_mask == 0, 0.0)  # [B, L], pads unsupervised
        return token_nll.sum(dim=1), caption_mask.sum(dim=1)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device)


class _Reached(Exception):
    """Raised by a hook when the vision tower has computed the hidden state asked for; carries it."""

    def __init__(self, hidden: Tensor) -> None:
        super().__init__("the selected hidden state is computed")
        self.hidden = hidden


def tower_hidden_state(tower: nn.Module, pixel_values: Tensor, layer: int) -> Tensor:
    """Hidden state `layer` of the vision tower (0: the encoder's input; negative from the end) as
    transformers' `output_hidden_states` numbers them, [b, 1 + patches, vision_hidden].

    The encoder layers after the selected one cannot change it, so they do not run: LLaVA's
    tower runs them and drops their output (its last layer, at the default of -2). A hook on the
    last layer needed (on the encoder's input for hidden state 0) takes the hidden state and
    stops the forward there. A tower whose layers are not an `encoder.layers` list runs whole.
    """
    encoder = getattr(tower, "encoder", None)
    if encoder is None:  # transformers before 5 nests it: CLIPVisionModel.vision_model.encoder
        encoder = getattr(getattr(tower, "vision_model", None), "encoder", None)
    layers = getattr(encoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not -len(layers) - 1 <= layer <= len(layers):
        return tower(pixel_values, output_hidden_states=True).hidden_states[layer]  # out of range: fails there

    def after_layer(module: nn.Module, args: tuple, output: Tensor | tuple[Tensor, ...]) -> None:
        raise _Reached(output[0] if isinstance(output, tuple) else output)  # the layer's output, or its first part

    def before_encoder(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Reached(kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[0])

    index = layer % (len(layers) + 1)  # hidden state `index` is the output of the first `index` layers
    hook = (layers[index - 1].register_forward_hook(after_layer) if index
            else encoder.register_forward_pre_hook(before_encoder, with_kwargs=True))
    try:
        tower(pixel_values)
    except _Reached as done:
        return done.hidden
    finally:
        hook.remove()
    raise RuntimeError(f"the vision tower's forward never reached its hidden state {layer}")


def _resolve(name_or_path: str, kind: str, cache_dir: Path | None) -> str:
    """A local folder as is; anything else ("micro", a hub id) through the zoo's resolver."""
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    from fedcmp.common.zoo import resolve_backbone  # imported here: only zoo names and hub ids need it

    return resolve_backbone(name_or_path, kind, cache_dir)


def _num_image_tokens(vision_config: PreTrainedConfig, select_strategy: str) -> int:
    """P: one token per patch, plus CLS when the `full` strategy keeps it."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + (1 if select_strategy == "full" else 0)


def _load_vision_tower(
    path: str, dtype: torch.dtype, device: torch.device, cache_dir: Path | None
) -> PreTrainedModel:
    """The vision encoder alone; from a dual-encoder checkpoint (e.g. a full CLIP) keep its vision half."""
    config = AutoConfig.from_pretrained(path, cache_dir=cache_dir)
    vision_config = config.vision_config if hasattr(config, "vision_config") else config
    model_class = MODEL_MAPPING[type(vision_config)]  # CLIPVisionConfig -> CLIPVisionModel, as Llava itself maps it
    return model_class.from_pretrained(path, dtype=dtype, device_map=device, cache_dir=cache_dir)


def _checkpoint_layers(language_model: PreTrainedModel) -> None:
    """Recompute the LM's decoder layers in the backward instead of keeping their activations.

    transformers checkpoints a layer only while that layer is in training mode; the flag is set
    on the layers alone, so their submodules stay in eval mode (no dropout: still deterministic).
    """
    if hasattr(language_model, "activation_checkpointing_enable"):  # its name from transformers 5.x on
        language_model.activation_checkpointing_enable()  # non-reentrant by default
    else:
        language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in language_model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True


def _ensure_image_token(tokenizer: PreTrainedTokenizerBase, causal_lm: PreTrainedModel) -> int:
    """The id of <image>, added to tokenizer and embeddings when a real LM lacks it."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = causal_lm.get_input_embeddings().weight.shape[0]
    if image_token_id >= rows:
        causal_lm.resize_token_embeddings(image_token_id + 1, mean_resizing=False)
        # As LLaVA's smart_tokenizer_and_embedding_resize: new rows are the mean of the old ones
        # (deterministic on every client, unlike a random init).
        with torch.no_grad():
            for weight in (causal_lm.get_input_embeddings().weight, causal_lm.get_output_embeddings().weight):
                weight[rows:] = weight[:rows].mean(dim=0, keepdim=True)
    return image_token_id
