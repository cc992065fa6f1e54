"""vlm.py: Spa3-VLM, the small vision-language model that answers spatial questions (training stage `vlm`).

How it connects: data.py gives question records with their images, and the tokenizer; model.py's per-image ViT
turns each image into patch tokens, pixel-shuffled and projected to the LM width ("visual tokens"); psfm.py's
Spa3R encoder (PSFM.encode) turns all of a record's images into the spatial latent; the adapter lets every
visual token read that latent (the paper's spatial branch; `spa3r="none"` removes it for the ablation); the
visual tokens replace the `<image>` slots of a fixed chat prompt, and a Llama-style decoder writes the answer.
train.py optimises SpaVLM.forward(batch); eval.py calls load_for_eval(ckpt_dir).answer(records, images).

Reading order: the LM (RoPE, KV cache, grouped-query attention, SwiGLU, greedy generate); visual tokens; the
Spa3R adapter as the paper builds it; the chat template and batches; VLMConfig and SpaVLM; checkpoints; FLOPs.

Batching records with 1..32 images: the ViT sees every image of the batch in one call (images are
independent there); PSFM.encode runs once per group of records with the same image count (its global
attention needs equal view counts); the adapter gathers each image's record latent by index. No padding
of images anywhere, so nothing has to be masked out of the visual path.
"""
import math
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import (ORACLE_CAMERAS, ORACLE_DIM, ORACLE_OBJECTS, SPECIAL_TOKENS, best_device, load_checkpoint, to_device,
                  load_tokenizer, load_weights, prompt, read_json, read_weights)
from model import MLP, GeoBackbone, GeoConfig, ViT, block_flops, check_fields, init_weights
from model import flops_per_sample as geo_flops_per_sample
from psfm import PSFM, Spa3RConfig

IGNORE = -100  # target of positions the loss skips (F.cross_entropy's default ignore_index)


# ----------------------------------------------------------------------------- the decoder LM

@dataclass
class LMConfig:
    vocab_size: int = 2048    # at least the tokenizer's size (data.train_tokenizer's default is 2048)
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2       # grouped-query attention: each key/value head serves n_heads / n_kv_heads query heads
    hidden_dim: int = 176     # SwiGLU width, ~8/3 * dim
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the output head is the token embedding (False only for loaded checkpoints)

    def __post_init__(self):
        check_fields(self, "vlm.py", positive=("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"))
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"vlm.py: LMConfig.dim {self.dim} must split into n_heads {self.n_heads} heads of even width")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"vlm.py: LMConfig.n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @classmethod
    def tiny(cls):
        return cls()

    @classmethod
    def reference(cls):
        # SmolLM-135M's shape: ~106M parameters in the blocks + 1.2M in the 2048-token embedding (tied);
        # max_seq_len fits 32 frames x 64 visual tokens plus the text
        return cls(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, max_seq_len=4096)


def rotary(positions, head_dim, theta):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim). Llama's layout: channels j and j + head_dim / 2 turn
    together, at frequency theta^(-2j / head_dim). In fp32; apply_rotary casts it to the activations' dtype."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions[..., None].float() * freqs  # (B, T, head_dim / 2)
    angles = torch.cat([angles, angles], -1)[:, None]  # (B, 1, T, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """In x's dtype (bf16 under autocast): fp32 tables would promote x, and a cast back would cost two more passes."""
    a, b = x.chunk(2, -1)
    return x * cos.to(x.dtype) + torch.cat([-b, a], -1) * sin.to(x.dtype)


def padded_causal_mask(valid, start):
    """valid (B, S) bool over all key slots -> (B, 1, S - start, S) bool, True = may attend, for queries at slots
    start..S-1: earlier or same slot, and not padding. A padding query still sees itself, so no softmax row is
    empty (that would give NaN); what padding queries compute is never read."""
    S = valid.shape[1]
    q = torch.arange(start, S, device=valid.device)[:, None]
    k = torch.arange(S, device=valid.device)[None]
    return (((k <= q) & valid[:, None]) | (k == q))[:, None]


class KVCache:
    """Every layer's keys and values, (B, n_kv_heads, max_len, head_dim), filled left to right; also which
    slots hold real tokens and how many real tokens each row has seen (the next token's position)."""

    def __init__(self, num_layers, max_len):
        self.k, self.v = [None] * num_layers, [None] * num_layers
        self.max_len, self.start, self.length = max_len, 0, 0  # the newest tokens fill slots start..length-1
        self.valid = self.seen = None

    def add_tokens(self, valid):
        """Reserve slots for T new tokens, valid (B, T) -> their positions (B, T) and attention mask."""
        B, T = valid.shape
        if self.valid is None:
            self.valid = valid.new_zeros(B, self.max_len)
            self.seen = torch.zeros(B, dtype=torch.long, device=valid.device)
        if self.length + T > self.max_len:
            raise ValueError(f"vlm.py: KVCache holds {self.max_len} positions, {self.length + T} asked for")
        self.start, self.length = self.length, self.length + T
        self.valid[:, self.start:self.length] = valid
        positions = (self.seen[:, None] + valid.cumsum(1) - 1).clamp_min(0)
        self.seen = self.seen + valid.sum(1)
        return positions, padded_causal_mask(self.valid[:, :self.length], self.start)

    def update(self, layer, k, v):
        """Store the new keys / values k, v (B, h, T, hd) of one layer -> all of that layer's so far."""
        if self.k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[layer], self.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
        self.k[layer][:, :, self.start:self.length] = k
        self.v[layer][:, :, self.start:self.length] = v
        return self.k[layer][:, :, :self.length], self.v[layer][:, :, :self.length]


