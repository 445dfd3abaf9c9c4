"""Peak GPU memory and step time of the job's own training load (engine.load_for_training: Unsloth, 4-bit base,
LoRA r=16 on the 7 projections) at several micro-batch shapes: the measurements job/plan.py's memory model is
fitted on (bench/RESULTS.md, "Memory model").

    python bench/memory_probe.py MODEL_DIR OUT.json --gc 0|1 --graphs 0|1 --sizes 16x256,16x576,16x1024

One process a (model, checkpointing, graphs) setting, since Unsloth reads UNSLOTH_BLOCK_CUDAGRAPHS when it is
imported. For each ROWSxLENGTH, ascending: the peak is reset, then 3 optimizer steps (forward with labels, the
first quarter of each row masked as a prompt, backward, fused AdamW on the LoRA weights);
torch.cuda.max_memory_allocated is the peak, the median of the last two steps the step time. With graphs the
peak is not reset between sizes: each new shape records graphs whose pools stay."""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--gc", type=int, default=0)
    parser.add_argument("--graphs", type=int, default=0)
    parser.add_argument("--sizes", default="16x256,16x576,16x1024")
    args = parser.parse_args()
    from job import engine
    from job.settings import Settings

    if args.graphs:
        engine.enable_block_cuda_graphs(16)
    import torch
    import unsloth  # noqa: F401

    settings = Settings(dataset_uri="/tmp/none.jsonl", output_uri="/tmp/none", model={"name": args.model},
                        lora={"gradient_checkpointing": "unsloth" if args.gc else "false"})
    started = time.perf_counter()
    model, _ = engine.load_for_training(settings, "unsloth", args.model)
    load_s = time.perf_counter() - started
    config = model.config
    weights_gib = torch.cuda.memory_allocated() / 2**30
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    model.train()
    result = {"model": args.model, "gc": bool(args.gc), "graphs": bool(args.graphs), "load_s": round(load_s, 1),
              "weights_gib": round(weights_gib, 3), "layers": config.num_hidden_layers, "hidden": config.hidden_size,
              "intermediate": config.intermediate_size, "vocab": config.vocab_size,
              "tied": bool(getattr(config, "tie_word_embeddings", False)), "card": torch.cuda.get_device_name(0),
              "free_gib_at_start": round(torch.cuda.mem_get_info()[0] / 2**30, 2), "sizes": []}
    for size in args.sizes.split(","):
        rows, length = (int(x) for x in size.split("x"))
        ids = torch.randint(10, 8000, (rows, length), device="cuda")
        labels = ids.clone()
        labels[:, : length // 4] = -100
        mask = torch.ones_like(ids)
        torch.cuda.synchronize()
        if not args.graphs:
            torch.cuda.reset_peak_memory_stats()
        times = []
        try:
            for _ in range(3):
                t = time.perf_counter()
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        except torch.OutOfMemoryError:
            result["sizes"].append({"rows": rows, "length": length, "tokens": rows * length, "oom": True})
            print(json.dumps(result["sizes"][-1]), flush=True)
            break
        step = statistics.median(times[1:])
        entry = {"rows": rows, "length": length, "tokens": rows * length, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                 "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3), "step_s": round(step, 4),
                 "first_step_s": round(times[0], 3), "tok_s": round(rows * length / step), "loss": round(float(loss), 4)}
        result["sizes"].append(entry)
        print(json.dumps(entry), flush=True)
        del ids, labels, mask, loss
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
