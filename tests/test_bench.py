"""bench.py: its FLOP and parameter accounting and its output, on the tiny preset (no timing is asserted)."""
import warnings
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import bench
import data
import train
import vlm
from model import GeoBackbone, GeoConfig
from model import flops_per_sample as geo_flops
from psfm import Spa3RConfig
from psfm import flops_per_sample as psfm_flops

CPU = torch.device("cpu")
TOKENIZER = bench.special_tokenizer()


def run(stage, **flags):
    config = bench.BenchConfig(preset="tiny", batch_size=2, steps=2, warmup=0, **flags)
    return bench.measure(stage, config, "tiny", CPU)


def step_flops_per_sample(r):
    """The FLOPs a timed step was credited with, per sample: (FLOP/s) / (samples/s)."""
    return r["flops_per_s"] / r["samples_per_s"]


@pytest.mark.parametrize("views", [2, 3])
def test_geo_and_psfm_steps_count_the_flops_of_their_stage_functions(views):
    g, s = GeoConfig.tiny(), Spa3RConfig.tiny()
    geo, psfm = run("geo", num_views=views), run("psfm", num_views=views)
    assert geo["forward"] == geo_flops(g, views) and psfm["forward"] == geo_flops(g, views) + psfm_flops(s, g, views)
    assert step_flops_per_sample(geo) == pytest.approx(3 * geo_flops(g, views), rel=1e-9)
    # the backbone is frozen: forward only
    assert step_flops_per_sample(psfm) == pytest.approx(geo_flops(g, views) + 3 * psfm_flops(s, g, views), rel=1e-9)


def test_profiling_leaves_the_counted_flops_and_rates_alone():
    """--profile runs two more steps after the timed ones: they must not be credited to the timed ones."""
    g, s = GeoConfig.tiny(), Spa3RConfig.tiny()
    r = run("psfm", num_views=2, profile=True)
    assert step_flops_per_sample(r) == pytest.approx(geo_flops(g, 2) + 3 * psfm_flops(s, g, 2), rel=1e-9)
    assert "profile (cpu, per step)" in r["profile"] and "aten::mm" in r["profile"]


def test_kernels_are_sorted_into_kinds_and_the_shares_add_up():
    names = {"nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN": "matmul",  # names seen on an H100
             "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64": "attention",
             "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)": "attention",
             "triton_poi_fused__to_copy_add_arange_cat_cos_div_expand_mul_neg_pow_sin_slice_unsqueeze_8": "elementwise",
             "triton_red_fused__scaled_dot_product_flash_attention_backward_sum_3": "elementwise",  # a fused kernel
             "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
             "Memcpy HtoD (Pinned -> Device)": "copy, cast", "aten::addmm": "matmul",
             "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::gelu": "elementwise"}
    assert {name: bench.kernel_kind(name) for name in names} == names
    times = {"aten::mm": (6000, 8), "aten::gelu": (3000, 4), "aten::mul": (1000, 2)}  # (us, calls) over 2 steps
    lines = bench.profile_lines(times, 8000, 2, "cpu", top=2).splitlines()
    assert lines[0] == ("  profile (cpu, per step): busy 5.0 ms of 8.0 ms wall; of the busy time: "
                        "matmul 60 % | elementwise 40 %")
    assert [line.split() for line in lines[2:]] == [["3.00", "4", "matmul", "aten::mm"],
                                                    ["1.50", "2", "elementwise", "aten::gelu"]]


def test_the_synthetic_view_batch_is_what_the_loader_collates(tmp_path):
    """Same fields, shapes and dtypes as data.collate_views of real samples: the benchmark's step copies the
    bytes a training step copies (copying float32 images and int64 class ids took 5.6 ms of a 193 ms psfm step
    on an H100)."""
    import generate_spar
    generate_spar.generate(generate_spar.GenConfig(out=str(tmp_path), scenes=1, val_scenes=0, views=6, random_views=0,
                                                   res=32, qa_per_task=1, vocab_size=0))
    dataset = data.SceneViewsDataset(str(tmp_path), "train", 3, 32, samples_per_scene=2)
    real = data.collate_views([dataset[0], dataset[1]])
    synthetic = bench.view_batch(2, 3, 32, 27)
    assert {k: (v.shape, v.dtype) for k, v in synthetic.items()} == \
        {k: (real[k].shape, real[k].dtype) for k in synthetic}


def test_psfm_counts_the_frozen_backbone_as_not_trainable():
    r = run("psfm")
    assert r["total"] - r["trainable"] == sum(p.numel() for p in GeoBackbone(GeoConfig.tiny()).parameters())


@pytest.mark.parametrize("images, text", [(1, 20), (3, 7)])
def test_vlm_batch_has_the_asked_images_and_text_and_no_padding(images, text):
    # a padded or mis-sized synthetic batch would be credited with other FLOPs than flops_per_sample says
    r = run("vlm", vlm_images=images, vlm_text_tokens=text)
    config = vlm.VLMConfig.tiny()
    assert r["forward"] == vlm.flops_per_sample(config, images, text)
    assert step_flops_per_sample(r) == pytest.approx(vlm.flops_per_sample(config, images, text, training=True),
                                                     rel=1e-9)
    batch = bench.vlm_batch(config, 2, images, text)
    assert batch["input_ids"].shape == (2, images * vlm.tokens_per_image(config, 32, 32) + text)
    assert (batch["input_ids"] != vlm.special_ids(TOKENIZER)["<|pad|>"]).all()


