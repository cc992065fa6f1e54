"""eval.py: score answers to SPAR-Bench and VSI-Bench style questions, from our Spa3-VLM or any other system.

    python eval.py --ckpt=out/vlm --data=data/spar --split=val      # run the model, write predictions.jsonl, score it
    python eval.py --predictions=preds.jsonl --data=data/spar       # score a file of {"id", "prediction"} lines
    python eval.py --ablation=baseline=a.json+b.json,Spa3-VLM=c.json+d.json   # seeds per arm, paired intervals
    python eval.py --gates=geo=out/geo/metrics.jsonl,...            # the stages' gates with PASS / FAIL

The questions are DATA/qa_{split}.jsonl as generate_spar.py writes them (read with data.load_qa_jsonl); a VSI-Bench
record is turned into one by from_vsibench. The chance baselines come from DATA/qa_train.jsonl and are scored on
the same questions. stdout gets one markdown table per benchmark and, last, `overall: <score>`; --json_out=FILE
keeps every number. All scores are in percent (0-100).

What a score means (design.md section 7; README says where and why the official evaluators differ):
- fill answers score MRA: the mean over θ in {0.50, 0.55, ..., 0.95} of [|ŷ - y| / |y| < 1 - θ], with ŷ the first
  number in the prediction and y the ground truth (never the prediction) in the denominator. It is computed in
  exact rational arithmetic, so an error of exactly 5 % fails θ = 0.95 whatever float rounding would say.
  A prediction without a number scores 0, as does one with a number of over 4300 digits (Python will not
  convert it; the report counts them). A ground truth of 0 has no relative error: only ŷ = 0 scores (1).
  An answer of several numbers (view_change_infer: "right, forward, yaw") scores the mean MRA over its values,
  matched in order with the prediction's first numbers; values the prediction lacks score 0.
- select answers score accuracy of the letter extract_letter finds; an empty answer scores 0.
- a task's score is the mean over its questions; where records carry a "difficulty" (VSI-Bench's
  object_rel_direction: easy / medium / hard) it is the mean over difficulties, as VSI-Bench reports it.
- a level's score is the mean of its tasks' scores; a benchmark's overall is the mean over its tasks present;
  the final `overall:` line is the mean over all tasks present, both benchmarks together.
- a question without a prediction scores 0, and the report says how many there were.
"""
import json
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields
from fractions import Fraction

from generate_spar import SPAR_TASKS, TASKS, VSI_TASKS, write_atomic

# -----------------------------------------------------------------------------
# The tasks, grouped as each benchmark groups them (generate_spar.TASKS holds each task's level)

def _levels(tasks):
    """{level: [task, ...]} in the order generate_spar.TASKS lists them (the one table of task levels)."""
    levels = {}
    for task in tasks:
        levels.setdefault(TASKS[task][0], []).append(task)
    return levels


BENCHMARKS = {"SPAR-Bench": _levels(SPAR_TASKS), "VSI-Bench": _levels(VSI_TASKS)}
TASK_LEVEL = {task: level for groups in BENCHMARKS.values() for level, tasks in groups.items() for task in tasks}

# -----------------------------------------------------------------------------
# Reading an answer: numbers and option letters

# Signed decimals, with an optional exponent of at most two digits ("1e2"; "1e999" reads as 1, not a huge number).
# Commas separate numbers ("0.52, 1.20, -30"), so "1,200" reads as 1 and 200: answers carry no thousands separators.
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d{1,2}(?!\d))?")


def parse_numbers(text):
    """All numbers in text, in order, as exact fractions: "about 2.5 m" -> [5/2]."""
    return [Fraction(m) for m in NUMBER.findall(text)]


