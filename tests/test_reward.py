"""reward.py: Bradley-Terry loss, the score index under padding, AlpacaFarm checkpoint layout, value model,
and a small preference-training run."""
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


def tiny_reward_model(seed=0):
    torch.manual_seed(seed)
    model = reward.RewardModel(llama.get_preset("tiny"))
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
    assert json.load(open(tmp_path / "rm" / "config.json"))["model_type"] == "reward_model"
    loaded = checkpoints.load_reward_model(str(tmp_path / "rm")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, mask), before, rtol=0, atol=0)

    # AlpacaFarm's own files: config.json names only the backbone (the SFT model's directory) and the weights
    # are a PyTorch .bin state dict
    os.makedirs(tmp_path / "af")
    state = load_file(str(tmp_path / "rm" / "model.safetensors"))
    torch.save(state, tmp_path / "af" / "pytorch_model.bin")
    json.dump({"model_type": "reward_model", "architectures": ["RewardModel"],
               "backbone_model_name_or_path": str(tmp_path / "sft")}, open(tmp_path / "af" / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="backbone_path"):
        checkpoints.load_reward_model(str(tmp_path / "af"))
    checkpoints.save_llama(model.backbone, str(tmp_path / "sft"))
    af = checkpoints.load_reward_model(str(tmp_path / "af")).eval()
    with torch.no_grad():
        torch.testing.assert_close(af(tokens, mask), before, rtol=0, atol=0)


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
    before = reward.preference_accuracy(model, held_out)
    acc = reward.train_reward_model(model, train, held_out, epochs=4, lr=3e-3, batch_size=16)
    # 64 held-out pairs: a model at chance (0.5) reaches 0.9 with probability < 1e-10
    assert before < 0.75 and acc >= 0.9, (before, acc)
