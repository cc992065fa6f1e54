"""Tests for model.py: RoPE, attention, the cross-view transformer, camera geometry, geo_loss, FLOPs, overfitting.

synthetic_batch() (two box rooms, ray-cast here) and trained_backbone() are shared with tests/test_psfm.py."""
import contextlib
import functools
import math

import pytest
import torch
import torch.nn.functional as F
import model
from torch.utils.flop_counter import FlopCounterMode

from model import (ViT, Attention, GeoBackbone, GeoConfig, Rope2D, apply_rope, flops_per_sample, geo_loss, grid_positions,
                   position_embedding, relative_to_view0, rope_cos_sin, rotation_from_6d)


# ----------------------------------------------------------------------------- synthetic scenes

def look_pose(position, yaw_deg):
    """Camera-to-world, OpenCV axes, looking horizontally along yaw (world z up)."""
    y = math.radians(yaw_deg)
    forward = torch.tensor([math.cos(y), math.sin(y), 0.0])
    right = torch.tensor([math.sin(y), -math.cos(y), 0.0])
    down = torch.tensor([0.0, 0.0, -1.0])
    pose = torch.eye(4)
    pose[:3, :3] = torch.stack([right, down, forward], 1)
    pose[:3, 3] = torch.tensor(position)
    return pose


def render_box_room(size, K, pose, H, W):
    """Ray-cast the inside of the room [0, sx] x [0, sy] x [0, sz]: rgb (3, H, W), z-depth (H, W), semantic (H, W)."""
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    d_cam = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1)  # z = 1
    d = d_cam @ pose[:3, :3].T
    o = pose[:3, 3]
    exit_t = torch.where(d > 0, (torch.tensor(size) - o) / d, -o / d)  # distance to each axis' far plane
    depth, axis = exit_t.min(-1)  # z-depth, since d_cam has z = 1
    hit = o + depth[..., None] * d
    semantic = torch.where(axis == 2, torch.where(d[..., 2] < 0, 0, 1), 2)  # floor, ceiling, wall
    colours = torch.tensor([[0.6, 0.4, 0.2], [0.9, 0.9, 0.9], [0.3, 0.5, 0.7]])
    checker = ((hit.floor().sum(-1) % 2) * 0.2)[..., None]
    rgb = (colours[semantic] * (0.8 + checker)).clamp(0, 1).permute(2, 0, 1)
    return rgb, depth, semantic


def synthetic_batch(H=32, W=32, views=4):
    """Two box rooms, each seen by `views` cameras at known places: a PSFM batch with consistent geometry."""
    rooms = [((4.0, 3.0, 2.5), (1.0, 1.0, 1.4), 0.0), ((6.0, 5.0, 3.0), (2.0, 3.5, 1.6), 40.0)]
    K = torch.tensor([[W * 0.8, 0, W / 2], [0, W * 0.8, H / 2], [0, 0, 1.0]])
    batch = {key: [] for key in ("images", "depth", "K", "pose", "semantic")}
    for size, start, yaw in rooms:
        for view in range(views):
            pose = look_pose([start[0] + 0.3 * view, start[1] + 0.2 * view, start[2]], yaw + 35 * view)
            rgb, depth, semantic = render_box_room(size, K, pose, H, W)
            for key, value in zip(batch, (rgb, depth, K, pose, semantic)):
                batch[key].append(value)
    batch = {key: torch.stack(values).view(len(rooms), views, *values[0].shape) for key, values in batch.items()}
    batch["depth"][:, :, :2] = 0  # a few invalid pixels, as a real sensor has
    batch["semantic"][:, :, -2:] = -1
    return batch


