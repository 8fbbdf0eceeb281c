"""The validation split every training stage makes the same way: shuffled with --seed, a count or a fraction."""

from medlora.errors import MedLoRAError


def split_validation(items: list, val_set_size: float, seed: int, what: str = "records") -> tuple:
    """(train, validation), shuffled with seed; val_set_size is a count, or a fraction when below 1."""
    import random

    items = list(items)
    random.Random(seed).shuffle(items)
    val_count = int(val_set_size * len(items)) if 0 < val_set_size < 1 else int(val_set_size)
    if val_count >= len(items):
        raise MedLoRAError(f"--val_set_size {val_set_size} leaves no training {what} out of {len(items)}")
    return items[val_count:], items[:val_count]
