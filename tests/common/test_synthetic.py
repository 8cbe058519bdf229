"""Synthetic scenes: determinism, rendering, and a closed, enumerable caption language."""

from __future__ import annotations

import numpy as np
import pytest

from fedcmp.common import synthetic as syn


def _samples(seed: int, n: int) -> list[tuple[syn.Scene, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = syn.sample_scene(rng)
        style, template = syn.TEMPLATES[int(rng.integers(len(syn.TEMPLATES)))]
        out.append((scene, syn.caption(scene, style, template)))
    return out


def test_same_seed_same_scenes_and_pixels() -> None:
    a, b, c = _samples(3, 50), _samples(3, 50), _samples(4, 50)
    assert a == b
    assert a != c
    for (scene_a, _), (scene_b, _) in zip(a, b):
        assert syn.render(scene_a).tobytes() == syn.render(scene_b).tobytes()


@pytest.mark.parametrize("domain", syn.DOMAINS)
@pytest.mark.parametrize("image_size", [32, 48])
def test_render_every_domain(domain: str, image_size: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = syn.sample_scene(rng, domain=domain)
        image, coverage = syn.render_with_mask(scene, image_size)
        assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
        assert coverage.shape == (image_size, image_size)
        assert 0.0 <= coverage.min() and coverage.max() <= 1.0
        assert coverage.sum() > 0.02 * image_size**2  # the object is visible
        # the object's pixels carry its colour: the nearest named colour is the scene's
        inside = image[coverage > 0.9].astype(float).mean(axis=0)
        nearest = min(syn.COLOURS, key=lambda c: np.linalg.norm(inside - np.array(syn.COLOURS[c])))
        assert nearest == scene.colour


def test_digit_pools_use_other_handwriting() -> None:
    scene = syn.sample_scene(np.random.default_rng(1), domain="digits")
    zoo_scene = syn.Scene(**{**scene.__dict__, "digit_pool": "zoo"})
    assert syn.render(scene).tobytes() != syn.render(zoo_scene).tobytes()


def test_sample_scene_respects_constraints() -> None:
    rng = np.random.default_rng(0)
    assert all(syn.sample_scene(rng, category="seven").domain == "digits" for _ in range(10))
    assert {syn.sample_scene(rng, domain="textured").texture for _ in range(60)} == set(syn.TEXTURES)
    with pytest.raises(ValueError):
        syn.sample_scene(rng, domain="digits", category="circle")


def test_every_caption_word_is_in_the_vocabulary() -> None:
    vocab = set(syn.vocabulary())
    assert not vocab & set(syn.SPECIAL_TOKENS)
    for _, text in _samples(0, 2000):
        assert set(syn.tokenize(text)) <= vocab, text
    assert len(syn.vocabulary()) < 100
    assert syn.max_caption_tokens() == max(len(syn.tokenize(t)) for *_, t in syn.all_scene_captions())


def test_captions_mention_the_attributes_in_each_style() -> None:
    scene = syn.Scene("textured", "star", "blue", "left", "small", "checker", variant=0)
    captions = {(s, t): syn.caption(scene, s, t) for s, t in syn.TEMPLATES}
    assert captions[("sentence", 0)] == "a small blue star on the left over a checkered background."
    assert captions[("tags", 0)] == "blue, star, small, left, checker"
    digit = syn.Scene("digits", "three", "red", "top", "large", None, variant=0)
    assert syn.caption(digit, "tags", 1) == "digit three | red | top | large"
    for (style, _), text in captions.items():
        words = syn.tokenize(text)
        assert "blue" in words and "star" in words
        if style != "brief":
            assert {"small", "left"} <= set(words)
    assert len(set(captions.values())) == len(syn.TEMPLATES)  # templates really differ


def test_templates_interleave_styles() -> None:
    assert len(set(syn.TEMPLATES)) == sum(len(v) for v in syn.STYLES.values())
    first = [style for style, _ in syn.TEMPLATES[: len(syn.STYLE_NAMES)]]
    assert sorted(first) == sorted(syn.STYLE_NAMES)
    assert set(syn.DOMAIN_STYLE) == set(syn.DOMAINS) and len(set(syn.DOMAIN_STYLE.values())) == len(syn.DOMAINS)
