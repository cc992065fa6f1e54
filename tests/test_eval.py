"""Tests for eval.py: every expected score here is worked out by hand (or by a brute-force loop), not by eval."""
import json
import os
import sys
from dataclasses import fields
from fractions import Fraction

import numpy as np
import pytest
import torch

import eval as ev

FOUR = ["A. 1.2", "B. left", "C. 3.5", "D. behind"]


# -----------------------------------------------------------------------------
# Helpers: question records in the contract's layout, written where eval.run reads them

def question(qid, task, answer, options=None, **extra):
    record = {"id": qid, "scene": "scene_000", "task": task, "level": ev.TASK_LEVEL[task],
              "format_type": "select" if options else "fill", "img_type": "single_view", "image": [0, 1],
              "question": "?", "answer": answer, **extra}
    if options:
        record["options"] = options
    return record


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def data_dir(tmp_path, val, train=None):
    write_jsonl(tmp_path / "qa_val.jsonl", val)
    if train is not None:
        write_jsonl(tmp_path / "qa_train.jsonl", train)
    return str(tmp_path)


def cli(*argv):
    """The config `python eval.py ARGV` runs."""
    return ev.parse_args(list(argv), ev.EvalConfig())


def score_file(tmp_path, capsys, val, predictions, train=None):
    """Run `eval.py --predictions=... --data=...` and return (result, stdout)."""
    cfg = ev.EvalConfig(data=data_dir(tmp_path, val, train), predictions=write_jsonl(tmp_path / "p.jsonl", predictions),
                        json_out=str(tmp_path / "scores.json"))
    result = ev.run(cfg)
    return result, capsys.readouterr().out


# -----------------------------------------------------------------------------
# Numbers and MRA

@pytest.mark.parametrize("pred, truth, expected", [
    ("2", "2", 1.0),
    ("2.09", "2", 1.0),     # error 4.5 %  < 5 %: every θ
    ("2.1", "2", 0.9),      # error exactly 5 %: fails θ=0.95 (strict <), passes the other nine
    ("21", "20", 0.9),      # exactly 5 % again; 1/20 in floats would pass θ=0.95 (0.05 < 1-0.95 = 0.05000000000000004)
    ("2.999", "2", 0.1),    # 49.95 %: only θ=0.50
    ("3", "2", 0.0),        # exactly 50 %: fails θ=0.50 too
    ("1", "2", 0.0),        # 50 % below
    ("2.5", "2", 0.5),      # 25 %: θ = 0.50..0.70 pass (tolerance 0.50..0.30 > 0.25), 0.75 (tolerance 0.25) fails
    ("-3.3", "-3", 0.8),    # 10 % of |y|: tolerances 0.50..0.15 pass, 0.10 fails
    ("0", "0", 1.0),        # ground truth 0: exact match only
    ("0.001", "0", 0.0),
])
def test_mra_at_threshold_edges(pred, truth, expected):
    assert ev.mra(Fraction(pred), Fraction(truth)) == expected


def test_mra_matches_formula_away_from_edges():
    # Brute force over the formula in floats, on values whose relative error is not within 1e-6 of a threshold.
    gen = torch.Generator().manual_seed(0)
    for truth, pred in (torch.rand(200, 2, generator=gen) * 10 + 0.1).tolist():
        error = abs(pred - truth) / truth
        if min(abs(error - t / 100) for t in range(5, 55, 5)) < 1e-6:
            continue
        expected = sum(error < 1 - theta for theta in [0.5 + 0.05 * k for k in range(10)]) / 10
        assert ev.mra(Fraction(pred), Fraction(truth)) == expected


@pytest.mark.parametrize("text, numbers", [
    ("2.5 m", [2.5]), ("about 2.5 meters", [2.5]), ("-3", [-3]), ("1e2", [100]), (".5", [0.5]),
    ("0.52, 1.20, -30", [0.52, 1.2, -30]), ("no idea", []), ("", []), ("1e999", [1, 999]),
])
def test_parse_numbers(text, numbers):
    assert ev.parse_numbers(text) == [Fraction(str(n)) for n in numbers]


def test_fill_uses_first_number_and_non_numbers_score_zero():
    record = question("q", "depth_prediction_oc", "2.0")
    assert ev.score_record(record, "It is about 2 m, maybe 5") == 1.0
    assert ev.score_record(record, "two metres") == 0.0


def test_view_change_is_mean_mra_over_spars_five_axes_relative_to_truth():
    # SPAR's format: truth right 1, forward 2, turn left 30; axes up and rotate-up are 0 (a prediction that
    # leaves them out, or says 0, scores 1 on each, as SPAR-Bench's evaluator does).
    record = question("q", "view_change_infer", "move_right:1.00,move_forward:2.00,rotate_left:30")
    assert ev.view_change_values(record["answer"]) == [1, 0, 2, -30, 0]
    assert ev.score_record(record, "rotate_left:30, move_forward:2.00, move_right:1.00") == 1.0  # any order
    # right 1.8 vs 1: error 0.8 of the truth -> 0 (dividing by the prediction, as SPAR's evaluator does, would
    # give 0.44 -> 0.1); forward 2.1 vs 2: 5 % -> 0.9; turn exact -> 1; up and rotate-up 0 = 0 -> 1 each.
    assert ev.score_record(record, "move_right: 1.8 m, move_forward: 2.1 m, rotate_left: 30 degrees") == \
        pytest.approx((0 + 1 + 0.9 + 1 + 1) / 5)
    # Names in any case, "is" or a colon, units after the number; the last of a repeated name counts (as SPAR's
    # evaluator keeps it). An answer that names no component scores 0 (not the 2/5 of the two zero axes).
    assert ev.score_record(record, "Move_Right is 1.0 m, MOVE_FORWARD: 2 m, rotate_left=30 deg") == 1.0
    assert ev.view_change_values("move_right:0.3,move_right:0.2") == [Fraction("0.2"), 0, 0, 0, 0]
    for unnamed in ("1.00, 2.00, -30", "0", "0.5 m left, 1.0 m forward, turned 30 degrees left", "I cannot tell"):
        assert ev.score_record(record, unnamed) == 0.0, unnamed


