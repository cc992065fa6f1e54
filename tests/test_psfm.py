"""Tests for psfm.py: rays, PRoPE, masking, the encoder's invariances, targets, losses, FLOPs, overfitting."""
import inspect
import math

import pytest
import torch

from model import Attention, GeoBackbone, GeoConfig, grid_positions, relative_to_view0
from psfm import (PRoPE, PSFM, Spa3RConfig, Spa3REncoder, camera_rays, feature_loss, flops_per_sample, num_context_views,
                  patch_centres, patch_log_depth, plucker_rays, prope_matrices, sample_context, semantic_field)
from test_model import FormulaRope, count_flops, look_pose, synthetic_batch, trained_backbone, watched_sdpa


def tiny_psfm(seed=0, **overrides):
    torch.manual_seed(seed)
    return PSFM(Spa3RConfig(**overrides), GeoBackbone(GeoConfig.tiny()))


def rigid(seed):
    g = torch.Generator().manual_seed(seed)
    T = torch.eye(4)
    T[:3, :3] = torch.linalg.matrix_exp((lambda a: a - a.T)(torch.randn(3, 3, generator=g)))
    T[:3, 3] = torch.randn(3, generator=g)
    return T


# ----------------------------------------------------------------------------- rays

def with_context(batch, seed, mask_ratio=0.5):
    """The batch with its context views drawn by a seeded generator, as data.SceneViewsDataset draws them."""
    B, V = batch["images"].shape[:2]
    return {**batch, "context": sample_context(B, V, mask_ratio, torch.Generator().manual_seed(seed))}


def test_plucker_rays_hand_case():
    K = torch.tensor([[16.0, 0, 16], [0, 16, 16], [0, 0, 1]])
    pose = look_pose([1.0, 2.0, 3.0], 0.0)  # looking along world +x: right = -y, down = -z
    uv = patch_centres(32, 32, 8)
    assert uv[:5].tolist() == [[4, 4], [12, 4], [20, 4], [28, 4], [4, 12]]
    rays = plucker_rays(K[None, None], pose[None, None], uv)[0, 0, 0]  # patch (0, 0), centre (4, 4)
    # camera direction ((4 - 16) / 16, (4 - 16) / 16, 1) = (-0.75, -0.75, 1) -> world (1, 0.75, 0.75)
    norm = math.sqrt(1 + 2 * 0.75 ** 2)
    assert torch.allclose(rays[:3], torch.tensor([1.0, 0.75, 0.75]) / norm, atol=1e-6)
    # moment (1, 2, 3) x (1, 0.75, 0.75) = (2 * 0.75 - 3 * 0.75, 3 - 0.75, 0.75 - 2)
    assert torch.allclose(rays[3:], torch.tensor([-0.75, 2.25, -1.25]) / norm, atol=1e-6)


def test_ray_through_projected_point_passes_through_it():
    K = torch.tensor([[30.0, 0, 15], [0, 28, 17], [0, 0, 1]])
    pose = rigid(1)
    X_cam = torch.tensor([0.4, -0.2, 2.5])
    X = pose[:3, :3] @ X_cam + pose[:3, 3]
    uv = torch.stack([K[0, 0] * X_cam[0] / X_cam[2] + K[0, 2], K[1, 1] * X_cam[1] / X_cam[2] + K[1, 2]])[None]
    d, m = plucker_rays(K[None, None], pose[None, None], uv)[0, 0, 0].split(3)
    assert torch.allclose(torch.cross(X, d, dim=0), m, atol=1e-5)  # X x d = o x d: X is on the line
    assert torch.dot(X - pose[:3, 3], d) > 0  # in front of the camera
    assert torch.allclose(torch.cross(X + 7 * d, d, dim=0), m, atol=1e-4)  # so is every point along it
    cam_d = camera_rays(K[None, None], uv)[0, 0, 0]
    assert torch.allclose(cam_d, X_cam / X_cam.norm(), atol=1e-6)


