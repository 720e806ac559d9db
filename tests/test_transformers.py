"""End to end with Hugging Face transformers: tiny random Llama and Mistral models built in the test (no
downloads) with attn_implementation="fused_attn" against "eager"."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fused_attn import kernels  # noqa: E402
from fused_attn.integrations.transformers import register  # noqa: E402
from fused_attn.numerics import Metric  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32


def config(kind):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    return transformers.MistralConfig(**common, sliding_window=8)  # shorter than the sequences below


def models(kind, dtype=DTYPE):
    name = register()
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(config(kind), attn_implementation="eager")
    fused = transformers.AutoModelForCausalLM.from_config(config(kind), attn_implementation=name)
    fused.load_state_dict(eager.state_dict())
    ref = transformers.AutoModelForCausalLM.from_config(config(kind), attn_implementation="eager")
    ref.load_state_dict(eager.state_dict())
    return (eager.to(DEVICE, dtype), fused.to(DEVICE, dtype), ref.to(DEVICE, torch.float64))


def logits_and_grads(model, ids, mask=None):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.logits, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_logits_and_gradients_match_eager(kind):
    eager, fused, ref = models(kind)
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    before = kernels.launches.copy()
    got, got_g = logits_and_grads(fused, ids)
    assert kernels.launches["fwd"] - before["fwd"] == 2 and kernels.launches["bwd"] - before["bwd"] == 2
    pt, pt_g = logits_and_grads(eager, ids)
    want, want_g = logits_and_grads(ref, ids)
    m = Metric.measure(got, want, pt, DTYPE, 2.0)
    assert m.ok, m
    for name in want_g:
        m = Metric.measure(got_g[name], want_g[name], pt_g[name], DTYPE, 3.0)
        assert m.ok, (name, m)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_generation_with_kv_cache_matches_eager(kind):
    # float32 even on a GPU: equal tokens need argmaxes that bf16 rounding could flip at near-ties.
    eager, fused, _ = models(kind, torch.float32)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    before = kernels.launches["fwd"]
    with torch.no_grad():
        got = fused.generate(ids, **kw)
        want = eager.generate(ids, **kw)
    assert kernels.launches["fwd"] - before == 2 * 6  # prefill + 5 decoding steps, 2 layers each
    assert torch.equal(got, want)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_masks_use_the_documented_fallback(side, caplog):
    eager, fused, ref = models("mistral")
    ids = torch.randint(1, 96, (2, 14), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :5] = 0
    else:
        mask[0, -5:] = 0
    before = kernels.launches["fwd"]
    with torch.no_grad(), caplog.at_level("DEBUG", logger="fused_attn"):
        got = fused(input_ids=ids, attention_mask=mask).logits
        pt = eager(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert kernels.launches["fwd"] == before  # padding goes to transformers' SDPA path
    assert "transformers SDPA" in caplog.text
    keep = mask.bool()
    m = Metric.measure(got[keep], want[keep], pt[keep], DTYPE, 2.0)
    assert m.ok, m