def test_a_wrong_direction_name_scores_zero_on_that_axis():
    record = question("q", "view_change_infer", "move_right:0.50,move_forward:1.00,rotate_left:30")
    # the same numbers, but left instead of right: that axis is -0.52 vs +0.5 -> 0; forward, turn, up, rotate-up 1
    assert ev.score_record(record, "move_left:0.5,move_forward:1.0,rotate_left:30") == pytest.approx(4 / 5)
    assert ev.score_record(record, "move_left:0.52,move_forward:1.0,rotate_right:30") == pytest.approx(3 / 5)
    # both names: right minus left, as SPAR-Bench's evaluator takes them
    assert ev.view_change_values("move_right:0.8,move_left:0.3") == [Fraction("0.5"), 0, 0, 0, 0]


def test_spar_mv_tasks_read_the_last_number():
    # SPAR-Bench's evaluator reads the last number of the _mv numeric answers (an "Image 2" comes first)
    multi, single = question("m", "depth_prediction_oc_mv", "2.5"), question("s", "depth_prediction_oc", "2.5")
    assert ev.score_record(multi, "In image 2 the object is 2.5 m away") == 1.0
    assert ev.score_record(single, "2.5 m, not 2") == 1.0
    assert ev.score_record(single, "Image 2: 2.5 m") == 0.6  # the first number: 2 is 20 % off, θ 0.50..0.75 pass


# -----------------------------------------------------------------------------
# Multiple choice

@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("[b]", "B"), ("b", "B"), ("**C**", "C"), ("  D\n", "D"),
    ("B) left", "B"), ("(b) left", "B"), ("C. 3.5 m", "C"), ("a: 1.2", "A"),
    ("The answer is B", "B"), ("The answer is B because it is closer.", "B"), ("answer: b", "B"),
    ("Answer: (c)", "C"), ("I pick option D.", "D"), ("the answer is a.", "A"),
    ("left", "B"), ("Behind.", "D"), ("B. left", "B"), ("1.2", "A"),
    ("E", "E"),                                   # returned as it is; a letter beyond the options scores wrong
    ("the answer is a chair", None), ("a chair is on the left side", None), ("I think so", None),
    ("", None), ("   ", None), ("somewhere", None),
])
def test_extract_letter(answer, letter):
    assert ev.extract_letter(answer, FOUR) == letter


def test_select_scoring_empty_and_out_of_range_are_wrong():
    record = question("q", "position_matching", "B", FOUR)
    assert ev.score_record(record, "B.") == 1.0
    assert ev.score_record(record, "") == 0.0      # SPAR-Bench's evaluator scores this 1
    assert ev.score_record(record, " \n") == 0.0
    assert ev.score_record(record, "F") == 0.0
    assert ev.score_record(question("q", "object_counting", "3"), "") == 0.0


# -----------------------------------------------------------------------------
# Task, level and overall means on a small predictions file

def synthetic_split():
    val = [
        question("d1", "depth_prediction_oc", "2.0"), question("d2", "depth_prediction_oc", "4.0"),
        question("s1", "distance_prediction_oo", "B", FOUR), question("s2", "distance_prediction_oo", "A", FOUR),
        question("v1", "view_change_infer", "move_right:1.0,move_forward:2.0,rotate_left:30"),
        question("i1", "spatial_imagination_oc", "D", FOUR),
        question("c1", "object_counting", "4"),
        question("r1", "object_rel_direction", "A", FOUR, difficulty="easy"),
        question("r2", "object_rel_direction", "B", FOUR, difficulty="easy"),
        question("r3", "object_rel_direction", "C", FOUR, difficulty="hard"),
        question("m1", "room_size_estimation", "20"),
    ]
    preds = {"d1": "2.0", "d2": "5", "s1": "B", "s2": "C", "v1": "move_right:1.0,move_forward:2.0,rotate_left:30", "i1": "", "c1": "4",
             "r1": "A", "r2": "D", "r3": "(C)", "m1": "21 square meters"}
    return val, [{"id": k, "prediction": v} for k, v in preds.items()]


def test_level_and_overall_means(tmp_path, capsys):
    val, preds = synthetic_split()
    result, out = score_file(tmp_path, capsys, val, preds)
    tasks = result["model"]["tasks"]
    # depth: 1.0 and 5 vs 4 (25 % -> 0.5); distance: 1 of 2; view change exact; imagination empty -> 0.
    assert tasks["depth_prediction_oc"] == pytest.approx(75)
    assert tasks["distance_prediction_oo"] == pytest.approx(50)
    assert tasks["view_change_infer"] == pytest.approx(100)
    assert tasks["spatial_imagination_oc"] == pytest.approx(0)
    # rel_direction: mean over difficulties (easy 50, hard 100) = 75, not the pooled 2/3; room size: 5 % -> 0.9.
    assert tasks["object_rel_direction"] == pytest.approx(75)
    assert tasks["room_size_estimation"] == pytest.approx(90)
    assert result["model"]["levels"] == pytest.approx(
        {"low": 62.5, "middle": 100, "high": 0, "configuration": 87.5, "measurement": 90})
    assert result["model"]["benchmarks"] == pytest.approx({"SPAR-Bench": 56.25, "VSI-Bench": 265 / 3})
    assert result["model"]["overall"] == pytest.approx(490 / 7)
    assert out.rstrip("\n").splitlines()[-1] == "overall: 70.00"
    # one table: task rows with level and count, then level and benchmark rows (six SPAR questions, five VSI)
    assert "| depth_prediction_oc | low | 2 | 75.00 | – | – |" in out and "| **low** | | | 62.50 | – | – |" in out
    assert "| **SPAR-Bench** | | 6 | 56.25 | – | – |" in out and "| **VSI-Bench** | | 5 | 88.33 | – | – |" in out
    assert "| **overall** | | 11 | 70.00 | – | – |" in out
    assert "no prediction" not in out and "baselines are left out" in out
    saved = json.load(open(tmp_path / "scores.json"))
    assert saved["model"]["overall"] == pytest.approx(70) and saved["chance_uniform"] is None


