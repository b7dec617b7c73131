"""`zspa-eval` end to end on the tiny bundle, and the scoring functions it rests on."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from zspa.evaluation import EvalItem, Evaluation, kl_divergence, normalise, predicted, read_dataset
from zspa.intervals import bootstrap_interval, difference_of_means, mean_of, ratio_of_means


def test_normalise_and_choice_extraction(tmp_path):
    assert normalise("  The Red, circle! ") == "red circle"
    assert normalise("top-left.") == "top-left"
    item = EvalItem(1, (tmp_path / "x.png",), "q", "blue", ("red", "blue"))
    assert item.expected() == "B"
    assert predicted(item, " B. blue") == "B" and predicted(item, "(a)") == "A" and predicted(item, "blue") == ""


def test_kl_divergence():
    logits = np.array([1.0, 2.0, 0.5])
    assert kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    p = np.exp(logits) / np.exp(logits).sum()
    q_logits = np.array([0.0, 0.0, 3.0])
    q = np.exp(q_logits) / np.exp(q_logits).sum()
    assert kl_divergence(logits, q_logits) == pytest.approx(float(np.sum(p * np.log(p / q))))


def test_bad_lines_are_reported_with_their_numbers(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"image": "a.png", "question": "q", "answer": "x"}\nnot json\n\n{"image": "a.png"}\n'
                    '{"image": "a.png", "question": "q", "answer": "C", "choices": ["u", "v"]}\n'
                    '{"image": "a.png", "question": "q", "answer": "x", "kind": 3}\n')
    items, problems = read_dataset(data)
    assert [i.line for i in items] == [1]
    assert [p.split(":")[1] for p in problems] == ["2", "4", "5", "6"]
    assert "kind must be a string" in problems[-1]
    assert "missing or non-text field(s): question, answer" in problems[1]


def test_a_line_may_ask_about_several_images(tiny_bundle, pipeline, photo_path, rgba_png_path, tmp_path):
    """`"images": [...]` gives the question its images in order, each kept on its own budget; a line
    with both fields, or an empty list, is refused with its number."""
    data = tmp_path / "multi.jsonl"
    data.write_text(json.dumps({"images": [str(photo_path), str(rgba_png_path)], "question": "Which is blue?",
                                "answer": "the second"}) + "\n"
                    + json.dumps({"images": [], "question": "q", "answer": "x"}) + "\n"
                    + json.dumps({"image": "a.png", "images": ["a.png"], "question": "q", "answer": "x"}) + "\n")
    items, problems = read_dataset(data)
    assert [item.images for item in items] == [(photo_path, rgba_png_path)]
    assert [p.split(":")[1] for p in problems] == ["2", "3"] and 'either "image"' in problems[1]
    run = eval_cli(tiny_bundle, "--data", data, "--out", tmp_path / "eval", "--keeps", "0.25")
    assert run.returncode == 0, run.stderr
    records = {r["keep"]: r for r in map(json.loads, (tmp_path / "eval" / "records.jsonl").read_text().splitlines())}
    expected = pipeline.generate([photo_path, rgba_png_path], "Which is blue?", keep=0.25, max_new_tokens=4)
    assert records[0.25]["answer"] == expected.text and records[0.25]["visual_tokens_kept"] == 2 * 144
    assert records[1.0]["visual_tokens_kept"] == 2 * 576


def test_bootstrap_intervals_have_the_binomial_width_and_keep_pairs_paired():
    correct = np.random.default_rng(1).random(1000) < 0.6
    low, high = bootstrap_interval(mean_of, correct)
    assert low < correct.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.6 * 0.4 / 1000), rel=0.15)  # normal approximation
    assert bootstrap_interval(difference_of_means, correct, correct) == (0.0, 0.0)  # paired: no spread
    shuffled = np.random.default_rng(2).permutation(correct)  # same accuracy, unpaired answers
    low, high = bootstrap_interval(difference_of_means, correct, shuffled)
    assert low < 0 < high and high - low > 0.05
    low, high = bootstrap_interval(ratio_of_means, correct, np.ones(1000))
    assert low < correct.mean() < high
    with pytest.raises(ValueError):
        bootstrap_interval(mean_of, [])


def test_margin_compares_settings_on_the_questions_both_answered(tmp_path):
    evaluation = Evaluation(None, tmp_path, [], max_new_tokens=1)
    tmp_path.joinpath("records.jsonl").write_text("".join(
        json.dumps({"line": line, "method": method, "keep": 0.1, "correct": correct}) + "\n"
        for line, method, correct in [(1, "a", True), (2, "a", True), (3, "a", False), (1, "b", False),
                                      (2, "b", True), (4, "b", False)]))
    result = evaluation.margin(("a", 0.1), ("b", 0.1))
    assert result["n"] == 2 and result["margin"] == 0.5  # lines 1 and 2 only
    assert result["interval"][0] <= 0.5 <= result["interval"][1]
    with pytest.raises(Exception, match="no question was answered under both"):
        evaluation.margin(("a", 0.1), ("c", 0.1))


def _transformers_answer(tiny_hf, image_path, question: str, max_new_tokens: int) -> str:
    """Greedy answer of the same weights in transformers: what the unpruned row must reproduce."""
    import torch
    from PIL import Image

    model, processor = tiny_hf
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    inputs = processor(images=Image.open(image_path), return_tensors="pt",  # transparency onto white, as ours
                       text=processor.apply_chat_template(messages, add_generation_prompt=True))
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture
def dataset(tiny_hf, photo_path, rgba_png_path, tmp_path):
    """Five questions whose reference answers are transformers' greedy answers on the same weights
    (so the unpruned row's accuracy is known), one with choices, plus an unreadable image and a
    malformed line."""
    lines = []
    for i, question in enumerate(["What is this?", "Where is it?", "Who is there?", "Why?"]):
        image = [photo_path, rgba_png_path][i % 2]
        answer = _transformers_answer(tiny_hf, image, question, max_new_tokens=4)
        lines.append({"image": str(image), "question": question, "answer": answer, "kind": "open"})
    lines.append({"image": str(photo_path), "question": "Pick one.", "answer": "A", "choices": ["cat", "dog"],
                  "kind": "choice"})
    (tmp_path / "broken.png").write_bytes(b"no image here")
    lines.append({"image": "broken.png", "question": "What?", "answer": "x"})
    data = tmp_path / "set.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n{oops\n")
    return data


def eval_cli(*args):
    return subprocess.run([sys.executable, "-m", "zspa.cli.eval", *map(str, args), "--quiet",
                           "--max-new-tokens", "4"], capture_output=True, text=True, timeout=600)


def test_eval_end_to_end_and_resume(tiny_bundle, dataset, tmp_path):
    out = tmp_path / "eval"
    run = eval_cli(tiny_bundle, "--data", dataset, "--out", out)
    assert run.returncode == 0, run.stderr
    assert "set.jsonl:7" in run.stderr and "line 6" in run.stderr  # malformed line, unreadable image
    report = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["keep"]): r for r in report["results"]}
    assert set(rows) == {("none", 1.0), ("zspa", 0.1), ("zspa", 0.25)}
    baseline = rows[("none", 1.0)]
    assert baseline["n"] == 5
    # the unpruned row is the reference for agreement, so it reports none; its accuracy is
    # checked against transformers instead (the four free-form answers are transformers' own)
    assert baseline["first_token_agreement"] is baseline["answer_agreement"] is baseline["mean_kl"] is None
    assert rows[("zspa", 0.1)]["visual_tokens_kept"] == 58 and rows[("zspa", 0.1)]["mean_kl"] > 0
    markdown = (out / "results.md").read_text()
    assert "| zspa | 0.1 | 58 |" in markdown and "Accuracy per question kind" in markdown
    assert "| ref | ref | ref |" in markdown
    assert baseline["accuracy_by_kind"]["open"] == 1.0  # runtime unpruned == transformers, answer by answer
    assert 0 <= rows[("zspa", 0.1)]["first_token_agreement"] <= 1
    low, high = rows[("zspa", 0.1)]["accuracy_interval"]
    assert 0.0 <= low <= rows[("zspa", 0.1)]["accuracy"] <= high <= 1.0
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    records = (out / "records.jsonl").read_text().splitlines()
    assert len(records) == 5 * 3
    again = eval_cli(tiny_bundle, "--data", dataset, "--out", out)
    assert again.returncode == 0 and len((out / "records.jsonl").read_text().splitlines()) == 15
    # lose the last item's records, as after an interruption: only those are redone
    (out / "records.jsonl").write_text("\n".join(records[:12]) + "\n")
    resumed = eval_cli(tiny_bundle, "--data", dataset, "--out", out, "--keeps", "0.1,0.25")
    assert resumed.returncode == 0

    def without_timing(lines):
        return sorted(json.dumps({k: v for k, v in json.loads(line).items() if k != "time_to_first_token_ms"})
                      for line in lines)

    assert without_timing((out / "records.jsonl").read_text().splitlines()) == without_timing(records)


def test_eval_refuses_settings_the_bundle_lacks(tiny_bundle, dataset, tmp_path):
    run = eval_cli(tiny_bundle, "--data", dataset, "--out", tmp_path / "e", "--keeps", "1.3")
    assert run.returncode == 2 and "keep must be in (0, 1]" in run.stderr
    run = eval_cli(tiny_bundle, "--data", dataset, "--out", tmp_path / "e", "--methods", "divprune")
    assert run.returncode == 2 and "'divprune' is not in this bundle" in run.stderr


def test_eval_without_a_usable_question_fails_saying_why(tiny_bundle, photo_path, tmp_path):
    """A metadata file (no question or answer per line) must not print an empty table and exit 0;
    nor may a file whose every image fails."""
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text(json.dumps({"file_name": "a.png", "text": "a red square"}) + "\n")
    run = eval_cli(tiny_bundle, "--data", metadata, "--out", tmp_path / "e")
    assert run.returncode == 2 and "no usable question (1 line(s) skipped)" in run.stderr
    assert "metadata.jsonl:1: missing or non-text field(s): question, answer" in run.stderr
    assert not (tmp_path / "e").exists()
    (tmp_path / "broken.png").write_bytes(b"no image here")
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.write_text(json.dumps({"image": "broken.png", "question": "What?", "answer": "x"}) + "\n")
    run = eval_cli(tiny_bundle, "--data", unreadable, "--out", tmp_path / "f")
    assert run.returncode == 2 and "no question could be answered" in run.stderr
    assert not (tmp_path / "f" / "results.json").exists()
