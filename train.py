"""train.py: trains nanoSpa3R's three stages, on one CPU or many GPUs, and resumes without loss.

    geo   model.GeoBackbone learns depth and cameras from the generator's ground truth  -> out/geo
    psfm  psfm.PSFM: the Spa3R encoder + field decoder on the frozen backbone           -> out/psfm  (reads out/geo)
    vlm   vlm.SpaVLM answers the QA records with the Spa3R latent (frozen) inside      -> out/vlm   (reads out/psfm)

    python train.py                                     # all three stages in order; the data is generated if absent
    python train.py --stage=geo --steps=500 --geo.dim=96
    torchrun --standalone --nproc_per_node=8 train.py   # the same on 8 GPUs (DDP over NCCL; gloo on CPU)
    python train.py --stage=vlm --spa3r=none --out=out/vlm_none   # the baseline VLM for the ablation
    python train.py --stage=vlm --spa3r=random --out=out/vlm_random   # its control: Spa3R's encoder untrained
    python train.py --help                              # every flag with its default

A step is the same whatever the world size: the training samples form one stream (epoch e is a permutation
seeded by (seed, e)); step s takes the next batch_size positions, each rank reads micro-batches of them and
weights each micro-batch's mean loss by its share of the step (samples; answer tokens for vlm), so the summed
gradient is that of the whole batch in one process. Every random choice of a sample (views, PSFM's view mask)
comes from its position, so a checkpoint's data cursor is just its step. Checkpoints are written whole or not at
all, every save_every steps, at the end and on SIGTERM; --resume continues bit for bit on CPU. At every
validation rank 0 also measures the stage against its trivial baseline on held-out samples (the gates).
"""
import errno
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from functools import lru_cache, partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

import data
import vlm
from data import to_device
from eval import paired_bootstrap
from generate_spar import TASKS, GenConfig, announce, generate, parse_args
from model import GeoBackbone, GeoConfig, geo_loss, init_weights, relative_to_view0
from model import flops_per_sample as geo_flops_per_sample
from psfm import PSFM, Spa3RConfig, Spa3REncoder, patch_log_depth
from psfm import flops_per_sample as psfm_flops_per_sample
from psfm import backbone_flops_per_sample as psfm_backbone_flops

STAGES = ("geo", "psfm", "vlm")


# ----------------------------------------------------------------------------- configuration

@dataclass
class TrainConfig:
    stage: str = ""             # geo | psfm | vlm; empty: all three in order, each from the one before
    preset: str = ""            # tiny | reference: model, data and the defaults below; empty: reference on CUDA
    data: str = ""              # data directory, generated if absent or empty; empty: data/spar(_tiny)
    out: str = ""               # checkpoint directory; empty: out/<stage>; without --stage: the parent of the three
    resume: bool = False        # continue from the checkpoint in --out (a fresh start when there is none yet)
    overwrite: bool = False     # start over in an --out that holds a checkpoint (refused without this or --resume)
    init_geo: str = ""          # psfm, and vlm with --spa3r=none: the geo checkpoint; empty: out/geo; "none": random
    init_spa3r: str = ""        # vlm: the psfm checkpoint (Spa3R and the vision ViT's start); empty: out/psfm
    spa3r: str = "psfm"         # vlm: psfm = Spa3-VLM; none = the baseline without the spatial branch; oracle = true 3D;
                                # random = Spa3-VLM with its Spa3R encoder re-initialised (the control for PSFM pretraining)
    cache_latent: bool = False  # vlm, psfm | random: each record's frozen Spa3R latent computed once before training,
                                # not at every step (holds records x L x Ds floats: for small sets trained many epochs)
    init_lm: str = ""           # vlm: start the LM (and its tokenizer) from this local Llama-architecture checkpoint
    steps: int = 600            # optimizer steps
    batch_size: int = 8         # global batch (samples per optimizer step), the same for any number of processes
    micro_batch: int = 0        # samples per forward pass on each rank; 0 = batch_size / world size (no accumulation)
    num_views: int = 4          # geo, psfm: views per sample (view 0 is the reference)
    samples_per_scene: int = 1  # geo, psfm: samples (view subsets) per scene in an epoch
    tasks: str = ""             # vlm: train on these tasks only (comma-separated; empty: all)
    view_sampling: str = "near"  # geo, psfm: near = views near a random view 0 (they overlap); random = any
    lr: float = 2e-3            # geo, psfm: peak learning rate
    lr_lm: float = 2e-3         # vlm: per-module peak learning rates
    lr_vision: float = 5e-4     # only used with --vlm.freeze_vision=false
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
    eval_every: int = 200       # validation and gates every this many steps and at the end (0: never)
    eval_samples: int = 32      # held-out samples of the validation loss and the gates
    probe_samples: int = 256    # psfm gates: training samples the linear probes are fitted on
    save_every: int = 200       # checkpoint every this many steps and at the end


