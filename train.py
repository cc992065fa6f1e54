"""train.py: trains nanoSpa3R's three stages, on one CPU or many GPUs, and resumes without loss.

    geo   model.GeoBackbone learns depth and cameras from the generator's ground truth  -> out/geo
    psfm  psfm.PSFM: the Spa3R encoder + field decoder on the frozen backbone           -> out/psfm  (reads out/geo)
    vlm   vlm.SpaVLM answers the QA records with the Spa3R latent (frozen) inside      -> out/vlm   (reads out/psfm)

Usage:
    python train.py                                     # all three stages in order; the data is generated if absent
    python train.py --stage=geo --steps=500 --geo.dim=96
    torchrun --standalone --nproc_per_node=8 train.py   # the same on 8 GPUs (DDP over NCCL; gloo on CPU)
    python train.py --stage=vlm --spa3r=none --out=out/vlm_none   # the baseline VLM for the ablation
    python train.py --resume                            # continue every stage from where its checkpoint stopped

Every TrainConfig field is a --key=value flag; model sizes are --geo.*, --psfm.*, --lm.* and --vlm.* (fields of
GeoConfig, Spa3RConfig, LMConfig, VLMConfig). --preset=tiny|reference picks the sizes and the defaults below
(left empty: reference on CUDA, tiny elsewhere). A part started from an earlier stage takes its config from that
checkpoint's config.json: psfm's backbone from out/geo, vlm's vision ViT and Spa3R from out/psfm.
Multi-node: torchrun's own flags (--nnodes, --node_rank, --rdzv_endpoint), with --out on a shared filesystem and
the data present on every node.

A step is the same whatever the world size. The training samples form one stream: epoch e is a permutation of
the data seeded by (seed, e), the epochs one after another. Step s takes the next batch_size positions; each rank
reads micro-batches of micro_batch consecutive positions of them, accumulates gradients (DDP's no_sync on all but
the last micro-step) and scales each micro-batch's mean loss by its weight (samples; answer tokens for vlm) over
the step's total weight, so the summed gradient is that of the whole global batch in one process (for geo and
psfm exactly so when samples have equal counts of valid pixels, as generated scenes do: their losses average
pixels within a micro-batch). All per-sample randomness (view subsets, PSFM's view masking) comes from the
sample's position, never from the rank, and the data cursor of a checkpoint is just its step.

Checkpoints (out/<stage>: model.safetensors, config.json, optimizer.safetensors, train_state.json) are written
whole or not at all (a staging folder renamed into place), every save_every steps, at the end, and on SIGTERM
(what schedulers and torchrun send before a kill) at the next log step. --resume continues where a checkpoint
left off: bit for bit on CPU (GPU kernels need not be deterministic).

Gates: at every validation (every eval_every steps and at the end) rank 0 also measures the stage against its
trivial baseline on held-out samples -- geo against the identity pose and the per-pixel mean depth, psfm against
the cameras of another sample, the mean token and (by linear probes) a random encoder, the VLM against another
scene's images and latent -- and logs each as a PASS / FAIL line (paired bootstrap 95 % interval) and a "gates"
record in metrics.jsonl, which speedrun.sh's report prints.

Reading order: TrainConfig and presets; processes and devices; the sample stream; the three stages (model, data,
loss, FLOPs); optimizer and schedule; checkpoints; logging; validation; gates; the loop; main.
"""
import base64
import errno
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from datetime import timedelta
from functools import lru_cache, partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import vlm
from data import read_json
from generate_spar import TASKS, GenConfig, generate, parse_args, write_atomic
from eval import paired_bootstrap
from model import GeoBackbone, GeoConfig, geo_loss, init_weights, relative_to_view0
from model import flops_per_sample as geo_flops_per_sample
from psfm import PSFM, Spa3RConfig, Spa3REncoder, patch_log_depth
from psfm import flops_per_sample as psfm_flops_per_sample

STAGES = ("geo", "psfm", "vlm")


# ----------------------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    stage: str = ""             # geo | psfm | vlm; empty: all three in order, each from the one before
    preset: str = ""            # tiny | reference: model, data and the defaults below; empty: reference on CUDA
    data: str = ""              # data directory, generated if absent; empty: data/spar, or data/spar_tiny (tiny)
    out: str = ""               # checkpoint directory; empty: out/<stage>; without --stage: the parent of the three
    resume: bool = False        # continue from the checkpoint in --out (a fresh start when there is none yet)
    overwrite: bool = False     # start over in an --out that holds a checkpoint (refused without this or --resume)
    init_geo: str = ""          # psfm, and vlm with --spa3r=none: the geo checkpoint; empty: out/geo; "none": random
    init_spa3r: str = ""        # vlm: the psfm checkpoint (Spa3R and the vision ViT's start); empty: out/psfm
    spa3r: str = "psfm"         # vlm: "psfm" = Spa3-VLM; "none" = the baseline VLM without the spatial branch;
                                # "oracle" = the adapter reads true 3D tokens (the ablation's upper bound)
    steps: int = 600            # optimizer steps
    batch_size: int = 8         # global batch (samples per optimizer step), the same for any number of processes
    micro_batch: int = 0        # samples per forward pass on each rank; 0 = batch_size / world size (no accumulation)
    num_views: int = 4          # geo, psfm: views per sample (view 0 is the reference)
    samples_per_scene: int = 1  # geo, psfm: samples (view subsets) per scene in an epoch
    tasks: str = ""             # vlm: train on these tasks only (comma-separated; empty: all)
    view_sampling: str = "near"  # geo, psfm: "near" = views near a random view 0 (they overlap); "random" = any
    lr: float = 2e-3            # geo, psfm: peak learning rate
    lr_lm: float = 2e-3         # vlm: per-module peak learning rates
    lr_vision: float = 5e-4
    lr_projector: float = 2e-3
    lr_adapter: float = 2e-3
    lr_spa3r: float = 5e-4      # only used with --vlm.freeze_spa3r=false
    min_lr_ratio: float = 0.1   # cosine decay ends at min_lr_ratio x peak (the paper: 2e-3 -> 2e-4)
    warmup: int = 50            # linear warmup steps
    weight_decay: float = 0.05  # on matrices only, not on gains and biases
    clip: float = 1.0           # gradient-norm clipping (0: off)
    seed: int = 0
    device: str = ""            # cuda | mps | cpu; empty: cuda, then mps, then cpu
    bf16: bool = True           # bf16 autocast on CUDA
    compile: bool = False       # torch.compile the model
    workers: int = 0            # DataLoader worker processes per rank
    log_every: int = 10
    eval_every: int = 200       # validation loss on held-out scenes every this many steps and at the end (0: never)
    eval_samples: int = 32      # held-out samples of the validation loss and the gates
    probe_samples: int = 256    # psfm gates: training samples the linear probes are fitted on
    save_every: int = 200       # checkpoint every this many steps and at the end


# What differs from TrainConfig's defaults by preset and stage; command-line flags override both.
# tiny: the whole chain in minutes on a CPU. reference: about 9e18 training FLOP by the models' flops functions,
# roughly an hour on 8 H100s at 30 % MFU -- an estimate, not yet measured on a GPU.
PRESET_DEFAULTS = {
    ("tiny", "geo"): dict(),
    ("tiny", "psfm"): dict(),
    ("tiny", "vlm"): dict(batch_size=16, lr_adapter=1e-2),  # the zero-init adapter learns to read its latent sooner
    ("reference", "geo"): dict(steps=20000, batch_size=128, num_views=8, samples_per_scene=8, lr=5e-4, warmup=1000,
                               workers=4, log_every=20, eval_every=1000, eval_samples=512, save_every=1000),
    ("reference", "psfm"): dict(steps=30000, batch_size=128, num_views=8, samples_per_scene=8, lr=1e-3, warmup=1000,
                                weight_decay=1e-4, workers=4, log_every=20, eval_every=1000, eval_samples=512,
                                save_every=1000),
    ("reference", "vlm"): dict(steps=10000, batch_size=128, lr_lm=5e-4, lr_vision=1e-4, lr_projector=1e-3,
                               lr_adapter=1e-3, lr_spa3r=1e-4, warmup=500, weight_decay=0.1, workers=4, log_every=20,
                               eval_every=1000, eval_samples=512, save_every=1000),
}
# The data generated when --data is absent (generate_spar.GenConfig fields)
DATA_DEFAULTS = {
    "tiny": dict(out="data/spar_tiny", scenes=64, val_scenes=8, views=12, random_views=4, res=32),
    "reference": dict(out="data/spar", scenes=1024, val_scenes=64, res=224),  # ~7.5 GB
}
MODEL_SECTIONS = ("geo", "psfm", "lm", "vlm")  # --geo.dim=96 etc.


