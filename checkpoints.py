"""
Every file this project reads or writes, in one place: the formats of the checkpoints users bring and the
files a run leaves behind.

    LLaMA         Hugging Face (config.json + *.safetensors / pytorch_model*.bin, sharded or not) or Meta
                  (params.json + consolidated.NN.pth); one Meta <-> Hugging Face name table, below
    LoRA adapter  PEFT's layout (adapter_config.json + adapter_model.safetensors), which PEFT and vLLM load
    reward model  AlpacaFarm's layout (config.json with model_type "reward_model"; backbone_model.* + reward_head.*)
    prompts       a JSON list or JSONL of {"instruction", "input"} records (or plain strings)
    outputs       AlpacaEval JSON: a list of {"instruction", "input", "output", "generator"}

Inside the model every parameter keeps Meta's name (wq, w1, attention_norm, ...); names are translated
here and nowhere else. A file or field whose meaning we do not implement is refused by name, never loaded
as something else. Every write goes to a temporary file that is renamed into place, so a crash leaves the
old file or the new one, never half of one.

    policy = load_llama("llama-7b-hf", device="cuda", dtype=torch.bfloat16)
    rm = load_reward_model("reward-model-human", device="cuda", dtype=torch.bfloat16)
    save_adapter(policy, "out/adapter")
"""
import glob
import json
import os
import pickle
import re
import tempfile

import torch

import lora
from llama import Llama, LlamaConfig, Tokenizer
from reward import RewardModel

# -----------------------------------------------------------------------------
# reading and writing safely

def read_json(path):
    """The parsed JSON file; a missing or malformed file is one error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None


def atomic_write(path, write):
    """write(tmp_path), then rename over `path`: readers see the old file or the new one, never half of one.
    The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj, indent=2):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
    atomic_write(path, write)


def save_safetensors(path, tensors):
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


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
# LLaMA: config.json (Hugging Face) or params.json (Meta). What is not LLaMA's math is refused by name.

HF_TYPES, HF_CLASSES = ("llama", "mistral"), ("LlamaForCausalLM", "MistralForCausalLM")  # Mistral: no sliding window
# the params.json fields of Meta's LLaMA 1 to 3.2 code; anything else set (vision, MoE, quantization) is refused
META_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len", "max_batch_size")
# the rotary types implemented (llama.rotary_frequencies) and the fields each needs
ROPE_FIELDS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # what Meta's params.json "use_scaled_rope": true means


def refuse(file, field, value, why):
    raise ValueError(f"{file}: {field} = {json.dumps(value)} {why}")


def check_numbers(c, file, ints, floats=()):
    # present fields must be positive integers / positive finite numbers (JSON true is not a number)
    for n in ints:
        if c.get(n) is not None and not (type(c[n]) is int and c[n] > 0):
            refuse(file, n, c[n], "must be a positive integer")
    for n in floats:
        if c.get(n) is not None and not (type(c[n]) in (int, float) and 0 < c[n] < float("inf")):
            refuse(file, n, c[n], "must be a positive number")


def hf_rope(c, file):
    """(rope_theta, rope_scaling) of a config.json: transformers >= 5 writes rope_parameters {"rope_theta",
    "rope_type", ...}; 4.x a top-level rope_theta and rope_scaling {"type" or "rope_type", "factor", ...}."""
    field = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    p = c.get(field) or {}
    if not isinstance(p, dict):
        refuse(file, field, p, "must be an object")
    theta = p.get("rope_theta", c.get("rope_theta", 10000.0))
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ROPE_FIELDS:
        refuse(file, f"{field}.{'rope_type' if 'rope_type' in p else 'type'}", kind,
               f"is not supported (supported: {', '.join(ROPE_FIELDS)})")
    missing = [k for k in ROPE_FIELDS[kind] if k not in p]
    if missing:
        refuse(file, field, p, f"lacks {', '.join(missing)}, which rope_type {kind!r} needs")
    check_numbers({"rope_theta": theta, **{f"{field}.{k}": p[k] for k in ROPE_FIELDS[kind]}}, file, (),
                  ["rope_theta"] + [f"{field}.{k}" for k in ROPE_FIELDS[kind]])
    if kind == "llama3" and p["high_freq_factor"] <= p["low_freq_factor"]:
        refuse(file, f"{field}.high_freq_factor", p["high_freq_factor"], "must exceed low_freq_factor")
    partial = p.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        refuse(file, "partial_rotary_factor", partial, "is not supported (LLaMA rotates the whole head)")
    return theta, (None if kind == "default" else {"rope_type": kind, **{k: p[k] for k in ROPE_FIELDS[kind]}})