# ----------------------------------------------------------------------------- PRoPE

def prope_attention_inputs(poses, seed=0):
    """Attention over 3 views x 4 tokens, every token carrying its view's camera."""
    torch.manual_seed(seed)
    attn = Attention(32, 2)  # head_dim 16: 8 projective channels, 8 RoPE channels
    x = torch.randn(1, 12, 32)
    K = torch.tensor([[20.0, 0, 16], [0, 22, 15], [0, 0, 1]]).repeat(1, 3, 1, 1)
    P, P_inv = prope_matrices(K, poses[None], 32, 32)  # (1, 3, 4, 4)
    prope = PRoPE(P.repeat_interleave(4, 1), P_inv.repeat_interleave(4, 1), grid_positions(2, 2, 0).repeat(3, 1), 16, 100.0)
    return attn, x, prope


def test_prope_attention_invariant_to_a_global_rigid_motion_of_the_cameras():
    poses = torch.stack([rigid(1), rigid(2), rigid(3)])
    attn, x, prope = prope_attention_inputs(poses)
    out = attn(x, prope=prope)
    _, _, moved = prope_attention_inputs(rigid(9) @ poses)  # the whole rig moved: nothing relative changes
    assert torch.allclose(attn(x, prope=moved), out, atol=1e-4)
    _, _, one_moved = prope_attention_inputs(torch.stack([poses[0], rigid(9) @ poses[1], poses[2]]))
    assert (attn(x, prope=one_moved) - out).abs().max() > 1e-2  # but one camera moving alone does


def test_prope_with_identity_cameras_at_the_origin_is_plain_attention():
    torch.manual_seed(0)
    attn, x = Attention(32, 2), torch.randn(2, 5, 32)
    eye = torch.eye(4).expand(2, 5, 4, 4)
    prope = PRoPE(eye, eye, torch.zeros(5, 2), 16, 100.0)
    assert torch.allclose(attn(x, prope=prope), attn(x), atol=1e-6)


# ----------------------------------------------------------------------------- masking

@pytest.mark.parametrize("views, ratio, kept", [(8, 0.5, 4), (4, 0.5, 2), (5, 0.5, 2), (10, 0.7, 3), (6, 0.0, 6), (1, 0.5, 1)])
def test_num_context_views(views, ratio, kept):
    assert num_context_views(views, ratio) == kept


def test_masking_keeps_view0_respects_ratio_and_is_seeded():
    context = sample_context(2000, 8, 0.5, torch.Generator().manual_seed(0))
    assert context[:, 0].all()
    assert (context.sum(1) == 4).all()
    # the other 3 kept views are spread evenly over views 1..7: 3/7 each
    assert torch.allclose(context[:, 1:].float().mean(0), torch.full((7,), 3 / 7), atol=0.04)
    assert torch.equal(context, sample_context(2000, 8, 0.5, torch.Generator().manual_seed(0)))
    assert not torch.equal(context, sample_context(2000, 8, 0.5, torch.Generator().manual_seed(1)))


# ----------------------------------------------------------------------------- the encoder and decoder

def test_latent_invariant_to_reordering_context_views_after_the_first():
    """No view index but view 0's marker enters backbone or encoder, so the latent is a function of the set."""
    psfm = tiny_psfm()
    images = torch.rand(2, 4, 3, 32, 32)
    latent = psfm.encode(images)
    assert latent.shape == (2, 16, 64)
    assert torch.allclose(psfm.encode(images[:, [0, 3, 1, 2]]), latent, atol=1e-5)
    assert not torch.allclose(psfm.encode(images[:, [1, 0, 2, 3]]), latent, atol=1e-3)  # view 0 is special