def test_only_benchmarks_with_questions_are_printed(tmp_path, capsys):
    val = [question("c1", "object_counting", "4")]
    result, out = score_file(tmp_path, capsys, val, [{"id": "c1", "prediction": "4"}])
    assert "| **VSI-Bench** |" in out and "SPAR-Bench" not in out and result["model"]["overall"] == 100


def test_compare_puts_systems_side_by_side(tmp_path, capsys):
    val, preds = synthetic_split()
    train = [question("t1", "depth_prediction_oc", "4.0")]
    first, _ = score_file(tmp_path, capsys, val, preds, train)
    silent, _ = score_file(tmp_path, capsys, val, [], train)
    table = ev.compare({"good": first, "silent": silent}).splitlines()
    row = next(line for line in table if line.startswith("| depth_prediction_oc |"))
    # good 75 (worked out above), silent 0; chance: the train mean 4.0 is right for d2 only -> 50 either way
    assert row == "| depth_prediction_oc | low | 2 | 75.00 | 0.00 | 50.00 | 50.00 |"
    # chance overall = mean over the tasks it can score: uniform 50 (depth) and 25 for each of the three
    # four-option tasks; frequency only knows depth from the training file
    assert table[-1] == f"| **overall** | | {len(val)} | 70.00 | 0.00 | 31.25 | 50.00 |"
    # the CLI reads json_out files
    json.dump(first, open(tmp_path / "a.json", "w"))
    json.dump(silent, open(tmp_path / "b.json", "w"))
    ev.run(cli(f"--compare=good={tmp_path / 'a.json'},silent={tmp_path / 'b.json'}"))
    assert row in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Baselines

def test_baselines_on_known_training_answers(tmp_path, capsys):
    three = ["A. x", "B. y", "C. z"]
    train = [question(f"t{i}", "position_matching", a, three) for i, a in enumerate("ABBC")]      # most frequent: B
    train += [question(f"u{i}", "camera_motion_infer", a, three) for i, a in enumerate("BA")]     # tie -> A
    train += [question(f"w{i}", "depth_prediction_oo", a) for i, a in enumerate(["1", "1", "4"])]  # mean 2, mode 1
    train += [question("x0", "view_change_infer", "move_right:1,move_forward:2,rotate_right:30"),
              question("x1", "view_change_infer", "move_right:3,move_forward:2,rotate_right:30")]
    val = [question("p1", "position_matching", "B", three), question("p2", "position_matching", "A", three),
           question("p3", "position_matching", "B", three), question("m1", "camera_motion_infer", "A", three),
           question("o1", "depth_prediction_oo", "2"), question("v1", "view_change_infer", "move_right:2,move_forward:2,rotate_right:30"),
           question("n1", "object_counting", "3")]                                               # not in train
    result, out = score_file(tmp_path, capsys, val, [], train)
    uniform, frequency = result["chance_uniform"]["tasks"], result["chance_frequency"]["tasks"]
    assert uniform["position_matching"] == pytest.approx(100 / 3)
    assert frequency["position_matching"] == pytest.approx(200 / 3)
    assert frequency["camera_motion_infer"] == pytest.approx(100)
    assert uniform["depth_prediction_oo"] == pytest.approx(100)   # predicts 2 = truth
    assert frequency["depth_prediction_oo"] == pytest.approx(0)   # predicts 1: 50 % off
    assert uniform["view_change_infer"] == pytest.approx(100)     # per-axis means (2, 0, 2, 30, 0)
    # per-axis modes: right ties 1 vs 3 -> 1 (50 % off: 0); forward 2, turn 30 and the two zero axes exact.
    assert frequency["view_change_infer"] == pytest.approx(400 / 5)
    assert "object_counting" not in uniform and "object_counting" not in frequency
    assert "| object_counting | configuration | 1 | 0.00 | – | – |" in out
    assert result["n_missing"] == len(val) and f"{len(val)} of {len(val)} questions have no prediction" in out


# -----------------------------------------------------------------------------
# Malformed and incomplete predictions files

