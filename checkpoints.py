"""
The checkpoints a reader brings and the files a run leaves behind, read and written in their own layouts.

    LLaMA         Hugging Face (config.json + *.safetensors / pytorch_model*.bin, sharded or not) or Meta
                  (params.json + consolidated.NN.pth); one Meta <-> Hugging Face name table, below
    LoRA adapter  PEFT's layout (adapter_config.json + adapter_model.safetensors), which PEFT and vLLM load
    reward model  AlpacaFarm's layout (config.json with model_type "reward_model"; backbone_model.* + reward_head.*)
    prompts       a JSON list or JSONL of {"instruction", "input"} records (or plain strings)
    outputs       AlpacaEval JSON: a list of {"instruction", "input", "output", "generator"}

Inside the model every parameter keeps Meta's name (wq, w1, attention_norm, ...); names are translated here and
nowhere else. Each file is checked as it is read by one call into support/formats.py, which refuses by name what
we do not implement; every write is atomic (support/files.py).

    policy = load_llama("llama-7b-hf", device="cuda", dtype=torch.bfloat16)
    rm = load_reward_model("reward-model-human", device="cuda", dtype=torch.bfloat16)
    save_adapter(policy, "out/adapter")
"""
import os
import re

import torch

import lora
from llama import Llama, LlamaConfig, Tokenizer
from reward import RewardModel
from support import files, formats

# -----------------------------------------------------------------------------
# names: one table, both directions (Meta name piece <-> Hugging Face name piece)

LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
               "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
               "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}
TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
DERIVED = ("rotary_emb.inv_freq", "rope.freqs")  # rotary tables some writers save; recomputed from the config


def meta_to_hf_name(name):
    # "layers.3.attention.wq.weight" -> "model.layers.3.self_attn.q_proj.weight"
    module, suffix = name.rsplit(".", 1)
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{suffix}"
    _, i, part = module.split(".", 2)
    return f"model.layers.{i}.{LAYER_NAMES[part]}.{suffix}"


def hf_to_meta_name(name):
    # the inverse; None for names that are not LLaMA weights
    module, _, suffix = name.rpartition(".")
    for meta, hf in TOP_NAMES.items():
        if module == hf:
            return f"{meta}.{suffix}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    for meta, hf in LAYER_NAMES.items():
        if m and m.group(2) == hf:
            return f"layers.{m.group(1)}.{meta}.{suffix}"
    return None


def meta_to_hf_rotary(w, n_heads):
    # Meta rotates interleaved pairs (2i, 2i+1) of each head; we rotate halves (i, i + hd/2): reorder rows
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


# -----------------------------------------------------------------------------
# LLaMA's shape: config.json (Hugging Face) or params.json (Meta)

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # what Meta's params.json "use_scaled_rope": true means


def hf_llama_config(c, file, types=formats.HF_TYPES, classes=formats.HF_CLASSES):
    """A LlamaConfig from a parsed Hugging Face config.json. Rotary settings: transformers >= 5 writes rope_parameters
    {"rope_theta", "rope_type", ...}; 4.x a top-level rope_theta and rope_scaling {"type" or "rope_type", ...}."""
    formats.check_hf_config(c, file, types, classes)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None if kind == "default" else {"rope_type": kind, **{k: rope[k] for k in formats.ROPE_FIELDS[kind]}}
    return LlamaConfig(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                       n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
                       hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
                       rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)), rope_scaling=scaling,
                       max_seq_len=c.get("max_position_embeddings", 2048))