class LMAttention(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads = layer, c.n_heads, c.n_kv_heads
        head_dim = c.dim // c.n_heads
        self.q_proj = nn.Linear(c.dim, c.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * head_dim, c.dim, bias=False)

    def forward(self, x, rope, mask=None, cache=None):
        """x (B, T, D); mask (B, 1, T, S) or None for plain causal attention over x alone."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, -1).transpose(1, 2)  # (B, h_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, -1).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, h_kv, S, hd)
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (B, h, S, hd)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, h, T, hd)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LMBlock(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.self_attn = LMAttention(c, layer)
        self.post_attention_layernorm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.mlp = SwiGLU(c.dim, c.hidden_dim)

    def forward(self, x, rope, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LM(nn.Module):
    """A Llama-style decoder. Module names follow the Hugging Face Llama layout (without its "model." prefix),
    so a pretrained checkpoint loads by name (load_llama). It takes embeddings, not ids: the VLM splices
    visual tokens into them first."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(LMBlock(c, i) for i in range(c.n_layers))
        self.norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)
        # every position's rotation, looked up by position: made inside the step, torch.compile would recompute
        # its sines and cosines in each layer's kernels (model.Rope2D says what that cost)
        cos, sin = rotary(torch.arange(c.max_seq_len)[None], c.dim // c.n_heads, c.rope_theta)  # (1, 1, S, hd)
        self.register_buffer("rope_cos", cos[0, 0], persistent=False)  # (S, hd); not in checkpoints
        self.register_buffer("rope_sin", sin[0, 0], persistent=False)
        self.init_weights()

    def init_weights(self):
        """The LM's one place for initial weights: N(0, 0.02) for the embedding and every matrix, with the two
        matrices that write into the residual stream (o_proj, down_proj) scaled by 1 / sqrt(2 * n_layers) as in
        GPT-2, so the stream's variance does not grow with depth; RMSNorm gains stay at 1."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1
            nn.init.normal_(p, 0.0, std * scale)

    def forward(self, x, valid=None, cache=None):
        """x (B, T, D) embeddings -> logits (B, T, vocab).
        valid (B, T) bool, False = left padding: positions then count real tokens only, and padding is masked.
        valid None: every token is real (training batches are right-padded, which causal attention never lets
        reach an earlier position), so attention runs with is_causal and no mask. cache: a KVCache, extended."""
        B, T, _ = x.shape
        c = self.config
        if cache is not None:
            positions, mask = cache.add_tokens(valid if valid is not None else x.new_ones(B, T, dtype=torch.bool))
        elif valid is not None:
            positions, mask = (valid.cumsum(1) - 1).clamp_min(0), padded_causal_mask(valid, 0)
        else:
            positions, mask = torch.arange(T, device=x.device).expand(B, T), None
        length = cache.length if cache is not None else T  # >= every position, so no look at the values (a sync)
        if length > c.max_seq_len:
            raise ValueError(f"vlm.py: a sequence of {length} tokens exceeds LMConfig.max_seq_len {c.max_seq_len}")
        rope = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, hd) each
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed_tokens.weight)

    @torch.no_grad()
    def generate(self, x, valid, max_new_tokens, stop_id, use_cache=True):
        """Continue left-padded prompts x (B, T, D) with valid (B, T) greedily -> per row the new token ids, up to
        and without the first stop_id, at most max_new_tokens. use_cache=False recomputes the whole sequence each
        step (the reference the KV cache must agree with)."""
        B = len(x)
        cache = KVCache(len(self.layers), x.shape[1] + max_new_tokens) if use_cache else None
        logits = self(x, valid, cache)[:, -1]  # (B, vocab)
        tokens, done = [], torch.zeros(B, dtype=torch.bool, device=x.device)
        for step in range(max_new_tokens):
            token = logits.argmax(-1)  # (B,)
            tokens.append(token)
            done |= token == stop_id
            if done.all() or step == max_new_tokens - 1:
                break
            new, new_valid = self.embed_tokens(token[:, None]), valid.new_ones(B, 1)  # (B, 1, D), (B, 1)
            if use_cache:
                logits = self(new, new_valid, cache)[:, -1]
            else:
                x, valid = torch.cat([x, new], 1), torch.cat([valid, new_valid], 1)
                logits = self(x, valid)[:, -1]
        rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(B)]
        return [row[:row.index(stop_id)] if stop_id in row else row for row in rows]


# ----------------------------------------------------------------------------- visual tokens

def pixel_shuffle(x, grid_hw, s):
    """(B, h * w, D) patch tokens, row-major -> (B, (h / s) * (w / s), s * s * D): each s x s block of
    neighbouring patches becomes one token (channels in block row-major order), s^2 fewer tokens."""
    B, N, D = x.shape
    h, w = grid_hw
    x = x.view(B, h // s, s, w // s, s, D).permute(0, 1, 3, 2, 4, 5)  # (B, h/s, w/s, s, s, D)
    return x.reshape(B, (h // s) * (w // s), s * s * D)


class VisionProjector(nn.Module):
    """ViT patch tokens of one image -> visual tokens in the LM width: LayerNorm, s x s pixel shuffle,
    Linear-GELU-Linear (the patch merger of Qwen2-VL, the paper's base VLM)."""

    def __init__(self, vision_dim, shuffle, lm_dim):
        super().__init__()
        self.shuffle = shuffle
        self.norm = nn.LayerNorm(vision_dim)
        self.mlp = MLP(vision_dim * shuffle ** 2, lm_dim, lm_dim)

    def forward(self, patches, grid_hw):
        """patches (I, h * w, Dv) -> (I, h * w / s^2, D)."""
        return self.mlp(pixel_shuffle(self.norm(patches), grid_hw, self.shuffle))


# ----------------------------------------------------------------------------- the Spa3R adapter

class CrossAttention(nn.Module):
    """Queries from x attend to a context; QK-norm (LayerNorm over each head's channels) as the paper's adapter."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.LayerNorm(dim // num_heads)
        self.k_norm = nn.LayerNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, index):
        """x (I, n, D) queries; context (B, L, D); index (I,) which context row each query row reads."""
        I, n, D = x.shape
        q = self.q(x).view(I, n, self.num_heads, -1).transpose(1, 2)  # (I, h, n, hd)
        k, v = self.kv(context).view(len(context), -1, 2, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        k, v = k[index], v[index]  # (I, h, L, hd): projected once per record, read by each of its images
        o = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k).to(q.dtype), v.to(q.dtype))  # (I, h, n, hd)
        return self.proj(o.transpose(1, 2).reshape(I, n, D))


def latent_shape(config):
    """(L, Ds) of what the adapter reads: Spa3R's latent, or the oracle's true 3D tokens."""
    if config.spa3r == "psfm":
        return config.psfm.num_queries, config.psfm.dim
    return 1 + ORACLE_CAMERAS + ORACLE_OBJECTS, ORACLE_DIM


class Spa3RAdapter(nn.Module):
    """The paper's spatial branch (hustvl/Spa3R, spa3_vlm/model/spa3_vlm.py): latent -> projector
    (Linear-GELU-Linear to the LM width); each visual token cross-attends to it; LayerNorm; bottleneck MLP
    (width / 4) times a sigmoid gate; added back to the visual token. The bottleneck's last Linear starts at
    zero, so at initialisation the adapter is the identity and Spa3-VLM is exactly the plain VLM.

    One addition: what the adapter reads is first standardised, each latent slot's each channel, with fixed
    statistics of the training records (set_latent_statistics; identity until set). A small Spa3R's latent (and
    the oracle's tokens) vary little from scene to scene next to how the slots differ; unstandardised, the
    projector learns the shared part, the cross-attention output then differs between scenes along its own mean
    direction, and the LayerNorm after it erases that. Standardised per slot, only what tells scenes apart is left."""

    def __init__(self, latent_tokens, latent_dim, dim, num_heads):
        super().__init__()
        self.register_buffer("latent_mean", torch.zeros(latent_tokens, latent_dim))
        self.register_buffer("latent_std", torch.ones(latent_tokens, latent_dim))
        self.latent_proj = MLP(latent_dim, dim, dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)
        self.bottleneck = MLP(dim, dim // 4)
        self.gate = nn.Linear(dim, dim)
        self.apply(init_weights)
        nn.init.zeros_(self.bottleneck.fc2.weight)
        nn.init.zeros_(self.bottleneck.fc2.bias)

    def forward(self, x, latent, num_images):
        """x (I, n, D) visual tokens of I images; latent (B, L, Ds) one per record; num_images (B,) -> (I, n, D)."""
        # (I,) the record of each image; output_size given, so no wait for the GPU to learn the length
        index = torch.arange(len(latent), device=x.device).repeat_interleave(num_images, output_size=len(x))
        latent = (latent - self.latent_mean) / self.latent_std
        y = self.norm(self.cross_attn(x, self.latent_proj(latent), index))
        return x + self.bottleneck(y) * torch.sigmoid(self.gate(y))


# ----------------------------------------------------------------------------- chat template and batches

SYSTEM_PROMPT = "You answer questions about the 3D scene in the images."


def special_ids(tokenizer):
    """{special token: id}, looked up by name; a tokenizer without one of them is refused."""
    ids = {name: tokenizer.token_to_id(name) for name in SPECIAL_TOKENS}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"vlm.py: tokenizer lacks the special token(s) {missing}")
    return ids


def encode_text(tokenizer, text, what):
    """Plain text -> ids; text that would turn into a special token (a stray "<image>") is refused."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    found = set(ids) & set(special_ids(tokenizer).values())
    if found:
        raise ValueError(f"vlm.py: {what} contains special token(s) {[tokenizer.id_to_token(i) for i in found]}")
    return ids


def chat_tokens(tokenizer, question, num_images, tokens_per_image, answer=None, what="question"):
    """The fixed template as ids, and which ids the loss is on (the answer and its closing <|end|>):
        <|system|> SYSTEM_PROMPT <|end|> <|user|> <image> x num_images question <|end|> <|assistant|> answer <|end|>
    Each image's <image> is written as tokens_per_image slots, one per visual token, so splicing is a
    one-for-one replacement. Without an answer the ids stop after <|assistant|>, where generation starts."""
    s = special_ids(tokenizer)
    ids = [s["<|system|>"], *encode_text(tokenizer, SYSTEM_PROMPT, "SYSTEM_PROMPT"), s["<|end|>"], s["<|user|>"]]
    ids += [s["<image>"]] * (num_images * tokens_per_image)
    ids += [*encode_text(tokenizer, question, f"{what} field 'question'"), s["<|end|>"], s["<|assistant|>"]]
    on_answer = [False] * len(ids)
    if answer is not None:
        reply = [*encode_text(tokenizer, answer, f"{what} field 'answer'"), s["<|end|>"]]
        ids, on_answer = ids + reply, on_answer + [True] * len(reply)
    return ids, on_answer


def next_token_targets(ids, on_answer):
    """targets[t] = ids[t + 1] where that token is on the answer, IGNORE elsewhere (the last position predicts nothing)."""
    return [ids[t + 1] if on_answer[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def tokens_per_image(config, H, W):
    """Visual tokens of one H x W image: (H / patch / shuffle) * (W / patch / shuffle)."""
    m = config.geo.patch_size * config.pixel_shuffle
    if H % m or W % m:
        raise ValueError(f"vlm.py: images of {H}x{W} pixels: H and W must be multiples of patch_size x pixel_shuffle = {m}")
    return (H // m) * (W // m)


def stack_images(images, config, names):
    """List of (N_i, 3, H, W), N_i >= 1, one size for all -> (I, 3, H, W), num_images (B,), tokens per image.
    uint8 images stay uint8 (training batches: data.to_device widens them on the device), others become float."""
    for x, name in zip(images, names):
        if x.dim() != 4 or x.shape[1] != 3 or len(x) == 0 or x.shape[-2:] != images[0].shape[-2:]:
            raise ValueError(f"vlm.py: record {name!r} field 'images' must be (N >= 1, 3, H, W) with the batch's H, W "
                             f"{tuple(images[0].shape[-2:])}, got {tuple(x.shape)}")
    if len({x.dtype == torch.uint8 for x in images}) > 1:  # cat would make floats of 0..255 and 0..1 alike
        raise ValueError(f"vlm.py: records {names[0]!r}...: field 'images' mixes uint8 and float images")
    n = tokens_per_image(config, *images[0].shape[-2:])
    stacked = torch.cat(images)
    return (stacked if stacked.dtype == torch.uint8 else stacked.float()), torch.tensor([len(x) for x in images]), n


def check_length(length, config, name, where="vlm.py"):
    if length > config.lm.max_seq_len:
        raise ValueError(f"{where}: record {name!r} needs {length} tokens, more than LMConfig.max_seq_len "
                         f"{config.lm.max_seq_len}")


def check_lengths(records, tokenizer, config, where):
    """Every record's sequence (the chat template, its images' visual tokens, the answer) within the LM's
    positions, checked before training: the first that is not is a one-line error."""
    per_image = tokens_per_image(config, config.geo.image_size, config.geo.image_size)
    for record in records:
        images = len(record.get("image_files") or record["image"])
        ids, _ = chat_tokens(tokenizer, prompt(record), images, per_image, record["answer"], f"record {record['id']!r}")
        check_length(len(ids), config, record["id"], where)


def collate(items, tokenizer, config):
    """data.QADataset items -> a training batch, right-padded (see the file's docstring), its images uint8 as the
    items carry them (data.to_device widens them). Use as
    DataLoader(collate_fn=functools.partial(collate, tokenizer=tokenizer, config=config))."""
    names = [item["id"] for item in items]
    images, num_images, n = stack_images([item["images"] for item in items], config, names)
    rows = [chat_tokens(tokenizer, item["question"], len(item["images"]), n, item["answer"], f"record {item['id']!r}")
            for item in items]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), special_ids(tokenizer)["<|pad|>"])
    targets = torch.full((len(rows), T), IGNORE)
    for i, (ids, on_answer) in enumerate(rows):
        check_length(len(ids), config, names[i])
        input_ids[i, :len(ids)] = torch.tensor(ids)
        targets[i, :len(ids)] = torch.tensor(next_token_targets(ids, on_answer))
    batch = {"input_ids": input_ids, "targets": targets, "images": images, "num_images": num_images, "ids": names,
             "scenes": [item.get("record", {}).get("scene") for item in items]}
    for key in ("oracle", "latent"):  # the oracle arm's true 3D tokens (data.oracle_tokens); a cached latent
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    return batch


def prompt_batch(questions, images, tokenizer, config, names=None):
    """Prompts to generate from, left-padded so every row's next token goes in the same column:
    input_ids (B, T), valid (B, T) bool (False = padding), images (I, 3, H, W), num_images (B,)."""
    names = names or [f"#{i}" for i in range(len(questions))]
    images, num_images, n = stack_images(list(images), config, names)
    rows = [chat_tokens(tokenizer, q, int(k), n, what=f"record {name!r}")[0]
            for q, k, name in zip(questions, num_images, names)]
    T = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), T), special_ids(tokenizer)["<|pad|>"])
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, ids in enumerate(rows):
        check_length(len(ids), config, names[i])
        input_ids[i, T - len(ids):] = torch.tensor(ids)
        valid[i, T - len(ids):] = True
    return {"input_ids": input_ids, "valid": valid, "images": images, "num_images": num_images, "ids": names}


