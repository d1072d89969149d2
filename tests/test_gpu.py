"""The GPU paths on a CUDA device (skipped without one): bf16 weights with fp32 LoRA and fp32 log-probs,
SDPA with padding masks and the KV cache on the GPU, the decoding step as a CUDA graph against eager
decoding, activation checkpointing, a rollout with a separate reference model, and train.py's one- and
two-device placements.

bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per value), so each result is compared with the same
computation in fp32 on the CPU at a relative tolerance of 2%. The test model's wq and wk are scaled up (std
0.06) so that attention is sharp and positions matter: bf16 rounding then gives about 0.9%, a wrong rotary
table (theta 1e6 instead of 1e4) 29% (a test below checks that it is caught), a missing padding mask 130%.
bf16 on the device against bf16 on the device (KV cache vs full forward) uses 1%.
TEST_GPU_DEVICE=cpu runs the same checks with bf16 on the CPU (to debug the tests without a GPU).
"""
import copy
import math
import dataclasses
import os

import pytest
import torch

import lora
import train
from llama import Llama, LlamaConfig, generate, left_pad
from reward import RewardModel, ValueModel
from support import cudagraph
from test_ppo import rollout
from test_train import base_args, metrics, run, setup  # noqa: F401  (setup is a fixture)

DEVICE = os.environ.get("TEST_GPU_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
CFG = LlamaConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=1000, hidden_dim=688, max_seq_len=256)
RTOL = 0.02


def rel_err(a, b):  # ||a - b|| / ||b||, in fp32 on the CPU
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def fp32_and_bf16(seed=0):
    torch.manual_seed(seed)
    cpu = Llama(CFG).eval()                                      # fp32 on the CPU
    with torch.no_grad():
        for layer in cpu.layers:                                  # sharper attention: positions matter
            layer.attention.wq.weight.mul_(3)
            layer.attention.wk.weight.mul_(3)
    return cpu, copy.deepcopy(cpu).to(DEVICE, torch.bfloat16)


def test_bf16_logits_match_fp32():
    cpu, gpu = fp32_and_bf16()
    tokens = torch.randint(0, CFG.vocab_size, (4, 64))
    logits = gpu(tokens.to(DEVICE))
    assert logits.dtype == torch.float32 and logits.device.type == torch.device(DEVICE).type
    assert rel_err(logits, cpu(tokens)) < RTOL
    wrong_rotary = copy.deepcopy(cpu)                             # the tolerance does catch a wrong rotary table
    wrong_rotary.cfg = dataclasses.replace(CFG, rope_theta=1e6)
    assert rel_err(wrong_rotary(tokens), cpu(tokens)) > 5 * RTOL
    # the greedy choice agrees wherever fp32's top two logits are not within bf16's rounding of each other
    top2 = cpu(tokens).topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05 * top2[..., 0].abs().clamp(min=1e-3)
    assert clear.sum() > 0 and (logits.argmax(-1).cpu() == cpu(tokens).argmax(-1))[clear].all()


def test_left_padding_and_kv_cache_on_the_device():
    cpu, gpu = fp32_and_bf16(1)
    seqs = [torch.randint(0, CFG.vocab_size, (n,)).tolist() for n in (5, 40, 23)]
    tokens, mask = left_pad(seqs)
    batch = gpu(tokens.to(DEVICE), mask.to(DEVICE))              # (3, 40, V)
    for b, s in enumerate(seqs):                                  # each padded row = that sequence alone, fp32
        alone = cpu(torch.tensor([s]))[0]
        assert rel_err(batch[b, -len(s):], alone) < RTOL, b
    # incremental decoding with the cache = one full forward (both bf16 on the device)
    cache, start = gpu.new_cache(3, 48), torch.zeros(1, dtype=torch.long, device=DEVICE)
    h = gpu.hidden(tokens.to(DEVICE), mask.to(DEVICE), cache, start)
    nxt = torch.randint(0, CFG.vocab_size, (3, 1), device=DEVICE)
    full_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1).to(DEVICE)
    step = gpu(nxt, None, cache, start + 40)[:, -1]
    full = gpu(torch.cat([tokens.to(DEVICE), nxt], 1), full_mask)[:, -1]
    assert rel_err(step, full) < 0.01 and h.shape == (3, 40, CFG.dim)


