"""Benchmark scores in the formats the field reports: VQAv2, TextVQA, GQA and POPE, read from each benchmark's own
files, prompted as LLaVA-1.5's evaluation prompts, scored as the official scripts score, predictions written in the
format each benchmark's server or script reads.

    items = read_benchmark("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json",
                           annotations="v2_mscoco_val2014_annotations.json")
    summary = run_benchmark("vqav2", items, answer_fn, out_dir, batch_size=64, image_folder="val2014/")

References (read, rules mirrored below, quoted in the docstrings):
  - VQA's official evaluation, GT-Vision-Lang-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py
    (`processPunctuation`, `processDigitArticle`, `evaluate`): VQAv2 accuracy, per answer type.
  - LLaVA-1.5 (haotian-liu/LLaVA): `llava/eval/model_vqa_loader.py` (prompt = "<image>\\n" + text, greedy,
    `outputs.strip()`, answers.jsonl rows {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}),
    `llava/eval/m4c_evaluator.py` (EvalAIAnswerProcessor, TextVQAAccuracyEvaluator), `llava/eval/eval_textvqa.py`,
    `llava/eval/eval_pope.py`, `scripts/convert_vqav2_for_submission.py` (the EvalAI upload: every test question,
    answer = EvalAIAnswerProcessor(text), '' when missing), `scripts/convert_gqa_for_eval.py`
    ({"questionId", "prediction": text.rstrip('.').lower()}), `docs/Evaluation.md` (the short-answer prompt
    "<question>\\nAnswer the question using a single word or phrase.", used for VQAv2, GQA, TextVQA and POPE).
  - GQA's official eval.py (cs.stanford.edu/people/dorarad/gqa/evaluate.html): accuracy = predicted == gold,
    also per structural and semantic type.

An item is a plain dict, the same keys for every benchmark:
    key            unique string (resume bookkeeping; str(question_id), "<category>/<question_id>" for POPE)
    question_id    as in the benchmark's file (int for VQAv2 / TextVQA / POPE, str for GQA)
    image          file name relative to the image folder
    question       the question as the file has it
    prompt         what the model is asked (LLaVA-1.5's text, without the "<image>\\n" that goes before it)
    answers        the ground truth: ten human answers (VQAv2, TextVQA), [answer] (GQA), [label] (POPE);
                   [] when the file has none (VQAv2 test-dev: predictions are written, nothing is scored)
    answer         one reference answer (VQAv2 multiple_choice_answer, TextVQA most common, GQA answer, POPE label)
    question_type  the bucket of the per-type scores: VQAv2 answer_type (yes/no, number, other), GQA structural
                   type, POPE category (adversarial / popular / random), TextVQA "other"
    extra          dict of the rest (VQAv2 question_type, GQA semantic / detailed types, TextVQA ocr_tokens, ...)
"""
import json
import os
import re
from collections import Counter

from tqdm import tqdm

from utils.data_files import resolve_in_folder
from utils.errors import DataError

BENCHMARKS = ("vqav2", "textvqa", "gqa", "pope")
SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5 docs/Evaluation.md, "Short-answer"
PARTIAL_FILE = "predictions.partial.jsonl"
SUMMARY_FILE = "summary.json"
PREDICTION_FILES = {"vqav2": "vqav2_predictions.json", "textvqa": "textvqa_predictions.json",
                    "gqa": "gqa_predictions.json", "pope": "pope_answers.jsonl"}


# --- answer normalisation (vqaEval.py and m4c_evaluator.py's EvalAIAnswerProcessor) --------------------------------

# vqaEval.py's `contractions` (the same table as EvalAIAnswerProcessor.CONTRACTIONS), kept with its quirks:
# "somebody'd" -> "somebodyd" and the never-matching capitalised keys (the text is lower-cased first).
CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've""".split())
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # vqaEval.py's `manualMap`
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
# `periodStrip`, as written: "(?!<=\d)" is a lookahead (meant as a lookbehind), so the rule is "a '.' not followed
# by a digit goes"; "2.5" keeps its point, "yes." loses it.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
VQA_COMMA = re.compile(r"(\d)(,)(\d)")          # vqaEval.py's `commaStrip`
EVALAI_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")  # EvalAIAnswerProcessor.COMMA_STRIP


