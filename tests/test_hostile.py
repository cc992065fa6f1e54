"""Hostile input and faults against train.py and the readers in data.py: each attack either gets a one-line error
naming the file and the field (or the flag), or the correct result -- and nothing on disk is lost. One table per
kind of attack; eval.py's and speedrun.sh's attacks are tested in test_eval.py and test_speedrun.py."""
import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import generate_spar as g
import train
from test_train import wait_for_a_logged_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset=tiny", "--device=cpu", "--steps=2", "--batch_size=2", "--warmup=1", "--log_every=1",
        "--eval_every=0", "--save_every=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    g.generate(g.GenConfig(out=str(out), scenes=3, val_scenes=1, views=6, random_views=2, res=32, qa_per_task=1,
                           vocab_size=300))
    return str(out)


@pytest.fixture(scope="module")
def geo_ckpt(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("geo"))
    train.main(["--stage=geo", f"--data={data_dir}", f"--out={out}"] + TINY)
    return out


def refused(args):
    """train.main(args) must exit with one line; -> that line."""
    with pytest.raises(SystemExit) as error:
        train.main(args)
    message = str(error.value.code)
    assert "\n" not in message
    return message


def copy(folder, tmp_path, name="copy"):
    return shutil.copytree(folder, str(tmp_path / name))


# ----------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("flag, expected", [
    ("--resume=ture", "--resume: expected true or false, got 'ture'"),
    ("--steps=", "--steps: expected int, got nothing"),
    ("--num_views=0", "--num_views must be at least 1"),
    ("--steps", "--steps: expected int, got nothing"),
    ("--device=tpu", "--device=tpu: not available"),
])
def test_bad_flags_are_refused_in_one_line(data_dir, tmp_path, flag, expected):
    assert expected in refused(["--stage=geo", f"--data={data_dir}", f"--out={tmp_path / 'o'}"] + TINY + [flag])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(data_dir, tmp_path):
    assert "--device=cuda: not available" in refused(["--stage=geo", f"--data={data_dir}", "--device=cuda"])


def test_bools_parse_strictly_both_ways():
    for text, value in [("true", True), ("1", True), ("yes", True), ("false", False), ("0", False), ("no", False)]:
        assert g.parse_args([f"--resume={text}"], train.TrainConfig()).resume is value
    assert g.parse_args(["--resume"], train.TrainConfig()).resume is True


@pytest.mark.parametrize("flag", ["out", "data"])
def test_out_or_data_that_is_a_file_is_refused(data_dir, tmp_path, flag):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    args = {"out": f"--out={tmp_path / 'o'}", "data": f"--data={data_dir}"} | {flag: f"--{flag}={path}"}
    message = refused(["--stage=geo", *args.values()] + TINY)
    assert f"--{flag}={path}: {path} is a file, not a folder" in message
    assert path.read_text() == "not a folder"


# ----------------------------------------------------------------------------- data loss

def test_an_incomplete_data_set_is_an_error_and_untouched(data_dir, tmp_path):
    folder = copy(data_dir, tmp_path)
    os.remove(os.path.join(folder, "tokenizer.json"))  # what --vocab_size=0 makes
    before = {name: open(os.path.join(folder, name), "rb").read() for name in ("qa_train.jsonl", "qa_val.jsonl")}
    out = str(tmp_path / "g")
    train.main(["--stage=geo", f"--data={folder}", f"--out={out}"] + TINY)  # geo needs no tokenizer: it trains
    assert {name: open(os.path.join(folder, name), "rb").read() for name in before} == before
    assert not os.path.exists(os.path.join(folder, "tokenizer.json"))  # nothing was generated into the folder
    message = refused(["--stage=vlm", f"--data={folder}", f"--out={tmp_path / 'v'}", "--spa3r=none",
                       f"--init_geo={out}"] + TINY)
    assert f"{folder}: incomplete data set: tokenizer.json missing" in message and "generate_spar.py" in message
    shutil.rmtree(os.path.join(folder, "scenes"))
    assert "scenes missing" in refused(["--stage=geo", f"--data={folder}", f"--out={tmp_path / 'g2'}"] + TINY)


