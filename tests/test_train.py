"""Tests for train.py: all three stages end to end on CPU, DDP (2 gloo processes) against one process, exact
resume after a SIGKILL in the middle of a checkpoint, bad checkpoints named by file and tensor, and the pieces
(schedule, sample stream, view masks, GPU table, CLI, checkpoint commit) against hand-worked values."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import generate_spar
import train
import vlm
from model import geo_loss, init_weights
from psfm import Spa3REncoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 steps of global batch 4 per stage; validation at the end on 6 held-out samples
COMMON = ["--device=cpu", "--steps=4", "--batch_size=4", "--warmup=2", "--log_every=1", "--eval_every=4",
          "--eval_samples=6", "--workers=0"]


def run(args, torchrun=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [])
    return subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(folder):
    return [(r["split"], r["step"], r["loss"]) for r in metrics(folder) if r["split"] != "gates"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    generate_spar.generate(generate_spar.GenConfig(out=str(out), scenes=4, val_scenes=2, views=6, random_views=2,
                                                   res=32, qa_per_task=1, vocab_size=320))
    return str(out)


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """All three stages in one process, micro-batch 4: out/geo, out/psfm, out/vlm."""
    out = str(tmp_path_factory.mktemp("single"))
    check(run(["train.py", f"--data={data_dir}", f"--out={out}"] + COMMON))
    return out


@pytest.fixture(scope="module")
def ddp(data_dir, tmp_path_factory):
    """The same under torchrun with 2 gloo processes, micro-batch 1: 2 accumulation steps per rank."""
    out = str(tmp_path_factory.mktemp("ddp"))
    result = check(run(["train.py", f"--data={data_dir}", f"--out={out}", "--micro_batch=1"] + COMMON, torchrun=True))
    return out, result.stdout


# ----------------------------------------------------------------------------- end to end

def test_all_three_stages_write_loadable_checkpoints(single, data_dir):
    geo_state = train.load_geo(os.path.join(single, "geo")).state_dict()
    psfm_state = train.load_psfm(os.path.join(single, "psfm")).state_dict()
    for name, value in geo_state.items():  # psfm trained on the geo checkpoint, frozen
        assert torch.equal(psfm_state["backbone." + name], value)
    model = vlm.load_for_eval(os.path.join(single, "vlm"), "cpu")
    vlm_state = model.state_dict()
    for name, value in psfm_state.items():  # and the VLM kept that Spa3R, frozen
        assert torch.equal(vlm_state["spa3r." + name], value)
    dataset = train.data.QADataset(data_dir, "val", res=32)
    answers = model.answer([dataset[0]["record"], dataset[1]["record"]], [dataset[0]["images"], dataset[1]["images"]])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    for stage in train.STAGES:
        folder = os.path.join(single, stage)
        assert json.load(open(os.path.join(folder, "train_state.json")))["step"] == 4
        rows = metrics(folder)
        assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
        assert [r["step"] for r in rows if r["split"] == "val"] == [4]
        assert all(math.isfinite(r["loss"]) for r in rows if r["split"] != "gates")
        gates = [r for r in rows if r["split"] == "gates"]  # logged with the validation, one row per gate
        assert [r["step"] for r in gates] == [4] and len(gates[0]["gates"]) == {"geo": 4, "psfm": 8, "vlm": 1}[stage]
        assert all(row["gate"] in open(os.path.join(folder, "log.txt")).read() for row in gates[0]["gates"])
        if stage == "psfm":  # the room's quantities first (views as PSFM draws them), then those of view pairs
            probed = [next(q for q in train.PROBES if f"R² {q} (" in row["gate"]) for row in gates[0]["gates"][3:]]
            assert probed == [train.PROBES[j] for j in train.ROOM_PROBES + train.PAIR_PROBES]
            assert probed[:2] == ["log floor area", "largest-object distance"]
        log = open(os.path.join(folder, "log.txt")).read()
        assert "samples/s" in log and "ETA" in log and "MFU" not in log  # no known peak on a CPU
    assert "tokens/s" in open(os.path.join(single, "vlm", "log.txt")).read()


def val_loss(folder):
    return [r["loss"] for r in metrics(folder) if r["split"] == "val"][-1]


def test_checkpoints_reproduce_the_validation_loss_logged_at_their_step(single, data_dir):
    """The 6 held-out samples (3 view sets of each of the 2 scenes), evaluated in one batch outside train.py."""
    backbone = train.load_geo(os.path.join(single, "geo"))
    views = train.data.SceneViewsDataset(data_dir, "val", num_views=4, res=32, seed=0, samples_per_scene=3,
                                         view_sampling="near")
    batch = train.to_device(train.data.collate_views([views[p] for p in range(6)]), torch.device("cpu"))
    with torch.no_grad():
        loss, _ = geo_loss(backbone(batch["images"]), batch)
    assert loss.item() == pytest.approx(val_loss(os.path.join(single, "geo")), rel=1e-5)

    model = vlm.load_for_eval(os.path.join(single, "vlm"), "cpu")
    questions = train.data.QADataset(data_dir, "val", res=32)
    batch = train.to_device(vlm.collate([questions[p] for p in range(6)], model.tokenizer, model.config), "cpu")
    with torch.no_grad():
        loss, _ = model(batch)  # the mean over all answer tokens, as train.py weights its micro-batches
    assert loss.item() == pytest.approx(val_loss(os.path.join(single, "vlm")), rel=1e-5)


def test_two_processes_match_one_process(single, ddp):
    out, stdout = ddp
    assert "global batch 4 = 2 x 1 x 2 accumulation" in stdout
    for stage in train.STAGES:
        one, two = metrics(os.path.join(single, stage)), metrics(os.path.join(out, stage))
        assert [(r["split"], r["step"]) for r in one] == [(r["split"], r["step"]) for r in two]
        for a, b in zip(one, two):
            if a["split"] == "gates":  # measured by rank 0 on the same weights
                assert [g["model"] for g in b["gates"]] == pytest.approx([g["model"] for g in a["gates"]], rel=1e-3)
            else:
                assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (stage, a["split"], a["step"])


KILLED_RUN = """
import os, signal, sys
import train

