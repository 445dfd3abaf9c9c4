"""Verification gate: the saved adapter, reloaded into a fresh base model the way a
consumer would load it, must answer probe prompts sensibly before anything is published."""

import json
import math
import unicodedata
from pathlib import Path

from job.errors import ConfigError, VerifyError
from job.logs import get_logger
from job.settings import Settings, VerifySettings

log = get_logger(__name__)


def build_probes(verify: VerifySettings, train_path: Path) -> list[dict]:
    """Probe prompts: the user's QLORA_VERIFY__PROMPTS plus the first few training prompts."""
    probes = [{"messages": [{"role": "user", "content": p.prompt}], "expected": p.expected, "source": "settings"}
              for p in verify.prompts]
    with open(train_path, encoding="utf-8") as f:
        for _, line in zip(range(verify.train_probes), f, strict=False):
            row = json.loads(line)
            answer = row["completion"][0]["content"]
            probes.append({"messages": row["prompt"], "expected": answer if verify.expect_memorised else None,
                           "reference": answer, "source": f"train line {row['line']}"})
    return probes


def token_budget(max_new_tokens: int, tokenizer, reference: str | None) -> int:
    """Generation budget of one probe: QLORA_VERIFY__MAX_NEW_TOKENS, or room for an answer as long as the
    training answer (1.5x + 16 tokens) when that is longer: a model that learnt a long answer is not cut off."""
    if not reference:
        return max_new_tokens
    return max(max_new_tokens, math.ceil(1.5 * len(tokenizer(reference, add_special_tokens=False)["input_ids"])) + 16)


def normalised(text: str) -> str:
    """NFC (tokenizers such as Qwen's normalise; data files from macOS often hold NFD Korean), runs of
    whitespace as one space."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def same_text(answer: str, expected: str) -> bool:
    """Exact match up to Unicode normalisation and runs of whitespace."""
    return normalised(answer) == normalised(expected)


def verify_run(settings: Settings, model, tokenizer, train_path: Path, out: Path):
    """The gate stage on the saved adapter reloaded into a fresh base model (engine.reloaded): probe it,
    write out/verify.json. Returns (probes, report) for the merged model's gate."""
    probes = build_probes(settings.verify, train_path)
    report = verify_adapter(model, tokenizer, probes, out.parent / "verify.json", settings.verify)
    (out.parent / "verify.json").replace(out / "verify.json")  # published only when it passed
    return probes, report


def generate(model, tokenizer, messages: list[dict], max_new_tokens: int, stop: list[int] | None = None) -> dict:
    """Greedy answer to one conversation, built as consumers build it (Qwen3: thinking off); it ends at
    a stop token: the chat template's end-of-turn token or EOS (job/chat.py; the gates pass them in once)."""
    import torch

    from job.chat import stop_token_ids

    stop = stop if stop is not None else stop_token_ids(tokenizer)
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=False, return_tensors="pt", return_dict=True
    ).to(model.device)
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id, use_cache=True,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
    end = next((i for i, token in enumerate(new_tokens) if token in stop), None)
    if end is not None:
        new_tokens = new_tokens[:end]
    return {"text": tokenizer.decode(new_tokens, skip_special_tokens=True).strip(), "tokens": len(new_tokens), "ended": end is not None}


def verify_adapter(model, tokenizer, probes: list[dict], report_path: Path, verify: VerifySettings) -> dict:
    """Run every probe with and without the adapter, write the report to report_path, and
    raise VerifyError if a gate fails."""
    if not probes:
        raise ConfigError("nothing to verify: set QLORA_VERIFY__PROMPTS or QLORA_VERIFY__TRAIN_PROBES above 0")
    from job.chat import stop_token_ids

    results, stop = [], stop_token_ids(tokenizer)
    for probe in probes:
        budget = token_budget(verify.max_new_tokens, tokenizer, probe.get("reference") or probe["expected"])
        tuned = generate(model, tokenizer, probe["messages"], budget, stop)
        with model.disable_adapter():
            base = generate(model, tokenizer, probe["messages"], budget, stop)
        result = {
            "prompt": probe["messages"][-1]["content"], "source": probe["source"], "answer": tuned["text"],
            "answer_tokens": tuned["tokens"], "max_new_tokens": budget, "ended_turn": tuned["ended"], "base_answer": base["text"],
            "expected": probe["expected"],
            "matches_expected": None if probe["expected"] is None else same_text(tuned["text"], probe["expected"]),
        }
        results.append(result)
        log.info("probe", prompt=result["prompt"][:80], answer=result["answer"][:120], ended=tuned["ended"])

    return _gate(results, report_path, verify, "verification")


def verify_merged(model, tokenizer, probes: list[dict], adapter_report: dict, report_path: Path, settings: Settings) -> dict:
    """The same gate for the merged model, loaded with plain transformers; the base model's answers
    come from the adapter's report (a merged model has no adapter to switch off)."""
    from job.chat import stop_token_ids

    results, stop = [], stop_token_ids(tokenizer)
    for probe, earlier in zip(probes, adapter_report["probes"], strict=True):
        merged = generate(model, tokenizer, probe["messages"], earlier["max_new_tokens"], stop)
        results.append({**earlier, "answer": merged["text"], "answer_tokens": merged["tokens"], "ended_turn": merged["ended"],
                        "adapter_answer": earlier["answer"],
                        "matches_expected": None if probe["expected"] is None else same_text(merged["text"], probe["expected"])})
        log.info("merged probe", prompt=results[-1]["prompt"][:80], answer=merged["text"][:120], ended=merged["ended"])
    return _gate(results, report_path, settings.verify, "merged model verification")


def _gate(results: list[dict], report_path: Path, verify: VerifySettings, what: str) -> dict:
    """Gates shared by the adapter and the merged model; writes the report and raises on failure."""
    failures = []
    for i, r in enumerate(results):
        if not r["answer"]:
            failures.append(f"probe {i}: empty answer")
        elif not r["ended_turn"]:
            failures.append(f"probe {i}: no end-of-turn within {r['max_new_tokens']} tokens")
        if r["matches_expected"] is False:
            failures.append(f"probe {i}: answer differs from the expected one")
    if verify.require_change and results and all(r["answer"] == r["base_answer"] for r in results):
        failures.append("the adapter changed no answer of the base model")
    report = {"passed": not failures, "failures": failures, "probes": results}
    report_path.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    if failures:
        more = f" (+{len(failures) - 1} more, see {report_path})" if len(failures) > 1 else ""
        raise VerifyError(f"{what} failed: {failures[0]}{more}")
    return report