@pytest.mark.parametrize("lines, lineno, field", [
    (['{"prediction": "B"}'], 1, "id"),
    (['{"id": "s1", "prediction": "B"}', "", '{"id": "s1", "prediction": "C"}'], 3, "id"),
    (['{"id": ["s1"], "prediction": "B"}'], 1, "id"),
    (['{"id": "s1", "prediction": 2}'], 1, "prediction"),
    (['{"id": "s1", "prediction": null}'], 1, "prediction"),
    (['{"id": "s1"}'], 1, "prediction"),
])
def test_malformed_predictions_name_file_line_and_field(tmp_path, lines, lineno, field):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        ev.read_predictions(str(path), [question("s1", "position_matching", "B", FOUR)])
    message = str(err.value)
    assert message.startswith(f"{path}:{lineno}: field '{field}'") and "\n" not in message


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "s1", "prediction": "B"}\n{"id": \n')
    with pytest.raises(ValueError, match=f"^{path}:2: not valid JSON"):
        ev.read_predictions(str(path), [question("s1", "position_matching", "B", FOUR)])


def test_missing_predictions_score_zero_and_are_counted(tmp_path, capsys):
    val, preds = synthetic_split()
    full, _ = score_file(tmp_path, capsys, val, preds)
    kept = [p for p in preds if p["id"] not in ("d1", "c1")]
    part, out = score_file(tmp_path, capsys, val, kept)
    assert part["n_missing"] == 2 and "2 of 11 questions have no prediction; they score 0" in out
    assert part["model"]["tasks"]["depth_prediction_oc"] == pytest.approx(25)   # d1's 1.0 lost
    assert part["model"]["tasks"]["object_counting"] == 0
    assert full["model"]["tasks"]["object_counting"] == 100


def test_integer_ids_match_string_ids(tmp_path):
    # Other systems' VSI-Bench outputs carry integer ids; from_vsibench makes the questions' ids strings.
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": 17, "prediction": "C"}])
    assert ev.read_predictions(path, [question("17", "route_planning", "C", FOUR)]) == ({"17": "C"}, 0)
    whole = write_jsonl(tmp_path / "w.jsonl", [{"id": 17.0, "prediction": "C"}])  # a whole float, from pandas
    assert ev.read_predictions(whole, [question("17", "route_planning", "C", FOUR)]) == ({"17": "C"}, 0)


def test_predictions_of_other_questions_are_left_out_and_counted(tmp_path, capsys):
    """A full run's predictions scored on a subset: --tasks, or a smaller question set (SPAR-Bench-Tiny)."""
    val, preds = synthetic_split()
    result, out = score_file(tmp_path, capsys, val[:3], preds + [{"id": "nope", "prediction": "B"}])
    assert result["n_questions"] == 3 and result["n_missing"] == 0
    assert f"note: {len(preds) - 3 + 1} predictions name no question of" in out
    cfg = ev.EvalConfig(data=data_dir(tmp_path, val), predictions=write_jsonl(tmp_path / "p.jsonl", preds),
                        tasks="depth_prediction_oc")
    assert ev.run(cfg)["model"]["tasks"] == {"depth_prediction_oc": pytest.approx(75)}


# -----------------------------------------------------------------------------
# Model mode with a stand-in for vlm.py

class Oracle:
    """Answers every question correctly in a different surface form, and remembers what it was given."""

    def __init__(self):
        self.calls = []

    def answer(self, records, images):
        self.calls.append([tuple(x.shape) for x in images])
        return [f"The answer is {r['answer']}" if r["format_type"] == "select" else f"{r['answer']} m" for r in records]


def frames(record):
    return torch.zeros(len(record["image"]), 3, 8, 8)


def test_predict_batches_in_order():
    records = [question(f"q{i}", "object_counting", str(i + 1), image=list(range(i + 1))) for i in range(5)]
    model = Oracle()
    assert ev.predict(model, records, frames, batch_size=2) == ["1 m", "2 m", "3 m", "4 m", "5 m"]
    assert model.calls == [[(1, 3, 8, 8), (2, 3, 8, 8)], [(3, 3, 8, 8), (4, 3, 8, 8)], [(5, 3, 8, 8)]]


def test_model_mode_writes_predictions_that_score_the_same(tmp_path, capsys):
    val, _ = synthetic_split()
    cfg = ev.EvalConfig(data=data_dir(tmp_path, val), ckpt=str(tmp_path / "ckpt"), batch_size=4,
                        json_out=str(tmp_path / "run" / "scores.json"))
    result = ev.run(cfg, model=Oracle(), load_frames=frames)
    capsys.readouterr()
    written = tmp_path / "run" / "predictions.jsonl"
    assert result["model"]["overall"] == pytest.approx(100)
    assert sorted(os.listdir(tmp_path / "run")) == ["predictions.jsonl", "scores.json"]   # no temporary left
    rescored = ev.run(ev.EvalConfig(data=cfg.data, predictions=str(written)))
    assert rescored["model"] == result["model"]


def test_model_mode_feeds_frames_at_the_models_image_size(tmp_path, capsys, monkeypatch):
    asked = set()

    class Scenes:
        """Stands in for data.SceneStore: the frames of a record, remembering the resolution asked for."""

        def __init__(self, data_dir):
            pass

        def record_frames(self, record, res):
            asked.add(res)
            return torch.zeros(len(record["image"]), 3, 8, 8)

    class Sized(Oracle):
        config = type("Config", (), {"geo": type("Geo", (), {"image_size": 48})})

    monkeypatch.setattr(ev.data, "SceneStore", Scenes)
    val, _ = synthetic_split()
    cfg = ev.EvalConfig(data=data_dir(tmp_path, val), ckpt=str(tmp_path / "ckpt"), json_out=str(tmp_path / "s.json"))
    ev.run(cfg, model=Sized())
    assert asked == {48}
    ev.run(ev.EvalConfig(**{**cfg.__dict__, "res": 96}), model=Sized())
    assert asked == {48, 96}


# -----------------------------------------------------------------------------
# VSI-Bench records and the command line

# Benchmark files as published. Layouts: SPAR-Bench rows (jasonzhango/SPAR-Bench, exported with `datasets`:
# int id, image a list of {"bytes", "path"}, options inside the question), VSI-Bench rows (nyu-visionx/VSI-Bench:
# int id, options a list or null, ground_truth a string), lmms-eval --log_samples lines (v0.3 as SPAR ships it:
# doc + resps [[...]] + filtered_resps [...]; v0.7: filtered_resps a string, the doc only under the metric key).

SPAR_ROWS = [
    {"id": 205, "img_type": "single_view", "format_type": "fill", "task": "depth_prediction_oc", "source": "scannet",
     "image": [{"bytes": "iVBORw0KGgo=", "path": None}], "question": "What is the depth of the towel (red point)?",
     "answer": "0.9"},
    {"id": 206, "img_type": "multi_view", "format_type": "select", "task": "obj_spatial_relation_oc_mv",
     "source": "scannet", "image": [{"bytes": "iVBORw0KGgo=", "path": None}] * 2,
     "question": "Where is the chair?\nA. front-left\nB. front-right\nC. back-left\nD. back-right", "answer": "C"},
    {"id": 207, "img_type": "multi_view", "format_type": "fill", "task": "view_change_infer", "source": "scannet",
     "image": [], "question": "How did the camera move?", "answer": "move_right:0.5,move_forward:1.0,rotate_left:30"},
    {"id": 208, "img_type": "multi_view", "format_type": "fill", "task": "distance_prediction_oo_mv",
     "source": "scannet", "image": [], "question": "How far apart?", "answer": "2.5"},
]
SPAR_ANSWERS = {205: "0.9", 206: "back-left", 207: "move_left:0.5,move_forward:1.0,rotate_left:30",
                208: "Image 2 shows it 2.5 m away"}
# by hand: 1; C by the option's text; right axis wrong (4 of 5 axes); the last number 2.5
SPAR_TASK_SCORES = {"depth_prediction_oc": 100, "obj_spatial_relation_oc_mv": 100, "view_change_infer": 80,
                    "distance_prediction_oo_mv": 100}


def spar_bench_file(tmp_path, as_json=False):
    path = tmp_path / ("sparbench.json" if as_json else "sparbench.jsonl")
    if as_json:
        path.write_text(json.dumps(SPAR_ROWS))
        return str(path)
    return write_jsonl(path, SPAR_ROWS)


@pytest.mark.parametrize("as_json", [False, True])
def test_spar_bench_file_with_our_predictions(tmp_path, capsys, as_json):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prediction": a} for i, a in SPAR_ANSWERS.items()])
    result = ev.run(ev.EvalConfig(data=spar_bench_file(tmp_path, as_json), predictions=preds))
    assert result["model"]["tasks"] == pytest.approx(SPAR_TASK_SCORES)
    assert result["model"]["levels"] == pytest.approx({"low": 100, "middle": 80, "high": 100})
    out = capsys.readouterr().out
    assert "| obj_spatial_relation_oc_mv | high | 1 | 100.00 |" in out and "| **SPAR-Bench** | | 4 |" in out


def lmms_eval_lines(version):
    """lmms-eval --log_samples lines of SPAR_ROWS answered with SPAR_ANSWERS, as that version writes them."""
    lines = []
    for doc_id, row in enumerate(SPAR_ROWS):
        doc = {k: v for k, v in row.items() if k != "image"} | {"prediction": SPAR_ANSWERS[row["id"]]}
        metric = {**row, "image": ["<PIL.PngImagePlugin.PngImageFile image mode=RGB size=640x480 at 0x7F>"],
                  "prediction": SPAR_ANSWERS[row["id"]]}
        if version == "0.3":
            lines.append({"doc_id": doc_id, "doc": doc, "target": row["answer"], "arguments": {"0": "max_new_tokens"},
                          "resps": [[SPAR_ANSWERS[row["id"]]]], "filtered_resps": [SPAR_ANSWERS[row["id"]]],
                          "doc_hash": "x", "sparbench_score": metric, "input": "\n" + row["question"]})
        else:
            lines.append({"doc_id": doc_id, "target": row["answer"], "filtered_resps": SPAR_ANSWERS[row["id"]],
                          "token_counts": [None], "doc_hash": "x", "sparbench_score": metric, "input": "..."})
    return lines


@pytest.mark.parametrize("version", ["0.3", "0.7"])
def test_lmms_eval_log_samples_score_alone_or_against_the_questions(tmp_path, version):
    log = write_jsonl(tmp_path / "20260101_120000_samples_sparbench.jsonl", lmms_eval_lines(version))
    alone = ev.run(ev.EvalConfig(predictions=log))  # the questions come from the logged docs
    assert alone["model"]["tasks"] == pytest.approx(SPAR_TASK_SCORES) and alone["n_missing"] == 0
    with_data = ev.run(ev.EvalConfig(data=spar_bench_file(tmp_path), predictions=log))
    assert with_data["scores"] == alone["scores"]


VSI_ROWS = [
    {"id": 1334, "dataset": "arkitscenes", "scene_name": "42446103", "question_type": "object_rel_distance",
     "question": "Measuring from the closest point of each object, which of these objects (chair, stool, stove, sofa) "
                 "is the closest to the tv?", "ground_truth": "A", "options": ["A. chair", "B. stool", "C. stove", "D. sofa"]},
    {"id": 530, "dataset": "arkitscenes", "scene_name": "41069025", "question_type": "room_size_estimation",
     "question": "What is the size of this room (in square meters)? \nIf multiple rooms are shown, estimate the size "
                 "of the combined space.", "ground_truth": "26.4", "options": None},
    {"id": 0, "dataset": "arkitscenes", "scene_name": "41069025", "question_type": "object_counting",
     "question": "How many table(s) are in this room?", "ground_truth": 4},            # an int, no options field
    {"id": 957, "dataset": "arkitscenes", "scene_name": "41069025", "question_type": "object_rel_direction_hard",
     "question": "If I am standing by the stove and facing the sofa, is the tv to my front-left, ...?",
     "ground_truth": "B", "options": ["A. front-left", "B. back-right", "C. back-left", "D. front-right"]},
    {"id": 958, "dataset": "arkitscenes", "scene_name": "41069025", "question_type": "object_rel_direction_easy",
     "question": "If I am standing by the stove and facing the sofa, is the tv to the left or the right of the sofa?",
     "ground_truth": "A", "options": ["A. left", "B. right"]},
]


@pytest.mark.parametrize("as_json", [False, True])
def test_vsi_bench_rows(tmp_path, as_json):
    path = tmp_path / ("vsi.json" if as_json else "vsi.jsonl")
    path.write_text(json.dumps(VSI_ROWS)) if as_json else write_jsonl(path, VSI_ROWS)
    answers = {1334: "A. chair", 530: "29.04", 0: "4", 957: "B", 958: "B"}  # 26.4 * 1.1: 10 % off -> 0.8
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prediction": a} for i, a in answers.items()])
    result = ev.run(ev.EvalConfig(data=str(path), predictions=preds))
    # object_rel_direction: the mean of its difficulties (hard 1, easy 0), as VSI-Bench reports it
    assert result["model"]["tasks"] == pytest.approx({"object_rel_distance": 100, "room_size_estimation": 80,
                                                      "object_counting": 100, "object_rel_direction": 50})
    assert result["model"]["overall"] == pytest.approx((100 + 80 + 100 + 50) / 4)
    hard = ev.run(ev.EvalConfig(data=str(path), predictions=preds, tasks="object_rel_direction_hard"))
    assert hard["n_questions"] == 1 and hard["model"]["tasks"] == {"object_rel_direction": 100}
    counting = ev.load_questions(str(path))[2]
    assert counting["answer"] == "4" and counting["format_type"] == "fill" and counting["id"] == "0"


def test_vsi_bench_rows_from_pandas_with_array_options():
    row = {**VSI_ROWS[0], "options": np.array(VSI_ROWS[0]["options"], dtype=object)}
    assert ev.from_vsibench(row, "x")["options"] == VSI_ROWS[0]["options"]
    assert ev.from_vsibench({**VSI_ROWS[1], "options": float("nan")}, "x")["format_type"] == "fill"  # pandas' null
    with pytest.raises(ValueError, match="^x: field 'options': expected a list"):  # a CSV export's string
        ev.from_vsibench({**VSI_ROWS[0], "options": str(VSI_ROWS[0]["options"])}, "x")
    with pytest.raises(ValueError, match="^x: field 'question_type'"):
        ev.from_vsibench({**VSI_ROWS[3], "question_type": "object_rel_direction_extreme"}, "x")


def test_spar7m_conversations_file(tmp_path):
    rows = [{"id": "scene0261_00_16", "type": "depth_prediction_oc", "image": ["scene0261_00/image_color/543.jpg"],
             "conversations": [{"from": "human", "value": "<image>\nWhat is the depth of the towel?"},
                               {"from": "gpt", "value": "1.5"}]},
            {"id": "scene0261_00_17", "type": "position_matching", "image": ["a.png", "b.png"],
             "conversations": [{"from": "human", "value": "Which point?\nA. (1, 2)\nB. (3, 4)"},
                               {"from": "gpt", "value": "B"}]}]
    path = write_jsonl(tmp_path / "spar7m.jsonl", rows)
    records = ev.load_questions(path, image_root="/scans/images")
    assert records[0]["prompt"] == "What is the depth of the towel?" and records[0]["format_type"] == "fill"
    assert records[0]["image_files"] == ["/scans/images/scene0261_00/image_color/543.jpg"]
    assert records[1]["format_type"] == "select" and records[1]["options"] == ["A. (1, 2)", "B. (3, 4)"]
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "scene0261_00_16", "prediction": "1.5"},
                                               {"id": "scene0261_00_17", "prediction": "(3, 4)"}])
    assert ev.run(ev.EvalConfig(data=path, predictions=preds))["model"]["overall"] == 100


