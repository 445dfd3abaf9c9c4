"""Batch planning (job/plan.py): pure arithmetic on settings, no torch, no data."""

import pytest

from job.plan import BatchPlan, batch_plan, duration, micro_batches_per_epoch
from job.settings import Settings


def settings(**train) -> Settings:
    return Settings(dataset_uri="s3://data/train.jsonl", output_uri="s3://models/runs", train=train)


def test_seed_recipe_is_the_tutorials_two_by_four_at_2e_4(clean_env):
    assert batch_plan(settings(recipe="seed")) == BatchPlan(
        per_device_batch_size=2, gradient_accumulation_steps=4, packing=False, sampling="random", pad_to_multiple_of=None,
        world_size=1, rows_per_step=8, learning_rate=2e-4, warmup_steps=5)
    # The seed recipe keeps its learning rate and shape on a GPU and on two of them (rows a step double).
    two = batch_plan(settings(recipe="seed"), mean_row_tokens=580, world_size=2, cuda=True)
    assert (two.rows_per_step, two.learning_rate, two.warmup_steps, two.pad_to_multiple_of) == (16, 2e-4, 5, None)


def test_fast_recipe_fills_one_micro_batch_of_similar_length_rows_per_step(clean_env, monkeypatch):
    s = settings()
    # 16,384-token budget / 1,100 tokens a row = 14 rows, one micro-batch a step, length-grouped;
    # 14 rows instead of the seed's 8: learning rate x 1.75, warm-up over 40 rows = 3 steps.
    plan = batch_plan(s, mean_row_tokens=1100).as_dict()
    assert plan.pop("learning_rate") == pytest.approx(2e-4 * 1.75)
    assert plan == {"per_device_batch_size": 14, "gradient_accumulation_steps": 1, "packing": False, "sampling": "group_by_length",
                    "pad_to_multiple_of": None, "world_size": 1, "rows_per_step": 14, "warmup_steps": 3, "cuda_graphs": False}
    # On a GPU each decoder block replays CUDA graphs, one recording a batch shape: lengths are padded to a
    # multiple of 128 so few shapes repeat; without graphs (two processes, or turned off) to 64.
    gpu = batch_plan(s, mean_row_tokens=580, cuda=True)
    assert (gpu.cuda_graphs, gpu.pad_to_multiple_of) == (True, 128)
    for plan in (batch_plan(s, mean_row_tokens=580, world_size=2, cuda=True),
                 batch_plan(settings(cuda_graphs=False), mean_row_tokens=580, cuda=True)):
        assert (plan.cuda_graphs, plan.pad_to_multiple_of) == (False, 64)
    assert not batch_plan(settings(packing=True), cuda=True).cuda_graphs and not batch_plan(settings(recipe="seed"), cuda=True).cuda_graphs
    assert batch_plan(settings(cuda_graphs=True, recipe="seed"), cuda=True).cuda_graphs, "an explicit setting wins"
    # Shorter rows would fill the budget with more rows (28 of 580 tokens, 819 of 20): a step takes at most
    # 16 (held-out loss on real weights, bench/RESULTS.md), at twice the seed's rate; two GPUs share them.
    for row_tokens in (580, 20):
        plan = batch_plan(s, mean_row_tokens=row_tokens)
        assert (plan.per_device_batch_size, plan.rows_per_step, plan.learning_rate, plan.warmup_steps) == (16, 16, pytest.approx(4e-4), 3)
    two = batch_plan(s, mean_row_tokens=580, world_size=2)
    assert (two.per_device_batch_size, two.rows_per_step, two.learning_rate) == (8, 16, pytest.approx(4e-4))
    assert batch_plan(settings(per_device_batch_size=64), mean_row_tokens=20).rows_per_step == 64, "explicit settings win"
    explicit = batch_plan(settings(learning_rate=1e-3, warmup_steps=0, pad_to_multiple_of=8), mean_row_tokens=580, cuda=True)
    assert (explicit.learning_rate, explicit.warmup_steps, explicit.pad_to_multiple_of) == (1e-3, 0, 8)
    plan = batch_plan(settings(packing=True, micro_batch_tokens=65536, gradient_accumulation_steps=2))
    assert (plan.per_device_batch_size, plan.gradient_accumulation_steps, plan.packing, plan.sampling) == (32, 2, True, "random")


