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
# CUDA graphs per decoder block (Unsloth's UNSLOTH_BLOCK_CUDAGRAPHS): a step replays recorded kernels instead
# of launching ~6k of them from Python (run 30: median step 0.150 s against 0.273 s at 16 rows of ~573
# tokens, the same losses to 3 digits). Each new batch shape is recorded once (~2 s), so lengths are padded
# to 128 to meet fewer; past Unsloth's cap of shapes a layer kind compiles again without graphs (~13 s).
CUDA_GRAPHS_PAD_MULTIPLE = 128
CUDA_GRAPH_SHAPES = 16
SEED_MAX_STEPS = 60  # the tutorial's run length
# The fast recipe's length when neither epochs nor steps are set: 3 passes took SmolLM2-135M's held-out loss
# on invented facts from 1.95 to 0.65 (bench/RESULTS.md runs 25-27), and a length in epochs grows with the data
# (a fixed 60 steps trained 3% of a 50k-row set, or a 100-row set 17 times over).
DEFAULT_EPOCHS = 3.0


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
    cuda_graphs: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


# Estimates on one H200 (bench/RESULTS.md; Qwen3-0.6B-sized model, 4-bit base, Unsloth): a step costs at
# least its fixed host time, else its tokens at the recipe's steady rate. fast: 65,906-75,823 tok/s on
# ~541-token rows (runs 5-10), 0.65 s a step on short rows (run 27); seed: the anchor's ~3,000 tok/s,
# 1.33 s a step (run 27). Peak memory: fast 36-38 GiB at a 16k-token micro-batch with no gradient
# checkpointing (activations grow with the micro-batch's tokens); seed 1.05 GiB.
H200_TOKENS_PER_SECOND = {"fast": 70_000, "seed": 3_000}
H200_SECONDS_PER_STEP = {"fast": 0.65, "seed": 1.33}
H200_BASE_GIB, H200_GIB_PER_1K_MICRO_BATCH_TOKENS = 1.05, 2.2


def estimated_train_seconds(recipe: str, steps: int, tokens: float) -> float:
    """Training time on one H200 for a model of Qwen3-0.6B's size: an estimate, not a measurement."""
    return round(max(steps * H200_SECONDS_PER_STEP[recipe], tokens / H200_TOKENS_PER_SECOND[recipe]), 1)


def estimated_peak_gib(recipe: str, micro_batch_tokens: float) -> float:
    """Peak GPU memory on one H200 for a model of Qwen3-0.6B's size (seed: gradient checkpointing)."""
    if recipe == "seed":
        return H200_BASE_GIB
    return round(H200_BASE_GIB + H200_GIB_PER_1K_MICRO_BATCH_TOKENS * micro_batch_tokens / 1000, 1)


@dataclass(frozen=True)
class Duration:
    """How long a run trains: asked for in epochs or steps, resolved into optimizer steps."""

    epochs: float | None  # asked for (None: the run is sized in steps)
    max_steps: int | None  # asked for: the length, or with epochs a cap
    steps_per_epoch: int
    steps: int

    @property
    def planned_epochs(self) -> float:
        return round(self.steps / self.steps_per_epoch, 4)

    def as_dict(self) -> dict:
        return {**asdict(self), "planned_epochs": self.planned_epochs}


def micro_batches_per_epoch(rows: int, plan: BatchPlan) -> int:
    """One worker's data loader length, as the Trainer builds it: each of world_size workers gets
    ceil(rows / world_size) rows (the distributed sampler pads), in micro-batches of per_device rows (the
    last one short). Unpacked rows only: packing's length is known once TRL has packed them."""
    return math.ceil(math.ceil(rows / plan.world_size) / plan.per_device_batch_size)


def duration(settings: Settings, micro_batches_per_epoch: int, accumulation: int) -> Duration:
    """Steps for the run's epochs (capped by max_steps) or its max_steps; neither set: seed 60 steps, fast 3 epochs.
    A step is `accumulation` micro-batches, and a short last group is a step too (as the Trainer counts).
    micro_batches_per_epoch: the training data loader's length on one worker."""
    train = settings.train
    epochs, max_steps = train.epochs, train.max_steps
    if epochs is None and max_steps is None:
        epochs, max_steps = (None, SEED_MAX_STEPS) if train.recipe == "seed" else (DEFAULT_EPOCHS, None)
    per_epoch = max(math.ceil(micro_batches_per_epoch / accumulation), 1)
    steps = math.ceil(epochs * per_epoch) if epochs is not None else max_steps
    if max_steps is not None:
        steps = min(steps, max_steps)
    return Duration(epochs=epochs, max_steps=max_steps, steps_per_epoch=per_epoch, steps=max(steps, 1))


def cuda_graphs(settings: Settings, world_size: int) -> bool:
    """Whether training replays CUDA graphs per decoder block (Unsloth engine on CUDA only): the fast recipe on
    one process, unless QLORA_TRAIN__CUDA_GRAPHS says otherwise. Not with packing (a new shape every batch),
    not under DDP (not measured there yet)."""
    train = settings.train
    if train.cuda_graphs is not None:
        return train.cuda_graphs
    return train.recipe == "fast" and not train.packing and world_size == 1


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
    graphs = cuda and cuda_graphs(settings, world_size)
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
        pad_to_multiple_of=train.pad_to_multiple_of or (
            (CUDA_GRAPHS_PAD_MULTIPLE if graphs else CUDA_PAD_MULTIPLE) if cuda and not seed and not train.packing else None),
        world_size=world_size,
        rows_per_step=rows_per_step,
        learning_rate=train.learning_rate or SEED_LEARNING_RATE * scale,
        warmup_steps=warmup,
        cuda_graphs=graphs,
    )
