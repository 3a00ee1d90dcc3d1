"""Several sources in one training set, each contributing rows in proportion to its weight.

The mix is as large as all sources' usable rows together. Source i contributes
`round(total * weight_i / sum of weights)` rows (at least one): whole passes over it in order, then a
sample without repeats of the remainder, seeded by (seed, i). So a source is repeated only after all its
rows are in, the mix is a pure function of the sources, weights and seed (identical on every rank and
every restart), and a single source is taken exactly as it is.
"""

import numpy as np
from datasets import Dataset, concatenate_datasets

MIX_STREAM = 1  # random stream of the mix: distinct from the loader's per-epoch streams


def mix_counts(rows: list[int], weights: list[float]) -> list[int]:
    """How many rows each source contributes to a mix of `sum(rows)` rows."""
    total, weight_sum = sum(rows), sum(weights)
    return [max(1, round(total * weight / weight_sum)) for weight in weights]


def source_indices(rows: int, taken: int, seed: int, source: int) -> np.ndarray:
    """Row indices filling `taken` places from a source of `rows` rows: whole passes, then a seeded sample."""
    passes, rest = divmod(taken, rows)
    sample = np.random.default_rng([seed, MIX_STREAM, source]).choice(rows, size=rest, replace=False)
    return np.concatenate([np.tile(np.arange(rows), passes), np.sort(sample)]).astype(np.int64)


def mix(parts: list[Dataset], weights: list[float], seed: int) -> tuple[Dataset, list[int]]:
    """The sources' rows mixed by weight (source order kept: later stages shuffle), and the rows taken from each."""
    taken = mix_counts([len(part) for part in parts], weights)
    if len(parts) == 1:
        return parts[0], taken
    chosen = [part.select(source_indices(len(part), count, seed, i)) for i, (part, count) in
              enumerate(zip(parts, taken, strict=True))]
    return concatenate_datasets(chosen), taken