def test_encode_takes_no_poses_and_the_latent_ignores_them():
    assert list(inspect.signature(PSFM.encode).parameters) == ["self", "images"]
    psfm = tiny_psfm(pose_source="gt")
    batch = synthetic_batch()
    latents = []
    psfm.encoder.register_forward_hook(lambda module, args, out: latents.append(out))
    loss, _ = psfm(with_context(batch, 0))
    moved = dict(batch, pose=batch["pose"] @ torch.stack([rigid(s) for s in range(8)]).view(2, 4, 4, 4))
    moved_loss, _ = psfm(with_context(moved, 0))
    assert torch.equal(latents[0], latents[1])
    assert moved_loss != loss  # the query rays did use the changed poses


def test_decoder_views_are_decoded_independently():
    psfm = tiny_psfm()
    batch = synthetic_batch()
    latent = psfm.encode(batch["images"])
    K, pose = batch["K"], relative_to_view0(batch["pose"])
    field = psfm.decode(latent, K, pose, (32, 32))
    assert field.shape == (2, 4, 16, 64)
    pose2 = pose.clone()
    pose2[:, 2] = rigid(5)
    field2 = psfm.decode(latent, K, pose2, (32, 32))
    assert torch.allclose(field2[:, [0, 1, 3]], field[:, [0, 1, 3]], atol=1e-6)
    assert not torch.allclose(field2[:, 2], field[:, 2], atol=1e-3)


# ----------------------------------------------------------------------------- targets and losses

def test_semantic_field_matches_a_loop():
    torch.manual_seed(0)
    semantic = torch.randint(-1, 5, (2, 3, 8, 12))
    semantic[0, 1, :4, :4] = -1  # one patch with nothing labelled
    dist, valid = semantic_field(semantic, 4, 5)
    assert dist.shape == (2, 3, 6, 5)
    for b in range(2):
        for v in range(3):
            for n in range(6):
                r, c = divmod(n, 3)
                labels = semantic[b, v, 4 * r:4 * r + 4, 4 * c:4 * c + 4].flatten()
                labels = labels[labels >= 0]
                assert valid[b, v, n] == (len(labels) > 0)
                expected = torch.bincount(labels, minlength=5).float() / max(len(labels), 1)
                assert torch.allclose(dist[b, v, n], expected)
    assert not valid[0, 1, 0]
    with pytest.raises(RuntimeError, match=r"batch\['semantic'\] has a class id >= num_classes 4"):
        semantic_field(semantic, 4, 4)


def test_patch_log_depth_averages_valid_pixels():
    depth = torch.zeros(1, 1, 4, 4)
    depth[0, 0, :2, :2] = torch.tensor([[1.0, math.e], [0.0, math.e ** 2]])  # one invalid pixel
    log_depth, valid = patch_log_depth(depth, 2)
    assert log_depth[0, 0, 0].item() == pytest.approx(1.0)  # mean of 0, 1, 2
    assert valid[0, 0].tolist() == [True, False, False, False]


def test_feature_loss_hand_case():
    target = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]]]])  # (1, 1, 2, 2)
    l1, cos = feature_loss(target, target)
    assert l1.item() == 0 and cos.item() == pytest.approx(0, abs=1e-6)
    l1, cos = feature_loss(-target, target)
    # smooth-L1 (beta 1) of differences (2, 0) and (0, 6): (1.5 + 0) / 2 and (0 + 5.5) / 2, averaged
    assert l1.item() == pytest.approx((0.75 + 2.75) / 2)
    assert cos.item() == pytest.approx(2.0)
    l1, cos = feature_loss(-target, target, torch.tensor([[[True, False]]]))
    assert l1.item() == pytest.approx(0.75) and cos.item() == pytest.approx(2.0)


