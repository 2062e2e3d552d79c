"""Generation: decoding == full forward at every position, batched == one at a time, sampling rules,
the fused step == the readable step, the fused prefill == the readable prefill, and CUDA-graph
replay == eager decoding and prefill (GPU only).

Without CUDA the fused step's Triton kernels run in Triton's interpreter on the CPU.
"""

import dataclasses
import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest

from minivlmamba import MambaConfig, MambaLM, VLMamba, preset
from minivlmamba.cuda_graphs import CudaGraphDecoder
from minivlmamba.generate import batch_product, fused_step, ssm_step
from minivlmamba.vlm import EOT_ID, sample

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def tiny_vlm(seed=0, device="cpu"):
    torch.manual_seed(seed)
    cfg = preset("tiny")
    cfg.lm = dataclasses.replace(cfg.lm, vocab_size=50)
    return VLMamba(cfg).eval().to(device)


def test_lm_steps_from_an_empty_cache_equal_full_forward_at_every_position():
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=50, d_state=5)).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        full = lm(ids)  # (b, l, v)
        cache = lm.allocate_cache(2)  # no prefill at all: the zero state is the empty context
        stepped = torch.stack([lm.step(ids[:, t], cache) for t in range(9)], 1)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vlm_generation_is_the_full_forward_argmax_and_leaves_every_token_in_the_cache(seed):
    model = tiny_vlm(seed)
    pixel_values, prompt = torch.randn(1, 3, 48, 48), torch.randint(2, 50, (1, 4))
    cache = model.lm.allocate_cache(1)
    tokens = torch.stack(list(model.generate(model.prefill(pixel_values, prompt, cache), cache, 8)), 1)  # (1, t)
    more = torch.tensor([[7, 7]])  # read after the answer; full[:, -1] (predicting the second) follows the first
    with torch.no_grad():
        full, _ = model(pixel_values, torch.cat([prompt, tokens, more], 1))  # logits[:, i] predicts token i
    greedy = full[:, 4:4 + tokens.shape[1], :model.cfg.lm.vocab_size].argmax(-1)  # never a padding row (id 50+)
    assert torch.equal(greedy, tokens)  # every new token is the greedy choice
    torch.testing.assert_close(model.extend(more[:, :1], cache), full[:, -1], rtol=1e-4, atol=1e-4)  # the cache is whole


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_generation_equals_one_at_a_time(seed):
    model = tiny_vlm(seed)
    pixel_values = torch.randn(3, 3, 48, 48)
    prompts = [[5, 7, 9, 11, 13, 15, 17, 19, 21], [3], [8, 6, 4, 2, 30]]  # shorter and longer than the conv window
    batched = model.generate_batch(pixel_values, prompts, max_new_tokens=12)
    for i, ids in enumerate(prompts):
        cache = model.lm.allocate_cache(1)
        logits = model.prefill(pixel_values[i:i + 1], torch.tensor([ids]), cache)
        alone = [t.item() for t in model.generate(logits, cache, max_new_tokens=12)]
        assert batched[i] == [t for t in alone if t != EOT_ID]


def test_sampling_rules():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits), greedy)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6), greedy)  # the nucleus is the top token alone
    top3 = logits.topk(3).indices
    for _ in range(20):
        token = sample(logits, temperature=2.0, top_k=3)
        assert (top3 == token[:, None]).any(-1).all()
    peaked = torch.tensor([[4.0, 0.0, 0.0, 0.0]])  # p(0) = 0.95: top_p 0.9 keeps token 0 only
    assert all(sample(peaked, temperature=1.0, top_p=0.9).item() == 0 for _ in range(20))


def test_generation_stops_at_end_of_text_and_never_samples_padding_rows():
    model = tiny_vlm()
    pixel_values, prompt = torch.randn(2, 3, 48, 48), torch.randint(2, 50, (2, 3))
    top = model.prefill(pixel_values, prompt, model.lm.allocate_cache(2))[0].argmax()
    with torch.no_grad():
        model.lm.lm_head.weight[50:] = 100 * model.lm.lm_head.weight[top]  # the padding rows (ids >= vocab_size)
    cache = model.lm.allocate_cache(2)
    logits = model.prefill(pixel_values, prompt, cache)
    assert logits[0].argmax() >= 50  # ... now win the argmax
    tokens = list(model.generate(logits, cache, 30, temperature=1.5))
    assert all((t < 50).all() for t in tokens)
    with torch.no_grad():
        model.lm.lm_head.weight.zero_()  # all logits equal: argmax takes the first, end-of-text; one step and done
    cache = model.lm.allocate_cache(2)
    assert [t.tolist() for t in model.generate(model.prefill(pixel_values, prompt, cache), cache, 30)] == [[0, 0]]