def test_model_mode_reads_a_benchmark_rows_image_files(tmp_path, monkeypatch):
    """eval.py --ckpt on SPAR-Bench rows whose images are PNG files beside the file: the model is shown those
    pictures at its own image size; a JPEG without Pillow, or a row without files, is a one-line error."""
    import generate_spar as g
    pictures = [np.full((16, 16, 3), value, dtype=np.uint8) for value in (0, 255)]
    for name, picture in zip(("a.png", "b.png"), pictures):
        g.write_png(str(tmp_path / name), picture)
    rows = [{**SPAR_ROWS[0], "image": ["a.png"]}, {**SPAR_ROWS[1], "image": ["a.png", "b.png"]}]
    bench = write_jsonl(tmp_path / "bench.jsonl", rows)
    shown = []

    class Sized(Oracle):
        config = type("Config", (), {"geo": type("Geo", (), {"image_size": 8})})

        def answer(self, records, images):
            shown.extend(images)
            return super().answer(records, images)

    result = ev.run(ev.EvalConfig(data=bench, ckpt=str(tmp_path / "ckpt"), json_out=str(tmp_path / "s.json")),
                    model=Sized())
    assert result["model"]["overall"] == 100
    assert [tuple(x.shape) for x in shown] == [(1, 3, 8, 8), (2, 3, 8, 8)]
    assert shown[1][0].max() == 0 and shown[1][1].min() == 255  # a.png black, b.png white (uint8)
    jpeg = write_jsonl(tmp_path / "jpeg.jsonl", [{**SPAR_ROWS[0], "image": ["c.jpg"]}])
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8\xff")
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    with pytest.raises(ValueError, match="c.jpg: reading JPEG frames needs Pillow"):
        ev.run(ev.EvalConfig(data=jpeg, ckpt=str(tmp_path / "ckpt"), json_out=str(tmp_path / "s.json")), model=Sized())
    video = write_jsonl(tmp_path / "vsi.jsonl", VSI_ROWS[:1])
    with pytest.raises(ValueError, match="question '1334' has no image files to show the model"):
        ev.run(ev.EvalConfig(data=video, ckpt=str(tmp_path / "ckpt")), model=Sized())


