"""model.py: the geometry backbone of nanoSpa3R (training stage `geo`).

The paper puts a frozen, pretrained VGGT under Spa3R: it turns a set of unposed views into patch tokens
and predicts every view's depth and camera. No such weights can be downloaded here, so nanoSpa3R trains
its own small one on the generator's ground truth, in the same role, then freezes it for psfm.py.

Reading order:
  2D RoPE, position embedding -> Attention (QK-norm, one scaled_dot_product_attention call) -> MLP -> Block (pre-norm)
  ViT          one image -> register + patch tokens (the per-view encoder; vlm.py can reuse it alone)
  GeoBackbone  ViT on every view, then alternating frame-wise / global blocks; depth, point-map and camera heads
  point_map    depth + camera -> each pixel's 3D point (the point head's target)
  geo_loss     the stage-`geo` objective
  block_flops, flops_per_sample   for MFU

GeoBackbone(config)(images) returns per view "tokens" (B, V, N, D), the "geo" feature field PSFM predicts,
"log_depth", "points" (in view 0's frame), "pose" (camera-to-view-0, view 0 exactly the identity), "log_focal"
and "K"; see its forward.

Conventions: pixel (u, v) covers [u, u + 1) x [v, v + 1), so its centre is (u + 0.5, v + 0.5) and a centred
camera has cx = W / 2. Everything runs in fp32 on CPU; on CUDA train.py wraps calls in bf16 autocast, and the
camera geometry below switches autocast off so poses and rays stay fp32.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GeoConfig:
    image_size: int = 32      # training resolution (square); any multiple of patch_size runs
    patch_size: int = 8
    dim: int = 64
    num_heads: int = 4        # head_dim = dim / num_heads must be a multiple of 8 (2D RoPE, PRoPE)
    vit_depth: int = 2        # per-image blocks (the DINO part of VGGT)
    cross_depth: int = 2      # (frame-wise, global) block pairs (VGGT's aggregator)
    num_registers: int = 2
    mlp_ratio: float = 4.0
    rope_base: float = 100.0

    def __post_init__(self):
        check_fields(self, "model.py", positive=("image_size", "patch_size", "dim", "num_heads", "vit_depth", "cross_depth"))
        if (self.dim // self.num_heads) % 8:
            raise ValueError(f"model.py: GeoConfig head_dim (dim / num_heads) must be a multiple of 8, got {self.dim // self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"model.py: GeoConfig.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @classmethod
    def tiny(cls):
        return cls()

    @classmethod
    def reference(cls):
        # 224 / 14 = a 16 x 16 grid (256 tokens a view), VGGT's and DINOv2's patch size; ViT-S width.
        return cls(image_size=224, patch_size=14, dim=384, num_heads=6, vit_depth=6, cross_depth=6,
                   num_registers=4)


def check_fields(config, where, positive=()):
    """Each field of a config dataclass holds its declared type (a config.json can hold "64" or true anywhere;
    an int is a float too, a bool is no int) and the sizes named in `positive` are at least 1."""
    name = type(config).__name__
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(f.type, type) and not (isinstance(value, f.type) or f.type is float and isinstance(value, int)) \
                or isinstance(value, bool) and f.type is not bool:
            raise ValueError(f"{where}: {name}.{f.name} must be {f.type.__name__}, got {value!r:.40}")
    for f in fields(config):  # no model size, rate or ratio is negative, NaN or infinite
        value = getattr(config, f.name)
        if f.type in (int, float) and not 0 <= value < math.inf:
            raise ValueError(f"{where}: {name}.{f.name} must be a finite number >= 0, got {value!r}")
    for size in positive:
        if getattr(config, size) < 1:
            raise ValueError(f"{where}: {name}.{size} must be at least 1, got {getattr(config, size)}")


# ----------------------------------------------------------------------------- 2D RoPE

ROPE_POSITIONS = 512  # rows and columns 0..511: Rope2D's tables, so grids up to 511 patches a side


def grid_positions(grid_h, grid_w, num_special, device=None):
    """(num_special + grid_h * grid_w, 2) (row, col): special tokens at (0, 0), patches from (1, 1) row-major."""
    if max(grid_h, grid_w) >= ROPE_POSITIONS:
        raise ValueError(f"model.py: a {grid_h} x {grid_w} patch grid; RoPE's tables (Rope2D) hold "
                         f"{ROPE_POSITIONS - 1} patches a side")
    rows = torch.arange(1, grid_h + 1, device=device).repeat_interleave(grid_w)
    cols = torch.arange(1, grid_w + 1, device=device).repeat(grid_h)
    patches = torch.stack([rows, cols], 1)
    return torch.cat([patches.new_zeros(num_special, 2), patches]).float()


def rope_cos_sin(positions, head_dim, base):
    """positions (T, 2) -> cos, sin (T, head_dim): first half of the channels turns with the row, second with the column."""
    freqs = base ** (-torch.arange(head_dim // 4, device=positions.device) / (head_dim // 4))
    angles = positions[:, :, None] * freqs  # (T, 2, head_dim / 4)
    angles = torch.cat([angles[:, 0], angles[:, 0], angles[:, 1], angles[:, 1]], -1)  # (T, head_dim)
    return angles.cos(), angles.sin()


class Rope2D(nn.Module):
    """rope_cos_sin of integer positions, read from per-axis tables made once (buffers, left out of checkpoints).
    Made inside a training step, torch.compile recomputes the tables' sines and cosines in each block's kernels
    instead of reading them (README: what that cost on an H100). On the CPU the same numbers, bit for bit."""

    def __init__(self, head_dim, base, max_position=ROPE_POSITIONS):
        super().__init__()
        axis = torch.arange(max_position).float()[:, None].expand(-1, 2)  # (P, 2): position p on both axes
        cos, sin = rope_cos_sin(axis, head_dim, base)  # (P, head_dim): quarters [row, row, col, col], row == col
        self.register_buffer("cos", cos[:, :head_dim // 4], persistent=False)  # (P, head_dim / 4): cos(p * freqs)
        self.register_buffer("sin", sin[:, :head_dim // 4], persistent=False)

    def forward(self, positions):
        """positions (T, 2) whole numbers (row, col) below max_position -> cos, sin (T, head_dim), as rope_cos_sin."""
        row, col = positions.long().unbind(1)
        return tuple(torch.cat([t[row], t[row], t[col], t[col]], -1) for t in (self.cos, self.sin))


def position_embedding(positions, dim, base):
    """positions (T, 2) -> (T, dim) fixed sin-cos features of (row, col), added to the patch embeddings as DINO adds
    its learned ones. RoPE moves attention scores, never a token's content: without this a token hardly knows
    where in the image it sits (only its scores against the registers differ), so the camera head can hardly read
    a view's turn from where its content moved."""
    freqs = base ** (-torch.arange(dim // 4, device=positions.device) / (dim // 4))
    angles = positions[:, :, None] * freqs  # (T, 2, dim / 4)
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(1)  # (T, dim)


def rms_norm(norm, x):
    """nn.RMSNorm `norm` in x's dtype: under bf16 autocast its fp32 weight would send a bf16 x down an unfused,
    fp32 path (several kernels and two casts per call, a fifth of a step's GPU time on CUDA)."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


def apply_rope(x, cos, sin):
    """Rotate channel pairs (i, i + head_dim / 4) of each half of x (..., T, head_dim) by the token's angles."""
    a, b, c, d = x.chunk(4, -1)
    return x * cos + torch.cat([-b, a, -d, c], -1) * sin


# ----------------------------------------------------------------------------- transformer pieces

class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads)  # QK-norm keeps logits bounded however the weights grow
        self.k_norm = nn.RMSNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None, attn_mask=None, prope=None):
        """x (B, T, D); rope = (cos, sin) (T, head_dim); attn_mask (B, 1, T, T) bool, True = may attend;
        prope: psfm.PRoPE, per-token camera transforms (it replaces rope when given)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, hd)
        dtype = v.dtype  # bf16 under autocast: norms and RoPE stay in it (elementwise work is much of a step)
        q, k = rms_norm(self.q_norm, q), rms_norm(self.k_norm, k)
        if prope is not None:  # camera matrices in fp32: bf16 would round a 5 m translation by 2 cm
            q, k, v = prope.q(q.float()), prope.kv(k.float()), prope.kv(v.float())
        elif rope is not None:
            cos, sin = (table.to(dtype) for table in rope)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # one dtype for all three, or CUDA's flash kernel refuses them
        o = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=attn_mask)  # (B, h, T, hd)
        if prope is not None:
            o = prope.o(o.float()).to(dtype)
        return self.proj(o.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden, out=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x, rope=None, attn_mask=None, prope=None):
        x = x + self.attn(self.norm1(x), rope, attn_mask, prope)
        return x + self.mlp(self.norm2(x))


def init_weights(module):
    """ViT-style init: truncated normal 0.02 for linear and patch weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def patchify(x, p):
    """(B, V, H, W) -> (B, V, N, p * p): each patch's pixels, patches row-major."""
    B, V, H, W = x.shape
    x = x.view(B, V, H // p, p, W // p, p).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(B, V, (H // p) * (W // p), p * p)


def unpatchify(x, p, H, W):
    """(B, V, N, p * p) -> (B, V, H, W), the inverse of patchify."""
    B, V = x.shape[:2]
    x = x.view(B, V, H // p, W // p, p, p).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(B, V, H, W)


# ----------------------------------------------------------------------------- the per-image ViT

class ViT(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.config = c
        self.patch_embed = nn.Conv2d(3, c.dim, c.patch_size, stride=c.patch_size)
        self.registers = nn.Parameter(torch.randn(c.num_registers, c.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.vit_depth))
        self.rope = Rope2D(c.dim // c.num_heads, c.rope_base)

    def forward(self, images):
        """images (B, 3, H, W) in [0, 1] -> tokens (B, R + N, D): registers, then patches row-major."""
        c = self.config
        pos = grid_positions(images.shape[-2] // c.patch_size, images.shape[-1] // c.patch_size,
                             c.num_registers, images.device)  # (R + N, 2): registers at (0, 0)
        x = self.patch_embed(images * 2 - 1).flatten(2).transpose(1, 2)  # (B, N, D)
        x = x + position_embedding(pos[c.num_registers:], c.dim, c.rope_base).to(x.dtype)
        x = torch.cat([self.registers.expand(len(x), -1, -1), x], 1)  # (B, R + N, D)
        rope = self.rope(pos)
        for block in self.blocks:
            x = block(x, rope)
        return x


# ----------------------------------------------------------------------------- camera geometry

def rotation_from_6d(r6):
    """(..., 6) two raw column vectors -> (..., 3, 3) rotation by Gram-Schmidt (Zhou et al. 2019): continuous, no singularity."""
    a, b = r6[..., :3], r6[..., 3:]
    x = F.normalize(a, dim=-1)
    y = F.normalize(b - (x * b).sum(-1, keepdim=True) * x, dim=-1)
    return torch.stack([x, y, torch.cross(x, y, dim=-1)], -1)


def invert_rigid(T):
    """Inverse of rigid (..., 4, 4) transforms: [R t] -> [R^T, -R^T t]."""
    R, t = T[..., :3, :3], T[..., :3, 3:]
    top = torch.cat([R.mT, -R.mT @ t], -1)
    return torch.cat([top, T[..., 3:, :]], -2)


def relative_to_view0(pose):
    """pose (B, V, 4, 4) camera-to-world -> camera-to-view-0 (view 0 becomes the identity), in fp32."""
    with torch.autocast(pose.device.type, enabled=False):
        pose = pose.float()
        return invert_rigid(pose[:, :1]) @ pose


def intrinsics_from_focal(log_focal, H, W):
    """(B, V, 2) log(fx / W), log(fy / H) -> (B, V, 3, 3) with the principal point at the image centre."""
    K = torch.zeros(*log_focal.shape[:-1], 3, 3, device=log_focal.device)
    K[..., 0, 0] = log_focal[..., 0].float().exp() * W
    K[..., 1, 1] = log_focal[..., 1].float().exp() * H
    K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = W / 2, H / 2, 1.0
    return K


# ----------------------------------------------------------------------------- the backbone

class GeoBackbone(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.config = c
        self.vit = ViT(c)
        # row 0 marks view 0, row 1 every other view: the reference view defines the scene frame (VGGT does the same)
        self.camera_token = nn.Parameter(torch.randn(2, c.dim) * 0.02)
        self.frame_blocks = nn.ModuleList(Block(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.cross_depth))
        self.global_blocks = nn.ModuleList(Block(c.dim, c.num_heads, c.mlp_ratio) for _ in range(c.cross_depth))
        self.norm = nn.LayerNorm(c.dim)
        self.depth_head = nn.Linear(c.dim, c.patch_size ** 2)  # log depth of each pixel of the patch
        # each pixel's 3D point in view 0's frame (VGGT's point map): a dense signal of how the views sit
        # relative to each other, which the one camera token per view alone gives too little of to learn
        self.point_head = nn.Linear(c.dim, 3 * c.patch_size ** 2)
        self.camera_head = MLP(c.dim, c.dim, 3 + 6 + 2)  # translation, 6D rotation, log focals
        self.apply(init_weights)
        with torch.no_grad():  # start at a plausible room depth (2 m) and at the identity camera
            self.depth_head.bias.fill_(math.log(2.0))
            self.camera_head.fc2.bias.copy_(torch.tensor([0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0.0]))

    def run_frame_block(self, i, x, rope):
        """Attention within each view only: x (B, V, S, D) is seen as B * V separate sequences."""
        B, V, S, D = x.shape
        return self.frame_blocks[i](x.reshape(B * V, S, D), rope).view(B, V, S, D)

    def run_global_block(self, i, x, rope, attn_mask=None):
        """Attention over every token of every view: x (B, V, S, D) is seen as B sequences of V * S tokens."""
        B, V, S, D = x.shape
        rope = tuple(r.repeat(V, 1) for r in rope)  # the same 2D positions in every view
        return self.global_blocks[i](x.reshape(B, V * S, D), rope, attn_mask).view(B, V, S, D)

    def aggregate(self, images, context=None):
        """images (B, V, 3, H, W) -> normalised tokens (B, V, 1 + R + N, D): camera token, registers, patches.

        context (B, V) bool, optional: the views PSFM keeps. Context views' tokens then never attend to the
        others, so they equal a run on the context views alone, while the masked views still see everything
        (the paper's asymmetric masking: encoder input and targets from one pass)."""
        c = self.config
        check_images(images, c.patch_size)
        B, V, _, H, W = images.shape
        x = self.vit(images.flatten(0, 1)).view(B, V, -1, c.dim)  # (B, V, R + N, D)
        cam = torch.cat([self.camera_token[:1], self.camera_token[1:].expand(V - 1, -1)])  # (V, D)
        x = torch.cat([cam.expand(B, -1, -1)[:, :, None], x], 2)  # (B, V, S, D), S = 1 + R + N
        S = x.shape[2]
        pos = grid_positions(H // c.patch_size, W // c.patch_size, 1 + c.num_registers, x.device)
        rope = self.vit.rope(pos)  # the ViT's tables: same head size and base
        attn_mask = None
        if context is not None:
            allowed = ~context[:, :, None] | context[:, None, :]  # (B, V_query, V_key)
            attn_mask = allowed.repeat_interleave(S, 1).repeat_interleave(S, 2)[:, None]  # (B, 1, V*S, V*S)
        for i in range(c.cross_depth):
            x = self.run_frame_block(i, x, rope)
            x = self.run_global_block(i, x, rope, attn_mask)
        return self.norm(x)

    def patch_tokens(self, images, context=None):
        """Only the last-layer patch tokens (B, V, N, D), no heads: all that PSFM's encoder and targets read."""
        return self.aggregate(images, context)[:, :, 1 + self.config.num_registers:]

    def forward(self, images, context=None):
        """images (B, V, 3, H, W) in [0, 1], view 0 the reference -> {"tokens" (B, V, N, D) last-layer patch
        tokens, "log_depth" (B, V, H, W) metric, "points" (B, V, 3, H, W) each pixel's point in view 0's frame
        (metres), "pose" (B, V, 4, 4) camera-to-view-0 (OpenCV axes, metres), "log_focal" (B, V, 2) log(fx / W),
        log(fy / H), "K" (B, V, 3, 3) the intrinsics they give}."""
        c = self.config
        x = self.aggregate(images, context)  # checks images first
        B, V, _, H, W = images.shape
        tokens = x[:, :, 1 + c.num_registers:]  # (B, V, N, D)
        log_depth = unpatchify(self.depth_head(tokens), c.patch_size, H, W)  # (B, V, H, W)
        xyz = self.point_head(tokens).float().unflatten(-1, (c.patch_size ** 2, 3)).movedim(-1, 2)  # (B, V, 3, N, p*p)
        points = unpatchify(xyz.flatten(1, 2), c.patch_size, H, W).unflatten(1, (V, 3))  # (B, V, 3, H, W)
        cam = self.camera_head(x[:, :, 0]).float()  # (B, V, 11)
        pose = torch.eye(4, device=x.device).repeat(B, V, 1, 1)
        pose[..., :3, :3] = rotation_from_6d(cam[..., 3:9])
        pose[..., :3, 3] = cam[..., :3]
        pose[:, 0] = torch.eye(4, device=x.device)  # view 0 is the scene frame by definition
        log_focal = cam[..., 9:]
        return {"tokens": tokens, "log_depth": log_depth, "depth": log_depth.exp(), "pose": pose, "points": points,
                "log_focal": log_focal, "K": intrinsics_from_focal(log_focal, H, W)}


# ----------------------------------------------------------------------------- inputs and the stage-`geo` loss

def check_images(images, patch_size):
    if not images.is_floating_point():
        raise ValueError(f"model.py: images must be floats in [0, 1], got {images.dtype} (data.to_device widens "
                         f"the uint8 images of data.collate_views)")
    if images.dim() != 5 or images.shape[2] != 3 or images.shape[-1] % patch_size or images.shape[-2] % patch_size:
        raise ValueError(f"model.py: images must be (B, V, 3, H, W) with H, W multiples of {patch_size}, "
                         f"got {tuple(images.shape)}")


def check_batch(batch, keys):
    """A one-line ValueError naming the field whose shape disagrees with images (B, V, 3, H, W)."""
    B, V, _, H, W = batch["images"].shape
    expected = {"depth": (B, V, H, W), "semantic": (B, V, H, W), "K": (B, V, 3, 3), "pose": (B, V, 4, 4)}
    for key in keys:
        if key not in batch:
            raise ValueError(f"batch is missing field '{key}'")
        if tuple(batch[key].shape) != expected[key]:
            raise ValueError(f"batch['{key}'] must be {expected[key]}, got {tuple(batch[key].shape)}")


def masked_mean(x, valid):
    """Mean of x over the entries where valid is True (0 when there are none)."""
    return (x * valid).sum() / valid.sum().clamp_min(1)


def point_map(depth, K, pose):
    """Each pixel's 3D point in the frame that pose (B, V, 4, 4) maps the camera to: z-depth (B, V, H, W) and
    intrinsics K (B, V, 3, 3) -> (B, V, 3, H, W). The ray through pixel centre (u + 0.5, v + 0.5) has z = 1."""
    B, V, H, W = depth.shape
    v, u = torch.meshgrid(torch.arange(H, device=depth.device), torch.arange(W, device=depth.device), indexing="ij")
    pixels = torch.stack([u + 0.5, v + 0.5, torch.ones(H, W, device=depth.device)]).flatten(1)  # (3, H * W)
    with torch.autocast(depth.device.type, enabled=False):  # targets in fp32: bf16 is centimetres off at 5 m
        camera = torch.linalg.inv(K.float()) @ pixels * depth.float().flatten(2)[:, :, None]  # (B, V, 3, H * W)
        return (pose[..., :3, :3].float() @ camera + pose[..., :3, 3:].float()).view(B, V, 3, H, W)


def geo_loss(pred, batch):
    """Stage-`geo` objective, each term an L1:
    depth in log space over valid pixels (depth > 0); camera translation (metres) and rotation entries,
    relative to view 0; log focal / image size; the point map: each valid pixel's 3D point in view 0's frame
    (metres, the L1 distance, x + y + z). Returns (total, {name: detached value})."""
    check_batch(batch, ["depth", "K", "pose"])
    depth, K = batch["depth"], batch["K"]
    H, W = depth.shape[-2:]
    err = (pred["log_depth"].float() - depth.clamp_min(1e-6).log()).abs()
    terms = {"depth": masked_mean(err, depth > 0)}
    target = relative_to_view0(batch["pose"])
    terms["translation"] = (pred["pose"][..., :3, 3] - target[..., :3, 3]).abs().mean()
    terms["rotation"] = (pred["pose"][..., :3, :3] - target[..., :3, :3]).abs().mean()
    focal = torch.stack([K[..., 0, 0] / W, K[..., 1, 1] / H], -1).log()
    terms["focal"] = (pred["log_focal"] - focal).abs().mean()
    points = point_map(depth, K, target)  # (B, V, 3, H, W): every pixel in view 0's frame
    terms["points"] = masked_mean((pred["points"] - points).abs().sum(2), depth > 0)  # L1 distance per pixel
    total = sum(terms.values())
    return total, {k: v.detach() for k, v in terms.items()}


# ----------------------------------------------------------------------------- size and cost

def block_flops(dim, mlp_ratio, tokens, keys):
    """Forward FLOPs of one Block on `tokens` queries attending to `keys` keys: 2 per multiply-add of the
    qkv, out and MLP weights, plus QK^T and AV (2 * tokens * keys * dim each). Norms and softmax left out."""
    hidden = int(dim * mlp_ratio)
    return 2 * tokens * (4 * dim * dim + 2 * dim * hidden) + 4 * tokens * keys * dim


def flops_per_sample(config, num_views, heads=True):
    """Forward FLOPs for one sample of num_views views at config.image_size (a training step costs ~3x:
    the backward pass is twice the forward). Counts matmuls and attention, as in the usual 6 * N * T estimate.
    heads=False: GeoBackbone.patch_tokens, the tokens without the depth, point and camera heads."""
    c = config
    n = (c.image_size // c.patch_size) ** 2
    vit_tokens, view_tokens = c.num_registers + n, 1 + c.num_registers + n
    flops = num_views * n * 2 * (3 * c.patch_size ** 2) * c.dim  # patch embedding
    flops += num_views * c.vit_depth * block_flops(c.dim, c.mlp_ratio, vit_tokens, vit_tokens)
    flops += num_views * c.cross_depth * block_flops(c.dim, c.mlp_ratio, view_tokens, view_tokens)
    all_tokens = num_views * view_tokens
    flops += c.cross_depth * block_flops(c.dim, c.mlp_ratio, all_tokens, all_tokens)
    if not heads:
        return flops
    flops += num_views * n * 2 * c.dim * 4 * c.patch_size ** 2  # depth and point heads (1 + 3 values a pixel)
    flops += num_views * 2 * (c.dim * c.dim + c.dim * 11)  # camera head
    return flops