# ----------------------------------------------------------------------------- the VLM

@dataclass
class VLMConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    geo: GeoConfig = field(default_factory=GeoConfig)       # the vision ViT's and Spa3R's backbone (one checkpoint)
    psfm: Spa3RConfig = field(default_factory=Spa3RConfig)  # the Spa3R encoder whose latent the adapter reads
    spa3r: str = "psfm"         # "psfm": Spa3-VLM; "none": the baseline VLM (no Spa3R, no adapter, all else equal);
                                # "oracle": the adapter reads true 3D tokens (data.oracle_tokens) instead of a latent
    freeze_spa3r: bool = True   # as the paper; False trains the Spa3R encoder too (its backbone stays frozen)
    freeze_vision: bool = True  # as the paper (tune_mm_vision False): the vision ViT keeps the geo backbone's
                                # weights, so the LM must get 3D from the latent, not by retraining its eyes
    pixel_shuffle: int = 2      # s: visual tokens per image = (H / patch / s) * (W / patch / s)
    max_new_tokens: int = 32    # answer length cap for answer()

    def __post_init__(self):
        check_fields(self, "vlm.py", positive=("pixel_shuffle", "max_new_tokens"))
        if self.spa3r not in ("psfm", "none", "oracle"):
            raise ValueError(f"vlm.py: VLMConfig.spa3r must be 'psfm', 'none' or 'oracle', got {self.spa3r!r}")
        if self.pixel_shuffle < 1:
            raise ValueError(f"vlm.py: VLMConfig.pixel_shuffle must be >= 1, got {self.pixel_shuffle}")

    @classmethod
    def tiny(cls, **overrides):
        return cls(**overrides)

    @classmethod
    def reference(cls, **overrides):
        # 224 / 14 = 16 x 16 patches, shuffled 2 x 2 -> 64 visual tokens an image: 2048 for a 32-frame video
        return cls(lm=LMConfig.reference(), geo=GeoConfig.reference(), psfm=Spa3RConfig.reference(), **overrides)

    @classmethod
    def from_dict(cls, d):
        """Inverse of dataclasses.asdict; an unknown field is a TypeError naming it."""
        return cls(**{**d, "lm": LMConfig(**d["lm"]), "geo": GeoConfig(**d["geo"]), "psfm": Spa3RConfig(**d["psfm"])})