def split_arguments(argv):
    """argv -> (TrainConfig flags, {section: [--key=value of that model config]})."""
    flat, sections = [], {name: [] for name in MODEL_SECTIONS}
    for arg in argv:
        head, dot, rest = arg.partition(".")
        if dot and "=" not in head:
            section = head.lstrip("-")
            if section not in sections:
                known = ", ".join(f"--{s}.*" for s in sections)
                raise SystemExit(f"unknown argument {arg!r}: model configs are {known}")
            sections[section].append("--" + rest)
        else:
            flat.append(arg)
    return flat, sections


def with_overrides(config, args, section):
    """A model config with --section.key=value overrides (typed by generate_spar.parse_args), validated again."""
    nested = {f.name for f in fields(config) if is_dataclass(getattr(config, f.name))}
    for arg in args:
        if arg[2:].partition("=")[0] in nested:
            raise SystemExit(f"--{section}.{arg[2:]}: set its fields as --{arg[2:].partition('=')[0]}.<field>")
    try:
        parse_args(args, config)
    except SystemExit as error:
        raise SystemExit(f"--{section}.*: {error}") from None
    return replace(config)  # replace() runs __post_init__, so a bad value is refused by the config itself


def stage_config(flat_args, stage, preset, all_stages):
    """TrainConfig of one stage: TrainConfig defaults, then the preset's, then the command line; paths resolved."""
    cfg = parse_args(flat_args, TrainConfig(**PRESET_DEFAULTS[preset, stage]))
    root = (cfg.out or "out") if all_stages else "out"
    cfg.stage, cfg.preset = stage, preset
    cfg.out = os.path.join(root, stage) if all_stages else (cfg.out or os.path.join("out", stage))
    cfg.data = cfg.data or DATA_DEFAULTS[preset]["out"]
    cfg.init_geo = cfg.init_geo or os.path.join(root, "geo")
    cfg.init_spa3r = cfg.init_spa3r or os.path.join(root, "psfm")
    if cfg.view_sampling not in ("near", "random"):
        raise SystemExit(f"--view_sampling must be 'near' or 'random', got {cfg.view_sampling!r}")
    if cfg.spa3r not in ("psfm", "none", "oracle"):
        raise SystemExit(f"--spa3r must be 'psfm', 'none' or 'oracle', got {cfg.spa3r!r}")
    for name in ("steps", "batch_size", "log_every", "save_every", "num_views") + (("eval_samples",) if cfg.eval_every else ()):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if stage == "psfm" and cfg.num_views < 2:
        raise SystemExit(f"--num_views must be at least 2 for stage psfm (context and masked views), got {cfg.num_views}")
    for name in ("out", "data"):
        if os.path.exists(getattr(cfg, name)) and not os.path.isdir(getattr(cfg, name)):
            raise SystemExit(f"--{name}={getattr(cfg, name)} is a file, not a folder")
    return cfg


# ----------------------------------------------------------------------------- processes and devices

def setup_processes(device_name):
    """RANK / LOCAL_RANK / WORLD_SIZE from torchrun's environment (absent: one process) -> (rank, world, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not device_name:  # MPS only for one process: DDP has no MPS backend
        mps = torch.backends.mps.is_available() and world == 1
        device_name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not available.get(device_name.split(":")[0]):
        known = "" if device_name in available else " (cuda, mps or cpu)"
        raise SystemExit(f"--device={device_name}: not available on this machine{known}")
    device = torch.device(f"cuda:{local_rank}" if device_name == "cuda" else device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the fp32 parts
    if world > 1:
        # long timeout: rank 0 may be generating data or writing a checkpoint while the others wait
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def barrier(world):
    if world > 1:
        dist.barrier()


def all_reduce_sum(tensor, world):
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


# Schedulers and torchrun send SIGTERM before they kill: training then saves at its next log step and stops.
SIGTERM = {"received": False}


def on_sigterm(signum, frame):
    SIGTERM["received"] = True


def ignore_sigterm(worker_id):
    """DataLoader workers: SIGTERM reaches the whole process group, and a worker it killed would take the main
    process down before it saves. The main process stops them when it is done."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def ensure_data(data_dir, preset, stages, rank, world):
    """Generate the preset's default data set into data_dir if that folder does not exist or is empty (rank 0;
    the others wait). Anything else must be a whole data set: generating into it could overwrite scans or data
    made with other options, so a missing piece is an error that says which command makes it."""
    if rank == 0 and (not os.path.isdir(data_dir) or not os.listdir(data_dir)):
        print(f"train.py: no data set in {data_dir}: generating the {preset} one", flush=True)
        config = GenConfig(**{**DATA_DEFAULTS[preset], "out": data_dir})  # GenConfig's seed: one data set for every run
        config.workers = min(8, os.cpu_count() or 1) if preset == "reference" else 1
        generate(config)
    barrier(world)
    needed = ["scenes"] + (["qa_train.jsonl", "qa_val.jsonl", "tokenizer.json"] if "vlm" in stages else [])
    missing = [name for name in needed if not os.path.exists(os.path.join(data_dir, name))]
    if missing:
        why = " (stage vlm needs it; --vocab_size=0 made a data set without one)" if missing == ["tokenizer.json"] else ""
        raise ValueError(f"{data_dir}: incomplete data set: {', '.join(missing)} missing{why}; make a whole one "
                         f"with python generate_spar.py --out=<an empty folder>, or give that folder as --data")


# ----------------------------------------------------------------------------- the sample stream

@lru_cache(maxsize=4)
def epoch_permutation(num_samples, seed, epoch):
    generator = torch.Generator().manual_seed(data.hash_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator).tolist()


def stream_sample(position, num_samples, seed):
    """Position in the sample stream -> (epoch, sample index): epochs are seeded permutations, one after another."""
    epoch, i = divmod(position, num_samples)
    return epoch, epoch_permutation(num_samples, seed, epoch)[i]


def micro_offset(k, rank, world, micro_batch):
    """Where micro-step k of `rank` starts within its step's global batch."""
    return (k * world + rank) * micro_batch


class RankBatches:
    """DataLoader batch_sampler: this rank's micro-batches, as (epoch, index) lists, for steps start..stop-1."""

    def __init__(self, num_samples, batch_size, micro_batch, rank, world, seed, start, stop):
        self.n, self.B, self.m, self.seed = num_samples, batch_size, micro_batch, seed
        self.rank, self.world, self.start, self.stop = rank, world, start, stop
        self.accum = batch_size // (world * micro_batch)

    def __len__(self):
        return (self.stop - self.start) * self.accum

    def __iter__(self):
        for step in range(self.start, self.stop):
            for k in range(self.accum):
                first = step * self.B + micro_offset(k, self.rank, self.world, self.m)
                yield [stream_sample(p, self.n, self.seed) for p in range(first, first + self.m)]


class EpochItems(torch.utils.data.Dataset):
    """Item (epoch, index) of a dataset whose samples depend on the epoch (SceneViewsDataset's view subsets)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def masking_generator(seed, step, offset, num_views, validation=False):
    """The CPU generator PSFM draws its view masks from, for a micro-batch starting at `offset` in its step.
    sample_context draws one row of num_views - 1 uniforms per sample, in order, so skipping `offset` rows
    gives every sample the row it gets when the whole batch runs in one process."""
    generator = torch.Generator().manual_seed(data.hash_seed(seed, int(validation), step))
    torch.rand(offset, max(num_views - 1, 0), generator=generator)
    return generator


# ----------------------------------------------------------------------------- the three stages

@dataclass
class Stage:
    name: str
    model: nn.Module        # the plain module: what is trained, validated and saved
    config: object          # GeoConfig (geo), (GeoConfig, Spa3RConfig) (psfm), VLMConfig (vlm)
    groups: list            # AdamW parameter groups, each with its own peak "lr"
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    collate: object


def decay_groups(module, lr, weight_decay):
    """Trainable matrices decay, gains and biases do not (as nanoGPT)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"name": "decay", "params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay},
            {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0}]


