"""psfm.py: Spa3R and Predictive Spatial Field Modeling (training stage `psfm`).

The claim of the paper: a latent trained to predict the feature fields of views it never saw holds the 3D
scene. Per sample, some views are masked (view 0 always kept); the frozen geometry backbone (model.py) turns
the kept "context" views into patch tokens; the Spa3R encoder squeezes them, with learned queries, into a
latent (B, L, D); the field decoder then answers, for every view, masked or not, "what are the features
along these camera rays?" from the latent alone, and is scored against the backbone's own tokens of that
view ("geo") and against the view's semantic field ("sem"). A depth probe on the detached decoder output
shows how much geometry the latent holds without shaping it.

Reading order: Spa3RConfig, view masking, camera rays (Plücker) and PRoPE, Spa3REncoder, FieldDecoder,
targets and losses, PSFM, flops_per_sample.

vlm.py calls PSFM.encode(images), the single entry point: unposed views in, latent (B, L, D) out.
batch is the PSFM batch of data.py, widened by data.to_device: images (B, V, 3, H, W) in [0, 1], depth
(B, V, H, W) metres (0 = invalid), K (B, V, 3, 3), pose (B, V, 4, 4) camera-to-world OpenCV, semantic
(B, V, H, W) int64 (-1 = ignore), and context (B, V) bool, the views Spa3R sees (drawn with each sample;
random when absent).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (MLP, Block, Rope2D, apply_rope, block_flops, check_batch, check_fields, grid_positions, init_weights,
                   invert_rigid, masked_mean, patchify, relative_to_view0, rope_cos_sin)
from model import flops_per_sample as geo_flops_per_sample


@dataclass
class Spa3RConfig:
    dim: int = 64
    num_queries: int = 16             # L: the latent is (B, L, dim)
    num_registers: int = 2
    encoder_depth: int = 2
    decoder_depth: int = 2
    num_heads: int = 4                # head_dim must be a multiple of 8 (2D RoPE, and PRoPE splits it in halves)
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.5           # share of the views masked per sample; view 0 never is
    num_classes: int = 27             # "sem" target: floor, ceiling, wall + 24 object categories
    camera_attention: str = "plucker"  # "plucker": rays as Plücker tokens; "prope": camera-aware attention (ablation)
    pose_source: str = "pred"         # cameras of the query rays: "pred" by the backbone, "gt" from the batch
    rope_base: float = 100.0

    def __post_init__(self):
        check_fields(self, "psfm.py", positive=("dim", "num_queries", "encoder_depth", "decoder_depth", "num_heads", "num_classes"))
        if self.camera_attention not in ("plucker", "prope"):
            raise ValueError(f"psfm.py: Spa3RConfig.camera_attention must be 'plucker' or 'prope', got {self.camera_attention!r}")
        if self.pose_source not in ("pred", "gt"):
            raise ValueError(f"psfm.py: Spa3RConfig.pose_source must be 'pred' or 'gt', got {self.pose_source!r}")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"psfm.py: Spa3RConfig.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if (self.dim // self.num_heads) % 8:
            raise ValueError(f"psfm.py: Spa3RConfig head_dim (dim / num_heads) must be a multiple of 8, got {self.dim // self.num_heads}")

    @classmethod
    def tiny(cls):
        return cls()

    @classmethod
    def reference(cls):
        return cls(dim=768, num_queries=256, num_registers=4, encoder_depth=6, decoder_depth=6, num_heads=12)


# ----------------------------------------------------------------------------- view masking

def num_context_views(num_views, mask_ratio):
    """Views kept per sample: the same for the whole batch, so context tokens stack into one tensor."""
    return max(1, int(num_views * (1 - mask_ratio) + 1e-6))


def sample_context(batch_size, num_views, mask_ratio, generator=None):
    """(B, V) bool, True = context view: view 0 always, plus a random num_context_views - 1 of the others per sample."""
    keep = num_context_views(num_views, mask_ratio)
    others = torch.rand(batch_size, num_views - 1, generator=generator).argsort(1) + 1  # (B, V - 1) shuffled ids
    context = torch.zeros(batch_size, num_views, dtype=torch.bool)
    context[:, 0] = True
    context.scatter_(1, others[:, :keep - 1], True)
    return context


# ----------------------------------------------------------------------------- camera rays

def patch_centres(H, W, patch_size, device=None):
    """(N, 2) pixel coordinates (u, v) of the patch centres, row-major; pixel u spans [u, u + 1)."""
    v, u = torch.meshgrid(torch.arange(H // patch_size, device=device), torch.arange(W // patch_size, device=device),
                          indexing="ij")
    return (torch.stack([u, v], -1).reshape(-1, 2).float() + 0.5) * patch_size


def camera_rays(K, uv):
    """K (B, V, 3, 3), uv (N, 2) -> unit ray directions in the camera frame (B, V, N, 3): K^-1 (u, v, 1), normalised."""
    f = torch.stack([K[..., 0, 0], K[..., 1, 1]], -1)[:, :, None]  # (B, V, 1, 2)
    c = torch.stack([K[..., 0, 2], K[..., 1, 2]], -1)[:, :, None]
    xy = (uv - c) / f  # (B, V, N, 2)
    return F.normalize(torch.cat([xy, torch.ones_like(xy[..., :1])], -1), dim=-1)


def plucker_rays(K, pose, uv):
    """Plücker coordinates (direction d, moment o x d) of each pixel's ray in the frame of pose (camera-to-frame):
    (B, V, N, 6). A point X lies on the ray exactly when X x d = o x d."""
    d = camera_rays(K, uv) @ pose[..., :3, :3].mT  # (B, V, N, 3): R d_cam, as rows
    o = pose[:, :, None, :3, 3].expand_as(d)  # camera centre (B, V, N, 3)
    return torch.cat([d, torch.cross(o, d, dim=-1)], -1)


# ----------------------------------------------------------------------------- PRoPE

def prope_matrices(K, pose, H, W):
    """Each camera's projection P = [K_n 0; 0 1] @ world-to-camera (image <- world, 4x4) and its inverse,
    with K normalised by the image size as in the PRoPE paper: (B, V, 4, 4) each."""
    Kn = torch.zeros(*K.shape[:-2], 4, 4, device=K.device)
    Kn[..., 0, 0], Kn[..., 1, 1] = K[..., 0, 0] / W, K[..., 1, 1] / H
    Kn[..., 0, 2], Kn[..., 1, 2] = K[..., 0, 2] / W - 0.5, K[..., 1, 2] / H - 0.5
    Kn[..., 2, 2] = Kn[..., 3, 3] = 1.0
    return Kn @ invert_rigid(pose), pose @ torch.linalg.inv(Kn)


def per_token_matmul(x, M):
    """x (B, h, T, C) with C = 4k, M (B, T, 4, 4): multiply every 4-channel chunk of token t by M[:, t]."""
    B, h, T, C = x.shape
    x = x.view(B, h, T, C // 4, 4)
    return torch.einsum("btij,bhtkj->bhtki", M.to(x.dtype), x).reshape(B, h, T, C)


class PRoPE:
    """Projective positional encoding (Li et al. 2025, "Cameras as Relative Positional Encoding").

    Token t carries its camera's projection P_t and its patch position. In the first half of each head's
    channels q_t -> P_t^T q_t, k_t -> P_t^-1 k_t, v_t -> P_t^-1 v_t and the output o_t -> P_t o_t, so scores
    q_s^T (P_s P_t^-1) k_t and outputs depend on cameras only through the relative projective transforms
    P_s P_t^-1: moving every camera by one rigid motion changes nothing. The second half gets 2D RoPE on
    q, k, v with the inverse rotation on the output. A token with P = I at position (0, 0) is left as it is
    (the latent and the registers). Attention calls q / kv / o around its one SDPA call."""

    def __init__(self, P, P_inv, positions, head_dim, base):
        """P, P_inv (B, T, 4, 4) per token; positions (T, 2)."""
        self.P, self.P_inv = P, P_inv
        self.cos, self.sin = rope_cos_sin(positions, head_dim // 2, base)

    def _apply(self, x, M, sign):
        half = x.shape[-1] // 2
        return torch.cat([per_token_matmul(x[..., :half], M), apply_rope(x[..., half:], self.cos, sign * self.sin)], -1)

    def q(self, x):
        return self._apply(x, self.P.mT, 1)

    def kv(self, x):
        return self._apply(x, self.P_inv, 1)

    def o(self, x):
        return self._apply(x, self.P, -1)


# ----------------------------------------------------------------------------- encoder and decoder

class Spa3REncoder(nn.Module):
    def __init__(self, config, geo_dim):
        super().__init__()
        c = config
        self.config = c
        self.proj = nn.Linear(geo_dim, c.dim)
        # marks view 0's tokens: the latent lives in its frame; no other view index, so the latent does not
        # depend on the order of the other context views
        self.reference_view = nn.Parameter(torch.randn(c.dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(c.num_queries, c.dim) * 0.02)
        self.registers = nn.Parameter(torch.randn(c.num_registers, c.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.encoder_depth))
        self.rope = Rope2D(c.dim // c.num_heads, c.rope_base)
        self.norm = nn.LayerNorm(c.dim)

    def forward(self, tokens, grid_hw):
        """tokens (B, Vc, N, Dg): backbone patch tokens of the context views, view 0 first -> latent (B, L, D)."""
        c = self.config
        B, Vc, N, _ = tokens.shape
        x = self.proj(tokens)  # (B, Vc, N, D)
        x = torch.cat([x[:, :1] + self.reference_view, x[:, 1:]], 1).flatten(1, 2)  # (B, Vc * N, D)
        free = torch.cat([self.queries, self.registers]).expand(B, -1, -1)  # (B, L + R, D)
        x = torch.cat([free, x], 1)  # (B, L + R + Vc * N, D)
        patch_pos = grid_positions(*grid_hw, 0, x.device)  # (N, 2), from (1, 1); queries and registers at (0, 0)
        pos = torch.cat([patch_pos.new_zeros(len(free[0]), 2), patch_pos.repeat(Vc, 1)])
        rope = self.rope(pos)
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x[:, :c.num_queries])


class FieldDecoder(nn.Module):
    """Each view is decoded on its own, from the latent and that view's per-patch ray tokens, so nothing
    about the view reaches its prediction except through the latent and the camera."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.config = c
        self.ray_embed = MLP(6 if c.camera_attention == "plucker" else 3, c.dim, c.dim)
        self.registers = nn.Parameter(torch.randn(c.num_registers, c.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.decoder_depth))
        self.norm = nn.LayerNorm(c.dim)

    def forward(self, latent, rays, prope=None):
        """latent (B, L, D), rays (B, V, N, 6 or 3), prope: PRoPE over (B * V) sequences -> field (B, V, N, D)."""
        B, V, N, _ = rays.shape
        queries = self.ray_embed(rays).flatten(0, 1)  # (B * V, N, D)
        free = torch.cat([latent, self.registers.expand(B, -1, -1)], 1).repeat_interleave(V, 0)  # (B * V, L + R, D)
        x = torch.cat([free, queries], 1)  # (B * V, L + R + N, D)
        for block in self.blocks:
            x = block(x, prope=prope)
        return self.norm(x[:, free.shape[1]:]).view(B, V, N, -1)

    def prope(self, P, P_inv, grid_hw):
        """Per-view P, P_inv (B, V, 4, 4) -> the PRoPE of the (B * V) decoder sequences."""
        c = self.config
        num_free = c.num_queries + c.num_registers
        N = grid_hw[0] * grid_hw[1]

        def per_token(M):  # latent and registers get the identity, ray tokens their view's matrix
            M = M.flatten(0, 1)[:, None]  # (B * V, 1, 4, 4)
            eye = torch.eye(4, device=M.device).expand(len(M), num_free, 4, 4)
            return torch.cat([eye, M.expand(-1, N, -1, -1)], 1)  # (B * V, L + R + N, 4, 4)

        positions = grid_positions(*grid_hw, num_free, P.device)
        return PRoPE(per_token(P), per_token(P_inv), positions, c.dim // c.num_heads, c.rope_base)


# ----------------------------------------------------------------------------- targets and losses

def semantic_field(semantic, patch_size, num_classes):
    """semantic (B, V, H, W) class ids (-1 = ignore) -> each patch's class distribution (B, V, N, C) and
    (B, V, N) bool, False where the patch has no labelled pixel. Counted with one scatter-add, not a one-hot.
    Nothing here waits on the device (the class-id check is asynchronous), so the step compiles as one graph."""
    torch._assert_async(semantic.max() < num_classes, f"batch['semantic'] has a class id >= num_classes {num_classes}")
    labels = patchify(semantic, patch_size)  # (B, V, N, p * p)
    labelled = labels >= 0
    counts = labels.new_zeros(*labels.shape[:3], num_classes, dtype=torch.float32)
    counts.scatter_add_(-1, labels.clamp_min(0).long(), labelled.float())  # (B, V, N, C); -1 pixels add 0
    total = counts.sum(-1, keepdim=True)
    return counts / total.clamp_min(1), total.squeeze(-1) > 0


def patch_log_depth(depth, patch_size):
    """depth (B, V, H, W) metres (0 = invalid) -> mean log depth of each patch's valid pixels (B, V, N), and validity."""
    depth = patchify(depth, patch_size)  # (B, V, N, p * p)
    valid = depth > 0
    log_depth = (depth.clamp_min(1e-6).log() * valid).sum(-1) / valid.sum(-1).clamp_min(1)
    return log_depth, valid.any(-1)


def feature_loss(pred, target, valid=None):
    """The paper's per-target loss, each returned: smooth-L1 on the raw features, 1 - cosine (the L2-normalised
    features' dot product); averaged over the patches where valid (B, V, N) holds, or all. pred, target (B, V, N, C)."""
    pred, target = pred.float(), target.float()
    l1 = F.smooth_l1_loss(pred, target, reduction="none").mean(-1)  # (B, V, N)
    cos = 1 - F.cosine_similarity(pred, target, dim=-1)
    if valid is None:
        return l1.mean(), cos.mean()
    return masked_mean(l1, valid), masked_mean(cos, valid)


# ----------------------------------------------------------------------------- the PSFM model

class PSFM(nn.Module):
    def __init__(self, config, backbone):
        super().__init__()
        c, g = config, backbone.config
        self.config = c
        self.backbone = backbone.requires_grad_(False)  # frozen, the role VGGT plays in the paper
        self.encoder = Spa3REncoder(c, g.dim)
        self.decoder = FieldDecoder(c)
        self.geo_head = MLP(c.dim, 4 * c.dim, g.dim)
        self.sem_head = MLP(c.dim, 4 * c.dim, c.num_classes)
        self.depth_probe = MLP(c.dim, 4 * c.dim, 1)
        for module in (self.encoder, self.decoder, self.geo_head, self.sem_head, self.depth_probe):
            module.apply(init_weights)

    def grid(self, images):
        p = self.backbone.config.patch_size
        return images.shape[-2] // p, images.shape[-1] // p

    def encode(self, images):
        """images (B, V, 3, H, W) in [0, 1], no poses, every view context -> latent (B, L, D)."""
        with torch.no_grad():
            tokens = self.backbone.patch_tokens(images)  # (B, V, N, Dg)
        return self.encoder(tokens, self.grid(images))

    def decode(self, latent, K, pose, image_hw):
        """The field along every patch ray of cameras K (B, V, 3, 3), pose (B, V, 4, 4) camera-to-view-0 -> (B, V, N, D)."""
        H, W = image_hw
        p = self.backbone.config.patch_size
        with torch.autocast(latent.device.type, enabled=False):  # camera geometry in fp32
            K, pose = K.float(), pose.float()
            uv = patch_centres(H, W, p, latent.device)
            if self.config.camera_attention == "plucker":
                rays, prope = plucker_rays(K, pose, uv), None
            else:  # the paper's decoder: camera-frame ray directions as tokens, the pose enters through PRoPE
                rays, prope = camera_rays(K, uv), self.decoder.prope(*prope_matrices(K, pose, H, W), (H // p, W // p))
        return self.decoder(latent, rays, prope)

    def context_pass(self, batch):
        """The frozen backbone over all views (context views see only context views), the latent of the context
        views, and the query cameras of every view -> (context (B, V) bool, targets (B, V, N, Dg), latent, K, pose).
        The context views are the batch's own (data.SceneViewsDataset draws them with each sample), else random."""
        c = self.config
        images = batch["images"]
        B, V = images.shape[:2]
        context = batch["context"] if "context" in batch else sample_context(B, V, c.mask_ratio).to(images.device)
        keep = num_context_views(V, c.mask_ratio)
        torch._assert_async((context.sum(1) == keep).all(), f"batch['context'] must hold {keep} views in every row")
        with torch.no_grad():  # one pass: context views see only context views, masked views see all
            if c.pose_source == "gt":  # the cameras come from the batch: the backbone's heads are not needed
                targets, K, pose = self.backbone.patch_tokens(images, context), batch["K"], relative_to_view0(batch["pose"])
            else:
                geo = self.backbone(images, context)
                targets, K, pose = geo["tokens"], geo["K"], geo["pose"]  # targets (B, V, N, Dg)
        # the context views' indices in order, by a stable sort: a fixed shape, so nothing waits on the device
        kept = torch.sort((~context).byte(), dim=1, stable=True).indices[:, :keep]  # (B, Vc)
        context_tokens = targets[torch.arange(B, device=kept.device)[:, None], kept]  # (B, Vc, N, Dg)
        latent = self.encoder(context_tokens, self.grid(images))  # (B, L, D)
        return context, targets, latent, K, pose

    def losses(self, batch):
        """{term: scalar}: geo/l1, geo/cos, sem/l1, sem/cos, depth_probe."""
        c = self.config
        check_batch(batch, ["depth", "K", "pose", "semantic"])
        H, W = batch["images"].shape[-2:]
        p = self.backbone.config.patch_size
        context, targets, latent, K, pose = self.context_pass(batch)
        field = self.decode(latent, K, pose, (H, W))  # (B, V, N, D)
        sem, sem_valid = semantic_field(batch["semantic"], p, c.num_classes)
        log_depth, depth_valid = patch_log_depth(batch["depth"], p)
        terms = {}
        terms["geo/l1"], terms["geo/cos"] = feature_loss(self.geo_head(field), targets)
        terms["sem/l1"], terms["sem/cos"] = feature_loss(self.sem_head(field), sem, sem_valid)
        probe = self.depth_probe(field.detach()).squeeze(-1).float()  # detached: the probe only reads the field
        terms["depth_probe"] = masked_mean(F.smooth_l1_loss(probe, log_depth, reduction="none"), depth_valid)
        return terms

    def forward(self, batch):
        terms = self.losses(batch)
        return sum(terms.values()), {k: v.detach() for k, v in terms.items()}


def backbone_flops_per_sample(config, geo_config, num_views):
    """Forward FLOPs of the frozen backbone in PSFM.context_pass: its heads run only when the query cameras are
    its own predictions (pose_source "pred"); with true cameras it gives tokens alone."""
    return geo_flops_per_sample(geo_config, num_views, heads=config.pose_source == "pred")


def flops_per_sample(config, geo_config, num_views):
    """Forward FLOPs of the trained part (encoder, decoder, heads) for one sample at geo_config.image_size,
    counted as model.flops_per_sample counts them. A training step costs about
    backbone_flops_per_sample(...) (the frozen backbone, forward only) + 3 x this."""
    c, g = config, geo_config
    n = (g.image_size // g.patch_size) ** 2
    context = num_context_views(num_views, c.mask_ratio)
    free = c.num_queries + c.num_registers
    flops = 2 * context * n * g.dim * c.dim  # projection of the context tokens
    flops += c.encoder_depth * block_flops(c.dim, c.mlp_ratio, free + context * n, free + context * n)
    ray_dim = 6 if c.camera_attention == "plucker" else 3
    per_view = 2 * n * (ray_dim * c.dim + c.dim * c.dim)  # ray embedding
    per_view += c.decoder_depth * block_flops(c.dim, c.mlp_ratio, free + n, free + n)
    if c.camera_attention == "prope":  # 4x4 per-token matmuls on half the channels of q, k, v and the output
        per_view += c.decoder_depth * 4 * 2 * 4 * (free + n) * (c.dim // 2)
    head_flops = 2 * c.dim * 4 * c.dim * 3 + 2 * 4 * c.dim * (g.dim + c.num_classes + 1)  # geo, sem, depth probe
    return flops + num_views * (per_view + n * head_flops)