def hf_llama_config(c, file, types=HF_TYPES, classes=HF_CLASSES):
    """A LlamaConfig from a parsed Hugging Face config.json."""
    if c.get("model_type", "llama") not in types:
        refuse(file, "model_type", c["model_type"], f"is not supported (supported: {', '.join(types)})")
    if any(a not in classes for a in c.get("architectures") or []):
        refuse(file, "architectures", c["architectures"], f"is not supported (supported: {', '.join(classes)})")
    check_numbers(c, file, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "vocab_size", "max_position_embeddings"), ("rms_norm_eps",))
    dim, heads = c["hidden_size"], c["num_attention_heads"]
    for field, ok, why in (("hidden_act", c.get("hidden_act", "silu") == "silu", "is not supported (SwiGLU: silu)"),
                           ("head_dim", c.get("head_dim") in (None, dim // heads),
                            f"differs from hidden_size / num_attention_heads = {dim // heads}, which is not LLaMA"),
                           ("attention_bias", not c.get("attention_bias"), "is not supported (LLaMA has no biases)"),
                           ("mlp_bias", not c.get("mlp_bias"), "is not supported (LLaMA has no biases)"),
                           ("sliding_window", c.get("sliding_window") is None,
                            "is not supported (every token attends to the whole context)"),
                           ("quantization_config", not c.get("quantization_config"), "is not supported (quantized "
                            "weights); use the full-precision checkpoint")):
        if not ok:
            refuse(file, field, c[field], why)
    theta, scaling = hf_rope(c, file)
    return LlamaConfig(dim=dim, n_layers=c["num_hidden_layers"], n_heads=heads,
                       n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
                       hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=theta,
                       rope_scaling=scaling, max_seq_len=c.get("max_position_embeddings", 2048))


def meta_llama_config(c, file, path):
    """A LlamaConfig from a parsed Meta params.json."""
    for field in c:
        if field not in META_FIELDS and c[field] not in (None, False, "", [], {}):
            refuse(file, field, c[field], f"is not supported (params.json fields read: {', '.join(META_FIELDS)})")
    check_numbers(c, file, ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"),
                  ("ffn_dim_multiplier", "norm_eps", "rope_theta"))
    hidden = int(2 * 4 * c["dim"] / 3)  # Meta's FFN width rule
    if c.get("ffn_dim_multiplier") is not None:
        hidden = int(c["ffn_dim_multiplier"] * hidden)
    hidden = c["multiple_of"] * ((hidden + c["multiple_of"] - 1) // c["multiple_of"])
    vocab = c.get("vocab_size", -1)
    if vocab == -1:  # "from the tokenizer", which sits beside the weights or one level up
        tok = [p for p in (os.path.join(path, "tokenizer.model"), os.path.join(path, "..", "tokenizer.model"))
               if os.path.exists(p)]
        if not tok:
            raise ValueError(f"{file}: vocab_size is -1 and no tokenizer.model was found to count it")
        vocab = Tokenizer(tok[0]).n_words
    check_numbers({"vocab_size": vocab}, file, ("vocab_size",))
    return LlamaConfig(dim=c["dim"], n_layers=c["n_layers"], n_heads=c["n_heads"], n_kv_heads=c.get("n_kv_heads"),
                       vocab_size=vocab, hidden_dim=hidden, norm_eps=c.get("norm_eps", 1e-6),
                       rope_theta=c.get("rope_theta", 10000.0), rope_scaling=LLAMA31_ROPE if c.get("use_scaled_rope")
                       else None, max_seq_len=c.get("max_seq_len", 2048))


def read_config(path, types=HF_TYPES, classes=HF_CLASSES):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    hf, meta = os.path.join(path, "config.json"), os.path.join(path, "params.json")
    file = hf if os.path.exists(hf) else meta if os.path.exists(meta) else None
    if file is None:
        raise FileNotFoundError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")
    c = read_json(file)
    names = ("hidden_size", "num_attention_heads", "num_key_value_heads") if file == hf else \
        ("dim", "n_heads", "n_kv_heads")
    try:
        cfg = hf_llama_config(c, file, types, classes) if file == hf else meta_llama_config(c, file, path)
    except KeyError as e:
        raise ValueError(f"{file}: missing field {e}") from None
    if cfg.dim % cfg.n_heads or cfg.dim // cfg.n_heads % 2:  # heads split dim evenly; rotary turns pairs
        refuse(file, names[1], cfg.n_heads, f"must divide {names[0]} = {cfg.dim} into heads of even size")
    if cfg.n_heads % (cfg.n_kv_heads or cfg.n_heads):
        refuse(file, names[2], cfg.n_kv_heads, f"must divide {names[1]} = {cfg.n_heads}")
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

def weight_files(path):
    for pattern in ("*.safetensors", "pytorch_model*.bin", "consolidated.*.pth"):
        files = sorted(glob.glob(os.path.join(path, pattern)))
        if files:
            return files
    raise FileNotFoundError(f"{path}: no weights (*.safetensors, pytorch_model*.bin or consolidated.*.pth)")


def open_safetensors(file):
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e}); truncated or corrupt?") from None


