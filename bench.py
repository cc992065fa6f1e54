"""bench.py: how fast this machine runs nanoSpa3R, as numbers for the README (never asserted in tests).

Prints the data generator's renderer speed (generate_spar.bench), then for each training stage at a preset: its
parameters, forward FLOPs per sample, and training samples/s over a few timed steps after warm-up, with the
achieved TFLOP/s and MFU on CUDA; last, the same as a markdown table. A step is train.train_step itself
(forward, backward, clipping, AdamW) on a synthetic batch of the stage's shapes, so the figures are the ones
train.py logs, minus data loading; no data set or checkpoint is needed (weights are random, which costs the
same). FLOPs are counted by train.stage_functions, i.e. by the flops functions of model.py, psfm.py and vlm.py.
With --profile, each stage's row is followed by where its step's time goes (bench.profile: busy time by kind of
kernel, the longest kernels). Last, stage psfm's data path (bench.loader): samples/s of one process and, with
--loader_workers, of a DataLoader, beside the samples/s a GPU's step would take.

Usage:
    python bench.py                                    # reference preset on CUDA, tiny elsewhere
    python bench.py --stages=vlm --vlm_images=8 --compile
    python bench.py --preset=reference --loader_workers=8
    python bench.py --preset=reference --stages=psfm --compile --profile   # where a step's device time goes
Every BenchConfig field is a --key=value flag.
"""
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch
from tokenizers import Tokenizer, models

import generate_spar
import train
import vlm
from generate_spar import SPECIAL_TOKENS
from model import GeoBackbone
from model import flops_per_sample as geo_flops_per_sample
from psfm import PSFM
from psfm import flops_per_sample as psfm_flops_per_sample
from psfm import backbone_flops_per_sample as psfm_backbone_flops


@dataclass
class BenchConfig:
    preset: str = ""            # tiny | reference; empty: reference on CUDA, tiny elsewhere
    stages: str = "geo,psfm,vlm"
    batch_size: int = 0         # samples a step; 0: 16 on reference (a GPU's share of its 8-GPU batch), else train's
    num_views: int = 0          # geo, psfm: views per sample; 0: the preset's (train.PRESET_DEFAULTS)
    vlm_images: int = 1         # vlm: images per sample
    vlm_text_tokens: int = 128  # vlm: text tokens per sample, besides the visual ones
    steps: int = 10             # timed steps
    warmup: int = 3             # untimed steps first (allocator, cuDNN / SDPA choices, torch.compile)
    bf16: bool = True           # bf16 autocast on CUDA, as train.py
    compile: bool = False       # torch.compile the model, as train.py --compile
    device: str = ""            # cuda | mps | cpu; empty: as train.py picks
    seed: int = 0
    loader_workers: int = 0     # also time a DataLoader of this many worker processes (0: one process only)
    profile: bool = False       # then profile 2 more steps: device time by kind of kernel, the longest kernels


def view_batch(B, V, res, num_classes):
    """A PSFM batch as data.collate_views makes it, of random content: uint8 images, float16 depth, K, pose
    (identity), int16 semantic. Compact as the loader's, so the step copies to the GPU what train.py's copies."""
    K = torch.tensor([[res, 0, res / 2], [0, res, res / 2], [0, 0, 1.0]])
    return {"images": torch.randint(256, (B, V, 3, res, res), dtype=torch.uint8),
            "depth": (1 + 4 * torch.rand(B, V, res, res)).half(), "K": K.repeat(B, V, 1, 1),
            "pose": torch.eye(4).repeat(B, V, 1, 1),
            "semantic": torch.randint(num_classes, (B, V, res, res), dtype=torch.int16)}


def vlm_batch(config, B, num_images, text_tokens):
    """A vlm.collate batch without padding: the <image> slots, then random text; every position is a target."""
    res = config.geo.image_size
    slots = num_images * vlm.tokens_per_image(config, res, res)
    image_id = SPECIAL_TOKENS.index("<image>")
    text = torch.randint(len(SPECIAL_TOKENS), config.lm.vocab_size, (B, text_tokens))
    input_ids = torch.cat([torch.full((B, slots), image_id), text], 1)  # (B, T)
    return {"input_ids": input_ids, "targets": torch.randint(config.lm.vocab_size, input_ids.shape),
            "images": torch.rand(B * num_images, 3, res, res), "num_images": torch.full((B,), num_images),
            "ids": [f"#{i}" for i in range(B)]}