def process_punctuation(text, comma=VQA_COMMA):
    """vqaEval.py `processPunctuation`: for each mark p of PUNCTUATION, if "p " or " p" occurs in the text, or the
    text holds a digit-comma-digit anywhere ("1,000"), p is deleted, else it becomes a space ("black-and-white" ->
    "black and white"); then PERIOD_STRIP deletes the periods not followed by a digit. The official call is
    `periodStrip.sub("", outText, re.UNICODE)`, whose third argument is the *count*: at most re.UNICODE = 32
    periods go. Mirrored."""
    out = text
    digit_comma = comma.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def process_digit_article(text):
    """vqaEval.py `processDigitArticle`: lower-case, split on whitespace, number words -> digits ("two" -> "2",
    "none" -> "0"), drop the articles a / an / the, then the contractions map ("dont" -> "don't"), join by one
    space."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa(answer):
    """A prediction as vqaEval.py's `evaluate` prepares it: newline and tab -> space, strip, processPunctuation,
    processDigitArticle."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def normalize_evalai(answer):
    """m4c_evaluator.py EvalAIAnswerProcessor (LLaVA applies it to the VQAv2 upload and to both sides of TextVQA):
    `word_tokenize` (lower-case, delete ',' and '?', "'s" -> " 's", strip), newline / tab -> space, strip,
    process_punctuation (with its comma rule "(?<=\\d)(,)+(?=\\d)"), process_digit_article."""
    answer = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer, comma=EVALAI_COMMA))


def soft_accuracy(prediction, gt_answers):
    """VQA accuracy of an already normalised prediction against normalised human answers: the mean, over the
    leave-one-out subsets (each annotator left out in turn: ten subsets of nine for VQAv2), of
    min(1, #matches among the others / 3). vqaEval.py leaves out by `item != gtAnsDatum` on the answer dicts (distinct
    answer_ids: exactly one each), TextVQAAccuracyEvaluator by index; both are "leave this one out", as here."""
    if not gt_answers:
        raise ValueError("soft_accuracy needs at least one ground-truth answer")
    n_match = sum(a == prediction for a in gt_answers)
    accs = [min(1.0, (n_match - (a == prediction)) / 3) for a in gt_answers]
    return sum(accs) / len(accs)


def vqav2_accuracy(prediction, gt_answers):
    """vqaEval.py `evaluate` for one question: the prediction through normalize_vqa; the human answers through
    processPunctuation only, and only when they are not all the same (`if len(set(gtAnswers)) > 1`): the official
    annotation files are already normalised, and the script relies on it. Then soft_accuracy."""
    pred = normalize_vqa(prediction)
    gts = [process_punctuation(a) for a in gt_answers] if len(set(gt_answers)) > 1 else list(gt_answers)
    return soft_accuracy(pred, gts)


def textvqa_accuracy(prediction, gt_answers):
    """TextVQAAccuracyEvaluator (m4c_evaluator.py, LLaVA's eval_textvqa.py): prediction and every human answer
    through normalize_evalai, then soft_accuracy (its `_compute_answer_scores` is the same leave-one-out mean)."""
    return soft_accuracy(normalize_evalai(prediction), [normalize_evalai(a) for a in gt_answers])


def normalize_gqa(prediction):
    """LLaVA's GQA prediction: `outputs.strip()` (model_vqa_loader.py) then `text.rstrip('.').lower()`
    (convert_gqa_for_eval.py); GQA's eval.py then compares `predicted == gold` as is."""
    return prediction.strip().rstrip(".").lower()


