"""Synthetic scenes and their captions: the raw material of the micro zoo and of the benchmark.

A scene is a small RGB image of one object — a coloured shape (on a plain, textured or light
background) or a real handwritten digit from scikit-learn's bundled ``load_digits``, recoloured —
described by structured attributes. Captions are rendered from the attributes with one of
several templates; template families are *styles* (full sentences, tag lists, ...).

Everything is deterministic: sampling takes a ``numpy.random.Generator`` and rendering depends
only on the scene (its ``variant`` seeds the jitter). The caption language is closed: every
token any caption can contain is listed by :func:`vocabulary` (exhaustive enumeration), which
is what the micro LM's tokenizer is built from.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------
# Attribute spaces
# ---------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
DIGITS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
SIZES: tuple[str, ...] = ("small", "large")
TEXTURES: tuple[str, ...] = ("stripes", "checker", "noise")

# Visual domains (the domain-skew scenario gives one to each client):
#   shapes   - filled shapes on a plain dark background
#   textured - filled shapes on a grey striped / checkered / noisy background
#   digits   - recoloured handwritten digits on a plain dark background
#   outline  - shapes drawn as coloured outlines on a light background
DOMAINS: tuple[str, ...] = ("shapes", "textured", "digits", "outline")
CATEGORIES: tuple[str, ...] = SHAPES + DIGITS  # the "concepts" of the concept-skew scenario


def domain_categories(domain: str) -> tuple[str, ...]:
    """The object categories a domain can show."""
    return DIGITS if domain == "digits" else SHAPES


def category_domains(category: str) -> tuple[str, ...]:
    """The domains that can show an object category."""
    return ("digits",) if category in DIGITS else ("shapes", "textured", "outline")


# Which half of the 1797 scikit-learn digits a scene may draw from: the zoo's vision tower is
# pretrained on other handwriting than the federated data shows.
DigitPool = Literal["zoo", "federation"]

# ---------------------------------------------------------------------------------------------
# Captions: styles and templates
# ---------------------------------------------------------------------------------------------

LOCATION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
BACKGROUND_PHRASES: dict[str, str] = {
    "stripes": " over a striped background",
    "checker": " over a checkered background",
    "noise": " over a noisy background",
}

# Slots: ``obj`` is the noun phrase ("red circle", "red digit three", "red circle outline"),
# ``loc`` / ``bg`` the location / background phrases, ``category`` the noun ("digit three"),
# ``pos`` the bare position word, ``extra_*`` the rendering words as more tags.
STYLES: dict[str, tuple[str, ...]] = {
    "sentence": (
        "a {size} {obj} {loc}{bg}.",
        "there is a {size} {obj} {loc}{bg}.",
        "this image shows a {size} {obj} {loc}{bg}.",
    ),
    "tags": (
        "{colour}, {category}, {size}, {pos}{extra_comma}",
        "{category} | {colour} | {pos} | {size}{extra_bar}",
    ),
    "phrase": (
        "the {obj} is {size} and {loc}{bg}.",
        "the {size} {obj} is {loc}{bg}.",
    ),
    "brief": (
        "{size} {obj}.",
        "{obj} {loc}.",
    ),
}
STYLE_NAMES: tuple[str, ...] = tuple(STYLES)
# Every (style, template index), interleaved so that consecutive entries differ in style: the
# quantity-skew scenario hands client i entry i (cycled) as its own caption templates.
TEMPLATES: tuple[tuple[str, int], ...] = tuple(
    (style, t)
    for t in range(max(len(v) for v in STYLES.values()))
    for style in STYLE_NAMES
    if t < len(STYLES[style])
)
# The domain-skew scenario captions each domain in its own style.
DOMAIN_STYLE: dict[str, str] = {"shapes": "sentence", "textured": "tags", "digits": "phrase", "outline": "brief"}

# Special tokens of the micro LM's tokenizer (ids 0..4 in this order).
PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, IMAGE)

# The tokenizer's pre-tokenization (same split as `tokenizers.pre_tokenizers.Whitespace`).
_TOKEN_RE = re.compile(r"\w+|[^\w\s]+")


@dataclass(frozen=True)
class Scene:
    """One object in one image, as structured attributes.

    ``texture`` is ``None`` outside the textured domain. ``variant`` seeds the rendering
    details that the caption does not mention (exact position, colour shade, background
    shade, texture phase, which handwritten instance of the digit).
    """

    domain: str
    category: str
    colour: str
    position: str
    size: str
    texture: str | None
    variant: int
    digit_pool: DigitPool = "federation"

    def noun(self) -> str:
        """The object's name: "circle", or "digit three" for digits."""
        return f"digit {self.category}" if self.domain == "digits" else self.category

    def extras(self) -> list[str]:
        """Caption words for the rendering: the texture, or "outline"; none for the others."""
        if self.domain == "outline":
            return ["outline"]
        return [self.texture] if self.texture is not None else []

    def tags(self) -> list[str]:
        """The scene's attributes as caption words (the content of a tag-list caption)."""
        return [self.colour, *self.noun().split(), self.size, self.position, *self.extras()]


