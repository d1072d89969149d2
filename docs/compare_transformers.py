"""
NOT PART OF THE PRODUCT, NOT A TEST: needs transformers and peft, which lora-rlhf does not depend on.
Run it from a throwaway virtual environment outside the repository, e.g.

    python3 -m venv /tmp/refvenv --system-site-packages && /tmp/refvenv/bin/pip install transformers peft
    /tmp/refvenv/bin/python docs/compare_transformers.py [prompt tokens (64)] [new tokens (64)] [rounds (5)]

Times llama.py + lora.py against transformers' LlamaForCausalLM + PEFT on the same random weights (ours
written with checkpoints.save_llama / save_adapter and read back by from_pretrained), side by side in one
process, ours and theirs alternating (the order flips every round) so that a shared machine's load falls
on both: greedy decoding with LoRA unmerged, scoring (log-probs of the response tokens under no_grad), and
a LoRA forward + backward of the same loss. One thread each. Prints the best wall and CPU time of each
and the ratio theirs / ours (>= 1: ours at least as fast), with the load average before and after.
"""
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoints  # noqa: E402
import llama  # noqa: E402
import lora  # noqa: E402
import ppo  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

CFG = llama.LlamaConfig(dim=768, n_layers=12, n_heads=12, vocab_size=32000, hidden_dim=2048, max_seq_len=1024)
B_DECODE, B_SCORE, B_TRAIN, P, N, ROUNDS = 16, 16, 8, 64, 64, 5


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main():
    global P, N, ROUNDS
    P, N, ROUNDS = ([int(a) for a in sys.argv[1:4]] + [P, N, ROUNDS][len(sys.argv[1:4]):])[:3]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ours = llama.Llama(CFG)
    lora.add_lora(ours, rank=8, alpha=64, dropout=0.1)
    for _, _, m in lora.lora_layers(ours):  # adapters that matter: the LoRA path is part of every product
        torch.nn.init.normal_(m.lora_B, std=0.02)
    with tempfile.TemporaryDirectory() as d:
        with lora.lora_disabled(ours):
            base_sd = {k: v for k, v in ours.state_dict().items() if "lora_" not in k}
        plain = llama.Llama(CFG)
        plain.load_state_dict(base_sd)
        checkpoints.save_llama(plain, os.path.join(d, "base"))
        checkpoints.save_adapter(ours, os.path.join(d, "adapter"))
        theirs = LlamaForCausalLM.from_pretrained(os.path.join(d, "base"), torch_dtype=torch.float32,
                                                  attn_implementation="sdpa")
        theirs = PeftModel.from_pretrained(theirs, os.path.join(d, "adapter"), is_trainable=True)
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(P // 2, P + 1, (B_DECODE,), generator=g).tolist()
    lengths[0] = P  # the longest prompt has P tokens: the padded prompts are (B, P)
    prompts, mask = llama.left_pad([torch.randint(3, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths])
    ours.eval(), theirs.eval()

    # the same computation on both sides: greedy tokens and scored log-probs
    with torch.no_grad():
        out, _ = llama.generate(ours, prompts, mask, N, temperature=0)
        hf = theirs.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=N, do_sample=False)[:, P:]
        tokens, full_mask = torch.cat([prompts, out], 1), torch.cat([mask, torch.ones_like(out)], 1)
        full_pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        lp_ours = ppo.logprobs_from_logits(ppo.response_logits(ours, tokens, full_mask, P, 1.0), out)
        lp_theirs = ppo.logprobs_from_logits(theirs(input_ids=tokens, attention_mask=full_mask, position_ids=full_pos,
                                                    logits_to_keep=N + 1).logits[:, :-1], out)
    print(f"same weights: greedy tokens equal {(hf == out).float().mean().item():.3f} of {out.numel()}; "
          f"response log-probs max |difference| {(lp_ours - lp_theirs).abs().max().item():.2e}")

    def decode(model):
        with torch.no_grad():
            if model is ours:
                llama.generate(ours, prompts, mask, N, temperature=0)
            else:
                theirs.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=N, do_sample=False)

    def score(model):
        with torch.no_grad():
            if model is ours:
                ppo.logprobs_from_logits(ppo.response_logits(ours, tokens, full_mask, P, 1.0), out)
            else:
                logits = theirs(input_ids=tokens, attention_mask=full_mask, position_ids=full_pos,
                                logits_to_keep=N + 1).logits[:, :-1]
                ppo.logprobs_from_logits(logits, out)

    def train(model):
        b = slice(0, B_TRAIN)
        model.train()
        if model is ours:
            logits = ppo.response_logits(ours, tokens[b], full_mask[b], P, 1.0)
        else:
            logits = theirs(input_ids=tokens[b], attention_mask=full_mask[b], position_ids=full_pos[b],
                            logits_to_keep=N + 1).logits[:, :-1]
        ppo.logprobs_from_logits(logits, out[b]).mean().backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    print(f"load before: {uptime()}")
    print(f"torch {torch.__version__}, 1 thread; LLaMA dim {CFG.dim}, {CFG.n_layers} layers, vocabulary {CFG.vocab_size}; "
          f"LoRA r=8 on wq, wk, wv, wo (unmerged); prompts {P // 2}-{P} tokens left-padded, {N} new tokens")
    jobs = {f"decode: greedy, {B_DECODE} x {N} new tokens": decode,
            f"score: log-probs of {B_SCORE} x {N} response tokens ({P + N}-token rows)": score,
            f"LoRA fwd+bwd: {B_TRAIN} rows of {P + N} tokens, loss on {N}": train}
    times = {(k, side): [] for k in jobs for side in ("ours", "theirs")}  # (wall, CPU) per round
    for r in range(ROUNDS + 1):  # round 0 warms up
        for name, fn in jobs.items():
            order = (("ours", ours), ("theirs", theirs))[::1 if r % 2 else -1]
            for side, model in order:
                t = timed(lambda: fn(model))
                if r > 0:
                    times[name, side].append(t)
    print(f"load after: {uptime()}")
    print("\n| operation | ours: best wall s (CPU s) | theirs: best wall s (CPU s) | theirs / ours: best wall (CPU) | "
          "theirs / ours per round, CPU: median [min, max] |")
    print("|---|---:|---:|---:|---:|")
    for name in jobs:
        (ow, oc), (tw, tc) = (tuple(map(min, zip(*times[name, side]))) for side in ("ours", "theirs"))
        paired = sorted(t[1] / o[1] for o, t in zip(times[name, "ours"], times[name, "theirs"]))
        print(f"| {name} | {ow:.2f} ({oc:.2f}) | {tw:.2f} ({tc:.2f}) | {tw / ow:.2f} ({tc / oc:.2f}) | "
              f"{paired[len(paired) // 2]:.2f} [{paired[0]:.2f}, {paired[-1]:.2f}] |")
    print(f"\n{ROUNDS} rounds after one warm-up round, ours and theirs back to back in each (the order alternating); "
          f"transformers {__import__('transformers').__version__}, peft {__import__('peft').__version__}")


if __name__ == "__main__":
    main()