def pope_yes_no(text):
    """eval_pope.py's parse: keep the text before the first '.', delete ',', split on ' '; "no" if one of the words is
    exactly 'No', 'not' or 'no', else "yes" (so "NO" or "Nope" count as yes, as in the script)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions, labels):
    """eval_pope.py `eval_pope` on parsed answers ("yes"/"no") and labels (anything but "no" is yes, as there):
    accuracy, precision, recall, F1, yes-ratio (fractions) and the TP / FP / TN / FN counts. Where the script would
    divide by zero (no positive prediction or label) the value is 0.0."""
    pred = [p != "no" for p in predictions]
    gold = [g != "no" for g in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    n = len(pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(accuracy=(tp + tn) / n if n else 0.0, precision=precision, recall=recall, f1=f1,
                yes_ratio=sum(pred) / n if n else 0.0, tp=tp, fp=fp, tn=tn, fn=fn, count=n)


# --- readers -----------------------------------------------------------------------------------------------------

def make_prompt(question):
    """LLaVA-1.5's short-answer prompt: the question, a newline, SHORT_ANSWER (not added twice when a question file
    already carries it, as LLaVA's own llava_*.jsonl files do)."""
    question = question.rstrip("\n")
    return question if question.endswith(SHORT_ANSWER) else f"{question}\n{SHORT_ANSWER}"


def _load_json(path, what):
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _load_jsonl(path, what):
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path}")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return rows


def _field(row, name, types, path, where):
    if not isinstance(row, dict):
        raise DataError(f"{path}: {where}: expected an object, got {type(row).__name__}")
    if name not in row:
        raise DataError(f"{path}: {where}: missing field '{name}'")
    if not isinstance(row[name], types) or isinstance(row[name], bool):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise DataError(f"{path}: {where}: field '{name}' should be {names}, got {type(row[name]).__name__}")
    return row[name]


def _list_of(data, key, path, shape):
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected {shape}")
    if not data[key]:
        raise DataError(f"{path}: '{key}' is empty (no questions)")
    return data[key]


def _check_unique(items, path):
    seen = set()
    for it in items:
        if it["key"] in seen:
            raise DataError(f"{path}: question_id {it['question_id']!r} appears twice")
        seen.add(it["key"])
    return items


def read_vqav2(questions, annotations=None, image_pattern="COCO_val2014_{image_id:012d}.jpg"):
    """VQAv2 (or VQA v1) question JSON {"questions": [{"image_id", "question", "question_id"}]} and, optionally, the
    annotation JSON {"annotations": [{"question_id", "image_id", "answers": [{"answer", "answer_confidence",
    "answer_id"}] x 10, "answer_type", "multiple_choice_answer", "question_type"}]} -> items. Without annotations
    (test-dev / test) answers are [] and only the upload file is written. image_pattern is formatted with image_id
    ("COCO_test2015_{image_id:012d}.jpg" for test-dev)."""
    qs = _list_of(_load_json(questions, "VQAv2 question file"), "questions", questions,
                  '{"questions": [{"image_id", "question", "question_id"}, ...]}')
    ann = {}
    if annotations is not None:
        rows = _list_of(_load_json(annotations, "VQAv2 annotation file"), "annotations", annotations,
                        '{"annotations": [{"question_id", "answers", "answer_type", ...}, ...]}')
        for i, a in enumerate(rows):
            where = f"annotation {i}"
            qid = _field(a, "question_id", int, annotations, where)
            answers = _field(a, "answers", list, annotations, f"{where} (question_id {qid})")
            if not answers or not all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in answers):
                raise DataError(f"{annotations}: {where} (question_id {qid}): field 'answers' should be a non-empty "
                                "list of {\"answer\": str, ...}")
            _field(a, "answer_type", str, annotations, f"{where} (question_id {qid})")
            ann[qid] = a
    items = []
    for i, q in enumerate(qs):
        qid = _field(q, "question_id", int, questions, f"question {i}")
        where = f"question {i} (question_id {qid})"
        image_id = _field(q, "image_id", int, questions, where)
        text = _field(q, "question", str, questions, where)
        a = ann.get(qid)
        if annotations is not None and a is None:
            raise DataError(f"{annotations}: no annotation for question_id {qid} of {questions}")
        answers = [x["answer"] for x in a["answers"]] if a else []
        items.append(dict(key=str(qid), question_id=qid, image=image_pattern.format(image_id=image_id),
                          question=text, prompt=make_prompt(text), answers=answers,
                          answer=a.get("multiple_choice_answer", Counter(answers).most_common(1)[0][0]) if a else "",
                          question_type=a["answer_type"] if a else "",
                          extra=dict(image_id=image_id, question_type=a.get("question_type", "") if a else "")))
    return _check_unique(items, questions)