class SpaVLM(nn.Module):
    def __init__(self, config, tokenizer, lm=None):
        """lm: a pretrained LM of config.lm (load_llama) instead of a freshly initialised one."""
        super().__init__()
        c = config
        self.config, self.tokenizer = c, tokenizer
        self.special = special_ids(tokenizer)
        if tokenizer.get_vocab_size() > c.lm.vocab_size:
            raise ValueError(f"vlm.py: tokenizer has {tokenizer.get_vocab_size()} tokens, LMConfig.vocab_size is {c.lm.vocab_size}")
        self.lm = lm if lm is not None else LM(c.lm)
        self.vision = ViT(c.geo).requires_grad_(not c.freeze_vision)
        self.vision.apply(init_weights)
        self.projector = VisionProjector(c.geo.dim, c.pixel_shuffle, c.lm.dim)
        # the spatial branch is built last: with the same seed, everything both variants share starts identical
        self.spa3r = self.adapter = None
        if c.spa3r == "psfm":
            self.spa3r = PSFM(c.psfm, GeoBackbone(c.geo)).requires_grad_(False)
            self.spa3r.encoder.requires_grad_(not c.freeze_spa3r)  # the decoder and heads are never used here
        if c.spa3r != "none":
            self.adapter = Spa3RAdapter(*latent_shape(c), c.lm.dim, c.lm.n_heads)

    def init_from_psfm(self, state):
        """Start from a stage-`psfm` checkpoint (a PSFM state dict): the vision ViT copies the geometry backbone's
        per-image ViT (in both variants, so the ablation differs only in the spatial branch), and the Spa3R
        branch loads the whole PSFM."""
        prefix = "backbone.vit."
        vit = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not vit:
            raise ValueError(f"vlm.py: init_from_psfm: the state has no '{prefix}*' weights")
        self.vision.load_state_dict(vit)
        if self.spa3r is not None:
            self.spa3r.load_state_dict(state)

    # the host-side grouping stays eager under torch.compile; the PSFM.encode calls in it are compiled, each image
    # count its own graph (a third of a vlm step's FLOPs are Spa3R's)
    @torch.compiler.disable(recursive=False)
    def spatial_latent(self, images, num_images):
        """(B, L, Ds): PSFM.encode of each record's images, num_images (B,) on the host. Records with the same
        image count share one call."""
        per_record = images.split(num_images.tolist())
        latent = [None] * len(per_record)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_spa3r):
            for n in sorted(set(num_images.tolist())):
                group = [i for i, x in enumerate(per_record) if len(x) == n]
                out = self.spa3r.encode(torch.stack([per_record[i] for i in group]))  # (b, L, Ds)
                for i, z in zip(group, out):
                    latent[i] = z
        return torch.stack(latent)

    @torch.no_grad()
    def set_latent_statistics(self, batches):
        """The adapter's fixed standardisation: mean and std of each latent slot's each channel over the records
        of these batches (collate batches of training records)."""
        latents = torch.cat([self.latent(b).float() for b in batches])  # (records, L, Ds)
        self.adapter.latent_mean.copy_(latents.mean(0))
        self.adapter.latent_std.copy_(latents.std(0).clamp_min(1e-3))

    def latent(self, batch):
        """What each record's visual tokens read through the adapter (B, L, Ds): Spa3R's latent of its images,
        or the oracle's true 3D tokens; None for the baseline."""
        if self.config.spa3r == "psfm":  # the batch carries it when train.py --cache_latent computed it once
            return batch["latent"] if "latent" in batch else self.spatial_latent(batch["images"], batch["num_images"])
        return batch["oracle"] if self.config.spa3r == "oracle" else None

    def visual_tokens(self, images, num_images, latent=None):
        """images (I, 3, H, W) of B records, num_images (B,), latent (B, L, Ds) -> (I, n, D) visual tokens in the LM width."""
        g = self.config.geo
        patches = self.vision(images)[:, g.num_registers:]  # (I, N, Dv)
        x = self.projector(patches, (images.shape[-2] // g.patch_size, images.shape[-1] // g.patch_size))  # (I, n, D)
        if self.adapter is not None:
            x = self.adapter(x, latent, num_images)
        return x

    def embed(self, batch, latent_order=None):
        """Token embeddings (B, T, D) with each record's visual tokens in its <image> slots, in order.
        latent_order (B,): record i reads the latent of record latent_order[i] (the latent-swap gate)."""
        ids = batch["input_ids"]
        num_images = batch["num_images"].to(ids.device, non_blocking=True)  # from the host (data.to_device)
        x = self.lm.embed_tokens(ids)  # (B, T, D)
        latent = self.latent(batch)
        if latent is not None and latent_order is not None:
            latent = latent[latent_order]
        vis = self.visual_tokens(batch["images"], num_images, latent)  # (I, n, D)
        slots = ids == self.special["<image>"]  # (B, T)
        # checked on the device, without waiting for it: a Python check would stall every step
        torch._assert_async((slots.sum(1) == num_images * vis.shape[1]).all(), "vlm.py: batch['input_ids'] has a "
                            f"row whose <image> slots differ from its images' visual tokens ({vis.shape[1]} each)")
        return x.masked_scatter(slots[..., None], vis.to(x.dtype))

    def logits(self, batch, latent_order=None):
        """(B, T, vocab) for a collate batch (right-padded) or a prompt_batch (left-padded, with 'valid')."""
        return self.lm(self.embed(batch, latent_order), batch.get("valid"))

    def record_losses(self, batch, latent_order=None):
        """(B,) each record's mean cross-entropy over its answer tokens (the VLM gates compare these)."""
        ce = F.cross_entropy(self.logits(batch, latent_order).transpose(1, 2).float(), batch["targets"],
                             ignore_index=IGNORE, reduction="none")  # (B, T)
        return ce.sum(1) / (batch["targets"] != IGNORE).sum(1).clamp_min(1)

    def forward(self, batch):
        """Mean cross-entropy over the batch's answer tokens (each answer and its closing <|end|>)."""
        logits = self.logits(batch)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE)
        return loss, {"ce": loss.detach()}

    @torch.no_grad()
    def generate(self, batch, max_new_tokens=None, use_cache=True):
        """A prompt_batch -> each row's greedy answer token ids (without the closing <|end|>)."""
        return self.lm.generate(self.embed(batch), batch["valid"], max_new_tokens or self.config.max_new_tokens,
                                self.special["<|end|>"], use_cache)

    @torch.no_grad()
    def answer(self, records, images, max_new_tokens=None, oracle=None):
        """eval.py's contract: records (dicts with "question", read as generate_spar.prompt assembles it),
        images[i] (N_i, 3, H, W) uint8 (data.as_images) or floats in [0, 1] -> answers,
        decoded greedily with the KV cache, the whole list as one batch. oracle: the oracle arm's
        data.oracle_tokens of each record."""
        device = self.lm.embed_tokens.weight.device
        batch = prompt_batch([prompt(r) for r in records], images, self.tokenizer, self.config,
                             [r.get("id", f"#{i}") for i, r in enumerate(records)])
        if oracle is not None:
            batch["oracle"] = torch.stack(list(oracle))
        batch = to_device(batch, device)
        return [self.tokenizer.decode(ids).strip() for ids in self.generate(batch, max_new_tokens)]

    def param_groups(self, lrs, weight_decay=0.0):
        """AdamW groups, per module and decay kind: lrs {"lm", "vision", "projector", "adapter", "spa3r"} -> lr,
        needed for each module that has trainable weights. Matrices decay, gains and biases do not."""
        groups = []
        for name in ("lm", "vision", "projector", "adapter", "spa3r"):
            module = getattr(self, name)
            params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
            if params and name not in lrs:
                raise ValueError(f"vlm.py: param_groups needs a learning rate for '{name}'")
            for suffix, chosen, decay in (("", [p for p in params if p.dim() >= 2], weight_decay),
                                          ("/no_decay", [p for p in params if p.dim() < 2], 0.0)):
                if chosen:
                    groups.append({"name": name + suffix, "params": chosen, "lr": lrs[name], "weight_decay": decay})
        return groups


# ----------------------------------------------------------------------------- checkpoints

def load_for_eval(ckpt_dir, device=None):
    """The SpaVLM train.py saved in ckpt_dir (config.json, tokenizer.json, model.safetensors), in eval mode on
    device (default: cuda, then mps, then cpu), ready to answer()."""
    tokenizer = load_tokenizer(os.path.join(ckpt_dir, "tokenizer.json"))
    model = load_checkpoint(ckpt_dir, lambda config: SpaVLM(VLMConfig.from_dict(config), tokenizer))
    return model.to(device or best_device()).eval()


def lm_config_from_hf(hf, path):
    """A Hugging Face LlamaConfig dict (transformers 4: top-level rope_theta and rope_scaling; 5: rope_parameters)
    -> LMConfig; what this LM does not implement (RoPE scaling: llama3, linear, yarn, ...) is refused by name."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in hf:
            raise ValueError(f"vlm.py: {path}: field '{key}' is missing")
    rope_field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"  # transformers 5, 4
    rope = hf.get(rope_field) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {"model_type": hf.get("model_type", "llama") != "llama", "hidden_act": hf.get("hidden_act", "silu") != "silu",
                   "rope_type": rope_type != "default", "attention_bias": bool(hf.get("attention_bias")),
                   "mlp_bias": bool(hf.get("mlp_bias")),
                   "head_dim": hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
                   != hf["hidden_size"] // hf["num_attention_heads"]}
    for key, bad in unsupported.items():
        if bad:
            field, value = (f"{rope_field}.rope_type", rope_type) if key == "rope_type" else (key, hf.get(key))
            raise ValueError(f"vlm.py: {path}: field '{field}' = {value!r} is not supported")
    return LMConfig(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                    n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                    hidden_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                    rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                    norm_eps=hf.get("rms_norm_eps", 1e-6),
                    tie_embeddings=hf.get("tie_word_embeddings", False))


def read_hf_weights(model_dir):
    """The tensors of a Hugging Face checkpoint folder: model.safetensors, or the shards that
    model.safetensors.index.json maps every tensor to."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if not os.path.exists(index):
        return read_weights(os.path.join(model_dir, "model.safetensors"))
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"vlm.py: {index}: field 'weight_map' must map tensor names to shard files")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(read_weights(os.path.join(model_dir, shard)))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"vlm.py: {index}: tensor {missing[0]!r} is in no shard it names")
    return tensors