def preset_config(cls, preset, args, section):
    return with_overrides(cls.reference() if preset == "reference" else cls.tiny(), args, section)


def build_geo(cfg, model_args):
    config = preset_config(GeoConfig, cfg.preset, model_args["geo"], "geo")
    torch.manual_seed(cfg.seed)
    model = GeoBackbone(config)
    return Stage("geo", model, config, decay_groups(model, cfg.lr, cfg.weight_decay),
                 *view_datasets(cfg, config.image_size), data.collate_views)


def build_psfm(cfg, model_args):
    geo_config, state = load_geo_checkpoint(cfg.init_geo)
    config = preset_config(Spa3RConfig, cfg.preset, model_args["psfm"], "psfm")
    torch.manual_seed(cfg.seed)
    backbone = GeoBackbone(geo_config)
    backbone.load_state_dict(state)
    model = PSFM(config, backbone)  # freezes the backbone
    return Stage("psfm", model, (geo_config, config), decay_groups(model, cfg.lr, cfg.weight_decay),
                 *view_datasets(cfg, geo_config.image_size), data.collate_views)


def view_datasets(cfg, res):
    def views(split, samples_per_scene):
        return data.SceneViewsDataset(cfg.data, split, cfg.num_views, res, cfg.seed, samples_per_scene, cfg.view_sampling)
    val = views("val", 1)
    val.samples_per_scene = max(1, math.ceil(cfg.eval_samples / len(val.ids)))  # distinct view sets, no repeats
    return views("train", cfg.samples_per_scene), val


def task_list(tasks):
    """--tasks=a,b -> ("a", "b"); an unknown task name is refused."""
    names = tuple(t for t in tasks.split(",") if t)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown task {unknown[0]!r}; the tasks are {', '.join(TASKS)}")
    return names


def build_vlm(cfg, model_args):
    if any(arg.startswith("--spa3r") for arg in model_args["vlm"]):
        raise SystemExit("--vlm.spa3r: use --spa3r=psfm|none (it also decides which checkpoint the VLM starts from)")
    tokenizer = data.load_tokenizer(os.path.join(cfg.data, "tokenizer.json"))
    if cfg.spa3r == "psfm":  # the vision ViT and Spa3R both come from the psfm checkpoint
        geo_config, psfm_config, state = load_psfm_checkpoint(cfg.init_spa3r)
    elif cfg.init_geo != "none":  # the baseline keeps the same vision ViT start, from the geo backbone
        geo_config, geo_state = load_geo_checkpoint(cfg.init_geo)
        state = {"backbone." + k: v for k, v in geo_state.items()}
    else:
        geo_config, state = preset_config(GeoConfig, cfg.preset, model_args["geo"], "geo"), None
    if cfg.spa3r != "psfm":  # unused without Spa3R, but VLMConfig (and config.json) holds one
        psfm_config = preset_config(Spa3RConfig, cfg.preset, [], "psfm")
    lm_config = preset_config(vlm.LMConfig, cfg.preset, model_args["lm"], "lm")
    if not any(a.startswith("--vocab_size") for a in model_args["lm"]):  # the data's tokenizer, rounded up to 64s
        lm_config = replace(lm_config, vocab_size=64 * math.ceil(tokenizer.get_vocab_size() / 64))
    config = replace(vlm.VLMConfig(), lm=lm_config, geo=geo_config, psfm=psfm_config, spa3r=cfg.spa3r)
    config = with_overrides(config, model_args["vlm"], "vlm")
    torch.manual_seed(cfg.seed)
    model = vlm.SpaVLM(config, tokenizer)
    if state is not None:
        model.init_from_psfm(state)
    train_set, val_set = (data.QADataset(cfg.data, split, geo_config.image_size, oracle=cfg.spa3r == "oracle",
                                         tasks=task_list(cfg.tasks)) for split in ("train", "val"))
    collate = partial(vlm.collate, tokenizer=tokenizer, config=config)
    if cfg.spa3r == "psfm" and len(train_set):  # the adapter's fixed standardisation of the frozen latent
        picks = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))[:256].tolist()
        model.set_latent_statistics(collate([train_set[i] for i in picks[k:k + 32]]) for k in range(0, len(picks), 32))
    lrs = {"lm": cfg.lr_lm, "vision": cfg.lr_vision, "projector": cfg.lr_projector, "adapter": cfg.lr_adapter,
           "spa3r": cfg.lr_spa3r}
    return Stage("vlm", model, config, model.param_groups(lrs, cfg.weight_decay), train_set, val_set, collate)


BUILDERS = {"geo": build_geo, "psfm": build_psfm, "vlm": build_vlm}
PAD = data.SPECIAL_TOKENS.index("<|pad|>")  # vlm.collate right-pads with it


def stage_loss(stage, model, batch, generator):
    """(loss, {term: detached}) of one micro-batch; model may be the DDP / compiled wrapper of stage.model."""
    if stage.name == "geo":
        return geo_loss(model(batch["images"]), batch)
    if stage.name == "psfm":
        return model(batch, generator)
    return model(batch)


def batch_weight(stage, batch):
    """How much a micro-batch's mean loss counts in its step: samples, or answer tokens for vlm (whose loss is the
    mean over all answer tokens of the global batch)."""
    if stage.name == "vlm":
        return int((batch["targets"] != vlm.IGNORE).sum())
    return len(batch["images"])


def batch_tokens(stage, batch):
    """Tokens the LM reads (text and visual, not padding); 0 for geo and psfm."""
    return int((batch["input_ids"] != PAD).sum()) if stage.name == "vlm" else 0


def batch_flops(stage, batch, num_views):
    """FLOPs of a training step on this micro-batch: forward + backward of trained parts, forward of frozen ones."""
    if stage.name == "geo":
        return len(batch["images"]) * 3 * geo_flops_per_sample(stage.config, num_views)
    if stage.name == "psfm":
        geo_config, config = stage.config
        frozen_backbone = geo_flops_per_sample(geo_config, num_views)
        return len(batch["images"]) * (frozen_backbone + 3 * psfm_flops_per_sample(config, geo_config, num_views))
    per_image = vlm.tokens_per_image(stage.config, *batch["images"].shape[-2:])
    lengths = (batch["input_ids"] != PAD).sum(1).tolist()
    return sum(vlm.flops_per_sample(stage.config, n, t - n * per_image, training=True)
               for n, t in zip(batch["num_images"].tolist(), lengths))


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- optimizer and schedule

def make_optimizer(groups, device):
    for group in groups:
        group["base_lr"] = group["lr"]
    fused = device.type in ("cuda", "cpu")  # one kernel for every tensor's update
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def lr_factor(step, cfg):
    """Multiplier of every group's peak lr at 0-based step: linear warmup to 1, then cosine down to min_lr_ratio."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- checkpoints
# out/<stage>/: model.safetensors + config.json (what later stages and eval.py read), optimizer.safetensors
# (AdamW's state, flattened as state.<param index>.<name>), train_state.json (step, RNG, data position, config).
# Nothing is pickled: safetensors for tensors, JSON for the rest.

STAGING, COMMIT = ".staging", ".commit"


def save_checkpoint(out, write_files):
    """A whole checkpoint, so that a kill at any moment leaves the previous one or this one, never a mix:
    write_files(folder) writes every file into out/.staging; renaming that folder to out/.commit is the one
    atomic switch; then the files move up into out (finish_commit, which also completes an interrupted move)."""
    os.makedirs(out, exist_ok=True)
    finish_commit(out)
    staging = os.path.join(out, STAGING)
    shutil.rmtree(staging, ignore_errors=True)  # what a save killed half way left
    os.makedirs(staging)
    try:
        write_files(staging)
        for name in os.listdir(staging):  # on the disk before the switch, not only in the page cache
            with open(os.path.join(staging, name), "rb") as f:
                os.fsync(f.fileno())
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        written = sorted(os.listdir(staging), key=lambda n: os.path.getmtime(os.path.join(staging, n)))
        shutil.rmtree(staging, ignore_errors=True)
        name = os.path.basename(error.filename or (written[-1] if written else "the first file"))
        raise ValueError(f"{out}: no space left while writing {name}; the previous checkpoint is intact") from None
    os.replace(staging, os.path.join(out, COMMIT))
    finish_commit(out)


def finish_commit(out):
    """Move a committed checkpoint's files into place, or finish the move a kill interrupted. Idempotent."""
    commit = os.path.join(out, COMMIT)
    if os.path.isdir(commit):
        for name in sorted(os.listdir(commit)):
            os.replace(os.path.join(commit, name), os.path.join(out, name))
        os.rmdir(commit)


