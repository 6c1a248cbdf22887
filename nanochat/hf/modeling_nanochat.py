"""nanochat's GPT as a transformers causal LM (copied next to a checkpoint by `nanochat export hf`).

This file re-implements the architecture of nanochat/gpt.py on purpose: users load it with
`trust_remote_code=True` where nanochat is not installed, so it may only import torch and
transformers. Parameter names match nanochat's state dict, so the weights are saved as they are.
nanochat's test suite checks that both give the same logits and the same greedy tokens.

The architecture, in the order a token sees it:
- token embedding, then a parameter-free RMSNorm, then the smear: position t adds
  smear_lambda * sigmoid(smear_gate(e[t, :24])) * e[t-1] (e = the normalized embeddings; nothing
  for a row's first token); the result x0 is kept for every layer
- per layer: x = resid_lambdas[i] * x + x0_lambdas[i] * x0, then two pre-norm residual branches
  (parameter-free RMSNorm before each; no biases anywhere)
- attention: rotary embeddings (base 100,000, pairs (i, i + D/2)), then QK-norm and q, k times 1.2,
  grouped-query
  attention, causal with a per-layer window ("S" layers see the last short_window tokens, "L"
  layers everything, the last layer always everything)
- alternating layers (always the last) add a value embedding of the input token to the values,
  scaled per kv head by a gate 3 * sigmoid(W x[:, :12])
- MLP: ReLU^2, 4x wide
- backout: the residual stream after layer n_layer // 2, times backout_lambda, is subtracted
  (not with n_layer <= 2, where that layer is the last one)
- final RMSNorm, untied lm_head, logits in fp32 soft-capped: 15 * tanh(logits / 15)

Generation keeps every key in a transformers DynamicCache; sliding windows are applied by the
attention mask. Batches may be left-padded (pass the tokenizer's attention_mask). The smear needs
the token before the first new one: generate() passes it (prev_token_ids); a hand-written loop
that feeds the returned past_key_values back gets it from the cache, where forward() leaves the
last token of each row.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanochat import NanochatConfig


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotate(x, pos, base):
    """x: (B, T, H, D), pos: (B, T) integer positions. Rotates each pair (x[i], x[i + D/2]) by
    the angle -pos * base^(-2i/D) (nanochat's sign convention)."""
    d = x.size(-1) // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, 2 * d, 2, device=x.device, dtype=torch.float32) / (2 * d)))
    angles = pos.to(torch.float32)[..., None] * inv_freq  # (B, T, d)
    cos, sin = angles.cos()[:, :, None].to(x.dtype), angles.sin()[:, :, None].to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def has_value_embedding(layer_idx, n_layer):
    return layer_idx % 2 == (n_layer - 1) % 2


class NanochatAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.rope_base = config.rope_base
        self.qk_scale = config.qk_scale
        self.ve_gate_range = config.ve_gate_range
        C, D = config.n_embd, self.head_dim
        self.c_q = nn.Linear(C, self.n_head * D, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * D, bias=False)
        self.c_proj = nn.Linear(self.n_head * D, C, bias=False)
        self.ve_gate = None
        if has_value_embedding(layer_idx, config.n_layer):
            self.ve_gate = nn.Linear(min(config.ve_gate_channels, C), self.n_kv_head, bias=False)

    def forward(self, x, ve, pos, mask, cache):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.c_q(x).view(B, T, H, D)
        k = self.c_k(x).view(B, T, Hkv, D)
        v = self.c_v(x).view(B, T, Hkv, D)
        if ve is not None:
            gate = self.ve_gate_range * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        q = (rms_norm(rotate(q, pos, self.rope_base)) * self.qk_scale).to(v.dtype).transpose(1, 2)
        k = (rms_norm(rotate(k, pos, self.rope_base)) * self.qk_scale).to(v.dtype).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # all keys so far: (B, Hkv, past + T, D)
        if Hkv != H:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D))


class NanochatMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class NanochatBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = NanochatAttention(config, layer_idx)
        self.mlp = NanochatMLP(config)

    def forward(self, x, ve, pos, mask, cache):
        x = x + self.attn(rms_norm(x), ve, pos, mask, cache)
        return x + self.mlp(rms_norm(x))