@pytest.mark.parametrize("camera_attention", ["plucker", "prope"])
@pytest.mark.parametrize("pose_source", ["pred", "gt"])
def test_losses_finite_on_random_input(camera_attention, pose_source):
    psfm = tiny_psfm(camera_attention=camera_attention, pose_source=pose_source)
    batch = synthetic_batch()
    batch["images"] = torch.rand_like(batch["images"])
    batch["semantic"] = torch.randint(-1, 27, batch["semantic"].shape)
    loss, terms = psfm(batch)
    assert set(terms) == {"geo/l1", "geo/cos", "sem/l1", "sem/cos", "depth_probe"}
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    loss.backward()
    assert all(p.grad is None for p in psfm.backbone.parameters())  # frozen
    trained = [p for p in psfm.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


@pytest.mark.filterwarnings("error:Mismatch dtype")  # an fp32 weight on bf16 input: the slow unfused norm
def test_bf16_autocast_prope_feeds_attention_one_dtype():
    psfm = tiny_psfm(camera_attention="prope")
    with watched_sdpa() as calls, torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = psfm(synthetic_batch())
    assert calls and all(dtypes == {torch.bfloat16} for _, _, dtypes in calls)
    assert torch.isfinite(loss)


def test_depth_probe_sends_no_gradient_into_the_decoder():
    psfm = tiny_psfm()
    terms = psfm.losses(with_context(synthetic_batch(), 0))
    terms["depth_probe"].backward(retain_graph=True)
    assert all(p.grad is None for p in [*psfm.decoder.parameters(), *psfm.encoder.parameters()])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in psfm.depth_probe.parameters())
    terms["geo/cos"].backward()  # while the field's own losses do reach it
    assert all(p.grad is not None for p in psfm.decoder.parameters())


def test_bad_config_and_batch_name_the_field():
    with pytest.raises(ValueError, match="camera_attention"):
        Spa3RConfig(camera_attention="raymap")
    with pytest.raises(ValueError, match="pose_source"):
        Spa3RConfig(pose_source="oracle")
    with pytest.raises(ValueError, match="mask_ratio"):
        Spa3RConfig(mask_ratio=1.0)
    batch = synthetic_batch()
    with pytest.raises(ValueError, match=r"batch\['semantic'\]"):
        tiny_psfm()(dict(batch, semantic=batch["semantic"][:, :2]))


# ----------------------------------------------------------------------------- cost, determinism, training

@pytest.mark.parametrize("camera_attention", ["plucker", "prope"])
def test_flops_per_sample_matches_counted_flops(camera_attention):
    psfm = tiny_psfm(camera_attention=camera_attention)
    geo = psfm.backbone.config
    batch = synthetic_batch()
    K, pose = batch["K"][:1], relative_to_view0(batch["pose"][:1])
    uv = patch_centres(32, 32, 8)
    rays, prope = plucker_rays(K, pose, uv), None
    if camera_attention == "prope":
        rays, prope = camera_rays(K, uv), psfm.decoder.prope(*prope_matrices(K, pose, 32, 32), (4, 4))
    tokens = torch.randn(1, num_context_views(4, psfm.config.mask_ratio), 16, geo.dim)

    def forward():
        field = psfm.decoder(psfm.encoder(tokens, (4, 4)), rays, prope)
        psfm.geo_head(field), psfm.sem_head(field), psfm.depth_probe(field)

    with torch.no_grad():
        assert count_flops(forward) == flops_per_sample(psfm.config, geo, 4)


@pytest.mark.parametrize("pose_source", ["pred", "gt"])
def test_backbone_flops_bill_what_the_context_pass_runs(pose_source):
    """The frozen backbone's FLOPs in context_pass, counted: with true cameras it runs without its heads."""
    import psfm as psfm_module
    model = tiny_psfm(pose_source=pose_source)
    batch = with_context(synthetic_batch(), 0)
    calls = []
    model.backbone.register_forward_hook(lambda *args: calls.append("forward"))  # the heads run only in forward
    with torch.no_grad():
        counted = count_flops(lambda: model.backbone.patch_tokens(batch["images"], batch["context"]) if pose_source == "gt"
                              else model.backbone(batch["images"], batch["context"]))
        calls.clear()
        model.context_pass(batch)
    assert calls == (["forward"] if pose_source == "pred" else [])
    assert counted == 2 * psfm_module.backbone_flops_per_sample(model.config, model.backbone.config, 4)  # 2 samples


