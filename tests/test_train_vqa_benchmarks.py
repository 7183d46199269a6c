"""train_vqa.py --eval-only --eval-format vqav2|textvqa|gqa|pope: a tiny trained model answers a benchmark's own
files end to end (batched greedy, KV cache), scored by utils/vqa_benchmarks.py, resumable."""
import json
import os

import pytest

import train_vqa
from tests.test_train_vqa import args_for, data  # noqa: F401 (data: the module's fixture)
from tests.test_vqa_benchmarks import save_images, vqav2_files, write
from utils import vqa_benchmarks as vb


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("bench") / "run")
    train_vqa.main(args_for(data, out, "--max-steps", "2", "--eval-every", "0", "--test-samples", "2"))
    return data, out


def eval_args(data, out, fmt, test, folder, *extra):
    return args_for(data, out, "--eval-only", "--eval-format", fmt, "--test-data", test, "--image-folder", folder,
                    *extra)


def test_vqav2_scored_and_a_killed_run_resumed(trained, tmp_path, monkeypatch):
    data, out = trained
    q, a = vqav2_files(tmp_path)
    real, calls = train_vqa.answer_all, []

    def killed_after_one_batch(*args, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(train_vqa, "answer_all", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        train_vqa.main(eval_args(data, out, "vqav2", q, str(tmp_path / "img"), "--annotations", a,
                                 "--eval-batch-size", "2"))
    monkeypatch.setattr(train_vqa, "answer_all", real)
    train_vqa.main(eval_args(data, out, "vqav2", q, str(tmp_path / "img"), "--annotations", a,
                             "--eval-batch-size", "2"))
    summary = json.load(open(os.path.join(out, "vqav2", "summary.json")))
    assert summary["n_items"] == 3 and summary["n_answered"] == 3 and summary["n_skipped"] == 0
    assert summary["n_resumed"] == 2  # the first batch's answers, written before the kill
    preds = json.load(open(os.path.join(out, "vqav2", "vqav2_predictions.json")))
    assert sorted(p["question_id"] for p in preds) == [10, 11, 20]
    # the summary is the official score of the written predictions
    items = vb.read_benchmark("vqav2", q, a)
    rescored = vb.score("vqav2", items, {str(p["question_id"]): p["answer"] for p in preds})
    assert rescored["score"] == pytest.approx(summary["score"])


def test_pope_with_a_missing_image_counts_it(trained, tmp_path):
    data, out = trained
    save_images(tmp_path / "img", ["a.jpg"])
    rows = [{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
            {"question_id": 2, "image": "gone.jpg", "text": "Is there a cat in the image?", "label": "no"}]
    pope = write(tmp_path / "coco_pope_random.json", rows, lines=True)
    train_vqa.main(eval_args(data, out, "pope", pope, str(tmp_path / "img")))
    summary = json.load(open(os.path.join(out, "pope", "summary.json")))
    assert summary["n_answered"] == 1 and summary["n_skipped"] == 1 and "gone.jpg" in json.dumps(summary["skipped"])


def test_benchmark_format_needs_its_files(trained):
    data, out = trained
    with pytest.raises(SystemExit, match="--image-folder"):
        train_vqa.cli(args_for(data, out, "--eval-only", "--eval-format", "gqa", "--image-folder", ""))


def test_textvqa_and_gqa_files_scored_by_the_model(trained, tmp_path):
    data, out = trained
    save_images(tmp_path / "img", ["t1.jpg", "g1.jpg"])
    textvqa = write(tmp_path / "TextVQA_0.5.1_val.json", {"data": [
        {"question_id": 7, "image_id": "t1", "question": "what is written?", "answers": ["stop"] * 10}]})
    gqa = write(tmp_path / "testdev_balanced_questions.json", {"5": {
        "imageId": "g1", "question": "Is it red?", "answer": "yes", "types": {"structural": "verify",
                                                                            "semantic": "attr", "detailed": "x"}}})
    for fmt, test, pred_file in (("textvqa", textvqa, "textvqa_predictions.json"), ("gqa", gqa, "gqa_predictions.json")):
        train_vqa.main(eval_args(data, out, fmt, test, str(tmp_path / "img")))
        summary = json.load(open(os.path.join(out, fmt, "summary.json")))
        assert summary["n_answered"] == 1 and summary["score"] is not None
        assert len(json.load(open(os.path.join(out, fmt, pred_file)))) == 1