@functools.lru_cache(maxsize=None)
def trained_backbone(steps=150):
    """A tiny backbone after `steps` AdamW steps of stage geo on synthetic_batch(): (backbone, losses per step)."""
    torch.manual_seed(0)
    backbone = GeoBackbone(GeoConfig.tiny())
    batch = synthetic_batch()
    opt = torch.optim.AdamW(backbone.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        loss, _ = geo_loss(backbone(batch["images"]), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return backbone, losses


@contextlib.contextmanager
def watched_sdpa():
    """Records (q shape, k shape, {q, k, v dtypes}) of every scaled_dot_product_attention call inside."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def watched(q, k, v, **kwargs):
        calls.append((q.shape, k.shape, {q.dtype, k.dtype, v.dtype}))
        return sdpa(q, k, v, **kwargs)

    F.scaled_dot_product_attention = watched
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = sdpa


def count_flops(fn):
    """FLOPs of fn() by torch's counter for matmuls and convolutions, plus 4 * B * h * Tq * Tk * hd for each
    scaled_dot_product_attention call (the counter does not see SDPA on CPU)."""
    with watched_sdpa() as calls, FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() + sum(4 * q[:-1].numel() * k[-2] * q[-1] for q, k, _ in calls)


# ----------------------------------------------------------------------------- RoPE and attention

def test_rope_scores_depend_only_on_position_difference():
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    pos = torch.randint(0, 10, (5, 2)).float()

    def scores(p):
        cos, sin = rope_cos_sin(p, 16, 100.0)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).mT

    assert torch.allclose(scores(pos), scores(pos + torch.tensor([3.0, -7.0])), atol=1e-5)
    assert not torch.allclose(scores(pos), scores(pos * 2), atol=1e-3)
    cos, sin = rope_cos_sin(torch.zeros(5, 2), 16, 100.0)  # position (0, 0) leaves a token as it is
    assert torch.equal(apply_rope(q, cos, sin), q)


def test_rope_tables_give_what_the_formula_gives_and_stay_out_of_checkpoints():
    rope = Rope2D(16, 100.0)
    for positions in (grid_positions(3, 5, 2), grid_positions(511, 1, 0), torch.tensor([[7.0, 300.0]])):
        looked_up, computed = rope(positions), rope_cos_sin(positions, 16, 100.0)
        assert all(torch.equal(a, b) for a, b in zip(looked_up, computed))  # bit for bit: runs do not change
    assert dict(Rope2D(16, 100.0).state_dict()) == {} and "vit.rope.cos" not in GeoBackbone(GeoConfig()).state_dict()
    with pytest.raises(ValueError, match="a 512 x 2 patch grid"):
        grid_positions(512, 2, 0)


class FormulaRope(torch.nn.Module):
    """rope_cos_sin itself, in Rope2D's place: what the tables must reproduce wherever a model reads them."""

    def __init__(self, head_dim, base):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, positions):
        return rope_cos_sin(positions, self.head_dim, self.base)


def test_the_backbone_reads_its_rope_tables_at_its_tokens_positions():
    torch.manual_seed(0)
    c = GeoConfig(num_registers=3)
    backbone, images = GeoBackbone(c), torch.rand(2, 3, 3, 24, 40)  # a 3 x 5 grid: rows and columns differ
    context = torch.tensor([[True, False, True], [True, True, False]])
    with torch.no_grad():
        tables = backbone.patch_tokens(images, context)
        backbone.vit.rope = FormulaRope(c.dim // c.num_heads, c.rope_base)  # the cross-view blocks read it too
        assert torch.equal(backbone.patch_tokens(images, context), tables)


def test_a_flat_image_patch_tokens_know_where_they_sit(monkeypatch):
    """Every patch of a one-colour image looks the same. RoPE moves attention scores, not content: without the
    position embedding only the registers' position-dependent scores tell the patch tokens apart (a little);
    with it they differ by far more."""
    embed = position_embedding(grid_positions(4, 4, 0), 64, 100.0)  # (16, 64)
    rows = grid_positions(4, 4, 0)[:, :1]
    assert torch.allclose(embed[:, :16], (rows * 100.0 ** (-torch.arange(16) / 16)).sin())  # by the formula
    assert (torch.cdist(embed, embed) + torch.eye(16)).min() > 0.1  # every position its own embedding

    def spread():  # mean distance between the patch tokens of a flat image
        torch.manual_seed(0)
        with torch.no_grad():
            patches = ViT(GeoConfig()).eval()(torch.full((1, 3, 32, 32), 0.4))[0, GeoConfig().num_registers:]
        return torch.cdist(patches, patches).mean()
    with_embedding = spread()
    monkeypatch.setattr(model, "position_embedding", lambda positions, dim, base: torch.zeros(len(positions), dim))
    assert with_embedding > 4 * spread()


def test_grid_positions_row_major_after_special_tokens():
    pos = grid_positions(2, 3, 1)
    assert pos.tolist() == [[0, 0], [1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(2, 6, 32)
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    q, k, v = attn.qkv(x).view(2, 6, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.mT / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32))
    assert torch.allclose(attn(x, attn_mask=mask), expected, atol=1e-5)


# ----------------------------------------------------------------------------- the cross-view transformer

def test_frame_block_is_per_view_and_global_block_mixes_views():
    torch.manual_seed(0)
    backbone = GeoBackbone(GeoConfig.tiny())
    c = backbone.config
    S = 1 + c.num_registers + 16
    rope = rope_cos_sin(grid_positions(4, 4, 1 + c.num_registers), c.dim // c.num_heads, c.rope_base)
    x = torch.randn(2, 3, S, c.dim)
    y = x.clone()
    y[:, 2] += torch.randn(2, S, c.dim)  # perturb view 2 only
    frame_x, frame_y = backbone.run_frame_block(0, x, rope), backbone.run_frame_block(0, y, rope)
    assert torch.equal(frame_x[:, :2], frame_y[:, :2])
    assert not torch.allclose(frame_x[:, 2], frame_y[:, 2])
    global_x, global_y = backbone.run_global_block(0, x, rope), backbone.run_global_block(0, y, rope)
    assert (global_x[:, 1] - global_y[:, 1]).abs().max() > 1e-4


def test_context_views_never_see_masked_views():
    """With a context mask the context views' tokens equal a run on the context views alone."""
    torch.manual_seed(0)
    backbone = GeoBackbone(GeoConfig.tiny())
    images = torch.rand(2, 4, 3, 32, 32)
    context = torch.tensor([[True, False, True, False], [True, True, False, False]])
    masked = backbone(images, context)["tokens"]
    for b in range(2):
        alone = backbone(images[b:b + 1, context[b]])["tokens"][0]
        assert torch.allclose(masked[b, context[b]], alone, atol=1e-5)
    perturbed = images.clone()
    perturbed[0, 1] = torch.rand(3, 32, 32)  # a masked view of sample 0
    after = backbone(perturbed, context)["tokens"]
    assert torch.equal(after[0, [0, 2]], masked[0, [0, 2]])  # the context views do not notice
    assert not torch.allclose(after[0, 3], masked[0, 3], atol=1e-3)  # the other masked view does
    assert torch.equal(backbone.patch_tokens(images, context), masked)  # the heads-free path reads the same tokens


def test_backbone_equivariant_to_reordering_views_after_the_first():
    torch.manual_seed(0)
    backbone = GeoBackbone(GeoConfig.tiny())
    images = torch.rand(1, 4, 3, 32, 32)
    out = backbone(images)
    perm = [0, 3, 1, 2]
    permuted = backbone(images[:, perm])
    for key in ("tokens", "log_depth", "pose", "K"):
        assert torch.allclose(permuted[key], out[key][:, perm], atol=1e-5), key
    swapped = backbone(images[:, [1, 0, 2, 3]])  # view 0 is marked, so it is not just another view
    assert not torch.allclose(swapped["tokens"][:, 1], out["tokens"][:, 0], atol=1e-3)


def test_outputs_shapes_and_cameras_are_valid():
    torch.manual_seed(0)
    backbone = GeoBackbone(GeoConfig.tiny())
    out = backbone(torch.rand(2, 3, 3, 32, 48))  # not square: any multiple of the patch size runs
    assert out["tokens"].shape == (2, 3, 4 * 6, 64)
    assert out["log_depth"].shape == out["depth"].shape == (2, 3, 32, 48)
    assert torch.equal(out["pose"][:, 0], torch.eye(4).expand(2, 4, 4))
    R = out["pose"][..., :3, :3]
    assert torch.allclose(R @ R.mT, torch.eye(3).expand_as(R), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(2, 3), atol=1e-5)
    assert torch.allclose(out["K"][..., 0, 2], torch.full((2, 3), 24.0))
    assert torch.allclose(out["K"][..., 0, 0], out["log_focal"][..., 0].exp() * 48)
    assert torch.allclose(out["depth"][0, 0, 0, 0], torch.tensor(2.0), rtol=0.2)  # the 2 m initial depth


def test_point_head_output_lands_on_its_pixel():
    """A point head that writes (patch index, pixel index within the patch, coordinate) puts them where patchify
    reads them from: pixel (y, x) of a 16 x 24 view holds patch (y // p) * (W // p) + x // p, pixel (y % p) * p + x % p."""
    torch.manual_seed(0)
    backbone = GeoBackbone(GeoConfig.tiny())
    p, H, W = backbone.config.patch_size, 16, 24
    N = (H // p) * (W // p)
    code = torch.arange(N)[:, None, None] * 1000 + torch.arange(p * p)[:, None] * 10 + torch.arange(3)  # (N, p*p, 3)

    class WritesItsCode(torch.nn.Module):
        def forward(self, tokens):  # (B, V, N, D) -> (B, V, N, 3 p²), as the Linear head's layout
            return code.flatten(1).float().expand(*tokens.shape[:2], -1, -1)
    backbone.point_head = WritesItsCode()
    points = backbone(torch.rand(2, 3, 3, H, W))["points"]  # (B, V, 3, H, W)
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    for c in range(3):
        expected = ((y // p) * (W // p) + x // p) * 1000 + ((y % p) * p + x % p) * 10 + c
        assert torch.equal(points[:, :, c], expected.float().expand(2, 3, H, W))
    assert torch.equal(model.patchify(points[:, :, 0], p)[0, 0], code[..., 0].float())  # the inverse agrees


def test_heads_and_loss_finite_on_random_input():
    torch.manual_seed(0)
    backbone = GeoBackbone(GeoConfig.tiny())
    batch = {"images": torch.rand(2, 3, 3, 32, 32), "depth": torch.rand(2, 3, 32, 32) * 5,
             "K": torch.tensor([[20.0, 0, 16], [0, 20, 16], [0, 0, 1]]).repeat(2, 3, 1, 1),
             "pose": torch.linalg.matrix_exp(torch.randn(2, 3, 4, 4) * 0.1 * torch.tensor([1, 1, 1, 0.0]))}
    batch["pose"][..., 3, :] = torch.tensor([0, 0, 0, 1.0])
    loss, terms = geo_loss(backbone(batch["images"]), batch)
    loss.backward()
    assert set(terms) == {"depth", "translation", "rotation", "focal", "points"}
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in backbone.parameters())


@pytest.mark.filterwarnings("error:Mismatch dtype")  # an fp32 weight on bf16 input: the slow unfused norm
def test_bf16_autocast_feeds_attention_one_dtype():
    """CUDA's SDPA refuses mixed dtypes: the fp32 RoPE tables and norms must not leak into q and k."""
    torch.manual_seed(0)
    backbone = GeoBackbone(GeoConfig.tiny())
    batch = synthetic_batch()
    with watched_sdpa() as calls, torch.autocast("cpu", dtype=torch.bfloat16):
        pred = backbone(batch["images"])
        loss, _ = geo_loss(pred, batch)
    assert calls and all(dtypes == {torch.bfloat16} for _, _, dtypes in calls)
    assert pred["pose"].dtype == torch.float32 and torch.isfinite(loss)


def test_bf16_attention_stays_near_fp32():
    """QK-norm and RoPE run in bf16 under autocast (for speed): the block's output must stay within bf16's
    rounding of the fp32 one."""
    torch.manual_seed(0)
    attention = Attention(64, 4)
    x = torch.randn(2, 20, 64)
    rope = rope_cos_sin(grid_positions(4, 4, 4, "cpu"), 16, 100.0)
    reference = attention(x, rope)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = attention(x, rope)
    assert fast.dtype == torch.bfloat16
    assert (fast.float() - reference).norm() / reference.norm() < 2e-2


# ----------------------------------------------------------------------------- camera geometry and the loss

def test_rotation_from_6d():
    assert torch.equal(rotation_from_6d(torch.tensor([1.0, 0, 0, 0, 1, 0])), torch.eye(3))
    R = torch.linalg.matrix_exp(torch.tensor([[0, -0.3, 0.5], [0.3, 0, -0.2], [-0.5, 0.2, 0]]))
    assert torch.allclose(rotation_from_6d(torch.cat([R[:, 0], R[:, 1]]) * 3), R, atol=1e-6)  # scale-free
    R = rotation_from_6d(torch.randn(100, 6))
    assert torch.allclose(R @ R.mT, torch.eye(3).expand_as(R), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(100), atol=1e-5)


def test_relative_to_view0_hand_case():
    pose0 = look_pose([1.0, 2.0, 1.5], 90.0)  # at (1, 2, 1.5) looking along world +y
    pose1 = look_pose([1.0, 4.0, 1.5], 180.0)  # 2 m further along +y, turned left to look along world -x
    rel = relative_to_view0(torch.stack([pose0, pose1])[None])[0]
    assert torch.allclose(rel[0], torch.eye(4), atol=1e-6)
    # in view 0's frame the second camera is 2 m forward (z); its forward axis is view 0's left (-x), its right is view 0's forward
    assert torch.allclose(rel[1, :3, 3], torch.tensor([0.0, 0.0, 2.0]), atol=1e-6)
    assert torch.allclose(rel[1, :3, 2], torch.tensor([-1.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(rel[1, :3, 0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)


def test_point_map_lies_on_the_ray_cast_room():
    """Back-projected with the world poses, every valid pixel of synthetic_batch's rooms lands on a wall, the
    floor or the ceiling of its room (render_box_room cast the rays); relative to view 0 they are view 0's
    camera-frame points, z = depth."""
    batch = synthetic_batch()
    world = model.point_map(batch["depth"], batch["K"], batch["pose"]).movedim(2, -1)  # (B, V, H, W, 3)
    valid = batch["depth"] > 0
    for b, size in enumerate([(4.0, 3.0, 2.5), (6.0, 5.0, 3.0)]):
        to_plane = torch.cat([world[b].abs(), (world[b] - torch.tensor(size)).abs()], -1).amin(-1)  # (V, H, W)
        assert to_plane[valid[b]].max() < 1e-4
    local = model.point_map(batch["depth"], batch["K"], relative_to_view0(batch["pose"]))[:, 0]  # (B, 3, H, W)
    assert torch.allclose(local[:, 2], batch["depth"][:, 0])
    assert local[0, 0, 5, 16] == pytest.approx(batch["depth"][0, 0, 5, 16] * 0.5 / (32 * 0.8))  # u = 16.5, cx = 16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # train.py's autocast must not round the targets
        assert torch.equal(model.point_map(batch["depth"], batch["K"], batch["pose"]).movedim(2, -1), world)


def test_geo_loss_hand_case():
    batch = synthetic_batch()
    B, V = batch["depth"].shape[:2]
    truth = {"log_depth": batch["depth"].clamp_min(1e-6).log(), "pose": relative_to_view0(batch["pose"]),
             "log_focal": torch.full((B, V, 2), math.log(0.8))}
    truth["points"] = model.point_map(batch["depth"], batch["K"], truth["pose"])
    total, terms = geo_loss(truth, batch)
    assert total.item() == pytest.approx(0.0, abs=1e-5)
    off = dict(truth, log_depth=truth["log_depth"] + math.log(2.0), log_focal=truth["log_focal"] - 0.1)
    off["pose"] = truth["pose"].clone()
    off["pose"][..., :3, 3] += torch.tensor([0.3, 0.0, 0.0])  # every camera 0.3 m off along x
    off["points"] = truth["points"] + torch.tensor([0.2, -0.1, 0.0])[:, None, None]  # every point 0.3 m off (L1)
    off["points"][..., :2, :] = 100.0  # where depth is invalid: left out
    total, terms = geo_loss(off, batch)
    assert terms["depth"].item() == pytest.approx(math.log(2.0), rel=1e-5)  # invalid pixels do not count
    assert terms["translation"].item() == pytest.approx(0.1, rel=1e-5)  # one of three axes
    assert terms["focal"].item() == pytest.approx(0.1, rel=1e-5)
    assert terms["rotation"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["points"].item() == pytest.approx(0.3, rel=1e-5)


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="head_dim"):
        GeoConfig(dim=48, num_heads=4)
    with pytest.raises(ValueError, match="image_size"):
        GeoConfig(image_size=30)
    backbone = GeoBackbone(GeoConfig.tiny())
    with pytest.raises(ValueError, match="images must be"):
        backbone(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        backbone(torch.rand(1, 2, 3, 30, 32))
    batch = synthetic_batch()
    pred = backbone(batch["images"])
    with pytest.raises(ValueError, match=r"batch\['K'\]"):
        geo_loss(pred, dict(batch, K=batch["K"][:, :, :2]))
    with pytest.raises(ValueError, match="missing field 'pose'"):
        geo_loss(pred, {k: v for k, v in batch.items() if k != "pose"})


# ----------------------------------------------------------------------------- cost, determinism, training

@pytest.mark.parametrize("views", [1, 3])
def test_flops_per_sample_matches_counted_flops(views):
    config = GeoConfig.tiny()
    backbone = GeoBackbone(config)
    images = torch.rand(1, views, 3, config.image_size, config.image_size)
    with torch.no_grad():
        assert count_flops(lambda: backbone(images)) == flops_per_sample(config, views)
        assert count_flops(lambda: backbone.patch_tokens(images)) == flops_per_sample(config, views, heads=False)


def test_reference_preset_size():
    config = GeoConfig.reference()
    assert config.image_size // config.patch_size == 16 and config.dim // config.num_heads == 64
    # 12 * dim^2 per block (qkv, out, MLP x4) over 18 blocks, ~32 M; a few more for embeddings, norms and heads
    assert 31e6 < sum(p.numel() for p in GeoBackbone(config).parameters()) < 34e6


def test_same_seed_same_first_loss():
    batch = synthetic_batch()

    def first_loss():
        torch.manual_seed(123)
        return geo_loss(GeoBackbone(GeoConfig.tiny())(batch["images"]), batch)[1]

    assert first_loss() == first_loss()


def test_geo_overfits_two_scenes():
    """150 AdamW steps on two scenes; measured 1.08 -> 0.044 (lr 2e-3, seed 0), so a halving is a safe bound."""
    _, losses = trained_backbone()
    assert losses[-1] < 0.5 * losses[0]
