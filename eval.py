"""eval.py: score answers to SPAR-Bench and VSI-Bench questions, from our Spa3-VLM or any other system.

    python eval.py --ckpt=out/vlm --data=data/spar --split=val   # run the model, write predictions.jsonl, score it
    python eval.py --predictions=preds.jsonl --data=FILE_OR_DIR  # score {"id", "prediction"} lines or an lmms-eval log
    python eval.py --compare=A=a.json,B=b.json   # or --ablation=A=a0.json+a1.json,B=...   or --gates=geo=metrics.jsonl

Questions: DATA/qa_{split}.jsonl from generate_spar.py, or a SPAR-Bench / VSI-Bench / SPAR-7M file as published
(told apart by fields, below); answers: a file or vlm.py's model.answer(records, images); chance baselines:
learned from DATA/qa_train.jsonl; train.py's gates use paired_bootstrap. stdout gets a markdown table and
`overall: <score>`; --json_out keeps every number. In percent:
- fill: MRA, the mean over θ in {0.50, 0.55, ..., 0.95} of [|ŷ - y| / |y| < 1 - θ], ŷ the prediction's first
  number (the last for SPAR's numeric _mv tasks, as its evaluator reads them), y the ground truth, in exact
  fractions (5 % off fails θ = 0.95). No number, or one too long to read, scores 0; y = 0 only scores ŷ = 0;
  view_change_infer: the mean over SPAR's five signed axes, read by component name.
- select: 1 if extract_letter reads the right letter, else 0 (an empty answer too).
- a task: the mean over its questions (over difficulties first, as VSI-Bench does); a level, a benchmark and
  `overall`: the mean over their tasks. A question without a prediction scores 0. README compares the official
  scorers, difference by difference.
"""
import json
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from fractions import Fraction
from statistics import mean  # exact for Fractions (the training mean a chance baseline answers)

import numpy as np
import torch
from tqdm import tqdm

import data
from generate_spar import (GRID_NOTE, NUMBER_POST_PROMPT, SELECT_LETTER, SPAR_TASKS, TASKS, VSI_TASKS, announce,
                           parse_args, write_atomic)

BENCHMARKS = {"SPAR-Bench": {}, "VSI-Bench": {}}  # benchmark -> level -> [task], in generate_spar.TASKS's order
for _task in SPAR_TASKS + VSI_TASKS:
    BENCHMARKS["SPAR-Bench" if _task in SPAR_TASKS else "VSI-Bench"].setdefault(TASKS[_task][0], []).append(_task)
TASK_LEVEL = {task: TASKS[task][0] for task in SPAR_TASKS + VSI_TASKS}
# The tasks that need 3D: metric depth and distance across views, how the camera moved, the room's size
THREE_D_TASKS = ["depth_prediction_oc_mv", "depth_prediction_oo_mv", "distance_prediction_oc_mv", "view_change_infer",
                 "distance_prediction_oo_mv", "distance_infer_center_oo_mv", "camera_motion_infer",
                 "room_size_estimation"]

# -----------------------------------------------------------------------------
# Reading an answer: numbers and option letters

# An exponent has at most two digits ("1e999" reads as 1 and 999, not a huge number). Answers carry no thousands
# separators: "0.52, 1.20, -30" is three numbers, so "1,200" reads as 1 and 200.
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d{1,2}(?!\d))?")


def parse_numbers(text):
    """All numbers in text, in order, as exact fractions: "about 2.5 m" -> [5/2]. None if one has more digits than
    Python converts (4300): such a prediction scores 0 and is counted, rather than stopping the run."""
    try:
        return [Fraction(m) for m in NUMBER.findall(text)]
    except ValueError:
        return None


OPTION_PREFIX = re.compile(r"\s*[A-Za-z][.)]\s*")                  # "B. " in front of an option's text
LONE_LETTER = re.compile(r"[(\[]?([A-Za-z])[)\].:]?")              # the whole answer: "B", "b.", "(B)", "[c]"
LEADING_LETTER = re.compile(r"[(\[]?([A-Za-z])[)\].:]\s")          # "B) left", "(b) left", "C. 2.3", "a: left"
CUED_LETTER = re.compile(r"\b(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*(\(?)([A-Za-z])(\)?)(?![A-Za-z])",
                         re.IGNORECASE)                             # "The answer is B", "answer: b", "Option (C)"


def _normalise(text):
    return " ".join(text.casefold().split()).strip(" .,;:!?\"'")


