r"""
Sample completions from a LLaMA checkpoint (Hugging Face or Meta layout), batched, with a KV cache; and
`evaluate`, the paper's evaluation of a policy on held-out prompts, which train.py runs every --eval-every steps.

    python sample.py --checkpoint DIR --prompt "Name three primary colors."
    python sample.py --checkpoint .world/seed0/sft --adapter out/run/adapter --temperature 0 \
        --prompt "Sort the words alphabetically." --input "sun cat egg"
    python sample.py --checkpoint DIR --prompts eval.json --temperature 0 --out outputs.json

--prompts takes a JSON list or JSONL of strings or {"instruction", "input"} records (AlpacaEval / AlpacaFarm);
--out writes a JSON list of {"instruction", "input", "output", "generator"} records, which AlpacaEval reads.
With --template alpaca (the default) each prompt is wrapped in the Alpaca template the SFT models were
trained on. --temperature 0 is greedy decoding, as the paper's evaluation. --adapter loads a PEFT LoRA
adapter (ours or one trained with PEFT on the same base); --merge folds it into W first (faster decoding).
"""
import support.exact  # first: the CPU kernels pinned before torch runs one

if __name__ == "__main__":
    support.exact.quiet_interrupt()  # Ctrl-C while torch loads: one line and status 130, as later in the run

import argparse
import os
import sys

import torch
from torch.nn.utils.rnn import pad_sequence

import checkpoints
import ppo
from llama import Tokenizer, alpaca_prompt, generate, left_pad
from lora import count_parameters, merge_lora
from support import config, exits


def parse_args(argv=None):
    p = config.Parser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="directory with config.json or params.json and weights")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one instruction")
    src.add_argument("--prompts", help="JSON list or JSONL of strings or {instruction, input} records")
    p.add_argument("--input", default="", help="with --prompt: the input that goes with the instruction")
    p.add_argument("--tokenizer", help="tokenizer.model (default: in --checkpoint)")
    p.add_argument("--max-new-tokens", type=int, help="default: all the room the model's context leaves")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--template", choices=["alpaca", "none"], default="alpaca")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write AlpacaEval JSON records to this file")
    p.add_argument("--generator", help="name in the 'generator' field (default: the checkpoint's name)")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory (adapter_config.json + weights) for --checkpoint")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the weights before sampling")
    args = p.parse_args(argv)
    config.check_sample_args(args)
    return args


def respond(model, tokenizer, prompts, max_new_tokens, batch_size, temperature=0.0, top_p=1.0, generator=None):
    """Responses to prompts (token lists), batch_size at a time: yields them as token lists (EOS included) and texts."""
    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch_size):
        tokens, mask = (x.to(device) for x in left_pad(prompts[i:i + batch_size], tokenizer.pad_id))
        out, out_mask = generate(model, tokens, mask, max_new_tokens, temperature, top_p, tokenizer.eos_id,
                                 tokenizer.pad_id, generator)
        ids = [row[:n] for row, n in zip(out.tolist(), out_mask.sum(1).tolist())]
        yield ids, [tokenizer.decode(r).strip() for r in ids]