def prediction_numbers(prediction):
    """parse_numbers of a prediction, or None if it holds a number of more digits than Python turns into an int
    (sys.get_int_max_str_digits(), 4300): that answer scores 0 and the report counts it, not a stopped run."""
    try:
        return parse_numbers(prediction)
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
    """The option letter a free-text answer picks, or None. Tried in order, the first rule that applies wins:
    1. the answer is one option's text, with or without its letter ("left", "B. left", any case) -> that letter;
    2. the whole answer is a letter, maybe bracketed or with a full stop ("b", "(B)", "C.");
    3. the answer starts with a letter and a bracket, full stop or colon, then a space ("B) left", "a. 2.3 m");
    4. a letter right after "answer", "option" or "choice" (with "is" or ":" between): a capital always counts
       ("The answer is B because ..."); a lowercase letter only when bracketed or followed by punctuation or the
       end ("answer: b"), so that "the answer is a chair" picks nothing.
    Letters in running prose ("a chair", "I think B") are never taken. A letter beyond the options is returned
    as it is and so scores as wrong; markdown emphasis (*) is ignored."""
    text = prediction.replace("*", "").strip()
    if not text:
        return None
    said = _normalise(text)
    matches = [i for i, option in enumerate(options)
               if said in (_normalise(option), _normalise(OPTION_PREFIX.sub("", option, count=1)))]
    if len(matches) == 1:
        return chr(ord("A") + matches[0])
    m = LONE_LETTER.fullmatch(text) or LEADING_LETTER.match(text)
    if m:
        return m.group(1).upper()
    for m in CUED_LETTER.finditer(text):
        open_bracket, letter, close_bracket = m.groups()
        rest = text[m.end():]
        if letter.isupper() or (open_bracket and close_bracket) or not rest or rest[0] in ".,;:!?":
            return letter.upper()
    return None


# -----------------------------------------------------------------------------
# Scoring one answer

THETAS_PERCENT = range(50, 100, 5)  # θ = 0.50, 0.55, ..., 0.95 as whole percents, so the thresholds are exact


def mra(pred, truth):
    """Mean relative accuracy of one number against the ground truth, in [0, 1]."""
    if truth == 0:
        return float(pred == 0)
    error = abs(Fraction(pred) - Fraction(truth)) / abs(Fraction(truth))
    return sum(error < Fraction(100 - t, 100) for t in THETAS_PERCENT) / len(THETAS_PERCENT)


def score_numbers(preds, truths):
    """Mean MRA over the ground-truth values; zip stops at the shorter list, so missing values add 0."""
    return sum(mra(p, y) for p, y in zip(preds, truths)) / len(truths)


def truth_numbers(record):
    truths = parse_numbers(record["answer"])
    if not truths:
        raise ValueError(f"question {record['id']!r}: field 'answer': no number in {record['answer']!r}")
    return truths


def score_record(record, prediction):
    """Score in [0, 1] of one prediction (None: no prediction) for one question record."""
    if prediction is None:
        return 0.0
    if record["format_type"] == "select":
        return float(extract_letter(prediction, record["options"]) == record["answer"].strip().upper())
    numbers = prediction_numbers(prediction)
    return 0.0 if numbers is None else score_numbers(numbers, truth_numbers(record))


# -----------------------------------------------------------------------------
# From per-question scores to tasks, levels and benchmarks

def _mean(values):
    values = list(values)
    return sum(values) / len(values)


def summarize(records, scores):
    """Percent scores per task, level, benchmark and overall. A score of None (a baseline that cannot be
    computed for that question) leaves the question out; a task with no scored question is left out."""
    groups = defaultdict(lambda: defaultdict(list))  # task -> difficulty ("" if none) -> scores
    for record, score in zip(records, scores):
        if score is not None:
            groups[record["task"]][record.get("difficulty", "")].append(score)
    tasks = {task: 100 * _mean(_mean(s) for s in by_difficulty.values()) for task, by_difficulty in groups.items()}
    levels, benchmarks = {}, {}
    for benchmark, level_tasks in BENCHMARKS.items():
        for level, names in level_tasks.items():
            present = [tasks[t] for t in names if t in tasks]
            if present:
                levels[level] = _mean(present)
        present = [tasks[t] for names in level_tasks.values() for t in names if t in tasks]
        if present:
            benchmarks[benchmark] = _mean(present)
    overall = _mean(tasks.values()) if tasks else 0.0
    return {"tasks": tasks, "levels": levels, "benchmarks": benchmarks, "overall": overall}


# -----------------------------------------------------------------------------
# Chance baselines, as VSI-Bench reports them, learned from the training questions

def _answers_by_kind(train):
    """(task, format_type) -> the training answers: letters for select, lists of numbers for fill.
    The format is part of the key because numeric SPAR tasks come as both fill and select."""
    answers = defaultdict(list)
    for record in train:
        kind = (record["task"], record["format_type"])
        answers[kind].append(record["answer"].strip().upper() if kind[1] == "select" else truth_numbers(record))
    return answers