def special_tokenizer():
    """A tokenizer of the chat's special tokens only, at ids 0..5: all SpaVLM looks up (text ids are random)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def build(name, preset, cfg, bench):
    """-> (train.Stage with a random model, its synthetic batch, forward FLOPs per sample): what train.BUILDERS
    make, without the data set and checkpoints they read."""
    torch.manual_seed(cfg.seed)
    models = {key: c.reference() if preset == "reference" else c.tiny() for key, c in train.MODEL_CONFIGS.items()}
    geo, V = models["geo"], cfg.num_views
    if name == "geo":
        model, forward = GeoBackbone(geo), geo_flops_per_sample(geo, V)
        batch = view_batch(cfg.batch_size, V, geo.image_size, 1)
    elif name == "psfm":
        model = PSFM(models["psfm"], GeoBackbone(geo))
        forward = psfm_backbone_flops(models["psfm"], geo, V) + psfm_flops_per_sample(models["psfm"], geo, V)
        batch = view_batch(cfg.batch_size, V, geo.image_size, models["psfm"].num_classes)
    else:
        config = replace(models["vlm"], lm=models["lm"], geo=geo, psfm=models["psfm"])
        model = vlm.SpaVLM(config, special_tokenizer())
        forward = vlm.flops_per_sample(config, bench.vlm_images, bench.vlm_text_tokens)
        batch = vlm_batch(config, cfg.batch_size, bench.vlm_images, bench.vlm_text_tokens)
    stage = train.Stage(name, model, {}, train.param_groups(model, cfg), None, None, None,
                        **train.stage_functions(name, model, cfg))
    return stage, batch, forward


def measure(name, bench, preset, device):
    """bench.warmup untimed, then bench.steps timed training steps of stage `name` -> a result dict."""
    defaults, _ = train.stage_config([], name, preset, False)  # the preset's TrainConfig: lr, views, clipping
    cfg = replace(defaults, compile=bench.compile, bf16=bench.bf16, seed=bench.seed,
                  batch_size=bench.batch_size or (16 if preset == "reference" else defaults.batch_size),
                  num_views=bench.num_views or defaults.num_views)
    stage, batch, forward = build(name, preset, cfg, bench)
    stage.model.to(device)
    cuda = device.type == "cuda"
    if cuda:  # as train.py's DataLoader hands them over
        batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast("cuda", torch.bfloat16) if cfg.bf16 and cuda else nullcontext()
    run = train.Run(0, 1, device, cfg.batch_size, 1, autocast)
    optimizer = train.make_optimizer(stage.groups, device)
    runner = torch.compile(stage.model) if cfg.compile else stage.model
    log = train.Log("", 1, 0, device)  # rank 1's: counts, writes nothing
    sync = getattr(torch, device.type).synchronize  # torch.cpu.synchronize() is a no-op
    for step in range(bench.warmup + bench.steps):
        if step == bench.warmup:
            sync()
            log.reset()  # the clock starts here
        train.train_step(stage, runner, optimizer, [batch], step, cfg, run, log)
    sync()
    seconds = time.time() - log.started
    params = list(stage.model.parameters())
    result = {"stage": name, "preset": preset, "batch": cfg.batch_size, "views": cfg.num_views, "forward": forward,
              "trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params),
              "samples_per_s": bench.steps * cfg.batch_size / seconds if bench.steps else None,
              "flops_per_s": log.flops / seconds if bench.steps else None,
              "memory": torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None}
    step = partial(train.train_step, stage, runner, optimizer, [batch], 0, cfg, run, log)
    return {**result, "profile": profile(step, device) if bench.profile else None}  # after the counts are read


# what fills a step: kernels (CUDA) or aten ops (CPU) by kind, the first kind a name contains; else elementwise
KERNEL_KINDS = (("elementwise", ("triton_poi", "triton_red", "triton_per")),  # torch.compile's fused kernels
                ("attention", ("flash", "fmha", "attention", "sdpa")),  # before matmul: fmha_cutlassF_... is attention
                ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "triton_tem", "aten::mm", "aten::addmm", "aten::bmm",
                            "convolution")),
                ("optimizer", ("adam", "multi_tensor")),
                ("copy, cast", ("memcpy", "memset", "copy")))


def kernel_kind(name):
    name = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in name for p in parts)), "elementwise")


def profile(step, device, steps=2):
    """torch.profiler over `steps` calls of step() -> a few lines: busy time (the device's kernels on CUDA, the
    aten ops' own time on CPU) against the wall clock, its shares by kernel_kind, and the 15 longest kernels."""
    from torch.profiler import ProfilerActivity
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    sync = getattr(torch, device.type).synchronize
    sync()
    with torch.profiler.profile(activities=activities) as prof:
        start = time.time()
        for _ in range(steps):
            step()
        sync()
        wall = time.time() - start
    # the kernels themselves on CUDA (an aten op's row repeats its kernels' time); the ops' own time on CPU
    kernels = [e for e in prof.key_averages() if (e.device_type == torch.autograd.DeviceType.CUDA if cuda
                                                   else e.key.startswith("aten::"))]
    times = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total, e.count) for e in kernels}
    return profile_lines(times, wall * 1e6 / steps, steps, device.type)


