"""support/formats.py: a file we cannot read as what it claims to be is refused in one line naming the file and
the field (or tensor), and nothing is loaded. One table, a few cases of each kind of error; each case spoils one
file of a valid checkpoint and states the whole message."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoints
import llama
import lora
import reward

CFG = llama.PRESETS["tiny"]  # dim 64, 4 heads of 16, 2 kv heads, vocab 256, 2 layers


def tiny():
    torch.manual_seed(0)
    return llama.Llama(CFG).eval()


def write_meta(path, sd):
    """Meta's layout in two model-parallel shards, split as LLaMA-1/2 split them (norms replicated)."""
    os.makedirs(path)
    split = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0, "output": 0, "tok_embeddings": 1}
    for s in range(2):
        torch.save({n: w if n.split(".")[-2] not in split else w.chunk(2, split[n.split(".")[-2]])[s].clone()
                    for n, w in sd.items()}, os.path.join(path, f"consolidated.{s:02d}.pth"))
    json.dump({"dim": CFG.dim, "n_layers": CFG.n_layers, "n_heads": CFG.n_heads, "n_kv_heads": CFG.n_kv_heads,
               "multiple_of": 16, "vocab_size": CFG.vocab_size}, open(os.path.join(path, "params.json"), "w"))


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A valid file of each kind the table spoils."""
    d, model = tmp_path_factory.mktemp("valid"), tiny()
    checkpoints.save_llama(model, str(d / "hf"))
    write_meta(str(d / "meta"), model.state_dict())
    checkpoints.save_reward_model(reward.RewardModel(CFG), str(d / "reward"))
    lora.add_lora(model, rank=2, alpha=4)  # on wq, wk, wv, wo
    checkpoints.save_adapter(model, str(d / "adapter"))
    (d / "prompts").mkdir()
    (d / "prompts" / "p.json").write_text(json.dumps(["a", {"instruction": "b", "input": "c"}]))
    (d / "tok").mkdir()
    return d


class RunsCode:
    """Unpickling this creates a directory: a loader must refuse it before that happens."""
    def __reduce__(self):
        return os.makedirs, (self.marker,)


def pickle_that_runs_code(target):
    os.remove(target.with_name("model.safetensors"))
    evil = RunsCode()
    evil.marker = str(target.parent.parent / "ran")
    torch.save({"x": torch.zeros(2), "y": evil}, target)


def truncate(target):
    target.write_bytes(target.read_bytes()[:target.stat().st_size // 2])


def tensors(edit):
    """Spoil a .safetensors file: add zero tensors of the given shapes, or remove those given as None."""
    def spoil(target):
        sd = load_file(str(target))
        for k, shape in edit.items():
            sd.pop(k) if shape is None else sd.update({k: torch.zeros(shape)})
        save_file(sd, str(target), metadata={"format": "pt"})
    return spoil


def as_int32(target):
    sd = load_file(str(target))
    save_file({k: v.to(torch.int32) for k, v in sd.items()}, str(target), metadata={"format": "pt"})


def drop_a_vocabulary_row(target):
    shard = torch.load(target, weights_only=True)
    shard["tok_embeddings.weight"] = shard["tok_embeddings.weight"][1:]
    torch.save(shard, target)


A = "base_model.model.model.layers"
ADAPTER = "{d}/adapter_config.json"
NOT_PLAIN = "is not plain LoRA, W + (lora_alpha / r) B A, the one kind that loads here"
META_FIELDS = ("dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of, ffn_dim_multiplier, norm_eps, rope_theta, "
               "use_scaled_rope, max_seq_len, max_batch_size")

# case -> (which valid file, the file spoiled, how: a dict merged into a JSON file (None deletes a field), bytes
# that replace the file, or a function of its path; the whole message, {d} the directory and … a library's words)
REFUSED = {
    # a file that is missing
    "no_directory": ("hf", "", shutil.rmtree, "checkpoint directory {d} does not exist"),
    "no_weights": ("hf", "model.safetensors", os.remove,
                   "{d}: no weights (*.safetensors, pytorch_model*.bin or consolidated.*.pth)"),
    "no_adapter_weights": ("adapter", "adapter_model.safetensors", os.remove,
                           "{d}: neither adapter_model.safetensors nor adapter_model.bin found"),
    # a file that is corrupt, partial or unsafe
    "truncated": ("hf", "model.safetensors", truncate,
                  "{d}/model.safetensors: not a readable safetensors file (…); truncated or corrupt?"),
    "pickle_runs_code": ("hf", "pytorch_model.bin", pickle_that_runs_code,
                         "{d}/pytorch_model.bin: refused: it holds Python objects besides tensors, which could run "
                         "code when unpickled; expected a state dict of tensors"),
    "int_weights": ("hf", "model.safetensors", as_int32,  # was: loaded, cast to garbage weights
                    "{d}: tensor lm_head.weight is int32, not floating point (quantized checkpoints are "
                    "not read)"),
    "lacks_a_tensor": ("reward", "model.safetensors", tensors({"reward_head.bias": None}),
                       "{d}: checkpoint lacks 1 of the tensors the config needs, e.g. reward_head.bias"),
    "tokenizer_garbage": ("tok", "tokenizer.model", bytes(range(256)),
                          "{d}/tokenizer.model cannot be parsed; expected a sentencepiece model (the tokenizer.model "
                          "of LLaMA-1/2 and AlpacaFarm)"),
    # malformed JSON
    "config_json": ("hf", "config.json", b'{"hidden_size": 64,', "{d}/config.json: malformed JSON (…)"),
    "prompts_json": ("prompts", "p.json", b'["ok", ', "{d}/p.json: malformed JSON (…)"),
    # JSON of another shape (each was a traceback)
    "config_a_list": ("hf", "config.json", b"[1, 2]", "{d}/config.json: expected a JSON object, got list"),
    "params_null": ("meta", "params.json", b"null", "{d}/params.json: expected a JSON object, got null"),
    "reward_config_text": ("reward", "config.json", b'"hello"', "{d}/config.json: expected a JSON object, got str"),
    "adapter_config_list": ("adapter", "adapter_config.json", b"[1, 2]",
                            "{d}/adapter_config.json: expected a JSON object, got list"),
    # a field of the wrong type
    "hidden_size_text": ("hf", "config.json", {"hidden_size": "64"},
                         '{d}/config.json: hidden_size = "64" must be a positive integer'),
    "score_eos_text": ("reward", "config.json", {"score_eos": "yes"},
                       '{d}/config.json: score_eos = "yes" must be true or false'),
    "lora_alpha_text": ("adapter", "adapter_config.json", {"lora_alpha": "4"},
                        ADAPTER + ': lora_alpha = "4" must be a number'),
    # a number out of range
    "heads_uneven": ("hf", "config.json", {"num_attention_heads": 5},
                     "{d}/config.json: num_attention_heads = 5 must divide hidden_size = 64 into heads of even size"),
    "rope_factor_zero": ("hf", "config.json", {"rope_scaling": {"type": "linear", "factor": 0}},
                         "{d}/config.json: rope_scaling.factor = 0 must be a positive number"),
    "meta_heads_zero": ("meta", "params.json", {"n_heads": 0},
                        "{d}/params.json: n_heads = 0 must be a positive integer"),
    "kv_heads": ("hf", "config.json", {"num_key_value_heads": 3},
                 "{d}/config.json: num_key_value_heads = 3 must divide num_attention_heads = 4"),
    # a name or field we do not implement, refused by name; a field that is missing
    "model_type": ("hf", "config.json", {"model_type": "gemma"},
                   '{d}/config.json: model_type = "gemma" is not supported (supported: llama, mistral)'),
    "sliding_window": ("hf", "config.json", {"model_type": "mistral", "sliding_window": 4096},
                       "{d}/config.json: sliding_window = 4096 is not supported (every token attends to the whole "
                       "context)"),
    "rope_yarn": ("hf", "config.json", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
                  '{d}/config.json: rope_parameters.rope_type = "yarn" is not supported (supported: default, linear, '
                  'llama3)'),
    "quantized": ("hf", "config.json", {"quantization_config": {"quant_method": "gptq"}},
                  '{d}/config.json: quantization_config = {"quant_method": "gptq"} is not supported (quantized '
                  'weights); use the full-precision checkpoint'),
    "meta_moe": ("meta", "params.json", {"moe_args": {"num_experts": 16}},
                 '{d}/params.json: moe_args = {"num_experts": 16} is not supported (params.json fields read: '
                 + META_FIELDS + ")"),
    "missing_field": ("hf", "config.json", {"intermediate_size": None},
                      "{d}/config.json: missing field 'intermediate_size'"),
    "tiktoken": ("tok", "tokenizer.model", b"IQ== 0\nIg== 1\nIw== 2\n",
                 "{d}/tokenizer.model is tiktoken BPE text (lines of 'base64-token rank': LLaMA-3's tokenizer); "
                 "expected a sentencepiece model (the tokenizer.model of LLaMA-1/2 and AlpacaFarm)"),
    # a tensor of another shape than the config's
    "head_shape": ("reward", "model.safetensors", tensors({"reward_head.weight": (2, 64)}),
                   "{d}: tensor reward_head.weight has shape (2, 64), the config says (1, 64) (check config.json / "
                   "params.json)"),
    "adapter_shape": ("adapter", "adapter_model.safetensors",
                      tensors({f"{A}.0.self_attn.q_proj.lora_B.weight": (65, 2)}),
                      f"{{d}}/adapter_model.safetensors: key '{A}.0.self_attn.q_proj.lora_B.weight' has shape "
                      f"(65, 2), expected (64, 2) (r=2 from {ADAPTER})"),
    # a tensor that LLaMA lacks: named by what it is, or listed
    "qwen2_bias": ("hf", "model.safetensors", tensors({"model.layers.0.self_attn.q_proj.bias": (64,)}),
                   "{d}: checkpoint has biases on linear layers (attention_bias / mlp_bias, or Qwen2-style q, k, v "
                   "biases), e.g. model.layers.0.self_attn.q_proj.bias; LLaMA has none (not supported)"),
    "value_head": ("reward", "model.safetensors", tensors({"value_head.weight": (1, 64)}),
                   "{d}: checkpoint has tensors a reward model does not use: value_head.weight"),
    "adapter_layer_7": ("adapter", "adapter_model.safetensors",
                        tensors({f"{A}.7.self_attn.q_proj.lora_A.weight": (2, 64)}),
                        f"{{d}}/adapter_model.safetensors: unexpected key '{A}.7.self_attn.q_proj.lora_A.weight' "
                        f"(model has 2 layers, targets ['k_proj', 'o_proj', 'q_proj', 'v_proj'] from {ADAPTER})"),
    # shards that do not fit together
    "meta_shards": ("meta", "consolidated.01.pth", drop_a_vocabulary_row,
                    "{d}/consolidated.*.pth: the 2 shards of tok_embeddings.weight have shapes [(256, 32), (255, 32)], "
                    "which do not join into (256, 64) (check params.json)"),
    "missing_shard": ("hf", "model.safetensors.index.json",
                      {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}},
                      "{d}/model.safetensors.index.json names shards that are missing: "
                      "model-00002-of-00002.safetensors"),
    # PEFT fields beyond plain LoRA
    "use_dora": ("adapter", "adapter_config.json", {"use_dora": True}, ADAPTER + ": use_dora = true " + NOT_PLAIN),
    "alora": ("adapter", "adapter_config.json", {"alora_invocation_tokens": [32, 7]},
              ADAPTER + ": alora_invocation_tokens = [32, 7] " + NOT_PLAIN),
    "peft_bias": ("adapter", "adapter_config.json", {"bias": "lora_only"},
                  ADAPTER + ': bias = "lora_only" is not supported (supported: "none")'),
    "target_modules": ("adapter", "adapter_config.json", {"target_modules": ["q_proj", "query_key_value"]},
                       ADAPTER + ': target_modules = ["q_proj", "query_key_value"] must be a list of q_proj, k_proj, '
                       'v_proj, o_proj, gate_proj, up_proj, down_proj'),
    # a prompt file that is not one of ours
    "prompt_record": ("prompts", "p.json", b'{"instruction": "a"}\n{"input": "b"}\n',
                      "{d}/p.json: record 1 needs a string 'instruction' (and optional string 'input')"),
    "prompts_not_utf8": ("prompts", "p.json", b'["caf\xe9"]', "{d}/p.json: not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_in_one_line_naming_file_and_field(valid, tmp_path, case):
    kind, file, spoil, message = REFUSED[case]
    d = tmp_path / kind
    shutil.copytree(valid / kind, d)
    target = d / file
    if isinstance(spoil, bytes):
        target.write_bytes(spoil)
    elif isinstance(spoil, dict):
        c = {**(json.loads(target.read_text()) if target.exists() else {}), **spoil}
        target.write_text(json.dumps({k: v for k, v in c.items() if v is not None}))
    else:
        spoil(target)
    model = tiny()
    load = {"hf": checkpoints.load_llama, "meta": checkpoints.load_llama, "reward": checkpoints.load_reward_model,
            "adapter": lambda d: checkpoints.load_adapter(model, d), "tok": lambda d: llama.Tokenizer(str(target)),
            "prompts": lambda d: checkpoints.read_prompts(str(target))}[kind]
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        load(str(d))
    want = re.escape(message.replace("{d}", str(d))).replace("…", ".+")
    assert re.fullmatch(want, str(e.value)) and "\n" not in str(e.value), str(e.value)
    assert lora.lora_layers(model) == [], "a refused adapter must leave the model untouched"
    assert not (tmp_path / "ran").exists(), "a refused pickle ran code"