def _most_frequent(values):
    """Most frequent value; ties go to the smallest value (letter A before B; the smaller number)."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def chance_uniform(train, records):
    """Per-question expected score of guessing: 1/len(options) for select; for fill, the MRA of answering the
    training mean of that task (per value for view_change_infer). None where the training set has no such task."""
    answers = _answers_by_kind(train)
    means = {kind: [_mean(axis) for axis in zip(*values)] for kind, values in answers.items() if kind[1] == "fill"}
    scores = []
    for record in records:
        kind = (record["task"], record["format_type"])
        if kind[1] == "select":
            scores.append(1 / len(record["options"]))
        else:
            scores.append(score_numbers(means[kind], truth_numbers(record)) if kind in means else None)
    return scores


def chance_frequency(train, records):
    """Per-question score of always answering the most frequent training answer of that task: the letter for
    select, the value for fill (per value for view_change_infer). None where the training set has no such task."""
    guesses = {}
    for kind, values in _answers_by_kind(train).items():
        guesses[kind] = _most_frequent(values) if kind[1] == "select" else [_most_frequent(a) for a in zip(*values)]
    scores = []
    for record in records:
        kind = (record["task"], record["format_type"])
        if kind not in guesses:
            scores.append(None)
        elif kind[1] == "select":
            scores.append(float(guesses[kind] == record["answer"].strip().upper()))
        else:
            scores.append(score_numbers(guesses[kind], truth_numbers(record)))
    return scores


# -----------------------------------------------------------------------------
# Predictions files: {"id": str, "prediction": str} per line; other fields are ignored

def read_predictions(path, records):
    """id -> prediction. Any malformed line is a one-line ValueError naming the file, the line and the field."""
    from data import read_jsonl

    known = {record["id"] for record in records}
    predictions, first_line = {}, {}
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with fields 'id' and 'prediction'")
        pid = row.get("id")
        if pid is None:
            raise ValueError(f"{where}: field 'id': missing")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise ValueError(f"{where}: field 'id': must be a string, got {type(pid).__name__}")
        pid = str(pid)  # VSI-Bench ids are integers; from_vsibench turns them into strings the same way
        if pid in first_line:
            raise ValueError(f"{where}: field 'id': duplicate id {pid!r} (first on line {first_line[pid]})")
        if pid not in known:
            raise ValueError(f"{where}: field 'id': id {pid!r} is not among the questions")
        if not isinstance(row.get("prediction"), str):
            got = type(row["prediction"]).__name__ if "prediction" in row else "nothing"
            raise ValueError(f"{where}: field 'prediction': must be a string, got {got}")
        first_line[pid], predictions[pid] = lineno, row["prediction"]
    return predictions


def write_predictions(path, records, predictions):
    rows = [{"id": r["id"], "task": r["task"], "prediction": p} for r, p in zip(records, predictions)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


# -----------------------------------------------------------------------------
# Running a model

def load_model(ckpt_dir):
    """The trained Spa3-VLM, ready to answer (vlm.py decodes greedily with its KV cache)."""
    import vlm
    return vlm.load_for_eval(ckpt_dir)


def scene_frames(data_dir, res=None):
    """load_frames for predict: a record's frames from the scene files with its markers drawn, as training shows
    them (data.QADataset), float32 (N, 3, H, W) in [0, 1]; res=None keeps the scene files' resolution."""
    import data
    store = data.SceneStore(data_dir)
    return lambda record: store.frames(record["scene"], record["image"], res, markers=record.get("markers"))


def scene_oracle(data_dir):
    """load_oracle for predict: the oracle arm's true 3D tokens of a record (data.oracle_tokens)."""
    import data
    return data.SceneStore(data_dir).oracle


def predict(model, records, load_frames, batch_size=16, load_oracle=None):
    """One answer string per record, asking model.answer(records, images) a batch at a time, in record order.
    images[i] is load_frames(records[i]), float32 (N_i, 3, H, W) in [0, 1]; N_i differs between records.
    load_oracle: the oracle arm's tokens of a record, passed as model.answer(..., oracle=[...])."""
    import torch
    from tqdm import tqdm
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


# -----------------------------------------------------------------------------
# VSI-Bench records