def profile_lines(times, wall_us, steps, where, top=15):
    """times {kernel name: (microseconds, calls) over `steps` steps}, wall_us a step's wall time -> the summary:
    busy time per step and its shares by kernel_kind, then the `top` longest kernels."""
    busy = sum(us for us, _ in times.values())
    kinds = {}
    for name, (us, _) in times.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0) + us
    shares = " | ".join(f"{kind} {100 * us / busy:.0f} %" for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]))
    lines = [f"  profile ({where}, per step): busy {busy / steps / 1e3:.1f} ms of {wall_us / 1e3:.1f} ms wall; "
             f"of the busy time: {shares}", "    ms/step  calls/step  kind        name"]
    for name, (us, calls) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"    {us / steps / 1e3:7.2f}  {calls / steps:10.0f}  {kernel_kind(name):<11} {name[:90]}")
    return "\n".join(lines)


H100_BF16 = 989e12  # dense bf16 FLOP/s of an H100 SXM (train.PEAK_BF16_FLOPS)


def needed_samples_per_s(train_flops_per_sample, peak=H100_BF16, mfu=0.40):
    """Samples/s a training step at `mfu` of a `peak` FLOP/s GPU consumes: what its data loader must deliver."""
    return peak * mfu / train_flops_per_sample


def loader(preset, samples=24, workers=0):
    """Stage psfm's data path at the preset (views, resolution) on a small generated data set: samples/s of one
    process and, with `workers`, of a DataLoader of that many worker processes as train.py runs it (batches of
    16, pinned memory on CUDA); and needed_samples_per_s of its training step (the frozen backbone's forward plus
    3x Spa3R's forward, as train.stage_functions counts it)."""
    import tempfile
    import data
    cfg, models = train.stage_config([], "psfm", preset, False)
    geo, V = models["geo"], cfg.num_views
    with tempfile.TemporaryDirectory() as folder:
        generate_spar.generate(generate_spar.GenConfig(out=folder, scenes=3, val_scenes=1, views=max(12, 2 * V),
                                                       random_views=4, res=geo.image_size, qa_per_task=1, vocab_size=0))
        dataset = data.SceneViewsDataset(folder, "train", V, geo.image_size, samples_per_scene=samples,
                                         view_sampling=cfg.view_sampling, mask_ratio=models["psfm"].mask_ratio)
        dataset[0]  # the scenes' cameras are read once per worker: not what a step waits for
        start = time.time()
        for i in range(samples):
            dataset[i]
        per_s = samples / (time.time() - start)
        workers_per_s = loader_rate(dataset, workers) if workers else None
    train_flops = psfm_backbone_flops(models["psfm"], geo, V) + 3 * psfm_flops_per_sample(models["psfm"], geo, V)
    return {"views": V, "res": geo.image_size, "per_s": per_s, "workers": workers, "workers_per_s": workers_per_s,
            "needed": needed_samples_per_s(train_flops)}


def loader_rate(dataset, workers, batch_size=16):
    """Samples/s a DataLoader of `workers` processes delivers, timed after each worker's first batch (their start
    and first reads excluded; a clock started at the first batch would count the others' first batches, made
    before it, as made inside it) to the last batch."""
    import data
    batches = iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                               collate_fn=data.collate_views, pin_memory=torch.cuda.is_available()))
    if len(dataset) <= workers * batch_size:
        raise ValueError(f"bench.loader_rate: {len(dataset)} samples give no batch after the {workers} workers' first")
    for _ in range(workers):
        next(batches)
    start, count = time.time(), 0
    for batch in batches:
        count += len(batch["images"])
    return count / (time.time() - start)