@torch.no_grad()
def evaluate(policy, ref, reward_model, tokenizer, records, max_new_tokens, batch_size, world=None, out_file=None,
             generator_name=None, generate_batch_size=None):
    """The paper's evaluation of a policy: greedy responses to held-out prompts, with their mean reward-model
    score, exact KL to the reference (per response) and length; with the small world also its gold annotator's
    win rate against the reference outputs and the task accuracy. out_file: the responses as AlpacaEval JSON. Decoded
    generate_batch_size (default: batch_size; no response depends on it), scored batch_size prompts at a time."""
    policy.eval()
    prompts = [tokenizer.encode(alpaca_prompt(r["instruction"], r["input"])) for r in records]
    responses, texts, score, kl, length = [], [], [], [], []  # responses: token lists, EOS included
    for ids, batch_texts in respond(policy, tokenizer, prompts, max_new_tokens, generate_batch_size or batch_size):
        responses, texts = responses + ids, texts + batch_texts
    for i in range(0, len(prompts), batch_size):
        tokens, mask = left_pad(prompts[i:i + batch_size], tokenizer.pad_id)                      # (b, P)
        chunk = [torch.tensor(r) for r in responses[i:i + batch_size]]  # right-padded, as generate returns them:
        out = pad_sequence(chunk, batch_first=True, padding_value=tokenizer.pad_id)                 # (b, N)
        out_mask = pad_sequence([torch.ones_like(r) for r in chunk], batch_first=True)              # (b, N)
        tokens, mask, out, out_mask = (x.to(ppo.device_of(policy)) for x in (tokens, mask, out, out_mask))
        full, full_mask = torch.cat([tokens, out], 1), torch.cat([mask, out_mask], 1)
        _, _, true_kl, _ = ppo.policy_and_reference(policy, ref, full, full_mask, out, out_mask, tokens.shape[1], 1.0)
        score.append(ppo.reward_score(reward_model, full, full_mask, tokenizer.eos_id).cpu())
        kl.append((true_kl * out_mask).sum(1).cpu())
        length.append(out_mask.sum(1).float().cpu())
    stats = dict(eval_score=torch.cat(score).mean().item(), eval_true_kl=torch.cat(kl).mean().item(),
                 eval_length=torch.cat(length).mean().item())
    if world is not None:
        stats["eval_win_rate"], stats["eval_win_rate_se"] = world.win_rate(records, texts,
                                                                           [r["output"] for r in records])
        stats["eval_accuracy"] = sum(world.check(r, t) for r, t in zip(records, texts)) / len(texts)
    if out_file:
        os.makedirs(os.path.dirname(out_file) or ".", exist_ok=True)
        checkpoints.write_alpaca_eval(out_file, records, texts, generator_name)
    return stats


def main(argv=None):
    args = parse_args(argv)
    records = ([{"instruction": args.prompt, "input": args.input}] if args.prompt is not None
               else checkpoints.read_prompts(args.prompts))
    tok_path = args.tokenizer or os.path.join(args.checkpoint, "tokenizer.model")
    tokenizer = Tokenizer(tok_path)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = checkpoints.load_llama(args.checkpoint, device=args.device, dtype=dtype).eval()
    if tokenizer.n_words > model.cfg.vocab_size:
        raise ValueError(f"{tok_path} has {tokenizer.n_words} tokens but the model only {model.cfg.vocab_size}")
    if args.adapter:  # A, B kept in fp32 so a bf16 merge rounds W + dW once, not dW first
        checkpoints.load_adapter(model, args.adapter, lora_dtype=torch.float32)
        if args.merge:
            merge_lora(model)
        print(f"adapter {args.adapter}: {count_parameters(model)[0]:,} LoRA parameters"
              f"{', merged into W' if args.merge else ''}", flush=True)
    prompt_texts = [alpaca_prompt(r["instruction"], r["input"]) if args.template == "alpaca"
                    else "\n".join(s for s in (r["instruction"], r["input"]) if s) for r in records]
    prompts = [tokenizer.encode(t) for t in prompt_texts]
    room = model.cfg.max_seq_len - max(len(p) for p in prompts)
    n_new = room if args.max_new_tokens is None else args.max_new_tokens
    if n_new < 1:
        raise ValueError(f"the longest prompt has {model.cfg.max_seq_len - room} tokens and fills the model's "
                         f"context of {model.cfg.max_seq_len}")
    generator = torch.Generator(args.device).manual_seed(args.seed)

    outputs = []
    for _, texts in respond(model, tokenizer, prompts, n_new, args.batch_size, args.temperature, args.top_p,
                            generator):
        for r, text in zip(records[len(outputs):], texts):
            outputs.append(text)
            print(f"### {r['instruction']}" + (f"\n### Input: {r['input']}" if r["input"] else "") + f"\n{text}\n",
                  flush=True)
    if args.out:
        name = args.generator or os.path.basename(os.path.normpath(args.checkpoint))
        checkpoints.write_alpaca_eval(args.out, records, outputs, name)
        print(f"wrote {len(records)} records to {args.out}")


def cli(argv=None):
    """main(), with bad input ending in one line on stderr and exit status 1 (130 after Ctrl-C; an --out being
    written is left whole or not at all)."""
    return exits.script(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