def extract_letter(prediction, options):
    """The option letter a free-text answer picks, or None. The first rule that applies wins:
    1. the answer is one option's text, with or without its letter ("left", "B. left", any case);
    2. the whole answer is a letter, maybe bracketed or with a full stop ("b", "(B)", "C.");
    3. the answer starts with a letter and a bracket, full stop or colon, then a space ("B) left");
    4. a letter after "answer", "option" or "choice": a capital always ("The answer is B because ..."), a lowercase
       one only bracketed or before punctuation or the end ("the answer is a chair" picks nothing; nor does prose)."""
    text = prediction.replace("*", "").strip()  # markdown emphasis is not part of the answer
    if not text:
        return None
    said = _normalise(text)
    matches = [i for i, option in enumerate(options)
               if said in (_normalise(option), _normalise(OPTION_PREFIX.sub("", option, count=1)))]
    if len(matches) == 1:
        return chr(ord("A") + matches[0])
    m = LONE_LETTER.fullmatch(text) or LEADING_LETTER.match(text)
    if m:
        return m.group(1).upper()  # a letter beyond the options is returned too: it scores as wrong
    for m in CUED_LETTER.finditer(text):
        open_bracket, letter, close_bracket = m.groups()
        rest = text[m.end():]
        if letter.isupper() or (open_bracket and close_bracket) or not rest or rest[0] in ".,;:!?":
            return letter.upper()
    return None


# -----------------------------------------------------------------------------
# Scoring: one answer in [0, 1], then tasks, levels and benchmarks in percent

THETAS_PERCENT = range(50, 100, 5)  # θ as whole percents, so the thresholds are exact


def mra(pred, truth):
    """Mean relative accuracy of one number against the ground truth."""
    if truth == 0:
        return float(pred == 0)
    error = abs(Fraction(pred) - Fraction(truth)) / abs(Fraction(truth))
    return sum(error < Fraction(100 - t, 100) for t in THETAS_PERCENT) / len(THETAS_PERCENT)


# SPAR-Bench's view_change_infer answer names its components: "move_left:0.52,move_forward:1.20,rotate_right:30".
# Its evaluator reads five signed axes, each direction minus its opposite; a component not named is 0.
VIEW_AXES = [("move_right", "move_left"), ("move_up", "move_down"), ("move_forward", "move_backward"),
             ("rotate_right", "rotate_left"), ("rotate_up", "rotate_down")]
# A named component anywhere, in any case: "move_left:0.5", "Move_Left: 0.5 m", "move_left is 0.5"
COMPONENT = re.compile(r"\b(move_(?:right|left|up|down|forward|backward)|rotate_(?:right|left|up|down))\b"
                       r"\s*(?:[:=]|is)?\s*(" + NUMBER.pattern + ")", re.IGNORECASE)
# SPAR-Bench's evaluator reads the last number of these tasks' answers (the first may be an image's number)
LAST_NUMBER_TASKS = {"depth_prediction_oc_mv", "depth_prediction_oo_mv", "distance_prediction_oc_mv",
                     "distance_prediction_oo_mv"}


def view_change_values(text):
    """The five signed axes of a view_change_infer answer (right, up, forward, rotate right, rotate up): each
    named component found anywhere, in any case, the last of a name counting (as SPAR's evaluator keeps it),
    its opposite subtracted ("move_left:0.5" is right = -0.5). [] if it names none (it scores 0, as SPAR's
    evaluator scores an answer it cannot read); None if a number is too long to read."""
    named = {name.lower(): number for name, number in COMPONENT.findall(text)}
    if not named:
        return []
    try:
        return [Fraction(named.get(ahead, 0)) - Fraction(named.get(back, 0)) for ahead, back in VIEW_AXES]
    except ValueError:
        return None


def answer_values(task, text):
    """The values an answer gives, as the task reads them: view_change_infer its five axes, the SPAR _mv tasks
    the last number, every other task the first. [] if none; None if a number is too long to read."""
    if task == "view_change_infer":
        return view_change_values(text)
    numbers = parse_numbers(text)
    return numbers and [numbers[-1] if task in LAST_NUMBER_TASKS else numbers[0]]


def score_values(preds, truths):
    """Mean MRA over the truth's values (never none: load_questions checks); values the prediction lacks add 0."""
    return sum(mra(p, y) for p, y in zip(preds, truths)) / len(truths)


def score_record(record, prediction):
    """Score of one prediction (None: no prediction) for one question record."""
    if prediction is None:
        return 0.0
    if record["format_type"] == "select":
        return float(extract_letter(prediction, record.get("options", [])) == record["answer"])
    values = answer_values(record["task"], prediction)
    return 0.0 if values is None else score_values(values, answer_values(record["task"], record["answer"]))


def summarize(records, scores):
    """Percent scores per task, level, benchmark and overall; a None score (no baseline answer) is left out."""
    groups = defaultdict(lambda: defaultdict(list))  # task -> difficulty ("" if none) -> scores
    for record, score in zip(records, scores):
        if score is not None:
            groups[record["task"]][record.get("difficulty", "")].append(score)
    tasks = {task: 100 * mean(map(mean, by_difficulty.values())) for task, by_difficulty in groups.items()}
    levels, benchmarks = defaultdict(list), defaultdict(list)  # the scores of their tasks with a score
    for task, score in tasks.items():
        levels[TASK_LEVEL[task]].append(score)
        benchmarks["SPAR-Bench" if task in SPAR_TASKS else "VSI-Bench"].append(score)
    return {"tasks": tasks, "levels": {level: mean(s) for level, s in levels.items()},
            "benchmarks": {name: mean(s) for name, s in benchmarks.items()},
            "overall": mean(tasks.values()) if tasks else 0.0}


