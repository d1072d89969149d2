"""
The refusals of checkpoints.py: every file a user brings is checked here before it is read as a model, and what
we do not implement is refused by name, never loaded as something else. Each refusal is one line naming the file
and the field (or tensor), e.g.

    llama-7b-hf/config.json: rope_scaling.type = "dynamic" is not supported (supported: default, linear, llama3)

checkpoints.py calls each check as one line where it reads the thing checked: config.json / params.json fields,
Meta's model-parallel shards, tensor names and shapes, PyTorch pickles (tensors only), PEFT adapter_config.json
fields beyond plain LoRA, AlpacaFarm reward configs and prompt files; llama.Tokenizer opens its tokenizer.model
through open_sentencepiece, which names a tokenizer of another kind.
"""
import glob
import json
import os
import pickle
import re

import torch

from support.files import read_json

# -----------------------------------------------------------------------------
# config.json (Hugging Face) and params.json (Meta): what is not LLaMA's math is refused by name

HF_TYPES, HF_CLASSES = ("llama", "mistral"), ("LlamaForCausalLM", "MistralForCausalLM")  # Mistral: no sliding window
# the params.json fields of Meta's LLaMA 1 to 3.2 code; anything else set (vision, MoE, quantization) is refused
META_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len", "max_batch_size")
# the rotary types implemented (llama.rotary_frequencies) and the fields each needs
ROPE_FIELDS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


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


def config_file(path):
    """path/config.json (Hugging Face) if it exists, else path/params.json (Meta); neither is refused."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    hf, meta = os.path.join(path, "config.json"), os.path.join(path, "params.json")
    if not os.path.exists(hf) and not os.path.exists(meta):
        raise FileNotFoundError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")
    return hf if os.path.exists(hf) else meta


def check_hf_config(c, file, types=HF_TYPES, classes=HF_CLASSES):
    """A config.json of LLaMA's architecture: its model_type and classes, positive sizes, none of the look-alikes'
    fields, a rotary type we implement (a missing size is a KeyError, which read_config reports as missing)."""
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
    check_rope(c, file)


def check_rope(c, file):
    """config.json's rotary settings: rope_parameters (transformers >= 5) or rope_scaling (4.x) of a type
    llama.rotary_frequencies implements, with the fields it needs as positive numbers, over the whole head."""
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


def check_meta_config(c, file):
    """A params.json with only the fields Meta's LLaMA code reads, its sizes positive."""
    for field in c:
        if field not in META_FIELDS and c[field] not in (None, False, "", [], {}):
            refuse(file, field, c[field], f"is not supported (params.json fields read: {', '.join(META_FIELDS)})")
    check_numbers(c, file, ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"),
                  ("ffn_dim_multiplier", "norm_eps", "rope_theta"))


def find_tokenizer(file, candidates):
    """The first tokenizer.model that exists, to count the vocabulary of a params.json with vocab_size -1."""
    tok = [p for p in candidates if os.path.exists(p)]
    if not tok:
        raise ValueError(f"{file}: vocab_size is -1 and no tokenizer.model was found to count it")
    return tok[0]


def open_sentencepiece(model_path):
    """A sentencepiece processor for model_path; a missing file, or one of another kind, is refused by name."""
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"tokenizer {model_path} does not exist")
    import sentencepiece as spm
    try:
        return spm.SentencePieceProcessor(model_file=model_path)
    except RuntimeError:  # sentencepiece's "could not parse ModelProto": say what the file is instead
        with open(model_path, "rb") as f:
            head = f.read(256)
        what = ("is tiktoken BPE text (lines of 'base64-token rank': LLaMA-3's tokenizer)"
                if re.match(rb"[A-Za-z0-9+/]+=* \d+\r?\n", head) else "cannot be parsed")
        raise ValueError(f"{model_path} {what}; expected a sentencepiece model (the tokenizer.model of "
                         f"LLaMA-1/2 and AlpacaFarm)") from None


def check_heads(cfg, file):
    """Heads split dim evenly into heads of even size (rotary turns pairs); kv heads divide the query heads."""
    names = ("hidden_size", "num_attention_heads", "num_key_value_heads") if file.endswith("config.json") else \
        ("dim", "n_heads", "n_kv_heads")
    if cfg.dim % cfg.n_heads or cfg.dim // cfg.n_heads % 2:
        refuse(file, names[1], cfg.n_heads, f"must divide {names[0]} = {cfg.dim} into heads of even size")
    if cfg.n_heads % (cfg.n_kv_heads or cfg.n_heads):
        refuse(file, names[2], cfg.n_kv_heads, f"must divide {names[1]} = {cfg.n_heads}")


# -----------------------------------------------------------------------------
# weight files: readable, tensors only, complete, of the config's shapes, nothing foreign

def weight_files(path):
    """The weight files of a checkpoint directory, of the first layout found; none at all is refused."""
    for pattern in ("*.safetensors", "pytorch_model*.bin", "consolidated.*.pth"):
        found = sorted(glob.glob(os.path.join(path, pattern)))
        if found:
            return found
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


def check_shards(path, files):
    """A sharded checkpoint (one with an index) must have every shard its index names."""
    index = os.path.join(path, {".safetensors": "model.safetensors.index.json",
                                ".bin": "pytorch_model.bin.index.json"}.get(os.path.splitext(files[0])[1], ""))
    if not os.path.isfile(index):
        return
    missing = set(read_json(index, dict).get("weight_map", {}).values()) - {os.path.basename(f) for f in files}
    if missing:
        raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(sorted(missing))}")