def test_bf16_base_with_fp32_lora_trains_on_the_device():
    cpu, gpu = fp32_and_bf16(2)
    for m in (cpu, gpu):
        lora.add_lora(m, rank=8, alpha=64, dropout=0.0, lora_dtype=torch.float32)
    layers = lora.lora_layers(gpu)
    with torch.no_grad():  # a non-zero update (B != 0), the same A and B on both
        for (_, _, c), (_, _, g) in zip(lora.lora_layers(cpu), layers):
            torch.nn.init.normal_(c.lora_B, std=0.02)
            g.lora_A.copy_(c.lora_A)
            g.lora_B.copy_(c.lora_B)
    assert all(m.lora_A.dtype == torch.float32 and m.weight.dtype == torch.bfloat16 for _, _, m in layers)
    tokens = torch.randint(0, CFG.vocab_size, (2, 32))
    assert rel_err(gpu(tokens.to(DEVICE)), cpu(tokens)) < RTOL
    # one AdamW step at lr 1e-5 moves every fp32 A entry that has a gradient (a bf16 A would mostly not move)
    params = [p for p in gpu.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)  # no decay: only gradients move them
    gpu.train()
    gpu(tokens.to(DEVICE)).logsumexp(-1).mean().backward()
    opt.step()
    for p, p0 in zip(params, before):
        assert (p.grad != 0).float().mean().item() > 0.9
        assert ((p != p0) | (p.grad == 0)).float().mean().item() > 0.99
    assert all(m.weight.grad is None for _, _, m in layers)      # W stays frozen


def test_rollout_reference_adapters_off_equals_separate_model():
    torch.manual_seed(4)
    policy = Llama(CFG).to(DEVICE, torch.bfloat16)
    ref = copy.deepcopy(policy).requires_grad_(False).eval()     # the two-device placement's reference
    lora.add_lora(policy, rank=8, alpha=64, dropout=0.1, lora_dtype=torch.float32)
    for layer in lora.lora_layers(policy):
        torch.nn.init.normal_(layer[2].lora_B, std=0.02)          # policy != reference
    reward_model = RewardModel(CFG).to(DEVICE, torch.bfloat16).requires_grad_(False)
    value = ValueModel(reward_model.backbone, lora_dtype=torch.float32)
    prompts, mask = left_pad([torch.randint(3, CFG.vocab_size, (n,)).tolist() for n in (7, 12, 3, 9)])
    cfg = train.Args(estimator="js", micro_batch_size=2, max_new_tokens=10)
    out = []
    for r in (None, ref):
        g = torch.Generator(DEVICE).manual_seed(0)
        out.append(rollout(policy, value, reward_model, prompts.to(DEVICE), mask.to(DEVICE), cfg, 0.02, eos_id=2,
                           ref_model=r, generator=g))
    (a, sa), (b, sb) = out
    assert torch.equal(a["responses"], b["responses"])            # same seed, same policy: same samples
    for k in ("logprobs", "ref_logprobs", "values"):
        assert a[k].dtype == torch.float32
        assert torch.allclose(a[k], b[k], atol=1e-3), k
    assert sa["true_kl"] > 0 and abs(sa["true_kl"] - sb["true_kl"]) < 1e-3 * max(1.0, sa["true_kl"])
    # and rollout does use the separate reference: a different one gives different reference log-probs
    with torch.no_grad():
        ref.layers[0].attention.wv.weight.mul_(2)
    c, _ = rollout(policy, value, reward_model, prompts.to(DEVICE), mask.to(DEVICE), cfg, 0.02, eos_id=2,
                   ref_model=ref, generator=torch.Generator(DEVICE).manual_seed(0))
    assert torch.allclose(c["logprobs"], a["logprobs"], atol=1e-3)
    assert not torch.allclose(c["ref_logprobs"], a["ref_logprobs"], atol=1e-2)


def lora_policy(seed):
    """The bf16 test model with unmerged fp32 LoRA adapters that matter (B != 0), in eval mode: a rollout's policy."""
    _, gpu = fp32_and_bf16(seed)
    lora.add_lora(gpu, rank=8, alpha=64, dropout=0.1, lora_dtype=torch.float32)
    for layer in lora.lora_layers(gpu):
        torch.nn.init.normal_(layer[2].lora_B, std=0.02)
    return gpu.eval()


needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")


@needs_cuda
@torch.no_grad()
def test_cuda_graph_step_replays_the_eager_step():
    """cudagraph.capture of generate's decoding step gives the eager step's logits bit for bit (it replays the same
    kernels) at every slot of a left-padded batch, and both match one full forward of the batch."""
    gpu = lora_policy(5)
    tokens, mask = (x.to(DEVICE) for x in left_pad([torch.randint(0, CFG.vocab_size, (n,)).tolist() for n in (5, 40, 23)]))
    nxt = torch.randint(0, CFG.vocab_size, (3, 8), device=DEVICE)
    logits = []
    for graph in (False, True):
        cache, start = gpu.new_cache(3, 48), torch.zeros(1, dtype=torch.long, device=DEVICE)
        gpu.hidden(tokens, mask, cache, start)
        start += tokens.shape[1]
        step = lambda token, start, cache=cache: gpu(token, None, cache, start)[:, -1]
        if graph:
            step = cudagraph.capture(step, nxt[:, :1], start)
        out = []
        for t in range(8):
            out.append(step(nxt[:, t:t + 1], start).clone())
            start += 1
        logits.append(torch.stack(out, 1))                       # (3, 8, V)
    eager, graph = logits
    assert torch.equal(graph, eager), f"graph vs eager: max |difference| {(graph - eager).abs().max().item()}"
    full = gpu(torch.cat([tokens, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1))[:, 40:]
    assert rel_err(eager, full) < 0.01


@needs_cuda
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_with_cuda_graph_equals_eager(temperature):
    """Token for token, at temperature 0 and, with the same seed, at 1: the sampling runs outside the graph on
    the same logits and the same generator. Left-padded prompts, one row stopping at EOS mid-batch."""
    gpu = lora_policy(6)
    tokens, mask = (x.to(DEVICE) for x in left_pad([torch.randint(3, CFG.vocab_size, (n,)).tolist()
                                                   for n in (7, 30, 3, 12)]))
    run = lambda graph, eos=None: generate(gpu, tokens, mask, 24, temperature=temperature, eos_id=eos,
                                           generator=torch.Generator(DEVICE).manual_seed(0), cuda_graph=graph)
    eos = run(False)[0][1, 5].item()                              # row 1's sixth token becomes EOS
    (out, out_mask), (gout, gout_mask) = run(False, eos), run(True, eos)
    assert out_mask[1].sum() <= 6 and out_mask.sum(1).max() > out_mask[1].sum()  # EOS mid-batch
    assert torch.equal(gout, out) and torch.equal(gout_mask, out_mask)


def test_checkpointing_on_the_device_gives_the_same_gradients():
    """bf16 base, fp32 LoRA: checkpointed and plain forward + backward agree (the attention kernels' backward may
    sum in another order: 1% relative, the bf16 tolerance used throughout)."""
    grads = []
    for checkpointing in (False, True):
        gpu = lora_policy(7).train()
        gpu.activation_checkpointing = checkpointing
        tokens, mask = left_pad([torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                                 for n in (9, 33, 20)])
        torch.manual_seed(8)
        gpu(tokens.to(DEVICE), mask.to(DEVICE)).logsumexp(-1).mean().backward()
        grads.append([m.lora_A.grad for _, _, m in lora.lora_layers(gpu)])
    for a, b in zip(*grads):
        assert rel_err(b, a) < 0.01


@pytest.mark.parametrize("devices", ["cuda:0", "cuda:0,cuda:0"])
def test_train_script_on_the_gpu(setup, tmp_path, devices):  # noqa: F811
    if DEVICE != "cuda":
        pytest.skip("train.py picks bf16 only on CUDA")
    r = run(base_args(setup, tmp_path / "o", "--devices", devices, "--steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torch.bfloat16" in r.stdout
    two = "," in devices
    assert ("reference = policy, reward model = value backbone" in r.stdout) != two
    ms = metrics(tmp_path / "o")
    assert [m["step"] for m in ms] == [1, 2]
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for m in ms for v in m.values()), ms