def load_pt(file):
    """A PyTorch state dict, read with weights_only: a pickle that would run code is refused, not executed."""
    try:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as e:
        if str(e).startswith("Weights only load failed"):
            raise ValueError(f"{file}: refused: it holds Python objects besides tensors, which could run code when "
                             f"unpickled; expected a state dict of tensors") from None
        raise ValueError(f"{file}: not a readable PyTorch file ({type(e).__name__}); truncated or corrupt?") from None
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise ValueError(f"{file}: not a state dict of tensors")
    return sd


def join_shards(name, parts, shape, file):
    """One tensor from Meta's model-parallel shards: replicated (norms), or split along the one dimension whose
    sizes add up to the model's (LLaMA-3 splits tok_embeddings by vocabulary, LLaMA-1/2 by model width)."""
    if shape is None or tuple(parts[0].shape) == tuple(shape):
        return parts[0]
    dims = [d for d in range(len(shape)) if all(p.dim() == len(shape) for p in parts) and
            sum(p.shape[d] for p in parts) == shape[d] and
            all(p.shape[:d] + p.shape[d + 1:] == shape[:d] + shape[d + 1:] for p in parts)]
    if len(dims) != 1:
        raise ValueError(f"{file}: the {len(parts)} shards of {name} have shapes {[tuple(p.shape) for p in parts]}, "
                         f"which do not join into {tuple(shape)} (check params.json)")
    return torch.cat(parts, dim=dims[0])


def iter_tensors(path, shapes=None):
    """(name, tensor) over all weight files of a checkpoint directory, one tensor in memory at a time. shapes: the
    model's tensor shapes by checkpoint name, to join Meta's model-parallel shards."""
    files = weight_files(path)
    index = os.path.join(path, {".safetensors": "model.safetensors.index.json",
                                ".bin": "pytorch_model.bin.index.json"}.get(os.path.splitext(files[0])[1], ""))
    if os.path.isfile(index):  # a sharded checkpoint must have all its shards
        missing = set(read_json(index).get("weight_map", {}).values()) - {os.path.basename(f) for f in files}
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(sorted(missing))}")
    if files[0].endswith(".safetensors"):
        for file in files:
            with open_safetensors(file) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
    elif files[0].endswith(".bin"):
        for file in files:
            yield from load_pt(file).items()
    else:  # Meta: model-parallel shards are joined back, key by key
        shards = [load_pt(f) for f in files]
        for name in shards[0]:
            yield name, join_shards(name, [s[name] for s in shards], (shapes or {}).get(name),
                                    os.path.join(path, "consolidated.*.pth"))


# tensors that LLaMA lacks and look-alike architectures have: named by what they are
FOREIGN = ((r"_proj\.bias$", "biases on linear layers (attention_bias / mlp_bias, or Qwen2-style q, k, v biases)"),
           (r"\.[qk]_norm\.", "q/k norms (Qwen3-style)"))


def refuse_unused(path, unused, what="the model"):
    for pattern, kind in FOREIGN:
        hits = [k for k in unused if re.search(pattern, k)]
        if hits:
            raise ValueError(f"{path}: checkpoint has {kind}, e.g. {hits[0]}; LLaMA has none (not supported)")
    if unused:
        raise ValueError(f"{path}: checkpoint has tensors {what} does not use: {', '.join(unused[:5])}")


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
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the config says "
                             f"{tuple(params[name].shape)} (check config.json / params.json)")
        with torch.no_grad():
            params[name].copy_(tensor)
        filled.add(name)
    if "output.weight" not in filled and "tok_embeddings.weight" in filled and not meta_layout \
            and read_json(os.path.join(path, "config.json")).get("tie_word_embeddings", False):
        with torch.no_grad():
            params["output.weight"].copy_(params["tok_embeddings.weight"])
        filled.add("output.weight")
    missing = [n for n in params if n not in filled]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} of the tensors the config needs, e.g. "
                         f"{', '.join(missing[:3])}")
    return unused