def read_safetensors(path):
    """{name: tensor} of a safetensors file. A missing, truncated or corrupt file is a one-line ValueError naming
    the file and, when the header is intact, the first tensor whose bytes are missing."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        header_size = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if 8 + header_size > size:
            raise ValueError(f"{path}: truncated or not a safetensors file (header of {header_size} bytes, "
                             f"file of {size})")
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not a safetensors file (unreadable header)") from None
    for name, spec in header.items():
        end = 8 + header_size + spec["data_offsets"][1] if name != "__metadata__" else 0
        if end > size:
            raise ValueError(f"{path}: truncated: tensor '{name}' needs bytes up to {end}, the file has {size}")
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error type for anything else malformed
        raise ValueError(f"{path}: unreadable safetensors file ({error})") from None


def check_tensors(tensors, shapes, path):
    """tensors must hold exactly the names of shapes {name: shape}, each of that shape."""
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing:
        raise ValueError(f"{path}: tensor '{missing[0]}' is missing ({len(missing)} missing)")
    if extra:
        raise ValueError(f"{path}: unexpected tensor '{extra[0]}' ({len(extra)} unexpected)")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                             f"the model needs {tuple(shape)}")


def load_weights(module, path):
    state = read_safetensors(path)
    check_tensors(state, {k: v.shape for k, v in module.state_dict().items()}, path)
    module.load_state_dict(state)


def config_from_dict(cls, values, path, section=""):
    """A model config from its config.json dict; an unknown field or a refused value names the file and field."""
    if not isinstance(values, dict):
        raise ValueError(f"{path}: field '{section or cls.__name__}' must be an object")
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            raise ValueError(f"{path}: unknown field '{section + '.' if section else ''}{key}'")
    try:
        return cls(**values)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def shapes_of(build):
    """{name: shape} of the state a module would have, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in build().state_dict().items()}


def load_geo_checkpoint(folder):
    """A stage-geo checkpoint -> (GeoConfig, checked state dict)."""
    path = os.path.join(folder, "config.json")
    config = config_from_dict(GeoConfig, read_json(path), path)
    state = read_safetensors(os.path.join(folder, "model.safetensors"))
    check_tensors(state, shapes_of(lambda: GeoBackbone(config)), os.path.join(folder, "model.safetensors"))
    return config, state


def load_psfm_checkpoint(folder):
    """A stage-psfm checkpoint -> (GeoConfig, Spa3RConfig, checked PSFM state dict, frozen backbone included)."""
    path = os.path.join(folder, "config.json")
    saved = read_json(path)
    geo_config = config_from_dict(GeoConfig, saved.get("geo"), path, "geo")
    config = config_from_dict(Spa3RConfig, saved.get("psfm"), path, "psfm")
    state = read_safetensors(os.path.join(folder, "model.safetensors"))
    shapes = shapes_of(lambda: PSFM(config, GeoBackbone(geo_config)))
    check_tensors(state, shapes, os.path.join(folder, "model.safetensors"))
    return geo_config, config, state