def _most_frequent(values):
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))  # ties: the smallest (letter A before B, the smaller number)


def chance(train, records):
    """Per-question scores of VSI-Bench's chance baselines: uniform (select: 1/len(options); fill: answering the
    task's training mean) and frequency (the task's most frequent training answer); per value for view_change_infer.
    None where training lacks the task (with the format: numeric SPAR tasks come as both fill and select)."""
    answers = defaultdict(list)
    for r in train:
        kind = (r["task"], r["format_type"])
        answers[kind].append(r["answer"] if kind[1] == "select" else answer_values(r["task"], r["answer"]))
    means = {kind: [mean(axis) for axis in zip(*values)] for kind, values in answers.items() if kind[1] == "fill"}
    modes = {kind: _most_frequent(values) if kind[1] == "select" else [_most_frequent(a) for a in zip(*values)]
             for kind, values in answers.items()}
    uniform, frequency = [], []
    for record in records:
        kind = (record["task"], record["format_type"])
        if kind[1] == "select":
            uniform.append(1 / len(record["options"]) if record.get("options") else None)
            frequency.append(float(modes[kind] == record["answer"]) if kind in modes else None)
        else:
            truths = answer_values(record["task"], record["answer"])
            uniform.append(score_values(means[kind], truths) if kind in modes else None)
            frequency.append(score_values(modes[kind], truths) if kind in modes else None)
    return uniform, frequency


def evaluate(records, predictions, train=None):
    """Every number: the summaries, per-question scores (for --ablation and --gates), counts, unusable predictions."""
    scores = [score_record(r, predictions.get(r["id"])) for r in records]
    uniform, frequency = chance(train, records) if train else (None, None)
    return {"n_questions": len(records), "n_missing": sum(r["id"] not in predictions for r in records),
            "unreadable": [r["id"] for r in records if r["format_type"] == "fill" and r["id"] in predictions
                           and answer_values(r["task"], predictions[r["id"]]) is None],
            "counts": dict(Counter(r["task"] for r in records)), "model": summarize(records, scores),
            "scores": {r["id"]: score for r, score in zip(records, scores)},
            "tasks_of": {r["id"]: r["task"] for r in records},
            "chance_uniform": summarize(records, uniform) if train else None,
            "chance_frequency": summarize(records, frequency) if train else None,
            "chance_frequency_scores": {r["id"]: f for r, f in zip(records, frequency)} if train else None}


# -----------------------------------------------------------------------------
# Where the answers come from: a predictions file ({"id": str, "prediction": str} per line), or a model

def predict(model, records, load_frames, batch_size=16, load_oracle=None):
    """One answer per record from model.answer(records, images[, oracle]) a batch at a time, in order. images[i]:
    load_frames(records[i]), uint8 (N_i, 3, H, W) as data.as_images gives them (or floats in [0, 1]); oracle[i]:
    load_oracle(records[i]), the oracle arm's."""
    answers = []
    with torch.no_grad():
        for start in tqdm(range(0, len(records), batch_size), desc="eval", unit="batch"):
            batch = records[start:start + batch_size]
            extra = {"oracle": [load_oracle(record) for record in batch]} if load_oracle else {}
            out = model.answer(batch, [load_frames(record) for record in batch], **extra)
            if len(out) != len(batch) or not all(isinstance(a, str) for a in out):
                raise ValueError(f"model.answer must return {len(batch)} strings, got {out!r:.200}")
            answers.extend(out)
    return answers


def model_predictions(cfg, records, model=None, load_frames=None):
    """id -> answer of the checkpoint cfg.ckpt (or of model), also written to a predictions.jsonl."""
    blind = next((r["id"] for r in records if not r.get("image") and not r.get("image_files")), None)
    if blind is not None:  # VSI-Bench rows name a video, SPAR-Bench rows embed their pictures
        raise ValueError(f"{cfg.data}: question {blind!r} has no image files to show the model (videos and embedded "
                         f"pictures are not read: write them as PNG/JPEG files, named in an 'image' list; README)")
    if model is None:
        import vlm  # only model mode needs the model code
        model = vlm.load_for_eval(cfg.ckpt)
    config = getattr(model, "config", None)
    store = data.SceneStore(cfg.data if os.path.isdir(cfg.data) else os.path.dirname(cfg.data))
    # frames as training shows them (markers drawn), at the model's trained image size unless --res says otherwise
    res = cfg.res or getattr(getattr(config, "geo", None), "image_size", None)
    load_frames = load_frames or (lambda r: store.record_frames(r, res))
    oracle = store.oracle if getattr(config, "spa3r", None) == "oracle" else None
    answers = predict(model, records, load_frames, cfg.batch_size, oracle)
    path = cfg.out or os.path.join(os.path.dirname(cfg.json_out) if cfg.json_out else cfg.ckpt, "predictions.jsonl")
    rows = [{"id": r["id"], "task": r["task"], "prediction": a} for r, a in zip(records, answers)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode())
    print(f"wrote {len(answers)} predictions to {path}")
    return {r["id"]: a for r, a in zip(records, answers)}


