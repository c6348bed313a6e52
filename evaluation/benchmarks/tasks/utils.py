"""process_docs hooks for the valind lm-eval tasks (loaded by lm-eval via `!function utils.*`)."""
from typing import Any

import datasets


def process_openbookqa(ds: datasets.Dataset) -> datasets.Dataset:
    def one(doc: dict[str, Any]) -> dict[str, Any]:
        labels = [c["label"] for c in doc["question"]["choices"]]
        return {"query": doc["question"]["stem"],
                "choices": [c["text"] for c in doc["question"]["choices"]],
                "gold": labels.index(doc["answerKey"].strip())}
    return ds.map(one)


def _split(answers: str | None) -> list[str]:
    return [a.strip() for a in (answers or "").split("; ") if a.strip()]


def process_truthfulqa(ds: datasets.Dataset) -> datasets.Dataset:
    # MC1: one correct choice first (doc_to_target 0), then every distinct incorrect answer.
    def one(doc: dict[str, Any]) -> dict[str, Any]:
        best = doc["Best Answer"].strip()
        wrong = [a for a in dict.fromkeys(_split(doc["Incorrect Answers"])) if a != best]
        return {"question": doc["Question"].strip(), "choices": [best, *wrong]}
    return ds.map(one)
