"""Batch planning: how many rows a micro-batch holds, how many micro-batches make a step, and the
learning rate and warm-up that go with that shape. Pure arithmetic on settings: no torch.

seed: the tutorial as written, 2 rows x 4 micro-batches at 2e-4, padded, in random order.
fast: one micro-batch per optimizer step holding about micro_batch_tokens tokens but at most
MAX_ROWS_PER_STEP rows, rows of similar length together so little is padding. At this model size a
step costs a fixed host overhead (kernel launches, Python), so fewer, fuller steps are what makes
training fast; fewer steps an epoch are also what makes it learn less, hence the row cap
(bench/RESULTS.md, "Recipe quality on real weights")."""

import math
from dataclasses import asdict, dataclass, replace

from job.settings import LoraSettings, ModelSettings, TrainSettings

SEED_ROWS_PER_STEP = 8  # the tutorial: 2 rows x 4 accumulation
SEED_LEARNING_RATE = 2e-4
SEED_WARMUP_STEPS = 5
SEED_ROWS_PER_DEVICE, SEED_ACCUMULATION = 2, 4
# Fewer, larger steps see the same tokens in fewer updates, so the fast recipe's learning rate grows with
# its rows a step (linear rule: the best of the rules measured at equal tokens, bench/RESULTS.md), capped.
MAX_LEARNING_RATE_SCALE = 4.0
# Rows an optimizer step takes at most (all workers together): the most that kept held-out loss on real weights
# within 2% of the seed recipe's at equal epochs (bench/RESULTS.md, "Recipe quality on real weights").
MAX_ROWS_PER_STEP = 16
ROW_TOKENS_BEFORE_MEASURING = 512  # mean row length assumed when the data has not been tokenized yet
# Every new micro-batch length costs an attention plan the first time a GPU sees it; lengths padded to a
# multiple of this repeat early, for a little more padding.
CUDA_PAD_MULTIPLE = 64
# CUDA graphs per decoder block (Unsloth's UNSLOTH_BLOCK_CUDAGRAPHS): a step replays recorded kernels instead
# of launching thousands of them from Python (bench/RESULTS.md runs 30-32). Each new batch shape is recorded
# once, so lengths are padded to 128 to meet fewer: 2,048 / 128 = 16 lengths at most, Unsloth's cap of shapes,
# past which a layer kind compiles again without graphs.
CUDA_GRAPHS_PAD_MULTIPLE = 128
CUDA_GRAPH_SHAPES = 16
SEED_MAX_STEPS = 60  # the tutorial's run length
# The fast recipe's length when neither epochs nor steps are set: a length in epochs grows with the data (60
# steps of 16 rows = 960 rows: 2% of a 50k-row set, a 100-row set 10 times over); 3 passes taught SmolLM2-135M
# invented facts (bench/RESULTS.md runs 25-27).
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


def duration(train: TrainSettings, micro_batches_per_epoch: int, accumulation: int) -> Duration:
    """Steps for the run's epochs (capped by max_steps) or its max_steps; neither set: seed 60 steps, fast 3 epochs.
    A step is `accumulation` micro-batches, and a short last group is a step too (as the Trainer counts).
    micro_batches_per_epoch: the training data loader's length on one worker."""
    epochs, max_steps = train.epochs, train.max_steps
    if epochs is None and max_steps is None:
        epochs, max_steps = (None, SEED_MAX_STEPS) if train.recipe == "seed" else (DEFAULT_EPOCHS, None)
    per_epoch = max(math.ceil(micro_batches_per_epoch / accumulation), 1)
    steps = math.ceil(epochs * per_epoch) if epochs is not None else max_steps
    if max_steps is not None:
        steps = min(steps, max_steps)
    return Duration(epochs=epochs, max_steps=max_steps, steps_per_epoch=per_epoch, steps=max(steps, 1))