def test_a_finished_checkpoint_is_not_overwritten_without_resume_or_overwrite(geo_ckpt, data_dir, tmp_path):
    folder = copy(geo_ckpt, tmp_path)
    before = open(os.path.join(folder, "model.safetensors"), "rb").read()
    message = refused(["--stage=geo", f"--data={data_dir}", f"--out={folder}"] + TINY)
    assert f"{folder}: holds a checkpoint; --resume continues a checkpoint, --overwrite starts over" in message
    assert open(os.path.join(folder, "model.safetensors"), "rb").read() == before
    train.main(["--stage=geo", f"--data={data_dir}", f"--out={folder}", "--overwrite", "--seed=1"] + TINY)
    assert open(os.path.join(folder, "model.safetensors"), "rb").read() != before  # started over, as asked


def test_a_model_without_train_state_is_not_overwritten(geo_ckpt, data_dir, tmp_path):
    folder = str(tmp_path / "m")
    os.makedirs(folder)
    for name in ("model.safetensors", "config.json"):  # a model someone copied in, no train_state.json
        shutil.copy(os.path.join(geo_ckpt, name), folder)
    before = open(os.path.join(folder, "model.safetensors"), "rb").read()
    for resume in ([], ["--resume"]):
        message = refused(["--stage=geo", f"--data={data_dir}", f"--out={folder}"] + TINY + resume)
        assert "holds a model but no train_state.json" in message
    assert open(os.path.join(folder, "model.safetensors"), "rb").read() == before


def test_a_failing_validation_loses_no_checkpoint(data_dir, tmp_path, monkeypatch):
    def broken(stage, cfg, run):
        raise ValueError("a gate failed")
    monkeypatch.setattr(train, "stage_gates", broken)
    out = str(tmp_path / "g")
    assert "a gate failed" in refused(["--stage=geo", f"--data={data_dir}", f"--out={out}"] + TINY + ["--eval_every=2"])
    assert json.load(open(os.path.join(out, "train_state.json")))["step"] == 2  # saved before validating


def test_a_gate_with_nothing_to_compare_does_not_pass_or_crash():
    row = train.gate_row("vlm: answer CE", torch.zeros(0), torch.zeros(0), "another scene's latent")
    assert row["n"] == 0 and not row["pass"] and math.isnan(row["diff"])


def test_a_lock_that_is_a_folder_is_one_line(data_dir, tmp_path):
    (tmp_path / "g" / "train.lock").mkdir(parents=True)
    assert "train.lock: not a lock file" in refused(["--stage=geo", f"--data={data_dir}", f"--out={tmp_path / 'g'}"] + TINY)


def test_resume_with_a_corrupt_metrics_line_drops_it(geo_ckpt, data_dir, tmp_path):
    folder = copy(geo_ckpt, tmp_path)
    with open(os.path.join(folder, "metrics.jsonl"), "ab") as f:
        f.write(b"\xff\xfe not a record\n")
    train.main(["--stage=geo", f"--data={data_dir}", f"--out={folder}", "--resume"] + TINY + ["--steps=3"])
    steps = [r["step"] for r in map(json.loads, open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8"))]
    assert steps == [1, 2, 3]


def test_out_below_a_file_is_refused(data_dir, tmp_path):
    (tmp_path / "a_file").write_text("x")
    for args in (["--stage=geo", f"--out={tmp_path / 'a_file' / 'sub'}"], [f"--out={tmp_path / 'a_file'}"]):
        assert "is a file, not a folder" in refused([f"--data={data_dir}"] + TINY + args)


def test_generating_into_a_folder_with_data_is_refused(data_dir, tmp_path):
    folder = copy(data_dir, tmp_path)
    before = sorted(os.listdir(os.path.join(folder, "scenes")))
    with pytest.raises(SystemExit, match="is not empty"):
        g.generate(g.GenConfig(out=folder, scenes=1, val_scenes=1, views=6, random_views=2, res=16))
    assert sorted(os.listdir(os.path.join(folder, "scenes"))) == before


def test_a_second_process_on_the_same_out_is_refused_and_a_stale_lock_taken_over(data_dir, tmp_path):
    out = tmp_path / "g"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "train.lock").write_text(f"{socket.gethostname()} {sleeper.pid}")  # a live owner
        message = refused(["--stage=geo", f"--data={data_dir}", f"--out={out}"] + TINY)
        assert f"another train.py ({socket.gethostname()} {sleeper.pid}) is training into it" in message
        assert not (out / "train_state.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    train.main(["--stage=geo", f"--data={data_dir}", f"--out={out}"] + TINY)  # its owner is gone: taken over
    assert (out / "train_state.json").exists() and not (out / "train.lock").exists()


def test_nan_weights_are_never_committed(geo_ckpt, data_dir, tmp_path):
    folder = copy(geo_ckpt, tmp_path)
    checkpoint = ("model.safetensors", "state.safetensors", "train_state.json", "config.json")
    before = {name: open(os.path.join(folder, name), "rb").read() for name in checkpoint}
    message = refused(["--stage=geo", f"--data={data_dir}", f"--out={folder}", "--resume", "--lr=nan"]
                      + TINY + ["--steps=4", "--save_every=1", "--log_every=10"])
    assert "geo step 3:" in message and "is not finite; not saved" in message
    assert json.load(open(os.path.join(folder, "train_state.json")))["step"] == 2
    assert {name: open(os.path.join(folder, name), "rb").read() for name in before} == before
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(folder, "model.safetensors")).values())


