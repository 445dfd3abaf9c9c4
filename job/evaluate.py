"""Answer metrics and promotion.

The held-out prompts (the eval split or QLORA_EVAL__DATASET_URI, at most QLORA_EVAL__ANSWER_PROMPTS) are
answered greedily, in batches, by the tuned adapter, by the base model (the adapter switched off) and by the
champion: the adapter of the run latest.json points to, when it was trained on the same base model, loaded
beside ours in the same process. Each set of answers is scored against the references: exact match and
sacrebleu's chrF (character n-grams, so Korean and other unsegmented text score fairly), both 0-100.
latest.json moves to this run only when it is not worse than the champion by more than
QLORA_PROMOTION__TOLERANCE points on QLORA_PROMOTION__METRIC; a run that is not promoted is still published."""

import json
import time
from pathlib import Path

from job import storage
from job.errors import ModelLoadError
from job.logs import get_logger
from job.settings import PromotionSettings, Settings
from job.verify import normalised

log = get_logger(__name__)
CHAMPION = "champion"  # the champion's adapter name inside our PeftModel


def held_out_prompts(eval_dataset: Path | None, cap: int) -> list[dict]:
    """The first `cap` held-out rows (already in a seeded shuffled order) as {messages, reference}."""
    if eval_dataset is None or not cap:
        return []
    from datasets import load_from_disk

    rows = load_from_disk(str(eval_dataset))
    rows = rows.select(range(min(cap, len(rows))))
    return [{"messages": row["prompt"], "reference": row["completion"][0]["content"]} for row in rows]