def write_model_files(stage, folder):
    """model.safetensors + config.json (the VLM through vlm.save, which eval.py's load_for_eval reads)."""
    if stage.name == "vlm":
        vlm.save(stage.model, folder)
        return
    state = {k: v.detach().cpu().contiguous() for k, v in stage.model.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"))
    write_atomic(os.path.join(folder, "config.json"), (json.dumps(model_config_dict(stage), indent=1) + "\n").encode())


def write_checkpoint(stage, optimizer, cfg, step, num_samples, device, window, folder):
    write_model_files(stage, folder)
    save_file(optimizer_tensors(optimizer), os.path.join(folder, "optimizer.safetensors"))
    state = json.dumps({**train_state(cfg, step, num_samples, device), "window": window}, indent=1) + "\n"
    write_atomic(os.path.join(folder, "train_state.json"), state.encode())


def check_finite_state(model, optimizer, when, out):
    """Never commit NaN or inf weights or AdamW moments: the commit would replace a good checkpoint."""
    tensors = [("weight " + name, p) for name, p in model.named_parameters()]
    tensors += [(f"AdamW state of parameter {i}", v) for i, state in enumerate(optimizer.state.values())
                for v in state.values() if torch.is_tensor(v)]
    for name, tensor in tensors:
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{when}: {name} is not finite; not saved, the previous checkpoint in {out} is kept")


def model_config_dict(stage):
    """config.json of geo and psfm: GeoConfig, or {"geo": GeoConfig, "psfm": Spa3RConfig} (vlm: VLMConfig)."""
    if stage.name == "psfm":
        return {"geo": asdict(stage.config[0]), "psfm": asdict(stage.config[1])}
    return asdict(stage.config)


def optimizer_tensors(optimizer):
    """AdamW's state as flat names state.<param index>.<exp_avg | exp_avg_sq | step>."""
    return {f"state.{i}.{name}": torch.as_tensor(value).detach().cpu().contiguous()
            for i, state in optimizer.state_dict()["state"].items() for name, value in state.items()}


def load_optimizer(optimizer, path):
    tensors = read_safetensors(path)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    shapes = {}
    for i, p in enumerate(params):
        shapes.update({f"state.{i}.step": (), f"state.{i}.exp_avg": p.shape, f"state.{i}.exp_avg_sq": p.shape})
    check_tensors(tensors, shapes, path)
    state = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def encode_bytes(tensor):
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def decode_bytes(text):
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def train_state(cfg, step, num_samples, device):
    """train_state.json: what, besides weights and AdamW, the loop needs to continue exactly."""
    rng = {"torch": encode_bytes(torch.get_rng_state())}
    if device.type == "cuda":
        rng["cuda"] = encode_bytes(torch.cuda.get_rng_state(device))
    seen = step * cfg.batch_size
    return {"stage": cfg.stage, "step": step, "rng": rng, "config": asdict(cfg),
            "data": {"samples_seen": seen, "epoch": seen // num_samples, "train_samples": num_samples}}


SAME_ON_RESUME = ("batch_size", "seed", "num_views", "samples_per_scene", "view_sampling", "spa3r")  # the sample stream and the model


def load_checkpoint(cfg, stage, optimizer, device):
    """Restore weights, AdamW and RNG from cfg.out -> train_state.json's contents (its "step" is where to continue)."""
    state_path = os.path.join(cfg.out, "train_state.json")
    saved = read_json(state_path)
    kinds = {"step": int, "config": dict, "rng": dict, "data": dict}
    for name, kind in kinds.items():
        if not isinstance(saved.get(name), kind):
            raise ValueError(f"{state_path}: field '{name}' must be {kind.__name__}, got {saved.get(name)!r:.40}")
    for name in SAME_ON_RESUME:
        if saved["config"].get(name) != getattr(cfg, name):
            raise ValueError(f"{state_path}: field 'config.{name}' is {saved['config'].get(name)!r}, this run has "
                             f"{getattr(cfg, name)!r}: resume with the same value")
    load_weights(stage.model, os.path.join(cfg.out, "model.safetensors"))
    load_optimizer(optimizer, os.path.join(cfg.out, "optimizer.safetensors"))
    torch.set_rng_state(decode_bytes(saved["rng"]["torch"]))
    if device.type == "cuda" and "cuda" in saved["rng"]:
        torch.cuda.set_rng_state(decode_bytes(saved["rng"]["cuda"]), device)
    return saved


# ----------------------------------------------------------------------------- logging

# Dense bf16 tensor-core peak FLOP/s, matched in order on the lower-cased torch.cuda.get_device_name().
# A GPU not listed gets no MFU (rather than a wrong one).
PEAK_BF16_FLOPS = [
    (r"h100.*pcie", 756e12),
    (r"h100 (80gb hbm3|sxm)", 989e12),  # the SXM card reports itself as "NVIDIA H100 80GB HBM3"
    (r"gh200|h200(?!.*nvl)", 989e12),
    (r"a100", 312e12),
    (r"\bl4\b", 121e12),
    (r"rtx 4090", 165e12),
]


def peak_flops(device_name):
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name.lower()):
            return flops
    return None


def format_duration(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Log:
    """Rank 0's log: lines to the terminal and out/log.txt, numbers to out/metrics.jsonl (one JSON a line).
    On resume the metrics of steps after the checkpoint are dropped: they are about to be run again."""

    def __init__(self, out, rank, start):
        self.enabled = rank == 0
        self.text_path, self.metrics_path = os.path.join(out, "log.txt"), os.path.join(out, "metrics.jsonl")
        if not self.enabled:
            return
        os.makedirs(out, exist_ok=True)
        kept = []
        if start and os.path.exists(self.metrics_path):
            with open(self.metrics_path, encoding="utf-8") as f:
                kept = [line for line in f if is_record_before(line, start)]
        write_atomic(self.metrics_path, "".join(kept).encode())
        if not start:
            write_atomic(self.text_path, b"")

    def line(self, text):
        if self.enabled:
            tqdm.write(text)
            with open(self.text_path, "a", encoding="utf-8") as f:
                f.write(text + "\n")

    def metrics(self, record):
        if self.enabled:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def is_record_before(line, step):
    """A whole metrics line of a step up to `step` (a kill may have cut the last line short)."""
    try:
        return json.loads(line)["step"] <= step
    except (json.JSONDecodeError, KeyError, TypeError):
        return False


def term_text(terms):
    return " ".join(f"{k} {v:.4f}" for k, v in terms.items() if k != "loss")


class Window:
    """Loss terms and throughput since the last log line. Terms stay on the device until a log step, so the
    loop never waits for the GPU in between; one all_reduce then sums them over ranks."""

    def __init__(self, device):
        self.device = device
        self.reset()
        self.started = time.time()

    def reset(self):
        self.sums, self.weight, self.tokens, self.flops, self.steps, self.paused = {}, 0, 0, 0.0, 0, 0.0
        self.finite, self.batches = [], []

    def count(self, tokens, flops):
        self.tokens, self.flops, self.steps = self.tokens + tokens, self.flops + flops, self.steps + 1

    def add(self, loss, terms, weight, step, batch):
        for name, value in {"loss": loss.detach(), **terms}.items():
            self.sums[name] = self.sums.get(name, 0) + value.float() * weight
        self.weight += weight
        self.finite.append(torch.isfinite(loss.detach()))  # read at the next log step or save: no sync here
        self.batches.append((step + 1, batch.get("scene") or batch.get("ids")))

    def check_finite(self, stage_name, world):
        """Raise, on every rank, if a micro-batch since the last log line had a NaN or inf loss, naming the first
        such step and its scenes (geo, psfm) or record ids (vlm) where this rank saw it."""
        bad = [i for i, ok in enumerate(torch.stack(self.finite).tolist()) if not ok] if self.finite else []
        if all_reduce_sum(torch.tensor([float(len(bad))], device=self.device), world).item():
            step, names = self.batches[bad[0]] if bad else (None, None)
            where = f"at step {step} (batch: {', '.join(map(str, names[:8]))})" if bad else "on another rank"
            raise ValueError(f"{stage_name}: the loss is not finite {where}; lower --lr or check the data")

    def pending(self, world):
        """The loss sums since the last log line, over all ranks: a checkpoint between log steps keeps them, so
        the first line logged after a resume is the one an uninterrupted run logs."""
        if not self.sums:
            return {"sums": {}, "weight": 0}
        local = torch.stack([*self.sums.values(), torch.tensor(float(self.weight), device=self.device)]).double()
        *sums, weight = all_reduce_sum(local, world).tolist()
        return {"sums": dict(zip(self.sums, sums)), "weight": weight}

    def restore(self, pending):
        self.sums = {name: torch.tensor(value, dtype=torch.float32, device=self.device)
                     for name, value in pending["sums"].items()}
        self.weight = pending["weight"]

    def pause(self, seconds):
        """Validation and checkpoint time does not count against throughput."""
        self.paused += seconds

    def report(self, world, device, batch_size):
        """-> ({"loss", term: mean over the window and all ranks},
               {seconds_per_step, samples_per_s, tokens_per_s, flops_per_s}, whether any rank got SIGTERM)."""
        local = torch.stack([*self.sums.values()]).double()
        extra = torch.tensor([self.weight, self.tokens, self.flops, SIGTERM["received"]], dtype=torch.float64,
                             device=device)
        reduced = all_reduce_sum(torch.cat([local, extra]), world).tolist()
        weight, tokens, flops, stop = reduced[len(self.sums):]
        means = {name: value / weight for name, value in zip(self.sums, reduced)}
        seconds = max(time.time() - self.started - self.paused, 1e-9)
        speed = {"seconds_per_step": seconds / self.steps, "samples_per_s": self.steps * batch_size / seconds,
                 "tokens_per_s": tokens / seconds, "flops_per_s": flops / seconds}
        self.reset()
        self.started = time.time()
        return means, speed, stop > 0


def log_train_step(log, bar, cfg, step, means, speed, grad_norm, peak, world):
    lr = lr_factor(step - 1, cfg) * (cfg.lr_lm if cfg.stage == "vlm" else cfg.lr)  # the lr the last step ran at
    tokens_per_s = speed["tokens_per_s"] if cfg.stage == "vlm" else None
    mfu = speed["flops_per_s"] / (peak * world) if peak else None  # unknown device: no MFU rather than a wrong one
    text = (f"{cfg.stage} step {step}/{cfg.steps} | loss {means['loss']:.4f} | {term_text(means)} | lr {lr:.2e} | "
            f"grad {grad_norm:.3f} | {speed['samples_per_s']:.1f} samples/s")
    text += f" | {tokens_per_s:.0f} tokens/s" if tokens_per_s is not None else ""
    text += f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
    log.line(text + f" | ETA {format_duration((cfg.steps - step) * speed['seconds_per_step'])}")
    bar.set_postfix(loss=f"{means['loss']:.4f}")
    log.metrics({"step": step, "split": "train", **means, "lr": lr, "grad_norm": grad_norm,
                 "samples_per_s": speed["samples_per_s"], "tokens_per_s": tokens_per_s, "mfu": mfu})


# ----------------------------------------------------------------------------- validation

@dataclass
class Run:
    """Where this process sits and how it splits the global batch."""
    rank: int
    world: int
    device: torch.device
    micro_batch: int   # samples per forward pass on this rank
    accum: int         # micro-steps per optimizer step
    autocast: object   # bf16 autocast on CUDA, else a null context


@torch.no_grad()
def validate(stage, cfg, run):
    """Mean loss terms over the first eval_samples held-out samples, split across ranks by micro-batches and
    weighted as in training; each sample's masks depend on its position only, so any world size agrees."""
    n, m = len(stage.val_set), run.micro_batch
    chunks = [list(range(first, min(first + m, cfg.eval_samples))) for first in range(0, cfg.eval_samples, m)]
    mine, counted = chunks[run.rank::run.world], 1
    if not mine:  # more ranks than micro-batches: run one anyway (for the term names), counted as nothing
        mine, counted = chunks[:1], 0
    loader = torch.utils.data.DataLoader(EpochItems(stage.val_set), collate_fn=stage.collate,
                                         batch_sampler=[[(0, p % n) for p in chunk] for chunk in mine])
    stage.model.eval()
    sums, total_weight = 0, 0
    for chunk, batch in zip(mine, loader):
        weight = batch_weight(stage, batch) * counted
        generator = masking_generator(cfg.seed, 0, chunk[0], cfg.num_views, validation=True)
        with run.autocast:
            loss, terms = stage_loss(stage, stage.model, to_device(batch, run.device), generator)
        names = ["loss", *terms]
        sums = sums + torch.stack([loss.float(), *(t.float() for t in terms.values())]).double() * weight
        total_weight += weight
    stage.model.train()
    local = torch.cat([sums, torch.tensor([float(total_weight)], dtype=torch.float64, device=run.device)])
    reduced = all_reduce_sum(local, run.world)
    return dict(zip(names, (reduced[:-1] / reduced[-1]).tolist()))


# ----------------------------------------------------------------------------- gates: each stage vs its trivial baseline
# A falling training loss proves nothing. On held-out samples each stage is compared with what a model that
# learned nothing useful scores on the same samples: geo with the identity pose and the per-pixel mean depth,
# psfm with the cameras of another sample and the mean token, its latent (by linear probes) with a randomly
# initialised encoder, the VLM with another record's images or latent. Each gate row holds per-sample errors
# of both; it passes when the paired bootstrap 95 % interval of (model - baseline) lies wholly below 0.

GATE_BATCH = 8  # held-out samples per forward pass of a gate (>= 2: "another sample" rolls the batch)


def gate_row(name, model_errors, baseline_errors, baseline, shown=None):
    """One gate: per-sample errors (lower is better) of the model and its baseline on the same samples.
    shown = (model value, baseline value) to print instead of the mean errors (R² for the probes)."""
    diff, lo, hi = paired_bootstrap((model_errors - baseline_errors).tolist())
    model_value, baseline_value = shown or (float(model_errors.mean()), float(baseline_errors.mean()))
    return {"gate": name, "model": model_value, "baseline": baseline_value, "baseline_name": baseline,
            "diff": diff, "lo": lo, "hi": hi, "n": len(model_errors), "pass": hi < 0}


def per_sample(errors, valid):
    """Mean of errors (B, ...) over the valid entries of each sample -> (B,)."""
    dims = tuple(range(1, errors.dim()))
    return (errors * valid).sum(dims) / valid.sum(dims).clamp_min(1)


@torch.no_grad()
def geo_gates(model, batches):
    """Held-out pose errors (views 1.., view 0 is the identity by definition) vs the identity pose, and log-depth
    L1 vs the per-pixel mean log depth of the held-out samples themselves (a baseline that has seen the answers)."""
    errors, depth, valid, predicted = {}, [], [], []
    for batch in batches:
        pred = model(batch["images"])
        target = relative_to_view0(batch["pose"])[:, 1:]  # (B, V - 1, 4, 4)
        pose = pred["pose"][:, 1:]
        identity = torch.eye(4, device=pose.device).expand_as(pose)
        for name, estimate in (("model", pose), ("identity", identity)):
            errors.setdefault(f"translation/{name}", []).append((estimate[..., :3, 3] - target[..., :3, 3]).abs().mean((1, 2)))
            errors.setdefault(f"rotation/{name}", []).append((estimate[..., :3, :3] - target[..., :3, :3]).abs().mean((1, 2, 3)))
        depth.append(batch["depth"].clamp_min(1e-6).log())
        valid.append(batch["depth"] > 0)
        predicted.append(pred["log_depth"].float())
    e = {k: torch.cat(v).cpu() for k, v in errors.items()}
    depth, valid, predicted = torch.cat(depth), torch.cat(valid), torch.cat(predicted)
    mean_map = (depth * valid).sum((0, 1)) / valid.sum((0, 1)).clamp_min(1)  # (H, W) over samples and views
    return [gate_row("geo: translation L1 (m)", e["translation/model"], e["translation/identity"], "identity pose"),
            gate_row("geo: rotation L1", e["rotation/model"], e["rotation/identity"], "identity pose"),
            gate_row("geo: log-depth L1", per_sample((predicted - depth).abs(), valid).cpu(),
                     per_sample((mean_map - depth).abs(), valid).cpu(), "per-pixel mean depth")]


@torch.no_grad()
def psfm_gates(model, batches, seed, num_views):
    """On the masked (unseen) views: 1 - cosine of the predicted geo field with the query cameras PSFM uses vs
    the cameras of another sample (a decoder that ignores cameras scores the same) vs the held-out mean token
    of each patch position; the depth probe vs the per-position mean log depth."""
    errors, targets, masks, depths, depth_valid = {}, [], [], [], []
    p = model.backbone.config.patch_size
    for k, batch in enumerate(batches):
        generator = masking_generator(seed, 0, k * GATE_BATCH, num_views, validation=True)
        context, target, latent, K, pose = model.context_pass(batch, generator)
        masked = ~context  # (B, V)

        def field_and_error(K, pose):  # the field along these cameras' rays, its 1 - cos on the unseen views
            field = model.decode(latent, K, pose, batch["images"].shape[-2:])
            cos = 1 - F.cosine_similarity(model.geo_head(field).float(), target.float(), dim=-1).mean(-1)  # (B, V)
            return field, per_sample(cos, masked)
        field, own = field_and_error(K, pose)
        other = torch.roll(torch.arange(len(K)), 1)  # each sample gets the next sample's cameras
        errors.setdefault("own", []).append(own)
        errors.setdefault("other", []).append(field_and_error(K[other], pose[other])[1])
        log_depth, valid = patch_log_depth(batch["depth"], p)
        valid = valid & masked[..., None]
        probe = model.depth_probe(field).squeeze(-1).float()
        errors.setdefault("probe", []).append(per_sample((probe - log_depth).abs(), valid))
        targets.append(target.float()), masks.append(masked), depths.append(log_depth), depth_valid.append(valid)
    e = {k: torch.cat(v).cpu() for k, v in errors.items()}
    target, masked, log_depth, valid = torch.cat(targets), torch.cat(masks), torch.cat(depths), torch.cat(depth_valid)
    mean_token = (target * masked[..., None, None]).sum((0, 1)) / masked.sum()  # (N, Dg)
    mean_cos = per_sample(1 - F.cosine_similarity(mean_token, target, dim=-1).mean(-1), masked).cpu()
    mean_depth = (log_depth * valid).sum((0, 1)) / valid.sum((0, 1)).clamp_min(1)  # (N,)
    return [gate_row("psfm: unseen-view geo 1-cos", e["own"], e["other"], "cameras of another sample"),
            gate_row("psfm: unseen-view geo 1-cos", e["own"], mean_cos, "mean token"),
            gate_row("psfm: unseen-view depth probe L1", e["probe"],
                     per_sample((mean_depth - log_depth).abs(), valid).cpu(), "per-position mean depth")]


# Linear probes: 3D quantities of a sample read off its features by ridge regression fitted on training scenes.
PROBES = ("log floor area", "relative yaw (cos)", "relative yaw (sin)", "camera distance", "largest-object distance")


def probe_targets(batch, rooms):
    """(B, 5) quantities the latent should hold: log floor area; cos and sin of view 1's heading in view 0's
    frame and the distance between their cameras; the distance from view 0's camera to the largest object."""
    pose = relative_to_view0(batch["pose"]).cpu()
    forward = pose[:, 1, :3, 2]  # view 1's optical axis in view 0's camera (x right, z forward)
    yaw = torch.atan2(forward[:, 0], forward[:, 2])
    world = batch["pose"].cpu()
    rows = []
    for b, room in enumerate(rooms):
        largest = max(room["objects"], key=lambda o: math.prod(o["size"]))
        distance = (torch.tensor(largest["center"]) - world[b, 0, :3, 3]).norm()
        rows.append([math.log(room["room"]["floor_area"]), yaw[b].cos(), yaw[b].sin(),
                     pose[b, 1, :3, 3].norm(), distance])
    return torch.tensor(rows, dtype=torch.float64)


@torch.no_grad()
def probe_features(model, random_encoder, batch):
    """{name: (B, F)}: the Spa3R latent, the ViT features, a random encoder's latent, each averaged over its
    tokens (and views), so that every probe reads the same number of features."""
    images = batch["images"]
    tokens = model.backbone(images)["tokens"]  # (B, V, N, Dg)
    vit = model.backbone.vit(images.flatten(0, 1))[:, model.backbone.config.num_registers:]  # (B * V, N, Dg)
    return {"latent": model.encoder(tokens, model.grid(images)).mean(1),
            "ViT features": vit.reshape(len(images), -1, vit.shape[-1]).mean(1),
            "random encoder": random_encoder(tokens, model.grid(images)).mean(1)}


def ridge_fit_predict(train_x, train_y, test_x, lambdas=(1e-2, 1e-1, 1, 10, 100, 1000)):
    """Ridge regression on standardised features, its strength chosen on the last fifth of the training rows,
    then refitted on all of them -> predictions for test_x (n, targets). float64 throughout."""
    def fit(x, y, lam):
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        xs = (x - mean) / std
        w = torch.linalg.solve(xs.T @ xs + lam * torch.eye(x.shape[1], dtype=x.dtype), xs.T @ (y - y.mean(0)))
        return lambda z: (z - mean) / std @ w + y.mean(0)
    cut = len(train_x) * 4 // 5
    scores = [((fit(train_x[:cut], train_y[:cut], lam)(train_x[cut:]) - train_y[cut:]) ** 2).sum() for lam in lambdas]
    best = lambdas[int(torch.stack(scores).argmin())]
    return fit(train_x, train_y, best)(test_x)


def r2(errors, y):
    """Coefficient of determination of each column from squared errors (n, k) and targets (n, k)."""
    return 1 - errors.mean(0) / y.var(0, unbiased=False).clamp_min(1e-12)


@torch.no_grad()
def probe_gates(model, train_batches, val_batches, rooms_of, seed):
    """Per probed quantity: held-out R² of the latent vs a randomly initialised encoder (the gate) and vs the
    ViT features (shown in the row's name)."""
    with torch.random.fork_rng():  # the random encoder must not move the training RNG
        torch.manual_seed(seed + 1)
        random_encoder = Spa3REncoder(model.config, model.backbone.config.dim).to(next(model.parameters()).device)
        random_encoder.apply(init_weights)

    def collect(batches):
        feats, ys = {}, []
        for batch in batches:
            for name, f in probe_features(model, random_encoder, batch).items():
                feats.setdefault(name, []).append(f.double().cpu())
            ys.append(probe_targets(batch, rooms_of(batch)))
        return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(ys)
    (train_x, train_y), (val_x, val_y) = collect(train_batches), collect(val_batches)
    sq = {name: (ridge_fit_predict(train_x[name], train_y, val_x[name]) - val_y) ** 2 for name in train_x}
    rows = []
    for j, quantity in enumerate(PROBES):
        score = {name: float(r2(sq[name][:, j:j + 1], val_y[:, j:j + 1])) for name in sq}
        rows.append(gate_row(f"probe R² {quantity} (ViT features {score['ViT features']:.2f})", sq["latent"][:, j],
                             sq["random encoder"][:, j], "random encoder", (score["latent"], score["random encoder"])))
    return rows


def partners(keys, scenes):
    """For each record, the next record (cyclically) with the same key from another scene, or -1 if none."""
    out = []
    for i in range(len(keys)):
        order = [(i + k) % len(keys) for k in range(1, len(keys))]
        out.append(next((j for j in order if keys[j] == keys[i] and scenes[j] != scenes[i]), -1))
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def vlm_gates(model, batches):
    """Held-out answer cross-entropy per record. The baseline must use its images: its own vs another scene's
    (of a record with as many images; records without one are left out). A VLM with a spatial branch must use
    it: its own latent vs another scene's (Spa3-VLM's images then still come from its own scene)."""
    errors = {}
    for batch in batches:
        own = model.record_losses(batch)
        if model.adapter is None:
            per_record = list(batch["images"].split(batch["num_images"].tolist()))
            other = partners(batch["num_images"].tolist(), batch["scenes"])
            swapped = torch.cat([per_record[j] if j >= 0 else x for x, j in zip(per_record, other.tolist())])
            swapped_loss = model.record_losses({**batch, "images": swapped})
        else:
            other = partners([0] * len(own), batch["scenes"])
            swapped_loss = model.record_losses(batch, other.clamp_min(0))
        errors.setdefault("own", []).append(own[other >= 0])
        errors.setdefault("other", []).append(swapped_loss[other >= 0])
    e = {k: torch.cat(v).cpu() for k, v in errors.items()}
    what = "another scene's images" if model.adapter is None else "another scene's latent"
    return [gate_row("vlm: answer CE", e["own"], e["other"], what)]


def stage_gates(stage, cfg, run):
    """The gate rows of the stage on cfg.eval_samples held-out samples (and, for the psfm probes, probe_samples
    training samples), one batch of GATE_BATCH at a time."""
    def batches(dataset, count, spread=False):
        # QA records come grouped by scene and task: a seeded spread makes partners from other scenes common
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed)) if spread else None
        count = min(count, len(dataset))  # never the same sample twice: the intervals assume distinct samples
        count = max(GATE_BATCH, count - count % GATE_BATCH)
        for first in range(0, count, GATE_BATCH):
            picks = [i % len(dataset) for i in range(first, first + GATE_BATCH)]
            items = [dataset[int(order[i]) if spread else i] for i in picks]
            yield to_device(stage.collate(items), run.device)

    stage.model.eval()
    with run.autocast:
        if stage.name == "geo":
            rows = geo_gates(stage.model, batches(stage.val_set, cfg.eval_samples))
        elif stage.name == "psfm":
            rows = psfm_gates(stage.model, batches(stage.val_set, cfg.eval_samples), cfg.seed, cfg.num_views)
            # probes on overlapping views: how one camera sits relative to another is only knowable when they overlap
            probe_train, probe_val = view_datasets(replace(cfg, view_sampling="near"), stage.config[0].image_size)
            rooms_of = lambda batch: [probe_val.store.scene(s)["meta"] for s in batch["scene"]]
            rows += probe_gates(stage.model, batches(probe_train, cfg.probe_samples),
                                batches(probe_val, cfg.eval_samples), rooms_of, cfg.seed)
        else:
            rows = vlm_gates(stage.model, batches(stage.val_set, cfg.eval_samples, spread=True))
    stage.model.train()
    return rows


def gate_text(row):
    return (f"gate {row['gate']}: {row['model']:.4f} vs {row['baseline_name']} {row['baseline']:.4f} | "
            f"difference {row['diff']:+.4f} [{row['lo']:+.4f}, {row['hi']:+.4f}] | {'PASS' if row['pass'] else 'FAIL'}")


# ----------------------------------------------------------------------------- the training loop

@contextmanager
def out_lock(out, rank):
    """One training process per --out (two would overwrite each other's checkpoints): rank 0 holds out/train.lock,
    which names its host and pid; a lock left by a process that is gone (kill -9) is taken over."""
    if rank:
        yield
        return
    os.makedirs(out, exist_ok=True)
    path, me = os.path.join(out, "train.lock"), f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            with open(path, "x") as f:
                f.write(me)
            break
        except FileExistsError:
            with open(path) as f:
                owner = f.read()
            host, _, pid = owner.partition(" ")
            if not (host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))):
                raise ValueError(f"{out}: another train.py ({owner or 'unknown'}) is training into it; "
                                 f"if it is gone, delete {path}") from None
            os.remove(path)  # stale
    try:
        yield
    finally:
        os.remove(path)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def train_stage(cfg, model_args, rank, world, device):
    """Build the stage, continue from its checkpoint with --resume, run the remaining steps, save."""
    if rank == 0:  # a kill during a save may have left a commit half moved: complete it before anyone reads
        for folder in (cfg.out, cfg.init_geo, cfg.init_spa3r):
            finish_commit(folder)
    barrier(world)
    if not cfg.resume and not cfg.overwrite and os.path.exists(os.path.join(cfg.out, "train_state.json")):
        raise ValueError(f"{cfg.out}: holds a checkpoint; --resume continues it, --overwrite starts over "
                         "(its first save replaces it)")
    with out_lock(cfg.out, rank):
        train_one_stage(cfg, model_args, rank, world, device)