def test_main_prints_a_markdown_row_per_stage(capsys):
    bench.main(["--preset=tiny", "--stages=geo,vlm", "--batch_size=1", "--steps=1", "--warmup=0"])
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert [t.split(" | ")[0] for t in table[2:]] == ["| geo", "| vlm"]
    assert len(table) == 4  # printed once: the header, its rule, one row per stage
    assert all(t.count("|") == 10 for t in table) and table[1] == "|---|---|---|---|---|---|---|---|---|"
    assert table[2].endswith("| no MFU on cpu | - |")  # no peak memory on a CPU


def test_bad_flags_are_refused():
    with pytest.raises(SystemExit, match="--stages must be among geo,psfm,vlm"):
        bench.main(["--stages=geo,nerf"])
    with pytest.raises(SystemExit, match="--vlm_images >= 1"):
        bench.main(["--vlm_images=0"])


def test_the_loader_is_measured_against_the_step_rate_it_must_feed():
    """needed = peak x MFU / the training FLOPs of a psfm sample, as a timed psfm step is credited with them."""
    assert bench.needed_samples_per_s(2e9, peak=1e12, mfu=0.5) == 250
    feed = bench.loader("tiny", samples=16, workers=2)  # 48 samples: 3 batches, the first 2 untimed
    step = run("psfm", num_views=feed["views"])  # train.py's own count for a step of these views
    assert feed["needed"] == pytest.approx(bench.H100_BF16 * 0.40 / step_flops_per_sample(step), rel=1e-9)
    assert feed["views"] == 4 and feed["res"] == 32 and feed["per_s"] > 0 and feed["workers_per_s"] > 0


@pytest.mark.parametrize("stage", ["geo", "psfm", "vlm"])
def test_a_training_step_compiles_to_one_graph(stage):
    """Nothing in a stage's loss waits on the device (no .item(), .tolist() or data-dependent shape), so
    torch.compile makes one graph of it and the host never stalls. The vlm reads a cached latent
    (train.py --cache_latent): SpaVLM.spatial_latent's grouping by image count is host-side and stays eager."""
    defaults, _ = train.stage_config([], stage, "tiny", False)
    built, batch, _ = bench.build(stage, "tiny", replace(defaults, batch_size=2), bench.BenchConfig(preset="tiny"))
    batch = data.to_device(batch, CPU)
    if stage == "vlm":
        with torch.no_grad():
            batch["latent"] = built.model.spatial_latent(batch["images"], batch["num_images"])
    explained = torch._dynamo.explain(lambda b: built.loss(built.model, b))(batch)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(r.reason).split("\n")[0] for r in explained.break_reasons]


def test_the_vlm_step_compiles_spa3r_inside_its_eager_grouping():
    """Without a cached latent, SpaVLM.spatial_latent groups records on the host (left eager), but the
    PSFM.encode calls inside it, a third of a step's FLOPs, must still be traced and compiled."""
    defaults, _ = train.stage_config([], "vlm", "tiny", False)
    built, batch, _ = bench.build("vlm", "tiny", replace(defaults, batch_size=2), bench.BenchConfig(preset="tiny"))
    explained = torch._dynamo.explain(lambda b: built.loss(built.model, b))(data.to_device(batch, CPU))
    torch._dynamo.reset()
    traced = [node.meta.get("stack_trace") or "" for graph in explained.graphs for node in graph.graph.nodes]
    assert any("in encode" in trace and "psfm.py" in trace for trace in traced)


# ----------------------------------------------------------------------------- on CUDA only (skipped elsewhere)

@contextmanager
def sdpa_backends():
    """Runs every scaled_dot_product_attention call under the first SDPA backend that accepts it, fastest first,
    and records (backend, whether a mask was given): which kernel CUDA's dispatcher can pick for each call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa, calls = F.scaled_dot_product_attention, []
    order = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)

    def first_that_runs(q, k, v, attn_mask=None, **kwargs):
        for backend in order:
            try:
                with sdpa_kernel(backend), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # each refusal warns why
                    out = sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
            except RuntimeError:  # "No available kernel"
                continue
            calls.append((backend.name, attn_mask is not None))
            return out
        raise AssertionError("no SDPA backend ran")

    F.scaled_dot_product_attention = first_that_runs
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = sdpa


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stage", ["geo", "psfm", "vlm"])
def test_cuda_attention_takes_the_flash_kernel_at_the_reference_preset(stage):
    """A bf16 training step of each stage at the reference sizes: every attention without a mask must be eligible
    for flash attention (one dtype, head size, last dimension contiguous); the masked global blocks of PSFM's one
    pass (context views never see masked ones) can only take a kernel that reads a mask, never the math one."""
    device = torch.device("cuda")
    cfg = replace(train.stage_config([], stage, "reference", False)[0], batch_size=2, num_views=4)
    built, batch, _ = bench.build(stage, "reference", cfg, bench.BenchConfig())
    built.model.to(device)
    batch = train.to_device(batch, device)
    with sdpa_backends() as calls, torch.autocast("cuda", torch.bfloat16):
        loss, _ = built.loss(built.model, batch)
    loss.backward()
    assert calls and torch.isfinite(loss)
    assert {backend for backend, masked in calls if not masked} == {"FLASH_ATTENTION"}, calls
    assert all(backend in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION") for backend, masked in calls if masked), calls
    assert any(masked for _, masked in calls) == (stage == "psfm")