def from_vsibench(row):
    """One VSI-Bench record ({"id", "scene_name", "question_type", "question", "options", "ground_truth"})
    as one of our question records. object_rel_direction_{easy,medium,hard} become task object_rel_direction
    with "difficulty" kept, so the task scores as VSI-Bench averages it. "image" is empty: VSI-Bench's frames
    come from its videos, which this repo does not read; the record is for scoring predictions. To score a
    system on VSI-Bench, write qa_val.jsonl as one json.dumps(from_vsibench(row)) per line and run
    --predictions=FILE --data=DIR on it."""
    qtype = row.get("question_type")
    task, difficulty = str(qtype), ""
    m = re.fullmatch(r"(object_rel_direction)_(easy|medium|hard)", str(qtype))
    if m:
        task, difficulty = m.groups()
    if TASK_LEVEL.get(task) not in BENCHMARKS["VSI-Bench"]:
        raise ValueError(f"VSI-Bench record {row.get('id')!r}: field 'question_type': unknown {qtype!r}")
    options = row.get("options") or []
    record = {"id": str(row["id"]), "scene": str(row["scene_name"]), "task": task, "level": TASK_LEVEL[task],
              "format_type": "select" if options else "fill", "img_type": "video", "image": [],
              "question": row["question"], "answer": str(row["ground_truth"])}
    if options:
        record["options"] = list(options)
    if difficulty:
        record["difficulty"] = difficulty
    return record


# -----------------------------------------------------------------------------
# Scoring a split and reporting it

# -----------------------------------------------------------------------------
# Paired comparisons: is system A better than system B on the same questions?

def stratified_mean(values, strata):
    """Mean over strata of each stratum's mean (a benchmark's overall is the mean over its tasks)."""
    groups = defaultdict(list)
    for value, stratum in zip(values, strata):
        groups[stratum].append(value)
    return _mean(_mean(g) for g in groups.values())


