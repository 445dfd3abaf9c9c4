"""Batch planning: how many rows a micro-batch holds, how many micro-batches make a step, and the
learning rate and warm-up that go with that shape. Pure arithmetic on settings: no torch.

seed: the tutorial as written, 2 rows x 4 micro-batches at 2e-4, padded, in random order.
fast: one micro-batch per optimizer step holding about micro_batch_tokens tokens but at most
MAX_ROWS_PER_STEP rows, rows of similar length together so little is padding. At this model size a
step costs a fixed host overhead (kernel launches, Python), so fewer, fuller steps are what makes
training fast; fewer steps an epoch are also what makes it learn less, hence the row cap
(bench/RESULTS.md, "Recipe quality on real weights")."""

import math
from dataclasses import asdict, dataclass

from job.settings import Settings

SEED_ROWS_PER_STEP = 8  # the tutorial: 2 rows x 4 accumulation
SEED_LEARNING_RATE = 2e-4
SEED_WARMUP_STEPS = 5
SEED_ROWS_PER_DEVICE, SEED_ACCUMULATION = 2, 4
# Fewer, larger steps see the same tokens in fewer updates, so the fast recipe's learning rate grows with
# its rows a step (linear rule: the best of the rules measured at equal tokens, bench/RESULTS.md), capped.
MAX_LEARNING_RATE_SCALE = 4.0
# Rows an optimizer step takes at most (all workers together): held-out loss on real weights at equal
# epochs was +1.8% against the seed recipe at 16 rows, +6.1% at 32 and +140% at 286 (short rows).
MAX_ROWS_PER_STEP = 16
ROW_TOKENS_BEFORE_MEASURING = 512  # mean row length assumed when the data has not been tokenized yet
# Every new micro-batch length costs an attention plan the first time a GPU sees it; lengths padded to a
# multiple of this repeat early, for a little more padding.
CUDA_PAD_MULTIPLE = 64


@dataclass(frozen=True)
class BatchPlan:
    per_device_batch_size: int
    gradient_accumulation_steps: int
    packing: bool
    sampling: str  # "group_by_length" or "random"
    pad_to_multiple_of: int | None
    world_size: int
    rows_per_step: int
    learning_rate: float
    warmup_steps: int

    def as_dict(self) -> dict:
        return asdict(self)


def batch_plan(settings: Settings, mean_row_tokens: float | None = None, world_size: int = 1,
               dataset_rows: int | None = None, cuda: bool = False) -> BatchPlan:
    """The batch shape, learning rate and warm-up for the chosen recipe; explicit settings always win.

    Packing stays off unless asked for: without FlashAttention-2 or xformers a padding-free packed
    micro-batch is attended as one long sequence, whose cost grows with the square of its length."""
    train = settings.train
    seed = train.recipe == "seed"
    row_tokens = max(mean_row_tokens or ROW_TOKENS_BEFORE_MEASURING, 1)
    if seed:
        per_device = train.per_device_batch_size or SEED_ROWS_PER_DEVICE
    elif train.packing:
        # 16,384 tokens / 2,048 per packed sequence = 8 sequences per micro-batch
        per_device = train.per_device_batch_size or max(1, train.micro_batch_tokens // settings.model.max_seq_length)
    else:
        # 16,384 tokens / ~580 tokens a row = 28 rows per micro-batch
        per_device = train.per_device_batch_size or max(1, int(train.micro_batch_tokens // row_tokens))
    if not seed and not train.packing and not train.per_device_batch_size:
        per_device = min(per_device, max(1, MAX_ROWS_PER_STEP // ((train.gradient_accumulation_steps or 1) * world_size)))
    if dataset_rows and not train.per_device_batch_size:  # a micro-batch never holds more rows than there are
        per_device = min(per_device, max(1, math.ceil(dataset_rows / world_size)))
    accumulation = train.gradient_accumulation_steps or (SEED_ACCUMULATION if seed else 1)
    rows_per_step = per_device * accumulation * world_size
    if train.packing:  # each packed sequence holds several rows
        rows_per_step *= max(1, settings.model.max_seq_length // int(row_tokens))
    scale = 1.0 if seed else min(MAX_LEARNING_RATE_SCALE, max(1.0, rows_per_step / SEED_ROWS_PER_STEP))
    # Warm-up covers the same rows as the seed's 5 steps of 8.
    warmup = train.warmup_steps if train.warmup_steps is not None else (
        SEED_WARMUP_STEPS if seed else max(1, math.ceil(SEED_WARMUP_STEPS * SEED_ROWS_PER_STEP / rows_per_step)))
    return BatchPlan(
        per_device_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        packing=train.packing,
        sampling="group_by_length" if not seed and not train.packing else "random",
        pad_to_multiple_of=train.pad_to_multiple_of or (CUDA_PAD_MULTIPLE if cuda and not seed and not train.packing else None),
        world_size=world_size,
        rows_per_step=rows_per_step,
        learning_rate=train.learning_rate or SEED_LEARNING_RATE * scale,
        warmup_steps=warmup,
    )