def load_llama(model_dir):
    """A pretrained Llama-architecture LM (the SmolLM class) from a local folder as transformers 4 or 5 saves it:
    config.json, model.safetensors or its shards, tokenizer.json. Returns (LM in fp32, tokenizer). The tokenizer
    gains the chat's special tokens it lacks (at the end of its vocabulary); where they fall beyond the stored
    rows, the embedding (and an untied head) grow, new rows the mean of the old. A tied checkpoint's stored
    lm_head copy is dropped."""
    config_path = os.path.join(model_dir, "config.json")
    config = lm_config_from_hf(read_json(config_path), config_path)
    tokenizer = load_tokenizer(os.path.join(model_dir, "tokenizer.json"), add_special=True)
    rows = max(config.vocab_size, tokenizer.get_vocab_size())
    state = {k.removeprefix("model."): v.float() for k, v in read_hf_weights(model_dir).items()
             if not (config.tie_embeddings and k == "lm_head.weight")}  # a tied checkpoint may store the head too
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if name in state and len(state[name]) < rows:
            old = state[name]
            state[name] = torch.cat([old, old.mean(0, keepdim=True).expand(rows - len(old), -1)])
    lm = LM(replace(config, vocab_size=rows))
    index = os.path.join(model_dir, "model.safetensors.index.json")
    named = index if os.path.exists(index) else os.path.join(model_dir, "model.safetensors")  # in error messages
    return load_weights(lm, named, state), tokenizer


