"""CUDA graphs for generation: the decode step and the whole prefill, each recorded once and replayed.

Shape legend: b batch, l text length, v (padded) vocabulary.

Launching kernels one by one from the host costs several microseconds each, longer than most of
them run. A CUDA graph records a whole computation once; a replay launches every kernel of it with
one call, on the very same memory.

`CudaGraphDecoder` captures the step (`generate.fused_step`) for one batch size against a static
cache and a static buffer of token ids: each new token is one `graph.replay()`. `CudaGraphPrefill`
captures the whole prefill the same way: the image encoder (hundreds of small kernels) and the
training's fused, channels-first LM (`MambaLM.hidden_states_fused`, a few large kernels a layer),
whose launches one by one cost more than their work; one graph serves every prompt up to its
length, the rest of it padding.

Official implementation: mamba_ssm/utils/generation.py (`update_graph_cache`, `capture_graph`).
We differ in capturing the whole prefill too and in letting any cache borrow the graph's state (`bind`).
"""

import functools
import weakref

import torch

from minivlmamba.generate import fused_step
from minivlmamba.mamba import InferenceCache, MambaLM


def capture(fn, *args):
    """fn(*args) recorded as a CUDA graph -> (graph, its output). A replay runs the same kernels on the same
    memory: args are read from the very tensors given here, the output lands in the one returned."""
    side = torch.cuda.Stream()  # warm up off the main stream, as capture requires:
    side.wait_stream(torch.cuda.current_stream())  # compile the kernels, create the cuBLAS handle
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)  # recorded, not run
    return graph, out


class CudaGraphPrefill:
    """`VLMamba.prefill` for one image shape and one padded length, captured once as a CUDA graph: the
    image encoder, the LM over image and text, and the LM head at the last real step, some 2,000
    kernels at the paper's shapes, launched by one call (eager, the host launching them one by one
    took longer than the GPU ran them).

    Any prompt of up to `text_length` tokens replays it: its ids go into the start of a static
    buffer of that length, its length into a tensor the graph reads, and the LM treats what follows
    as padding (`MambaLM.hidden_states_fused`). A call copies the states the graph leaves in its own
    cache into the caller's, and returns the next-token logits (b, v), rewritten by the next call.
    """

    def __init__(self, model, pixel_values, text_length):
        lm, self.image_tokens = model.lm, model.cfg.vision.num_patches

        def prefill(pixel_values, input_ids, steps):
            hidden = lm.hidden_states_fused(model.embed(pixel_values, input_ids).float(), self.cache, steps)
            return lm.lm_head(hidden.index_select(1, steps.view(1) - 1)[:, 0])  # (b, v)

        with torch.inference_mode(False), torch.no_grad():  # plain tensors: callable outside inference mode too
            b, device = pixel_values.shape[0], pixel_values.device
            self.cache = lm.allocate_cache(b)
            self.pixel_values = pixel_values.clone()
            self.input_ids = torch.zeros(b, text_length, dtype=torch.long, device=device)
            self.steps = torch.tensor(self.image_tokens + 1, device=device)
            self.graph, self.logits = capture(prefill, self.pixel_values, self.input_ids, self.steps)

    def __call__(self, pixel_values, input_ids, cache: InferenceCache):
        """pixel_values (b, 3, H, W) of the captured shape, input_ids (b, l) with l <= text_length."""
        l = input_ids.shape[1]
        self.pixel_values.copy_(pixel_values)
        self.input_ids[:, :l].copy_(input_ids)
        self.input_ids[:, l:].zero_()  # padding: any ids would do; zeros keep every replay the same
        self.steps.fill_(self.image_tokens + l)
        self.graph.replay()
        cache.conv_state.copy_(self.cache.conv_state)
        cache.ssm_state.copy_(self.cache.ssm_state)
        return self.logits


class CudaGraphDecoder:
    """The decode step of `lm` at one batch size, captured once as a CUDA graph.

    A graph replays the very same kernels on the very same memory: it reads token ids from
    `self.input_ids` (b,), reads and writes the state in `self.cache`, and leaves the next-token
    logits in `self.logits` (b, v). A caller's cache borrows these buffers with `bind`: its state
    moves in and from then on lives there, and the cache that held them before gets a copy of its
    own back, so any number of caches of this batch size can take turns.

    fused=False captures the readable `MambaLM.step` instead (the baseline of
    `python -m minivlmamba.bench generate`).
    """

    def __init__(self, lm: MambaLM, batch_size, fused=True):
        step = functools.partial(fused_step, lm) if fused else lm.step
        self.owner = None  # a weak reference to the cache that holds our buffers now
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: a cache may be used outside inference mode
            self.cache = lm.allocate_cache(batch_size)
            self.input_ids = torch.zeros(batch_size, dtype=torch.long, device=self.cache.ssm_state.device)
            self.graph, self.logits = capture(step, self.input_ids, self.cache)
            self.cache.conv_state.zero_()  # forget the warm-up: the decoder starts as an empty cache
            self.cache.ssm_state.zero_()

    def __call__(self, input_ids):
        """input_ids (b,) -> logits (b, v) of the next token; the buffer is rewritten by the next call."""
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        return self.logits

    def bind(self, cache: InferenceCache):
        """Make `cache` use the graph's state buffers (its state moves in); returns self."""
        static = self.cache
        if cache.ssm_state is static.ssm_state:
            return self
        if cache.ssm_state.shape != static.ssm_state.shape:
            raise ValueError(f"a cache of shape {tuple(cache.ssm_state.shape)} cannot use a decoder of "
                             f"{tuple(static.ssm_state.shape)}")
        with torch.inference_mode(False), torch.no_grad():
            previous = self.owner and self.owner()
            if previous is not None:  # the last borrower keeps its state, in memory of its own
                previous.conv_state, previous.ssm_state = static.conv_state.clone(), static.ssm_state.clone()
            static.conv_state.copy_(cache.conv_state)
            static.ssm_state.copy_(cache.ssm_state)
        cache.conv_state, cache.ssm_state = static.conv_state, static.ssm_state
        self.owner = weakref.ref(cache)
        return self
