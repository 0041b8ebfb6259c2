"""`shapes`: a built-in image-classification data set, generated from a seed.

A 2D analogue of mnist1d for inductive-bias studies: small enough to generate in
seconds on a laptop, hard enough that the architecture's priors show. Each class
is a 5x5 glyph (plus, X, diamond ring, bar pair, L-corner, checker, triangle, T,
block, Z) drawn at a random position, as drawn or mirrored, in the image's
foreground colour, with each glyph cell 2x2 pixels at 32 px, over clutter:

- background: a random base colour plus smooth colour noise (a 5x5 grid upsampled);
- distractors: 1-2 straight line strokes drawn in the SAME colour as the glyph, so
  only the shape tells the glyph apart (two crossing strokes can mimic a plus, as
  clutter mimics objects in natural images);
- a second copy of the class glyph in half of the images, then pixel noise.

Why this design: the label is a property of one small local pattern at an
unknown place, as with objects in natural images, so locality and translation
equivariance (a CNN's priors) are worth data, and a ViT has to learn them from
examples. Nothing global gives the class away: colour, contrast and position are
drawn independently of it and glyphs have similar pixel counts (8-13 cells), so a
linear probe on raw pixels is near chance. Horizontal flips keep the label
(mirrors are variants of the same class, no glyph is the mirror of another).
The knobs below were set so that the smallest models learn it far below chance
in three epochs of 5,000 images on a CPU, yet a ViT_P needs more images than a CNN.

At other image sizes every object is scaled by round(2 * size/32) (at least 1), so
the task stays the same task at a higher resolution. Images are generated in fixed chunks
seeded by (seed, chunk), so `make_shapes(n, s)` is a prefix of `make_shapes(m, s)`
for n < m: asking for more data never changes the images already there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitexp.seeds import derive_seed
from vitexp.errors import UserError

GLYPHS = (  # 5x5, one per class; '#' is ink
    "..#.. ..#.. ##### ..#.. ..#..",  # plus
    "#...# .#.#. ..#.. .#.#. #...#",  # X
    "..#.. .#.#. #...# .#.#. ..#..",  # diamond ring
    ".#.#. .#.#. .#.#. .#.#. .#.#.",  # bar pair
    "#.... #.... #.... #.... #####",  # L-corner
    "#.#.# .#.#. #.#.# .#.#. #.#.#",  # checker
    "....# ...## ..#.# .#..# #####",  # triangle
    "##### ..#.. ..#.. ..#.. ..#..",  # T
    "..... .###. .###. .###. .....",  # block
    "##### ...#. ..#.. .#... #####",  # Z
)
GLYPH = 5  # glyph box side at 32 px
CHUNK = 2048  # images per independently seeded chunk (the prefix property's unit)
MAX_DISTRACTORS = 2  # 1..MAX strokes per image
VARIANTS = 2  # glyph variants per class: as drawn, mirrored (8: all rotations too)
SMOOTH_NOISE = 0.08  # std of the smooth background colour noise
PIXEL_NOISE = 0.04  # std of the per-pixel noise
SCALE = 2  # object pixels per glyph cell at 32 px


def _glyph_variants(num_classes: int) -> torch.Tensor:
    """(K, 8, 5, 5) float: each glyph in its 4 rotations and their mirrors."""
    bank = []
    for text in GLYPHS[:num_classes]:
        g = torch.tensor([[c == "#" for c in row] for row in text.split()], dtype=torch.float32)
        rots = [torch.rot90(g, k) for k in range(4)]
        bank.append(torch.stack([v for r in rots for v in (r, r.flip(-1))]))
    return torch.stack(bank)


def _strokes() -> torch.Tensor:
    """(S, 5, 5) float: straight strokes of length 2-5 (horizontal, vertical, both diagonals)."""
    out = []
    for length in range(2, GLYPH + 1):
        for kind in range(4):
            s = torch.zeros(GLYPH, GLYPH)
            for i in range(length):
                r, c = [(2, i), (i, 2), (i, i), (i, GLYPH - 1 - i)][kind]
                s[r, c] = 1
            out.append(s)
    return torch.stack(out)


def _chunk(seed: int, index: int, image_size: int, channels: int, num_classes: int):
    """One chunk of CHUNK images, a pure function of (seed, index, sizes)."""
    g = torch.Generator().manual_seed(derive_seed(seed, index))
    m, h, k = CHUNK, image_size, num_classes

    def rand(*shape):
        return torch.rand(shape, generator=g)

    def randint(high, *shape):
        return torch.randint(0, high, shape, generator=g)

    y = (torch.arange(m) % k)[torch.randperm(m, generator=g)]  # balanced within every chunk

    # objects: 2 glyph slots (the 2nd visible in half the images) + distractor slots
    variants = _glyph_variants(k)
    glyphs = variants[y[:, None], randint(VARIANTS, m, 2)]  # (m, 2, 5, 5)
    strokes = _strokes()
    distractors = strokes[randint(len(strokes), m, MAX_DISTRACTORS)]
    objects = torch.cat([glyphs, distractors], 1)  # (m, n_obj, 5, 5)
    n_obj = objects.shape[1]
    alpha = 0.6 + 0.4 * rand(m, n_obj)  # per-object contrast
    alpha[:, 1] *= rand(m) < 0.5  # second glyph copy in half the images
    n_distract = 1 + randint(MAX_DISTRACTORS, m)  # 1..MAX visible distractors
    alpha[:, 2:] *= torch.arange(MAX_DISTRACTORS)[None] < n_distract[:, None]

    scale = max(1, round(SCALE * h / 32))
    if scale > 1:  # same task at a higher resolution: scale every object
        objects = objects.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    box = GLYPH * scale
    # paste all objects in one scatter: every object lies completely inside the image
    pos = randint(h - box + 1, m, n_obj, 2)
    ar = torch.arange(box)
    rows = (pos[..., 0, None, None] + ar[:, None]).expand(m, n_obj, box, box)
    cols = (pos[..., 1, None, None] + ar[None, :]).expand(m, n_obj, box, box)
    img_idx = torch.arange(m)[:, None, None, None].expand_as(rows)
    ink = torch.zeros(m, h, h).index_put_((img_idx, rows, cols), objects * alpha[..., None, None],
                                          accumulate=True).clamp_(max=1)[:, None]

    base = 0.05 + 0.45 * rand(m, channels, 1, 1)
    smooth = F.interpolate(SMOOTH_NOISE * torch.randn(m, channels, 5, 5, generator=g), size=(h, h),
                           mode="bilinear", align_corners=False)
    fg = base + 0.35 + 0.25 * rand(m, channels, 1, 1)  # ink is lighter than the background
    img = (base + smooth) * (1 - ink) + fg * ink + PIXEL_NOISE * torch.randn(m, channels, h, h, generator=g)
    x = img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return x, y


def make_shapes(n: int, seed: int, image_size: int = 32, channels: int = 3,
                num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images (uint8 (n, C, H, W)) and labels (int64 (n,)) of the shapes task."""
    if not 2 <= num_classes <= len(GLYPHS):
        raise UserError(f"shapes has 2 to {len(GLYPHS)} classes, got {num_classes}")
    if image_size < GLYPH * 2:
        raise UserError(f"shapes needs an image size of at least {GLYPH * 2}, got {image_size}")
    chunks = [_chunk(seed, i, image_size, channels, num_classes) for i in range(-(-n // CHUNK))]
    x = torch.cat([c[0] for c in chunks])[:n]
    y = torch.cat([c[1] for c in chunks])[:n]
    return x, y
