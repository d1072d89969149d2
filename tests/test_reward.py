"""reward.py: Bradley-Terry loss, the score index under padding, AlpacaFarm checkpoint layout, value model,
and a small preference-training run (world/preferences.py)."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import llama
import lora
import reward
from world import preferences


def tiny_reward_model(seed=0):
    torch.manual_seed(seed)
    model = reward.RewardModel(llama.PRESETS["tiny"])
    torch.nn.init.normal_(model.reward_head.weight, std=0.5)    # a non-trivial head
    torch.nn.init.normal_(model.reward_head.bias, std=0.5)
    return model.eval()


def random_seqs(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (n,), generator=g).tolist() for n in lengths]


def test_bradley_terry_loss():
    s = torch.tensor([0.3, -1.0, 4.0])
    assert math.isclose(reward.bradley_terry_loss(s, s).item(), math.log(2), rel_tol=1e-6)
    a = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    b = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    expected = sum(math.log1p(math.exp(-(x - y))) for x, y in zip(a.tolist(), b.tolist())) / 3
    assert math.isclose(reward.bradley_terry_loss(a, b).item(), expected, rel_tol=1e-6)


def test_last_index():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 0, 0]])  # left-, right-padded, a hole
    assert llama.last_index(mask).tolist() == [4, 2, 2]


@pytest.mark.parametrize("side", ["left", "right"])
def test_score_read_at_last_real_token_under_padding(side):
    model = tiny_reward_model()
    seqs = random_seqs([7, 3, 5, 1])
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([s]))[0] for s in seqs])      # no padding at all
        if side == "left":
            tokens, mask = llama.left_pad(seqs, pad_id=99)                     # a real id as pad: masked anyway
        else:
            T = max(map(len, seqs))
            tokens = torch.tensor([s + [99] * (T - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
        padded = model(tokens, mask)
    assert padded.dtype == torch.float32 and padded.shape == (4,)
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)
    assert alone.std() > 1e-3      # distinct sequences get distinct scores: a wrong index would show


def test_alpaca_farm_layout_round_trip(tmp_path):
    model = tiny_reward_model()
    tokens, mask = llama.left_pad(random_seqs([6, 4, 2]))
    with torch.no_grad():
        before = model(tokens, mask)
    checkpoints.save_reward_model(model, str(tmp_path / "rm"))
    keys = set(load_file(str(tmp_path / "rm" / "model.safetensors")))
    for k in ("backbone_model.model.embed_tokens.weight", "backbone_model.model.layers.1.self_attn.q_proj.weight",
              "backbone_model.model.layers.0.mlp.gate_proj.weight", "backbone_model.model.layers.0.input_layernorm.weight",
              "backbone_model.model.norm.weight", "backbone_model.lm_head.weight",
              "reward_head.weight", "reward_head.bias"):
        assert k in keys, k
    assert all(k.startswith(("backbone_model.model.", "backbone_model.lm_head.", "reward_head.")) for k in keys)
    config = json.load(open(tmp_path / "rm" / "config.json"))
    assert config["model_type"] == "reward_model" and config["score_eos"] is True   # ours are trained with EOS
    loaded = checkpoints.load_reward_model(str(tmp_path / "rm")).eval()
    assert loaded.score_eos
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, mask), before, rtol=0, atol=0)


@pytest.mark.parametrize("shards", [1, 2])
def test_alpaca_farm_checkpoint_loads_and_scores(tmp_path, shards):
    """AlpacaFarm's own files (save_pretrained under transformers 4.29): config.json names only the backbone (the
    SFT model's directory), the weights are PyTorch .bin state dicts, single or sharded with an index, and carry
    every layer's derived rotary table, backbone_model.model.layers.N.self_attn.rotary_emb.inv_freq."""
    model = tiny_reward_model()
    tokens, mask = llama.left_pad(random_seqs([6, 4, 2]))
    with torch.no_grad():
        before = model(tokens, mask)
    checkpoints.save_reward_model(model, str(tmp_path / "rm"))
    state = load_file(str(tmp_path / "rm" / "model.safetensors"))
    for i in range(model.backbone.cfg.n_layers):
        state[f"backbone_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    os.makedirs(tmp_path / "af")
    if shards == 1:
        torch.save(state, tmp_path / "af" / "pytorch_model.bin")
    else:
        names = sorted(state)
        files = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for file, keys in files.items():
            torch.save({k: state[k] for k in keys}, tmp_path / "af" / file)
        json.dump({"weight_map": {k: f for f, keys in files.items() for k in keys}},
                  open(tmp_path / "af" / "pytorch_model.bin.index.json", "w"))
    json.dump({"model_type": "reward_model", "architectures": ["RewardModel"], "torch_dtype": "float32",
               "transformers_version": "4.29.2", "backbone_model_name_or_path": str(tmp_path / "sft")},
              open(tmp_path / "af" / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="backbone_path"):
        checkpoints.load_reward_model(str(tmp_path / "af"))
    checkpoints.save_llama(model.backbone, str(tmp_path / "sft"))
    af = checkpoints.load_reward_model(str(tmp_path / "af")).eval()
    assert not af.score_eos                                    # trained without EOS: scored without it
    with torch.no_grad():
        torch.testing.assert_close(af(tokens, mask), before, rtol=0, atol=0)
    if shards == 2:                                            # a shard the index names must be there
        os.remove(tmp_path / "af" / "pytorch_model-00002-of-00002.bin")
        with pytest.raises(FileNotFoundError, match="pytorch_model-00002-of-00002.bin"):
            checkpoints.load_reward_model(str(tmp_path / "af"))


@pytest.mark.parametrize("score_eos", [True, False])
def test_reward_score_reads_eos_only_if_trained_with_it(score_eos):
    """ppo.reward_score on left-padded prompts + right-padded responses: a reward model trained without EOS
    (AlpacaFarm's) reads each sequence without its final EOS; one trained with it reads it."""
    import ppo
    eos = 2
    model = tiny_reward_model()
    model.score_eos = score_eos
    prompts = random_seqs([5, 3, 4, 2], seed=3)
    responses = [[9, 8, 7, eos], [6, eos], [5, 4, 3, 6], [eos]]  # EOS, EOS, cut off, only EOS
    tokens_p, mask_p = llama.left_pad(prompts)
    N = max(map(len, responses))
    tokens_r = torch.tensor([r + [0] * (N - len(r)) for r in responses])
    mask_r = torch.tensor([[1] * len(r) + [0] * (N - len(r)) for r in responses])
    tokens, mask = torch.cat([tokens_p, tokens_r], 1), torch.cat([mask_p, mask_r], 1)
    with torch.no_grad():
        got = ppo.reward_score(model, tokens, mask, eos_id=eos)
        read = [p + (r if score_eos or r[-1] != eos else r[:-1]) for p, r in zip(prompts, responses)]
        alone = torch.stack([model(torch.tensor([s]))[0] for s in read])
        with_eos = torch.stack([model(torch.tensor([p + r]))[0] for p, r in zip(prompts, responses)])
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
    if not score_eos:  # control: reading the EOS gives other scores
        assert (got - with_eos)[[0, 1, 3]].abs().min() > 1e-3


def test_save_folds_lora_into_weights(tmp_path):
    model = tiny_reward_model()
    lora.add_lora(model.backbone, rank=2, alpha=4, dropout=0.0)
    for m in model.modules():
        if isinstance(m, lora.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    tokens, mask = llama.left_pad(random_seqs([5, 3]))
    with torch.no_grad():
        before = model(tokens, mask)
        with lora.lora_disabled(model):
            base = model(tokens, mask)
    assert (before - base).abs().max() > 1e-3          # the adapters matter
    checkpoints.save_reward_model(model, str(tmp_path / "rm"))
    loaded = checkpoints.load_reward_model(str(tmp_path / "rm")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, mask), before, rtol=0, atol=1e-5)


def test_value_model():
    rm = tiny_reward_model()
    value = reward.ValueModel(rm.backbone, rank=4, alpha=8, dropout=0.1)
    trainable, _ = lora.count_parameters(value)
    cfg = rm.backbone.cfg
    kv = cfg.dim // cfg.n_heads * cfg.n_kv_heads
    per_layer = 4 * (cfg.dim + cfg.dim) + 4 * (cfg.dim + kv) + 4 * (cfg.dim + kv) + 4 * (cfg.dim + cfg.dim)
    assert trainable == cfg.n_layers * per_layer + cfg.dim + 1        # LoRA (q, k, v, o) + head
    tokens, mask = llama.left_pad(random_seqs([6, 3]))
    v = value.values(tokens, mask)
    assert v.shape == tokens.shape and v.dtype == torch.float32 and (v == 0).all()   # zero-initialized head
    torch.nn.init.normal_(value.value_head.weight, std=0.5)
    value.eval()
    with torch.no_grad():
        v = value.values(tokens, mask)
        alone = value.values(tokens[1:, 3:])                            # the short row without its padding
    torch.testing.assert_close(v[1, 3:], alone[0], rtol=0, atol=1e-5)


def test_value_model_from_reward_checkpoint(tmp_path):
    rm = tiny_reward_model()
    checkpoints.save_reward_model(rm, str(tmp_path / "rm"))
    value = reward.ValueModel(checkpoints.load_reward_model(str(tmp_path / "rm")).backbone, rank=2, alpha=4, dropout=0.0).eval()
    tokens, mask = llama.left_pad(random_seqs([5, 3]))
    with torch.no_grad():
        torch.testing.assert_close(value.backbone.hidden(tokens, mask), rm.backbone.hidden(tokens, mask),
                                   rtol=0, atol=0)      # the reward model's backbone; fresh adapters change nothing
    assert not hasattr(value, "reward_head") and (value.value_head.weight == 0).all()


def test_train_reward_model_learns_a_preference():
    # preferred responses contain token 7; the held-out accuracy must rise from chance to (almost) 1
    g = torch.Generator().manual_seed(0)

    def pair():
        base = torch.randint(10, 256, (6,), generator=g).tolist()
        chosen = list(base)
        chosen[int(torch.randint(1, 6, (1,), generator=g))] = 7
        return chosen, base

    train, held_out = [pair() for _ in range(96)], [pair() for _ in range(64)]
    model = tiny_reward_model()
    before = preferences.preference_accuracy(model, held_out)
    acc = preferences.train_reward_model(model, train, held_out, epochs=4, lr=3e-3, batch_size=16)
    # 64 held-out pairs: a model at chance (0.5) reaches 0.9 with probability < 1e-10
    assert before < 0.75 and acc >= 0.9, (before, acc)