def test_scoring_first_says_what_it_scores(tmp_path, capsys):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": i, "prediction": a} for i, a in SPAR_ANSWERS.items()])
    ev.run(ev.EvalConfig(data=spar_bench_file(tmp_path), predictions=preds))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"eval.py: score {preds} | python ") and first.endswith("output: stdout")


def test_json_or_json_lines_by_content_with_bom_and_crlf(tmp_path):
    lines = "\r\n".join(json.dumps(r) for r in VSI_ROWS) + "\r\n"
    for name, text in [("a.json", lines), ("b.jsonl", json.dumps(VSI_ROWS, indent=2)), ("c.JSON", json.dumps(VSI_ROWS)),
                       ("d.jsonl", "\ufeff" + lines)]:  # datasets' to_json("x.json") writes lines; a BOM
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert [r["id"] for r in ev.load_questions(str(tmp_path / name))] == [str(r["id"]) for r in VSI_ROWS]


def test_lmms_eval_lines_without_a_doc_are_matched_by_position_and_checked(tmp_path):
    """v0.4-style lines that lost their doc: doc_id is the question's position in --data, and the logged
    target must be that question's answer (else the files are different releases or orders)."""
    bench = spar_bench_file(tmp_path)
    lines = [{"doc_id": i, "target": row["answer"], "filtered_resps": [SPAR_ANSWERS[row["id"]]]}
             for i, row in enumerate(SPAR_ROWS)]
    log = write_jsonl(tmp_path / "log.jsonl", lines[::-1])  # any line order
    assert ev.run(ev.EvalConfig(data=bench, predictions=log))["model"]["tasks"] == pytest.approx(SPAR_TASK_SCORES)
    swapped = [{**lines[0], "doc_id": 1}, {**lines[1], "doc_id": 0}]
    with pytest.raises(ValueError, match="log2.jsonl:1: field 'target': the logged question '206'"):
        ev.run(ev.EvalConfig(data=bench, predictions=write_jsonl(tmp_path / "log2.jsonl", swapped)))
    other = lmms_eval_lines("0.3")[:1]
    other[0]["doc"] = {**other[0]["doc"], "task": "depth_prediction_oo"}  # id 205 of another release
    with pytest.raises(ValueError, match="field 'target': the logged question '205' \\(depth_prediction_oo"):
        ev.run(ev.EvalConfig(data=bench, predictions=write_jsonl(tmp_path / "log3.jsonl", other)))