def test_a_micro_batch_never_holds_more_rows_than_the_dataset_has(clean_env):
    # 10 rows of 100 tokens: the budget would take 163; the plan takes all 10, or 5 a worker on two.
    assert batch_plan(settings(), mean_row_tokens=100, dataset_rows=10).per_device_batch_size == 10
    assert batch_plan(settings(), mean_row_tokens=100, dataset_rows=10, world_size=2).per_device_batch_size == 5
    # 10 rows a step: lr 2e-4 x 10 / 8, warm-up ceil(40 / 10) = 4 steps.
    plan = batch_plan(settings(), mean_row_tokens=100, dataset_rows=10)
    assert (plan.learning_rate, plan.warmup_steps) == (pytest.approx(2.5e-4), 4)
    # An explicit batch size is taken as given.
    assert batch_plan(settings(per_device_batch_size=64), dataset_rows=10).per_device_batch_size == 64


def test_packed_rows_a_step_count_rows_not_sequences(clean_env):
    # 8 packed sequences of 2,048 tokens, each ~4 rows of 512 tokens: 32 rows a step, lr at the 4x cap.
    plan = batch_plan(settings(packing=True), mean_row_tokens=512)
    assert (plan.per_device_batch_size, plan.rows_per_step, plan.learning_rate, plan.warmup_steps) == (8, 32, pytest.approx(8e-4), 2)


def test_before_the_data_is_measured_rows_are_taken_as_512_tokens(clean_env):
    assert batch_plan(settings(micro_batch_tokens=4096)).per_device_batch_size == 4096 // 512
    assert batch_plan(settings(micro_batch_tokens=64), mean_row_tokens=0.5).per_device_batch_size == 16  # 64 / max(0.5, 1), capped


def test_a_run_is_sized_in_epochs_by_default_and_the_seed_keeps_its_60_steps(clean_env):
    # fast, 1,000 rows, 16 a step: 63 micro-batches an epoch (the last one short), 3 epochs = 189 steps.
    plan = batch_plan(settings(), mean_row_tokens=100, dataset_rows=1000)
    batches = micro_batches_per_epoch(1000, plan)
    assert batches == 63
    d = duration(settings(), batches, plan.gradient_accumulation_steps)
    assert (d.epochs, d.max_steps, d.steps_per_epoch, d.steps, d.planned_epochs) == (3.0, None, 63, 189, 3.0)
    # The data decides the length: 100 rows train 21 steps, 50,000 rows 9,375.
    assert duration(settings(), micro_batches_per_epoch(100, plan), 1).steps == 21
    assert duration(settings(), micro_batches_per_epoch(50_000, plan), 1).steps == 9375
    # Fractions, and max_steps as a cap; max_steps alone is the length, whatever the data.
    assert duration(settings(epochs=0.5), 63, 1).steps == 32
    assert duration(settings(epochs=2, max_steps=100), 63, 1).steps == 100
    assert duration(settings(max_steps=7), 63, 1).as_dict() == {"epochs": None, "max_steps": 7, "steps_per_epoch": 63, "steps": 7,
                                                                "planned_epochs": round(7 / 63, 4)}
    # seed: 2 rows x 4 micro-batches; 1,000 rows = 500 micro-batches = 125 steps an epoch, but 60 steps unless asked.
    seed = batch_plan(settings(recipe="seed"), dataset_rows=1000)
    assert micro_batches_per_epoch(1000, seed) == 500
    assert duration(settings(recipe="seed"), 500, 4).steps == 60
    assert duration(settings(recipe="seed", epochs=1), 500, 4).steps == 125
    # A short last group of micro-batches is a step, as the Trainer counts: 501 micro-batches = 126 steps.
    assert duration(settings(recipe="seed", epochs=1), 501, 4).steps == 126
    # Two workers share the rows (the sampler pads to an even share): 1,000 rows = 500 each = 63 micro-batches of 8.
    two = batch_plan(settings(), mean_row_tokens=100, dataset_rows=1000, world_size=2)
    assert micro_batches_per_epoch(1000, two) == 63 and micro_batches_per_epoch(1001, two) == 63