def test_a_non_finite_loss_names_its_step_and_batch():
    log = train.Log("", rank=1, start=0, device=torch.device("cpu"))  # not rank 0: writes nothing
    log.add(torch.tensor(1.0), {}, 2, step=4, batch={"scene": ["scene00001", "scene00002"]})
    log.add(torch.tensor(math.inf), {}, 2, step=5, batch={"ids": ["q7", "q8"]})
    with pytest.raises(ValueError, match=r"geo: the loss is not finite at step 6 \(batch: q7, q8\)"):
        log.check_finite("geo", world=1)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    out = str(tmp_path)

    def write(text):
        def files(folder):
            for name in ("model.safetensors", "train_state.json"):
                with open(os.path.join(folder, name), "w") as f:
                    f.write(text)
                if text == "new" and name == "train_state.json":
                    raise OSError(errno.ENOSPC, "No space left on device")
        return files

    train.save_checkpoint(out, write("old"))
    with pytest.raises(ValueError, match="no space left while writing train_state.json; the previous checkpoint is intact"):
        train.save_checkpoint(out, write("new"))
    assert sorted(os.listdir(out)) == ["model.safetensors", "train_state.json"]
    assert all(open(os.path.join(out, n)).read() == "old" for n in os.listdir(out))


def test_disk_full_reported_by_safetensors_is_named_too(tmp_path):
    def files(folder):
        open(os.path.join(folder, "model.safetensors"), "w").write("half")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                           "\"No space left on device\" })")  # what safetensors raises
    with pytest.raises(ValueError, match="no space left while writing model.safetensors; the previous checkpoint"):
        train.save_checkpoint(str(tmp_path), files)
    assert os.listdir(tmp_path) == []