def attention_mask_for(window, T, past, pad_mask, device):
    """Boolean (B or 1, 1, T, past + T) mask, True = may attend, or None for plain causal
    attention over T == past + T tokens (SDPA's fast path). Query t sits at index past + t of the
    row; it sees index j when j <= past + t, past + t - j < window, and j is not padding.
    Distances are counted in indices, which equal position differences for left padding."""
    if past == 0 and pad_mask is None and (window is None or window >= T):
        return None
    q_idx = past + torch.arange(T, device=device)[:, None]
    k_idx = torch.arange(past + T, device=device)[None, :]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    allowed = allowed[None, None]  # (1, 1, T, past + T)
    if pad_mask is not None:
        # a padding query still sees itself, so no row is all -inf (its output is never used)
        allowed = (allowed & pad_mask[:, None, None, :].bool()) | (q_idx == k_idx)[None, None]
    return allowed


class NanochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["NanochatBlock"]
    _supports_cache_class = True  # transformers 4.x: generate() makes a DynamicCache for us

    def __init__(self, config):
        super().__init__(config)
        C, V = config.n_embd, config.vocab_size
        kv_dim = config.n_kv_head * (C // config.n_head)
        self.wte = nn.Embedding(V, C)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(config.n_layer)
                                           if has_value_embedding(i, config.n_layer)})
        self.blocks = nn.ModuleList([NanochatBlock(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(C, V, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((config.n_layer,), 0.1))
        self.smear_gate = nn.Linear(min(config.smear_channels, C), 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        self.windows = config.layer_windows()
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def smear(self, e, prev_token_ids, past, pad_mask):
        """e: (B, T, C) normalized embeddings of the new tokens. Position t gets the embedding of
        the token before it (for t = 0 that of prev_token_ids, when past > 0), unless that token
        is padding or there is none."""
        B, T, _ = e.shape
        if past > 0:
            if prev_token_ids is None:
                raise ValueError("nanochat smears the previous token into each position: with past_key_values, "
                                 "pass prev_token_ids (B, 1), the token before input_ids, or the past_key_values "
                                 "this model returned")
            first = rms_norm(self.wte(prev_token_ids.to(e.device).view(B, 1)))
        else:
            first = torch.zeros_like(e[:, :1])
        prev = torch.cat([first, e[:, :-1]], dim=1)
        j = past - 1 + torch.arange(T, device=e.device)  # index of the previous token in the row
        valid = (j >= 0)[None, :].expand(B, T)
        if pad_mask is not None:
            valid = valid & pad_mask[:, j.clamp(min=0)].bool()
        gate = torch.sigmoid(self.smear_gate(e[..., :self.smear_gate.in_features]))
        return e + self.smear_lambda * gate * (prev * valid[..., None].to(e.dtype))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, labels=None,
                use_cache=None, return_dict=None, prev_token_ids=None, **kwargs):
        B, T = input_ids.shape
        device = input_ids.device
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = past_key_values if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0

        pad_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            pad_mask = attention_mask[:, -(past + T):]
        if position_ids is None:
            if pad_mask is not None:
                # left padding: the first real token of each row is position 0
                position_ids = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = (past + torch.arange(T, device=device))[None].expand(B, T)
        masks = {w: attention_mask_for(w, T, past, pad_mask, device) for w in set(self.windows)}

        x = rms_norm(self.wte(input_ids))
        if self.config.smear:
            if prev_token_ids is None and past > 0:
                prev_token_ids = getattr(cache, "nanochat_last_token", None)
            x = self.smear(x, prev_token_ids, past, pad_mask)
        if cache is not None:
            cache.nanochat_last_token = input_ids[:, -1:]
        x0 = x
        backout_layer = self.config.n_layer // 2
        if not self.config.backout or backout_layer >= self.config.n_layer - 1:
            backout_layer = None  # off, or n_layer <= 2 (that layer is the last: nanochat skips it)
        x_mid = None
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, position_ids, masks[self.windows[i]], cache)
            if i == backout_layer:
                x_mid = x
        if x_mid is not None:
            x = x - self.backout_lambda * x_mid
        x = rms_norm(x)
        logits = self.lm_head(x).float()
        logits = self.config.softcap * torch.tanh(logits / self.config.softcap)

        loss = None
        if labels is not None:
            # transformers convention: labels are the inputs; position t predicts labels[t + 1]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1).to(device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        # feed only the tokens the cache has not seen yet (all of them on the first step)
        past = past_key_values.get_seq_length() if isinstance(past_key_values, Cache) else 0
        inputs = {"input_ids": input_ids[:, past:], "past_key_values": past_key_values,
                  "attention_mask": attention_mask, "use_cache": kwargs.get("use_cache", True)}
        if past > 0:
            inputs["prev_token_ids"] = input_ids[:, past - 1:past]  # the smear's previous token
        return inputs
