"""The Mamba language model (Mamba-1, Gu & Dao 2023), with recurrent decoding.

Shape legend: b batch, l sequence length, d model width, di inner width (expand * d),
n SSM state size, r dt rank, v (padded) vocabulary.

Official implementation: state-spaces/mamba, mamba_ssm/modules/mamba_simple.py (the mixer) and
mamba_ssm/models/mixer_seq_simple.py (the LM). Parameter names are theirs, so a pretrained
`pytorch_model.bin` loads by key. We deviate in two places, both numerically equivalent:
- the block is written as pre-norm `x = x + mixer(norm(x))` instead of upstream's fused
  "add, then norm" that carries the residual separately (the GPU training path,
  `MambaLM.hidden_states_fused`, does fuse them, in one Triton kernel);
- the decode cache keeps the SSM state in fp32 whatever the weights' dtype.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange

from minivlmamba.cpu_scan import CConv1dSilu
from minivlmamba.scan import resolve_backend, selective_scan, selective_state_update
from minivlmamba.weight_product import WeightProduct


@dataclass
class MambaConfig:
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_state: int = 16  # n
    expand: int = 2  # e
    d_conv: int = 4
    dt_rank: int = 0  # r; 0 means "auto": ceil(d_model / 16)
    pad_vocab_size_multiple: int = 8
    norm_eps: float = 1e-5
    embedding_std: float = 0.02  # upstream's init; a pretrained LM overwrites it
    scan_backend: str = "auto"

    def __post_init__(self):
        self.d_inner = self.expand * self.d_model
        self.dt_rank = self.dt_rank or math.ceil(self.d_model / 16)
        multiple = self.pad_vocab_size_multiple
        self.vocab_padded = (self.vocab_size + multiple - 1) // multiple * multiple


def causal_conv1d_silu(x, conv: nn.Conv1d, backend="auto"):
    """SiLU of the depthwise convolution of x (b, di, l) over time, causal: the conv pads d_conv - 1
    steps on both sides and we keep the first l outputs. -> (b, di, l).

    Where the scan runs in C (`backend` as the scan's), an fp32 input does too (cpu_scan.c): one
    pass each way instead of conv1d's, the slice's and the SiLU's (forward + backward at the tiny
    default's LM shape: 0.8 ms against 5-6).
    """
    if x.dtype == torch.float32 and resolve_backend(backend, x) == "c":
        bias = conv.bias if conv.bias is not None else x.new_zeros(x.shape[1])
        return CConv1dSilu.apply(x.transpose(1, 2), conv.weight[:, 0], bias).transpose(1, 2)
    return F.silu(conv(x)[..., :x.shape[-1]])


@torch.no_grad()
def init_dt(dt_proj_weight, dt_proj_bias):
    """Upstream's dt init: softplus(bias) is log-uniform in [1e-3, 1e-1], so each channel starts
    with its own time scale; the small weight then lets the input modulate it."""
    rank = dt_proj_weight.shape[-1]
    nn.init.uniform_(dt_proj_weight, -rank ** -0.5, rank ** -0.5)
    log_dt = torch.rand(dt_proj_bias.shape) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
    dt = torch.exp(log_dt).clamp(min=1e-4)
    dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32, returned in the weight's dtype (upstream: layer_norm.py).

    x * rsqrt(mean(x^2) + eps) * weight, as torch's `F.rms_norm`: one fused kernel on a GPU (forward
    and backward) instead of five passes over the fp32 residual stream, each saving a copy of it.
    """

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(self.weight.dtype)


@dataclass
class InferenceCache:
    """Everything Mamba remembers about the past: constant size, whatever the context length.

    conv_state (n_layer, b, di, d_conv): the last d_conv inputs of each causal convolution.
    ssm_state  (n_layer, b, di, n) fp32: the SSM state h of each layer.
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


class MambaMixer(nn.Module):
    """One Mamba layer: in_proj -> causal conv -> SiLU -> selective scan (gated by z) -> out_proj."""

    def __init__(self, cfg: MambaConfig, layer_idx: int):
        super().__init__()
        d, di, n, r = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.cfg, self.layer_idx = cfg, layer_idx
        self.in_proj = nn.Linear(d, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=False)

    def ssm_params(self, x):
        """From the conv output x (b, l, di) to the selective parameters delta (b, l, di), B, C (b, l, n)."""
        n, r = self.cfg.d_state, self.cfg.dt_rank
        dt, B, C = self.x_proj(x).split([r, n, n], dim=-1)
        delta = dt @ self.dt_proj.weight.t()  # (b, l, di); the bias goes into the scan as delta_bias
        return delta, B, C

    def forward(self, hidden, cache: InferenceCache | None = None):
        """hidden (b, l, d) -> (b, l, d). With a cache, also leaves the final conv and SSM states in it.

        On a GPU without a cache (training) this runs `forward_channels_first`, the same function
        laid out for the GPU; what follows is the readable version.
        """
        if cache is None and hidden.is_cuda:
            return self.forward_channels_first(hidden)
        l = hidden.shape[1]
        # Split along the channels, then transpose: the backward then joins the two gradients with a
        # plain concatenation, where unbinding a (2, b, di, l) view costs two transposing copies.
        x, z = (rearrange(t, "b l di -> b di l") for t in self.in_proj(hidden).chunk(2, dim=-1))  # (b, di, l) each
        if cache is not None:  # keep the last d_conv inputs, left-padded with zeros if l < d_conv
            cache.conv_state[self.layer_idx].copy_(F.pad(x, (self.cfg.d_conv - l, 0)))
        x = causal_conv1d_silu(x, self.conv1d, self.cfg.scan_backend)  # (b, di, l)
        delta, B, C = self.ssm_params(rearrange(x, "b di l -> b l di"))  # (b, l, di), (b, l, n), (b, l, n)
        y = selective_scan(x, rearrange(delta, "b l di -> b di l"), -torch.exp(self.A_log.float()),
                           rearrange(B, "b l n -> b n l"), rearrange(C, "b l n -> b n l"), self.D.float(), z=z,
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                           return_last_state=cache is not None, backend=self.cfg.scan_backend)
        if cache is not None:
            y, last_state = y
            cache.ssm_state[self.layer_idx].copy_(last_state)
        return self.out_proj(rearrange(y, "b di l -> b l di"))  # (b, l, d)

    def forward_channels_first(self, hidden, cache: InferenceCache | None = None, real=None):
        """The forward above, with every (di)-wide tensor kept channels first: (di, b * l), each
        channel's steps contiguous, one sequence after the other.

        The readable forward switches between (b, l, di) for the products and (b, di, l) for the
        convolution and the scan: each switch is a transposing copy (slow: one side of it is strided),
        five in the forward and as many in the backward. Here the products are plain matrix products
        on the channels-first layout (cuBLAS reads either operand transposed for free), the causal
        convolution + SiLU is one Triton kernel each way (triton_conv.py), and the scan reads
        (b, di, l) views (it takes any strides with contiguous steps), writes its output in u's layout
        and, at l a multiple of 16 (as MambaLM pads it), the gradients of u, delta and z in theirs. One
        copy is left: z's gradient into in_proj's (in the conv's backward). The products are
        `WeightProduct`s (weight_product.py): fp32 weights cast to bf16 once an optimizer step, fp32
        weight gradients that cuBLAS adds into `.grad` itself. Same parameters, same result
        (tests/test_training.py).
        With a cache (the prefill on GPUs), `real` says which steps are real, the rest padding at the
        end of each sequence (`MambaLM.hidden_states_fused` makes it): (steps, a 0-d tensor: the
        number of real steps; last (d_conv,) the last d_conv real steps; exists (d_conv,) 1 or 0 in the
        weights' dtype: 0 for the steps before the start, where the conv state is zero). The scan
        gives the padding steps delta = 0 (`selective_scan`'s steps): a decay of exp(0) = 1 and no
        input, so it carries the state after the last real step through them unchanged, and the cache
        gets that state. Tensors, not a length: one CUDA graph then replays prefills of any length
        (cuda_graphs.py).
        """
        from minivlmamba.triton_conv import causal_conv1d_silu  # here: Triton loads only when used
        b, l, d = hidden.shape
        di, n, r = self.cfg.d_inner, self.cfg.d_state, self.cfg.dt_rank
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.in_proj.weight.dtype
        hidden = hidden.to(dtype).reshape(b * l, d)  # (b*l, d)
        xz = WeightProduct.apply(self.in_proj.weight, hidden.t(), True)  # (2di, b*l)
        x, z = causal_conv1d_silu(xz.view(2, di, b, l), self.conv1d.weight[:, 0], self.conv1d.bias)  # (di, b, l) each
        dt, B, C = WeightProduct.apply(self.x_proj.weight, x.view(di, b * l), True).split([r, n, n])  # (r|n|n, b*l)
        delta = WeightProduct.apply(self.dt_proj.weight, dt, True)  # (di, b*l); its bias goes into the scan
        steps, last, exists = real if cache is not None else (None, None, None)
        seq = lambda t: t.view(-1, b, l).transpose(0, 1)  # (c, b*l) -> (b, c, l), a view
        y = selective_scan(seq(x), seq(delta), -torch.exp(self.A_log.float()), seq(B), seq(C),
                           self.D, z=seq(z), delta_bias=self.dt_proj.bias, delta_softplus=True,
                           return_last_state=cache is not None, steps=steps,
                           backend=self.cfg.scan_backend)  # (b, di, l)
        if cache is not None:
            y, last_state = y
            cache.ssm_state[self.layer_idx].copy_(last_state)
            window = xz[:di].view(di, b, l).index_select(2, last)  # (di, b, d_conv): the conv's last inputs
            torch.mul(window, exists, out=cache.conv_state[self.layer_idx].transpose(0, 1))
        y = y.transpose(0, 1).reshape(di, b * l)  # (di, b*l): a view where the scan kept u's layout
        return WeightProduct.apply(self.out_proj.weight, y.t(), False).view(b, l, d)  # (b, l, d)

    def step(self, hidden, cache: InferenceCache):
        """One token: hidden (b, d) -> (b, d), updating this layer's cache in place."""
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, di) each
        conv_state = cache.conv_state[self.layer_idx]  # (b, di, d_conv)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        x = (conv_state * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias  # (b, di)
        x = F.silu(x)
        delta, B, C = self.ssm_params(x)
        y = selective_state_update(cache.ssm_state[self.layer_idx], x, delta, -torch.exp(self.A_log.float()),
                                   B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                                   delta_softplus=True, backend=self.cfg.scan_backend)
        return self.out_proj(y)  # (b, d)


class Block(nn.Module):
    """Pre-norm residual block; the residual stream stays fp32 (upstream's residual_in_fp32)."""

    def __init__(self, cfg: MambaConfig, layer_idx: int):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = MambaMixer(cfg, layer_idx)

    def forward(self, x, cache=None):
        return x + self.mixer(self.norm(x), cache)  # fp32 + bf16 adds in fp32: no separate cast

    def forward_fused(self, out, residual, cache=None, real=None):
        """Upstream's cut of the same block, for training on GPUs (`MambaLM.hidden_states_fused`).

        Args: out (b, l, d), the previous block's output (the embeddings at the first block);
        residual (b*l, d) fp32, the stream it adds to (None at the first block); cache and real as
        for `MambaMixer.forward_channels_first`.
        Returns: this block's output (b, l, d) and the stream it will add to (b*l, d) fp32. The add and
        this block's RMSNorm are one Triton kernel each way (triton_norm.py).
        """
        from minivlmamba.triton_norm import add_rms_norm  # here: Triton loads only when used
        b, l, d = out.shape
        residual, normed = add_rms_norm(out.reshape(b * l, d), residual, self.norm.weight, self.norm.eps)
        return self.mixer.forward_channels_first(normed.view(b, l, d), cache, real), residual

    def step(self, x, cache):
        return x + self.mixer.step(self.norm(x), cache)


class MambaLM(nn.Module):
    """Embedding -> n_layer Mamba blocks -> final RMSNorm -> LM head tied to the embedding."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = nn.ModuleDict(dict(
            embedding=nn.Embedding(cfg.vocab_padded, cfg.d_model),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            norm_f=RMSNorm(cfg.d_model, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_padded, bias=False)
        self.lm_head.weight = self.backbone.embedding.weight
        self.gradient_checkpointing = False  # trade compute for memory in training (train.py --grad-checkpointing)
        self.reset_parameters()

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=None, device=None) -> "MambaLM":
        """A state-spaces or transformers Mamba checkpoint (a folder or a Hugging Face repo id): see pretrained.py."""
        from minivlmamba.pretrained import load_mamba  # here, as pretrained.py imports this module
        return load_mamba(path_or_repo_id, dtype=dtype, device=device)

    @torch.no_grad()
    def reset_parameters(self):
        """Upstream's init: small embeddings (cfg.embedding_std), dt log-uniform in [1e-3, 1e-1],
        out_proj scaled down."""
        cfg = self.cfg
        nn.init.normal_(self.backbone.embedding.weight, std=cfg.embedding_std)
        for block in self.backbone.layers:
            mixer = block.mixer
            init_dt(mixer.dt_proj.weight, mixer.dt_proj.bias)
            mixer.out_proj.weight /= math.sqrt(cfg.n_layer)

    def allocate_cache(self, batch_size, device=None, dtype=None) -> InferenceCache:
        cfg, w = self.cfg, self.backbone.embedding.weight
        device, dtype = device or w.device, dtype or w.dtype
        return InferenceCache(
            conv_state=torch.zeros(cfg.n_layer, batch_size, cfg.d_inner, cfg.d_conv, device=device, dtype=dtype),
            ssm_state=torch.zeros(cfg.n_layer, batch_size, cfg.d_inner, cfg.d_state, device=device),
        )

    def hidden_states(self, inputs_embeds, cache: InferenceCache | None = None, fused=True):
        """inputs_embeds (b, l, d) -> final normalised hidden states (b, l, d), before the LM head.

        With a cache this is the prefill: it also leaves every layer's state in the cache. On a GPU
        this runs `hidden_states_fused`, the same function in fewer kernels (training, and the
        prefill); fused=False runs the readable loop below there too, the twin the tests compare with.
        """
        x = inputs_embeds.float()  # (b, l, d): the residual stream
        if fused and x.is_cuda:
            return self.hidden_states_fused(x, cache)
        for block in self.backbone.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)  # recomputed in backward
            else:
                x = block(x, cache)
        return self.backbone.norm_f(x)

    def hidden_states_fused(self, x, cache: InferenceCache | None = None, steps=None):
        """The loop of `hidden_states` for GPUs: x (b, l, d) fp32 -> (b, l, d) in the mixers' output
        dtype (bf16 under autocast: the LM head's input); with a cache, the prefill, of which only the
        first `steps` steps are real (a 0-d long tensor on x's device; all l by default): the cache
        gets the states after them, whatever the padding after them holds (cuda_graphs.py's prefill
        graph pads every prompt to the length it was captured at).

        The same blocks cut where upstream cuts them (`Block.forward_fused`): each takes the previous
        block's output and the residual stream, so that the residual add and the next RMSNorm are one
        Triton kernel each way (triton_norm.py); the mixers run channels first. Gradient checkpointing
        keeps both at each block (6 bytes an element instead of 4). The channels-first mixers multiply
        (di, b * l) matrices: cuBLAS's fast kernels and the scan's vector loads need rows that start
        16-byte aligned (at an odd b * l the products ran 4x slower). So each sequence is padded at its
        end to a multiple of 16 steps; every layer is causal or per step, so the padding changes no
        real step and receives no gradient, and the scans carry the cache's states through it unchanged.
        """
        from minivlmamba.triton_norm import add_rms_norm  # here: Triton loads only when used
        b, l, d = x.shape
        lp = l + -l % 16
        out, residual = F.pad(x, (0, 0, 0, lp - l)), None  # (b, lp, d): the embeddings come in as an "output"
        real = None
        if cache is not None:  # which steps are real, once for every layer (MambaMixer.forward_channels_first)
            steps = torch.tensor(l, device=x.device) if steps is None else steps
            last = steps - self.cfg.d_conv + torch.arange(self.cfg.d_conv, device=x.device)  # (d_conv,)
            real = (steps, last.clamp(min=0), (last >= 0).to(self.backbone.embedding.weight.dtype))
        for block in self.backbone.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                out, residual = torch.utils.checkpoint.checkpoint(block.forward_fused, out, residual,
                                                                  use_reentrant=False)
            else:
                out, residual = block.forward_fused(out, residual, cache, real)
        norm = self.backbone.norm_f
        _, normed = add_rms_norm(out.reshape(b * lp, d), residual, norm.weight, norm.eps)  # (b*lp, d)
        return normed.view(b, lp, d)[:, :l]

    def forward(self, input_ids=None, inputs_embeds=None, cache: InferenceCache | None = None):
        """input_ids (b, l) or inputs_embeds (b, l, d) -> logits (b, l, v)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.backbone.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        return self.lm_head(self.hidden_states(x, cache))

    def step(self, input_ids, cache: InferenceCache):
        """One token per sequence: input_ids (b,) -> logits (b, v). O(1) in the context length."""
        x = self.backbone.embedding(input_ids).float()  # (b, d)
        for block in self.backbone.layers:
            x = block.step(x, cache)
        return self.lm_head(self.backbone.norm_f(x))