# ----------------------------------------------------------------------------- size and cost

def lm_flops_per_token(c, context):
    """Forward FLOPs of one token through the LM attending to `context` keys: 2 per multiply-add of every
    weight matrix (q, k, v, o, SwiGLU, the output head), plus QK^T and AV, 4 * context * n_heads * head_dim a
    layer. A T-token sequence costs T * lm_flops_per_token(c, T): attention billed over all T keys, as SDPA's
    FLOP count and nanoGPT's 6N + 12LHQT do (a causal kernel skips about half). Norms, RoPE, softmax left out."""
    hd = c.dim // c.n_heads
    weights = 2 * c.dim * c.n_heads * hd + 2 * c.dim * c.n_kv_heads * hd + 3 * c.dim * c.hidden_dim
    return c.n_layers * (2 * weights + 4 * context * c.n_heads * hd) + 2 * c.dim * c.vocab_size


def flops_per_sample(config, num_images, text_tokens, training=False, cached_latent=False):
    """FLOPs for one record of num_images images (at config.geo.image_size) and text_tokens other tokens,
    counted as model.flops_per_sample counts them. training=False: the forward pass. training=True: a training
    step, 3x the forward of each trained part (backward ~ 2x forward) and 1x that of frozen parts, which no
    backward reaches: Spa3R's backbone always, its encoder and the vision ViT when frozen. cached_latent: the
    step reads the latent (train.py --cache_latent), so Spa3R does not run in it.
    MFU = samples/s x flops_per_sample(..., training=True) / the device's peak FLOP/s."""
    c, g = config, config.geo
    n, D = (g.image_size // g.patch_size) ** 2, c.lm.dim
    n_vis = tokens_per_image(c, g.image_size, g.image_size)
    T = text_tokens + num_images * n_vis
    parts = {"lm": T * lm_flops_per_token(c.lm, T)}
    parts["vision"] = num_images * (n * 2 * 3 * g.patch_size ** 2 * g.dim
                                    + g.vit_depth * block_flops(g.dim, g.mlp_ratio, g.num_registers + n, g.num_registers + n))
    parts["projector"] = num_images * n_vis * 2 * (g.dim * c.pixel_shuffle ** 2 * D + D * D)
    if c.spa3r == "psfm" and not cached_latent:
        p = c.psfm
        S = p.num_queries + p.num_registers + num_images * n
        parts["spa3r_backbone"] = geo_flops_per_sample(g, num_images, heads=False)  # PSFM.encode: tokens only
        parts["spa3r_encoder"] = 2 * num_images * n * g.dim * p.dim + p.encoder_depth * block_flops(p.dim, p.mlp_ratio, S, S)
    if c.spa3r != "none":
        L, Ds = latent_shape(c)
        per_record = 2 * L * (Ds * D + D * D) + 2 * L * D * 2 * D  # latent projector, keys and values
        per_token = 2 * D * D * 3 + 2 * 2 * D * (D // 4) + 4 * L * D  # q, out, gate; bottleneck; attention
        parts["adapter"] = per_record + num_images * n_vis * per_token
    if not training:
        return sum(parts.values())
    frozen = {"spa3r_backbone"} | ({"spa3r_encoder"} if c.freeze_spa3r else set()) | ({"vision"} if c.freeze_vision else set())
    return sum(v if k in frozen else 3 * v for k, v in parts.items())