def mfu_text(flops_per_s, device, bf16):
    """MFU against train.peak_flops, which lists bf16 peaks only; else why there is none."""
    if device.type != "cuda":
        return f"no MFU on {device.type}"
    if not bf16:
        return "no MFU without bf16"
    peak = train.peak_flops(torch.cuda.get_device_name(device))
    if peak is None:
        return "peak unknown"
    return f"MFU {100 * flops_per_s / peak:.1f}%" if flops_per_s else "-"


def row(r, bench, device):
    """A result -> the table's cells: stage, preset, batch, params, forward GFLOP/sample, samples/s, TFLOP/s, MFU."""
    images = f"{bench.vlm_images} image" + "s" * (bench.vlm_images > 1)
    shape = (f"{r['batch']} x {r['views']} views" if r["stage"] != "vlm" else
             f"{r['batch']} x ({images} + {bench.vlm_text_tokens} text tokens)")
    rate = "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:.3g}"
    tflops = "-" if r["flops_per_s"] is None else f"{r['flops_per_s'] / 1e12:.3g}"
    return [r["stage"], r["preset"], shape, f"{r['trainable'] / 1e6:.2f}M / {r['total'] / 1e6:.2f}M",
            f"{r['forward'] / 1e9:.3f}", rate, tflops, mfu_text(r["flops_per_s"], device, bench.bf16)]


def main(argv):
    bench = generate_spar.parse_args(argv, BenchConfig())
    stages = bench.stages.split(",")
    if not set(stages) <= set(train.STAGES) or bench.preset not in ("", "tiny", "reference"):
        raise SystemExit(f"--stages must be among {','.join(train.STAGES)} and --preset tiny or reference, "
                         f"got --stages={bench.stages} --preset={bench.preset}")
    counts = (bench.steps, bench.warmup, bench.batch_size, bench.num_views, bench.vlm_text_tokens, bench.vlm_images - 1)
    if min(counts) < 0:
        raise SystemExit("--steps, --warmup, --batch_size, --num_views, --vlm_text_tokens must be >= 0, "
                         "--vlm_images >= 1")
    _, _, device = train.setup_processes(bench.device)  # also sets the TF32 flags train.py uses on CUDA
    cuda = device.type == "cuda"
    preset = bench.preset or ("reference" if cuda else "tiny")
    where = torch.cuda.get_device_name(device) if cuda else f"{device.type}, {torch.get_num_threads()} threads"
    note = "" if bench.preset or cuda else " (no CUDA; the reference preset takes ~5 s a sample on 2 CPU cores)"
    print(f"bench.py: {where} | torch {torch.__version__} | preset {preset}{note}")
    generate_spar.bench()
    print(f"{where}; a step = forward + backward + AdamW; bf16 {bench.bf16 and cuda}; compile {bench.compile}\n")
    print("| stage | preset | batch | params (trainable / total) | forward GFLOP/sample | samples/s | TFLOP/s | MFU "
          "| peak memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in stages:  # one row as each stage finishes
        r = measure(name, bench, preset, device)
        memory = f"{r['memory']:.1f} GiB" if r["memory"] is not None else "-"
        print("| " + " | ".join(row(r, bench, device) + [memory]) + " |", flush=True)
        if r["profile"]:
            print(r["profile"], flush=True)
        if cuda:
            torch.cuda.empty_cache()
    feed = loader(preset, samples=24 if bench.loader_workers <= 1 else 16 * 4 * bench.loader_workers,
                  workers=bench.loader_workers)
    rate = f"{feed['per_s']:.0f} samples/s in one process"
    if feed["workers"]:
        rate += f", {feed['workers_per_s']:.0f} from a DataLoader of {feed['workers']} workers"
    print(f"\ndata loader, stage psfm ({feed['views']} views at {feed['res']} px): {rate}; one H100 at 40 % MFU "
          f"trains {feed['needed']:.0f} samples/s of it: {math.ceil(feed['needed'] / feed['per_s'])} worker(s) "
          f"keep it fed")


if __name__ == "__main__":
    main(sys.argv[1:])