def test_reference_preset_is_the_papers_size():
    c = Spa3RConfig.reference()
    assert (c.dim, c.num_queries, c.encoder_depth, c.decoder_depth, c.num_heads) == (768, 256, 6, 6, 12)


def test_same_seed_same_first_losses():
    batch = synthetic_batch()
    first = tiny_psfm(seed=7)(with_context(batch, 3))[1]
    again = tiny_psfm(seed=7)(with_context(batch, 3))[1]
    assert first == again


def psfm_overfit(camera_attention, steps=150):
    backbone, _ = trained_backbone()
    torch.manual_seed(0)
    psfm = PSFM(Spa3RConfig(camera_attention=camera_attention), backbone)
    batch = with_context(synthetic_batch(), 0)
    opt = torch.optim.AdamW([p for p in psfm.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(steps):
        loss, _ = psfm(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("camera_attention", ["plucker", "prope"])
def test_psfm_overfits_two_scenes(camera_attention):
    """150 AdamW steps (lr 2e-3) on the geo-trained backbone, a new random mask every step. Measured (seed 0):
    plucker 2.65 -> 0.34, prope 2.78 -> 0.086 (mean of the last 10 steps), so a halving is a safe bound."""
    losses = psfm_overfit(camera_attention)
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]


def test_context_pass_is_what_the_losses_use_and_gates_see_camera_use():
    """The gates' 'cameras of another sample' baseline ties exactly when the decoder cannot see its rays."""
    import train
    batch = synthetic_batch()
    batch = with_context({k: torch.cat([v] * 4) for k, v in batch.items()}, 0)  # 8 samples: one gate batch
    model = tiny_psfm(pose_source="gt").eval()
    context, targets, latent, K, pose = model.context_pass(batch)
    assert context[:, 0].all() and context.sum(1).eq(2).all() and torch.equal(K, batch["K"])
    assert torch.allclose(pose, relative_to_view0(batch["pose"]))
    rows = train.psfm_gates(model, [batch])
    assert [r["baseline_name"] for r in rows] == ["cameras of another sample", "mean token", "per-position mean depth"]
    assert rows[0]["diff"] != 0
    with torch.no_grad():
        model.decoder.ray_embed.fc1.weight.zero_()  # every ray token the same: cameras cannot matter
    rows = train.psfm_gates(model, [batch])
    assert rows[0]["diff"] == 0 and not rows[0]["pass"]


def test_the_latent_reads_exactly_the_context_views_in_order():
    """context_pass picks the context views' tokens by a sort (fixed shapes, no wait on the device): the very
    tokens a boolean selection gives; a mask with another number of context views is refused."""
    batch = with_context({k: torch.cat([v] * 3) for k, v in synthetic_batch(views=8).items()}, 1)  # 4 of 8 kept
    model = tiny_psfm().eval()
    context, targets, latent, _, _ = model.context_pass(batch)
    assert not context[:, 1:].equal(context[:1, 1:].expand_as(context[:, 1:]))  # the rows keep different views
    selected = targets[context].view(len(context), -1, *targets.shape[2:])  # (B, Vc, N, Dg)
    with torch.no_grad():
        assert torch.equal(latent, model.encoder(selected, model.grid(batch["images"])))
    wrong = batch["context"].clone()
    wrong[0] = True
    with pytest.raises(RuntimeError, match=r"batch\['context'\] must hold 4 views in every row"):
        model.context_pass({**batch, "context": wrong})


def test_the_encoder_reads_its_rope_tables_at_its_tokens_positions():
    torch.manual_seed(0)
    c = Spa3RConfig()
    encoder, tokens = Spa3REncoder(c, 32), torch.randn(2, 3, 15, 32)  # 3 context views of a 3 x 5 grid
    with torch.no_grad():
        tables = encoder(tokens, (3, 5))
        encoder.rope = FormulaRope(c.dim // c.num_heads, c.rope_base)
        assert torch.equal(encoder(tokens, (3, 5)), tables)