def test_sigterm_to_the_process_group_with_workers_saves(data_dir, tmp_path):
    out = str(tmp_path / "g")
    args = [sys.executable, "train.py", "--stage=geo", f"--data={data_dir}", f"--out={out}", "--preset=tiny",
            "--device=cpu", "--steps=100000", "--batch_size=2", "--log_every=3", "--save_every=100000",
            "--eval_every=0", "--workers=2"]
    process = subprocess.Popen(args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    wait_for_a_logged_step(out)
    os.killpg(process.pid, signal.SIGTERM)  # what SLURM and torchrun send: the whole group, workers included
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1 and "stopped by SIGTERM at geo step" in stderr, stderr[-2000:]
    step = json.load(open(os.path.join(out, "train_state.json")))["step"]  # one process: the very next step
    assert json.loads(open(metrics).read().splitlines()[-1])["step"] <= step < 100000
    train.load_geo(out)


def test_a_bad_record_met_by_a_worker_is_one_line_and_the_run_ends(data_dir, tmp_path):
    """A record whose scene file is gone, met by a DataLoader worker mid-training: one line naming it, and the
    process exits (the workers ignore SIGTERM, so the exit's terminate-and-join once waited forever)."""
    broken = copy(data_dir, tmp_path)
    first_scene = json.loads(open(os.path.join(broken, "qa_train.jsonl")).readline())["scene"]
    os.remove(os.path.join(broken, "scenes", first_scene + ".safetensors"))
    args = [sys.executable, "train.py", "--stage=vlm", "--spa3r=none", "--init_geo=none", f"--data={broken}",
            f"--out={tmp_path / 'v'}", "--device=cpu", "--steps=50", "--batch_size=4", "--workers=2", "--eval_every=0"]
    result = subprocess.run(args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=120, start_new_session=True)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert last.startswith("train.py: ") and f"{first_scene}.safetensors: scene file not found" in last


STOPPED_AFTER_SECOND_SAVE = """
import os, sys
import train
real, saves = train.save_checkpoint, []
def save_then_die(out, write_files):
    real(out, write_files)
    saves.append(out)
    if len(saves) == 2:
        os._exit(9)  # a kill between log steps: the window since the last log line is in the checkpoint only
train.save_checkpoint = save_then_die
train.main(sys.argv[1:])
"""


def test_the_logged_curve_is_exact_when_saves_fall_between_log_steps(data_dir, tmp_path):
    def run(out, *extra, script=None):
        args = ["--stage=geo", f"--data={data_dir}", f"--out={out}"] + TINY + ["--steps=6", "--log_every=3", "--save_every=2"]
        launcher = ["-c", script] if script else ["train.py"]
        return subprocess.run([sys.executable] + launcher + args + list(extra), cwd=REPO, capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)

    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    assert run(whole).returncode == 0
    assert run(cut, script=STOPPED_AFTER_SECOND_SAVE).returncode == 9
    assert json.load(open(os.path.join(cut, "train_state.json")))["step"] == 4
    assert run(cut, "--resume").returncode == 0

    def logged(folder):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(folder, "metrics.jsonl")))]
    assert [step for step, _ in logged(whole)] == [3, 6]
    assert logged(cut) == logged(whole)  # step 6's line covers steps 4-6, 4 from before the kill


SIGTERM_AT_STEP_4 = """
import sys
import train
real = train.train_step
def train_step(stage, runner, optimizer, micro, step, *rest):
    result = real(stage, runner, optimizer, micro, step, *rest)
    if step == 3:  # step 4 is done: not a log step (log_every=3)
        train.SIGTERM["received"] = True
    return result
train.train_step = train_step
train.main(sys.argv[1:])
"""


def test_sigterm_between_log_steps_keeps_the_logged_curve_exact(data_dir, tmp_path):
    args = ["--stage=geo", f"--data={data_dir}"] + TINY + ["--steps=6", "--log_every=3", "--save_every=100"]

    def run(out, *extra, script=None):
        launcher = ["-c", script] if script else ["train.py"]
        return subprocess.run([sys.executable] + launcher + args + [f"--out={out}", *extra], cwd=REPO,
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    assert run(whole).returncode == 0
    stopped = run(cut, script=SIGTERM_AT_STEP_4)
    assert stopped.returncode == 1 and "stopped by SIGTERM at geo step 4" in stopped.stderr
    assert run(cut, "--resume").returncode == 0
    def logged(folder):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(folder, "metrics.jsonl")))]
    assert logged(cut) == logged(whole)
    assert load_file(os.path.join(cut, "model.safetensors")).keys() == load_file(os.path.join(whole, "model.safetensors")).keys()


def test_an_explicit_vocab_size_is_kept_and_a_changed_model_refused_on_resume(geo_ckpt, data_dir, tmp_path):
    cfg, models = train.stage_config(["--lm.vocab_size=2048"], "vlm", "tiny", all_stages=False)
    assert models["lm"].vocab_size == 2048
    assert train.stage_config([], "vlm", "tiny", all_stages=False)[1]["lm"].vocab_size is None  # the tokenizer's
    folder = copy(geo_ckpt, tmp_path)
    message = refused(["--stage=geo", f"--data={data_dir}", f"--out={folder}", "--resume", "--geo.vit_depth=3"] + TINY)
    assert "config.json: the model config differs from this run's" in message


# ----------------------------------------------------------------------------- init checkpoints