def train_one_stage(cfg, model_args, rank, world, device):
    stage = BUILDERS[cfg.stage](cfg, model_args)
    for split, dataset in (("training", stage.train_set), ("held-out", stage.val_set)):
        if len(dataset) == 0 and (split == "training" or cfg.eval_every):
            raise ValueError(f"{cfg.data}: no {split} samples for stage {cfg.stage}")
    micro_batch = cfg.micro_batch or cfg.batch_size // world
    if micro_batch < 1 or cfg.batch_size % (world * micro_batch):
        raise ValueError(f"--batch_size={cfg.batch_size} must be a multiple of world size x micro-batch "
                         f"= {world} x {micro_batch}")
    use_autocast = cfg.bf16 and device.type == "cuda"
    run = Run(rank, world, device, micro_batch, cfg.batch_size // (world * micro_batch),
              torch.autocast("cuda", torch.bfloat16) if use_autocast else nullcontext())
    stage.model.to(device)
    optimizer = make_optimizer(stage.groups, device)
    resumed = cfg.resume and os.path.exists(os.path.join(cfg.out, "train_state.json"))
    saved = load_checkpoint(cfg, stage, optimizer, device) if resumed else None
    start = saved["step"] if saved else 0
    log = Log(cfg.out, rank, start)
    log_header(log, cfg, stage, run, saved)
    if start < cfg.steps:
        run_steps(cfg, stage, run, optimizer, log, start, saved and saved.get("window"))
    else:
        log.line(f"{cfg.stage}: already trained to step {start} of {cfg.steps}")
    barrier(world)  # the next stage reads this one's checkpoint