# -----------------------------------------------------------------------------
# The questions: a generated set's, or a benchmark's file as published, each row turned into our record; and
# the answers: {"id", "prediction"} lines, or lmms-eval's --log_samples. README "Evaluation" lists the layouts.

def read_rows(path):
    """(where, row) of a file holding a JSON list or JSON lines, told by its first character, whatever its name
    (datasets' to_json("x.json") writes lines); a UTF-8 byte-order mark is skipped."""
    data.require_file(path)
    with open(path, "rb") as f:
        raw = f.read().removeprefix(b"\xef\xbb\xbf")
    if raw.lstrip()[:1] == b"[":
        return [(f"{path}: record {i}", row) for i, row in enumerate(data.parse_json(raw, path))]
    return [(f"{path}:{n}", data.parse_json(line.rstrip(b"\r"), path, n))
            for n, line in enumerate(raw.split(b"\n"), 1) if line.strip()]


def row_layout(row):
    """Which layout a row is in, told by its fields."""
    if not isinstance(row, dict):
        return None
    if "doc_id" in row and ("filtered_resps" in row or "resps" in row):
        return "lmms-eval"
    if "question_type" in row and "ground_truth" in row:
        return "VSI-Bench"
    if "conversations" in row:
        return "SPAR-7M"
    if "scene" in row and "format_type" in row:
        return "nanoSpa3R"
    if "task" in row and "answer" in row and "question" in row:
        return "SPAR-Bench"
    return None