@pytest.mark.parametrize("value, expected", [("64", "GeoConfig.dim must be int, got '64'"),
                                             (0, "GeoConfig.dim must be at least 1, got 0"),
                                             (True, "GeoConfig.dim must be int, got True")])
def test_init_config_with_a_wrong_value_names_file_and_field(geo_ckpt, data_dir, tmp_path, value, expected):
    folder = copy(geo_ckpt, tmp_path)
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    json.dump({**config, "dim": value}, open(path, "w"))
    message = refused(["--stage=psfm", f"--data={data_dir}", f"--out={tmp_path / 'p'}", f"--init_geo={folder}"] + TINY)
    assert path in message and expected in message


@pytest.mark.parametrize("config, expected", [([1], "not a usable config"),
                                              ({"geo": {}, "psfm": 5}, "not a usable config"),
                                              ({"geo": {"mlp_ratio": math.nan}, "psfm": {}}, "mlp_ratio must be a finite"),
                                              ({"geo": {"num_registers": -1}, "psfm": {}}, "num_registers must be a finite")])
def test_a_psfm_config_of_the_wrong_shape_is_one_line(config, expected, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        train.load_psfm(str(tmp_path))
    assert str(error.value).startswith(str(tmp_path / "config.json")) and expected in str(error.value)


def test_eval_refuses_a_misspelt_task(data_dir):
    import eval as ev
    with pytest.raises(ValueError, match="--tasks: unknown task 'depth_predicton_oc_mv'"):
        ev.run(g.parse_args([f"--data={data_dir}", "--predictions=x.jsonl", "--tasks=depth_prediction_oc,depth_predicton_oc_mv"],
                            ev.EvalConfig()))


# ----------------------------------------------------------------------------- scenes

def scene_files(data_dir, tmp_path):
    folder = copy(data_dir, tmp_path)
    return folder, os.path.join(folder, "scenes", "scene00000")


def edit_json(path, change):
    meta = json.load(open(path))
    json.dump(change(meta), open(path, "w"))


def edit_tensor(path, key, change):
    arrays = dict(g.read_safetensors(path))
    arrays[key] = change(arrays[key].copy())
    g.write_atomic(path, g.safetensors_bytes(arrays))


def scaled_rotation(pose):
    pose[1, :3, :3] *= 1.5
    return pose


def last_row(pose):
    pose[2, 3] = [0, 0, 1, 1]
    return pose


def wrong_object(meta):
    del meta["objects"][0]["category"]
    return meta


SCENE_ATTACKS = {  # name: (file it corrupts, how, the words the error must hold)
    "scene json is a list": ("json", lambda p: json.dump([1, 2], open(p, "w")), "a list"),
    "split 'test'": ("json", lambda p: edit_json(p, lambda m: {**m, "split": "test"}), "field 'split' must be 'train' or 'val'"),
    "no room": ("json", lambda p: edit_json(p, lambda m: {k: v for k, v in m.items() if k != "room"}), "field 'room.size'"),
    "object without category": ("json", lambda p: edit_json(p, wrong_object), "field 'objects[0].category'"),
    "truncated scene json": ("json", lambda p: open(p, "r+").truncate(40), "not valid JSON"),
    "non-UTF-8 scene json": ("json", lambda p: open(p, "ab").write(b"\xff"), "not UTF-8"),
    "lone surrogate in scene json": ("json", lambda p: edit_json(p, lambda m: {**m, "room_name": "\ud800"}), "lone surrogate"),
    "instance id out of range": ("safetensors", lambda p: edit_tensor(p, "instance", lambda a: a + 100), "tensor 'instance'"),
    "scaled rotation": ("safetensors", lambda p: edit_tensor(p, "pose", scaled_rotation), "tensor 'pose' of view 1 is not a rigid"),
    "last row not 0 0 0 1": ("safetensors", lambda p: edit_tensor(p, "pose", last_row), "tensor 'pose' of view 2 is not a rigid"),
    "fewer images than cameras": ("safetensors", lambda p: edit_tensor(p, "rgb", lambda a: a[:1]), "has shape"),
}


SPLIT_LISTING_SEES = {"scene json is a list", "split 'test'", "truncated scene json", "non-UTF-8 scene json",
                      "lone surrogate in scene json"}


CAMERAS_ONLY_MISS = {"instance id out of range", "fewer images than cameras"}  # tensors the oracle never reads


@pytest.mark.parametrize("attack", SCENE_ATTACKS)
def test_a_corrupt_scene_is_one_line_naming_file_and_field(data_dir, tmp_path, attack):
    kind, corrupt, expected = SCENE_ATTACKS[attack]
    folder, base = scene_files(data_dir, tmp_path)
    corrupt(f"{base}.{kind}")
    question = json.loads(record(image=[1, 2]))
    reads = {"listing": lambda: data.scene_ids(folder, "train"), "whole scene": lambda: data.load_scene(base),
             "a question's frames": lambda: data.SceneStore(folder).frames("scene00000", [1, 2]),
             "the oracle arm": lambda: data.SceneStore(folder).oracle(question)}  # every way in
    for way, read in reads.items():
        if (way == "listing" and attack not in SPLIT_LISTING_SEES) or (way == "the oracle arm" and attack in CAMERAS_ONLY_MISS):
            continue  # listing a split reads each json's split only; the oracle reads json and poses only
        with pytest.raises(ValueError) as error:
            read()
        message = str(error.value)
        assert "\n" not in message and f"{base}.{kind}" in message and expected in message, message


# ----------------------------------------------------------------------------- QA records

def record(**changes):
    base = {"id": "q0", "scene": "scene00000", "task": "depth_prediction_oc", "level": "low", "format_type": "fill",
            "img_type": "single_view", "image": [0], "question": "How deep?", "answer": "2.30",
            "markers": [{"image": 0, "point": [500, 500], "color": "red"}]}
    return json.dumps({**base, **changes}, allow_nan=True)


def marker(**changes):
    return [{"image": 0, "point": [500, 500], "color": "red", **changes}]


QA_ATTACKS = {  # name: (the line, the words the error must hold)
    "bool image index": (record(image=[True]), "field 'image'"),
    "NaN marker point": (record(markers=marker(point=[math.nan, 10])), "field 'markers.point'"),
    "inf marker point": (record(markers=marker(point=[math.inf, 10])), "field 'markers.point'"),
    "marker point a string": (record(markers=marker(point="500,500")), "field 'markers.point'"),
    "marker point missing": (record(markers=[{"image": 0, "color": "red"}]), "field 'markers.point'"),
    "marker colour unknown": (record(markers=marker(color="mauve")), "field 'markers.color'"),
    "marker colour missing": (record(markers=[{"image": 0, "point": [1, 2]}]), "field 'markers.color'"),
    "marker colour a list": (record(markers=marker(color=[255, 0, 0])), "field 'markers.color'"),
    "bool marker image": (record(markers=marker(image=False)), "field 'markers.image'"),
    "absolute scene path": (record(scene="/etc/passwd"), "field 'scene'"),
    "scene outside the data folder": (record(scene="../../elsewhere/scene00000"), "field 'scene'"),
    "lone surrogate": (record(question="\ud800?"), "lone surrogate"),
    "marker point off the grid": (record(markers=marker(point=[5000, -300])), "field 'markers.point'"),
    "marker point a 400-digit number": (record(markers=marker(point=[10 ** 400, 3])), "field 'markers.point'"),
    "a 5000-digit number": (record().replace('"low"', "9" * 5000), "not usable JSON"),
}


@pytest.mark.parametrize("attack", QA_ATTACKS)
def test_a_bad_qa_line_is_one_line_naming_file_line_and_field(tmp_path, attack):
    line, expected = QA_ATTACKS[attack]
    path = tmp_path / "qa.jsonl"
    path.write_text(record(id="fine") + "\n" + line + "\n")
    with pytest.raises(ValueError) as error:
        data.load_qa_jsonl(str(path))
    assert str(error.value).startswith(f"{path}:2: ") and expected in str(error.value), str(error.value)


def test_non_utf8_bytes_in_a_jsonl_name_the_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(record(id="fine").encode() + b"\n" + record().encode()[:-2] + b"\xff\"}\n")
    with pytest.raises(ValueError, match=f"{path}:2: not UTF-8"):
        data.load_qa_jsonl(str(path))
