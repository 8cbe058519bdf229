"""The MLLM wrapper: composition, freezing, label masking, and equality with Llava's own forward."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from fedcmp.client.data import scan_data
from fedcmp.client.model import ProjectorMLLM
from fedcmp.common.projector import LinearProjector, MlpGeluProjector, init_projector_params
from fedcmp.common.recipe import Recipe



@pytest.fixture(scope="module", params=["mlp2x_gelu", "linear"])
def model(request: pytest.FixtureRequest, make_recipe: Callable[..., Recipe]) -> ProjectorMLLM:
    recipe = make_recipe(projector_type=request.param)
    return ProjectorMLLM.from_pretrained(recipe.vision_model, recipe.llm, recipe)


def _batch(model: ProjectorMLLM, folder: Path, count: int) -> tuple[list[Path], list[str]]:
    scanned = scan_data(folder)
    return [scanned.source.image(row) for row in range(count)], scanned.captions[:count]


def _llava_loss(model: ProjectorMLLM, paths: list[Path], caption_ids: Tensor, caption_mask: Tensor) -> Tensor:
    """LLaVA's own pretraining loss: BOS + P <image> tokens + caption, labels -100 on BOS, image and pads."""
    images = [Image.open(path).convert("RGB") for path in paths]
    pixel_values = model.image_processor(images=images, return_tensors="pt")["pixel_values"]
    input_ids, attention_mask, labels = model.template.llava_inputs(
        caption_ids, caption_mask, model.image_token_id, model.num_image_tokens
    )
    with torch.no_grad():
        output = model.llava(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, labels=labels
        )
    return output.loss


def test_composition(model: ProjectorMLLM, make_recipe: Callable[..., Recipe]) -> None:
    assert isinstance(model.llava, LlavaForConditionalGeneration)
    projector_class = LinearProjector if model.projector_type == "linear" else MlpGeluProjector
    assert isinstance(model.llava.model.multi_modal_projector, projector_class)
    assert (model.vision_hidden, model.text_hidden, model.num_image_tokens) == (24, 32, 16)
    assert not any(tensor.is_meta for tensor in [*model.llava.parameters(), *model.llava.buffers()])
    # The pretrained weights are the ones in the folders, not a fresh init.
    recipe = make_recipe(projector_type=model.projector_type)
    reference = ProjectorMLLM.from_pretrained(recipe.vision_model, recipe.llm, recipe)
    theirs = dict(reference.llava.named_parameters())
    for name, ours in model.llava.named_parameters():
        assert name.startswith("model.multi_modal_projector.") or torch.equal(ours, theirs[name]), name
    seeded = init_projector_params(model.projector_type, 24, 32, seed=0)
    assert all(torch.equal(reference.projector_params()[key], value) for key, value in seeded.items())


def test_only_projector_trains(model: ProjectorMLLM, scenes: Path) -> None:
    trainable = {name for name, param in model.llava.named_parameters() if param.requires_grad}
    assert trainable == {f"model.multi_modal_projector.{key}" for key in model.signature()}
    paths, captions = _batch(model, scenes, 3)
    nll, _ = model.caption_nll(model.encode_images(paths, 2), *model.tokenize_captions(captions))
    nll.sum().backward()
    with_grad = {name for name, param in model.llava.named_parameters() if param.grad is not None}
    assert with_grad == trainable
    model.projector.zero_grad(set_to_none=True)


def test_tokenize_captions_pads_and_truncates(model: ProjectorMLLM) -> None:
    caption_ids, caption_mask = model.tokenize_captions(["a red square", "a big blue circle on black " * 5])
    pad, bos = model.tokenizer.pad_token_id, model.tokenizer.bos_token_id
    assert model.template.prefix_ids == [bos]  # the tiny tokenizer starts every text with <s>, as Llama's
    length = model.template.max_caption_tokens
    assert caption_ids.shape == (2, length)
    # the whitespace-splitting tiny tokenizer drops the "\n" separator: 3 words, no bos, no eos
    assert caption_mask[0].tolist() == [1] * 3 + [0] * (length - 3)
    assert caption_ids[0, :3].tolist() == model.tokenizer("a red square", add_special_tokens=False)["input_ids"]
    assert (caption_ids[0, 3:] == pad).all()
    assert caption_mask[1].all()  # truncated to max_caption_tokens
    assert caption_ids[1].tolist() == model.tokenizer("a big blue circle on black " * 2)["input_ids"][1 : length + 1]