def as_id(value, where, field="id"):
    """An id as a string: benchmark ids are integers (whole floats, from pandas, too)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: field '{field}': must be a string or an integer, got {value!r:.60}")
    return str(value)


def image_files(row, image_root):
    """A row's images as files under image_root ({"image_files": [...]}) when they are file names; embedded
    pictures (SPAR-Bench's parquet), logged picture descriptions and videos give {}: left out of scoring."""
    images = row.get("image")
    images = [images] if isinstance(images, str) else images
    if isinstance(images, list) and images and all(isinstance(i, str) and not i.startswith("<") for i in images):
        return {"image_files": [os.path.join(image_root, i) for i in images]}
    return {}


GRID_TASKS = ("position_matching", "camera_motion_infer")  # SPAR-Bench's prompt explains their 0-1000 values


def from_sparbench(row, where, image_root=""):
    """A SPAR-Bench row (jasonzhango/SPAR-Bench: int id, task, format_type, question with its options inside,
    answer, images embedded) as our record; "prompt" is what sparbench's doc_to_text builds. Without a
    format_type a task is multiple choice where SPAR-Bench's scorer says so: high level, position, camera motion."""
    task = row.get("task")
    if task not in SPAR_TASKS:
        raise ValueError(f"{where}: field 'task': unknown SPAR-Bench task {task!r}")
    by_task = "select" if TASK_LEVEL[task] == "high" or task in GRID_TASKS else "fill"
    select = row.get("format_type", by_task) == "select"
    question, answer = str(row.get("question", "")), str(row.get("answer", "")).strip()
    if select:
        answer, prompt = answer.upper(), f"{question}\n{GRID_NOTE if task in GRID_TASKS else ''}\n{SELECT_LETTER}"
    else:
        prompt = question if task == "view_change_infer" else f"{question}\n{NUMBER_POST_PROMPT}"
    options = [f"{letter}. {text}" for letter, text in data.OPTION_LINE.findall(question)] if select else []
    return {"id": as_id(row.get("id"), where), "task": task, "format_type": "select" if select else "fill",
            "question": question, "prompt": prompt, "answer": answer, "options": options} | image_files(row, image_root)


def from_vsibench(row, where, image_root=""):
    """A VSI-Bench row (nyu-visionx/VSI-Bench: int id, dataset, scene_name, question_type, question, options (a
    list, an array from pandas, or null), ground_truth) as our record. object_rel_direction_{easy,medium,hard}
    become object_rel_direction with a "difficulty", as VSI-Bench scores them."""
    qtype = str(row.get("question_type"))
    m = re.fullmatch(r"(object_rel_direction)_(easy|medium|hard)", qtype)
    task, difficulty = m.groups() if m else (qtype, "")
    if task not in VSI_TASKS:
        raise ValueError(f"{where}: field 'question_type': unknown VSI-Bench question type {qtype!r}")
    options = row.get("options")
    if options is None or isinstance(options, float):  # NaN: pandas' null
        options = []
    elif isinstance(options, str) or not hasattr(options, "__iter__"):
        raise ValueError(f"{where}: field 'options': expected a list of options, got {options!r:.60}")
    record = {"id": as_id(row.get("id"), where), "scene": str(row.get("scene_name", "")), "task": task,
              "format_type": "select" if len(options) else "fill", "question": str(row.get("question", "")),
              "answer": str(row.get("ground_truth", "")).strip(), "options": [str(o) for o in options]}
    return record | ({"difficulty": difficulty} if difficulty else {}) | image_files(row, image_root)


def from_ours(row, where, image_root=""):
    data.check_record(row, where)
    return row


READERS = {"nanoSpa3R": from_ours, "SPAR-Bench": from_sparbench, "VSI-Bench": from_vsibench,
           "SPAR-7M": data.from_conversations}


def load_questions(source, split="val", image_root=""):
    """The questions to score: DATA/qa_{split}.jsonl of a folder (generate_spar.py's, or a SPAR-7M-layout one),
    or a file in one of READERS' layouts. Relative image names start at data.image_root_of."""
    path = os.path.join(source, f"qa_{split}.jsonl") if os.path.isdir(source) else source
    records, seen, root = [], {}, data.image_root_of(path, image_root)
    for where, row in read_rows(path):
        layout = row_layout(row)
        if layout not in READERS:
            raise ValueError(f"{where}: not a question of a known layout ({', '.join(READERS)}); fields: "
                             f"{', '.join(row) if isinstance(row, dict) else type(row).__name__}")
        record = READERS[layout](row, where, root)
        check_question(record, where)
        if record["id"] in seen:
            raise ValueError(f"{where}: field 'id': duplicate id {record['id']!r} (first at {seen[record['id']]})")
        seen[record["id"]] = where
        records.append(record)
    return records


def check_question(record, where):
    """What scoring needs: a known task (a misspelling would count in `overall` but show in no table), a numeric
    answer the scorer can read, a letter for multiple choice."""
    if record["task"] not in TASK_LEVEL:
        raise ValueError(f"{where}: field 'task': unknown task {record['task']!r} (known: {', '.join(TASK_LEVEL)})")
    if record["format_type"] == "fill" and not answer_values(record["task"], record["answer"]):
        wanted = "named component (move_right:0.5,...)" if record["task"] == "view_change_infer" else "number"
        raise ValueError(f"{where}: field 'answer': no {wanted} in {record['answer']!r:.60}")
    if record["format_type"] == "select" and not re.fullmatch("[A-H]", record["answer"]):
        raise ValueError(f"{where}: field 'answer': expected an option letter, got {record['answer']!r:.60}")


def logged(row, where):
    """A line of lmms-eval's --log_samples -> (answer, its question's row or None). The answer is filtered_resps
    (a string, or nested in lists, by version), else resps; the question is the logged doc, or the metric value
    that holds it (sparbench_score, vsibench_score; the only place v0.4 and later keep it)."""
    answer = row.get("filtered_resps", row.get("resps"))
    while isinstance(answer, list) and answer:
        answer = answer[0]
    if not isinstance(answer, str):
        raise ValueError(f"{where}: field 'filtered_resps': no answer text in {answer!r:.60}")
    docs = [row.get("doc")] + [value for key, value in row.items() if key.endswith("_score")]
    return answer, next((d for d in docs if row_layout(d) in ("SPAR-Bench", "VSI-Bench")), None)


def questions_of_log(path):
    """The questions an lmms-eval --log_samples file carries in its docs (so it can be scored without --data)."""
    records = []
    for where, row in read_rows(path):
        doc = logged(row, where)[1] if row_layout(row) == "lmms-eval" else None
        if doc is None:
            raise ValueError(f"{where}: no SPAR-Bench or VSI-Bench question logged in this line: give the "
                             f"questions with --data")
        record = READERS[row_layout(doc)](doc, where)
        record.pop("image_files", None)  # logged pictures are descriptions, not files
        check_question(record, where)
        records.append(record)
    return records


def read_predictions(path, questions):
    """id -> prediction, and how many lines name no question here (other tasks, or a larger set: left out).
    questions: every question of --data in its order (lmms-eval's doc_id is a position in it). A malformed
    line, or a logged question that is not --data's, is a one-line ValueError naming the file, line and field."""
    by_id, predictions, first, skipped = {q["id"]: q for q in questions}, {}, {}, 0
    for where, row in read_rows(path):
        if row_layout(row) == "lmms-eval":
            pid, prediction = logged_prediction(row, where, questions, by_id)
        else:
            pid, prediction = our_prediction(row, where)
        if pid in first:
            raise ValueError(f"{where}: field 'id': duplicate id {pid!r} (first at {first[pid]})")
        first[pid] = where
        if pid in by_id:
            predictions[pid] = prediction
        else:
            skipped += 1
    return predictions, skipped


def our_prediction(row, where):
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with fields 'id' and 'prediction'")
    if not isinstance(row.get("prediction"), str):
        raise ValueError(f"{where}: field 'prediction': must be a string, got {row.get('prediction')!r:.60}")
    return as_id(row.get("id"), where), row["prediction"]


def logged_prediction(row, where, questions, by_id):
    """(id, answer) of an lmms-eval line; its logged question (or, without one, the doc_id-th of --data) must
    agree with --data's on the task and the answer, else the two are different releases or orders."""
    answer, doc = logged(row, where)
    if doc is not None:
        logged_question = READERS[row_layout(doc)](doc, where)
        pid, task, truth = logged_question["id"], logged_question["task"], logged_question["answer"]
    else:
        index = row.get("doc_id")
        if not (data.is_int(index) and 0 <= index < len(questions)):
            raise ValueError(f"{where}: field 'doc_id': {index!r} is not a position among the {len(questions)} "
                             f"questions")
        pid, task, truth = questions[index]["id"], None, row.get("target")
    question = by_id.get(pid)
    if question is not None and (task not in (None, question["task"])
                                 or truth is not None and str(truth).strip() != question["answer"]):
        raise ValueError(f"{where}: field 'target': the logged question {pid!r} ({task or 'doc_id'}, answer {truth!r}) "
                         f"is not --data's ({question['task']}, answer {question['answer']!r}): another release?")
    return pid, answer


# -----------------------------------------------------------------------------
# Tables: systems side by side, and paired comparisons (is system A better than B on the same questions?)

def compare(results):
    """Markdown: systems side by side per task, level, benchmark and overall, with the chance baselines of the
    first (all were scored on the same questions). results: {name: evaluate() result or its JSON}."""
    first = next(iter(results.values()))
    summaries = [r["model"] for r in results.values()] + [first["chance_uniform"], first["chance_frequency"]]
    counts = first["counts"]

    def row(head, part, key=None):  # head: the first three cells; then each summary's [part][key] (or [part])
        values = [None if s is None else s[part] if key is None else s[part].get(key) for s in summaries]
        return f"{head} " + " | ".join("–" if v is None else f"{v:.2f}" for v in values) + " |"
    lines = ["| task | level | n | " + " | ".join(results) + " | chance (uniform) | chance (frequency) |",
             "|:--|:--|--:|" + "--:|" * len(summaries)]
    for benchmark, level_tasks in BENCHMARKS.items():
        if benchmark in first["model"]["benchmarks"]:
            for level, tasks in level_tasks.items():
                lines += [row(f"| {t} | {level} | {counts[t]} |", "tasks", t) for t in tasks if t in counts]
            levels = [level for level in level_tasks if level in first["model"]["levels"]]
            lines += [row(f"| **{level}** | | |", "levels", level) for level in levels]
            n = sum(counts.get(task, 0) for tasks in level_tasks.values() for task in tasks)
            lines.append(row(f"| **{benchmark}** | | {n} |", "benchmarks", benchmark))
    return "\n".join(lines + [row(f"| **overall** | | {first['n_questions']} |", "overall")])


def stratified_mean(values, strata):
    """Mean over strata of each stratum's mean (a benchmark's overall is the mean over its tasks)."""
    groups = defaultdict(list)
    for value, stratum in zip(values, strata):
        groups[stratum].append(value)
    return mean(map(mean, groups.values()))


def paired_bootstrap(differences, strata=None, samples=2000, seed=0):
    """Mean of per-item differences and its 95 % percentile bootstrap interval: (mean, low, high).
    With strata (one label per item) items are resampled within each stratum and the mean is over strata."""
    d = np.asarray(differences, dtype=np.float64)
    labels = np.zeros(len(d), dtype=int) if strata is None else np.unique(strata, return_inverse=True)[1]
    rng, means = np.random.default_rng(seed), np.zeros(samples)
    for k in range(labels.max() + 1):
        group = d[labels == k]
        means += group[rng.integers(0, len(group), (samples, len(group)))].mean(1)
    low, high = np.percentile(means / (labels.max() + 1), [2.5, 97.5])
    return float(stratified_mean(d.tolist(), labels.tolist())), float(low), float(high)


def chance_gate(result):
    """An eval JSON's gate row, as train.py writes them: the score vs chance (frequency) where it answers, in points."""
    ids = [q for q, f in (result.get("chance_frequency_scores") or {}).items() if f is not None]
    if not ids:
        return None
    strata = [result["tasks_of"][q] for q in ids]
    diff, lo, hi = paired_bootstrap([100 * (result["scores"][q] - result["chance_frequency_scores"][q]) for q in ids],
                                    strata)
    model = stratified_mean([100 * result["scores"][q] for q in ids], strata)
    return {"gate": "held-out score (points)", "model": model, "baseline": model - diff,
            "baseline_name": "chance (frequency)", "diff": diff, "lo": lo, "hi": hi, "n": len(ids), "pass": lo > 0}


def gates_table(sources):
    """Markdown: each run's gates with PASS / FAIL, from [(run name, train.py's metrics.jsonl or an eval JSON)]."""
    lines = ["| run | gate | model | baseline | difference [95 % CI] | |", "|:--|:--|--:|:--|:--|:--|"]
    for name, path in sources:
        if path.endswith(".jsonl"):
            logged = [row for _, row in data.read_jsonl(path) if row.get("split") == "gates"]
            rows = logged[-1]["gates"] if logged else [None]
        else:
            rows = [chance_gate(read_result(path))]
        for row in rows:
            if row is None:
                lines.append(f"| {name} | no gate measured | | | | FAIL |")
            else:
                lines.append(f"| {name} | {row['gate']} | {row['model']:.4f} | {row['baseline_name']} "
                             f"{row['baseline']:.4f} | {row['diff']:+.4f} [{row['lo']:+.4f}, {row['hi']:+.4f}] | "
                             f"{'PASS' if row['pass'] else 'FAIL'} |")
    return "\n".join(lines)


def _versus(ours, reference, ids, tasks):
    """Mean per-question difference in points (stratified by task), its 95 % interval and a verdict."""
    d, lo, hi = paired_bootstrap([100 * (ours[q] - reference[q]) for q in ids], [tasks[q] for q in ids])
    return f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] " + ("better" if lo > 0 else "worse" if hi < 0 else "no difference")