def generate_answers(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, `batch_size` conversations at a time (left-padded), each cut at its first stop token."""
    import torch

    from job.chat import stop_token_ids

    stop = stop_token_ids(tokenizer)
    if tokenizer.pad_token_id is None:  # left padding needs one; the stop token never shows in an answer
        tokenizer.pad_token_id = stop[0]
    pad = tokenizer.pad_token_id
    answers = []
    for start in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, tokenize=False)
                 for messages in conversations[start:start + batch_size]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                    pad_token_id=pad, use_cache=True)
        for row in output[:, inputs["input_ids"].shape[1]:].tolist():
            end = next((i for i, token in enumerate(row) if token in stop), len(row))
            answers.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return answers


def score(answers: list[str], references: list[str]) -> dict:
    """Exact match and corpus chrF, both on NFC text with whitespace runs collapsed, as the verify gate compares
    (NFD Hangul would otherwise be scored jamo by jamo: 41 chrF for the same sentence)."""
    from sacrebleu.metrics import CHRF

    answers, references = [normalised(a) for a in answers], [normalised(r) for r in references]
    exact = sum(a == r for a, r in zip(answers, references, strict=True)) / len(references)
    return {"exact_match": round(100 * exact, 2), "chrf": round(CHRF().corpus_score(answers, [references]).score, 2)}


def fetch_champion(settings: Settings, base_model: dict, run_id: str, folder: Path) -> tuple[dict | None, str]:
    """The champion's adapter, downloaded into folder and checked against its manifest's sha256s:
    ({run_id, adapter_uri, folder}, "") or (None, why there is none to compare with)."""
    from job import publish, retrain

    if not settings.promotion.compare:
        return None, "comparison is off (QLORA_PROMOTION__COMPARE=false)"
    latest = retrain.read_latest(settings.output_uri)
    if latest is None or latest.get("run_id") == run_id:
        return None, "no champion: nothing is published under the output prefix yet"
    if latest.get("base_model") != base_model:
        return None, f"no champion: latest.json's run {latest['run_id']} was trained on another base model"
    run_uri = storage.join(settings.output_uri, latest["run_id"])
    manifest = publish.find_manifest(run_uri, ModelLoadError)
    adapter = [o for o in (manifest or {}).get("objects", []) if o["key"].startswith("adapter/")]
    if not adapter:
        return None, f"no champion: latest.json's run {latest['run_id']} has no published adapter"
    paths = storage.checked_targets(storage.join(run_uri, "adapter"), folder, [o["key"].removeprefix("adapter/") for o in adapter],
                                    ModelLoadError)
    for obj, path in zip(adapter, paths, strict=True):
        storage.fetch_file(storage.join(run_uri, obj["key"]), path)
        if storage.sha256_file(path) != obj["sha256"]:
            log.warning("the champion's adapter differs from its manifest; not comparing", key=obj["key"], run_id=latest["run_id"])
            return None, f"no champion: {latest['run_id']}'s {obj['key']} does not match its manifest's sha256"
    return {"run_id": latest["run_id"], "adapter_uri": storage.join(run_uri, "adapter"), "folder": folder}, ""


def evaluate_run(settings: Settings, model, tokenizer, eval_dataset: Path | None, base_model: dict, run_id: str,
                 work: Path, out: Path) -> dict | None:
    """The evaluate stage: answer and score the held-out prompts with the tuned adapter, the base model and the
    champion, write out/evaluation.json (every answer) and return the scores with the promotion decision."""
    prompts = held_out_prompts(eval_dataset, settings.eval.answer_prompts)
    if not prompts:
        decision = {"promoted": True, "reason": "no held-out prompts to score: every verified run is promoted "
                    "(QLORA_EVAL__FRACTION or QLORA_EVAL__DATASET_URI, and QLORA_EVAL__ANSWER_PROMPTS above 0)"}
        log.info("no answer metrics", reason=decision["reason"])
        return {"prompts": 0, "promotion": decision}
    champion, why_not = fetch_champion(settings, base_model, run_id, work / "champion-adapter")
    started, conversations = time.perf_counter(), [p["messages"] for p in prompts]
    references = [p["reference"] for p in prompts]
    ev = settings.eval

    def answers() -> list[str]:
        return generate_answers(model, tokenizer, conversations, ev.answer_max_new_tokens, ev.answer_batch_size)

    outputs = {"tuned": answers()}
    with model.disable_adapter():
        outputs["base"] = answers()
    if champion is not None:
        model.load_adapter(str(champion["folder"]), adapter_name=CHAMPION, is_trainable=False)
        model.set_adapter(CHAMPION)
        outputs["champion"] = answers()
        model.set_adapter("default")
        model.delete_adapter(CHAMPION)
    scores = {name: score(texts, references) for name, texts in outputs.items()}
    seconds = round(time.perf_counter() - started, 3)
    decision = promotion(settings.promotion, scores, champion, why_not)
    report = {"prompts": len(prompts), "max_new_tokens": ev.answer_max_new_tokens, "seconds": seconds, **scores,
              "champion_run_id": champion["run_id"] if champion else None, "promotion": decision}
    log.info("answer metrics", prompts=len(prompts), seconds=seconds, **{f"{k}_{m}": v[m] for k, v in scores.items() for m in v},
             promoted=decision["promoted"], reason=decision["reason"])
    rows = [{"prompt": p["messages"][-1]["content"], "reference": p["reference"],
             **{f"{name}_answer": outputs[name][i] for name in outputs}} for i, p in enumerate(prompts)]
    (out / "evaluation.json").write_text(json.dumps({**report, "answers": rows}, ensure_ascii=False, indent=2), encoding="utf-8")
    return report


def promotion(rules: PromotionSettings, scores: dict, champion: dict | None, why_not: str) -> dict:
    """Promoted unless the champion was scored and this run is worse by more than the tolerance."""
    metric, tolerance = rules.metric, rules.tolerance
    if champion is None:
        return {"promoted": True, "reason": why_not, "metric": metric}
    ours, theirs = scores["tuned"][metric], scores["champion"][metric]
    promoted = ours >= theirs - tolerance
    verdict = f"within {tolerance:g} points of it or above" if promoted else f"more than {tolerance:g} points below it"
    return {"promoted": promoted, "metric": metric, "tolerance": tolerance, "challenger": ours, "champion": theirs,
            "champion_run_id": champion["run_id"],
            "reason": f"{metric} {ours:.2f} against the champion {champion['run_id']}'s {theirs:.2f}: {verdict}"}


def gauges(report: dict) -> dict:
    """The report as Pushgateway gauges (observe.GAUGES): answer_chrf, base_answer_exact_match, promoted, ..."""
    prefixes = {"tuned": "", "base": "base_", "champion": "champion_"}
    values = {f"{prefixes[name]}answer_{metric}": value for name in prefixes for metric, value in (report.get(name) or {}).items()}
    return {**values, "promoted": int(report["promotion"]["promoted"])}