def test_spar_bench_rows_without_format_type_and_their_prompts():
    select = {k: v for k, v in SPAR_ROWS[1].items() if k != "format_type"} | {"answer": "c"}
    record = ev.from_sparbench(select, "x")  # multiple choice by task, as SPAR-Bench's scorer decides
    assert (record["format_type"], record["answer"]) == ("select", "C")
    assert record["prompt"] == select["question"] + "\n\nAnswer with the option's letter from the given choices directly."
    fill = ev.from_sparbench({k: v for k, v in SPAR_ROWS[0].items() if k != "format_type"}, "x")
    assert fill["prompt"] == SPAR_ROWS[0]["question"] + "\nPlease answer the question using a single word or phrase."
    position = ev.from_sparbench({**SPAR_ROWS[1], "task": "position_matching"}, "x")
    assert "normalized to a 0-1000 scale" in position["prompt"].split("\n")[-2]
    with pytest.raises(ValueError, match="^x: field 'id'"):
        ev.from_sparbench({k: v for k, v in SPAR_ROWS[0].items() if k != "id"}, "x")


def test_unknown_layout_is_one_line_naming_the_file(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"qid": 1, "text": "?"}])
    with pytest.raises(ValueError, match=f"^{path}:1: not a question of a known layout .*fields: qid, text$"):
        ev.load_questions(path)
    log = write_jsonl(tmp_path / "log.jsonl", [{"doc_id": 0, "filtered_resps": ["B"]}])
    with pytest.raises(ValueError, match=f"^{log}:1: no SPAR-Bench or VSI-Bench question logged"):
        ev.run(ev.EvalConfig(predictions=log))


def test_parse_args():
    cfg = cli("--predictions=p.jsonl", "--data=d", "--batch_size=4")
    assert (cfg.predictions, cfg.data, cfg.batch_size, cfg.split) == ("p.jsonl", "d", 4, "val")
    # not --key=value of a known key with a value of its type: refused while parsing
    for bad in [["--predictions", "p.jsonl"], ["--predictions=p", "--nope=1"], ["--predictions=p", "--batch_size=x"]]:
        with pytest.raises(SystemExit):
            cli(*bad)
    # well-formed but meaningless: refused before any file is read (the data folder "d" does not exist)
    for bad in [["--predictions=p", "--ckpt=c"], ["--data=d"], ["--predictions=p", "--batch_size=0"],
                ["--predictions=p", "--res=-1"], ["--predictions=p", "--split=test"]]:
        with pytest.raises(ValueError, match="^(give exactly one|need --batch_size)"):
            ev.run(cli(*bad))


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        cli("--help")
    out = capsys.readouterr().out
    assert done.value.code in (0, None)
    assert all(f"--{field.name}=" in out for field in fields(ev.EvalConfig))


# -----------------------------------------------------------------------------
# Paired bootstrap, the ablation table and the gates table

def test_paired_bootstrap_matches_the_normal_approximation():
    import numpy as np
    d = np.random.default_rng(1).normal(0.3, 1.0, 2000)
    mean, lo, hi = ev.paired_bootstrap(d)
    half = 1.96 * d.std() / np.sqrt(len(d))
    assert mean == pytest.approx(d.mean()) and lo == pytest.approx(d.mean() - half, abs=0.01)
    assert hi == pytest.approx(d.mean() + half, abs=0.01)
    assert ev.paired_bootstrap([2.0] * 5) == (2.0, 2.0, 2.0)  # no spread, no interval
    # strata: the mean over strata, not over items (task "a" has 3 items, "b" 1)
    assert ev.paired_bootstrap([1, 1, 1, 0], strata=["a", "a", "a", "b"])[0] == 0.5
    assert ev.paired_bootstrap(d, seed=3) == ev.paired_bootstrap(d, seed=3)


def fake_result(scores, tasks, chance=None):
    """What evaluate() keeps per question, for ablation() and chance_gate()."""
    ids = [f"q{i}" for i in range(len(scores))]
    by_task = {}
    for t, s in zip(tasks, scores):
        by_task.setdefault(t, []).append(s)
    overall = 100 * sum(sum(v) / len(v) for v in by_task.values()) / len(by_task)
    return {"scores": dict(zip(ids, scores)), "tasks_of": dict(zip(ids, tasks)), "model": {"overall": overall},
            "chance_frequency_scores": dict(zip(ids, chance)) if chance else None}


def test_ablation_table_averages_seeds_per_question_then_compares_with_the_first_arm():
    tasks = ["room_size_estimation", "room_size_estimation", "object_counting", "object_counting"]
    base = [fake_result([0, 0, 1, 0], tasks), fake_result([0, 0, 1, 0], tasks)]
    better = [fake_result([1, 1, 1, 0], tasks), fake_result([1, 0, 1, 0], tasks)]
    text = ev.ablation({"baseline": base, "oracle": better})
    row = next(line for line in text.splitlines() if line.startswith("| oracle |"))
    cells = row.strip("| ").split(" | ")
    assert cells[:4] == ["oracle", "2", "75.00, 50.00", "62.50"]
    # per question over seeds: room size (1, 0.5) vs (0, 0): +0.75 on that task, 0 on counting -> +37.50 overall
    assert cells[4].startswith("+37.50 [") and cells[5] == "75.00" and cells[6].startswith("+75.00 [")
    assert "- oracle vs baseline: overall +37.50" in text