def ablation(arms):
    """Markdown: the headline ablation. arms {name: [evaluate() results or their JSON, one per seed]}, all on the
    same questions; the first arm is the reference. Per arm: overall per seed and their mean; then, with each
    question's score averaged over the seeds, the difference to the reference, overall and on THREE_D_TASKS."""
    reference = next(iter(arms))
    tasks = arms[reference][0]["tasks_of"]
    three_d = [q for q in tasks if tasks[q] in THREE_D_TASKS]
    score = {name: {q: mean(r["scores"][q] for r in results) for q in tasks} for name, results in arms.items()}
    lines = [f"| arm | seeds | overall per seed | overall | vs {reference}: overall [95 % CI] | 3D tasks | "
             f"vs {reference}: 3D tasks [95 % CI] |", "|:--|--:|:--|--:|:--|--:|:--|"]
    verdicts = [""]
    for name, results in arms.items():
        overall = [r["model"]["overall"] for r in results]
        vs_all = vs_3d = "–"
        if name != reference:
            vs_all = _versus(score[name], score[reference], list(tasks), tasks)
            vs_3d = _versus(score[name], score[reference], three_d, tasks)
            verdicts.append(f"- {name} vs {reference}: overall {vs_all}; on the 3D tasks {vs_3d}.")
        mean_3d = stratified_mean([100 * score[name][q] for q in three_d], [tasks[q] for q in three_d])
        cells = [name, str(len(overall)), ", ".join(f"{o:.2f}" for o in overall), f"{mean(overall):.2f}", vs_all,
                 f"{mean_3d:.2f}", vs_3d]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + verdicts)


