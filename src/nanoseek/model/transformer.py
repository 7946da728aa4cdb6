"""The decoder-only Transformer: embed -> N blocks -> norm -> head.

Pre-norm block (GPT-2, Llama, DeepSeek):
    h = h + Dropout(Attn(Norm1(h)));   h = h + Dropout(FFN(Norm2(h)))
Post-norm block (the original Transformer):
    h = Norm1(h + Dropout(Attn(h)));   h = Norm2(h + Dropout(FFN(h)))
Input:  h_0 = E[token] * (sqrt(d) if embedding_scale) + PE[pos]   (additive positions only)
Output: logits = Norm(h_N) W_head^T   (W_head = E when the head is tied)

Every swappable part is chosen by name through the registries of its module. The model knows
nothing of training; `forward` takes optional targets and returns the loss with the logits, and a
training forward also returns what its layers report (model/side_outputs.py): the MoE balance and
indexer losses in `aux`, each MoE layer's expert load in `expert_load`, which the trainer hands
back to `update_balance_bias` after the optimizer step.

    >>> model = Transformer(ModelConfig.from_preset("gpt2-tiny"))
    >>> model(torch.zeros(1, 4, dtype=torch.long)).logits.shape
    torch.Size([1, 4, 128])
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.config import ModelConfig
from nanoseek.model.attention.compressed import CompressedAttention
from nanoseek.model.attention.mha import MultiHeadAttention
from nanoseek.model.attention.mla import MultiHeadLatentAttention
from nanoseek.model.attention.nsa import NativeSparseAttention
from nanoseek.model.ffn import make_dense_ffn
from nanoseek.model.fusion import BLOCK_FUSIONS, STREAM_FUSIONS, ScalarMix, StreamHead
from nanoseek.model.loss import linear_cross_entropy
from nanoseek.model.moe import MoE
from nanoseek.model.mtp import MTPModule
from nanoseek.model.norm import make_norm
from nanoseek.model.position import ADDITIVE_POSITIONS, DISTANCE_BIASES, DistanceBias, RotaryEmbedding
from nanoseek.model.side_outputs import SideOutputs

# checkpoint format -> writer(model, directory, tokenizer_dir), installed by nanoseek.io
CHECKPOINT_WRITERS: dict[str, Callable] = {}

# The fast paths, installed by nanoseek.kernels and used when config.kernels (see kernels/__init__.py):
# a reference module class -> its fast subclass (same parameters, state dict and values), swapped in
KERNEL_MODULES: dict[type, type] = {}
# "linear_cross_entropy": (h, head weight, targets) -> mean loss, the fused head + loss;
# "training_forward": () -> the context manager the eager training forward runs in
KERNEL_FUNCTIONS: dict[str, Callable] = {}

ATTENTIONS = {
    "mha": MultiHeadAttention,
    "gqa": MultiHeadAttention,
    "mqa": MultiHeadAttention,
    "mla": MultiHeadLatentAttention,
    "v4": CompressedAttention,
}


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    aux: dict = field(default_factory=dict)  # extra scalar losses (training): mtp_loss, balance_loss, index_loss
    hidden: torch.Tensor | None = None
    # (n_moe_layers, E) token copies each routed expert received, in `moe_layers()` order (training forwards)
    expert_load: torch.Tensor | None = None


def positions(start: int | torch.Tensor, length: int, device) -> torch.Tensor:
    """Positions start..start+length-1 (T,), or per row (B, T) when `start` is a tensor (B,)."""
    if isinstance(start, torch.Tensor):
        return start[:, None] + torch.arange(length, device=device)
    return torch.arange(start, start + length, device=device)


def swap_kernels(model: nn.Module, on: bool) -> None:
    """Give every module that has a fast path in KERNEL_MODULES its fast class (on) or its reference
    class (off); parameters, buffers and the state dict stay."""
    table = KERNEL_MODULES if on else {fast: ref for ref, fast in KERNEL_MODULES.items()}
    for module in model.modules():
        if type(module) in table:
            module.__class__ = table[type(module)]


def make_attention(config: ModelConfig, layer: int) -> nn.Module:
    if config.layer_sparse(layer) == "nsa":
        return NativeSparseAttention(config, layer)
    return ATTENTIONS[config.attention](config, layer)


def make_ffn(config: ModelConfig, layer: int) -> nn.Module:
    if config.is_moe_layer(layer):
        return MoE(config, hash_routing=layer - config.first_k_dense_replace < config.num_hash_layers)
    kind = "swiglu" if config.ffn == "moe" else config.ffn  # the dense layers of an MoE model
    return make_dense_ffn(kind, config.hidden_size, config.intermediate_size, config.mlp_bias)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, streams: bool = False):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.input_layernorm = make_norm(config.norm, config.hidden_size, config.rms_norm_eps)
        self.self_attn = make_attention(config, layer)
        self.post_attention_layernorm = make_norm(config.norm, config.hidden_size, config.rms_norm_eps)
        self.mlp = make_ffn(config, layer)
        self.dropout = nn.Dropout(config.hidden_dropout)
        if streams:  # hyper-connections / mHC wrap each sublayer (V4 names: attn_hc, ffn_hc)
            self.attn_hc = STREAM_FUSIONS[config.fusion](config, 2 * layer)
            self.ffn_hc = STREAM_FUSIONS[config.fusion](config, 2 * layer + 1)

    def attn(self, x: torch.Tensor, rope, cache, start, side: SideOutputs | None) -> torch.Tensor:
        """The attention; one with a lightning indexer (DSA, CSA) also gets `side`, for its loss."""
        if getattr(self.self_attn, "indexed", False):
            return self.self_attn(x, rope, cache, start, side)
        return self.self_attn(x, rope, cache, start)

    def ffn(self, x: torch.Tensor, token_ids: torch.Tensor | None, side: SideOutputs | None) -> torch.Tensor:
        """The feed-forward; an MoE layer also gets the token ids (hash routing chooses by them) and
        `side`, for its load and balance loss."""
        return self.mlp(x, token_ids, side) if isinstance(self.mlp, MoE) else self.mlp(x)

    def forward_streams(
        self,
        streams: torch.Tensor,
        rope=None,
        cache=None,
        start: int = 0,
        token_ids: torch.Tensor | None = None,
        side: SideOutputs | None = None,
    ) -> torch.Tensor:
        """(B, T, n, D) -> (B, T, n, D): each sublayer reads and writes the n residual streams."""
        streams = self.attn_hc(
            streams, lambda x: self.dropout(self.attn(self.input_layernorm(x), rope, cache, start, side))
        )
        return self.ffn_hc(streams, lambda x: self.dropout(self.ffn(self.post_attention_layernorm(x), token_ids, side)))

    def forward(
        self,
        h: torch.Tensor,
        rope=None,
        cache=None,
        start: int = 0,
        token_ids: torch.Tensor | None = None,
        side: SideOutputs | None = None,
    ) -> torch.Tensor:
        """h (B, T, D) -> (B, T, D); `side` (training) collects what the sublayers report."""
        if self.pre_norm:
            h = h + self.dropout(self.attn(self.input_layernorm(h), rope, cache, start, side))
            return h + self.dropout(self.ffn(self.post_attention_layernorm(h), token_ids, side))
        h = self.input_layernorm(h + self.dropout(self.attn(h, rope, cache, start, side)))
        return self.post_attention_layernorm(h + self.dropout(self.ffn(h, token_ids, side)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.architecture != "decoder":
            raise ValueError(
                f"Transformer is the decoder-only model; architecture={config.architecture!r} is "
                "model.encoder_decoder.EncoderDecoder (model.make_model builds either)"
            )
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.pos_embed = ADDITIVE_POSITIONS[config.position](config) if config.position in ADDITIVE_POSITIONS else None
        # V4 attention rotates with its own tables (two bases, positions up to 1M): no shared table
        self.rotary = RotaryEmbedding(config) if config.position == "rope" and config.attention != "v4" else None
        # ALiBi / T5 bias: one module for all layers (T5 shares its table across layers), passed where
        # the rotary tables would go
        self.position_bias = DISTANCE_BIASES[config.position](config) if config.position in DISTANCE_BIASES else None
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        n_layers = config.num_hidden_layers
        streams = config.fusion in STREAM_FUSIONS
        self.layers = nn.ModuleList(Block(config, i, streams) for i in range(n_layers))
        self.fusions = (
            nn.ModuleList(BLOCK_FUSIONS[config.fusion](config, i) for i in range(n_layers))
            if config.fusion in BLOCK_FUSIONS
            else None
        )
        self.stream_head = StreamHead(config) if streams else None
        self.scalar_mix = ScalarMix(config)
        self.mtp = nn.ModuleList(MTPModule(config, n_layers + k, Block) for k in range(config.num_nextn_predict_layers))
        self.norm = make_norm(config.norm, d, config.rms_norm_eps) if config.final_norm else nn.Identity()
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.embed_scale = math.sqrt(d) if config.embedding_scale else 1.0
        # training modes, set like train(): recompute each block in backward (the trainer sets it from
        # dist.activation_checkpointing); DSA warm-up (set_dsa_warmup)
        self.gradient_checkpointing = False
        self.dsa_warmup, self.dsa_freeze_model = False, True
        self.set_kernels(config.kernels)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self):
        """N(0, initializer_range) everywhere; output projections scaled by 1/sqrt(2 * layers)."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers) if self.config.depth_scaled_init else std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_output = name.endswith(("o_proj", "o_b_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, out_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                emb_std = self.config.hidden_size**-0.5 if self.config.embedding_scale else std
                nn.init.normal_(module.weight, 0.0, emb_std)
        if self.pos_embed is not None and hasattr(self.pos_embed, "weight"):
            nn.init.normal_(self.pos_embed.weight, 0.0, std)
        for module in self.modules():
            if hasattr(module, "reset_extra_parameters"):
                module.reset_extra_parameters(std, out_std)

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.embed_scale != 1.0:
            h = h * self.embed_scale
        if self.pos_embed is not None:
            h = h + self.pos_embed(positions(start, input_ids.shape[1], input_ids.device))
        return self.embed_dropout(h)

    def rope(self, start: int | torch.Tensor, length: int, device):
        """What the attention layers get for positions: RoPE's (cos, sin), a `DistanceBias`, or None."""
        if self.position_bias is not None:
            return self.position_bias
        if self.rotary is None:
            return None
        return self.rotary(positions(start, length, device))

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: list | None = None,
        start: int | torch.Tensor = 0,
        last_only: bool = False,
        return_logits: bool = True,
        label_smoothing: float = 0.0,
    ) -> ModelOutput:
        """input_ids (B, T) at positions start..start+T-1 -> logits (B, T, V) (or (B, 1, V)).

        `start` may be a LongTensor (B,) of per-row positions for a one-token decode step against
        a cache (continuous batching); the caller keeps those positions inside the context.
        With `targets` and `return_logits=False` (what the trainer asks for) `logits` is None and
        the head and the loss run together (`head_loss`; with kernels, fused in chunks: the
        (B, T, V) logits and their gradient are never held whole).
        In training the output also carries the layers' side outputs: with targets, their losses in
        `aux` (for the trainer to add to `loss`), and always the MoE layers' `expert_load`.
        `label_smoothing` > 0 smooths the main loss's targets (model/loss.py).
        """
        if isinstance(start, torch.Tensor):
            if cache is None or input_ids.shape[1] != 1:
                raise ValueError("per-row positions need a cache and one token per row")
        else:
            self._check_length(start + input_ids.shape[1])
        eager_training = self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        context = self.kernel_function("training_forward") if eager_training else None
        with context() if context is not None else contextlib.nullcontext():
            return self._forward(input_ids, targets, cache, start, last_only, return_logits, label_smoothing)

    def set_kernels(self, on: bool) -> None:
        """Run the fast paths nanoseek.kernels installed (on) or the plain reference (off). Only the
        classes of the swapped modules change: parameters, buffers and the state dict stay."""
        swap_kernels(self, on)
        self.kernels = on

    def kernel_function(self, name: str) -> Callable | None:
        return KERNEL_FUNCTIONS.get(name) if self.kernels else None

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean cross-entropy of the head's logits h W^T against targets (model/loss.py); the fused kernel
        where it applies (no label smoothing)."""
        fused = self.kernel_function("linear_cross_entropy") if not label_smoothing else None
        if fused is not None:
            return fused(h, self.lm_head.weight, targets)
        return linear_cross_entropy(h, self.lm_head.weight, targets, label_smoothing=label_smoothing)

    def _forward(
        self, input_ids, targets, cache, start, last_only: bool, return_logits: bool, label_smoothing: float = 0.0
    ) -> ModelOutput:
        side = SideOutputs() if self.training else None
        h = self.embed(input_ids, start)
        rope = self.rope(start, input_ids.shape[1], input_ids.device)
        h = self.run_layers(h, rope, cache, start, token_ids=input_ids, side=side)
        hidden = h
        h = self.norm(h)
        if last_only:
            h = h[:, -1:]
        fused = targets is not None and not return_logits
        logits = None if fused else self.lm_head(h)
        loss, aux = None, {}
        if targets is not None:
            if fused:
                loss = self.head_loss(h, targets, label_smoothing)
            else:
                loss = F.cross_entropy(
                    logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, label_smoothing=label_smoothing
                )
            if len(self.mtp):
                aux["mtp_loss"] = self.mtp_loss(hidden, targets, rope, side)
            if side is not None:
                loss, aux = self.side_losses(loss, aux, side)
        return ModelOutput(logits=logits, loss=loss, aux=aux, hidden=hidden, expert_load=self.stack_expert_load(side))

    def side_losses(self, loss: torch.Tensor, aux: dict, side: SideOutputs) -> tuple[torch.Tensor, dict]:
        """The layers' losses into aux: `balance_loss` summed over the MoE layers, `index_loss` averaged
        over the indexed layers. In DSA warm-up (freezing the model) only the index loss trains."""
        if side.balance_losses:
            aux["balance_loss"] = torch.stack(side.balance_losses).sum()
        if side.index_losses:
            aux["index_loss"] = torch.stack(side.index_losses).mean()
            if self.dsa_warmup and self.dsa_freeze_model:
                loss = loss.detach()
                aux = {k: (v.detach() if k != "index_loss" else v) for k, v in aux.items()}
        return loss, aux

    def stack_expert_load(self, side: SideOutputs | None) -> torch.Tensor | None:
        """(n_moe_layers, E) token counts of one forward, one row per `moe_layers()` entry. The MTP
        blocks come last and run only with targets inside the sequence: rows of those that did not run
        are zero (their router bias is then left alone)."""
        n_moe = len(self.moe_layers())
        if side is None or not n_moe:
            return None
        missing = n_moe - len(side.expert_loads)
        zeros = [torch.zeros(self.config.n_routed_experts, dtype=torch.long, device=self.lm_head.weight.device)]
        return torch.stack(side.expert_loads + zeros * missing)

    def run_layers(
        self,
        h: torch.Tensor,
        rope,
        cache,
        start: int,
        outputs: list | None = None,
        token_ids: torch.Tensor | None = None,
        side: SideOutputs | None = None,
    ) -> torch.Tensor:
        """The block stack under the configured fusion; appends X_0..X_L to `outputs` if given.
        `token_ids` (B, T): the tokens of h, for the hash-routed MoE layers (V4); `side` (training):
        where the layers report their side outputs."""
        record = outputs if outputs is not None else []
        record.append(h)
        if self.stream_head is not None:
            streams = h[:, :, None].expand(-1, -1, self.config.hc_mult, -1).contiguous()
            for i, layer in enumerate(self.layers):
                streams = self.call_block(
                    layer.forward_streams, streams, rope, None if cache is None else cache[i], start, token_ids, side
                )
                if outputs is not None:
                    outputs.append(self.stream_head(streams))
            return self.stream_head(streams)
        for i, layer in enumerate(self.layers):
            h = self.call_block(layer, h, rope, None if cache is None else cache[i], start, token_ids, side)
            if self.fusions is not None:
                record.append(h)
                h = self.fusions[i](record)
            elif outputs is not None:
                outputs.append(h)
        return h

    def call_block(self, fn, x, rope, cache, start, token_ids=None, side=None):
        """fn(x, ...), with its activations recomputed in backward when gradient_checkpointing is on
        (the side outputs come from the forward; the recomputation's go to the same, already read, `side`)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, x, rope, cache, start, token_ids, side, use_reentrant=False)
        return fn(x, rope, cache, start, token_ids, side)

    def layer_outputs(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """X_0 (embeddings) and every block's output, for embeddings and fusion inspection."""
        outputs: list[torch.Tensor] = []
        self.run_layers(
            self.embed(input_ids),
            self.rope(0, input_ids.shape[1], input_ids.device),
            None,
            0,
            outputs,
            token_ids=input_ids,
        )
        return outputs

    def mtp_loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, rope, side: SideOutputs | None = None
    ) -> torch.Tensor:
        """(lambda / D) sum_k CE of module k predicting t_{i+1+k} from h^{k-1}_i and t_{i+k}."""
        depth, total = len(self.mtp), 0.0
        h = hidden
        for k, module in enumerate(self.mtp, start=1):
            t = targets.shape[1] - k
            if t < 1:
                break
            # targets[:, i] = t_{i+1}, so t_{i+k} = targets[:, i+k-1] and t_{i+1+k} = targets[:, i+k]
            emb_next = self.embed_tokens(targets[:, k - 1 : k - 1 + t].clamp(min=0)) * self.embed_scale
            rope_k = rope if rope is None or isinstance(rope, DistanceBias) else (rope[0][:t], rope[1][:t])
            h, normed = module(h[:, :t], emb_next, rope_k, side=side)
            total = total + self.head_loss(normed, targets[:, k : k + t])
        return self.config.mtp_loss_weight / depth * total

    def dsa_layers(self) -> list[nn.Module]:
        """Attention modules with a lightning indexer (DSA, V4 CSA; MTP blocks included), block by block
        (see `moe_layers`)."""
        return [b.self_attn for b in self.blocks() if getattr(b.self_attn, "indexed", False)]

    def blocks(self) -> list[Block]:
        """The transformer blocks, then the MTP modules' blocks."""
        return list(self.layers) + [m.block for m in self.mtp]

    def set_dsa_warmup(self, on: bool, freeze_model: bool = True) -> None:
        """DSA warm-up, a training phase switched like train(): every indexed layer attends densely and
        the indexers learn from it; only they learn (V3.2's recipe, from a trained dense model: the
        forward detaches every other loss), or, with `freeze_model=False` (training from scratch), the
        whole model trains densely beside them."""
        self.dsa_warmup, self.dsa_freeze_model = on, freeze_model
        for attn in self.dsa_layers():
            attn.dsa_warmup = on

    def moe_layers(self) -> list[MoE]:
        """The MoE feed-forwards of the blocks and the MTP blocks, in order (the rows of `expert_load`)."""
        return [b.mlp for b in self.blocks() if isinstance(b.mlp, MoE)]

    def update_balance_bias(self, expert_load: torch.Tensor | None, update: bool = True) -> dict:
        """Auxiliary-loss-free balancing, called by the trainer after the optimizer step: nudge each MoE
        router bias by its row of `expert_load` (n_moe_layers, E), the forwards' `expert_load` summed
        over the step's micro-batches and ranks; return load statistics ({} for None: no MoE).

        `update=False` (DSA warm-up, when only the indexers train) only reads the load."""
        if expert_load is None:
            return {}
        stats = [m.update_balance_bias(load_E, update) for m, load_E in zip(self.moe_layers(), expert_load)]
        stats = [s for s in stats if s]
        if not stats:
            return {}
        return {
            "moe_max_over_mean": sum(s["max_over_mean"] for s in stats) / len(stats),
            "moe_load": [[round(x, 4) for x in s["load"]] for s in stats],
        }

    def _check_length(self, end: int):
        limit = self.config.max_position_embeddings
        if end > limit:
            raise ValueError(f"sequence of {end} positions exceeds max_position_embeddings={limit}")

    def make_cache(self, batch: int, max_len: int | None = None, dtype=None, device=None) -> list:
        """One static cache per layer, for `max_len` positions (default: the whole context)."""
        max_len = max_len or self.config.max_position_embeddings
        param = next(self.parameters())
        dtype = dtype or param.dtype
        device = device or param.device
        return [layer.self_attn.make_cache(batch, max_len, dtype, device) for layer in self.layers]

    def save_pretrained(self, directory, format: str = "nanoseek", tokenizer_dir=None, **options):
        """Write a checkpoint folder: format="nanoseek" (native) or "hf" (transformers-loadable; option
        `drop_mtp=True` leaves the MTP layers out).

        A convenience over `nanoseek.io.save_model`, whose import installs the writers."""
        if format not in CHECKPOINT_WRITERS:
            raise ValueError(f"format={format!r}; choose 'nanoseek' or 'hf' (import nanoseek.io)")
        return CHECKPOINT_WRITERS[format](self, directory, tokenizer_dir, **options)

    # ------------------------------------------------------------------ estimators
    def num_params(self) -> dict:
        return count_params(self)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return flops_per_token(self.config, self.num_params()["matmul_active"], seq_len)


# ---------------------------------------------------------------------------- estimators


def _unique_numel(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _inactive(module: nn.Module) -> int:
    return sum(m.inactive_params() for m in module.modules() if isinstance(m, MoE))


def count_params(model: Transformer) -> dict:
    """Parameters of the main model (MTP modules counted apart, as DeepSeek publishes them).

    `active` = the parameters one token uses: all of them but the routed experts it is not sent to
    (a dense model: `total`). `active_non_embedding` also leaves out the input embedding tables (a
    lookup, not compute), as DeepSeek counts its "37B activated". `matmul_active` is
    `active_non_embedding` plus a tied head (the weights of the token's matmuls, for FLOPs).
    """
    mtp = _unique_numel(model.mtp.parameters())
    total = _unique_numel(model.parameters()) - mtp
    used = total - (_inactive(model) - _inactive(model.mtp))
    return param_counts(model, total, used, mtp, mtp - _inactive(model.mtp))


def param_counts(model: nn.Module, total: int, active: int, mtp: int = 0, mtp_active: int = 0) -> dict:
    """`count_params`' dictionary from its totals: the input lookups (token and learned position
    tables) come off `active` for `active_non_embedding`, and a tied head goes back on for
    `matmul_active` (a model with `embed_tokens`, `pos_embed` and `lm_head`)."""
    lookup = model.embed_tokens.weight.numel()
    if model.pos_embed is not None and hasattr(model.pos_embed, "weight"):
        lookup += model.pos_embed.weight.numel()
    head = model.lm_head.weight.numel() if model.config.tie_word_embeddings else 0
    return {
        "total": total,
        "active": active,
        "active_non_embedding": active - lookup,
        "matmul_active": active - lookup + head,
        "mtp": mtp,
        "mtp_active": mtp_active,
    }


def attention_dims(config: ModelConfig) -> tuple[int, int]:
    """(query/key dim, value dim) per head."""
    if config.attention == "mla":
        return config.qk_head_dim, config.v_head_dim
    return config.attn_head_dim, config.attn_head_dim


def flops_per_token(config: ModelConfig, matmul_params: int, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 6 L H (d_qk + d_v) T, as nanoGPT/PaLM."""
    t = seq_len or config.max_position_embeddings
    d_qk, d_v = attention_dims(config)
    attn = 6 * config.num_hidden_layers * config.num_attention_heads * (d_qk + d_v) * t
    return float(6 * matmul_params + attn)


def kv_cache_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """Bytes the KV cache holds per token over all layers (default bf16)."""
    if config.attention == "v4":  # what CompressedKVCache holds: key, compressor inputs, entries
        return round(
            sum(v4_cache_width(config, config.layer_sparse(i)) for i in range(config.num_hidden_layers)) * dtype_bytes
        )
    if config.attention == "mla":  # latent + RoPE key; a DSA layer also its indexer's key
        per_layer = config.kv_lora_rank + config.qk_rope_head_dim
        indexed = sum(config.layer_sparse(i) == "dsa" for i in range(config.num_hidden_layers))
        return (config.num_hidden_layers * per_layer + indexed * config.index_head_dim) * dtype_bytes
    dense = 2 * config.n_kv_heads * config.attn_head_dim
    # NSA: a K/V pair per branch, and the compressed branch's block summaries (one per nsa_block tokens)
    nsa = dense * (3 + 1 / config.nsa_block)
    return round(
        sum(nsa if config.layer_sparse(i) == "nsa" else dense for i in range(config.num_hidden_layers)) * dtype_bytes
    )


def v4_cache_width(config: ModelConfig, kind: str) -> float:
    """Numbers a V4 layer caches per token: its key (= value); for CSA/HCA also the compressor's raw
    kv and gate projections (kept for every token so any row can pool the window it closes) and
    1/m of a pooled entry; CSA adds the same for its indexer."""
    hd = config.attn_head_dim
    if kind not in ("csa", "hca"):
        return hd
    rate = config.compress_rate_csa if kind == "csa" else config.compress_rate_hca
    width = 2 * hd if kind == "csa" else hd
    total = hd + 2 * width + hd / rate
    if kind == "csa":
        total += 2 * 2 * config.index_head_dim + config.index_head_dim / rate
    return total


def model_info(config: ModelConfig, seq_len: int | None = None) -> dict:
    """The figures `nanoseek info` prints, computed on the meta device (no memory for weights)."""
    with torch.device("meta"):
        model = Transformer(config)
    params = count_params(model)
    return {
        "params_total": params["total"],
        "params_active": params["active"],
        "params_active_non_embedding": params["active_non_embedding"],
        "params_mtp": params["mtp"],
        "params_mtp_active": params["mtp_active"],
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config),
        "kv_cache_dtype": "bfloat16",
        "flops_per_token": flops_per_token(config, params["matmul_active"], seq_len),
        "flops_seq_len": seq_len or config.max_position_embeddings,
    }
