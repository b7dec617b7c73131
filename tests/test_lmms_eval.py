"""`--model zspa` in lmms-eval: registered by entry point, and answering a local task offline
exactly as the runtime answers the same questions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'zspa[lmms-eval]')")

from zspa.datasets import needles  # noqa: E402
from zspa.evaluation import normalise  # noqa: E402

TASK_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "lmms_eval" / "zspa_needles"


def test_zspa_is_registered_through_the_entry_point():
    from lmms_eval.models import get_model

    from zspa.integrations.lmms_eval import ZspaLMM

    assert get_model("zspa") is ZspaLMM


def test_settings_the_bundle_cannot_run_are_refused_before_any_request(tiny_bundle):
    from zspa.errors import ZspaError
    from zspa.integrations.lmms_eval import ZspaLMM

    with pytest.raises(ZspaError, match="'divprune' is not in this bundle"):
        ZspaLMM(bundle=str(tiny_bundle), keep="0.1", method="divprune")
    with pytest.raises(ZspaError, match="--batch_size 1"):
        ZspaLMM(bundle=str(tiny_bundle), batch_size="4")


def test_a_misspelt_model_arg_is_refused_by_name(tiny_bundle):
    """`kep=0.1` must not quietly run an unpruned evaluation; what the harness itself passes is taken."""
    from lmms_eval.models import get_model

    from zspa.errors import ZspaError

    with pytest.raises(ZspaError, match="unknown model_args kep: zspa takes bundle, keep"):
        get_model("zspa").create_from_arg_string(f"bundle={tiny_bundle},kep=0.1")
    lmm = get_model("zspa").create_from_arg_string(f"bundle={tiny_bundle},keep=0.1",
                                                   {"batch_size": 1, "max_batch_size": 4, "device": "cpu"})
    assert lmm.keep == 0.1


@pytest.mark.parametrize("context, images, expected", [
    ("What is it?", 1, ["image", "What is it?"]),
    ("<image>\nWhat is it?", 1, ["image", "What is it?"]),
    ("Left: <image> right: <image> Which is larger?", 2, ["Left:", "image", "right:", "image", "Which is larger?"]),
    ("Compare <image> with the others.", 3, ["image", "image", "image", "Compare  with the others."]),
    ("<image> no image came", 0, ["no image came"]),
])
def test_images_go_where_the_context_places_them(context, images, expected):
    from zspa.integrations.lmms_eval import user_content

    assert [part.get("text", part["type"]) for part in user_content(context, images)] == expected


def test_a_document_with_two_images_is_answered_about_both(tiny_bundle, pipeline, photo_path, rgba_png_path):
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from zspa.integrations.lmms_eval import ZspaLMM

    model = ZspaLMM(bundle=str(tiny_bundle), keep="0.25", method="zspa")
    docs = [{"images": [Image.open(photo_path), Image.open(rgba_png_path)]}]
    model.task_dict = {"task": {"test": docs}}
    request = Instance("generate_until", ("<image> or <image>: which is blue?", {"max_new_tokens": 5},
                                          lambda doc: doc["images"], 0, "task", "test"), idx=0,
                       metadata={"task": "task", "doc_id": 0, "repeats": 1})
    (answer,) = model.generate_until([request])
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "or"}, {"type": "image"},
                                         {"type": "text", "text": ": which is blue?"}]}]
    expected = pipeline.generate([photo_path, rgba_png_path], pipeline.prompts.build_chat(chat), keep=0.25,
                                 method="zspa", max_new_tokens=5)
    assert answer == expected.text and expected.stats.visual_tokens_kept == 2 * 144


def _instance(kind: str, arguments: tuple):
    from lmms_eval.api.instance import Instance

    return Instance(kind, arguments, idx=0, metadata={"task": "task", "doc_id": 0, "repeats": 1})


def test_loglikelihood_scores_each_option_as_the_pipeline_does(tiny_bundle, pipeline, photo_path):
    """Multiple choice: each option's log-probability as the answer, and whether it is greedy."""
    from PIL import Image

    from zspa.integrations.lmms_eval import ZspaLMM

    model = ZspaLMM(bundle=str(tiny_bundle), keep="0.25", method="zspa")
    model.task_dict = {"task": {"test": [{"image": Image.open(photo_path)}]}}
    greedy = pipeline.generate(photo_path, "What is worn?", keep=0.25, method="zspa", max_new_tokens=3).text
    options = [" A hat", " a chair by the window", greedy]
    scores = model.loglikelihood([_instance("loglikelihood", ("<image>\nWhat is worn?", option,
                                                              lambda doc: [doc["image"]], 0, "task", "test"))
                                  for option in options])
    for option, (logprob, is_greedy) in zip(options, scores, strict=True):
        expected = pipeline.score(photo_path, "What is worn?", pipeline.prompts.encode_text(option), keep=0.25,
                                  method="zspa")
        assert (logprob, is_greedy) == pytest.approx(expected) and logprob < 0
    assert [is_greedy for _, is_greedy in scores] == [False, False, True]


def test_multi_round_answers_each_round_with_the_task_s_next_context(tiny_bundle, pipeline, photo_path):
    from PIL import Image

    from zspa.integrations.lmms_eval import ZspaLMM

    model = ZspaLMM(bundle=str(tiny_bundle), keep="0.25", method="zspa")
    photo = Image.open(photo_path)
    model.task_dict = {"task": {"test": [{"image": photo}]}}
    seen = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        seen.append((list(previous_output), round_idx, previous_round_info))
        context = f"You said {previous_output[-1]!r}. Why?"
        return [doc["image"]], context, round_idx == 3, previous_output, {"round": round_idx}

    request = _instance("generate_until_multi_round", ("What is it?", {"max_new_tokens": 4, "until": ["\n"]},
                                                       lambda doc: [doc["image"]], doc_to_text, 0, "task", "test"))
    (rounds,) = model.generate_until_multi_round([request])
    first = pipeline.generate(photo_path, "What is it?", keep=0.25, method="zspa", max_new_tokens=4).text
    second = pipeline.generate(photo_path, f"You said {first!r}. Why?", keep=0.25, method="zspa",
                               max_new_tokens=4).text
    assert rounds[:2] == [first, second] and len(rounds) == 3
    assert [(r, info) for _, r, info in seen] == [(1, None), (2, {"round": 1}), (3, {"round": 2})]


@pytest.mark.slow
def test_a_local_task_through_the_lmms_eval_cli_gets_the_runtimes_answers(tiny_bundle, pipeline, tmp_path):
    needles.write_jsonl(tmp_path / "needles-lmms", "test", 3)
    shutil.copytree(TASK_DIR, tmp_path / "tasks" / "zspa_needles")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "eval", "--model", "zspa",
         "--model_args", f"bundle={tiny_bundle},keep=0.1,method=zspa,backend=ort-cpu", "--tasks", "zspa_needles",
         "--include_path", "tasks", "--output_path", "out", "--log_samples"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("*samples_zspa_needles.jsonl")).open()]
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2]
    hits = []
    for sample in samples:
        example = needles.example("test", sample["doc_id"])
        expected = pipeline.generate(needles.image_for("test", sample["doc_id"]), example.question, keep=0.1,
                                     method="zspa", max_new_tokens=4).text
        response = sample["filtered_resps"]
        assert (response[0] if isinstance(response, list) else response) == expected.strip()
        hits.append(normalise(expected) == example.answer)
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    assert results["results"]["zspa_needles"]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))
