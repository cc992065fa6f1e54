"""Tests for speedrun.sh: the whole chain at its smallest size, and a report that says what the scores say."""

import json
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_speedrun_test_size_writes_a_consistent_report(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(["bash", os.path.join(ROOT, "speedrun.sh"), "--size=test", f"--out={out}"], check=True,
                   capture_output=True, env=env, cwd=ROOT, timeout=600)
    report = (out / "report.md").read_text()
    val = [json.loads(line) for line in open(out / "data" / "qa_val.jsonl")]
    results = {name: json.load(open(out / f"{name}.json")) for name in ("eval_vlm", "eval_vlm_none")}
    for result in results.values():
        assert result["n_questions"] == len(val) and result["n_missing"] == 0
    # the table's overall row carries exactly the two systems' and the baselines' overall scores
    row = next(line for line in report.splitlines() if line.startswith("| **overall** |"))
    cells = [float(c) for c in re.findall(r"\d+\.\d\d", row)]
    first = results["eval_vlm"]
    expected = [results["eval_vlm"]["model"]["overall"], results["eval_vlm_none"]["model"]["overall"],
                first["chance_uniform"]["overall"], first["chance_frequency"]["overall"]]
    assert cells == [round(v, 2) for v in expected]
    gain = expected[0] - expected[1]
    assert ("does NOT beat" in report) == (gain <= 0)
    # every task of the held-out questions has a row, and every stage left its last logged line
    for task in {r["task"] for r in val}:
        assert f"| {task} |" in report
    for stage in ("geo", "psfm", "vlm", "vlm_none"):
        assert re.search(rf"- `{stage}`: {stage.split('_')[0]} step 15/15 \| loss \d", report), stage