def run_steps(cfg, stage, run, optimizer, log, start, pending=None):
    """Steps start..cfg.steps-1 with logging, validation and checkpoints; stops early, saved, on SIGTERM."""
    rank, world, device = run.rank, run.world, run.device
    runner = torch.compile(stage.model) if cfg.compile else stage.model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=device_ids)
    num_samples = len(stage.train_set)
    sampler = RankBatches(num_samples, cfg.batch_size, run.micro_batch, rank, world, cfg.seed, start, cfg.steps)
    batches = iter(torch.utils.data.DataLoader(EpochItems(stage.train_set), batch_sampler=sampler,
                                               collate_fn=stage.collate, num_workers=cfg.workers,
                                               worker_init_fn=ignore_sigterm, pin_memory=device.type == "cuda"))
    peak = peak_flops(torch.cuda.get_device_name(device)) if cfg.bf16 and device.type == "cuda" else None
    bar = tqdm(total=cfg.steps, initial=start, desc=cfg.stage, mininterval=1, dynamic_ncols=True,
               disable=True if rank else None)  # None: off when stderr is not a terminal
    window = Window(device)
    if pending and rank == 0:  # the loss sums of the steps since the last log line before the checkpoint
        window.restore(pending)

    def save(step):  # every rank checks; rank 0 writes; the others wait for it at their next collective
        window.check_finite(cfg.stage, world)
        check_finite_state(stage.model, optimizer, f"{cfg.stage} step {step}", cfg.out)
        unlogged = window.pending(world)
        if rank == 0:
            write = partial(write_checkpoint, stage, optimizer, cfg, step, num_samples, device, unlogged)
            save_checkpoint(cfg.out, write)

    for step in range(start, cfg.steps):
        micro = [next(batches) for _ in range(run.accum)]
        grad_norm = train_step(stage, runner, optimizer, micro, step, cfg, run, window)
        bar.update()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            window.check_finite(cfg.stage, world)
            means, speed, stop = window.report(world, device, cfg.batch_size)
            log_train_step(log, bar, cfg, done, means, speed, float(grad_norm), peak, world)
            if stop:  # every rank learnt it from the same all_reduce, so all stop at this step
                save(done)
                log.line(f"{cfg.stage}: SIGTERM: checkpoint of step {done} saved in {cfg.out}; --resume continues")
                barrier(world)
                raise SystemExit(f"train.py: stopped by SIGTERM at {cfg.stage} step {done}")
        started = time.time()
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            val = validate(stage, cfg, run)
            log.line(f"{cfg.stage} step {done}/{cfg.steps} | val loss {val['loss']:.4f} | {term_text(val)}")
            log.metrics({"step": done, "split": "val", **val})
            if rank == 0:  # the gates: this stage against its trivial baselines on held-out samples
                rows = stage_gates(stage, cfg, run)
                for row in rows:
                    log.line(f"{cfg.stage} step {done}/{cfg.steps} | {gate_text(row)}")
                log.metrics({"step": done, "split": "gates", "gates": rows})
        if done % cfg.save_every == 0 or done == cfg.steps:
            save(done)
        window.pause(time.time() - started)  # validation and checkpoints do not count against throughput
    bar.close()
    log.line(f"{cfg.stage}: done, checkpoint in {cfg.out}")