def sample_scene(
    rng: np.random.Generator,
    domain: str | None = None,
    category: str | None = None,
    digit_pool: DigitPool = "federation",
) -> Scene:
    """Draw a scene; unspecified domain/category are uniform (category within the domain)."""
    if domain is None:
        domain = str(rng.choice(category_domains(category))) if category else str(rng.choice(DOMAINS))
    if category is None:
        category = str(rng.choice(domain_categories(domain)))
    if category not in domain_categories(domain):
        raise ValueError(f"domain {domain!r} cannot show category {category!r}")
    return Scene(
        domain=domain,
        category=category,
        colour=str(rng.choice(list(COLOURS))),
        position=str(rng.choice(POSITIONS)),
        size=str(rng.choice(SIZES)),
        texture=str(rng.choice(TEXTURES)) if domain == "textured" else None,
        variant=int(rng.integers(2**31)),
        digit_pool=digit_pool,
    )


def caption(scene: Scene, style: str, template: int) -> str:
    """Render the caption of ``scene`` with template number ``template`` of ``style``."""
    obj = f"{scene.colour} {scene.noun()}" + (" outline" if scene.domain == "outline" else "")
    return STYLES[style][template].format(
        size=scene.size,
        obj=obj,
        loc=LOCATION_PHRASES[scene.position],
        bg=BACKGROUND_PHRASES.get(scene.texture or "", ""),
        colour=scene.colour,
        category=scene.noun(),
        pos=scene.position,
        extra_comma="".join(f", {w}" for w in scene.extras()),
        extra_bar="".join(f" | {w}" for w in scene.extras()),
    )


def tokenize(text: str) -> list[str]:
    """Split a caption into the micro tokenizer's words (lower-cased)."""
    return _TOKEN_RE.findall(text.lower())


def all_scene_captions() -> Iterator[tuple[Scene, str, int, str]]:
    """Every distinct caption of the language: (scene, style, template, caption) for all
    attribute combinations (``variant`` fixed at 0: it never changes a caption)."""
    for domain in DOMAINS:
        textures: tuple[str | None, ...] = TEXTURES if domain == "textured" else (None,)
        for category, colour, position, size, texture in itertools.product(
            domain_categories(domain), COLOURS, POSITIONS, SIZES, textures
        ):
            scene = Scene(domain, category, colour, position, size, texture, variant=0)
            for style, template in TEMPLATES:
                yield scene, style, template, caption(scene, style, template)


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Every token any caption can contain, sorted (special tokens not included)."""
    return tuple(sorted({tok for *_, text in all_scene_captions() for tok in tokenize(text)}))


@functools.lru_cache(maxsize=1)
def max_caption_tokens() -> int:
    """Length in words of the longest possible caption (no bos/eos)."""
    return max(len(tokenize(text)) for *_, text in all_scene_captions())


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

_SUPERSAMPLE = 4  # shapes are drawn at 4x resolution, then box-filtered down (anti-aliasing)
_CENTRES: dict[str, tuple[float, float]] = {  # (x, y) as fractions of the image side
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
_SHAPE_RADIUS = {"small": 0.16, "large": 0.25}  # fraction of the image side
_DIGIT_SIDE = {"small": 0.36, "large": 0.6}


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits: images (N, 8, 8) in [0, 1] and labels (N,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius ``r`` centred at (cx, cy)."""

    def ring(radii: list[float], start_deg: float) -> list[tuple[float, float]]:
        angles = np.deg2rad(start_deg + 360.0 * np.arange(len(radii)) / len(radii))
        return [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for rad, a in zip(radii, angles)]

    if shape == "square":
        return ring([r] * 4, 45.0)
    if shape == "triangle":
        return ring([r] * 3, -90.0)
    if shape == "diamond":
        return ring([r] * 4, -90.0)
    if shape == "star":
        return ring([r, 0.45 * r] * 5, -90.0)
    if shape == "cross":
        w = 0.36 * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"not a polygonal shape: {shape!r}")


