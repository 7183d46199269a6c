"""utils/vqa_benchmarks.py: the official normalisation and soft accuracy on hand-computed cases, GQA / POPE metrics,
tiny files in each benchmark's format scored end to end with a stub answer_fn, resume after a kill, clear errors."""
import json
import os

import pytest
from PIL import Image

from utils import vqa_benchmarks as vb
from utils.errors import DataError

SUFFIX = "\nAnswer the question using a single word or phrase."


# --- normalisation (vqaEval.py processPunctuation / processDigitArticle, EvalAIAnswerProcessor) --------------------

@pytest.mark.parametrize("raw, expected", [
    ("two", "2"), ("Ten", "10"), ("none", "0"),          # manualMap: number words -> digits
    ("a dog", "dog"), ("The Red Car", "red car"), ("an apple", "apple"),  # articles dropped, lower-cased
    ("dont", "don't"), ("isnt", "isn't"), ("whats up", "what's up"),    # contractions map
    ("1,000", "1000"),                     # a digit-comma-digit: every mark is deleted, not spaced
    ("1, 2", "1 2"),                       # ", " occurs: the comma is deleted
    ("black-and-white", "black and white"),  # no "- " / " -" and no digit comma: the mark becomes a space
    ("yes.", "yes"), ("2.5", "2.5"),       # periodStrip: a '.' not followed by a digit goes
    ("  yes\n", "yes"), ("left\tside", "left side"),
    ("what?", "what"), ("(yes)", "yes"),
])
def test_normalize_vqa_follows_the_official_rules(raw, expected):
    assert vb.normalize_vqa(raw) == expected


def test_period_strip_deletes_at_most_32_periods_as_the_official_call_does():
    # periodStrip.sub("", outText, re.UNICODE): the third argument is the count, re.UNICODE == 32
    assert vb.normalize_vqa("." * 40) == "." * 8


def test_normalize_evalai_adds_word_tokenize():
    assert vb.normalize_evalai("What's THAT?") == "what 's that"  # lower, '?' deleted, "'s" -> " 's"
    assert vb.normalize_evalai("Two dogs.") == "2 dogs"
    assert vb.normalize_evalai("1,000") == "1000"


# --- soft accuracy: mean over the 10 leave-one-out subsets of 9 of min(1, matches / 3) ------------------------------

def ten(*pairs):
    out = [a for a, n in pairs for _ in range(n)]
    assert len(out) == 10
    return out


@pytest.mark.parametrize("n_match, expected", [
    # 0 of 10 say it: every subset has 0 matches -> 0
    (0, 0.0),
    # 1 of 10: leaving that one out -> 0 matches (0); leaving any of the 9 others out -> 1 match (1/3):
    # (0 + 9 * 1/3) / 10 = 3 / 10 = 0.3
    (1, 0.3),
    # 2 of 10: leaving one of the 2 out -> 1 match (1/3), twice; one of the 8 others -> 2 matches (2/3), 8 times:
    # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6
    (2, 0.6),
    # 3 of 10: one of the 3 out -> 2 matches (2/3), 3 times; one of the 7 others out -> 3 matches (1), 7 times:
    # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10 = 0.9
    (3, 0.9),
    # 4 of 10: one of the 4 out -> 3 matches (1); one of the 6 others out -> 4 matches (min(1, 4/3) = 1): 1.0
    (4, 1.0),
    (10, 1.0),
])
def test_soft_accuracy_leave_one_out(n_match, expected):
    gts = ten(("2", n_match), ("3", 10 - n_match)) if n_match < 10 else ["2"] * 10
    assert vb.vqav2_accuracy("2", gts) == pytest.approx(expected)
    assert vb.textvqa_accuracy("2", gts) == pytest.approx(expected)


def official_loop(pred, gts):
    """vqaEval.py's loop, transcribed: each answer dict left out in turn (distinct answer_ids)."""
    answers = [{"answer": a, "answer_id": i} for i, a in enumerate(gts)]
    accs = []
    for gt in answers:
        others = [x for x in answers if x != gt]
        accs.append(min(1, len([x for x in others if x["answer"] == pred]) / 3))
    return sum(accs) / len(accs)