def test_only_caption_tokens_are_supervised(model: ProjectorMLLM, scenes: Path) -> None:
    paths, captions = _batch(model, scenes, 3)
    features = model.encode_images(paths, batch_size=2)
    assert features.shape == (3, 16, 24) and features.dtype == torch.float32
    caption_ids, caption_mask = model.tokenize_captions([captions[0], "a red square", captions[2]])
    with torch.no_grad():
        nll, tokens = model.caption_nll(features, caption_ids, caption_mask)
        alone, alone_tokens = model.caption_nll(features[1:2], caption_ids[1:2, :3], caption_mask[1:2, :3])
    # 6 words; "a red square"; neither BOS nor an image position is counted.
    assert tokens.tolist() == [6, 3, 6]
    # Padding positions add nothing: the padded example scores as it does alone.
    assert alone_tokens.item() == 3
    torch.testing.assert_close(nll[1:2], alone)


def test_caption_nll_keeps_no_kv_cache(model: ProjectorMLLM, scenes: Path) -> None:
    # A training or evaluation forward generates nothing: a KV cache would only hold every layer's keys
    # and values alive until the forward ends (LLaVA's train.py sets use_cache False for the same reason).
    paths, captions = _batch(model, scenes, 2)
    outputs = []
    hook = model.llava.model.language_model.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        with torch.no_grad():
            model.caption_nll(model.encode_images(paths, batch_size=2), *model.tokenize_captions(captions))
    finally:
        hook.remove()
    assert len(outputs) == 1 and outputs[0].past_key_values is None


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])  # no BOS: GPT-2/Qwen-style tokenizers
def test_caption_nll_equals_full_llava_forward(model: ProjectorMLLM, scenes: Path, bos: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if not bos:
        monkeypatch.setattr(model.template, "prefix_ids", [])
    paths, captions = _batch(model, scenes, 4)
    captions[1] = "a red square"  # a shorter caption, so the batch is padded
    caption_ids, caption_mask = model.tokenize_captions(captions)
    with torch.no_grad():
        nll, tokens = model.caption_nll(model.encode_images(paths, batch_size=3), caption_ids, caption_mask)
    torch.testing.assert_close(nll.sum() / tokens.sum(), _llava_loss(model, paths, caption_ids, caption_mask))
    for index in range(4):  # per example as well
        one = slice(index, index + 1)
        expected = _llava_loss(model, paths[one], caption_ids[one], caption_mask[one])
        torch.testing.assert_close(nll[index] / tokens[index], expected)


def test_projector_params_roundtrip_and_strict_load(model: ProjectorMLLM) -> None:
    params = model.projector_params()
    assert {key: tuple(value.shape) for key, value in params.items()} == model.signature()
    assert all(value.dtype == torch.float32 and value.device.type == "cpu" for value in params.values())
    shifted = {key: value + 1.0 for key, value in params.items()}
    model.load_projector_params(shifted)
    assert all(torch.equal(model.projector_params()[key], value) for key, value in shifted.items())
    params["linear_1.weight"].zero_()  # copies, not views of the live weights
    assert not torch.equal(model.projector_params()["linear_1.weight"], params["linear_1.weight"])

    wrong = dict(shifted, **{"linear_1.weight": torch.zeros(32, 16)})
    both_shapes = r"linear_1\.weight: expected linear_1\.weight\[32x24\], got linear_1\.weight\[32x16\]"
    with pytest.raises(ValueError, match=both_shapes):
        model.load_projector_params(wrong)
    with pytest.raises(ValueError, match="missing linear_1.bias"):
        model.load_projector_params({key: value for key, value in shifted.items() if key != "linear_1.bias"})
    with pytest.raises(ValueError, match="unexpected extra.weight"):
        model.load_projector_params(dict(shifted, **{"extra.weight": torch.zeros(1)}))


def test_image_token_added_when_the_lm_lacks_it(
    make_recipe: Callable[..., Recipe], llm_without_image_token: Path
) -> None:
    recipe = make_recipe(llm=str(llm_without_image_token), projector_type="linear")
    model = ProjectorMLLM.from_pretrained(recipe.vision_model, recipe.llm, recipe)
    vocab = model.tokenizer.get_vocab()
    assert model.image_token_id == vocab["<image>"] == len(vocab) - 1
    embeddings = model.llava.get_input_embeddings().weight
    assert embeddings.shape[0] == len(vocab) == model.llava.lm_head.weight.shape[0]
    torch.testing.assert_close(embeddings[-1], embeddings[:-1].mean(dim=0))


def test_full_strategy_and_last_layer_match_llava(make_recipe: Callable[..., Recipe], scenes: Path) -> None:
    recipe = make_recipe(vision_feature_select="full", vision_feature_layer=-1)
    model = ProjectorMLLM.from_pretrained(recipe.vision_model, recipe.llm, recipe)
    paths, captions = _batch(model, scenes, 2)
    features = model.encode_images(paths, batch_size=2)
    assert model.num_image_tokens == 17 and features.shape == (2, 17, 24)  # CLS kept
    caption_ids, caption_mask = model.tokenize_captions(captions)
    with torch.no_grad():
        nll, tokens = model.caption_nll(features, caption_ids, caption_mask)
    torch.testing.assert_close(nll.sum() / tokens.sum(), _llava_loss(model, paths, caption_ids, caption_mask))


def test_a_tower_without_layers_gives_its_embeddings(tmp_path: Path, make_recipe: Callable[..., Recipe]) -> None:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=0, num_attention_heads=2,
                              image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(tmp_path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    recipe = make_recipe(vision_model=str(tmp_path), vision_feature_layer=-1)
    model = ProjectorMLLM.from_pretrained(recipe.vision_model, recipe.llm, recipe)
    pixels = torch.randn(2, 3, 32, 32)
    tower = model.llava.model.vision_tower
    with torch.no_grad():
        embeddings = tower.pre_layrnorm(tower.embeddings(pixels))  # [2, 1 + 16, 24]
    assert torch.equal(model.image_features(pixels), embeddings[:, 1:])


@pytest.mark.parametrize("layer", [-2, 1, 0])
def test_the_tower_stops_at_the_selected_layer_and_leaves_no_hook_behind(
        make_recipe: Callable[..., Recipe], layer: int) -> None:
    recipe = make_recipe(vision_feature_layer=layer)
    model = ProjectorMLLM.from_pretrained(recipe.vision_model, recipe.llm, recipe)
    tower = model.llava.model.vision_tower
    layers = list(tower.encoder.layers)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = tower(pixels, output_hidden_states=True).hidden_states[layer]  # what LLaVA selects

    def hooks() -> list[list[int]]:  # transformers keeps hooks of its own on the layers once asked for hidden states
        return [list(tower.encoder._forward_pre_hooks)] + [list(block._forward_hooks) for block in layers]

    before = hooks()
    ran: list[int] = []
    spies = [block.register_forward_hook(lambda *_, at=at: ran.append(at)) for at, block in enumerate(layers)]
    try:
        features = model.image_features(pixels)
    finally:
        for spy in spies:
            spy.remove()
    selected = layer % (len(layers) + 1)  # hidden state `selected`: the output of the first `selected` layers
    assert ran == list(range(selected))  # the layers after it never ran
    assert torch.equal(features, whole[:, 1:])
    assert hooks() == before

    def broken(*_: object) -> None:
        raise RuntimeError("a failing patch embedding")

    failing = tower.embeddings.register_forward_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="a failing patch embedding"):
            model.image_features(pixels)
    finally:
        failing.remove()
    assert hooks() == before  # none left behind after a failure either
