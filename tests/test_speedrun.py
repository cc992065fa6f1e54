"""Tests for speedrun.sh: the whole chain at its smallest size, and a report that says what the scores say."""

import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_speedrun_test_size_writes_a_consistent_report(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(["bash", os.path.join(ROOT, "speedrun.sh"), "--size=test", f"--out={out}"], check=True,
                   capture_output=True, env=env, cwd=ROOT, timeout=600)
    report = (out / "report.md").read_text()
    val = [json.loads(line) for line in open(out / "data" / "qa_val.jsonl")]
    arms = {"baseline": "none", "Spa3-VLM": "psfm", "random Spa3R": "random", "oracle": "oracle"}
    results = {name: json.load(open(out / f"vlm_{arm}_s0" / "eval.json")) for name, arm in arms.items()}
    for result in results.values():
        assert result["n_questions"] == len(val) and result["n_missing"] == 0
    # the ablation table carries each arm's overall score, the baseline first
    ablation, pretraining = report.split("## The ablation")[1].split("## PSFM pretraining")
    rows = [line for line in ablation.splitlines() if re.match(r"\| (baseline|Spa3-VLM|random Spa3R|oracle) \| 1 \|", line)]
    assert [row.split(" | ")[0][2:] for row in rows] == list(arms)
    for row, result in zip(rows, results.values()):
        assert float(row.split(" | ")[3]) == round(result["model"]["overall"], 2)
    # the control table compares Spa3-VLM with the untrained encoder, not with the baseline
    assert "| random Spa3R | 1 |" in pretraining and "- Spa3-VLM vs random Spa3R: overall" in pretraining
    # every stage and every VLM run has gate rows with a verdict (the VLMs: images or latent, and score vs chance)
    gates = [line for line in report.splitlines() if line.endswith(("| PASS |", "| FAIL |"))]
    for run, count in (("geo", 4), ("psfm", 8), ("baseline seed 0", 2), ("Spa3-VLM seed 0", 2), ("random Spa3R seed 0", 1),
                       ("oracle seed 0", 2)):
        assert sum(line.startswith(f"| {run} |") for line in gates) == count, run
    assert "no gate measured" not in report
    # every task of the held-out questions has a row in the per-task table
    for task in {r["task"] for r in val}:
        assert f"| {task} |" in report


# The tests below check speedrun.sh's own logic in seconds: a stand-in `python` first on PATH logs every call
# (its directory and arguments) and does no work beyond making the folders and the file the script looks for.
FAKE_PYTHON = """#!{python}
import json, os, sys
with open(os.environ["FAKE_PYTHON_LOG"], "a") as log:
    log.write(json.dumps([os.getcwd()] + sys.argv[1:]) + "\\n")
for arg in sys.argv[2:]:
    if arg.startswith("--out="):
        os.makedirs(arg[len("--out="):], exist_ok=True)
        if sys.argv[1] == "generate_spar.py":
            open(os.path.join(arg[len("--out="):], "qa_val.jsonl"), "w").close()
"""


def fake_speedrun(tmp_path, *args, cwd=ROOT):
    """Run speedrun.sh with the stand-in python; returns (the completed process, the python calls it made)."""
    bin_dir, log = tmp_path / "fake_bin", tmp_path / "fake_python.log"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(FAKE_PYTHON.format(python=sys.executable))
    (bin_dir / "python").chmod(0o755)
    log.write_text("")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_PYTHON_LOG=str(log))
    env.pop("OUT", None), env.pop("SIZE", None)
    result = subprocess.run(["bash", os.path.join(ROOT, "speedrun.sh"), *args], capture_output=True, text=True,
                            env=env, cwd=cwd, timeout=60)
    return result, [json.loads(line) for line in log.read_text().splitlines()]


