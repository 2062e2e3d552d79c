"""VL-Mamba: vision tower -> multimodal connector -> Mamba LM (Qiao et al. 2024, figure 1).

Shape legend: b batch, p image patches, l text length, d LM width, v (padded) vocabulary.

The visual tokens are placed before the text embeddings and the whole sequence goes through the
Mamba LM: R = f_L(MMC(f_V(I)), f_T(Q)) (paper equation 5). Because Mamba is recurrent, generation
reads the image and the prompt once (the prefill) and then carries a constant-size state: each new
token costs the same, however long the conversation.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivlmamba.config import VLMConfig
from minivlmamba.connector import Connector
from minivlmamba.mamba import InferenceCache, MambaLM
from minivlmamba.templates import IGNORE
from minivlmamba.vision import VisionTower

EOT_ID = 0  # <|endoftext|>: the end of every answer and the stop token
PEAK_BF16_FLOPS = {"H100 80GB HBM3": 989e12, "H200": 989e12, "A100": 312e12}  # dense, datasheets (no sparsity)


def peak_bf16_flops(card):
    """The dense bf16 FLOP/s of a GPU by its name (torch.cuda.get_device_name()), for MFU; None if unknown
    (the H100 PCIe and NVL, for one, have lower peaks than the SXM card named here)."""
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in card), None)


class VLMamba(nn.Module):
    def __init__(self, cfg: VLMConfig, vision: VisionTower | None = None, lm: MambaLM | None = None):
        """Random weights, or the pretrained vision tower and LM given (the connector always starts fresh)."""
        super().__init__()
        self.cfg = cfg
        self.vision = vision if vision is not None else VisionTower(cfg.vision)
        self.connector = Connector(cfg.connector, cfg.vision.width, cfg.lm.d_model, cfg.vision.grid, cfg.scan,
                                   cfg.vss_d_state, cfg.vss_expand, cfg.lm.scan_backend)
        self.lm = lm if lm is not None else MambaLM(cfg.lm)
        self.decoders = {}  # CUDA-graph decode steps by (batch size, device, dtype), captured on first use
        self.prefills = {}  # CUDA-graph prefills by (image shape and dtype, padded length, device, dtype), likewise

    def embed(self, pixel_values, input_ids):
        """pixel_values (b, 3, H, W), input_ids (b, l) -> inputs_embeds (b, p + l, d): image first."""
        image = self.connector(self.vision(pixel_values))  # (b, p, d)
        text = self.lm.backbone.embedding(input_ids)  # (b, l, d)
        return torch.cat([image.to(text.dtype), text], dim=1)

    def forward(self, pixel_values, input_ids, labels=None):
        """Without labels -> (logits (b, l, v) for the text positions, None); with labels (b, l) ->
        (logits (m, v) for the m labelled positions in order, their mean loss).

        logits[:, i] predicts input_ids[:, i], so the first text token is predicted by the last
        image token: we never compute (or pay for) logits on the other image positions, and in
        training not on the unlabelled text either (the questions: 4-5 of every 5 text tokens in the
        tiny default, whose head and log-softmax were 7% of a CPU step).
        """
        p = self.cfg.vision.num_patches
        hidden = self.lm.hidden_states(self.embed(pixel_values, input_ids))[:, p - 1:-1]  # (b, l, d)
        if labels is None:
            return self.lm.lm_head(hidden), None
        labelled = labels != IGNORE  # (b, l)
        logits = self.lm.lm_head(hidden[labelled])  # (m, v)
        return logits, F.cross_entropy(logits.float(), labels[labelled])

    def shard(self, mesh):
        """Fully sharded data parallel (PyTorch's FSDP2) over mesh: each process stores 1/world of every
        weight, gradient and AdamW state. A unit's weights are gathered just before its forward (and
        again for its backward) and dropped after it; its gradients are summed and scattered back into
        shards. Units: each LM block, the tower, and the rest (embedding, final norm, connector). The
        same module object stays, its parameters now shards (DTensors)."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # here: loaded only for FSDP
        for unit in (*self.lm.backbone.layers, self.vision):
            fully_shard(unit, mesh=mesh)
        for block in self.lm.backbone.layers:  # the GPU training path calls this instead of forward
            register_fsdp_forward_method(block, "forward_fused")
        fully_shard(self, mesh=mesh)

    def training_flops(self, text_tokens, labelled_tokens):
        """Model FLOPs of one training sample, for MFU: each weight counts once per token it
        multiplies, 6 times (forward 2, backward 4) for the connector and LM, 2 (forward only) for the
        vision tower, taken as frozen. The LM body reads image and text tokens, the LM head (the tied
        embedding) only the labelled text positions (see `forward`), the connector and the tower only
        the image. The scans and the tower's attention scores are not weight products and are left
        out (the norms', convolutions' and SSM's own parameters, under 0.5% of the count, are counted
        as if they were)."""
        count = lambda module: sum(p.numel() for p in module.parameters())  # tied weights counted once
        image, head = self.cfg.vision.num_patches, self.lm.lm_head.weight.numel()
        return (6 * (count(self.lm) - head) * (image + text_tokens) + 6 * head * labelled_tokens
                + 6 * count(self.connector) * image + 2 * count(self.vision) * image)

    @torch.inference_mode()
    def prefill(self, pixel_values, input_ids, cache: InferenceCache, cuda_graph=True):
        """Read the image and the prompt into a fresh cache; returns the next-token logits (b, v).

        On CUDA (unless cuda_graph is False) a replay of the whole prefill captured as one CUDA graph
        (cuda_graphs.py), one per image shape and per 16 steps of length: prompts up to that length
        share it, so a chat captures a few. Without it the LM still runs fused on CUDA.
        """
        if not (cuda_graph and pixel_values.is_cuda):
            hidden = self.lm.hidden_states(self.embed(pixel_values, input_ids), cache)  # (b, p + l, d)
            return self.lm.lm_head(hidden[:, -1])
        from minivlmamba.cuda_graphs import CudaGraphPrefill  # here: Triton is loaded only for the GPU path
        p, weight = self.cfg.vision.num_patches, self.lm.backbone.embedding.weight
        text_length = -(-(p + input_ids.shape[1]) // 16) * 16 - p  # the LM's steps a multiple of 16
        key = (tuple(pixel_values.shape), pixel_values.dtype, text_length, weight.device, weight.dtype)
        if key not in self.prefills:
            self.prefills = {k: v for k, v in self.prefills.items() if k[3:] == key[3:]}  # moved: drop the old
            if len(self.prefills) == 4:  # each graph keeps its own working memory: forget the oldest
                del self.prefills[next(iter(self.prefills))]
            self.prefills[key] = CudaGraphPrefill(self, pixel_values, text_length)
        return self.prefills[key](pixel_values, input_ids, cache).clone()  # the graph's buffer is rewritten next time

    @torch.inference_mode()
    def extend(self, input_ids, cache: InferenceCache, cuda_graph=True):
        """Read more text (b, l) on top of the cached state, one token at a time; returns the last logits."""
        step = self.stepper(cache, cuda_graph)
        for i in range(input_ids.shape[1]):
            logits = step(input_ids[:, i])
        return logits.clone()  # a graph's output buffer is rewritten by its next replay

    def stepper(self, cache: InferenceCache, cuda_graph=True):
        """The one-token step on `cache`: input_ids (b,) -> logits (b, v).

        On CUDA (unless cuda_graph is False) a replay of the fused step's CUDA graph, captured once
        per batch size (cuda_graphs.py); otherwise the readable `MambaLM.step`, the CPU path.
        """
        if not (cuda_graph and cache.ssm_state.is_cuda):
            return functools.partial(self.lm.step, cache=cache)
        from minivlmamba.cuda_graphs import CudaGraphDecoder  # here: Triton is loaded only for the GPU path
        weight = self.lm.backbone.embedding.weight
        key = (cache.ssm_state.shape[1], weight.device, weight.dtype)
        if key not in self.decoders:  # a model moved to another device or dtype drops its old graphs
            self.decoders = {k: v for k, v in self.decoders.items() if k[1:] == key[1:]}
            self.decoders[key] = CudaGraphDecoder(self.lm, key[0])
        return self.decoders[key].bind(cache)

    @torch.inference_mode()
    def generate(self, logits, cache: InferenceCache, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
                 cuda_graph=True):
        """Yield new token ids (b,) one at a time, on the CPU, starting from the prefill's logits (b, v).

        Every yielded token has already been read into the cache (queued, on a GPU), the final
        end-of-text too, so a conversation can go on from where the answer stopped. Stops when all
        sequences hit end-of-text; a finished sequence yields (and reads) end-of-text until then.
        Sampling stays on the device; each token is copied to the host for streaming while the GPU
        already runs the step that reads it, so the host never holds the GPU up.
        """
        step = self.stepper(cache, cuda_graph)
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        for _ in range(max_new_tokens):
            token = sample(logits[:, :self.cfg.lm.vocab_size], temperature, top_k, top_p)  # (b,)
            token = torch.where(done, EOT_ID, token)
            done |= token == EOT_ID
            on_host = token.to("cpu", non_blocking=True)  # a no-op on the CPU
            copied = torch.cuda.Event() if token.is_cuda else None
            if copied:
                copied.record()  # after the copy, before the step
            logits = step(token)
            if copied:
                copied.synchronize()  # wait for the token, not for the step
            yield on_host
            if (on_host == EOT_ID).all():
                return

    @torch.inference_mode()
    def generate_batch(self, pixel_values, prompts, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0,
                       cuda_graph=True):
        """Answer b prompts of any lengths together: pixel_values (b, 3, H, W) and b lists of token ids
        -> b lists of new token ids, each up to (not including) its end-of-text.

        A Mamba has no attention mask to hide padding from, so each prompt is prefilled alone, straight
        into its own row of one batch cache (exact, whatever the lengths); the rows then decode
        together, one pass over the weights per step for all b.
        """
        cache = self.lm.allocate_cache(len(prompts), device=pixel_values.device)
        logits = torch.cat([
            self.prefill(pixel_values[i:i + 1], torch.tensor([ids], device=pixel_values.device),
                         InferenceCache(cache.conv_state[:, i:i + 1], cache.ssm_state[:, i:i + 1]))  # views of row i
            for i, ids in enumerate(prompts)])  # (b, v)
        answers = [[] for _ in prompts]
        for token in self.generate(logits, cache, max_new_tokens, temperature, top_k, top_p, cuda_graph):
            for answer, t in zip(answers, token.tolist()):
                if t != EOT_ID:  # after its end-of-text a sequence yields only end-of-text
                    answer.append(t)
        return answers


def sample(logits, temperature=0.0, top_k=0, top_p=1.0):
    """logits (b, v) -> token ids (b,). Greedy when temperature is 0; else top-k, then top-p (nucleus)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)  # (b, v)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]