# -----------------------------------------------------------------------------
# Command line: python eval.py --key=value ... (parsed by generate_spar.parse_args)

@dataclass
class EvalConfig:
    data: str = ""              # the questions: a folder of generate_spar.py, or a benchmark file (README lists them)
    split: str = "val"          # a folder's questions: qa_{split}.jsonl, val | train
    image_root: str = ""        # relative image file names in a benchmark file start here (default: its folder)
    tasks: str = ""             # score these tasks only (comma-separated; empty: all; object_rel_direction_hard ...)
    predictions: str = ""       # score this file of {"id", "prediction"} lines ...
    ckpt: str = ""              # ... or run the Spa3-VLM checkpoint in this directory
    batch_size: int = 16        # questions per model.answer call
    res: int = 0                # model mode: frames resized to res x res (0: the model's own image size)
    out: str = ""               # model mode: where predictions.jsonl goes (default: beside json_out, else in ckpt)
    json_out: str = ""          # write every number here as JSON
    compare: str = ""           # instead: NAME=scores.json,NAME=scores.json (json_out files) -> one side-by-side table
    ablation: str = ""          # instead: NAME=seed0.json+seed1.json+...,NAME=... -> paired intervals vs the first
    gates: str = ""             # instead: NAME=metrics.jsonl or eval.json,... -> the gates table with PASS / FAIL


