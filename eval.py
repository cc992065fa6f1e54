"""eval.py: score answers to SPAR-Bench and VSI-Bench style questions, from our Spa3-VLM or any other system.

    python eval.py --ckpt=out/vlm --data=data/spar --split=val   # run the model, write predictions.jsonl, score it
    python eval.py --predictions=preds.jsonl --data=data/spar    # score a file of {"id", "prediction"} lines
    python eval.py --compare=A=a.json,B=b.json   # or --ablation=A=a0.json+a1.json,B=...   or --gates=geo=metrics.jsonl

Questions: DATA/qa_{split}.jsonl from generate_spar.py (or VSI-Bench's, via from_vsibench); answers: a file or vlm.py's
model.answer(records, images); chance baselines: learned from DATA/qa_train.jsonl; train.py's gates use
paired_bootstrap. stdout gets a markdown table and `overall: <score>`; --json_out keeps every number. In percent:
- fill: MRA, the mean over θ in {0.50, 0.55, ..., 0.95} of [|ŷ - y| / |y| < 1 - θ], ŷ the prediction's first
  number, y the ground truth, in exact fractions (5 % off fails θ = 0.95). No number, or one too long to read,
  scores 0; y = 0 only scores ŷ = 0; several values (view_change_infer) are matched in order and averaged.
- select: 1 if extract_letter reads the right letter, else 0 (an empty answer too).
- a task: the mean over its questions (over difficulties first, as VSI-Bench does); a level, a benchmark and
  `overall`: the mean over their tasks. A question without a prediction scores 0. README compares official scorers.
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
from generate_spar import SPAR_TASKS, TASKS, VSI_TASKS, parse_args, write_atomic

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


def score_numbers(preds, answer):
    """Mean MRA over the answer's values (never none: load_questions checks); values the prediction lacks add 0."""
    truths = parse_numbers(answer)
    return sum(mra(p, y) for p, y in zip(preds, truths)) / len(truths)


def score_record(record, prediction):
    """Score of one prediction (None: no prediction) for one question record."""
    if prediction is None:
        return 0.0
    if record["format_type"] == "select":
        return float(extract_letter(prediction, record["options"]) == record["answer"])
    numbers = parse_numbers(prediction)
    return 0.0 if numbers is None else score_numbers(numbers, record["answer"])


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
        answers[kind].append(r["answer"] if kind[1] == "select" else parse_numbers(r["answer"]))
    means = {kind: [mean(axis) for axis in zip(*values)] for kind, values in answers.items() if kind[1] == "fill"}
    modes = {kind: _most_frequent(values) if kind[1] == "select" else [_most_frequent(a) for a in zip(*values)]
             for kind, values in answers.items()}
    uniform, frequency = [], []
    for record in records:
        kind = (record["task"], record["format_type"])
        if kind[1] == "select":
            uniform.append(1 / len(record["options"]))
            frequency.append(float(modes[kind] == record["answer"]) if kind in modes else None)
        else:
            uniform.append(score_numbers(means[kind], record["answer"]) if kind in modes else None)
            frequency.append(score_numbers(modes[kind], record["answer"]) if kind in modes else None)
    return uniform, frequency


def evaluate(records, predictions, train=None):
    """Every number: the summaries, per-question scores (for --ablation and --gates), counts, unusable predictions."""
    scores = [score_record(r, predictions.get(r["id"])) for r in records]
    uniform, frequency = chance(train, records) if train else (None, None)
    return {"n_questions": len(records), "n_missing": sum(r["id"] not in predictions for r in records),
            "unreadable": [r["id"] for r in records if r["format_type"] == "fill" and r["id"] in predictions
                           and parse_numbers(predictions[r["id"]]) is None],
            "counts": dict(Counter(r["task"] for r in records)), "model": summarize(records, scores),
            "scores": {r["id"]: score for r, score in zip(records, scores)},
            "tasks_of": {r["id"]: r["task"] for r in records},
            "chance_uniform": summarize(records, uniform) if train else None,
            "chance_frequency": summarize(records, frequency) if train else None,
            "chance_frequency_scores": {r["id"]: f for r, f in zip(records, frequency)} if train else None}


# -----------------------------------------------------------------------------
# Where the answers come from: a predictions file ({"id": str, "prediction": str} per line), or a model