def paired_bootstrap(differences, strata=None, samples=2000, seed=0):
    """Mean of per-item differences and its 95 % percentile bootstrap interval: (mean, low, high).
    Items are resampled with replacement; with strata (one label per item) they are resampled within each
    stratum and the mean is the mean over strata, as a benchmark's overall is the mean over its tasks."""
    import numpy as np
    d = np.asarray(differences, dtype=np.float64)
    labels = np.zeros(len(d), dtype=int) if strata is None else np.unique(strata, return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    means = np.zeros(samples)
    for k in range(labels.max() + 1):
        group = d[labels == k]
        means += group[rng.integers(0, len(group), (samples, len(group)))].mean(1)
    means /= labels.max() + 1
    low, high = np.percentile(means, [2.5, 97.5])
    return float(stratified_mean(d.tolist(), labels.tolist())), float(low), float(high)


def evaluate(records, predictions, train=None):
    """Every number of the report: the model's summary, the baselines' (None without training questions),
    question counts per task and how many questions had no prediction."""
    scores = [score_record(r, predictions.get(r["id"])) for r in records]
    frequency = chance_frequency(train, records) if train else None
    return {
        "n_questions": len(records),
        "n_missing": sum(r["id"] not in predictions for r in records),
        "unreadable": [r["id"] for r in records if r["format_type"] == "fill" and r["id"] in predictions
                       and prediction_numbers(predictions[r["id"]]) is None],
        "counts": dict(Counter(r["task"] for r in records)),
        "model": summarize(records, scores),
        "scores": {r["id"]: score for r, score in zip(records, scores)},
        "tasks_of": {r["id"]: r["task"] for r in records},
        "chance_uniform": summarize(records, chance_uniform(train, records)) if train else None,
        "chance_frequency": summarize(records, frequency) if train else None,
        "chance_frequency_scores": {r["id"]: f for r, f in zip(records, frequency)} if train else None,
    }


def _cell(summary, part, key):
    value = summary[part].get(key) if summary else None
    return "–" if value is None else f"{value:.2f}"


def report(result):
    """Markdown: one table per benchmark with questions, the baselines beside each task; last line overall."""
    columns = [("model", "score"), ("chance_uniform", "chance (uniform)"), ("chance_frequency", "chance (frequency)")]
    lines = []
    for benchmark, level_tasks in BENCHMARKS.items():
        if benchmark not in result["model"]["benchmarks"]:
            continue
        lines += [f"## {benchmark}", "", "| task | level | n | " + " | ".join(name for _, name in columns) + " |",
                  "|:--|:--|--:|" + "--:|" * len(columns)]
        for level, tasks in level_tasks.items():
            for task in tasks:
                if task in result["counts"]:
                    cells = [_cell(result[key], "tasks", task) for key, _ in columns]
                    lines.append(f"| {task} | {level} | {result['counts'][task]} | " + " | ".join(cells) + " |")
        for level in level_tasks:
            if level in result["model"]["levels"]:
                cells = [_cell(result[key], "levels", level) for key, _ in columns]
                lines.append(f"| **{level}** | | | " + " | ".join(cells) + " |")
        total = sum(result["counts"].get(t, 0) for tasks in level_tasks.values() for t in tasks)
        cells = [_cell(result[key], "benchmarks", benchmark) for key, _ in columns]
        lines += [f"| **{benchmark} overall** | | {total} | " + " | ".join(cells) + " |", ""]
    lines.append(f"overall: {result['model']['overall']:.2f}")
    return "\n".join(lines)


def compare(results):
    """Markdown: several systems side by side per task, level and benchmark, with the chance baselines of the
    first (all were scored on the same questions). results: {name: what evaluate() returned, or its JSON}."""
    names, first = list(results), next(iter(results.values()))
    columns = [(name, results[name]["model"]) for name in names]
    columns += [("chance (uniform)", first["chance_uniform"]), ("chance (frequency)", first["chance_frequency"])]
    lines = ["| task | level | n | " + " | ".join(name for name, _ in columns) + " |",
             "|:--|:--|--:|" + "--:|" * len(columns)]
    for benchmark, level_tasks in BENCHMARKS.items():
        if benchmark not in first["model"]["benchmarks"]:
            continue
        for level, tasks in level_tasks.items():
            for task in (t for t in tasks if t in first["counts"]):
                cells = [_cell(summary, "tasks", task) for _, summary in columns]
                lines.append(f"| {task} | {level} | {first['counts'][task]} | " + " | ".join(cells) + " |")
        for level in (level for level in level_tasks if level in first["model"]["levels"]):
            lines.append(f"| **{level}** | | | " + " | ".join(_cell(s, "levels", level) for _, s in columns) + " |")
        cells = [_cell(summary, "benchmarks", benchmark) for _, summary in columns]
        lines.append(f"| **{benchmark}** | | | " + " | ".join(cells) + " |")
    cells = [("–" if summary is None else f"{summary['overall']:.2f}") for _, summary in columns]
    lines.append(f"| **overall** | | {first['n_questions']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The tasks that need 3D: metric depth and distance across views, how the camera moved, the room's size
THREE_D_TASKS = ["depth_prediction_oc_mv", "depth_prediction_oo_mv", "distance_prediction_oc_mv",
                 "distance_prediction_oo_mv", "distance_infer_center_oo_mv", "camera_motion_infer", "view_change_infer",
                 "room_size_estimation"]


def chance_gate(result):
    """A gate row (as train.py writes them) of an evaluate() result: the model's per-question score vs always
    answering the task's most frequent training answer, on the questions that baseline covers, in points."""
    ids = [q for q, f in (result.get("chance_frequency_scores") or {}).items() if f is not None]
    if not ids:
        return None
    strata = [result["tasks_of"][q] for q in ids]
    diff, lo, hi = paired_bootstrap([100 * (result["scores"][q] - result["chance_frequency_scores"][q]) for q in ids], strata)
    model = stratified_mean([100 * result["scores"][q] for q in ids], strata)
    return {"gate": "held-out score (points)", "model": model, "baseline": model - diff,
            "baseline_name": "chance (frequency)", "diff": diff, "lo": lo, "hi": hi, "n": len(ids), "pass": lo > 0}


def gates_table(sources):
    """Markdown: the gates of each run with PASS / FAIL. sources [(run name, path)]: a metrics.jsonl written by
    train.py (its last "gates" record) or an eval JSON (the score vs chance (frequency) gate)."""
    from data import read_jsonl
    lines = ["| run | gate | model | baseline | difference [95 % CI] | |", "|:--|:--|--:|:--|:--|:--|"]
    for name, path in sources:
        if path.endswith(".jsonl"):
            logged = [row for _, row in read_jsonl(path) if row.get("split") == "gates"]
            rows = logged[-1]["gates"] if logged else [None]
        else:
            rows = [chance_gate(read_result(path))]
        for row in rows:
            if row is None:
                lines.append(f"| {name} | no gate measured | | | | FAIL |")
                continue
            lines.append(f"| {name} | {row['gate']} | {row['model']:.4f} | {row['baseline_name']} "
                         f"{row['baseline']:.4f} | {row['diff']:+.4f} [{row['lo']:+.4f}, {row['hi']:+.4f}] | "
                         f"{'PASS' if row['pass'] else 'FAIL'} |")
    return "\n".join(lines)


def ablation(arms):
    """Markdown: the headline ablation. arms {name: [evaluate() results or their JSON, one per seed]}, all on the
    same questions; the first arm is the reference. Per arm: overall per seed and their mean; then, with each
    question's score averaged over the seeds, the mean difference to the reference and its paired bootstrap
    95 % interval (questions resampled within tasks), overall and on THREE_D_TASKS, in points."""
    names = list(arms)
    reference = names[0]
    per_question = {name: {} for name in names}
    for name, results in arms.items():
        for qid in results[0]["scores"]:
            per_question[name][qid] = sum(r["scores"][qid] for r in results) / len(results)
    ids = list(per_question[reference])
    tasks = {qid: task for qid, task in arms[reference][0]["tasks_of"].items()}
    lines = [f"| arm | seeds | overall per seed | overall | vs {reference}: overall [95 % CI] | 3D tasks | "
             f"vs {reference}: 3D tasks [95 % CI] |", "|:--|--:|:--|--:|:--|--:|:--|"]
    for name in names:
        overall = [r["model"]["overall"] for r in arms[name]]
        cells = [name, str(len(overall)), ", ".join(f"{o:.2f}" for o in overall), f"{sum(overall) / len(overall):.2f}"]
        for subset in (ids, [q for q in ids if tasks[q] in THREE_D_TASKS]):
            strata = [tasks[q] for q in subset]
            mean = stratified_mean([100 * per_question[name][q] for q in subset], strata)
            if name == reference:
                cells += ["–"] if subset is ids else [f"{mean:.2f}", "–"]
                continue
            diff = [100 * (per_question[name][q] - per_question[reference][q]) for q in subset]
            d, lo, hi = paired_bootstrap(diff, strata)
            verdict = "better" if lo > 0 else "worse" if hi < 0 else "no difference"
            cells += [f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] {verdict}"] if subset is ids else \
                     [f"{mean:.2f}", f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] {verdict}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for row, name in zip(lines[3:], names[1:]):
        overall, three_d = row.strip("| ").split(" | ")[4], row.strip("| ").split(" | ")[6]
        lines.append(f"- {name} vs {reference}: overall {overall}; on the 3D tasks {three_d}.")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Command line: python eval.py --key=value ...

@dataclass
class EvalConfig:
    data: str = "data/spar"     # directory written by generate_spar.py
    split: str = "val"          # questions from qa_{split}.jsonl: val | train
    tasks: str = ""             # score these tasks only (comma-separated; empty: all)
    predictions: str = ""       # score this file of {"id", "prediction"} lines ...
    ckpt: str = ""              # ... or run the Spa3-VLM checkpoint in this directory
    batch_size: int = 16        # questions per model.answer call
    res: int = 0                # model mode: frames resized to res x res (0: the model's own image size)
    out: str = ""               # model mode: where predictions.jsonl goes (default: beside json_out, else in ckpt)
    json_out: str = ""          # write every number here as JSON
    compare: str = ""           # instead: NAME=scores.json,NAME=scores.json (json_out files) -> one side-by-side table
    ablation: str = ""          # instead: NAME=seed0.json+seed1.json+...,NAME=... -> paired intervals vs the first
    gates: str = ""             # instead: NAME=metrics.jsonl or eval.json,... -> the gates table with PASS / FAIL


def parse_args(argv):
    cfg = EvalConfig()
    names = [f.name for f in fields(cfg)]
    for arg in argv:
        key, has_value, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not has_value or key not in names:
            raise SystemExit(f"eval.py: bad argument {arg!r}: use --key=value with key in {', '.join(names)}")
        if isinstance(getattr(cfg, key), int) and not value.isdigit():
            raise SystemExit(f"eval.py: --{key} must be a whole number, got {value!r}")
        setattr(cfg, key, type(getattr(cfg, key))(value))
    if cfg.compare or cfg.ablation or cfg.gates:
        return cfg
    if bool(cfg.predictions) == bool(cfg.ckpt):
        raise SystemExit("eval.py: give exactly one of --predictions=FILE (score a file) or --ckpt=DIR (run a model)")
    if cfg.batch_size < 1:
        raise SystemExit(f"eval.py: --batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.split not in ("val", "train"):
        raise SystemExit(f"eval.py: --split must be val or train, got {cfg.split!r}")
    return cfg


def read_result(path, needed=("scores", "tasks_of", "model")):
    """An eval JSON (--json_out) with the fields a table reads: the per-question scores that --ablation and
    --gates compare, or (--compare) the summaries."""
    import data
    result = data.read_json(path)
    for field in needed:
        if not isinstance(result, dict) or field not in result:
            raise ValueError(f"{path}: field '{field}' is missing (an eval.py --json_out file of this version has it)")
    return result


def load_questions(data_dir, split):
    """The questions of a split. A task this file does not know (a misspelling) is an error: its questions would
    count in `overall` but appear in no table."""
    import data
    path = os.path.join(data_dir, f"qa_{split}.jsonl")
    records = data.load_qa_jsonl(path)
    for record in records:
        if record["task"] not in TASK_LEVEL:
            line = next(n for n, row in data.read_jsonl(path) if row["id"] == record["id"])  # ids are unique
            raise ValueError(f"{path}:{line}: field 'task': unknown task {record['task']!r} "
                             f"(known: {', '.join(TASK_LEVEL)})")
    return records


def run(cfg, model=None, load_frames=None):
    """Everything `python eval.py` does; model and load_frames stand in for the checkpoint and scene files."""
    if cfg.gates:
        print(gates_table([item.rpartition("=")[::2] for item in cfg.gates.split(",")]))
        return None
    if cfg.ablation:
        arms = {}
        for item in cfg.ablation.split(","):
            name, _, paths = item.rpartition("=")
            arms[name or paths] = [read_result(path) for path in paths.split("+")]
        print(ablation(arms))
        return arms
    if cfg.compare:
        results = {}
        for item in cfg.compare.split(","):
            name, _, path = item.rpartition("=")
            results[name or path] = read_result(path, ("model", "counts", "n_questions", "chance_uniform",
                                                        "chance_frequency"))
        print(compare(results))
        return results
    records = load_questions(cfg.data, cfg.split)
    if not records:  # else the report would be `overall: 0.00`, as if every answer were wrong
        raise ValueError(f"{os.path.join(cfg.data, f'qa_{cfg.split}.jsonl')}: no questions to score")
    if cfg.tasks:
        records = [r for r in records if r["task"] in cfg.tasks.split(",")]
        if not records:
            raise ValueError(f"{cfg.data}: no {cfg.split} questions of the tasks {cfg.tasks}")
    if cfg.predictions:
        predictions = read_predictions(cfg.predictions, records)
    else:
        model = model if model is not None else load_model(cfg.ckpt)
        # frames at the resolution the model was trained on (its geo image size), unless --res says otherwise
        res = cfg.res or getattr(getattr(getattr(model, "config", None), "geo", None), "image_size", None)
        oracle = getattr(getattr(model, "config", None), "spa3r", None) == "oracle"
        answers = predict(model, records, load_frames or scene_frames(cfg.data, res), cfg.batch_size,
                          scene_oracle(cfg.data) if oracle else None)
        path = cfg.out or os.path.join(os.path.dirname(cfg.json_out) if cfg.json_out else cfg.ckpt, "predictions.jsonl")
        write_predictions(path, records, answers)
        print(f"wrote {len(answers)} predictions to {path}")
        predictions = {r["id"]: a for r, a in zip(records, answers)}
    train_path = os.path.join(cfg.data, "qa_train.jsonl")
    train = load_questions(cfg.data, "train") if os.path.exists(train_path) else None
    result = evaluate(records, predictions, train)
    if train is None:
        print(f"note: no {train_path}: the chance baselines are left out")
    if result["n_missing"]:
        print(f"note: {result['n_missing']} of {len(records)} questions have no prediction; they score 0")
    if result["unreadable"]:
        print(f"note: {len(result['unreadable'])} of {len(records)} predictions hold a number too long to read "
              f"(first: {result['unreadable'][0]!r}); they score 0")
    print(report(result))
    if cfg.json_out:
        write_atomic(cfg.json_out, (json.dumps({"config": asdict(cfg), **result}, indent=1) + "\n").encode())
    return result


if __name__ == "__main__":
    try:
        run(parse_args(sys.argv[1:]))
    except ValueError as e:
        raise SystemExit(f"eval.py: {e}")
    except OSError as e:  # a path that is a directory, missing or unreadable: one line naming it, not a traceback
        raise SystemExit(f"eval.py: {e.filename}: {e.strerror}" if e.filename else f"eval.py: {e}")