def cuda_graphs(train: TrainSettings, world_size: int) -> bool:
    """Whether training replays CUDA graphs per decoder block (Unsloth engine on CUDA only): the fast recipe on
    one process, unless QLORA_TRAIN__CUDA_GRAPHS says otherwise. Not with packing (a new shape every batch),
    not under DDP (not measured there yet)."""
    if train.cuda_graphs is not None:
        return train.cuda_graphs
    return train.recipe == "fast" and not train.packing and world_size == 1


def batch_plan(train: TrainSettings, max_seq_length: int = 2048, mean_row_tokens: float | None = None, world_size: int = 1,
               dataset_rows: int | None = None, cuda: bool = False) -> BatchPlan:
    """The batch shape, learning rate and warm-up for the chosen recipe; explicit settings always win.

    Packing stays off unless asked for: without FlashAttention-2 or xformers a padding-free packed
    micro-batch is attended as one long sequence, whose cost grows with the square of its length.
    max_seq_length: the model's (QLORA_MODEL__MAX_SEQ_LENGTH), the length of a packed sequence."""
    seed = train.recipe == "seed"
    row_tokens = max(mean_row_tokens or ROW_TOKENS_BEFORE_MEASURING, 1)
    if seed:
        per_device = train.per_device_batch_size or SEED_ROWS_PER_DEVICE
    elif train.packing:
        # 16,384 tokens / 2,048 per packed sequence = 8 sequences per micro-batch
        per_device = train.per_device_batch_size or max(1, train.micro_batch_tokens // max_seq_length)
    else:
        # 16,384 tokens / ~580 tokens a row = 28 rows per micro-batch
        per_device = train.per_device_batch_size or max(1, int(train.micro_batch_tokens // row_tokens))
    if not seed and not train.packing and not train.per_device_batch_size:
        per_device = min(per_device, max(1, MAX_ROWS_PER_STEP // ((train.gradient_accumulation_steps or 1) * world_size)))
    if dataset_rows and not train.per_device_batch_size:  # a micro-batch never holds more rows than there are
        per_device = min(per_device, max(1, math.ceil(dataset_rows / world_size)))
    accumulation = train.gradient_accumulation_steps or (SEED_ACCUMULATION if seed else 1)
    graphs = cuda and cuda_graphs(train, world_size)
    rows_per_step = per_device * accumulation * world_size
    if train.packing:  # each packed sequence holds several rows
        rows_per_step *= max(1, max_seq_length // int(row_tokens))
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


# --- Memory and time: one model for any Qwen/Llama-shaped model on any card ---
# Fitted on peaks measured through engine.load_for_training (Unsloth, 4-bit base, LoRA r=16 on the 7 projections) at
# 0.6B, 4B and 8B shapes: bench/memory_probe.py's bare training loops at 4k-33k-token micro-batches on one H200, and
# the job's own runs (bench/gpu_sizes.py matrix, H100, runs 40-42) where the two differ (bench/RESULTS.md, "Memory
# model" and "runs 40-42"; tests/test_plan.py holds the peaks and checks the estimates).
GiB = 1 << 30
NF4_BYTES = 0.5 * (1 + 1 / 32)  # 4 bits a weight plus its double-quantised block scales
LORA_BYTES = 16  # fp32 weight, gradient and two Adam moments per LoRA parameter
# Bytes a micro-batch adds: fixed, then per token per (layer x intermediate unit), per hidden unit, per vocabulary entry.
# Without checkpointing every layer's activations stay: 17.9 bytes a unit in the job (4B at 9,216 tokens: 61.8 GiB,
# run 41), twice the bare loop's 9.09 (the Trainer's step keeps more; not isolated, bench/RESULTS.md runs 40-42).
# Unsloth's offloaded checkpointing keeps about one layer's and sends the rest to host memory (the job and the
# probes agree there: 4B and 8B within 10%).
ACTIVATIONS = {False: (1.05e9, 17.9, 0.0, 3.05), True: (1.0e8, 0.379, 14.2, 0.197)}
# Per-block CUDA graphs keep each recorded shape's buffers in private pools, measured on the job's 0.6B runs (18,432
# tokens): over checkpointed blocks 3.8 GiB, 0.143 of every layer's un-checkpointed activations (run 42); without
# checkpointing 7.5 GiB, about 8 blocks' worth (run 40), and slower (44.7k against 50.3k tok/s), so the plan records
# graphs only over checkpointed blocks. A block's activations = tokens x ACTIVATIONS[False]'s bytes a unit x intermediate.
GRAPH_POOL_BLOCKS = {False: 8.0, True: 0.143}  # with checkpointing: a share of all layers, not a count of blocks
HEADROOM = (0.85, 0.5)  # plan within 85% of the free memory less 0.5 GiB: allocator fragmentation, CUDA context
# A micro-batch's time = a fixed host cost (Python, kernel launches, the Trainer's bookkeeping) + its tokens' FLOPs
# at a share of the card's dense bf16 peak. The share is fitted on the probes (a bare training loop: 0.092 s of host
# a step there); the host cost on the job's own steps, where a 0.6B step at 16 rows is nearly all host
# (bench/RESULTS.md, "Memory model" and runs 29-31).
HOST_SECONDS_PER_STEP = 0.23
FLOPS_EFFICIENCY = 0.52
TIME_MODEL_MIN_TOKENS = 4096  # the smallest micro-batch those probes timed
# Replaying recorded kernels leaves about half of a step's host cost (0.6B at 16 rows: 0.273 s -> 0.150 s a step).
GRAPHS_HOST_SHARE = 0.47
GRAPHS_MARGIN = 0.05
# One-off costs a run pays beside its steps: step 1 compiles the decoder's regions (18.3-31.7 s on an H200 in runs
# 30-32, 28.9 s on an H100 in run 39's profile), and with graphs each padded length the data meets is recorded once
# (~1-3 s each, runs 30-32). Run 38 (0.6B, 3 epochs): 52.9 s of its 150.6 s were these, the rest the steady steps.
FIRST_STEP_SECONDS = 25.0
GRAPH_RECORD_SECONDS = 2.5
# Cards batch clusters hand out: memory as CUDA reports it (GiB; the datasheets' 80, 141, 40, 48 and 24 GB) and
# dense bf16 tensor FLOP/s without sparsity, from NVIDIA's datasheets. The A10G (AWS) has no datasheet of its own:
# the A10's 125 TFLOP/s.
GPUS = {"H100": (79.6, 989e12), "H200": (140.4, 989e12), "A100-80GB": (80.0, 312e12), "A100-40GB": (40.0, 312e12),
        "L40S": (45.0, 362e12), "L4": (22.5, 121e12), "A10G": (22.5, 125e12)}
CUDA_CONTEXT_GIB = 0.6  # what the CUDA context and libraries take before the job allocates (a planned card's free memory)


@dataclass(frozen=True)
class ModelShape:
    """What memory and FLOPs depend on, read from a model's config.json (no weights)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers config or its dict (Qwen2/3, Llama, Mistral names)."""
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
        heads, hidden = get("num_attention_heads"), get("hidden_size")
        return cls(layers=get("num_hidden_layers"), hidden=hidden, intermediate=get("intermediate_size"), heads=heads,
                   kv_heads=get("num_key_value_heads") or heads, head_dim=get("head_dim") or hidden // heads,
                   vocab=get("vocab_size"), tied=bool(get("tie_word_embeddings", False)))

    @property
    def linear_params(self) -> int:
        """The decoder's projections: q and o, k and v, gate, up and down, in every layer."""
        attention = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params

    def lora_params(self, r: int) -> int:
        """LoRA on the 7 projections: r x (inputs + outputs) each."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * r * (2 * (self.hidden + q) + 2 * (self.hidden + kv) + 3 * (self.hidden + self.intermediate))

    def flops_per_token(self, checkpointing: bool) -> float:
        """Forward 2N and backward 2N (activation gradients only: the base is frozen), +2N to recompute with
        checkpointing; N = the projections and the LM head."""
        return (6 if checkpointing else 4) * (self.linear_params + self.vocab * self.hidden)


def estimated_peak_gib(shape: ModelShape, micro_batch_tokens: int, checkpointing: bool, *, cuda_graphs: bool = False,
                       load_in_4bit: bool = True, lora_r: int = 16) -> float:
    """Peak GPU memory (torch's max allocated) of training one micro-batch of this many tokens (padding included)."""
    weights = shape.linear_params * (NF4_BYTES if load_in_4bit else 2) + shape.embedding_params * 2
    fixed, per_layer_unit, per_hidden, per_vocab = ACTIVATIONS[checkpointing]
    per_token = per_layer_unit * shape.layers * shape.intermediate + per_hidden * shape.hidden + per_vocab * shape.vocab
    total = weights + shape.lora_params(lora_r) * LORA_BYTES + fixed + micro_batch_tokens * per_token
    if cuda_graphs:
        total += graph_pool_bytes(shape, micro_batch_tokens, checkpointing)
    return total / GiB


def graph_pool_bytes(shape: ModelShape, micro_batch_tokens: int, checkpointing: bool) -> float:
    """The graph pools of a run whose largest micro-batch holds this many tokens."""
    per_block = micro_batch_tokens * ACTIVATIONS[False][1] * shape.intermediate
    return GRAPH_POOL_BLOCKS[checkpointing] * (shape.layers if checkpointing else 1) * per_block


def host_seconds(cuda_graphs: bool, host: float = HOST_SECONDS_PER_STEP) -> float:
    """A micro-batch's fixed host cost, less where graphs replay its kernels."""
    return host * (GRAPHS_HOST_SHARE if cuda_graphs else 1)


def seconds_per_token(shape: ModelShape, checkpointing: bool, flops: float) -> float:
    """GPU seconds a token: its FLOPs at the fitted share of the card's dense bf16 peak."""
    return shape.flops_per_token(checkpointing) / (FLOPS_EFFICIENCY * flops)


def estimated_step_seconds(shape: ModelShape, tokens: float, checkpointing: bool, flops: float, cuda_graphs: bool = False,
                           host: float = HOST_SECONDS_PER_STEP) -> float:
    """One micro-batch of this many tokens on a card of `flops` dense bf16 FLOP/s."""
    return host_seconds(cuda_graphs, host) + tokens * seconds_per_token(shape, checkpointing, flops)


def estimated_train_seconds(shape: ModelShape, steps: int, micro_batches_per_step: int, tokens: float, checkpointing: bool,
                            flops: float, cuda_graphs: bool, one_off: float) -> float:
    """A run's training time: the one-off compiles (and recordings), every micro-batch's host cost, and its tokens'
    FLOPs at the fitted share of the card's peak."""
    return round(one_off + steps * micro_batches_per_step * host_seconds(cuda_graphs)
                 + tokens * seconds_per_token(shape, checkpointing, flops), 1)


def host_bound(shape: ModelShape, tokens: float, flops: float) -> bool:
    """Whether launching the step costs more than computing it: only then do CUDA graphs pay (they save host
    time and cost memory; at 8B a step is the GPU's, bench/RESULTS.md)."""
    return tokens * seconds_per_token(shape, False, flops) < HOST_SECONDS_PER_STEP


def card(name: str) -> tuple[str, float, float]:
    """(name, memory GiB, dense bf16 FLOP/s) of a card named as GPUS does or as CUDA reports it
    ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"); an unknown card counts as an H100."""
    upper = name.upper().replace(" ", "")
    for known in sorted(GPUS, key=len, reverse=True):
        model, _, memory = known.partition("-")
        if model in upper and (not memory or memory in upper):
            return known, *GPUS[known]
    return "H100", *GPUS["H100"]


@dataclass(frozen=True)
class MemoryFit:
    """What the fast recipe chose for the card it runs on, and why."""

    micro_batch_tokens: int  # rows x the longest row's padded length: the largest micro-batch the run meets
    gradient_checkpointing: bool
    cuda_graphs: bool
    peak_gpu_memory_gib: float
    budget_gib: float
    host_bound: bool
    step_seconds: float  # estimated for a step of the largest micro-batches
    card: str = "H100"
    seconds_per_token: float = 0.0  # the time model's GPU seconds a token, for this model, recipe and card
    host_seconds: float = HOST_SECONDS_PER_STEP  # its host seconds a micro-batch (less with graphs)
    one_off_seconds: float = FIRST_STEP_SECONDS  # step 1's compiles and, with graphs, each length's recording

    def train_seconds(self, micro_batches: int, tokens: float) -> float:
        """The time model's training seconds for this many micro-batches holding this many tokens in all."""
        return round(self.one_off_seconds + micro_batches * self.host_seconds + tokens * self.seconds_per_token, 1)

    def as_dict(self) -> dict:
        return asdict(self)


def fit_to_card(plan: BatchPlan, shape: ModelShape, row_tokens: int, free_gib: float, flops: float, *,
                checkpointing: bool | None = None, cuda_graphs: bool | None = None, per_device_fixed: bool = False,
                lora_r: int = 16, load_in_4bit: bool = True, card_name: str = "H100") -> tuple[BatchPlan, MemoryFit]:
    """The batch plan made to fit the free memory: of the (rows a micro-batch, checkpointing, CUDA graphs) choices
    whose estimate fits, the one the time model says is fastest a step (fewer rows a micro-batch means more of them a
    step: the rows a step and the learning rate stay); nothing fits: the smallest. Graphs are a choice only where the
    plan allows them, the blocks are checkpointed and the step is host-bound. `checkpointing` and `cuda_graphs` None:
    chosen here; True or False: as set (the settings win). `row_tokens`: the longest row, padded."""
    budget = free_gib * HEADROOM[0] - HEADROOM[1]
    choices = [False, True] if checkpointing is None else [checkpointing]
    rows_options = [plan.per_device_batch_size] if per_device_fixed else [
        d for d in range(plan.per_device_batch_size, 0, -1) if plan.per_device_batch_size % d == 0]

    def peak(rows: int, ckpt: bool, graphs: bool = False) -> float:
        return estimated_peak_gib(shape, rows * row_tokens, ckpt, cuda_graphs=graphs, load_in_4bit=load_in_4bit, lora_r=lora_r)

    def step_seconds(rows: int, ckpt: bool, graphs: bool) -> float:
        return plan.per_device_batch_size // rows * estimated_step_seconds(shape, rows * row_tokens, ckpt, flops, graphs)

    # Options: rows a micro-batch x checkpointing x graphs (only where allowed, over checkpointed blocks, the step is the
    # host's and the pools fit)
    graph_choices = [cuda_graphs] if cuda_graphs is not None else [False, True] if plan.cuda_graphs else [False]
    fitting = [(r, c, g) for r in rows_options for c in choices for g in graph_choices if peak(r, c, g) <= budget
               and (not g or cuda_graphs or (c and host_bound(shape, r * row_tokens, flops)))]
    # Below the micro-batches the time model was fitted on its figures are guesses: those are a last resort.
    measured = [o for o in fitting if o[0] * row_tokens >= TIME_MODEL_MIN_TOKENS or o[0] == plan.per_device_batch_size]
    # Graphs must win by GRAPHS_MARGIN: their pools and recordings are the least measured part of the model.
    rows, ckpt, graphs = (min(measured, key=lambda o: (step_seconds(*o) * (1 + GRAPHS_MARGIN * o[2]), -o[0])) if measured
                          else fitting[0] if fitting else (rows_options[-1], choices[-1], graph_choices[0]))
    tokens = rows * row_tokens
    bound = host_bound(shape, tokens, flops)
    accumulation = plan.gradient_accumulation_steps * plan.per_device_batch_size // rows
    fitted = replace(plan, per_device_batch_size=rows, gradient_accumulation_steps=accumulation, cuda_graphs=graphs,
                     pad_to_multiple_of=plan.pad_to_multiple_of if graphs or plan.pad_to_multiple_of != CUDA_GRAPHS_PAD_MULTIPLE
                     else CUDA_PAD_MULTIPLE)
    return fitted, MemoryFit(micro_batch_tokens=tokens, gradient_checkpointing=ckpt, cuda_graphs=graphs,
                             peak_gpu_memory_gib=round(peak(rows, ckpt, graphs), 2), budget_gib=round(budget, 2), host_bound=bound,
                             step_seconds=round(accumulation * estimated_step_seconds(shape, tokens, ckpt, flops, graphs), 3),
                             card=card_name, seconds_per_token=seconds_per_token(shape, ckpt, flops), host_seconds=host_seconds(graphs),
                             one_off_seconds=one_off_seconds(graphs, row_tokens, fitted.pad_to_multiple_of))


def one_off_seconds(cuda_graphs: bool, row_tokens: int, pad_to_multiple_of: int | None) -> float:
    """Step 1's compiles, and with graphs a recording for each padded length up to the longest row."""
    lengths = math.ceil(row_tokens / (pad_to_multiple_of or CUDA_GRAPHS_PAD_MULTIPLE))
    return FIRST_STEP_SECONDS + (lengths * GRAPH_RECORD_SECONDS if cuda_graphs else 0.0)


def row_tokens(plan: BatchPlan, longest_row_tokens: int, max_seq_length: int) -> int:
    """The longest row as a micro-batch holds it (padded); max_seq_length for packed sequences or before the rows are
    measured (0)."""
    if plan.packing or not longest_row_tokens:
        return max_seq_length
    return padded(longest_row_tokens, plan.pad_to_multiple_of, max_seq_length)


def fit_to_settings(plan: BatchPlan, shape: ModelShape, longest_row_tokens: int, free_gib: float, flops: float, card_name: str,
                    model: ModelSettings, lora: LoraSettings, train: TrainSettings) -> tuple[BatchPlan, MemoryFit]:
    """fit_to_card as the settings ask: a set gradient checkpointing, CUDA graphs or micro-batch is kept."""
    choice = lora.gradient_checkpointing
    return fit_to_card(plan, shape, row_tokens(plan, longest_row_tokens, model.max_seq_length), free_gib, flops,
                       checkpointing=None if choice == "auto" else choice != "false", cuda_graphs=train.cuda_graphs,
                       per_device_fixed=train.per_device_batch_size is not None, lora_r=lora.r, load_in_4bit=model.load_in_4bit,
                       card_name=card_name)


def padded(tokens: int, multiple: int | None, max_length: int) -> int:
    """A row's length as a micro-batch holds it: padded up to the multiple, never past max_length."""
    return min(max_length, math.ceil(tokens / multiple) * multiple) if multiple else min(tokens, max_length)


def out_of_memory_advice(plan: BatchPlan, fit: MemoryFit | None, max_seq_length: int) -> str:
    """The one setting to change after running out of GPU memory, with a value that fits better."""
    if plan.cuda_graphs:
        return "set QLORA_TRAIN__CUDA_GRAPHS=false (their pools hold memory)"
    if fit is not None and not fit.gradient_checkpointing:
        return "set QLORA_LORA__GRADIENT_CHECKPOINTING=unsloth"
    if plan.per_device_batch_size > 1:
        rows = plan.per_device_batch_size // 2
        return (f"set QLORA_TRAIN__PER_DEVICE_BATCH_SIZE={rows} and QLORA_TRAIN__GRADIENT_ACCUMULATION_STEPS="
                f"{plan.gradient_accumulation_steps * plan.per_device_batch_size // rows} (the same rows a step)")
    return f"set QLORA_MODEL__MAX_SEQ_LENGTH={max(256, max_seq_length // 2)} (one row a micro-batch already)"
