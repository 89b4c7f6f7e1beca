"""splitmix64's finalizer over numpy uint64: the stable, well-spread 64-bit mix the data stages share.

featurize hashes user ids into shards and splits with it; synth turns (seed, kind, number)
into sparse ids with it. Each caller adds its own offset first. (embeddings/ids.py has the
torch version, for ids on the training hot path.)
"""
import numpy as np


def mix64(z: np.ndarray) -> np.ndarray:
    """[n] uint64 -> [n] uint64, the same on every machine (products wrap mod 2^64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
