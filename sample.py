"""
Sample completions from a LLaMA checkpoint (Hugging Face or Meta layout), batched, with a KV cache.

    python sample.py --checkpoint DIR --prompt "Name three primary colors."
    python sample.py --checkpoint DIR --prompts eval.json --temperature 0 --out outputs.json
    python sample.py --checkpoint SFT_DIR --adapter ADAPTER_DIR --merge --prompt "Name three primary colors."

--prompts takes a JSON list of strings or of {"instruction", "input"} records (AlpacaEval / AlpacaFarm);
--out writes a JSON list of {"instruction", "input", "output", "generator"} records, which AlpacaEval reads.
With --template alpaca (the default) each prompt is wrapped in the Alpaca template the SFT models were
trained on. --temperature 0 is greedy decoding, as the paper's evaluation. --adapter loads a PEFT LoRA
adapter (ours or one trained with PEFT on the same base); --merge folds it into W first (faster decoding).
"""
import argparse
import json
import os
import sys

import torch

from llama import Llama, Tokenizer, alpaca_prompt, generate, left_pad
from lora import count_parameters, load_adapter, merge_lora


def read_prompts(args):
    if args.prompt is not None:
        return [{"instruction": args.prompt, "input": ""}]
    if not os.path.exists(args.prompts):
        raise FileNotFoundError(f"prompts file {args.prompts} does not exist")
    try:
        with open(args.prompts) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{args.prompts}: malformed JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{args.prompts}: expected a JSON list of strings or {{instruction, input}} records")
    records = []
    for i, r in enumerate(data):
        if isinstance(r, str):
            r = {"instruction": r}
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise ValueError(f"{args.prompts}: record {i} has no string field 'instruction'")
        records.append({"instruction": r["instruction"], "input": r.get("input", "") or ""})
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="directory with config.json or params.json and weights")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one instruction")
    src.add_argument("--prompts", help="JSON list of strings or {instruction, input} records")
    p.add_argument("--tokenizer", help="tokenizer.model (default: in --checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--template", choices=["alpaca", "none"], default="alpaca")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write AlpacaEval JSON records here")
    p.add_argument("--generator", help="name in the 'generator' field (default: the checkpoint's name)")
    p.add_argument("--adapter", help="PEFT LoRA adapter directory (adapter_config.json + weights) for --checkpoint")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the weights before sampling")
    args = p.parse_args(argv)
    if args.merge and not args.adapter:
        raise ValueError("--merge needs --adapter")

    records = read_prompts(args)
    tok_path = args.tokenizer or os.path.join(args.checkpoint, "tokenizer.model")
    tokenizer = Tokenizer(tok_path)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = Llama.from_pretrained(args.checkpoint, device=args.device, dtype=dtype).eval()
    if tokenizer.n_words > model.cfg.vocab_size:
        raise ValueError(f"{tok_path} has {tokenizer.n_words} tokens but the model only {model.cfg.vocab_size}")
    if args.adapter:  # A, B kept in fp32 so a bf16 merge rounds W + dW once, not dW first
        load_adapter(model, args.adapter, lora_dtype=torch.float32)
        if args.merge:
            merge_lora(model)
        print(f"adapter {args.adapter}: {count_parameters(model)[0]:,} LoRA parameters"
              f"{', merged into W' if args.merge else ''}", flush=True)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    name = args.generator or os.path.basename(os.path.normpath(args.checkpoint))

    for i in range(0, len(records), args.batch_size):
        batch = records[i:i + args.batch_size]
        texts = [alpaca_prompt(r["instruction"], r["input"]) if args.template == "alpaca"
                 else "\n".join(s for s in (r["instruction"], r["input"]) if s) for r in batch]
        tokens, mask = left_pad([tokenizer.encode(t) for t in texts], tokenizer.pad_id)
        out, out_mask, _ = generate(model, tokens.to(args.device), mask.to(args.device), args.max_new_tokens,
                                    args.temperature, args.top_p, tokenizer.eos_id, tokenizer.pad_id, generator)
        for r, ids, m in zip(batch, out.tolist(), out_mask.tolist()):
            r["output"] = tokenizer.decode([t for t, keep in zip(ids, m) if keep]).strip()
            r["generator"] = name
            print(f"### {r['instruction']}\n{r['output']}\n", flush=True)

    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=2)
        os.replace(tmp, args.out)
        print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
