"""Activation memory of one micro-batch: tensor by tensor for Llama-like decoders, else a standard formula."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..adapters.inject import adapter_config, adapter_layers, layer_index, module_type

# transformers' attn_implementation values; flash kernels save what SDPA's fused kernels save.
ATTENTIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
LLAMA_LIKE = ("llama", "mistral", "qwen2")  # decoder layers whose saved tensors activation_bytes knows
QKV = ("q_proj", "k_proj", "v_proj")


# ----------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class _Adapted:
    r: int
    d_in: int
    d_out: int
    a_cast: bool  # A is a bank tensor in another dtype: the forward saves one working-dtype copy
    b_cast: bool
    a_key: Optional[str]  # siblings (q/k/v, gate/up) sharing one bank A project (and cast) it once
    b_key: Optional[str]


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes of activations for one micro-batch. ``formula`` says which estimate made them."""

    formula: str                      # "llama" (tensor-by-tensor) or "standard" (Korthikanti et al. 2022)
    per_layer: tuple[int, ...]        # saved for backward by each decoder layer, no checkpointing
    layer_casts: tuple[int, ...]      # the bank copies each layer makes when it runs alone (a recompute)
    bank_casts: int                   # the bank copies one forward of the whole model makes, once each
    rotary: int                       # cos/sin, saved once for all layers
    head: int                         # final norm input, fp32 log-probs, labels, loss
    head_transient: int               # logits and their fp32 copy while the loss is computed
    boundary: int                     # one layer's input: what checkpointing keeps per layer
    standard: int                     # Korthikanti et al. 16-bit estimate, all layers, for reference

    @property
    def saved(self) -> int:
        """What autograd holds at the end of the forward without checkpointing."""
        return sum(self.per_layer) + self.bank_casts + self.rotary + self.head

    @property
    def no_checkpointing(self) -> int:
        return self.saved + self.head_transient

    @property
    def checkpointing(self) -> int:
        """Per-layer inputs, plus one layer recomputed in full during its backward (with its own
        bank copies: a recompute runs outside the model's forward, which holds one of each)."""
        recomputed = max((p + c for p, c in zip(self.per_layer, self.layer_casts, strict=True)), default=0)
        return len(self.per_layer) * self.boundary + recomputed + self.rotary + self.head + self.head_transient


def _layer_dims(config) -> tuple[int, int, int, int, int, int]:
    h, a = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or a
    hd = getattr(config, "head_dim", None) or h // a
    return h, a * hd, kv * hd, config.intermediate_size, a, hd


def _llama_layer(first: bool, adapted: dict[str, _Adapted], config, *, d: int, dropout: bool, mask: int,
                 attention: str, tokens: int, seq_len: int, siblings: bool,
                 bank_casts: dict[str, int]) -> tuple[int, int, bool]:
    """Bytes one HF Llama/Mistral/Qwen2 decoder layer saves for backward, without and with only its
    bank copies (run alone); and whether its rotary embedding is saved. ``bank_casts``: the bank copies
    it saves, by key, added to what one forward of the model holds once. The base is frozen, so a tensor
    is saved only where some gradient needs it: nothing upstream of the first adapter of layer 0
    requires grad (embeddings are frozen)."""
    h, qd, kvd, f, a, _ = _layer_dims(config)
    tok, const = 0, 0

    def lora(m: str, d_in: int, input_rg: bool, projected: Optional[set] = None) -> None:
        """``projected``: the bank A's this sibling group projected already (one output, one cast)."""
        nonlocal tok, const
        info = adapted[m]
        again = projected is not None and info.a_key is not None and info.a_key in projected
        if projected is not None and info.a_key is not None:
            projected.add(info.a_key)
        if not again:
            tok += d * info.r  # A's output, kept for B's gradient
        if dropout:  # the dropped copy (for A's gradient) and, if the input needs a gradient, the mask
            tok += d * d_in + (mask * d_in if input_rg else 0)
        if info.a_cast and input_rg:
            const += 0 if again else d * info.r * d_in
            bank_casts[info.a_key] = d * info.r * d_in
        if info.b_cast:
            const += d * info.d_out * info.r
            bank_casts[info.b_key] = d * info.d_out * info.r

    has = adapted.__contains__
    g = not first  # the layer's input requires grad
    if g:
        tok += 4 * h + 4  # RMSNorm: fp32 input and rsqrt
    if any(map(has, QKV)) and not dropout:
        tok += d * h  # normed input, shared by the q/k/v adapters
    together = siblings and not dropout  # siblings project together (adapters/siblings.py)
    qkv_projected = set() if together else None
    for m in QKV:
        if has(m):
            lora(m, h, g, qkv_projected)
    att_rg = g or any(map(has, QKV))
    if att_rg:
        if attention != "eager":  # SDPA/flash: q, k, v, output and fp32 log-sum-exp (GQA in the kernel)
            tok += d * (2 * qd + 2 * kvd) + 4 * a
        else:  # q, k and v repeated to every head, fp32 and working-dtype probabilities
            tok += 3 * d * qd + (4 + d) * a * seq_len
    if has("o_proj"):
        if not dropout and (attention == "eager" or not att_rg):
            tok += d * qd  # o's input; under SDPA it is the saved attention output
        lora("o_proj", qd, att_rg)
    mid_rg = att_rg or has("o_proj")
    if mid_rg:
        tok += 4 * h + 4
    if (has("gate_proj") or has("up_proj")) and not dropout:
        tok += d * h
    gate_rg, up_rg = mid_rg or has("gate_proj"), mid_rg or has("up_proj")
    tok += d * f * (2 * gate_rg + up_rg)  # silu input, and the product's two factors
    mlp_projected = set() if together else None
    for m in ("gate_proj", "up_proj"):
        if has(m):
            lora(m, h, mid_rg, mlp_projected)
    if has("down_proj"):
        if not dropout:
            tok += d * f
        lora("down_proj", f, gate_rg or up_rg)
    return tok * tokens, const, g or has("q_proj") or has("k_proj")  # rotary: q or k needs a gradient