def shard_dim(name, parts, shape, file):
    """The one dimension along which Meta's model-parallel shards of a tensor add up to the model's shape."""
    dims = [d for d in range(len(shape)) if all(p.dim() == len(shape) for p in parts) and
            sum(p.shape[d] for p in parts) == shape[d] and
            all(p.shape[:d] + p.shape[d + 1:] == shape[:d] + shape[d + 1:] for p in parts)]
    if len(dims) != 1:
        raise ValueError(f"{file}: the {len(parts)} shards of {name} have shapes {[tuple(p.shape) for p in parts]}, "
                         f"which do not join into {tuple(shape)} (check params.json)")
    return dims[0]


def check_shape(path, key, tensor, param):
    """A weight of the config's shape, in floating point: integer tensors (a quantized checkpoint's) would be cast
    to garbage, so they are refused by name."""
    if not tensor.is_floating_point():
        raise ValueError(f"{path}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')}, not floating point "
                         f"(quantized checkpoints are not read)")
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the config says "
                         f"{tuple(param.shape)} (check config.json / params.json)")


def check_complete(path, params, filled):
    missing = [n for n in params if n not in filled]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} of the tensors the config needs, e.g. "
                         f"{', '.join(missing[:3])}")


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


# -----------------------------------------------------------------------------
# PEFT adapters: plain LoRA only

# adapter_config.json fields that mean plain LoRA, W + (lora_alpha / r) B A on the named modules, with the values
# that keep that meaning (None: any). Any other field that is set (not null, false, empty) is refused by name: PEFT
# keeps adding variants (DoRA, rsLoRA, activated LoRA, ...) that reuse LoRA's keys but compute something else.
PEFT_PLAIN = {"peft_type": ("LORA",), "r": None, "lora_alpha": None, "lora_dropout": None, "target_modules": None,
              "bias": ("none",), "fan_in_fan_out": (False,), "init_lora_weights": (True, False, "gaussian"),
              "task_type": None, "base_model_name_or_path": None, "revision": None, "inference_mode": None,
              "auto_mapping": None, "peft_version": None, "layers_pattern": None, "megatron_core": None,
              "qalora_group_size": None, "runtime_config": None}


def read_adapter_file(dir):
    """(file, state dict) of an adapter's weights: adapter_model.safetensors, else adapter_model.bin."""
    st, bin_ = os.path.join(dir, "adapter_model.safetensors"), os.path.join(dir, "adapter_model.bin")
    if os.path.isfile(st):
        with open_safetensors(st) as f:
            return st, {k: f.get_tensor(k) for k in f.keys()}
    if os.path.isfile(bin_):
        return bin_, load_pt(bin_)
    raise FileNotFoundError(f"{dir}: neither adapter_model.safetensors nor adapter_model.bin found")


def check_adapter_config(c, path, modules):
    """A parsed adapter_config.json of plain LoRA on some of `modules` (Hugging Face names); returns it."""
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
    if not isinstance(c.get("target_modules"), list) or any(n not in modules for n in c["target_modules"]):
        refuse(path, "target_modules", c.get("target_modules"), f"must be a list of {', '.join(modules)}")
    return c


def check_lora_layers(existing, rank, alpha, targets, cfg_path):
    """A model's LoRA layers (if any) must be the adapter's (r, alpha, targets), and unmerged, to be loaded into."""
    if existing:
        have = ({m.rank for _, _, m in existing}, {m.alpha for _, _, m in existing},
                sorted({t for _, t, _ in existing}))
        if have != ({rank}, {alpha}, targets):
            raise ValueError(f"{cfg_path}: adapter has r={rank}, lora_alpha={alpha}, targets {targets}; "
                             f"model's LoRA layers have r={have[0]}, alpha={have[1]}, targets {have[2]}")
        if any(m.merged for _, _, m in existing):
            raise ValueError("load_adapter: model's LoRA layers are merged; unmerge_lora(model) first")


def check_adapter_keys(sd, expected, path, cfg_path, c, n_layers):
    """The adapter's tensors are exactly the expected PEFT keys, of the expected shapes."""
    for k, v in sd.items():
        if k not in expected:
            raise ValueError(f"{path}: unexpected key {k!r} (model has {n_layers} layers, "
                             f"targets {c['target_modules']} from {cfg_path})")
        if tuple(v.shape) != expected[k]:
            raise ValueError(f"{path}: key {k!r} has shape {tuple(v.shape)}, expected {expected[k]} "
                             f"(r={c['r']} from {cfg_path})")
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} keys, first {missing[0]!r}")


# -----------------------------------------------------------------------------
# AlpacaFarm reward models

def check_reward_config(c, file):
    if c.get("model_type") != "reward_model":
        refuse(file, "model_type", c.get("model_type"), 'is not a reward model (expected "reward_model")')
    if type(c.get("score_eos", False)) is not bool:
        refuse(file, "score_eos", c["score_eos"], "must be true or false")


def check_backbone(path, backbone_path):
    if not backbone_path or not os.path.isfile(os.path.join(backbone_path, "config.json")):
        raise FileNotFoundError(
            f"{path}/config.json has no LLaMA fields and its backbone_model_name_or_path "
            f"({backbone_path!r}) is not a local directory with a config.json; pass backbone_path= "
            f"(the SFT model the reward model was trained from)")


# -----------------------------------------------------------------------------
# prompt files

def read_prompt_file(path):
    """The records of a JSON list or JSONL file, unchecked; a missing, non-UTF-8 or malformed file is refused."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON ({e})") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):  # JSONL: the error names the file's line, not the record's
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON on line {n} ({e.msg}: column {e.colno})") from None
    return records


def check_prompts(records, path):
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or \
                not isinstance(r.get("input", ""), (str, type(None))):
            raise ValueError(f"{path}: record {i} needs a string 'instruction' (and optional string 'input')")
    if not records:
        raise ValueError(f"{path}: no records")