def meta_llama_config(c, file, path):
    """A LlamaConfig from a parsed Meta params.json."""
    formats.check_meta_config(c, file)
    hidden = int(2 * 4 * c["dim"] / 3)  # Meta's FFN width rule
    if c.get("ffn_dim_multiplier") is not None:
        hidden = int(c["ffn_dim_multiplier"] * hidden)
    hidden = c["multiple_of"] * ((hidden + c["multiple_of"] - 1) // c["multiple_of"])
    vocab = c.get("vocab_size", -1)
    if vocab == -1:  # "from the tokenizer", which sits beside the weights or one level up
        vocab = Tokenizer(formats.find_tokenizer(file, [os.path.join(path, "tokenizer.model"),
                                                        os.path.join(path, "..", "tokenizer.model")])).n_words
    formats.check_numbers({"vocab_size": vocab}, file, ("vocab_size",))
    return LlamaConfig(dim=c["dim"], n_layers=c["n_layers"], n_heads=c["n_heads"], n_kv_heads=c.get("n_kv_heads"),
                       vocab_size=vocab, hidden_dim=hidden, norm_eps=c.get("norm_eps", 1e-6),
                       rope_theta=c.get("rope_theta", 10000.0), rope_scaling=LLAMA31_ROPE if c.get("use_scaled_rope")
                       else None, max_seq_len=c.get("max_seq_len", 2048))


def read_config(path, types=formats.HF_TYPES, classes=formats.HF_CLASSES):
    file = formats.config_file(path)  # config.json (Hugging Face) or else params.json (Meta)
    c = files.read_json(file, dict)
    try:
        cfg = hf_llama_config(c, file, types, classes) if file.endswith("config.json") else \
            meta_llama_config(c, file, path)
    except KeyError as e:
        raise ValueError(f"{file}: missing field {e}") from None
    formats.check_heads(cfg, file)
    return cfg


def llama_config_fields(cfg):
    """A LlamaConfig in Hugging Face config.json names (rope_scaling in the form transformers 4.x and 5 read)."""
    return {"hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_seq_len,
            **({"rope_scaling": cfg.rope_scaling} if cfg.rope_scaling else {})}


# -----------------------------------------------------------------------------
# LLaMA weights

def join_shards(name, parts, shape, file):
    """One tensor from Meta's model-parallel shards: replicated (norms), or split along the one dimension whose
    sizes add up to the model's (LLaMA-3 splits tok_embeddings by vocabulary, LLaMA-1/2 by model width)."""
    if shape is None or tuple(parts[0].shape) == tuple(shape):
        return parts[0]
    return torch.cat(parts, dim=formats.shard_dim(name, parts, shape, file))


def iter_tensors(path, shapes=None):
    """(name, tensor) over all weight files of a checkpoint directory, one tensor in memory at a time. shapes: the
    model's tensor shapes by checkpoint name, to join Meta's model-parallel shards."""
    weights = formats.weight_files(path)
    formats.check_shards(path, weights)
    if weights[0].endswith(".safetensors"):
        for file in weights:
            with formats.open_safetensors(file) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
    elif weights[0].endswith(".bin"):
        for file in weights:
            yield from formats.load_pt(file).items()
    else:  # Meta: model-parallel shards are joined back, key by key
        shards = [formats.load_pt(f) for f in weights]
        for name in shards[0]:
            yield name, join_shards(name, [s[name] for s in shards], (shapes or {}).get(name),
                                    os.path.join(path, "consolidated.*.pth"))


def load_weights(model, path, prefix="", extra=None):
    """Fill a Llama from a Hugging Face or Meta checkpoint in `path`, converting names and the rotary order.
    Hugging Face names have `prefix` stripped first; extra: more parameters to fill, by checkpoint key (a reward
    head), in the same pass. Returns the checkpoint keys nothing used (derived rotary tables dropped silently)."""
    meta_layout = not os.path.exists(os.path.join(path, "config.json"))
    params = {**dict(model.named_parameters()), **(extra or {})}
    cfg, filled, unused = model.cfg, set(), []
    for key, tensor in iter_tensors(path, {n: p.shape for n, p in params.items()} if meta_layout else None):
        if key.endswith(DERIVED):
            continue
        if meta_layout:
            name = key
            if key.endswith(".attention.wq.weight"):
                tensor = meta_to_hf_rotary(tensor, cfg.n_heads)
            elif key.endswith(".attention.wk.weight"):
                tensor = meta_to_hf_rotary(tensor, cfg.n_kv_heads or cfg.n_heads)
        else:
            name = key if key in (extra or {}) else hf_to_meta_name(key[len(prefix):]) if key.startswith(prefix) \
                else None
        if name not in params:
            unused.append(key)
            continue
        formats.check_shape(path, key, tensor, params[name])
        with torch.no_grad():
            params[name].copy_(tensor)
        filled.add(name)
    if "output.weight" not in filled and "tok_embeddings.weight" in filled and not meta_layout \
            and files.read_json(os.path.join(path, "config.json"), dict).get("tie_word_embeddings", False):
        with torch.no_grad():
            params["output.weight"].copy_(params["tok_embeddings.weight"])
        filled.add("output.weight")
    formats.check_complete(path, params, filled)
    return unused


def empty_model(cls, cfg, device, dtype, **kwargs):
    """Build on the meta device, then allocate once in `dtype` on `device`: a 7B checkpoint never needs twice
    its size in memory. The weights are uninitialized until loaded."""
    with torch.device("meta"):
        model = cls(cfg, **kwargs)
    return model.to(dtype).to_empty(device=device)


def load_llama(path, device="cpu", dtype=torch.float32):
    model = empty_model(Llama, read_config(path), device, dtype)
    formats.refuse_unused(path, load_weights(model, path))
    return model


def save_llama(model, path):
    """Write a Llama in the Hugging Face layout (config.json + model.safetensors)."""
    os.makedirs(path, exist_ok=True)
    files.save_safetensors(os.path.join(path, "model.safetensors"),
                           {meta_to_hf_name(n): p for n, p in model.state_dict().items()})
    files.write_json(os.path.join(path, "config.json"), {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **llama_config_fields(model.cfg),
        "tie_word_embeddings": False})


# -----------------------------------------------------------------------------
# PEFT LoRA adapters

PEFT_PREFIX = "base_model.model.model.layers"
META_TO_HF = {t: LAYER_NAMES[f"{p}.{t}"].split(".")[1] for t, p in lora.TARGETS.items()}  # "wq" -> "q_proj"
HF_TO_META = {hf: t for t, hf in META_TO_HF.items()}


def peft_key(i, t, ab):  # e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    return f"{PEFT_PREFIX}.{i}.{LAYER_NAMES[f'{lora.TARGETS[t]}.{t}']}.lora_{ab}.weight"


def save_adapter(model, dir, base_model_name_or_path=None):
    """Write dir/adapter_config.json and dir/adapter_model.safetensors (PEFT names, no adapter name)."""
    layers = lora.lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: model has no LoRA layers")
    hyper = {(m.rank, m.alpha, m.dropout.p) for _, _, m in layers}
    assert len(hyper) == 1, f"one adapter file holds one (rank, alpha, dropout), model has {hyper}"
    rank, alpha, p = hyper.pop()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": p,
        "target_modules": sorted({META_TO_HF[t] for _, t, _ in layers}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False, "revision": None,
    }
    tensors = {}
    for i, t, m in layers:
        tensors[peft_key(i, t, "A")] = m.lora_A  # (rank, in)
        tensors[peft_key(i, t, "B")] = m.lora_B  # (out, rank)
    os.makedirs(dir, exist_ok=True)
    files.save_safetensors(os.path.join(dir, "adapter_model.safetensors"), tensors)
    files.write_json(os.path.join(dir, "adapter_config.json"), config)


def read_adapter_weights(dir):
    path, sd = formats.read_adapter_file(dir)  # adapter_model.safetensors, else adapter_model.bin
    # some writers keep PEFT's adapter name in the key (lora_A.default.weight); saved files usually don't
    return path, {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
                  for k, v in sd.items()}


def load_adapter(model, dir, lora_dtype=None):
    """Load a PEFT LoRA adapter into a Llama, injecting LoRA layers first if it has none. Every key, shape
    and field is checked before the model is touched."""
    cfg_path = os.path.join(dir, "adapter_config.json")
    c = formats.check_adapter_config(files.read_json(cfg_path, dict), cfg_path, HF_TO_META)
    path, sd = read_adapter_weights(dir)
    rank, alpha, targets = c["r"], c["lora_alpha"], sorted(HF_TO_META[n] for n in c["target_modules"])
    existing = lora.lora_layers(model)
    formats.check_lora_layers(existing, rank, alpha, targets, cfg_path)
    expected = {}  # PEFT key -> expected shape
    for i, layer in enumerate(model.layers):
        for t in targets:
            m = getattr(getattr(layer, lora.TARGETS[t]), t)
            expected[peft_key(i, t, "A")] = (rank, m.in_features)
            expected[peft_key(i, t, "B")] = (m.out_features, rank)
    formats.check_adapter_keys(sd, expected, path, cfg_path, c, len(model.layers))
    if not existing:
        lora.add_lora(model, rank, alpha, float(c.get("lora_dropout", 0.0)), targets, lora_dtype)
    with torch.no_grad():
        for i, t, m in lora.lora_layers(model):
            m.lora_A.copy_(sd[peft_key(i, t, "A")])
            m.lora_B.copy_(sd[peft_key(i, t, "B")])
    return model


# -----------------------------------------------------------------------------
# AlpacaFarm reward models

RM_PREFIX = "backbone_model."  # AlpacaFarm: RewardModel.backbone_model is a LlamaForCausalLM


def load_reward_model(path, device="cpu", dtype=torch.float32, backbone_path=None):
    """An AlpacaFarm reward checkpoint or one written by save_reward_model. The LLaMA shape comes from config.json
    itself (our files carry the LLaMA fields alongside), else from the backbone's config.json: backbone_path, or
    AlpacaFarm's backbone_model_name_or_path field. config.json's score_eos says whether the model was trained on
    sequences ending in EOS; AlpacaFarm's files lack it and were not (its rollout scores the response text
    re-tokenized without special tokens), so it defaults to false."""
    file = os.path.join(path, "config.json")
    c = files.read_json(file, dict)
    formats.check_reward_config(c, file)
    if "hidden_size" in c and backbone_path is None:
        cfg = read_config(path, ("reward_model",), ("RewardModel",))
    else:
        backbone_path = backbone_path or c.get("backbone_model_name_or_path")
        formats.check_backbone(path, backbone_path)
        cfg = read_config(backbone_path)
    model = empty_model(RewardModel, cfg, device, dtype, score_eos=c.get("score_eos", False))
    head = {f"reward_head.{n}": p for n, p in model.reward_head.named_parameters()}
    formats.refuse_unused(path, load_weights(model.backbone, path, RM_PREFIX, head), "a reward model")
    return model


def save_reward_model(rm, path, backbone_model_name_or_path=None, score_eos=None):
    """AlpacaFarm's layout, with the LLaMA fields in config.json so the file is self-contained. LoRA adapters
    (if the backbone has them) are folded into the saved weights, W + (alpha/rank) B A; rm is not changed.
    score_eos: whether rm was trained on sequences ending in EOS (default: rm.score_eos, true for a new model)."""
    tensors = {n: p for n, p in rm.backbone.state_dict().items() if ".lora_" not in n}
    for i, t, m in lora.lora_layers(rm.backbone):
        if not m.merged:
            w = m.weight.float() + m.delta_weight().float()
            tensors[f"layers.{i}.{lora.TARGETS[t]}.{t}.weight"] = w.to(m.weight.dtype)
    tensors = {RM_PREFIX + meta_to_hf_name(n): t for n, t in tensors.items()}
    tensors.update({f"reward_head.{n}": p for n, p in rm.reward_head.named_parameters()})
    os.makedirs(path, exist_ok=True)
    files.save_safetensors(os.path.join(path, "model.safetensors"), tensors)
    files.write_json(os.path.join(path, "config.json"), {
        "architectures": ["RewardModel"], "model_type": "reward_model",
        "backbone_model_name_or_path": backbone_model_name_or_path, **llama_config_fields(rm.backbone.cfg),
        "score_eos": rm.score_eos if score_eos is None else score_eos})


# -----------------------------------------------------------------------------
# prompts in, AlpacaEval records out

def read_prompts(path):
    """Records {"instruction", "input", ...} from a JSON list or JSONL file of records or plain strings."""
    records = [{"instruction": r} if isinstance(r, str) else r for r in formats.read_prompt_file(path)]
    formats.check_prompts(records, path)
    return [{**r, "input": r.get("input") or ""} for r in records]


def write_alpaca_eval(path, records, outputs, generator):
    files.write_json(path, [{"instruction": r["instruction"], "input": r.get("input") or "", "output": o,
                       "generator": generator} for r, o in zip(records, outputs)], indent=1)