def test_soft_accuracy_equals_the_official_loop_on_random_answers():
    import random
    rng = random.Random(0)
    for _ in range(200):
        gts = [rng.choice("abc") for _ in range(10)]
        pred = rng.choice("abcd")
        assert vb.soft_accuracy(pred, gts) == pytest.approx(official_loop(pred, gts))


def test_vqav2_accuracy_normalises_prediction_and_disagreeing_answers():
    # the prediction "Two." -> "2"; 3 of 10 humans said "2": 0.9 (as above)
    assert vb.vqav2_accuracy("Two.", ten(("2", 3), ("3", 7))) == pytest.approx(0.9)
    # human answers disagree -> processPunctuation on them: "1,000" -> "1000" (4 of 10 -> 1.0)
    assert vb.vqav2_accuracy("1000", ten(("1,000", 4), ("many", 6))) == pytest.approx(1.0)
    # "a dog" -> "dog"; "don't" matches "dont" after the contractions map
    assert vb.vqav2_accuracy("a dog", ten(("dog", 2), ("cat", 8))) == pytest.approx(0.6)
    assert vb.vqav2_accuracy("dont", ten(("don't", 10))) == pytest.approx(1.0)
    # the official quirk: ten identical human answers are compared as they are (the files are pre-normalised)
    assert vb.vqav2_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vb.textvqa_accuracy("yes", ["Yes"] * 10) == 1.0  # TextVQA's evaluator normalises both sides always


def test_gqa_normalisation_and_pope_parse():
    assert vb.normalize_gqa(" Yes.\n") == "yes"
    assert vb.normalize_gqa("Left") == "left"
    # eval_pope.py: text before the first '.', commas deleted, "no" if a word is exactly No / no / not
    assert vb.pope_yes_no("No, there is not.") == "no"
    assert vb.pope_yes_no("Yes. No.") == "yes"         # only the first sentence counts
    assert vb.pope_yes_no("There is not a dog") == "no"
    assert vb.pope_yes_no("NO") == "yes"               # as in the script: only No / no / not count
    assert vb.pope_yes_no("yes") == "yes"


def test_pope_metrics_by_hand():
    # pred  yes yes no  no  yes ; label yes no  no  yes yes -> TP 2, FP 1, TN 1, FN 1
    m = vb.pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(3 / 5)
    assert vb.pope_metrics(["no", "no"], ["no", "yes"])["f1"] == 0.0  # no positive prediction: 0, not a crash


# --- tiny files in each format, scored end to end -------------------------------------------------------------------

def save_images(folder, names):
    os.makedirs(folder, exist_ok=True)
    for n in names:
        Image.new("RGB", (8, 8), (255, 0, 0)).save(os.path.join(folder, n))


def write(path, obj, lines=False):
    with open(path, "w") as f:
        if lines:
            f.write("".join(json.dumps(r) + "\n" for r in obj))
        else:
            json.dump(obj, f)
    return str(path)