# What differs from TrainConfig's defaults by preset and stage; command-line flags override both.
# reference: about 9e18 training FLOP by the models' flops functions, roughly an hour on 8 H100s at 30 % MFU.
PRESET_DEFAULTS = {
    ("tiny", "geo"): dict(),
    # the paper's 2e-3 is for 384 samples a step; at 8 it leaves the encoder worse than none trained (dev data, 1000
    # steps, unseen-view 1-cos: 0.113 at 2e-3, 0.092 at 5e-4, 0.097 with the encoder frozen at its random start)
    ("tiny", "psfm"): dict(lr=5e-4),
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
DATA_DEFAULTS = {  # the data generated when --data is absent (GenConfig fields)
    "tiny": dict(out="data/spar_tiny", scenes=64, val_scenes=8, views=12, random_views=4, res=32),
    "reference": dict(out="data/spar", scenes=1024, val_scenes=64, res=224),  # ~7.5 GB
}
MODEL_CONFIGS = {"geo": GeoConfig, "psfm": Spa3RConfig, "lm": vlm.LMConfig, "vlm": vlm.VLMConfig}  # --geo.dim=96


def stage_config(argv, stage, preset, all_stages):
    """(TrainConfig, {section: model config}) of one stage: defaults, then the preset's, then the command line."""
    cfg = TrainConfig(**PRESET_DEFAULTS[preset, stage])
    models = {name: cls.reference() if preset == "reference" else cls.tiny() for name, cls in MODEL_CONFIGS.items()}
    parse_args(argv, cfg, models)
    try:
        models = {name: replace(config) for name, config in models.items()}  # each config checks itself again
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if not any(arg.startswith("--lm.vocab_size=") for arg in argv):
        models["lm"].vocab_size = None  # build_vlm sizes it to the data's tokenizer
    root = (cfg.out or "out") if all_stages else "out"
    cfg.stage, cfg.preset = stage, preset
    cfg.out = os.path.join(root, stage) if all_stages else (cfg.out or os.path.join("out", stage))
    cfg.data = cfg.data or DATA_DEFAULTS[preset]["out"]
    cfg.init_geo = cfg.init_geo or os.path.join(root, "geo")
    cfg.init_spa3r = cfg.init_spa3r or os.path.join(root, "psfm")
    for name, allowed in (("view_sampling", ("near", "random")), ("spa3r", ("psfm", "random", "none", "oracle"))):
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    for name in ("steps", "batch_size", "log_every", "save_every", "num_views") + (("eval_samples",) if cfg.eval_every else ()):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if stage == "psfm" and cfg.num_views < 2:
        raise SystemExit(f"--num_views must be at least 2 for stage psfm (context and masked views), got {cfg.num_views}")
    for name in ("out", "data"):
        folder = os.path.abspath(getattr(cfg, name))
        while not os.path.exists(folder):  # the first part of the path that exists must be a folder
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise SystemExit(f"--{name}={getattr(cfg, name)}: {folder} is a file, not a folder")
    return cfg, models


# ----------------------------------------------------------------------------- processes, devices, data

def setup_processes(device_name):
    """RANK / LOCAL_RANK / WORLD_SIZE from torchrun's environment (absent: one process) -> (rank, world, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not device_name:  # MPS only for one process: DDP has no MPS backend
        device_name = data.best_device() if world == 1 else "cuda" if torch.cuda.is_available() else "cpu"
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not available.get(device_name):
        raise SystemExit(f"--device={device_name}: not available on this machine (cuda, mps or cpu)")
    device = torch.device(f"cuda:{local_rank}" if device_name == "cuda" else device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # the fp32 parts
    if world > 1:  # long timeout: rank 0 may be generating data or writing a checkpoint while the others wait
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


@dataclass
class Run:
    """Where this process sits and how it splits the global batch."""
    rank: int
    world: int
    device: torch.device
    micro_batch: int   # samples per forward pass on this rank
    accum: int         # micro-steps per optimizer step
    autocast: object   # bf16 autocast on CUDA, else a null context


def barrier(world):
    if world > 1:
        dist.barrier()


def all_reduce_sum(tensor, world):
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


# Schedulers and torchrun send SIGTERM before they kill: training saves and stops at its next step (one process)
# or next log step (DDP: the ranks learn it together from that step's all_reduce).
SIGTERM = {"received": False}


def on_sigterm(signum, frame):
    SIGTERM["received"] = True


def ignore_sigterm(worker_id):
    """DataLoader workers: SIGTERM reaches the whole process group, and a worker it killed would take the main
    process down before it saves. The main process stops them when it is done."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def ensure_data(data_dir, preset, stages, rank, world, tokenizer=True):
    """Generate the preset's data set into data_dir if that folder does not exist or is empty (rank 0; the others
    wait). Anything else must be a whole data set: generating into it could overwrite scans or other data."""
    if rank == 0 and (not os.path.isdir(data_dir) or not os.listdir(data_dir)):
        print(f"train.py: no data set in {data_dir}: generating the {preset} one", flush=True)
        config = GenConfig(**{**DATA_DEFAULTS[preset], "out": data_dir})  # GenConfig's seed: one data set for every run
        config.workers = min(8, os.cpu_count() or 1) if preset == "reference" else 1
        generate(config)
    barrier(world)
    # stage vlm alone also trains on questions whose images are files: a SPAR-7M-layout folder, images/ for scenes/
    files_only = set(stages) == {"vlm"} and os.path.isdir(os.path.join(data_dir, "images"))
    needed = ([] if files_only else ["scenes"]) + (["qa_train.jsonl", "qa_val.jsonl"] if "vlm" in stages else [])
    needed += ["tokenizer.json"] if "vlm" in stages and tokenizer else []  # --init_lm brings its own
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


class RankBatches:
    """DataLoader batch_sampler: this rank's micro-batches for steps start..stop-1, as lists of (epoch, index).
    Micro-step k of a rank reads positions (k * world + rank) * micro_batch onwards of its step's global batch."""

    def __init__(self, num_samples, batch_size, micro_batch, rank, world, seed, start, stop):
        self.n, self.B, self.m, self.seed = num_samples, batch_size, micro_batch, seed
        self.rank, self.world, self.start, self.stop = rank, world, start, stop
        self.accum = batch_size // (world * micro_batch)

    def __len__(self):
        return (self.stop - self.start) * self.accum

    def __iter__(self):
        for step in range(self.start, self.stop):
            for k in range(self.accum):
                first = step * self.B + (k * self.world + self.rank) * self.m
                yield [(p // self.n, epoch_permutation(self.n, self.seed, p // self.n)[p % self.n])
                       for p in range(first, first + self.m)]


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


# ----------------------------------------------------------------------------- the three stages
# A stage is its model and data plus the few functions in which stages differ; the loop never asks which it is.

@dataclass
class Stage:
    name: str
    model: nn.Module        # the plain module: what is trained, validated and saved
    config: dict            # config.json: what later stages and eval.py build the model from
    groups: list            # AdamW parameter groups, each with its own peak "lr"
    train_set: torch.utils.data.Dataset
    val_set: torch.utils.data.Dataset
    collate: object
    loss: object            # loss, weight, flops, gates, tokens: see stage_functions
    weight: object
    flops: object
    gates: object
    tokens: object = lambda batch: 0
    files: dict = None      # extra files of the checkpoint {name: text} (vlm: tokenizer.json)


def param_groups(model, cfg):
    """AdamW groups: trainable matrices decay, gains and biases do not (as nanoGPT); the VLM's per module."""
    if isinstance(model, vlm.SpaVLM):
        lrs = {"lm": cfg.lr_lm, "vision": cfg.lr_vision, "projector": cfg.lr_projector, "adapter": cfg.lr_adapter,
               "spa3r": cfg.lr_spa3r}
        return model.param_groups(lrs, cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"name": "decay", "params": [p for p in params if p.dim() >= 2], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "lr": cfg.lr, "weight_decay": 0.0}]


def stage_functions(name, model, cfg):
    """What the loop asks of a stage: loss(model, batch) -> (loss, {term: detached}) (model may be the DDP
    wrapper), weight(batch) (what a micro-batch's mean loss counts in its step), flops(batch) of a training
    step, tokens(batch) the LM reads, gates(stage, cfg, run) -> gate rows."""
    count = lambda batch: len(batch["images"])  # noqa: E731
    if name == "geo":
        return dict(loss=lambda m, batch: geo_loss(m(batch["images"]), batch), weight=count,
                    flops=lambda batch: count(batch) * 3 * geo_flops_per_sample(model.config, cfg.num_views),
                    gates=lambda stage, cfg, run: geo_gates(stage.model, gate_batches(stage, stage.val_set, cfg, run)))
    if name == "psfm":  # the frozen backbone runs forward only
        per_sample = (psfm_backbone_flops(model.config, model.backbone.config, cfg.num_views)
                      + 3 * psfm_flops_per_sample(model.config, model.backbone.config, cfg.num_views))
        return dict(loss=lambda m, batch: m(batch), weight=count, flops=lambda batch: count(batch) * per_sample,
                    gates=psfm_stage_gates)
    per_image = vlm.tokens_per_image(model.config, model.config.geo.image_size, model.config.geo.image_size)
    pad = vlm.special_ids(model.tokenizer)["<|pad|>"]

    def flops(batch):
        lengths = (batch["input_ids"] != pad).sum(1).tolist()
        return sum(vlm.flops_per_sample(model.config, n, t - n * per_image, training=True,
                                        cached_latent=cfg.cache_latent)
                   for n, t in zip(batch["num_images"].tolist(), lengths))
    return dict(loss=lambda m, batch: m(batch), weight=lambda batch: int((batch["targets"] != vlm.IGNORE).sum()),
                flops=flops, tokens=lambda batch: int((batch["input_ids"] != pad).sum()),
                gates=lambda stage, cfg, run: vlm_gates(stage.model, gate_batches(stage, stage.val_set, cfg, run, spread=True)))


def load_geo(folder):
    return data.load_checkpoint(folder, lambda c: GeoBackbone(GeoConfig(**c)))


def load_psfm(folder):
    return data.load_checkpoint(folder, lambda c: PSFM(Spa3RConfig(**c["psfm"]), GeoBackbone(GeoConfig(**c["geo"]))))


def view_datasets(cfg, res, mask_ratio=None):
    def views(split, samples_per_scene):
        return data.SceneViewsDataset(cfg.data, split, cfg.num_views, res, cfg.seed, samples_per_scene,
                                      cfg.view_sampling, mask_ratio)
    val = views("val", 1)
    val.samples_per_scene = max(1, math.ceil(cfg.eval_samples / len(val.ids)))  # distinct view sets, no repeats
    return views("train", cfg.samples_per_scene), val


def build_geo(cfg, models):
    torch.manual_seed(cfg.seed)
    model = GeoBackbone(models["geo"])
    return Stage("geo", model, asdict(model.config), param_groups(model, cfg), *view_datasets(cfg, model.config.image_size),
                 data.collate_views, **stage_functions("geo", model, cfg))


def build_psfm(cfg, models):
    backbone = load_geo(cfg.init_geo)
    torch.manual_seed(cfg.seed)
    model = PSFM(models["psfm"], backbone)  # freezes the backbone
    return Stage("psfm", model, {"geo": asdict(backbone.config), "psfm": asdict(model.config)}, param_groups(model, cfg),
                 *view_datasets(cfg, backbone.config.image_size, model.config.mask_ratio), data.collate_views,
                 **stage_functions("psfm", model, cfg))


def untrained_encoder(psfm_config, geo_dim, seed):
    """A Spa3R encoder as PSFM starts one, seeded seed + 1 on its own generator (the training RNG does not move):
    the --spa3r=random control arm's. The probes call it with seed, seed + 1, ...: their encoder k is the control
    arm's of --seed=seed + k, and never the PSFM run's own start (torch.manual_seed(seed), one less)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        encoder = Spa3REncoder(psfm_config, geo_dim)
        encoder.apply(init_weights)
    return encoder


def task_list(tasks):
    """--tasks=a,b -> ("a", "b"); an unknown task name is refused."""
    names = tuple(t for t in tasks.split(",") if t)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown task {unknown[0]!r}; the tasks are {', '.join(TASKS)}")
    return names


def build_vlm(cfg, models):
    if models["vlm"].spa3r != "psfm":
        raise SystemExit("--vlm.spa3r: use --spa3r=psfm|random|none|oracle (it also decides which checkpoint the VLM starts from)")
    if cfg.cache_latent and (cfg.spa3r not in ("psfm", "random") or not models["vlm"].freeze_spa3r):
        raise SystemExit("--cache_latent needs --spa3r=psfm or random with the frozen Spa3R encoder (--vlm.freeze_spa3r=true)")
    arm = "psfm" if cfg.spa3r == "random" else cfg.spa3r  # the control is Spa3-VLM's model, its encoder untrained
    if cfg.init_lm:  # a pretrained LM (SmolLM class): its weights, its tokenizer with the chat's special tokens
        pretrained_lm, tokenizer = vlm.load_llama(cfg.init_lm)
    else:
        tokenizer = data.load_tokenizer(os.path.join(cfg.data, "tokenizer.json"))
    start = None  # where the vision ViT (and Spa3R) start: the psfm checkpoint, else the geo backbone
    if arm == "psfm":
        start = load_psfm(cfg.init_spa3r)
        geo_config, psfm_config = start.backbone.config, start.config
    elif cfg.init_geo != "none":  # the baseline keeps the same vision ViT start, from the geo backbone
        start = load_geo(cfg.init_geo)
        geo_config, psfm_config = start.config, models["psfm"]
    else:
        geo_config, psfm_config = models["geo"], models["psfm"]
    lm_config = pretrained_lm.config if cfg.init_lm else models["lm"]
    if lm_config.vocab_size is None:  # no --lm.vocab_size: the data's tokenizer decides, rounded up to 64s
        lm_config = replace(lm_config, vocab_size=64 * math.ceil(tokenizer.get_vocab_size() / 64))
    config = replace(models["vlm"], lm=lm_config, geo=geo_config, psfm=psfm_config, spa3r=arm)
    torch.manual_seed(cfg.seed)
    model = vlm.SpaVLM(config, tokenizer, pretrained_lm if cfg.init_lm else None)
    if start is not None:
        model.init_from_psfm({("backbone." if arm != "psfm" else "") + k: v for k, v in start.state_dict().items()})
    if cfg.spa3r == "random":  # the control: all else stays as in the psfm arm
        model.spa3r.encoder.load_state_dict(untrained_encoder(psfm_config, geo_config.dim, cfg.seed).state_dict())
    train_set, val_set = (data.QADataset(cfg.data, split, geo_config.image_size, oracle=cfg.spa3r == "oracle",
                                         tasks=task_list(cfg.tasks)) for split in ("train", "val"))
    collate = partial(vlm.collate, tokenizer=tokenizer, config=config)
    for dataset in (train_set, val_set):  # now, not as a DataLoader worker's traceback at some later step
        vlm.check_lengths(dataset.records, tokenizer, config, dataset.path)
    if cfg.spa3r != "none" and len(train_set):  # the adapter's fixed standardisation of what it reads
        picks = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))[:256].tolist()
        model.set_latent_statistics(to_device(collate([train_set[i] for i in picks[k:k + 32]]), torch.device("cpu"))
                                    for k in range(0, len(picks), 32))
    return Stage("vlm", model, asdict(config), param_groups(model, cfg), train_set, val_set, collate,
                 files={"tokenizer.json": tokenizer.to_str()}, **stage_functions("vlm", model, cfg))


@torch.no_grad()
def cache_latents(stage, run, batch_size=32):
    """--cache_latent: each record's latent from the frozen Spa3R, computed once on the device into its data set
    (the items then carry it, and SpaVLM.latent reads it) instead of at every step: the latent depends on the
    record's images alone, and the speedrun shows each record a dozen times."""
    model = stage.model
    for dataset in (stage.train_set, stage.val_set):
        latents = []
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = to_device(stage.collate(items), run.device)
            with run.autocast:
                latents.append(model.spatial_latent(batch["images"], batch["num_images"]).float().cpu())
        dataset.latents = torch.cat(latents) if latents else None


BUILDERS = {"geo": build_geo, "psfm": build_psfm, "vlm": build_vlm}


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
# out/<stage>/: model.safetensors + config.json (what later stages and eval.py read), state.safetensors (AdamW's
# state as state.<param index>.<name>, and the RNG), train_state.json (step, data position, config, the loss sums
# not yet logged). Nothing is pickled.

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
    except Exception as error:  # safetensors reports a full disk as its own error type, with the OS's words
        if getattr(error, "errno", None) != errno.ENOSPC and "No space left" not in str(error):
            raise
        written = sorted(os.listdir(staging), key=lambda n: os.path.getmtime(os.path.join(staging, n)))
        shutil.rmtree(staging, ignore_errors=True)
        name = os.path.basename(getattr(error, "filename", None) or (written[-1] if written else "the first file"))
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


def write_checkpoint(stage, optimizer, cfg, step, num_samples, device, unlogged, folder):
    save_file({k: v.detach().cpu().contiguous() for k, v in stage.model.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    for name, text in {"config.json": json.dumps(stage.config, indent=1) + "\n", **(stage.files or {})}.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)
    save_file(state_tensors(optimizer, device), os.path.join(folder, "state.safetensors"))
    seen = step * cfg.batch_size
    progress = {"stage": cfg.stage, "step": step, "config": asdict(cfg), "unlogged": unlogged,
                "data": {"samples_seen": seen, "epoch": seen // num_samples, "train_samples": num_samples}}
    with open(os.path.join(folder, "train_state.json"), "w") as f:
        f.write(json.dumps(progress, indent=1) + "\n")


def state_tensors(optimizer, device):
    """AdamW's state as flat names state.<param index>.<exp_avg | exp_avg_sq | step>, and the RNG as rng.*."""
    tensors = {f"state.{i}.{name}": torch.as_tensor(value).detach().cpu().contiguous()
               for i, state in optimizer.state_dict()["state"].items() for name, value in state.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def load_state(optimizer, path, device):
    """Inverse of state_tensors: AdamW's state (each moment's shape checked: AdamW itself would fail only at its
    next step) and the RNG."""
    tensors = data.read_weights(path)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    adamw = {}
    for name, value in tensors.items():
        if not name.startswith("state."):
            continue
        _, index, key = name.split(".", 2)
        if not 0 <= int(index) < len(params) or (key != "step" and value.shape != params[int(index)].shape):
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(value.shape)}, the model needs "
                             f"{tuple(params[int(index)].shape) if 0 <= int(index) < len(params) else 'no such parameter'}")
        adamw.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": adamw, "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def check_finite_state(model, optimizer, when, out):
    """Never commit NaN or inf weights or AdamW moments: the commit would replace a good checkpoint."""
    tensors = [("weight " + name, p) for name, p in model.named_parameters()]
    tensors += [(f"AdamW state of parameter {i}", v) for i, state in enumerate(optimizer.state.values())
                for v in state.values() if torch.is_tensor(v)]
    for name, tensor in tensors:
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{when}: {name} is not finite; not saved: {out} keeps what it held")


SAME_ON_RESUME = ("batch_size", "seed", "num_views", "samples_per_scene", "view_sampling", "spa3r",
                  "init_lm")  # the sample stream and the model


def resume(cfg, stage, optimizer, device):
    """Restore weights, AdamW and RNG from cfg.out -> train_state.json's contents (its "step" is where to continue)."""
    state_path = os.path.join(cfg.out, "train_state.json")
    saved = data.read_json(state_path)
    if not isinstance(saved, dict):
        raise ValueError(f"{state_path}: must be a JSON object")
    for name, kind in {"step": int, "config": dict, "data": dict, "unlogged": dict}.items():
        if not isinstance(saved.get(name), kind):
            raise ValueError(f"{state_path}: field '{name}' must be {kind.__name__}, got {saved.get(name)!r:.40}")
    for name in SAME_ON_RESUME:
        if saved["config"].get(name) != getattr(cfg, name):
            raise ValueError(f"{state_path}: field 'config.{name}' is {saved['config'].get(name)!r}, this run has "
                             f"{getattr(cfg, name)!r}: resume with the same value")
    config_path = os.path.join(cfg.out, "config.json")
    if data.read_json(config_path) != json.loads(json.dumps(stage.config)):  # AdamW's state is matched by index
        raise ValueError(f"{config_path}: the model config differs from this run's (--geo.*, --psfm.*, --lm.*, --vlm.*): "
                         "resume with the same one")
    for name, text in (stage.files or {}).items():  # the tokenizer: the one the checkpoint was trained with
        if os.path.exists(os.path.join(cfg.out, name)) and open(os.path.join(cfg.out, name)).read() != text:
            raise ValueError(f"{os.path.join(cfg.out, name)}: differs from this run's (--data / --init_lm): "
                             "resume with the same one")
    data.load_weights(stage.model, os.path.join(cfg.out, "model.safetensors"))
    load_state(optimizer, os.path.join(cfg.out, "state.safetensors"), device)
    return saved


@contextmanager
def out_lock(out, rank, world, device):
    """One training process per --out (two would overwrite each other's checkpoints): rank 0 holds out/train.lock,
    which names its host and pid; a lock left by a process that is gone (kill -9) is taken over. Every rank
    learns a refusal, so none runs on alone."""
    path, refusal = os.path.join(out, "train.lock"), None
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        refusal = take_lock(path)
    if all_reduce_sum(torch.tensor([float(refusal is not None)], device=device), world).item():
        raise ValueError(refusal or f"{out}: rank 0 could not take {path}")
    try:
        yield
    finally:
        if rank == 0:
            os.remove(path)


def take_lock(path):
    """-> None once out/train.lock is ours, else why not."""
    me = f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            with open(path, "x") as f:
                f.write(me)
            return None
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = f.read().strip()
            except OSError:
                return f"{path}: not a lock file; delete it"
            host, _, pid = owner.partition(" ")
            if not (host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))):
                return f"{os.path.dirname(path)}: another train.py ({owner or 'unknown'}) is training into it; if it is gone, delete {path}"
            os.remove(path)  # stale


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


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
    return next((flops for pattern, flops in PEAK_BF16_FLOPS if re.search(pattern, device_name.lower())), None)


class Log:
    """Rank 0's log -- lines to the terminal and out/log.txt, numbers to out/metrics.jsonl -- and every rank's
    window of loss terms since the last log line. The terms stay on the device until a log step, so the loop
    never waits for the GPU in between; one all_reduce then sums them over ranks. On resume the metrics of steps
    after the checkpoint are dropped (they are about to be run again) and the unlogged sums come back."""

    def __init__(self, out, rank, start, device, unlogged=None):
        self.enabled, self.device = rank == 0, device
        self.text_path, self.metrics_path = os.path.join(out, "log.txt"), os.path.join(out, "metrics.jsonl")
        self.reset()
        if not self.enabled:
            return
        os.makedirs(out, exist_ok=True)
        kept = []
        if start and os.path.exists(self.metrics_path):
            with open(self.metrics_path, encoding="utf-8", errors="replace") as f:  # a bad line is dropped
                kept = [line for line in f if is_record_before(line, start)]
        with open(self.metrics_path, "w", encoding="utf-8") as f:
            f.write("".join(kept))
        if not start:
            open(self.text_path, "w").close()
        if unlogged and unlogged.get("sums"):  # the loss sums of the steps between the last log line and the save
            try:
                self.sums = {k: torch.tensor(float(v), device=device) for k, v in unlogged["sums"].items()}
                self.weight = float(unlogged["weight"])
            except (TypeError, ValueError, KeyError, AttributeError):
                raise ValueError(f"{os.path.join(out, 'train_state.json')}: field 'unlogged' is malformed") from None

    def line(self, text):
        if self.enabled:
            tqdm.write(text)
            with open(self.text_path, "a", encoding="utf-8") as f:
                f.write(text + "\n")

    def metrics(self, record):
        if self.enabled:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def reset(self):
        self.sums, self.weight, self.tokens, self.flops, self.steps, self.paused = {}, 0, 0, 0.0, 0, 0.0
        self.finite, self.batches, self.started = [], [], time.time()

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

    def unlogged(self, world):
        """The loss sums since the last log line, over all ranks, for a checkpoint taken between log steps."""
        if not self.sums:
            return {"sums": {}, "weight": 0}
        local = torch.stack([*self.sums.values(), torch.tensor(float(self.weight), device=self.device)]).double()
        *sums, weight = all_reduce_sum(local, world).tolist()
        return {"sums": dict(zip(self.sums, sums)), "weight": weight}

    def train_line(self, cfg, step, world, grad_norm, peak, lr):
        """The window's means over all ranks as a log line and a metrics record -> whether any rank got SIGTERM."""
        local = torch.stack([*self.sums.values()]).double()
        extra = torch.tensor([self.weight, self.tokens, self.flops, SIGTERM["received"]], dtype=torch.float64,
                             device=self.device)
        reduced = all_reduce_sum(torch.cat([local, extra]), world).tolist()
        weight, tokens, flops, stop = reduced[len(self.sums):]
        means = {name: value / weight for name, value in zip(self.sums, reduced)}
        seconds = max(time.time() - self.started - self.paused, 1e-9)
        samples_per_s, tokens_per_s = self.steps * cfg.batch_size / seconds, tokens / seconds if tokens else None
        mfu = flops / seconds / (peak * world) if peak else None  # unknown device: no MFU rather than a wrong one
        eta = (cfg.steps - step) * seconds / self.steps
        terms = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
        self.line(f"{cfg.stage} step {step}/{cfg.steps} | loss {means['loss']:.4f} | {terms} | lr {lr:.2e} | "
                  f"grad {grad_norm:.3f} | {samples_per_s:.1f} samples/s"
                  + (f" | {tokens_per_s:.0f} tokens/s" if tokens_per_s else "") + (f" | MFU {100 * mfu:.1f}%" if mfu else "")
                  + f" | ETA {int(eta // 60)}m{int(eta % 60):02d}s")
        self.metrics({"step": step, "split": "train", **means, "lr": lr, "grad_norm": grad_norm,
                      "samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s, "mfu": mfu})
        self.reset()
        return stop > 0


def is_record_before(line, step):
    """A whole metrics line of a step up to `step` (a kill may have cut the last line short)."""
    try:
        return json.loads(line)["step"] <= step
    except (json.JSONDecodeError, KeyError, TypeError):
        return False


# ----------------------------------------------------------------------------- validation

@torch.no_grad()
def validate(stage, cfg, run):
    """Mean loss terms over the first eval_samples held-out samples, split across ranks by micro-batches and
    weighted as in training; each sample is drawn from its position only, so any world size agrees."""
    n, m = len(stage.val_set), run.micro_batch
    chunks = [list(range(first, min(first + m, cfg.eval_samples))) for first in range(0, cfg.eval_samples, m)]
    mine, counted = chunks[run.rank::run.world], 1
    if not mine:  # more ranks than micro-batches: run one anyway (for the term names), counted as nothing
        mine, counted = chunks[:1], 0
    loader = torch.utils.data.DataLoader(EpochItems(stage.val_set), collate_fn=stage.collate,
                                         batch_sampler=[[(0, p % n) for p in chunk] for chunk in mine])
    stage.model.eval()
    sums, total_weight = 0, 0
    for batch in loader:
        weight = stage.weight(batch) * counted
        with run.autocast:
            loss, terms = stage.loss(stage.model, to_device(batch, run.device))
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
# psfm with the cameras of another sample and the mean token, its latent (by linear probes) with randomly
# initialised encoders, the VLM with another record's images or latent. Each gate row holds per-sample errors
# of both; it passes when the paired bootstrap 95 % interval of (model - baseline) lies wholly below 0.

GATE_BATCH = 8  # held-out samples per forward pass of a gate (>= 2: "another sample" rolls the batch)


def gate_row(name, model_errors, baseline_errors, baseline, shown=None):
    """One gate: per-sample errors (lower is better) of the model and its baseline on the same samples.
    shown = (model value, baseline value) to print instead of the mean errors (R² for the probes)."""
    n = len(model_errors)
    if not n:  # e.g. no record has a partner from another scene: nothing to compare, no pass
        model_errors = baseline_errors = torch.full((1,), math.nan)
    diff, lo, hi = paired_bootstrap((model_errors - baseline_errors).tolist())
    model_value, baseline_value = shown or (float(model_errors.mean()), float(baseline_errors.mean()))
    return {"gate": name, "model": model_value, "baseline": baseline_value, "baseline_name": baseline,
            "diff": diff, "lo": lo, "hi": hi, "n": n, "pass": hi < 0}


def per_sample(errors, valid):
    """Mean of errors (B, ...) over the valid entries of each sample -> (B,)."""
    dims = tuple(range(1, errors.dim()))
    return (errors * valid).sum(dims) / valid.sum(dims).clamp_min(1)


def heading(pose):
    """Yaw of each camera's optical axis in view 0's frame (OpenCV: x right, z forward), radians: (..., 4, 4) -> (...)."""
    forward = pose[..., :3, 2]
    return torch.atan2(forward[..., 0], forward[..., 2])


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
            turn = heading(estimate) - heading(target)  # wrapped to (-pi, pi] before its size is taken
            errors.setdefault(f"yaw/{name}", []).append(torch.atan2(turn.sin(), turn.cos()).abs().rad2deg().mean(1))
        depth.append(batch["depth"].clamp_min(1e-6).log())
        valid.append(batch["depth"] > 0)
        predicted.append(pred["log_depth"].float())
    e = {k: torch.cat(v).cpu() for k, v in errors.items()}
    depth, valid, predicted = torch.cat(depth), torch.cat(valid), torch.cat(predicted)
    mean_map = (depth * valid).sum((0, 1)) / valid.sum((0, 1)).clamp_min(1)  # (H, W) over samples and views
    return [gate_row("geo: translation L1 (m)", e["translation/model"], e["translation/identity"], "identity pose"),
            gate_row("geo: rotation L1", e["rotation/model"], e["rotation/identity"], "identity pose"),
            gate_row("geo: relative yaw error (deg)", e["yaw/model"], e["yaw/identity"], "identity pose"),
            gate_row("geo: log-depth L1", per_sample((predicted - depth).abs(), valid).cpu(),
                     per_sample((mean_map - depth).abs(), valid).cpu(), "per-pixel mean depth")]


@torch.no_grad()
def psfm_gates(model, batches):
    """On the masked (unseen) views: 1 - cosine of the predicted geo field with the query cameras PSFM uses vs
    the cameras of another sample (a decoder that ignores cameras scores the same) vs the held-out mean token
    of each patch position; the depth probe vs the per-position mean log depth."""
    errors, targets, masks, depths, depth_valid = {}, [], [], [], []
    p = model.backbone.config.patch_size
    for batch in batches:
        context, target, latent, K, pose = model.context_pass(batch)
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
ROOM_PROBES, PAIR_PROBES = (0, 4), (1, 2, 3)  # read off views as PSFM draws them; off pairs of near views


def probe_targets(batch, rooms):
    """(B, 5) quantities the latent should hold: log floor area; cos and sin of view 1's heading in view 0's
    frame and the distance between their cameras; the distance from view 0's camera to the largest object."""
    pose = relative_to_view0(batch["pose"]).cpu()
    yaw = heading(pose[:, 1])  # view 1's heading in view 0's camera
    world = batch["pose"].cpu()
    rows = []
    for b, room in enumerate(rooms):
        largest = max(room["objects"], key=lambda o: math.prod(o["size"]))
        distance = (torch.tensor(largest["center"]) - world[b, 0, :3, 3]).norm()
        rows.append([math.log(room["room"]["floor_area"]), yaw[b].cos(), yaw[b].sin(),
                     pose[b, 1, :3, 3].norm(), distance])
    return torch.tensor(rows, dtype=torch.float64)


@torch.no_grad()
def probe_features(model, random_encoders, batch):
    """{name: (B, F)}: the Spa3R latent, the ViT features, each random encoder's latent, each averaged over its
    tokens (and views), so that every probe reads the same number of features."""
    images = batch["images"]
    tokens = model.backbone.patch_tokens(images)  # (B, V, N, Dg)
    vit = model.backbone.vit(images.flatten(0, 1))[:, model.backbone.config.num_registers:]  # (B * V, N, Dg)
    features = {"latent": model.encoder(tokens, model.grid(images)).mean(1),
                "ViT features": vit.reshape(len(images), -1, vit.shape[-1]).mean(1)}
    for k, encoder in enumerate(random_encoders):
        features[f"random encoder {k}"] = encoder(tokens, model.grid(images)).mean(1)
    return features


def ridge_fit_predict(train_x, train_y, test_x, lambdas=(1e-2, 1e-1, 1, 10, 100, 1000)):
    """Ridge regression on standardised features, its strength chosen per target column (the columns mix log
    areas, cosines and metres) on the last fifth of the training rows, then refitted on all of them -> predictions
    for test_x (n, targets). float64 throughout."""
    def fit(x, y, lam):
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        xs = (x - mean) / std
        w = torch.linalg.solve(xs.T @ xs + lam * torch.eye(x.shape[1], dtype=x.dtype), xs.T @ (y - y.mean(0)))
        return lambda z: (z - mean) / std @ w + y.mean(0)
    cut = len(train_x) * 4 // 5
    scores = torch.stack([((fit(train_x[:cut], train_y[:cut], lam)(train_x[cut:]) - train_y[cut:]) ** 2).sum(0)
                          for lam in lambdas])  # (lambdas, targets)
    best = scores.argmin(0)  # (targets,)
    preds = torch.stack([fit(train_x, train_y, lam)(test_x) for lam in lambdas])  # (lambdas, n, targets)
    return preds[best, :, torch.arange(train_y.shape[1], device=preds.device)].T  # column j from its own best strength


def r2(errors, y):
    """Coefficient of determination of each column from squared errors (n, k) and targets (n, k)."""
    return 1 - errors.mean(0) / y.var(0, unbiased=False).clamp_min(1e-12)


# One random draw of the encoder reads a quantity better or worse than another by chance (on dev data two draws
# differed by up to 0.015 in R², enough to pass a gate on its own), so the latent must beat several.
PROBE_RANDOM_ENCODERS = 3


@torch.no_grad()
def probe_gates(model, train_batches, val_batches, rooms_of, seed, quantities=ROOM_PROBES + PAIR_PROBES):
    """Per probed quantity (indices into PROBES): held-out R² of the latent vs the strongest on that quantity of
    PROBE_RANDOM_ENCODERS randomly initialised encoders (the gate; chosen on the held-out samples themselves, the
    strict direction), and vs the ViT features and each random encoder (shown in the name)."""
    device = next(model.parameters()).device
    random_encoders = [untrained_encoder(model.config, model.backbone.config.dim, seed + k).to(device)
                       for k in range(PROBE_RANDOM_ENCODERS)]

    def collect(batches):
        feats, ys = {}, []
        for batch in batches:
            for name, f in probe_features(model, random_encoders, batch).items():
                feats.setdefault(name, []).append(f.double().cpu())
            ys.append(probe_targets(batch, rooms_of(batch))[:, list(quantities)])
        return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(ys)
    (train_x, train_y), (val_x, val_y) = collect(train_batches), collect(val_batches)
    sq = {name: (ridge_fit_predict(train_x[name], train_y, val_x[name]) - val_y) ** 2 for name in train_x}
    randoms = [name for name in sq if name.startswith("random encoder")]
    rows = []
    for j, quantity in enumerate(PROBES[q] for q in quantities):
        score = {name: float(r2(sq[name][:, j:j + 1], val_y[:, j:j + 1])) for name in sq}
        strongest = max(randoms, key=score.get)
        shown = f"ViT features {score['ViT features']:.2f}; random encoders " + ", ".join(f"{score[n]:.2f}" for n in randoms)
        rows.append(gate_row(f"probe R² {quantity} ({shown})", sq["latent"][:, j],
                             sq[strongest][:, j], f"strongest of {PROBE_RANDOM_ENCODERS} random encoders",
                             (score["latent"], score[strongest])))
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


def gate_batches(stage, dataset, cfg, run, count=None, spread=False):
    """Batches of GATE_BATCH distinct samples of a dataset (the intervals assume distinct samples); QA records come
    grouped by scene and task, so spread=True takes them in a seeded order that makes partners of other scenes."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed)).tolist() if spread else None
    count = min(count or cfg.eval_samples, len(dataset))
    count = max(GATE_BATCH, count - count % GATE_BATCH)
    for first in range(0, count, GATE_BATCH):
        picks = [i % len(dataset) for i in range(first, first + GATE_BATCH)]
        yield to_device(stage.collate([dataset[order[i] if spread else i] for i in picks]), run.device)


def psfm_stage_gates(stage, cfg, run):
    rows = psfm_gates(stage.model, gate_batches(stage, stage.val_set, cfg, run))
    # The room (its floor area, where its largest object stands) is probed on views as PSFM draws them, the room
    # the latent learns to complete. How one camera sits relative to another is probed on pairs of near views:
    # it is only knowable when they overlap, and the latent does not see the order of the views after view 0,
    # so "view 1" is only well defined when there are two views.
    pairs = replace(cfg, view_sampling="near", num_views=2)
    for probe_cfg, quantities in ((cfg, ROOM_PROBES), (pairs, PAIR_PROBES)):
        probe_train, probe_val = view_datasets(probe_cfg, stage.model.backbone.config.image_size)
        rooms_of = lambda batch, store=probe_val.store: [store.scene_cameras(s)[0] for s in batch["scene"]]  # noqa: E731
        rows += probe_gates(stage.model, gate_batches(stage, probe_train, probe_cfg, run, cfg.probe_samples),
                            gate_batches(stage, probe_val, probe_cfg, run), rooms_of, cfg.seed, quantities)
    return rows


def stage_gates(stage, cfg, run):
    stage.model.eval()
    with run.autocast:
        rows = stage.gates(stage, cfg, run)
    stage.model.train()
    return rows


def gate_text(row):
    return (f"gate {row['gate']}: {row['model']:.4f} vs {row['baseline_name']} {row['baseline']:.4f} | "
            f"difference {row['diff']:+.4f} [{row['lo']:+.4f}, {row['hi']:+.4f}] | {'PASS' if row['pass'] else 'FAIL'}")


# ----------------------------------------------------------------------------- the training loop

def train_stage(cfg, models, rank, world, device):
    """Build the stage, continue from its checkpoint with --resume, run the remaining steps, save."""
    if rank == 0:  # a kill during a save may have left a commit half moved: complete it before anyone reads
        for folder in (cfg.init_geo, cfg.init_spa3r):
            finish_commit(folder)
    barrier(world)
    held = [name for name in ("train_state.json", "model.safetensors") if os.path.exists(os.path.join(cfg.out, name))]
    if held and not cfg.overwrite and not (cfg.resume and "train_state.json" in held):
        what = "a checkpoint" if "train_state.json" in held else "a model but no train_state.json to resume from"
        raise ValueError(f"{cfg.out}: holds {what}; --resume continues a checkpoint, --overwrite starts over "
                         "(its first save replaces it)")
    with out_lock(cfg.out, rank, world, device):
        if rank == 0:  # our own --out only once it is ours: a live run may be moving its commit
            finish_commit(cfg.out)
        barrier(world)
        stage = BUILDERS[cfg.stage](cfg, models)
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
        saved = resume(cfg, stage, optimizer, device) if resumed else None
        start = saved["step"] if saved else 0
        log = Log(cfg.out, rank, start, device, saved and saved.get("unlogged"))
        log_header(log, cfg, stage, run, saved)
        if cfg.stage == "vlm" and cfg.cache_latent and start < cfg.steps:
            began = time.time()
            cache_latents(stage, run)
            log.line(f"{cfg.stage}: --cache_latent: the latents of {len(stage.train_set)} + {len(stage.val_set)} "
                     f"records computed in {time.time() - began:.1f} s")
        if start < cfg.steps:
            run_steps(cfg, stage, run, optimizer, log, start)
        else:
            log.line(f"{cfg.stage}: already trained to step {start} of {cfg.steps}")
    barrier(world)  # the next stage reads this one's checkpoint


def run_steps(cfg, stage, run, optimizer, log, start):
    """Steps start..cfg.steps-1 with logging, validation and checkpoints; stops early, saved, on SIGTERM."""
    rank, world, device = run.rank, run.world, run.device
    runner = torch.compile(stage.model) if cfg.compile else stage.model
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)
    num_samples = len(stage.train_set)
    sampler = RankBatches(num_samples, cfg.batch_size, run.micro_batch, rank, world, cfg.seed, start, cfg.steps)
    batches = iter(torch.utils.data.DataLoader(EpochItems(stage.train_set), batch_sampler=sampler,
                                               collate_fn=stage.collate, num_workers=cfg.workers,
                                               worker_init_fn=ignore_sigterm, pin_memory=device.type == "cuda"))
    peak = peak_flops(torch.cuda.get_device_name(device)) if cfg.bf16 and device.type == "cuda" else None
    bar = tqdm(total=cfg.steps, initial=start, desc=cfg.stage, mininterval=1, dynamic_ncols=True,
               disable=True if rank else None)  # None: off when stderr is not a terminal

    def save(step):  # every rank checks; rank 0 writes; the others wait for it at their next collective
        log.check_finite(cfg.stage, world)
        check_finite_state(stage.model, optimizer, f"{cfg.stage} step {step}", cfg.out)
        unlogged = log.unlogged(world)
        if rank == 0:
            save_checkpoint(cfg.out, partial(write_checkpoint, stage, optimizer, cfg, step, num_samples, device, unlogged))

    if cfg.compile:
        log.line(f"{cfg.stage}: torch.compile: the first step compiles the model (a minute or more on a GPU)")
    for step in range(start, cfg.steps):
        grad_norm = train_step(stage, runner, optimizer, [next(batches) for _ in range(run.accum)], step, cfg, run, log)
        bar.update()
        done = step + 1
        stop = world == 1 and SIGTERM["received"]  # one process: at once; DDP: at the log step's all_reduce
        if done % cfg.log_every == 0 or done == cfg.steps:
            log.check_finite(cfg.stage, world)
            stop = log.train_line(cfg, done, world, float(grad_norm), peak, optimizer.param_groups[0]["lr"])
        if stop:  # every rank learnt it from the same all_reduce, so all stop at this step
            save(done)
            log.line(f"{cfg.stage}: SIGTERM: checkpoint of step {done} saved in {cfg.out}; --resume continues")
            barrier(world)
            raise SystemExit(f"train.py: stopped by SIGTERM at {cfg.stage} step {done}")
        started = time.time()
        if done % cfg.save_every == 0 or done == cfg.steps:  # before validation: a failing gate loses nothing
            save(done)
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            log.line(f"{cfg.stage} step {done}/{cfg.steps} | validation on {cfg.eval_samples} held-out samples, "
                     f"then the gates")
            val = validate(stage, cfg, run)
            log.line(f"{cfg.stage} step {done}/{cfg.steps} | val loss {val['loss']:.4f} | "
                     + " ".join(f"{k} {v:.4f}" for k, v in val.items() if k != "loss"))
            log.metrics({"step": done, "split": "val", **val})
            if rank == 0:  # the gates: this stage against its trivial baselines on held-out samples
                rows = stage_gates(stage, cfg, run)
                for row in rows:
                    log.line(f"{cfg.stage} step {done}/{cfg.steps} | {gate_text(row)}")
                log.metrics({"step": done, "split": "gates", "gates": rows})
        log.paused += time.time() - started  # validation and checkpoints do not count against throughput
    bar.close()
    log.line(f"{cfg.stage}: done, checkpoint in {cfg.out}")


def train_step(stage, runner, optimizer, micro, step, cfg, run, log):
    """One optimizer step on this rank's micro-batches -> the gradient norm before clipping."""
    weights = [stage.weight(b) for b in micro]
    log.tokens += sum(stage.tokens(b) for b in micro)
    log.flops += sum(stage.flops(b) for b in micro)
    log.steps += 1
    total_weight = all_reduce_sum(torch.tensor(float(sum(weights)), device=run.device), run.world)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, cfg)
    for k, (batch, weight) in enumerate(zip(micro, weights)):
        with runner.no_sync() if run.world > 1 and k < run.accum - 1 else nullcontext():  # all-reduce once, at the last
            with run.autocast:
                loss, terms = stage.loss(runner, to_device(batch, run.device))
            # DDP averages gradients over ranks; x world makes it the sum of the weighted micro-batch losses
            (loss * (weight * run.world / total_weight)).backward()
        log.add(loss, terms, weight, step, batch)
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
    log.line(f"{cfg.stage}: {what}"
             f" | {run.world} process(es) on {where} | global batch {cfg.batch_size} = {run.world} x {run.micro_batch}"
             f" x {run.accum} accumulation | {trainable:,} trainable of {sum(p.numel() for p in params):,} parameters"
             f" | {len(stage.train_set)} training samples")
    log.line("config " + json.dumps({"train": asdict(cfg), "model": stage.config}))
    if cfg.resume and not saved:
        log.line(f"{cfg.stage}: --resume, but no checkpoint in {cfg.out} yet: starting from step 0")
    if saved and saved["data"].get("train_samples") != len(stage.train_set):
        log.line(f"{cfg.stage}: note: the checkpoint saw {saved['data'].get('train_samples')} training samples, "
                 f"the data now has {len(stage.train_set)}: the run goes on, but not as it would have unchanged")


# ----------------------------------------------------------------------------- main

def main(argv):
    first = parse_args(argv, TrainConfig(), {name: cls() for name, cls in MODEL_CONFIGS.items()})
    if first.init_lm and any(arg.startswith("--lm.") for arg in argv):
        raise SystemExit("--lm.*: the LM's shape comes from the --init_lm checkpoint; leave --lm.* out")
    if first.stage not in ("",) + STAGES:
        raise SystemExit(f"--stage must be one of {', '.join(STAGES)} (or absent for all three), got {first.stage!r}")
    if first.preset not in ("", "tiny", "reference"):
        raise SystemExit(f"--preset must be 'tiny' or 'reference', got {first.preset!r}")
    rank, world, device = setup_processes(first.device)
    if rank == 0:
        announce("train.py", f"stage(s) {first.stage or ', '.join(STAGES)} on {world} x {device.type}",
                 first.out or "out/")
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        preset = first.preset or ("reference" if device.type == "cuda" else "tiny")
        stages = [first.stage] if first.stage else list(STAGES)
        configs = [stage_config(argv, stage, preset, not first.stage) for stage in stages]
        ensure_data(configs[0][0].data, preset, stages, rank, world, tokenizer=not configs[-1][0].init_lm)
        for cfg, models in configs:
            train_stage(cfg, models, rank, world, device)
    except ValueError as error:  # bad input: one line naming the file and the field, no traceback
        message = str(error).strip().splitlines()[-1].removeprefix("ValueError: ")  # a worker's: after its traceback
        raise SystemExit(f"train.py{f' [rank {rank}]' if world > 1 else ''}: {message}") from None
    finally:
        workers = multiprocessing.active_children()  # DataLoader workers ignore SIGTERM (ignore_sigterm): after a
        if workers:                                   # crash, the exit's terminate-and-join would wait forever
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the DataLoader's handler would report them as failures
            for worker in workers:
                worker.kill()
        signal.signal(signal.SIGTERM, previous_handler)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