def empty_model(cls, cfg, device, dtype):
    """Build on the meta device, then allocate once in `dtype` on `device`: a 7B checkpoint never needs twice
    its size in memory. The weights are uninitialized until loaded."""
    with torch.device("meta"):
        model = cls(cfg)
    return model.to(dtype).to_empty(device=device)


def load_llama(path, device="cpu", dtype=torch.float32):
    model = empty_model(Llama, read_config(path), device, dtype)
    refuse_unused(path, load_weights(model, path))
    return model


def save_llama(model, path):
    """Write a Llama in the Hugging Face layout (config.json + model.safetensors)."""
    os.makedirs(path, exist_ok=True)
    save_safetensors(os.path.join(path, "model.safetensors"),
                     {meta_to_hf_name(n): p for n, p in model.state_dict().items()})
    write_json(os.path.join(path, "config.json"), {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                   **llama_config_fields(model.cfg), "tie_word_embeddings": False})


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
    save_safetensors(os.path.join(dir, "adapter_model.safetensors"), tensors)
    write_json(os.path.join(dir, "adapter_config.json"), config)


# adapter_config.json fields that mean plain LoRA, W + (lora_alpha / r) B A on the named modules, with the values
# that keep that meaning (None: any). Any other field that is set (not null, false, empty) is refused by name: PEFT
# keeps adding variants (DoRA, rsLoRA, activated LoRA, ...) that reuse LoRA's keys but compute something else.
PEFT_PLAIN = {"peft_type": ("LORA",), "r": None, "lora_alpha": None, "lora_dropout": None, "target_modules": None,
              "bias": ("none",), "fan_in_fan_out": (False,), "init_lora_weights": (True, False, "gaussian"),
              "task_type": None, "base_model_name_or_path": None, "revision": None, "inference_mode": None,
              "auto_mapping": None, "peft_version": None, "layers_pattern": None, "megatron_core": None,
              "qalora_group_size": None, "runtime_config": None}


def read_adapter_config(path):
    c = read_json(path)
    for field, value in c.items():
        if field not in PEFT_PLAIN and value:  # null, false, 0 and empty are "unset"
            refuse(path, field, value, "is not plain LoRA, W + (lora_alpha / r) B A, the one kind that loads here")
        allowed = PEFT_PLAIN.get(field)
        if allowed and not any(value == a and type(value) is type(a) for a in allowed):
            refuse(path, field, value, f"is not supported (supported: {', '.join(map(json.dumps, allowed))})")
    if c.get("peft_type") != "LORA":
        refuse(path, "peft_type", c.get("peft_type"), 'is not supported (supported: "LORA")')
    if not (type(c.get("r")) is int and c["r"] > 0):
        refuse(path, "r", c.get("r"), "must be a positive integer")
    if type(c.get("lora_alpha")) not in (int, float):
        refuse(path, "lora_alpha", c.get("lora_alpha"), "must be a number")
    if not isinstance(c.get("target_modules"), list) or any(n not in HF_TO_META for n in c["target_modules"]):
        refuse(path, "target_modules", c.get("target_modules"), f"must be a list of {', '.join(HF_TO_META)}")
    return c


def read_adapter_weights(dir):
    st, bin_ = os.path.join(dir, "adapter_model.safetensors"), os.path.join(dir, "adapter_model.bin")
    if os.path.isfile(st):
        with open_safetensors(st) as f:
            path, sd = st, {k: f.get_tensor(k) for k in f.keys()}
    elif os.path.isfile(bin_):
        path, sd = bin_, load_pt(bin_)
    else:
        raise FileNotFoundError(f"{dir}: neither adapter_model.safetensors nor adapter_model.bin found")
    # some writers keep PEFT's adapter name in the key (lora_A.default.weight); saved files usually don't
    return path, {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
                  for k, v in sd.items()}