def vqav2_files(tmp_path):
    qs = {"questions": [{"image_id": 1, "question": "How many dogs?", "question_id": 10},
                        {"image_id": 1, "question": "Is it red?", "question_id": 11},
                        {"image_id": 2, "question": "What color?", "question_id": 20}]}

    def ann(qid, answers, typ):
        return {"question_id": qid, "image_id": qid // 10, "answer_type": typ, "question_type": "what",
                "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)]}
    anns = {"annotations": [ann(10, ten(("2", 3), ("3", 7)), "number"), ann(11, ["yes"] * 10, "yes/no"),
                            ann(20, ten(("red", 1), ("blue", 9)), "other")]}
    save_images(tmp_path / "img", ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"])
    return write(tmp_path / "q.json", qs), write(tmp_path / "a.json", anns)


def stub(table):
    calls = []

    def answer_fn(batch):
        calls.append([it["key"] for it in batch])
        return [table[it["question"]] for it in batch]
    return answer_fn, calls


def test_vqav2_end_to_end(tmp_path):
    q, a = vqav2_files(tmp_path)
    items = vb.read_benchmark("vqav2", q, a)
    assert items[0]["prompt"] == "How many dogs?" + SUFFIX and items[0]["image"] == "COCO_val2014_000000000001.jpg"
    assert items[0]["question_type"] == "number" and len(items[0]["answers"]) == 10
    fn, calls = stub({"How many dogs?": "Two", "Is it red?": "Yes.", "What color?": "red"})
    s = vb.run_benchmark("vqav2", items, fn, str(tmp_path / "out"), batch_size=2, progress=False,
                         image_folder=str(tmp_path / "img"))
    assert calls == [["10", "11"], ["20"]]
    # number: 0.9 (3 of 10), yes/no: 1.0, other: 0.3 (1 of 10) -> overall (0.9 + 1 + 0.3) / 3
    assert s["score"] == pytest.approx(100 * 2.2 / 3)
    assert s["per_type"]["number"] == {"accuracy": pytest.approx(90.0), "count": 1}
    assert s["per_type"]["yes/no"]["accuracy"] == pytest.approx(100.0)
    assert s["per_type"]["other"]["accuracy"] == pytest.approx(30.0)
    with open(tmp_path / "out" / "vqav2_predictions.json") as f:
        assert json.load(f) == [{"question_id": 10, "answer": "2"}, {"question_id": 11, "answer": "yes"},
                                {"question_id": 20, "answer": "red"}]
    with open(tmp_path / "out" / "summary.json") as f:
        assert json.load(f)["n_answered"] == 3
    assert not os.path.exists(tmp_path / "out" / vb.PARTIAL_FILE)


def test_vqav2_test_split_without_annotations_writes_the_upload_only(tmp_path):
    q, _ = vqav2_files(tmp_path)
    items = vb.read_vqav2(q, image_pattern="COCO_test2015_{image_id:012d}.jpg")
    assert items[0]["answers"] == [] and items[0]["image"] == "COCO_test2015_000000000001.jpg"
    s = vb.run_benchmark("vqav2", items, lambda b: ["yes"] * len(b), str(tmp_path / "out"), progress=False)
    assert s["score"] is None and s["n_answered"] == 3


def test_textvqa_end_to_end_with_ocr_prompt(tmp_path):
    data = {"data": [{"question_id": 1, "image_id": "abc", "question": "what brand?", "ocr_tokens": ["nikon", "f2"],
                      "answers": ten(("Nikon", 4), ("canon", 6))},
                     {"question_id": 2, "image_id": "abd", "question": "what number?", "answers": ten(("12", 10))}]}
    items = vb.read_textvqa(write(tmp_path / "t.json", data))
    assert items[0]["prompt"] == "what brand?\nReference OCR token: nikon, f2" + SUFFIX
    assert items[1]["prompt"] == "what number?" + SUFFIX and items[1]["image"] == "abd.jpg"
    save_images(tmp_path / "img", ["abc.jpg"])  # abd.jpg is missing: skipped and named, not a crash
    fn, calls = stub({"what brand?": "nikon", "what number?": "12"})
    s = vb.run_benchmark("textvqa", items, fn, str(tmp_path / "out"), progress=False,
                         image_folder=str(tmp_path / "img"))
    assert calls == [["1"]] and s["n_skipped"] == 1 and "abd.jpg" in s["skipped"][0]["reason"]
    assert s["score"] == pytest.approx(100.0) and s["count"] == 1  # 4 of 10 (after lower-casing) -> 1.0
    with open(tmp_path / "out" / "textvqa_predictions.json") as f:
        assert json.load(f) == [{"question_id": 1, "answer": "nikon"}, {"question_id": 2, "answer": ""}]
    with pytest.raises(DataError, match="abd.jpg"):
        vb.run_benchmark("textvqa", items, fn, str(tmp_path / "strict"), progress=False,
                         image_folder=str(tmp_path / "img"), strict=True)


def test_gqa_end_to_end(tmp_path):
    def q(image, question, answer, structural, semantic):
        return {"imageId": image, "question": question, "answer": answer, "isBalanced": True,
                "types": {"structural": structural, "semantic": semantic, "detailed": "x"}}
    data = {"201": q("n1", "Is the cat black?", "yes", "verify", "attr"),
            "202": q("n1", "Which side is the cup on?", "left", "query", "rel"),
            "203": q("n2", "What animal is it?", "cat", "query", "cat")}
    items = vb.read_gqa(write(tmp_path / "testdev_balanced_questions.json", data))
    assert [it["question_id"] for it in items] == ["201", "202", "203"] and items[0]["image"] == "n1.jpg"
    fn, _ = stub({"Is the cat black?": "Yes.", "Which side is the cup on?": "Left", "What animal is it?": "dog"})
    s = vb.run_benchmark("gqa", items, fn, str(tmp_path / "out"), progress=False)
    assert s["score"] == pytest.approx(200 / 3)
    assert s["per_type"] == {"query": {"accuracy": pytest.approx(50.0), "count": 2},
                             "verify": {"accuracy": pytest.approx(100.0), "count": 1}}
    assert s["per_semantic_type"]["cat"]["accuracy"] == 0.0
    with open(tmp_path / "out" / "gqa_predictions.json") as f:
        assert json.load(f) == [{"questionId": "201", "prediction": "yes"}, {"questionId": "202", "prediction": "left"},
                                {"questionId": "203", "prediction": "dog"}]


def test_pope_end_to_end_per_category(tmp_path):
    def rows(labels):
        return [{"question_id": i + 1, "image": "COCO_val2014_000000000001.jpg",
                 "text": f"Is there a thing{i} in the image?", "label": lab} for i, lab in enumerate(labels)]
    adv = write(tmp_path / "coco_pope_adversarial.json", rows(["yes", "no", "no", "yes"]), lines=True)
    rnd = write(tmp_path / "coco_pope_random.json", rows(["yes", "no"]), lines=True)
    items = vb.read_benchmark("pope", f"{adv},{rnd}")
    assert items[0]["key"] == "adversarial/1" and items[4]["key"] == "random/1"  # ids repeat across POPE files
    assert items[0]["prompt"] == "Is there a thing0 in the image?" + SUFFIX

    def answer_fn(batch):  # adversarial: yes, yes, no, "No, there is not." ; random: yes, no
        table = {"adversarial/1": "Yes", "adversarial/2": "Yes, there is.", "adversarial/3": "no",
                 "adversarial/4": "No, there is not.", "random/1": "yes", "random/2": "No"}
        return [table[it["key"]] for it in batch]
    s = vb.run_benchmark("pope", items, answer_fn, str(tmp_path / "out"), batch_size=4, progress=False)
    # adversarial: TP 1 FP 1 TN 1 FN 1 -> P = R = F1 = 0.5, acc 0.5, yes-ratio 0.5; random: all right -> F1 1
    adv_m = s["per_type"]["adversarial"]
    assert (adv_m["tp"], adv_m["fp"], adv_m["tn"], adv_m["fn"]) == (1, 1, 1, 1)
    assert adv_m["f1"] == pytest.approx(50.0) and adv_m["yes_ratio"] == pytest.approx(50.0)
    assert s["per_type"]["random"]["f1"] == pytest.approx(100.0)
    assert s["score"] == pytest.approx(75.0)  # F1 averaged over the categories, as LLaVA-1.5 reports POPE
    assert s["pooled"]["accuracy"] == pytest.approx(100 * 4 / 6)
    with open(tmp_path / "out" / "pope_answers.jsonl") as f:
        got = [json.loads(line) for line in f]
    assert got[0]["question_id"] == 1 and got[0]["text"] == "Yes" and got[0]["prompt"] == items[0]["prompt"]
    assert got[4]["metadata"] == {"category": "random"}


# --- resume -------------------------------------------------------------------------------------------------------

def test_killed_run_resumes_without_asking_again(tmp_path):
    q, a = vqav2_files(tmp_path)
    items = vb.read_vqav2(q, a)
    table = {"How many dogs?": "2", "Is it red?": "no", "What color?": "blue"}
    full = vb.run_benchmark("vqav2", items, stub(table)[0], str(tmp_path / "full"), batch_size=2, progress=False)

    calls = []

    def dies_on_second_call(batch):
        calls.append([it["key"] for it in batch])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return [table[it["question"]] for it in batch]
    out = str(tmp_path / "split")
    with pytest.raises(KeyboardInterrupt):
        vb.run_benchmark("vqav2", items, dies_on_second_call, out, batch_size=2, progress=False)
    assert os.path.exists(os.path.join(out, vb.PARTIAL_FILE)) and not os.path.exists(os.path.join(out, "summary.json"))
    with open(os.path.join(out, vb.PARTIAL_FILE), "a") as f:
        f.write('{"key": "20", "quest')  # a torn last line of a killed write is dropped
    fn, again = stub(table)
    resumed = vb.run_benchmark("vqav2", items, fn, out, batch_size=2, progress=False)
    assert again == [["20"]]  # answered items are not asked again
    assert resumed["n_resumed"] == 2
    for name in ("vqav2_predictions.json",):
        with open(os.path.join(out, name)) as f1, open(tmp_path / "full" / name) as f2:
            assert f1.read() == f2.read()
    assert resumed["score"] == full["score"] and resumed["per_type"] == full["per_type"]


def test_partial_file_of_another_benchmark_is_refused(tmp_path):
    q, a = vqav2_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    write(out / vb.PARTIAL_FILE, [{"benchmark": "gqa"}], lines=True)
    with pytest.raises(DataError, match="gqa"):
        vb.run_benchmark("vqav2", vb.read_vqav2(q, a), lambda b: ["x"] * len(b), str(out), progress=False)


def test_unreadable_image_reported_by_answer_fn_is_skipped(tmp_path):
    q, a = vqav2_files(tmp_path)
    items = vb.read_vqav2(q, a)
    s = vb.run_benchmark("vqav2", items, lambda b: [None if it["question_id"] == 11 else "2" for it in b],
                         str(tmp_path / "out"), progress=False)
    assert s["n_skipped"] == 1 and s["skipped"][0]["question_id"] == 11 and s["count"] == 2


# --- malformed files: one DataError naming the file and the problem ------------------------------------------------

def test_malformed_files_name_file_and_problem(tmp_path):
    with pytest.raises(DataError, match="not found"):
        vb.read_gqa(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        vb.read_textvqa(str(bad))
    with pytest.raises(DataError, match="expected"):
        vb.read_vqav2(write(tmp_path / "q.json", [1, 2]))
    with pytest.raises(DataError, match="question 0.*'question'"):
        vb.read_vqav2(write(tmp_path / "q2.json", {"questions": [{"image_id": 1, "question_id": 3}]}))
    q, _ = vqav2_files(tmp_path)
    with pytest.raises(DataError, match="no annotation for question_id 11"):
        vb.read_vqav2(q, write(tmp_path / "a2.json", {"annotations": [
            {"question_id": 10, "answers": [{"answer": "2"}], "answer_type": "number"}]}))
    with pytest.raises(DataError, match="line 1.*'label'"):
        vb.read_pope(write(tmp_path / "p.json", [{"question_id": 1, "image": "x.jpg", "text": "Is?", "label": "maybe"}],
                           lines=True))
    with pytest.raises(DataError, match="appears twice"):
        vb.read_textvqa(write(tmp_path / "t.json",
                              {"data": [{"question_id": 1, "image_id": "a", "question": "q"}] * 2}))
    with pytest.raises(ValueError, match="unknown benchmark"):
        vb.read_benchmark("okvqa", "x")
