"""One way to turn a tuple of integers into a seed, used by every random stream in
vitexp (data order, augmentation, generated data, the trainer's per-epoch reseed,
few-shot draws), so that (seed, epoch, rank, ...) streams never collide or correlate
the way `seed + epoch` style arithmetic does. Each stream starts with its own tag."""

from __future__ import annotations

import numpy as np

# tags of the streams (the first key), so two streams of one (seed, epoch) never meet
ORDER, AUGMENT, EPOCH, FEWSHOT, HOLDOUT = 0, 1, 2, 3, 4


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the non-negative ints `keys`."""
    # the length goes first: SeedSequence alone maps (a, b) and (a, b, 0) to the same state
    state = np.random.SeedSequence([len(keys), *map(int, keys)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