def load_adapter(model, dir, lora_dtype=None):
    """Load a PEFT LoRA adapter into a Llama, injecting LoRA layers first if it has none. Every key, shape
    and field is checked before the model is touched."""
    cfg_path = os.path.join(dir, "adapter_config.json")
    c = read_adapter_config(cfg_path)
    path, sd = read_adapter_weights(dir)
    rank, alpha, targets = c["r"], c["lora_alpha"], sorted(HF_TO_META[n] for n in c["target_modules"])
    existing = lora.lora_layers(model)
    if existing:
        have = ({m.rank for _, _, m in existing}, {m.alpha for _, _, m in existing},
                sorted({t for _, t, _ in existing}))
        if have != ({rank}, {alpha}, targets):
            raise ValueError(f"{cfg_path}: adapter has r={rank}, lora_alpha={alpha}, targets {targets}; "
                             f"model's LoRA layers have r={have[0]}, alpha={have[1]}, targets {have[2]}")
        if any(m.merged for _, _, m in existing):
            raise ValueError("load_adapter: model's LoRA layers are merged; unmerge_lora(model) first")
    expected = {}  # PEFT key -> expected shape
    for i, layer in enumerate(model.layers):
        for t in targets:
            m = getattr(getattr(layer, lora.TARGETS[t]), t)
            expected[peft_key(i, t, "A")] = (rank, m.in_features)
            expected[peft_key(i, t, "B")] = (m.out_features, rank)
    for k, v in sd.items():
        if k not in expected:
            raise ValueError(f"{path}: unexpected key {k!r} (model has {len(model.layers)} layers, "
                             f"targets {c['target_modules']} from {cfg_path})")
        if tuple(v.shape) != expected[k]:
            raise ValueError(f"{path}: key {k!r} has shape {tuple(v.shape)}, expected {expected[k]} "
                             f"(r={rank} from {cfg_path})")
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} keys, first {missing[0]!r}")
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
    """An AlpacaFarm reward checkpoint or one written by save_reward_model.

    The LLaMA shape comes from config.json itself (our files carry the LLaMA fields alongside), else from
    the backbone's config.json: backbone_path, or AlpacaFarm's backbone_model_name_or_path field. config.json's
    score_eos says whether the model was trained on sequences ending in EOS; AlpacaFarm's files lack it and
    were not (its rollout scores the response text re-tokenized without special tokens), so it defaults to false.
    """
    file = os.path.join(path, "config.json")
    c = read_json(file)
    if c.get("model_type") != "reward_model":
        refuse(file, "model_type", c.get("model_type"), 'is not a reward model (expected "reward_model")')
    if type(c.get("score_eos", False)) is not bool:
        refuse(file, "score_eos", c["score_eos"], "must be true or false")
    if "hidden_size" in c and backbone_path is None:
        cfg = read_config(path, ("reward_model",), ("RewardModel",))
    else:
        backbone_path = backbone_path or c.get("backbone_model_name_or_path")
        if not backbone_path or not os.path.isfile(os.path.join(backbone_path, "config.json")):
            raise FileNotFoundError(
                f"{path}/config.json has no LLaMA fields and its backbone_model_name_or_path "
                f"({backbone_path!r}) is not a local directory with a config.json; pass backbone_path= "
                f"(the SFT model the reward model was trained from)")
        cfg = read_config(backbone_path)
    model = empty_model(RewardModel, cfg, device, dtype)
    head = {f"reward_head.{n}": p for n, p in model.reward_head.named_parameters()}
    refuse_unused(path, load_weights(model.backbone, path, RM_PREFIX, head), "a reward model")
    model.score_eos = c.get("score_eos", False)
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
    save_safetensors(os.path.join(path, "model.safetensors"), tensors)
    write_json(os.path.join(path, "config.json"), {
        "architectures": ["RewardModel"], "model_type": "reward_model",
        "backbone_model_name_or_path": backbone_model_name_or_path, **llama_config_fields(rm.backbone.cfg),
        "score_eos": rm.score_eos if score_eos is None else score_eos})


# -----------------------------------------------------------------------------
# prompts in, AlpacaEval records out

def read_prompts(path):
    """Records {"instruction", "input", ...} from a JSON list or JSONL file of records or plain strings."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        records = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    out = []
    for i, r in enumerate(records):
        r = {"instruction": r} if isinstance(r, str) else r
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or \
                not isinstance(r.get("input", ""), (str, type(None))):
            raise ValueError(f"{path}: record {i} needs a string 'instruction' (and optional string 'input')")
        out.append({**r, "input": r.get("input") or ""})
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def write_alpaca_eval(path, records, outputs, generator):
    write_json(path, [{"instruction": r["instruction"], "input": r.get("input") or "", "output": o,
                       "generator": generator} for r, o in zip(records, outputs)], indent=1)

