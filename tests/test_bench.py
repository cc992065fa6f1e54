"""bench.py: its FLOP and parameter accounting and its output, on the tiny preset (no timing is asserted)."""
import pytest
import torch

import bench
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
    feed = bench.loader("tiny", samples=4)
    step = run("psfm", num_views=feed["views"])  # train.py's own count for a step of these views
    assert feed["needed"] == pytest.approx(bench.H100_BF16 * 0.40 / step_flops_per_sample(step), rel=1e-9)
    assert feed["views"] == 4 and feed["res"] == 32 and feed["per_s"] > 0