def test_chance_gate_and_gates_table(tmp_path):
    result = fake_result([1, 1, 0, 1], ["a", "a", "b", "b"], chance=[0, 0, 0, 1])
    row = ev.chance_gate(result)
    assert row["diff"] == pytest.approx(50.0) and row["model"] == pytest.approx(75.0) and row["baseline"] == pytest.approx(25.0)
    metrics = tmp_path / "metrics.jsonl"
    gate = {"gate": "geo: rotation L1", "model": 0.1, "baseline": 0.3, "baseline_name": "identity pose",
            "diff": -0.2, "lo": -0.25, "hi": -0.15, "n": 8, "pass": True}
    lines = [{"step": 5, "split": "gates", "gates": [dict(gate, model=9.0)]}, {"step": 10, "split": "train", "loss": 1.0},
             {"step": 10, "split": "gates", "gates": [gate, dict(gate, gate="geo: translation L1", hi=0.1, **{"pass": False})]}]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\n")
    table = ev.gates_table([("geo", str(metrics)), ("vlm", str(empty))]).splitlines()
    assert table[2] == "| geo | geo: rotation L1 | 0.1000 | identity pose 0.3000 | -0.2000 [-0.2500, -0.1500] | PASS |"
    assert table[3].startswith("| geo | geo: translation L1 |") and table[3].endswith("| FAIL |")
    assert table[4] == "| vlm | no gate measured | | | | FAIL |"


def test_ablation_of_an_old_eval_json_names_the_file_and_field(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"model": {"overall": 50.0}}))  # written before per-question scores were kept
    with pytest.raises(ValueError, match=r"old.json: field 'scores' is missing"):
        ev.run(cli(f"--ablation=a={old},b={old}"))


# -----------------------------------------------------------------------------
# Hostile inputs (issue 12): each is one line naming the file (and line, and field), or a noted score of 0

def test_unknown_task_names_file_line_and_the_known_tasks(tmp_path, capsys):
    val = [question("c1", "object_counting", "4"), dict(question("c2", "object_counting", "4"), task="object_cuonting")]
    with pytest.raises(ValueError) as err:
        score_file(tmp_path, capsys, val, [{"id": "c1", "prediction": "4"}])
    message = str(err.value)   # it would count in `overall` but appear in no table
    assert message.startswith(f"{tmp_path / 'qa_val.jsonl'}:2: field 'task': unknown task 'object_cuonting'")
    assert "object_counting" in message and "room_size_estimation" in message and "\n" not in message


def test_fill_answer_without_a_number_names_file_line_and_field(tmp_path, capsys):
    val = [question("c1", "object_counting", "4"), question("c2", "object_counting", "four")]
    with pytest.raises(ValueError, match=f"^{tmp_path / 'qa_val.jsonl'}:2: field 'answer': no number in 'four'$"):
        score_file(tmp_path, capsys, val, [])


def test_empty_split_is_an_error_naming_the_file(tmp_path, capsys):
    with pytest.raises(ValueError, match=f"^{tmp_path / 'qa_val.jsonl'}: no questions to score$"):
        score_file(tmp_path, capsys, [], [])


@pytest.mark.parametrize("option", ["--predictions={}", "--compare=a={}"])
def test_a_path_that_is_a_directory_is_one_line_naming_it(tmp_path, option):
    import subprocess
    import sys
    data_dir(tmp_path, [question("c1", "object_counting", "4")])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "eval.py", option.format(tmp_path), f"--data={tmp_path}"], cwd=root,
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.startswith(f"eval.py: {tmp_path}: ") and run.stderr.count("\n") == 1


def test_compare_of_a_json_without_model_names_the_file_and_field(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"counts": {}, "n_questions": 0}))
    with pytest.raises(ValueError, match=f"^{path}: field 'model' is missing"):
        ev.run(cli(f"--compare=a={path}"))


def test_a_number_too_long_to_convert_scores_zero_and_is_noted(tmp_path, capsys):
    # Python refuses to turn a string of more than 4300 digits into an int (sys.get_int_max_str_digits)
    val = [question("d1", "depth_prediction_oc", "2.0"), question("d2", "depth_prediction_oc", "4.0")]
    preds = [{"id": "d1", "prediction": "1" * 5000}, {"id": "d2", "prediction": "4"}]
    result, out = score_file(tmp_path, capsys, val, preds)
    assert result["scores"] == {"d1": 0.0, "d2": 1.0} and result["unreadable"] == ["d1"]
    assert "note: 1 of 2 predictions hold a number too long to read (first: 'd1'); they score 0" in out
    assert out.rstrip("\n").splitlines()[-1] == "overall: 50.00"


@pytest.mark.parametrize("option", ["compare", "ablation", "gates"])
@pytest.mark.parametrize("bad", ["\ud800", b"\xff"])   # a lone surrogate is valid JSON, but no character
def test_eval_json_that_is_not_utf8_names_file_and_line(tmp_path, capsys, option, bad):
    val, preds = synthetic_split()
    result, _ = score_file(tmp_path, capsys, val, preds)
    text = json.dumps({**result, "config": {"data": "@"}}, indent=1)
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode().replace(b"@", bad if isinstance(bad, bytes) else json.dumps(bad)[1:-1].encode()))
    line = text[:text.index("@")].count("\n") + 1
    with pytest.raises(ValueError) as err:
        ev.run(cli(f"--{option}=a={path}"))
    assert str(err.value).startswith(f"{path}:{line}: not UTF-8") and "\n" not in str(err.value)