def read_textvqa(path, image_pattern="{image_id}.jpg", ocr=True):
    """TextVQA JSON {"data": [{"question_id", "image_id", "question", "answers": [10 strings], ...}]} -> items. When an
    entry carries "ocr_tokens" and ocr=True, the prompt is LLaVA-1.5's llava_textvqa_val_v051_ocr.jsonl form:
    "<question>\\nReference OCR token: <t1>, <t2>, ...\\nAnswer the question using a single word or phrase."
    (the form TinyLLaVA's and LLaVA-1.5's TextVQA numbers use); else the plain short-answer prompt."""
    rows = _list_of(_load_json(path, "TextVQA file"), "data", path,
                    '{"data": [{"question_id", "image_id", "question", "answers"}, ...]}')
    items = []
    for i, r in enumerate(rows):
        qid = _field(r, "question_id", int, path, f"entry {i}")
        where = f"entry {i} (question_id {qid})"
        image_id = _field(r, "image_id", str, path, where)
        text = _field(r, "question", str, path, where)
        answers = r.get("answers", [])
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{path}: {where}: field 'answers' should be a list of strings")
        tokens = r.get("ocr_tokens")
        prompt = text
        if ocr and isinstance(tokens, list) and tokens:
            prompt = f"{text}\nReference OCR token: {', '.join(str(t) for t in tokens)}"
        extra = {k: v for k, v in r.items() if k in ("ocr_tokens", "image_classes", "set_name")}
        items.append(dict(key=str(qid), question_id=qid, image=image_pattern.format(image_id=image_id),
                          question=text, prompt=make_prompt(prompt), answers=answers,
                          answer=Counter(answers).most_common(1)[0][0] if answers else "", question_type="other",
                          extra=dict(image_id=image_id, **extra)))
    return _check_unique(items, path)