@pytest.mark.parametrize("batch", [1, 2])  # our matrix-vector kernel, cuBLAS
def test_fused_step_equals_readable_step(batch):
    torch.manual_seed(0)
    # rows of 28 and 56: two tiles of 16 + 16 and 32 + 32, the second one part masked; n, r not powers of two
    cfg = MambaConfig(d_model=28, n_layer=2, vocab_size=50, d_state=5, dt_rank=3)
    lm = MambaLM(cfg).eval().to(DEVICE)
    ids = torch.randint(0, 50, (batch, 10), device=DEVICE)
    with torch.no_grad():
        cache = lm.allocate_cache(batch)
        lm(ids[:, :5], cache=cache)  # prefill
        twin = lm.allocate_cache(batch)
        twin.conv_state.copy_(cache.conv_state)
        twin.ssm_state.copy_(cache.ssm_state)
        for t in range(5, 10):
            torch.testing.assert_close(fused_step(lm, ids[:, t], cache), lm.step(ids[:, t], twin), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.conv_state, twin.conv_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.ssm_state, twin.ssm_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("b", [2, 5, 16, 40])  # one tile of 16 rows, part masked; 64 rows for 40
def test_batch_product_equals_linear(b):
    torch.manual_seed(0)
    x, w = torch.randn(b, 300, device=DEVICE), torch.randn(200, 300, device=DEVICE)  # 300: tiles of 128 + a part
    residual = torch.randn(b, 200, device=DEVICE)
    torch.testing.assert_close(batch_product(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(batch_product(x, w, residual.clone()), residual + F.linear(x, w), rtol=1e-5, atol=1e-4)
    if DEVICE == "cuda":  # bf16 on the tensor cores, against cuBLAS's bf16 product (the interpreter has no bf16 dot)
        xb, wb = x.bfloat16(), w.bfloat16()
        torch.testing.assert_close(batch_product(xb, wb).float(), F.linear(xb, wb).float(), rtol=2e-2, atol=2e-2)


def test_fused_step_with_batch_products_equals_readable_step():
    """A model wide enough that the batch's in_proj, out_proj and LM head take `batch_product` (rows of 1,024 and more)."""
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=1024, n_layer=1, vocab_size=1024, d_state=4)).eval().to(DEVICE)
    ids = torch.randint(0, 1024, (3, 3), device=DEVICE)
    with torch.no_grad():
        cache, twin = lm.allocate_cache(3), lm.allocate_cache(3)
        for t in range(3):
            torch.testing.assert_close(fused_step(lm, ids[:, t], cache), lm.step(ids[:, t], twin), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.ssm_state, twin.ssm_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_d, rows", [(32, 2), (8, 4), (16, 8)])  # 5 rows: the last program's part masked
def test_ssm_step_with_several_rows_a_program_changes_nothing(block_d, rows):
    torch.manual_seed(0)
    mixer = MambaLM(MambaConfig(d_model=20, n_layer=1, vocab_size=50, d_state=5, dt_rank=3)).to(DEVICE).backbone.layers[0].mixer
    di, n = mixer.A_log.shape
    state = torch.randn(5, di, n, device=DEVICE)
    x, xz, dt_B_C = (torch.randn(5, width, device=DEVICE) for width in (di, 2 * di, 3 + 2 * n))
    with torch.no_grad():
        one, several = state.clone(), state.clone()
        y = ssm_step(one, x, xz, dt_B_C, mixer)
        assert torch.equal(ssm_step(several, x, xz, dt_B_C, mixer, block_d, rows), y)
    assert torch.equal(several, one) and not torch.equal(one, state)


@pytest.mark.parametrize("l, pad", [(3, 0), (13, 0), (13, 22)])  # shorter than the conv window; odd, so
def test_fused_prefill_equals_readable_prefill(l, pad):                # padded to 16; noise after the real steps
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=24, n_layer=2, vocab_size=50, d_state=5, dt_rank=3, scan_backend="triton")
    lm = MambaLM(cfg).eval().to(DEVICE)
    embeds = torch.randn(2, l + pad, 24, device=DEVICE)  # with pad > 0: only the first l steps are real
    with torch.no_grad():
        fused, twin = lm.allocate_cache(2), lm.allocate_cache(2)
        fused.conv_state.fill_(7.0)  # stale values: the prefill must overwrite every one of them
        fused.ssm_state.fill_(7.0)
        got = lm.hidden_states_fused(embeds, fused, torch.tensor(l, device=DEVICE))[:, :l]
        want = lm.hidden_states(embeds[:, :l], twin, fused=False)  # the readable loop
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.conv_state, twin.conv_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.ssm_state, twin.ssm_state, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_prefill_graph_equals_eager():
    """Prompts of 5 and 7 tokens replay one graph (9 image tokens + 7: 16 steps), 8 tokens a second;
    each leaves the logits and states of the eager prefill, whatever the prompt replayed before it."""
    model = tiny_vlm(device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    for l in (5, 7, 8, 5):
        pixel_values = torch.randn(1, 3, 48, 48, device="cuda", generator=gen)
        prompt = torch.randint(2, 50, (1, l), device="cuda", generator=gen)
        graphed, eager = model.lm.allocate_cache(1), model.lm.allocate_cache(1)
        logits = model.prefill(pixel_values, prompt, graphed)
        torch.testing.assert_close(logits, model.prefill(pixel_values, prompt, eager, cuda_graph=False),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(graphed.conv_state, eager.conv_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(graphed.ssm_state, eager.ssm_state, rtol=1e-4, atol=1e-4)
    assert len(model.prefills) == 2


@needs_cuda
def test_cuda_graph_generation_equals_eager():
    model = tiny_vlm(device="cuda")
    pixel_values, prompt = torch.randn(2, 3, 48, 48, device="cuda"), torch.randint(2, 50, (2, 5), device="cuda")
    caches, runs = {}, {}
    for cuda_graph in (False, True):
        cache = caches[cuda_graph] = model.lm.allocate_cache(2)
        logits = model.prefill(pixel_values, prompt, cache)
        runs[cuda_graph] = torch.stack(list(model.generate(logits, cache, 20, cuda_graph=cuda_graph)), 1)
    assert torch.equal(runs[True], runs[False])
    torch.testing.assert_close(caches[True].ssm_state, caches[False].ssm_state, rtol=1e-4, atol=1e-4)
    more = torch.randint(2, 50, (2, 3), device="cuda")
    torch.testing.assert_close(model.extend(more, caches[True]), model.extend(more, caches[False], cuda_graph=False),
                               rtol=1e-4, atol=1e-4)


@needs_cuda
def test_programmatic_dependent_launch_changes_nothing():
    """The same graph with and without PDL gives the same logits and states: a kernel that read its
    predecessor's output before `gdc_wait` would race, and read stale values (far off, not rounding)."""
    from minivlmamba import generate
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=256, n_layer=4, vocab_size=5000)).eval().cuda()  # grids of hundreds of programs
    ids = torch.randint(0, 5000, (12,), device="cuda")
    runs, default = [], generate.PDL
    for pdl in (True, False):
        generate.PDL = pdl
        try:
            decoder = CudaGraphDecoder(lm, 1)
        finally:
            generate.PDL = default
        logits = torch.stack([decoder(ids[t:t + 1]).clone() for t in range(12)])
        runs.append((logits, decoder.cache.ssm_state.clone(), decoder.cache.conv_state.clone()))
    for with_pdl, without in zip(*runs):
        torch.testing.assert_close(with_pdl, without, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_caches_take_turns_on_one_graph():
    """Two conversations alternate on one decoder: each keeps its own state, as in eager decoding."""
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=50)).eval().cuda()
    decoder = CudaGraphDecoder(lm, 1)
    ids = torch.randint(0, 50, (2, 6), device="cuda")
    with torch.no_grad():
        graph_caches = [lm.allocate_cache(1) for _ in range(2)]
        eager_caches = [lm.allocate_cache(1) for _ in range(2)]
        for t in range(6):
            for i in range(2):
                logits = decoder.bind(graph_caches[i])(ids[i, t:t + 1])
                torch.testing.assert_close(logits, lm.step(ids[i, t:t + 1], eager_caches[i]), rtol=1e-4, atol=1e-4)
    for graph_cache, eager_cache in zip(graph_caches, eager_caches):
        torch.testing.assert_close(graph_cache.ssm_state, eager_cache.ssm_state, rtol=1e-4, atol=1e-4)