def test_speedrun_refuses_an_out_with_a_list_separator(tmp_path):
    # eval.py reads --gates/--ablation/--compare as NAME=path lists joined by ',' (seeds by '+'): a path that
    # holds one of them would be split wrongly, so speedrun.sh refuses it before any work
    for char in ",=+":
        out = tmp_path / f"my{char}run"
        result, calls = fake_speedrun(tmp_path, "--size=test", f"--out={out}")
        assert result.returncode == 2 and calls == [] and not out.exists(), char
        assert len(result.stderr.splitlines()) == 1 and char in result.stderr and str(out) in result.stderr
    # a relative --out is checked as the absolute path it becomes: here the caller's directory holds the comma
    caller = tmp_path / "a,b"
    caller.mkdir()
    result, calls = fake_speedrun(tmp_path, "--size=test", "--out=run", cwd=caller)
    assert result.returncode == 2 and calls == [] and str(caller / "run") in result.stderr


def test_speedrun_relative_out_is_relative_to_the_callers_directory(tmp_path):
    name = f"speedrun_relative_out_{os.getpid()}"  # unique: a wrong speedrun.sh would write it into ROOT
    try:
        result, calls = fake_speedrun(tmp_path, "--size=test", f"--out={name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / name / "report.md").exists() and not os.path.exists(os.path.join(ROOT, name))
        # every stage runs in the repository and is handed the absolute paths under the caller's directory
        assert all(call[0] == ROOT for call in calls)
        generate = [call for call in calls if call[1] == "generate_spar.py"]
        assert len(generate) == 1 and f"--out={tmp_path / name / 'data'}" in generate[0]
    finally:
        shutil.rmtree(os.path.join(ROOT, name), ignore_errors=True)


def test_speedrun_reuses_data_only_from_the_same_size(tmp_path):
    out = tmp_path / "run"
    result, calls = fake_speedrun(tmp_path, "--size=test", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert sum(call[1] == "generate_spar.py" for call in calls) == 1
    recorded = (out / "data.args").read_text().strip()
    assert "--scenes=6 " in recorded
    # the same size again: the data is reused, the stages run
    result, calls = fake_speedrun(tmp_path, "--size=test", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert not any(call[1] == "generate_spar.py" for call in calls) and any(call[1] == "train.py" for call in calls)
    # another size: refused before any work, one line naming the folder and both argument strings
    result, calls = fake_speedrun(tmp_path, "--size=cpu", f"--out={out}")
    assert result.returncode != 0 and calls == []
    assert len(result.stderr.splitlines()) == 1
    assert str(out / "data") in result.stderr and recorded in result.stderr and "--scenes=400 " in result.stderr
    # data without a record of its arguments (an older speedrun, or a generator that stopped half way): refused
    (out / "data.args").unlink()
    result, calls = fake_speedrun(tmp_path, "--size=test", f"--out={out}")
    assert result.returncode != 0 and calls == [] and str(out / "data") in result.stderr


def test_speedrun_data_seed_reaches_the_generator_and_the_report(tmp_path):
    out = tmp_path / "run"
    result, calls = fake_speedrun(tmp_path, "--size=test", f"--out={out}", "--data_seed=7")
    assert result.returncode == 0, result.stderr
    generate = [call for call in calls if call[1] == "generate_spar.py"]
    assert len(generate) == 1 and "--seed=7" in generate[0] and "--seed=0" not in generate[0]
    assert "Command: `bash speedrun.sh --size=test --data_seed=7`" in (out / "report.md").read_text()
    # the data of seed 7 is not taken for seed 0's: refused before any work, naming both argument strings
    result, calls = fake_speedrun(tmp_path, "--size=test", f"--out={out}")
    assert result.returncode != 0 and calls == [] and "--seed=7 " in result.stderr and "--seed=0 " in result.stderr
    # the default seed is 0 and says nothing in the command line; a seed that is not a number is one line
    result, calls = fake_speedrun(tmp_path, "--size=test", f"--out={tmp_path / 'default'}")
    assert any("--seed=0" in call for call in calls if call[1] == "generate_spar.py")
    assert "Command: `bash speedrun.sh --size=test`." in (tmp_path / "default" / "report.md").read_text()
    result, calls = fake_speedrun(tmp_path, "--size=test", "--data_seed=-1")
    assert result.returncode == 2 and calls == [] and len(result.stderr.splitlines()) == 1 and "-1" in result.stderr