def _shape_alpha(scene: Scene, side: int, centre: tuple[float, float], outline: bool) -> np.ndarray:
    """Coverage (side, side) in [0, 1] of a shape, anti-aliased."""
    big = side * _SUPERSAMPLE
    cx, cy = centre[0] * _SUPERSAMPLE, centre[1] * _SUPERSAMPLE
    r = _SHAPE_RADIUS[scene.size] * big
    width = max(1, round(0.28 * r)) if outline else 0
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if scene.category == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=None if outline else 255, outline=255 if outline else None, width=width)
    else:
        points = _shape_polygon(scene.category, cx, cy, r)
        if outline:
            draw.line(points + points[:2], fill=255, width=width, joint="curve")
        else:
            draw.polygon(points, fill=255)
    small = canvas.resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _digit_alpha(scene: Scene, side: int, centre: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Coverage (side, side) in [0, 1] of a recoloured handwritten digit."""
    images, labels = _digits()
    parity = 0 if scene.digit_pool == "zoo" else 1
    (candidates,) = np.nonzero((labels == DIGITS.index(scene.category)) & (np.arange(len(labels)) % 2 == parity))
    glyph = images[rng.choice(candidates)]  # (8, 8)
    box = max(4, round(_DIGIT_SIDE[scene.size] * side))
    glyph_img = Image.fromarray((glyph * 255).astype(np.uint8)).resize((box, box), Image.Resampling.BICUBIC)
    alpha = np.zeros((side, side), dtype=np.float32)
    x0 = int(np.clip(round(centre[0] - box / 2), 0, side - box))
    y0 = int(np.clip(round(centre[1] - box / 2), 0, side - box))
    alpha[y0 : y0 + box, x0 : x0 + box] = np.asarray(glyph_img, dtype=np.float32) / 255.0
    return np.clip(alpha * 1.3, 0.0, 1.0)  # strokes of the 8x8 digits rarely reach full ink


def _background(scene: Scene, side: int, rng: np.random.Generator) -> np.ndarray:
    """Background (side, side, 3) float in [0, 255]."""
    if scene.domain == "outline":
        return np.full((side, side, 3), rng.uniform(215, 250), dtype=np.float32)
    if scene.texture is None:
        return np.full((side, side, 3), rng.uniform(0, 45), dtype=np.float32)
    lo, hi = sorted(rng.uniform(40, 140, size=2))
    hi = max(hi, lo + 35)
    yy, xx = np.mgrid[0:side, 0:side]
    period = max(2, round(side * rng.uniform(0.12, 0.25)))
    if scene.texture == "stripes":
        coord = xx if rng.random() < 0.5 else yy
        pattern = ((coord + rng.integers(period)) // (period // 2 or 1)) % 2
    elif scene.texture == "checker":
        cell = max(1, period // 2)
        pattern = ((xx // cell) + (yy // cell)) % 2
    else:  # noise: blocks of 2x2 pixels
        blocks = rng.random(((side + 1) // 2, (side + 1) // 2))
        pattern = np.kron(blocks, np.ones((2, 2)))[:side, :side]
    grey = lo + (hi - lo) * pattern.astype(np.float32)
    return np.repeat(grey[:, :, None], 3, axis=2)


def render_with_mask(scene: Scene, image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The scene's image (H, W, 3) uint8 and the object's coverage (H, W) float32 in [0, 1]."""
    rng = np.random.default_rng(scene.variant)
    side = image_size
    fx, fy = _CENTRES[scene.position]
    centre = ((fx + rng.uniform(-0.04, 0.04)) * side, (fy + rng.uniform(-0.04, 0.04)) * side)
    if scene.domain == "digits":
        alpha = _digit_alpha(scene, side, centre, rng)
    else:
        alpha = _shape_alpha(scene, side, centre, outline=scene.domain == "outline")
    colour = np.clip(np.array(COLOURS[scene.colour], dtype=np.float32) + rng.uniform(-15, 15, size=3), 0, 255)
    background = _background(scene, side, rng)  # (H, W, 3)
    image = background * (1.0 - alpha[:, :, None]) + colour[None, None, :] * alpha[:, :, None]
    return np.round(image).astype(np.uint8), alpha


def render(scene: Scene, image_size: int = 32) -> np.ndarray:
    """The scene's image, (image_size, image_size, 3) uint8."""
    return render_with_mask(scene, image_size)[0]