def activation_bytes(model: nn.Module, *, dtype_bytes: int, micro_batch: int, seq_len: int,
                     attention: str = "sdpa", shared_mode: str = "replicated",
                     dropout_mask_bytes: int = 1, siblings: bool = True) -> ActivationEstimate:
    """Activation memory of one micro-batch, with and without non-reentrant checkpointing.

    Llama, Mistral and Qwen2 (``formula="llama"``): the tensors autograd saves in transformers'
    decoder layer, counted one by one for this model's adapters (tests/test_plan.py checks the
    count against saved-tensor hooks on a small model, to the byte). Per token and layer, with
    d bytes per element: RMSNorm fp32 inputs 2 x (4h + 4); SDPA q, k, v, output and log-sum-exp
    d(2h + 2h_kv) + 4a, the same for flash attention 2/3, whose kernels save the same tensors
    (counted, not hook-checked: that needs a GPU with flash-attn) (eager: 3dh + (4 + d)·a·s, the
    s x s probabilities); MLP d·3f; an adapter's r-dim intermediate d·r (once for siblings sharing
    one A: q/k/v, gate/up project together without dropout, unless ``siblings`` is False, as under
    ZeRO-3); the normed input d·h for q/k/v and for gate/up adapters; down's input d·f if adapted;
    with dropout a dropped copy and mask per adapter (``dropout_mask_bytes``: 1 on CUDA, whose fused
    dropout keeps a bool mask; d on CPU). The rotary cos/sin, 2·d·head_dim per position, are kept
    once. A bank tensor kept in fp32 while the layers run in 16 bit is cast once per forward of the model
    and autograd keeps that copy: d·r·(d_in or d_out) per bank key, independent of tokens (a layer
    recomputed under checkpointing casts its own, once for siblings sharing the A). The head keeps the final
    norm's fp32 input and fp32 log-probs (4V per token); while the loss runs, the logits and
    their fp32 copy, (d + 4)·V per token, are also live. With checkpointing (one segment per
    decoder layer, as transformers does) each layer keeps its input, d·h per token, and the
    layer being recomputed holds its full set. Not counted: allocator fragmentation, kernel
    workspaces, the backward's transient gradient buffers (a few d·h per token), ZeRO buckets.

    Other architectures (``formula="standard"``): Korthikanti et al. (2022) for 16-bit GPT
    blocks, s·b·h·(34 + 5·a·s/h) per layer, and 2·s·b·h per layer boundary with checkpointing.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {list(ATTENTIONS)}, got {attention!r}")
    config = model.config
    L, h, a, V = config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.vocab_size
    tokens, d = micro_batch * seq_len, dtype_bytes
    standard = L * tokens * (34 * h + 5 * a * seq_len)
    if getattr(config, "model_type", None) not in LLAMA_LIKE:
        per_layer = tokens * (34 * h + 5 * a * seq_len)
        return ActivationEstimate("standard", (per_layer,) * L, (0,) * L, 0, 0, 0, 0, 2 * tokens * h, standard)
    cfg = adapter_config(model)
    bank_cast = shared_mode == "replicated" and d != 4  # the replicated bank stays fp32
    layers: list[dict[str, _Adapted]] = [{} for _ in range(L)]
    for name, layer in adapter_layers(model):
        i = layer_index(name)
        if i is None or not 0 <= i < L:
            raise ValueError(f"adapter {name} is outside the decoder layers; activation_bytes cannot place it")
        layers[i][module_type(name)] = _Adapted(layer.r, layer.in_features, layer.out_features,
                                                bank_cast and layer.a_key is not None,
                                                bank_cast and layer.b_key is not None, layer.a_key, layer.b_key)
    per_layer, layer_casts, bank_casts, rotary_saved = [], [], {}, False
    for i, adapted in enumerate(layers):
        saved, casts, rope = _llama_layer(i == 0, adapted, config, d=d, dropout=cfg.dropout > 0,
                                          mask=dropout_mask_bytes, attention=attention, tokens=tokens,
                                          seq_len=seq_len, siblings=siblings, bank_casts=bank_casts)
        per_layer.append(saved)
        layer_casts.append(casts)
        rotary_saved |= rope
    head_dim = _layer_dims(config)[5]
    rotary = 2 * d * head_dim * seq_len if rotary_saved else 0  # position ids are shared by the batch
    # labels: int64, padded by one; the shifted view is copied when the batch has several rows
    labels = 8 * (seq_len + 1) if micro_batch == 1 else 8 * tokens
    head = tokens * (4 * h + 4 + 4 * V) + labels + 4
    return ActivationEstimate("llama", tuple(per_layer), tuple(layer_casts), sum(bank_casts.values()), rotary, head,
                              (d + 4) * V * tokens, d * h * tokens, standard)