def read_result(path):
    """An eval JSON (--json_out), with every field the tables read."""
    result = data.read_json(path)
    for field in ("model", "scores", "tasks_of", "counts", "n_questions", "chance_uniform", "chance_frequency"):
        if not isinstance(result, dict) or field not in result:
            raise ValueError(f"{path}: field '{field}' is missing (an eval.py --json_out file of this version has it)")
    return result


def named_paths(option):
    """NAME=path,NAME=path -> [(NAME, path)]; a path without a name is named by itself."""
    return [(name or path, path) for name, _, path in (item.rpartition("=") for item in option.split(","))]


def run(cfg, model=None, load_frames=None):
    """Everything `python eval.py` does; model and load_frames stand in for the checkpoint and scene files."""
    if cfg.gates:  # this and the next two: a table of earlier runs' files
        print(gates_table(named_paths(cfg.gates)))
    elif cfg.ablation:
        print(ablation({name: [read_result(p) for p in paths.split("+")] for name, paths in named_paths(cfg.ablation)}))
    elif cfg.compare:
        print(compare({name: read_result(path) for name, path in named_paths(cfg.compare)}))
    if cfg.gates or cfg.ablation or cfg.compare:
        return None
    if bool(cfg.predictions) == bool(cfg.ckpt):
        raise ValueError("give exactly one of --predictions=FILE (score a file) or --ckpt=DIR (run a model)")
    announce("eval.py", f"score {cfg.predictions}" if cfg.predictions else f"run {cfg.ckpt} on {cfg.data}",
             cfg.json_out or "stdout")
    if cfg.batch_size < 1 or cfg.res < 0 or cfg.split not in ("val", "train"):
        raise ValueError(f"need --batch_size >= 1, --res >= 0 and --split val or train, got {cfg.batch_size}, "
                         f"{cfg.res} and {cfg.split!r}")
    if cfg.data:
        questions = load_questions(cfg.data, cfg.split, cfg.image_root)
    elif cfg.predictions:
        questions = questions_of_log(cfg.predictions)
    else:
        raise ValueError("--data: give the questions (a generated folder or a benchmark file)")
    records = questions
    if not records:  # else the report would be `overall: 0.00`, as if every answer were wrong
        folder = os.path.isdir(cfg.data)
        source = os.path.join(cfg.data, f"qa_{cfg.split}.jsonl") if folder else cfg.data or cfg.predictions
        raise ValueError(f"{source}: no questions to score")
    if cfg.tasks:  # a task, or one of VSI-Bench's relative-direction difficulties (object_rel_direction_hard)
        wanted = cfg.tasks.split(",")
        difficulty = re.compile("object_rel_direction_(easy|medium|hard)")
        unknown = [t for t in wanted if t not in TASK_LEVEL and not difficulty.fullmatch(t)]
        if unknown:  # a misspelt task would be left out silently
            raise ValueError(f"--tasks: unknown task {unknown[0]!r} (known: {', '.join(TASK_LEVEL)})")
        records = [r for r in records if r["task"] in wanted or f"{r['task']}_{r.get('difficulty')}" in wanted]
        if not records:
            raise ValueError(f"{cfg.data}: no {cfg.split} questions of the tasks {cfg.tasks}")
    if cfg.predictions:
        predictions, skipped = read_predictions(cfg.predictions, questions)
        if skipped:
            print(f"note: {skipped} predictions name no question of {cfg.data or cfg.predictions}; left out")
    else:
        predictions = model_predictions(cfg, records, model, load_frames)
    train_path = os.path.join(cfg.data, "qa_train.jsonl")  # a generated set's; a benchmark file has none
    train = load_questions(cfg.data, "train") if os.path.isdir(cfg.data) and os.path.exists(train_path) else None
    result = evaluate(records, predictions, train)
    if train is None:
        print(f"note: no {train_path if os.path.isdir(cfg.data) else 'training questions'}: the chance baselines "
              f"are left out")
    if result["n_missing"]:
        print(f"note: {result['n_missing']} of {len(records)} questions have no prediction; they score 0")
    if result["unreadable"]:
        print(f"note: {len(result['unreadable'])} of {len(records)} predictions hold a number too long to read "
              f"(first: {result['unreadable'][0]!r}); they score 0")
    print(compare({"score": result}) + f"\n\noverall: {result['model']['overall']:.2f}")
    if cfg.json_out:
        write_atomic(cfg.json_out, (json.dumps({"config": asdict(cfg), **result}, indent=1) + "\n").encode())
    return result


if __name__ == "__main__":
    try:
        run(parse_args(sys.argv[1:], EvalConfig()))
    except ValueError as e:
        raise SystemExit(f"eval.py: {e}")
    except OSError as e:  # a path that is a directory, missing or unreadable: one line naming it, not a traceback
        raise SystemExit(f"eval.py: {e.filename}: {e.strerror}" if e.filename else f"eval.py: {e}")