def read_predictions(path, records):
    """id -> prediction. Any malformed line is a one-line ValueError naming the file, the line and the field."""
    known, predictions, first_line = {record["id"] for record in records}, {}, {}
    for lineno, row in data.read_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with fields 'id' and 'prediction'")
        pid = row.get("id")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise ValueError(f"{where}: field 'id': must be a string, got {pid!r:.60}")
        pid = str(pid)  # VSI-Bench ids are integers; from_vsibench turns them into strings the same way
        if pid in first_line:
            raise ValueError(f"{where}: field 'id': duplicate id {pid!r} (first on line {first_line[pid]})")
        if pid not in known:
            raise ValueError(f"{where}: field 'id': id {pid!r} is not among the questions")
        if not isinstance(row.get("prediction"), str):
            raise ValueError(f"{where}: field 'prediction': must be a string, got {row.get('prediction')!r:.60}")
        first_line[pid], predictions[pid] = lineno, row["prediction"]
    return predictions


def predict(model, records, load_frames, batch_size=16, load_oracle=None):
    """One answer per record from model.answer(records, images[, oracle]) a batch at a time, in order. images[i]:
    load_frames(records[i]), float32 (N_i, 3, H, W) in [0, 1]; oracle[i]: load_oracle(records[i]), the oracle arm's."""
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
    if model is None:
        import vlm  # only model mode needs the model code
        model = vlm.load_for_eval(cfg.ckpt)
    config, store = getattr(model, "config", None), data.SceneStore(cfg.data)
    # frames as training shows them (markers drawn), at the model's trained image size unless --res says otherwise
    res = cfg.res or getattr(getattr(config, "geo", None), "image_size", None)
    load_frames = load_frames or (lambda r: store.frames(r["scene"], r["image"], res, markers=r.get("markers")))
    oracle = store.oracle if getattr(config, "spa3r", None) == "oracle" else None
    answers = predict(model, records, load_frames, cfg.batch_size, oracle)
    path = cfg.out or os.path.join(os.path.dirname(cfg.json_out) if cfg.json_out else cfg.ckpt, "predictions.jsonl")
    rows = [{"id": r["id"], "task": r["task"], "prediction": a} for r, a in zip(records, answers)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode())
    print(f"wrote {len(answers)} predictions to {path}")
    return {r["id"]: a for r, a in zip(records, answers)}


def from_vsibench(row):
    """A VSI-Bench record ({"id", "scene_name", "question_type", "question", "options", "ground_truth"}) as ours, to
    score predictions with (write them to qa_val.jsonl; "image" is empty: this repo reads no videos). Its tasks
    object_rel_direction_{easy,medium,hard} become object_rel_direction with a "difficulty", as VSI-Bench scores."""
    qtype = str(row.get("question_type"))
    m = re.fullmatch(r"(object_rel_direction)_(easy|medium|hard)", qtype)
    task, difficulty = m.groups() if m else (qtype, "")
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


def load_questions(data_dir, split):
    """A split's questions. An unknown task (a misspelling) would count in `overall` but show in no table."""
    path = os.path.join(data_dir, f"qa_{split}.jsonl")
    records = data.load_qa_jsonl(path)
    for record in records:
        if record["task"] not in TASK_LEVEL:
            problem = f"field 'task': unknown task {record['task']!r} (known: {', '.join(TASK_LEVEL)})"
        elif record["format_type"] == "fill" and not parse_numbers(record["answer"]):
            problem = f"field 'answer': no number in {record['answer']!r:.60}"
        else:
            continue
        line = next(n for n, row in data.read_jsonl(path) if row["id"] == record["id"])  # ids are unique
        raise ValueError(f"{path}:{line}: {problem}")
    return records


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
    if cfg.batch_size < 1 or cfg.res < 0 or cfg.split not in ("val", "train"):
        raise ValueError(f"need --batch_size >= 1, --res >= 0 and --split val or train, got {cfg.batch_size}, "
                         f"{cfg.res} and {cfg.split!r}")
    records = load_questions(cfg.data, cfg.split)
    if not records:  # else the report would be `overall: 0.00`, as if every answer were wrong
        raise ValueError(f"{os.path.join(cfg.data, f'qa_{cfg.split}.jsonl')}: no questions to score")
    if cfg.tasks:
        unknown = [t for t in cfg.tasks.split(",") if t not in TASK_LEVEL]
        if unknown:  # a misspelt task would be left out silently
            raise ValueError(f"--tasks: unknown task {unknown[0]!r} (known: {', '.join(TASK_LEVEL)})")
        records = [r for r in records if r["task"] in cfg.tasks.split(",")]
        if not records:
            raise ValueError(f"{cfg.data}: no {cfg.split} questions of the tasks {cfg.tasks}")
    if cfg.predictions:
        predictions = read_predictions(cfg.predictions, records)
    else:
        predictions = model_predictions(cfg, records, model, load_frames)
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