def train_step(stage, runner, optimizer, micro, step, cfg, run, window):
    """One optimizer step on this rank's micro-batches -> the gradient norm before clipping."""
    weights = [batch_weight(stage, b) for b in micro]
    window.count(sum(batch_tokens(stage, b) for b in micro), sum(batch_flops(stage, b, cfg.num_views) for b in micro))
    total_weight = all_reduce_sum(torch.tensor(float(sum(weights)), device=run.device), run.world)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, cfg)
    for k, (batch, weight) in enumerate(zip(micro, weights)):
        offset = micro_offset(k, run.rank, run.world, run.micro_batch)
        generator = masking_generator(cfg.seed, step, offset, cfg.num_views)
        with runner.no_sync() if run.world > 1 and k < run.accum - 1 else nullcontext():  # all-reduce once, at the last
            with run.autocast:
                loss, terms = stage_loss(stage, runner, to_device(batch, run.device), generator)
            # DDP averages gradients over ranks; x world makes it the sum of the weighted micro-batch losses
            (loss * (weight * run.world / total_weight)).backward()
        window.add(loss, terms, weight, step, batch)
    grad_norm = nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                         cfg.clip if cfg.clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def log_header(log, cfg, stage, run, saved):
    params = list(stage.model.parameters())
    where = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else run.device.type
    trainable = sum(p.numel() for p in params if p.requires_grad)
    what = f"resuming at step {saved['step']}" if saved else "starting"
    log.line(f"{cfg.stage}: {what} | {run.world} process(es) on "
             f"{where} | global batch {cfg.batch_size} = {run.world} x {run.micro_batch} x {run.accum} accumulation | "
             f"{trainable:,} trainable of {sum(p.numel() for p in params):,} parameters | "
             f"{len(stage.train_set)} training samples")
    log.line("config " + json.dumps({"train": asdict(cfg), "model": model_config_dict(stage)}))
    if cfg.resume and not saved:
        log.line(f"{cfg.stage}: --resume, but no checkpoint in {cfg.out} yet: starting from step 0")
    if saved and saved["data"].get("train_samples") != len(stage.train_set):
        log.line(f"{cfg.stage}: note: the checkpoint saw {saved['data'].get('train_samples')} training samples, "
                 f"the data now has {len(stage.train_set)}: the run goes on, but not as it would have unchanged")


# ----------------------------------------------------------------------------- main

def main(argv):
    flat_args, model_args = split_arguments(argv)
    first = parse_args(flat_args, TrainConfig())
    if first.stage not in ("",) + STAGES:
        raise SystemExit(f"--stage must be one of {', '.join(STAGES)} (or absent for all three), got {first.stage!r}")
    if first.preset not in ("", "tiny", "reference"):
        raise SystemExit(f"--preset must be 'tiny' or 'reference', got {first.preset!r}")
    rank, world, device = setup_processes(first.device)
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        preset = first.preset or ("reference" if device.type == "cuda" else "tiny")
        stages = [first.stage] if first.stage else list(STAGES)
        configs = [stage_config(flat_args, stage, preset, not first.stage) for stage in stages]
        ensure_data(configs[0].data, preset, stages, rank, world)
        for cfg in configs:
            train_stage(cfg, model_args, rank, world, device)
    except ValueError as error:  # bad input: one line naming the file and the field, no traceback
        raise SystemExit(f"train.py{f' [rank {rank}]' if world > 1 else ''}: {error}") from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