def read_gqa(path, image_pattern="{imageId}.jpg"):
    """GQA balanced question JSON {qid: {"imageId", "question", "answer", "types": {"structural", "semantic",
    "detailed"}, ...}} (testdev_balanced_questions.json, the split LLaVA-1.5 reports) -> items; question_type is the
    structural type (verify, query, choose, logical, compare). test / challenge files without "answer" give []."""
    data = _load_json(path, "GQA question file")
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty object {{questionId: {{\"imageId\", \"question\", ...}}}}")
    items = []
    for qid, q in data.items():
        where = f"question {qid!r}"
        image_id = _field(q, "imageId", str, path, where)
        text = _field(q, "question", str, path, where)
        answer = q.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise DataError(f"{path}: {where}: field 'answer' should be str, got {type(answer).__name__}")
        types = q.get("types") or {}
        if not isinstance(types, dict):
            raise DataError(f"{path}: {where}: field 'types' should be an object")
        items.append(dict(key=str(qid), question_id=str(qid), image=image_pattern.format(imageId=image_id),
                          question=text, prompt=make_prompt(text), answers=[answer] if answer is not None else [],
                          answer=answer or "", question_type=types.get("structural", "other"),
                          extra=dict(image_id=image_id, semantic=types.get("semantic", "other"),
                                     detailed=types.get("detailed", "other"))))
    return items


def read_pope(paths):
    """POPE question files (JSON lines despite the .json name: {"question_id", "image", "text": "Is there a <object>
    in the image?", "label": "yes"|"no"}), one path or several (coco_pope_{adversarial,popular,random}.json).
    The category is the row's "category" when it has one (LLaVA's llava_pope_test.jsonl), else the file name
    after "coco_pope_" (eval_pope.py's `file[10:-5]`), else the file's stem. question_ids repeat across POPE's
    files, so key = "<category>/<question_id>"."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    items = []
    for path in paths:
        path = os.fspath(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        default_cat = stem[len("coco_pope_"):] if stem.startswith("coco_pope_") else stem
        rows = _load_jsonl(path, "POPE question file")
        if not rows:
            raise DataError(f"{path}: no questions")
        for i, r in enumerate(rows):
            qid = _field(r, "question_id", (int, str), path, f"line {i + 1}")
            where = f"line {i + 1} (question_id {qid})"
            image = _field(r, "image", str, path, where)
            text = _field(r, "text", str, path, where)
            label = r.get("label")
            if label is not None and label not in ("yes", "no"):
                raise DataError(f"{path}: {where}: field 'label' should be \"yes\" or \"no\", got {label!r}")
            cat = r.get("category", default_cat)
            question = text[:-len(SHORT_ANSWER)].rstrip("\n") if text.endswith(SHORT_ANSWER) else text
            items.append(dict(key=f"{cat}/{qid}", question_id=qid, image=image, question=question,
                              prompt=make_prompt(text), answers=[label] if label else [], answer=label or "",
                              question_type=cat, extra=dict(category=cat, source=path)))
        _check_unique(items, path)
    return items


def read_benchmark(fmt, questions, annotations=None, image_pattern=None):
    """One entry point: vqav2 (questions + annotations JSON), textvqa (one JSON), gqa (one JSON), pope (one or
    several JSON-lines files; a comma-separated string works too)."""
    if fmt == "vqav2":
        return read_vqav2(questions, annotations, image_pattern or "COCO_val2014_{image_id:012d}.jpg")
    if fmt == "textvqa":
        return read_textvqa(questions, image_pattern or "{image_id}.jpg")
    if fmt == "gqa":
        return read_gqa(questions, image_pattern or "{imageId}.jpg")
    if fmt == "pope":
        return read_pope(questions.split(",") if isinstance(questions, str) else questions)
    raise ValueError(f"unknown benchmark format {fmt!r} (one of {', '.join(BENCHMARKS)})")


def to_conversation(item):
    """The item as a LLaVA conversation entry (utils/vqa_data.py's format), the prompt after "<image>\\n" as LLaVA's
    model_vqa_loader.py builds it; the gpt turn holds the reference answer (unused when generating)."""
    return {"id": item["key"], "image": item["image"],
            "conversations": [{"from": "human", "value": "<image>\n" + item["prompt"]},
                              {"from": "gpt", "value": item["answer"] or "?"}]}


# --- scoring -----------------------------------------------------------------------------------------------------

def _percent_by(groups):
    return {k: {"accuracy": 100 * sum(v) / len(v), "count": len(v)} for k, v in sorted(groups.items())}


def score(fmt, items, predictions):
    """Scores of the answered items (predictions: key -> the model's raw text) with ground truth, in percent as
    papers print them. VQAv2 / TextVQA: soft accuracy overall and per question_type (VQAv2: yes/no, number,
    other); GQA: exact match overall, per structural and per semantic type; POPE: per category and pooled
    accuracy, precision, recall, F1, yes-ratio, plus the mean F1 / accuracy over categories (LLaVA-1.5's POPE
    number is the F1 averaged over its three splits). `score` is the headline number."""
    scored = [it for it in items if it["key"] in predictions and it["answers"]]
    out = dict(count=len(scored))
    if not scored:
        out.update(score=None, note="no answered item with ground truth (e.g. a test split: upload the file)")
        return out
    if fmt in ("vqav2", "textvqa"):
        acc_fn = vqav2_accuracy if fmt == "vqav2" else textvqa_accuracy
        if fmt == "vqav2":  # what the server scores: the uploaded answer (EvalAI-processed, as LLaVA uploads)
            accs = [acc_fn(normalize_evalai(predictions[it["key"]]), it["answers"]) for it in scored]
        else:
            accs = [acc_fn(predictions[it["key"]], it["answers"]) for it in scored]
        groups = {}
        for it, a in zip(scored, accs):
            groups.setdefault(it["question_type"], []).append(a)
        out.update(score=100 * sum(accs) / len(accs), accuracy=100 * sum(accs) / len(accs),
                   per_type=_percent_by(groups))
    elif fmt == "gqa":
        hits = [normalize_gqa(predictions[it["key"]]) == it["answers"][0] for it in scored]
        structural, semantic = {}, {}
        for it, h in zip(scored, hits):
            structural.setdefault(it["question_type"], []).append(h)
            semantic.setdefault(it["extra"].get("semantic", "other"), []).append(h)
        out.update(score=100 * sum(hits) / len(hits), accuracy=100 * sum(hits) / len(hits),
                   per_type=_percent_by(structural), per_semantic_type=_percent_by(semantic))
    elif fmt == "pope":
        by_cat = {}
        for it in scored:
            by_cat.setdefault(it["question_type"], []).append(it)

        def metrics(its):
            m = pope_metrics([pope_yes_no(predictions[it["key"]]) for it in its], [it["answers"][0] for it in its])
            return {k: (100 * v if k in ("accuracy", "precision", "recall", "f1", "yes_ratio") else v)
                    for k, v in m.items()}
        per = {c: metrics(its) for c, its in sorted(by_cat.items())}
        pooled = metrics(scored)
        mean_f1 = sum(m["f1"] for m in per.values()) / len(per)
        out.update(score=mean_f1, f1_mean=mean_f1, accuracy_mean=sum(m["accuracy"] for m in per.values()) / len(per),
                   pooled=pooled, per_type=per)
    else:
        raise ValueError(f"unknown benchmark format {fmt!r}")
    return out


def prediction_rows(fmt, items, predictions, model_id="model"):
    """The predictions file's content, in each benchmark's own format. VQAv2: LLaVA's EvalAI upload
    [{"question_id": int, "answer": normalize_evalai(text)}] over every item ('' for an unanswered one: the server
    wants every question); TextVQA: [{"question_id", "answer": text}] (the EvalAI upload, raw text; the evaluator
    normalises); GQA: [{"questionId": str, "prediction": normalize_gqa(text)}] for GQA's eval.py; POPE: LLaVA's
    answers.jsonl rows {"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {"category"}}."""
    if fmt == "vqav2":
        return [{"question_id": it["question_id"],
                 "answer": normalize_evalai(predictions[it["key"]]) if it["key"] in predictions else ""}
                for it in items]
    if fmt == "textvqa":
        return [{"question_id": it["question_id"], "answer": predictions.get(it["key"], "")} for it in items]
    if fmt == "gqa":
        return [{"questionId": it["question_id"], "prediction": normalize_gqa(predictions[it["key"]])}
                for it in items if it["key"] in predictions]
    if fmt == "pope":
        return [{"question_id": it["question_id"], "prompt": it["prompt"], "text": predictions[it["key"]],
                 "answer_id": it["key"], "model_id": model_id, "metadata": {"category": it["question_type"]}}
                for it in items if it["key"] in predictions]
    raise ValueError(f"unknown benchmark format {fmt!r}")


# --- the driver --------------------------------------------------------------------------------------------------

def _write_atomic(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_partial(path, fmt, keys):
    """key -> text of the answers a previous (killed) run appended to predictions.partial.jsonl. The first line names
    the benchmark (another benchmark's file is an error); an unparsable last line (killed mid-write) is dropped and
    cut off the file; answers of keys not among `keys` are ignored."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    rows, good_chars = [], 0
    for n, line in enumerate(lines):
        if not line.strip():
            good_chars += len(line) + 1
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[n + 1:]):
                raise DataError(f"{path}: line {n + 1} is not valid JSON (delete the file to start over)") from None
            break  # the torn last line of a killed run
        good_chars += len(line) + 1
    if not rows:
        return {}
    head = rows[0]
    if not isinstance(head, dict) or head.get("benchmark") != fmt:
        other = head.get("benchmark") if isinstance(head, dict) else None
        raise DataError(f"{path}: holds answers of benchmark {other!r}, not {fmt!r} "
                        "(use another out dir or delete the file)")
    with open(path, "r+", encoding="utf-8") as f:  # cut a torn last line so that appends start on a fresh line
        text = f.read()
        if len(text) > good_chars or (text and not text.endswith("\n")):
            f.seek(0)
            f.truncate()
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    keys = set(keys)
    return {r["key"]: r["text"] for r in rows[1:] if isinstance(r, dict) and r.get("key") in keys
            and isinstance(r.get("text"), str)}


def missing_image(item, image_folder):
    """The reason item's image cannot be used (outside the folder, not a file), or None."""
    try:
        path = resolve_in_folder(image_folder, item["image"], f"question_id {item['question_id']!r}")
    except DataError as e:
        return str(e)
    return None if os.path.isfile(path) else f"image not found: {path}"


def run_benchmark(fmt, items, answer_fn, out_dir, batch_size=64, progress=True, image_folder=None, strict=False,
                  model_id="model", desc=None):
    """Answer every item with answer_fn (a batch of items -> one answer string per item; None, or a DataError
    instance, for an item whose image could not be read) and write, in out_dir:
        predictions.partial.jsonl   appended and flushed per batch: {"benchmark"} then {"key", "question_id",
                                    "text"} lines; a rerun skips the keys already there (resume)
        <PREDICTION_FILES[fmt]>     the benchmark's own predictions file (prediction_rows), written atomically
        summary.json                score(...) + counts + the skipped items, written atomically
    then deletes the partial file. Items whose image is missing (checked up front when image_folder is given) or
    unreadable (None / DataError from answer_fn) are counted and named in the summary, and not scored; with
    strict=True they raise DataError. Returns the summary dict."""
    if fmt not in BENCHMARKS:
        raise ValueError(f"unknown benchmark format {fmt!r} (one of {', '.join(BENCHMARKS)})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    os.makedirs(out_dir, exist_ok=True)
    partial_path = os.path.join(out_dir, PARTIAL_FILE)
    done = read_partial(partial_path, fmt, [it["key"] for it in items])
    resumed = len(done)
    skipped = []

    def skip(item, reason):
        if strict:
            raise DataError(f"question_id {item['question_id']!r}: {reason}")
        skipped.append(dict(question_id=item["question_id"], image=item["image"], reason=reason))

    todo = []
    for it in items:
        if it["key"] in done:
            continue
        reason = missing_image(it, image_folder) if image_folder is not None else None
        if reason:
            skip(it, reason)
        else:
            todo.append(it)
    new_file = not os.path.exists(partial_path) or os.path.getsize(partial_path) == 0
    with open(partial_path, "a", encoding="utf-8") as f:
        if new_file:
            f.write(json.dumps({"benchmark": fmt}) + "\n")
            f.flush()
        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc or fmt, disable=not progress)
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            answers = list(answer_fn(batch))
            if len(answers) != len(batch):
                raise ValueError(f"answer_fn returned {len(answers)} answers for a batch of {len(batch)}")
            lines = []
            for it, ans in zip(batch, answers):
                if ans is None or isinstance(ans, Exception):
                    skip(it, str(ans) if ans is not None else "unreadable image")
                    continue
                if not isinstance(ans, str):
                    raise TypeError(f"answer_fn gave {type(ans).__name__} for question_id {it['question_id']!r}, "
                                    "expected str (or None for an unreadable image)")
                done[it["key"]] = ans
                lines.append(json.dumps({"key": it["key"], "question_id": it["question_id"], "text": ans}) + "\n")
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
        bar.close()

    pred_name = PREDICTION_FILES[fmt]
    rows = prediction_rows(fmt, items, done, model_id)
    if fmt == "pope":
        _write_atomic(os.path.join(out_dir, pred_name), "".join(json.dumps(r) + "\n" for r in rows))
    else:
        _write_atomic(os.path.join(out_dir, pred_name), json.dumps(rows))
    summary = dict(benchmark=fmt, n_items=len(items), n_answered=sum(it["key"] in done for it in items),
                   n_resumed=resumed, n_skipped=len(skipped), skipped=skipped, predictions_file=pred_name,
                   **score(fmt, items, done))
    _write_atomic(os.path.join(out_dir, SUMMARY_FILE), json.dumps(summary, indent=1))
    os.remove(partial_path)
    return summary


def format_summary(summary):
    """One line for the log: "vqav2 73.71 (n=1000; yes/no 90.1, number 50.2, other 63.0; 2 skipped)"."""
    if summary.get("score") is None:
        return (f"{summary['benchmark']}: nothing scored ({summary['n_answered']} answered, "
                f"{summary['n_skipped']} skipped)")
    what = "F1 mean" if summary["benchmark"] == "pope" else "accuracy"
    per = ", ".join(f"{k} {v['f1' if summary['benchmark'] == 'pope' else 'accuracy']:.2f}"
                    for k, v in summary.get("per_type", {}).items())
    return (f"{summary['benchmark']} {what} {summary['score']:.2f}% (n={summary['count']}; {per}; "
            f"{summary['n_skipped']} skipped)")
