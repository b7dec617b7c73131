"""Document hooks of the zspa_needles lmms-eval task: one image, the question as asked, scored by
exact match after zspa-eval's normalisation (one-word answers)."""

from zspa.evaluation import normalise


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(normalise(results[0]) == normalise(doc["answer"]))}