saves = 0
def write_checkpoint(*args):
    global saves
    saves += 1
    real(*args)
    if saves == 2:  # the second checkpoint: killed halfway through its state file, before the commit
        path = os.path.join(args[-1], "state.safetensors")
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[:len(blob) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

real, train.write_checkpoint = train.write_checkpoint, write_checkpoint
train.main(sys.argv[1:])
"""


def test_resume_after_a_kill_while_writing_a_checkpoint_is_exact(single, data_dir, tmp_path):
    out = str(tmp_path / "psfm")
    args = ["--stage=psfm", f"--data={data_dir}", f"--init_geo={os.path.join(single, 'geo')}", f"--out={out}",
            "--save_every=2"] + COMMON
    killed = run(["-c", KILLED_RUN] + args)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert os.path.isdir(os.path.join(out, train.STAGING))  # the half-written checkpoint
    # the previous checkpoint (step 2) is whole and loadable
    assert json.load(open(os.path.join(out, "train_state.json")))["step"] == 2
    train.load_psfm(out)
    train.data.read_weights(os.path.join(out, "state.safetensors"))

    check(run(["train.py", "--resume"] + args))
    straight = os.path.join(single, "psfm")
    # identical losses (steps 1, 2 logged before the kill; 3, 4 and validation after the resume) and weights
    assert losses(out) == losses(straight)
    resumed = load_file(os.path.join(out, "model.safetensors"))
    expected = load_file(os.path.join(straight, "model.safetensors"))
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert [r["step"] for r in metrics(out) if r["split"] == "train"] == [1, 2, 3, 4]  # the killed run's 3, 4 dropped
    assert not os.path.exists(os.path.join(out, train.STAGING))  # the resumed run's saves cleared it


def build_vlm_stage(single, data_dir, *extra):
    argv = [f"--data={data_dir}", f"--init_geo={os.path.join(single, 'geo')}",
            f"--init_spa3r={os.path.join(single, 'psfm')}", *extra]
    return train.build_vlm(*train.stage_config(argv, "vlm", "tiny", all_stages=False))


def test_the_two_vlm_variants_start_alike_from_the_earlier_stages(single, data_dir):
    spa3_vlm, baseline = (build_vlm_stage(single, data_dir, *extra).model for extra in ((), ("--spa3r=none",)))
    geo_state = load_file(os.path.join(single, "geo", "model.safetensors"))
    for name, value in spa3_vlm.vision.state_dict().items():  # the vision ViT starts as the geo backbone's
        assert torch.equal(value, geo_state["vit." + name])
    assert baseline.spa3r is None and baseline.adapter is None
    full = spa3_vlm.state_dict()
    for name, value in baseline.state_dict().items():  # everything the baseline has, Spa3-VLM starts with too
        assert torch.equal(full[name], value), name


def test_the_control_arm_is_spa3_vlm_with_its_encoder_untrained(single, data_dir):
    """--spa3r=random: Spa3-VLM's model and start in every weight but the Spa3R encoder's, which is a fresh
    one as PSFM starts it (seeded --seed + 1), not the PSFM-trained one."""
    trained, control = (build_vlm_stage(single, data_dir, *extra).model for extra in ((), ("--spa3r=random",)))
    assert control.config == trained.config  # eval.py loads it as a Spa3-VLM
    torch.manual_seed(0 + 1)
    fresh = Spa3REncoder(control.config.psfm, control.config.geo.dim)
    fresh.apply(init_weights)
    psfm_state = load_file(os.path.join(single, "psfm", "model.safetensors"))
    encoder = control.spa3r.encoder.state_dict()
    assert encoder.keys() == fresh.state_dict().keys()
    for name, value in fresh.state_dict().items():
        assert torch.equal(encoder[name], value), name
    assert not torch.equal(encoder["queries"], psfm_state["encoder.queries"])
    statistics = ("adapter.latent_mean", "adapter.latent_std")  # the standardisation of each arm's own latent
    for name, value in trained.state_dict().items():
        if not name.startswith("spa3r.encoder.") and name not in statistics:
            assert torch.equal(control.state_dict()[name], value), name


def test_cached_latents_are_those_each_step_would_compute(single, data_dir, tmp_path):
    stage = build_vlm_stage(single, data_dir, "--cache_latent=true")
    train.cache_latents(stage, train.Run(0, 1, torch.device("cpu"), 4, 1, nullcontext()), batch_size=3)
    for dataset in (stage.train_set, stage.val_set):
        batch = data.to_device(stage.collate([dataset[i] for i in range(len(dataset))]), torch.device("cpu"))
        with torch.no_grad():
            computed = stage.model.spatial_latent(batch["images"], batch["num_images"])  # (records, L, Ds)
        assert batch["latent"].shape == computed.shape
        assert torch.allclose(batch["latent"], computed, atol=1e-5)
        assert stage.model.latent(batch) is batch["latent"]  # read, not computed again
    # a DataLoader worker gets the data set with its latents: its batches carry them, in the records' order
    loader = torch.utils.data.DataLoader(stage.train_set, batch_size=2, num_workers=1, collate_fn=stage.collate)
    first = next(iter(loader))
    assert torch.equal(first["latent"], stage.train_set.latents[:2])
    # end to end, with a DataLoader worker carrying the latents: the losses of the run without the cache
    argv = ["train.py", "--stage=vlm", f"--data={data_dir}", f"--init_spa3r={os.path.join(single, 'psfm')}"] + COMMON
    for name, extra in (("online", []), ("cached", ["--cache_latent=true", "--workers=1"])):
        check(run(argv + [f"--out={tmp_path / name}"] + extra))
    assert "--cache_latent: the latents of" in open(tmp_path / "cached" / "log.txt").read()
    for (split, step, online), (_, _, cached) in zip(losses(tmp_path / "online"), losses(tmp_path / "cached")):
        assert cached == pytest.approx(online, rel=1e-4), (split, step)
    refused = run(argv + [f"--out={tmp_path / 'none'}", "--spa3r=none", "--cache_latent=true"])
    assert refused.returncode != 0 and "--cache_latent needs --spa3r=psfm or random" in refused.stderr


def test_vlm_trains_on_a_spar7m_layout_folder_as_on_the_data_it_came_from(single, data_dir, tmp_path):
    """generate_spar's SPAR-7M export (no scenes/: images are PNG files) is a --data for stage vlm, and it
    gives the very losses of the folder it was exported from."""
    records = {split: data.load_qa_jsonl(os.path.join(data_dir, f"qa_{split}.jsonl")) for split in ("train", "val")}
    export = tmp_path / "export"
    shutil.copytree(data_dir, export)
    generate_spar.write_spar7m(str(export), records)
    args = ["train.py", "--stage=vlm", "--spa3r=none", f"--init_geo={os.path.join(single, 'geo')}"] + COMMON
    check(run(args + [f"--data={export}", f"--out={tmp_path / 'ours'}"]))
    check(run(args + [f"--data={export / 'spar7m'}", f"--out={tmp_path / 'theirs'}"]))
    assert not (export / "spar7m" / "scenes").exists()
    ours, theirs = losses(tmp_path / "ours"), losses(tmp_path / "theirs")
    assert [row[:2] for row in theirs] == [row[:2] for row in ours] and len(ours) > 4  # train and val lines
    assert [row[2] for row in theirs] == pytest.approx([row[2] for row in ours], rel=1e-6)


def test_vlm_starts_from_a_local_pretrained_lm(single, data_dir, tmp_path):
    """--init_lm: the LM and its tokenizer (with the chat's tokens added) come from a checkpoint as transformers
    saves it (tests/fixtures/llama_v4_tied); a sequence longer than its max positions is refused by name."""
    fixture = os.path.join(REPO, "tests", "fixtures", "llama_v4_tied")
    args = ["train.py", "--stage=vlm", "--spa3r=none", f"--init_geo={os.path.join(single, 'geo')}",
            f"--data={data_dir}", "--tasks=room_size_estimation"] + COMMON
    short = run(args + [f"--init_lm={fixture}", f"--out={tmp_path / 'short'}"])
    assert short.returncode != 0 and "more than LMConfig.max_seq_len 128" in short.stderr + short.stdout
    assert short.stderr.count("\n") <= 2, short.stderr  # one line, before any DataLoader worker starts
    shaped = run(args + [f"--init_lm={fixture}", "--lm.dim=64", f"--out={tmp_path / 'shaped'}"])
    assert shaped.returncode != 0 and "--lm.*: the LM's shape comes from the --init_lm checkpoint" in shaped.stderr
    longer = tmp_path / "smol"  # RoPE has no learned positions: the same weights may read longer sequences
    shutil.copytree(fixture, longer)
    config = json.load(open(longer / "config.json"))
    json.dump({**config, "max_position_embeddings": 2048}, open(longer / "config.json", "w"))
    check(run(args + [f"--init_lm={longer}", f"--out={tmp_path / 'vlm'}", "--lr_lm=0"]))  # the LM as it came
    model, pretrained = vlm.load_for_eval(str(tmp_path / "vlm"), "cpu"), load_file(os.path.join(fixture, "model.safetensors"))
    assert model.tokenizer.to_str() == vlm.load_llama(str(longer))[1].to_str()
    ours = model.lm.state_dict()
    for name, weight in pretrained.items():  # every tensor as stored (the vocabulary rows the file has)
        assert torch.equal(ours[name.removeprefix("model.")][:len(weight)], weight.float()), name


def test_resuming_a_finished_stage_trains_nothing(single, data_dir, tmp_path):
    folder = str(tmp_path / "geo")
    shutil.copytree(os.path.join(single, "geo"), folder)
    before = load_file(os.path.join(folder, "model.safetensors"))
    train.main(["--stage=geo", f"--data={data_dir}", f"--out={folder}", "--resume"] + COMMON)
    assert "already trained to step 4 of 4" in open(os.path.join(folder, "log.txt")).read()
    after = load_file(os.path.join(folder, "model.safetensors"))
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert [r["step"] for r in metrics(folder) if r["split"] == "train"] == [1, 2, 3, 4]


def wait_for_a_logged_step(out):
    """Until out/metrics.jsonl holds a line (training has started), at most a minute."""
    metrics_path = os.path.join(out, "metrics.jsonl")
    for _ in range(600):
        if os.path.exists(metrics_path) and os.path.getsize(metrics_path):
            return
        time.sleep(0.1)


def test_sigterm_saves_at_the_next_step_and_stops(data_dir, tmp_path):
    out = str(tmp_path / "geo")
    args = ["train.py", "--stage=geo", f"--data={data_dir}", f"--out={out}", "--steps=100000", "--log_every=3",
            "--save_every=100000", "--eval_every=0", "--device=cpu", "--batch_size=2"]
    process = subprocess.Popen([sys.executable] + args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_a_logged_step(out)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1 and "stopped by SIGTERM at geo step" in stderr, stderr[-2000:]
    step = json.load(open(os.path.join(out, "train_state.json")))["step"]
    # one process stops at the very next step, saved; its unlogged loss sums travel in the checkpoint
    assert metrics(out)[-1]["step"] <= step < 100000 and "unlogged" in json.load(open(os.path.join(out, "train_state.json")))
    train.load_geo(out)


# ----------------------------------------------------------------------------- bad checkpoints

def truncate(path):
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:len(blob) // 2])


def reshape_first(path, prefix):
    tensors = load_file(path)
    name = sorted(k for k in tensors if k.startswith(prefix))[0]
    tensors[name] = torch.zeros(tensors[name].numel() + 1)
    save_file(tensors, path)
    return name


@pytest.mark.parametrize("case", ["init_geo truncated", "init_spa3r wrong shape", "resume truncated",
                                  "resume optimizer wrong shape"])
def test_bad_checkpoint_is_one_line_naming_file_and_tensor(case, single, data_dir, tmp_path):
    source, stage, flag, file = {
        "init_geo truncated": ("geo", "psfm", "init_geo", "model.safetensors"),
        "init_spa3r wrong shape": ("psfm", "vlm", "init_spa3r", "model.safetensors"),
        "resume truncated": ("geo", "geo", "out", "model.safetensors"),
        "resume optimizer wrong shape": ("psfm", "psfm", "out", "state.safetensors")}[case]
    folder = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(single, source), folder)
    path = os.path.join(folder, file)
    if "truncated" in case:
        truncate(path)
    else:
        tensor = reshape_first(path, "encoder." if file == "model.safetensors" else "state.")
    args = [f"--stage={stage}", f"--data={data_dir}", f"--init_geo={os.path.join(single, 'geo')}",
            f"--out={tmp_path / 'out'}", f"--{flag}={folder}"] + COMMON + (["--resume"] if flag == "out" else [])
    with pytest.raises(SystemExit) as error:
        train.main(args)
    message = str(error.value.code)
    assert "\n" not in message and path in message
    if "shape" in case:
        assert tensor in message


def test_resume_refuses_a_different_batch_size(single, data_dir, tmp_path):
    folder = str(tmp_path / "geo")
    shutil.copytree(os.path.join(single, "geo"), folder)
    with pytest.raises(SystemExit) as error:
        train.main(["--stage=geo", f"--data={data_dir}", f"--out={folder}", "--resume"] + COMMON + ["--batch_size=2"])
    assert "train_state.json" in str(error.value.code) and "batch_size" in str(error.value.code)


# ----------------------------------------------------------------------------- checkpoint commit

def write_files(text):
    def write(folder):
        for name in ("model.safetensors", "train_state.json"):
            open(os.path.join(folder, name), "w").write(text)
    return write


def contents(folder):
    return {name: open(os.path.join(folder, name)).read() for name in ("model.safetensors", "train_state.json")}


def test_an_interrupted_write_leaves_the_previous_checkpoint(tmp_path):
    out = str(tmp_path)
    train.save_checkpoint(out, write_files("old"))

    def dies_halfway(folder):
        open(os.path.join(folder, "model.safetensors"), "w").write("new")
        raise KeyboardInterrupt  # stands in for the kill: nothing after this line runs

    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(out, dies_halfway)
    assert contents(out) == {"model.safetensors": "old", "train_state.json": "old"}
    train.save_checkpoint(out, write_files("newer"))  # the next save clears the leftover
    assert contents(out) == {"model.safetensors": "newer", "train_state.json": "newer"}
    assert sorted(os.listdir(out)) == ["model.safetensors", "train_state.json"]


def test_a_kill_after_the_commit_rolls_forward(tmp_path):
    out = str(tmp_path)
    train.save_checkpoint(out, write_files("old"))
    commit = os.path.join(out, train.COMMIT)  # as a kill leaves it: committed, one file already moved up
    os.makedirs(commit)
    write_files("new")(commit)
    os.replace(os.path.join(commit, "model.safetensors"), os.path.join(out, "model.safetensors"))
    train.finish_commit(out)
    assert contents(out) == {"model.safetensors": "new", "train_state.json": "new"}
    assert not os.path.exists(commit)


def test_resume_keeps_whole_metrics_lines_up_to_its_step(tmp_path):
    lines = ['{"step": 1, "loss": 2.0}', '{"step": 2, "split": "val"}', '{"step": 3, "loss": 1.0}', '{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))  # the last line cut short by a kill
    train.Log(str(tmp_path), rank=0, start=3, device=torch.device("cpu"))
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:3]
    train.Log(str(tmp_path), rank=0, start=1, device=torch.device("cpu"))
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:1]


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    cpu = torch.device("cpu")
    tensors = train.state_tensors(optimizer, cpu)
    assert sorted(tensors) == ["rng.torch", "state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step",
                               "state.1.exp_avg", "state.1.exp_avg_sq", "state.1.step"]
    save_file(tensors, tmp_path / "state.safetensors")
    expected_draw = torch.rand(3)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    train.load_state(fresh, str(tmp_path / "state.safetensors"), cpu)
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG is back where it was saved
    for i in range(2):
        for name, value in optimizer.state_dict()["state"][i].items():
            assert torch.equal(fresh.state_dict()["state"][i][name], value)
    wrong = torch.optim.AdamW(torch.nn.Linear(4, 2).parameters())
    with pytest.raises(ValueError, match="tensor 'state.0.exp_avg' has shape"):
        train.load_state(wrong, str(tmp_path / "state.safetensors"), cpu)


# ----------------------------------------------------------------------------- the pieces

def test_lr_schedule_hand_values():
    cfg = train.TrainConfig(steps=14, warmup=4, min_lr_ratio=0.1)
    assert [train.lr_factor(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert train.lr_factor(4, cfg) == pytest.approx(1.0)  # cosine from its top
    assert train.lr_factor(9, cfg) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert train.lr_factor(13, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.9 * math.pi)))
    assert train.lr_factor(14, cfg) == pytest.approx(0.1)


def test_sample_stream_is_split_by_rank_without_repeats():
    n, B, steps = 10, 4, 5  # 20 positions: two epochs
    one = list(train.RankBatches(n, B, 4, 0, 1, seed=3, start=0, stop=steps))
    ranks = [list(train.RankBatches(n, B, 1, r, 2, seed=3, start=0, stop=steps)) for r in range(2)]
    for step in range(steps):  # each step: rank 0's two micro-batches and rank 1's cover the one-process batch
        k0, k1 = ranks[0][2 * step:2 * step + 2], ranks[1][2 * step:2 * step + 2]
        assert k0[0] + k1[0] + k0[1] + k1[1] == one[step]
    seen = [sample for batch in one for sample in batch]
    for epoch in range(2):  # every sample exactly once per epoch
        assert sorted(i for e, i in seen if e == epoch) == list(range(n))
    assert seen[:n] != sorted(seen[:n]) and seen[:n] != seen[n:]  # shuffled, differently each epoch
    resumed = list(train.RankBatches(n, B, 1, 1, 2, seed=3, start=3, stop=steps))
    assert resumed == ranks[1][6:]  # the data cursor is the step


def test_view_masks_are_drawn_with_their_sample(data_dir):
    def masks(epoch, seed=0):
        views = train.data.SceneViewsDataset(data_dir, "train", num_views=5, res=32, seed=seed, samples_per_scene=4,
                                             mask_ratio=0.5)
        views.set_epoch(epoch)
        return torch.stack([views[i]["context"] for i in range(len(views))])  # (16, 5)
    first = masks(0)
    assert first[:, 0].all() and (first.sum(1) == 2).all()  # view 0 and num_context_views - 1 = 1 other
    assert torch.equal(first, masks(0))  # the same sample, the same mask: resume and every rank agree
    assert not torch.equal(first, masks(1)) and not torch.equal(first, masks(0, seed=1))


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L4", 121e12),
                                        ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA L40S", None),
                                        ("NVIDIA H100 NVL", None), ("Tesla T4", None)])
def test_peak_flops_table(name, peak):
    assert train.peak_flops(name) == peak


def test_command_line_presets_and_paths():
    cfg, models = train.stage_config(["--steps=3", "--geo.dim=96", "--geo.num_heads=6", "--lm.n_layers=1",
                                      "--data=a.b/c"], "geo", "tiny", all_stages=False)
    assert (cfg.steps, cfg.data, models["geo"].dim, models["lm"].n_layers) == (3, "a.b/c", 96, 1)
    assert models["psfm"] == train.Spa3RConfig.tiny()
    with pytest.raises(SystemExit, match="--gep"):
        train.stage_config(["--gep.dim=3"], "geo", "tiny", all_stages=False)
    with pytest.raises(SystemExit, match="head_dim"):  # each model config checks itself after the overrides
        train.stage_config(["--geo.dim=72"], "geo", "tiny", all_stages=False)
    with pytest.raises(SystemExit, match="width"):
        train.stage_config(["--geo.width=3"], "geo", "tiny", all_stages=False)
    cfg, _ = train.stage_config(["--out=runs/a"], "psfm", "tiny", all_stages=True)
    assert (cfg.out, cfg.init_geo, cfg.init_spa3r) == (os.path.join("runs/a", "psfm"), os.path.join("runs/a", "geo"),
                                                     os.path.join("runs/a", "psfm"))
    cfg, _ = train.stage_config([], "vlm", "tiny", all_stages=False)
    assert (cfg.out, cfg.init_spa3r) == (os.path.join("out", "vlm"), os.path.join("out", "psfm"))
    assert (cfg.data, cfg.batch_size) == ("data/spar_tiny", 16)  # the tiny data set, the tiny vlm preset
    cfg, models = train.stage_config(["--batch_size=5"], "vlm", "reference", all_stages=False)
    assert cfg.batch_size == 5 and models["geo"] == train.GeoConfig.reference()
    assert train.stage_config([], "geo", "reference", all_stages=False)[0].data == "data/spar"


def test_missing_data_is_generated_once(tmp_path, monkeypatch):
    monkeypatch.setitem(train.DATA_DEFAULTS, "tiny", dict(scenes=2, val_scenes=1, views=5, random_views=1, res=16,
                                                          qa_per_task=1, vocab_size=300))
    folder = str(tmp_path / "data")
    train.ensure_data(folder, "tiny", ["geo"], rank=0, world=1)
    stamp = os.path.getmtime(os.path.join(folder, "tokenizer.json"))
    assert len(train.data.scene_ids(folder, "train")) == 2 and len(train.data.scene_ids(folder, "val")) == 1
    train.ensure_data(folder, "tiny", ["geo"], rank=0, world=1)
    assert os.path.getmtime(os.path.join(folder, "tokenizer.json")) == stamp


# ----------------------------------------------------------------------------- gates

class Replay:
    """A stand-in model that returns prepared outputs in order, one per call."""

    def __init__(self, outputs):
        self.outputs = list(outputs)

    def __call__(self, *args):
        return self.outputs.pop(0)


def random_rigid(n, generator):
    q = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator))[0]
    q = q * torch.linalg.det(q).sign()[:, None, None]  # proper rotations
    pose = torch.eye(4).repeat(n, 1, 1)
    pose[:, :3, :3], pose[:, :3, 3] = q, torch.randn(n, 3, generator=generator)
    return pose


def geo_batches(count, generator):
    for _ in range(count):
        B, V = train.GATE_BATCH, 3
        depth = torch.rand(B, V, 8, 8, generator=generator) * 4 + 0.5
        depth[:, :, 0, 0] = 0  # an invalid pixel, left out everywhere
        yield {"images": torch.zeros(B, V, 3, 8, 8), "depth": depth, "pose": random_rigid(B * V, generator).view(B, V, 4, 4)}


def test_geo_gates_pass_for_the_truth_and_tie_for_the_identity():
    batches = list(geo_batches(2, torch.Generator().manual_seed(0)))
    truth = [{"pose": train.relative_to_view0(b["pose"]), "log_depth": b["depth"].clamp_min(1e-6).log()} for b in batches]
    rows = train.geo_gates(Replay(truth), batches)
    assert [r["pass"] for r in rows] == [True] * 4 and all(r["model"] < 1e-5 for r in rows)
    identity = [{"pose": torch.eye(4).expand_as(b["pose"]), "log_depth": torch.zeros_like(b["depth"])} for b in batches]
    rows = train.geo_gates(Replay(identity), batches)
    assert all(rows[i]["diff"] == 0 and not rows[i]["pass"] for i in range(3))
    # the identity's translation error, by hand: the mean |t| of views 1.. relative to view 0
    t = torch.cat([train.relative_to_view0(b["pose"])[:, 1:, :3, 3] for b in batches])
    assert rows[0]["baseline"] == pytest.approx(t.abs().mean().item(), rel=1e-5)
    assert rows[3]["n"] == 2 * train.GATE_BATCH and not rows[3]["pass"]  # log depth 0 is worse than the mean map


def test_yaw_gate_hand_worked_turns():
    """Views turned 170 and -170 degrees about the down axis: the identity is 170 degrees off, an estimate of
    -170 for the first is 20 degrees off (the turn wraps), not 340."""
    def turned(degrees):
        pose = torch.eye(4)
        a = math.radians(degrees)
        pose[:3, :3] = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
        return pose
    B = train.GATE_BATCH
    target = torch.stack([torch.eye(4), turned(170), turned(-170)])[None].repeat(B, 1, 1, 1)  # (B, 3, 4, 4)
    estimate = torch.stack([torch.eye(4), turned(-170), turned(-170)])[None].repeat(B, 1, 1, 1)
    batch = {"images": torch.zeros(B, 3, 3, 8, 8), "depth": torch.ones(B, 3, 8, 8), "pose": target}
    rows = train.geo_gates(Replay([{"pose": estimate, "log_depth": torch.zeros(B, 3, 8, 8)}]), [batch])
    assert rows[2]["gate"].startswith("geo: relative yaw")
    assert rows[2]["model"] == pytest.approx(10.0, abs=1e-3) and rows[2]["baseline"] == pytest.approx(170.0, abs=1e-3)


def test_heading_is_the_turn_to_the_right_whatever_the_pitch():
    """A camera turned 90 degrees to the right (about its down axis) looks along view 0's +x: heading +90. Pitched
    down 30 degrees first and then turned 40 degrees right (camera-to-view-0 = turn @ pitch), its heading is 40."""
    def about(axis, degrees):
        c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
        pose = torch.eye(4)
        pose[:3, :3] = {"y": torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
                        "x": torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]])}[axis]
        return pose
    assert math.degrees(train.heading(about("y", 90))) == pytest.approx(90, abs=1e-4)
    assert (about("y", 90) @ torch.tensor([0.0, 0, 1, 0]))[0] == pytest.approx(1)  # the optical axis is view 0's +x
    assert math.degrees(train.heading(about("y", 40) @ about("x", -30))) == pytest.approx(40, abs=1e-4)


def test_ridge_probe_reads_a_linear_quantity_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 20, generator=g, dtype=torch.float64)
    y = torch.stack([x @ torch.randn(20, generator=g, dtype=torch.float64),
                     torch.randn(300, generator=g, dtype=torch.float64)], 1)
    pred = train.ridge_fit_predict(x[:200], y[:200], x[200:])
    score = train.r2((pred - y[200:]) ** 2, y[200:])
    assert score[0] > 0.99 and score[1] < 0.1


def test_ridge_strength_is_chosen_per_column():
    """Fitting two targets together gives each column what fitting it alone gives, though one is exact (a weak
    ridge suits it) and the other, in units 1000 times larger, mostly noise (a strong one suits it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 30, generator=g, dtype=torch.float64)
    exact = x @ torch.randn(30, generator=g, dtype=torch.float64)
    noisy = 1000 * (0.1 * x[:, 0] + torch.randn(120, generator=g, dtype=torch.float64))
    y = torch.stack([exact, noisy], 1)
    together = train.ridge_fit_predict(x[:80], y[:80], x[80:])
    for j in range(2):
        alone = train.ridge_fit_predict(x[:80], y[:80, j:j + 1], x[80:])
        assert torch.allclose(together[:, j:j + 1], alone)
    assert train.r2((together - y[80:]) ** 2, y[80:])[0] > 0.99


def test_probe_rows_read_their_own_quantity(monkeypatch):
    """probe_gates(quantities=(4, 0)): each row is scored on its own target column. Features that know only the
    largest-object distance probe it at R² ~1 and beat the random encoders' noise; floor area they miss."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(160, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(160, 15, generator=g, dtype=torch.float64)
    monkeypatch.setattr(train, "probe_targets", lambda batch, rooms: y[batch])
    monkeypatch.setattr(train, "probe_features", lambda model, encoders, batch: {
        "latent": torch.cat([y[batch][:, 4:5], noise[batch][:, :3]], 1), "ViT features": noise[batch][:, 3:6],
        **{f"random encoder {k}": noise[batch][:, 6 + 3 * k:9 + 3 * k] for k in range(3)}})
    psfm = train.PSFM(train.Spa3RConfig.tiny(), train.GeoBackbone(train.GeoConfig.tiny()))
    batches = lambda first, last: [torch.arange(i, i + 8) for i in range(first, last, 8)]  # noqa: E731
    rows = train.probe_gates(psfm, batches(0, 120), batches(120, 160), lambda batch: None, 0, quantities=(4, 0))
    assert [row["gate"].split(" (ViT")[0] for row in rows] == ["probe R² largest-object distance", "probe R² log floor area"]
    assert rows[0]["model"] > 0.95 and rows[0]["pass"]
    assert rows[1]["model"] < 0.2 and not rows[1]["pass"]


def test_probe_gate_holds_the_latent_to_the_strongest_random_encoder(monkeypatch):
    """Of three random encoders, one happens to read the quantity almost as well as the latent: the gate compares
    with that one (its R² is the row's baseline), and a latent no better than it does not pass."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(400, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(400, 4, generator=g, dtype=torch.float64)
    lucky = y + 0.3 * noise[:, 3:4]
    monkeypatch.setattr(train, "probe_targets", lambda batch, rooms: y[batch].expand(-1, 5))
    for latent, passes in ((y + 0.1 * noise[:, :1], True), (lucky, False)):
        monkeypatch.setattr(train, "probe_features", lambda model, encoders, batch, latent=latent: {
            "latent": latent[batch], "ViT features": noise[batch, :1], "random encoder 0": noise[batch, 1:2],
            "random encoder 1": lucky[batch], "random encoder 2": noise[batch, 2:3]})
        psfm = train.PSFM(train.Spa3RConfig.tiny(), train.GeoBackbone(train.GeoConfig.tiny()))
        batches = lambda first, last: [torch.arange(i, i + 8) for i in range(first, last, 8)]  # noqa: E731
        [row] = train.probe_gates(psfm, batches(0, 320), batches(320, 400), lambda batch: None, 0, quantities=(0,))
        expected = train.r2((train.ridge_fit_predict(lucky[:320], y[:320], lucky[320:]) - y[320:]) ** 2, y[320:])
        assert row["baseline_name"] == "strongest of 3 random encoders"
        assert row["baseline"] == pytest.approx(float(expected)) and row["pass"] == passes


def test_probe_encoders_are_distinct_draws_and_each_is_read(monkeypatch):
    """probe_gates draws its random encoders at seed, seed + 1, ... (untrained_encoder adds 1), and probe_features
    reads each of them: distinct features, none the trained latent's."""
    seeds = []
    original = train.untrained_encoder
    monkeypatch.setattr(train, "untrained_encoder", lambda c, dim, seed: seeds.append(seed) or original(c, dim, seed))
    monkeypatch.setattr(train, "probe_targets", lambda batch, rooms: torch.zeros(len(batch["images"]), 5, dtype=torch.float64))
    torch.manual_seed(0)
    psfm = train.PSFM(train.Spa3RConfig.tiny(), train.GeoBackbone(train.GeoConfig.tiny())).eval()
    images = torch.rand(8, 2, 3, 32, 32)
    seen = []
    real_features = train.probe_features
    monkeypatch.setattr(train, "probe_features", lambda *args: seen.append(real_features(*args)) or seen[-1])
    train.probe_gates(psfm, [{"images": images}] * 2, [{"images": images}], lambda batch: None, 5, quantities=(0,))
    assert seeds == [5, 6, 7]
    features = seen[0]
    assert sorted(features) == ["ViT features", "latent", "random encoder 0", "random encoder 1", "random encoder 2"]
    names = [n for n in features if n != "ViT features"]
    for i, a in enumerate(names):
        assert features[a].shape == (8, psfm.config.dim)
        for b in names[i + 1:]:
            assert not torch.allclose(features[a], features[b], atol=1e-4), (a, b)


def test_probe_targets_hand_worked_room():
    pose = torch.eye(4).repeat(1, 2, 1, 1)
    pose[0, 0, :3, 3] = torch.tensor([1.0, 2.0, 1.5])
    turn = math.radians(30)  # view 1 turned 30 degrees to the right about its down axis, 2 m to the right
    pose[0, 1, :3, :3] = torch.tensor([[math.cos(turn), 0, math.sin(turn)], [0, 1, 0], [-math.sin(turn), 0, math.cos(turn)]])
    pose[0, 1, :3, 3] = torch.tensor([3.0, 2.0, 1.5])
    room = {"room": {"floor_area": 12.0}, "objects": [{"center": [1, 2, 0.5], "size": [0.5, 0.5, 1]},
                                                      {"center": [4, 6, 1.5], "size": [2, 1, 1]}]}
    got = train.probe_targets({"pose": pose}, [room])[0]
    expected = [math.log(12), math.cos(turn), math.sin(turn), 2.0, math.dist([4, 6, 1.5], [1, 2, 1.5])]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_swap_partners_come_from_other_scenes_with_the_same_key():
    assert train.partners([1, 2, 1, 1, 2], ["a", "b", "a", "c", "b"]).tolist() == [3, -1, 3, 0, -1]
    assert train.partners([0, 0, 0], ["a", "b", "c"]).tolist() == [1, 2, 0]
