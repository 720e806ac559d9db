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
                  num_key_value_heads=2, max_position_embeddings=512)
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


def assert_matches(fused, eager, ref, keep=...):
    """(logits, grads) of the fused model against the float64 model, eager's as the yardstick: logits at `keep`."""
    (got, got_g), (pt, pt_g), (want, want_g) = fused, eager, ref
    m = Metric.measure(got[keep], want[keep], pt[keep], DTYPE, 2.0)
    assert m.ok, m
    for name in want_g:
        m = Metric.measure(got_g[name], want_g[name], pt_g[name], DTYPE, 3.0)
        assert m.ok, (name, m)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_logits_and_gradients_match_eager(kind):
    eager, fused, ref = models(kind)
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    before = kernels.launches.copy()
    got, got_g = logits_and_grads(fused, ids)
    assert kernels.launches["fwd"] - before["fwd"] == 2 and kernels.launches["bwd"] - before["bwd"] == 2
    assert_matches((got, got_g), logits_and_grads(eager, ids), logits_and_grads(ref, ids))


def test_long_prompt_decodes_on_the_split_kv_kernels():
    """Decode steps against a cache of 260+ keys (no gradient, few query rows) run the split-KV path. (Llama:
    the Mistral model's sliding-window cache keeps only 8 keys, too few to split.)"""
    eager, fused, _ = models("llama", torch.float32)
    ids = torch.randint(1, 96, (1, 260), generator=torch.Generator().manual_seed(6)).to(DEVICE)  # 0 = padding
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    before = kernels.launches.copy()
    with torch.no_grad():
        got = fused.generate(ids, **kw)
        want = eager.generate(ids, **kw)
    assert kernels.launches["fwd"] - before["fwd"] == 2  # the prefill, 2 layers
    assert kernels.launches["decode"] - before["decode"] == 2 * 3  # 3 decoding steps
    assert torch.equal(got, want)


def padded(side, rows=2, length=14, seed=3):
    ids = torch.randint(1, 96, (rows, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :5] = 0
    else:
        mask[0, -5:] = 0
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_padded_batches_run_on_the_kernels(kind, side, caplog):
    """Padding: unpadded into the packed layout, attention_varlen, padded back; logits of the real tokens and
    every gradient (loss over real tokens) against eager."""
    eager, fused, ref = models(kind)
    ids, mask = padded(side)
    labels = ids.masked_fill(mask == 0, -100)

    def run(model):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out.logits, {n: p.grad for n, p in model.named_parameters()}
    before = kernels.launches.copy()
    with caplog.at_level("DEBUG", logger="fused_attn"):
        got, got_g = run(fused)
    assert kernels.launches["fwd"] - before["fwd"] == 2 and kernels.launches["bwd"] - before["bwd"] == 2
    assert "transformers SDPA" not in caplog.text
    assert_matches((got, got_g), run(eager), run(ref), keep=mask.bool())


@pytest.mark.parametrize("batch", ["one", "left-padded"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_generation_with_kv_cache_matches_eager(kind, batch):
    # float32 even on a GPU: equal tokens need argmaxes that bf16 rounding could flip at near-ties.
    eager, fused, _ = models(kind, torch.float32)
    if batch == "one":
        ids, mask = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE), None
    else:
        ids, mask = padded("left", length=10, seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    before = kernels.launches["fwd"]
    with torch.no_grad():
        got = fused.generate(ids, **kw)
        want = eager.generate(ids, **kw)
    assert kernels.launches["fwd"] - before == 2 * 5  # prefill + 4 decoding steps, 2 layers each
    assert torch.equal(got, want)


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_packed_batch_equals_sequences_one_by_one(kind, how, caplog):
    """Padding-free packing: one row of sequences whose position_ids restart (or the flattened-batch keyword
    arguments) runs attention_varlen; each sequence's logits equal the sequence run alone."""
    eager, fused, ref = models(kind)
    lengths = (5, 13, 9)
    ids = torch.randint(1, 96, (1, sum(lengths)), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    extra = {}
    if how == "cu_seq_lens":
        cu = torch.tensor([0, 5, 18, 27], dtype=torch.int32, device=DEVICE)
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=13, max_length_k=13)
    before = kernels.launches.copy()
    with caplog.at_level("DEBUG", logger="fused_attn"):
        got = fused(input_ids=ids, position_ids=pos, use_cache=False, **extra).logits
        got.sum().backward()
    assert kernels.launches["fwd"] - before["fwd"] == 2 and kernels.launches["bwd"] - before["bwd"] == 2
    assert "transformers SDPA" not in caplog.text
    start = 0
    with torch.no_grad():
        for n in lengths:
            one = ids[:, start:start + n]
            m = Metric.measure(got[0, start:start + n].detach(), ref(input_ids=one).logits[0],
                               eager(input_ids=one).logits[0], DTYPE, 2.0)
            assert m.ok, (n, m)
            start += n


def test_packed_detection_refuses_other_masks():
    """A 4-D mask that is not causal-within-sequences is not taken for packed sequences (it becomes a block
    mask)."""
    from fused_attn.integrations.transformers import _sequence_ids
    i = torch.arange(6)
    causal = (i[:, None] >= i[None, :])
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    packed = causal & (ids[:, None] == ids[None, :])
    assert torch.equal(_sequence_ids(packed[None, None], None), ids[None])
    bidirectional_block = packed.clone()
    bidirectional_block[2, 3] = True  # a prefix-LM style deviation inside sequence 1
    assert _sequence_ids(bidirectional_block[None, None], None) is None
    assert _sequence_ids(torch.ones(1, 1, 6, 6, dtype=torch.bool), None) is None


def test_padding_with_holes_runs_its_mask_on_the_kernels(caplog):
    """transformers' mask function (here: padding with a hole, which no packed layout expresses) runs on the
    kernels as block lists."""
    eager, fused, ref = models("mistral")
    ids, mask = padded("left")
    mask[1, 6] = 0  # a hole: not left or right padding
    before = kernels.launches["fwd"]
    with torch.no_grad(), caplog.at_level("DEBUG", logger="fused_attn"):
        got = fused(input_ids=ids, attention_mask=mask).logits
        pt = eager(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert kernels.launches["fwd"] == before + 2  # one per layer
    assert "mask function's block lists" in caplog.text
    keep = mask.bool()
    m = Metric.measure(got[keep], want[keep], pt[keep], DTYPE, 2.0)
    assert m.ok, m


def gemma2_config(softcap):
    """Gemma 2: sliding-window and full layers alternating (window 6, shorter than the sequences), softcapped
    attention logits; q_norm-free, query_pre_attn_scalar small so the raw logits are large enough for the cap."""
    return transformers.Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=512, sliding_window=6, query_pre_attn_scalar=1,
                                     attn_logit_softcapping=softcap, final_logit_softcapping=None,
                                     layer_types=["sliding_attention", "full_attention"])


def test_gemma2_softcap_and_sliding_layers_match_eager():
    name = register()
    torch.manual_seed(0)
    built = {}
    for key, impl, softcap, dtype in (("eager", "eager", 0.1, DTYPE), ("fused", name, 0.1, DTYPE),
                                      ("ref", "eager", 0.1, torch.float64), ("uncapped", "eager", None, torch.float64)):
        model = transformers.AutoModelForCausalLM.from_config(gemma2_config(softcap), attn_implementation=impl)
        if built:
            model.load_state_dict(built["eager"].state_dict())
        built[key] = model
    eager, fused, ref, uncapped = (built[k].to(DEVICE, d) for k, d in (("eager", DTYPE), ("fused", DTYPE),
                                                                       ("ref", torch.float64),
                                                                       ("uncapped", torch.float64)))
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    before = kernels.launches.copy()
    got = logits_and_grads(fused, ids)
    assert kernels.launches["fwd"] - before["fwd"] == 2 and kernels.launches["bwd"] - before["bwd"] == 2
    want, pt = logits_and_grads(ref, ids), logits_and_grads(eager, ids)
    # the cap matters: the model without it fails the tolerance the fused model passes, by far
    m = Metric.measure(logits_and_grads(uncapped, ids)[0], want[0], pt[0], DTYPE, 2.0)
    assert m.err > 3 * m.budget, m
    assert_matches(got, pt, want)


def test_training_with_attention_dropout_runs_on_the_kernels():
    """attention_dropout > 0 in training mode: the kernels' dropout (launch counts), a finite loss that decreases
    over a few steps; eval mode: no dropout (two passes agree bitwise and equal the dropout-free model)."""
    name = register()
    torch.manual_seed(0)
    cfg = config("llama")
    cfg.attention_dropout = 0.2
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=name).to(DEVICE, torch.float32)
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    losses = []
    before = kernels.launches.copy()
    for _ in range(4):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert kernels.launches["fwd"] - before["fwd"] == 8 and kernels.launches["bwd"] - before["bwd"] == 8
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
        cfg.attention_dropout = 0.0
        plain = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=name).to(DEVICE, torch.float32)
        plain.load_state_dict(model.state_dict())
        assert torch.equal(a, b) and torch.equal(a, plain.eval()(input_ids=ids).logits)


def test_static_cache_generation_runs_on_the_kernels(caplog):
    """A static cache: transformers' 4-D mask over the whole cache (its empty slots hidden) runs on the kernels as
    block lists; the tokens equal eager's."""
    eager, fused, _ = models("llama", torch.float32)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    before = kernels.launches["fwd"]
    with torch.no_grad(), caplog.at_level("DEBUG", logger="fused_attn"):
        got = fused.generate(ids, **kw)
        want = eager.generate(ids, **kw)
    assert kernels.launches["fwd"] - before == 2 * 4 and "mask function's block lists" in caplog.text
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_user_supplied_4d_mask_runs_on_the_kernels(kind):
    """A 4-D attention mask given by the user (a bidirectional prefix of 5 tokens, causal after; bool True or float
    0: attend, float -inf: not) against the same mask in transformers' SDPA attention (eager would add a bool mask
    to the scores instead)."""
    eager, fused, _ = models("llama")
    sdpa, ref = (transformers.AutoModelForCausalLM.from_config(config("llama"), attn_implementation="sdpa")
                 for _ in range(2))
    sdpa.load_state_dict(eager.state_dict())
    ref.load_state_dict(eager.state_dict())
    sdpa, ref = sdpa.to(DEVICE, DTYPE), ref.to(DEVICE, torch.float64)
    ids = torch.randint(0, 96, (2, 14), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    i = torch.arange(14, device=DEVICE)
    mask = ((i[:, None] >= i[None, :]) | (i[None, :] < 5))[None, None].expand(2, 1, 14, 14)
    if kind == "float":
        mask = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, float("-inf"))
    before = kernels.launches["fwd"]
    with torch.no_grad():
        got = fused(input_ids=ids, attention_mask=mask).logits
        pt = sdpa(input_ids=ids, attention_mask=mask).logits
        # The float64 reference takes the float mask in its own dtype: given a float32 one, transformers 5.25
        # (torch 2.13, CPU) computed other logits (0.32 away from the same mask in float64).
        want = ref(input_ids=ids, attention_mask=mask.double() if kind == "float" else mask).logits
        causal_only = sdpa(input_ids=ids).logits
    assert kernels.launches["fwd"] - before == 2
    assert Metric.measure(got, want, pt, DTYPE, 2.0).ok
    assert not Metric.measure(causal_only, want, pt, DTYPE, 2.0).ok  # the mask matters here


def family(make_config, cls=None, init=None):
    """(eager, fused, float64 eager) models of one random config, the same weights (init(model) changes eager's
    first); cls None: AutoModelForCausalLM."""
    import copy
    name = register()
    build = (lambda cfg, impl: (cls._from_config(cfg, attn_implementation=impl) if cls is not None else
                                transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)))
    cfg = make_config()
    torch.manual_seed(0)
    eager = build(copy.deepcopy(cfg), "eager")
    if init is not None:
        init(eager)
    fused, ref = build(copy.deepcopy(cfg), name), build(copy.deepcopy(cfg), "eager")
    fused.load_state_dict(eager.state_dict())
    ref.load_state_dict(eager.state_dict())
    return eager.to(DEVICE, DTYPE), fused.to(DEVICE, DTYPE), ref.to(DEVICE, torch.float64)


def llama4_config():
    """Llama 4 text: a chunked-attention layer (chunks of 8, shorter than the sequences) and a full one."""
    return transformers.Llama4TextConfig(vocab_size=96, hidden_size=64, intermediate_size=96, intermediate_size_mlp=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, max_position_embeddings=512, attention_chunk_size=8,
                                         num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                         layer_types=["chunked_attention", "full_attention"], no_rope_layers=[1, 0],
                                         use_qk_norm=False)


def test_llama4_chunked_attention_matches_eager(caplog):
    """Chunked attention (Llama 4): transformers' chunked mask function as block lists on the kernels -- logits and
    loss gradients against the float64 model, then greedy generation with a cache (decode steps over chunks)."""
    eager, fused, ref = family(llama4_config)
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    before = kernels.launches.copy()
    with caplog.at_level("DEBUG", logger="fused_attn"):
        got = logits_and_grads(fused, ids)
    assert kernels.launches["fwd"] - before["fwd"] == 2 and kernels.launches["bwd"] - before["bwd"] == 2
    assert "mask function's block lists" in caplog.text  # the chunked layer
    assert_matches(got, logits_and_grads(eager, ids), logits_and_grads(ref, ids))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(fused.generate(ids[:1, :5], **kw), ref.generate(ids[:1, :5], **kw))


def gemma3_config():
    """Gemma 3 with a tiny SigLIP tower: image tokens attend to each other bidirectionally (token_type_ids), the
    text causally; sliding (window 6) and full layers."""
    text = transformers.Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=512, sliding_window=6, query_pre_attn_scalar=16,
                                         layer_types=["sliding_attention", "full_attention"])
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=4)
    return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                     image_token_index=95, boi_token_index=93, eoi_token_index=94)


def test_gemma3_bidirectional_image_tokens_match_eager():
    """Gemma 3's token-type mask (each image's tokens see each other both ways) as block lists on the kernels:
    logits and loss gradients (vision tower included) against the float64 model; the mask matters here."""
    eager, fused, ref = family(gemma3_config, transformers.Gemma3ForConditionalGeneration)
    ids = torch.randint(0, 90, (2, 20), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    ids[:, 3:7] = 95
    g = torch.Generator().manual_seed(9)
    kw = dict(token_type_ids=(ids == 95).long(), pixel_values=torch.randn(2, 3, 16, 16, generator=g).to(DEVICE))

    def run(model, **extra):
        model.zero_grad()
        out = model(input_ids=ids, labels=ids, **dict(kw, pixel_values=kw["pixel_values"].to(model.dtype), **extra))
        out.loss.backward()
        return out.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    before = kernels.launches.copy()
    got = run(fused)
    assert kernels.launches["fwd"] - before["fwd"] == 3 and kernels.launches["bwd"] - before["bwd"] == 3  # + SigLIP
    want = run(ref)
    assert_matches(got, run(eager), want)
    causal_text = run(ref, token_type_ids=torch.zeros_like(ids))
    assert not torch.allclose(causal_text[0], want[0])


def paligemma_config():
    """PaliGemma: a prefix-LM -- the image tokens and the text prefix (token_type_ids 0) attend bidirectionally,
    the suffix causally."""
    text = transformers.GemmaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=512)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=8)
    cfg = transformers.PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=95, projection_dim=64)
    cfg.text_config.num_image_tokens = 4
    return cfg


def test_paligemma_prefix_lm_matches_eager():
    """PaliGemma's prefix-LM mask (image + prefix bidirectional, suffix causal) as block lists on the kernels:
    logits against the float64 model; the prefix matters here."""
    eager, fused, ref = family(paligemma_config, transformers.PaliGemmaForConditionalGeneration)
    ids = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(10)).to(DEVICE)
    ids[:, :4] = 95
    prefix = torch.zeros_like(ids)
    prefix[:, 10:] = 1  # suffix
    pix = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    run = (lambda model, tt=prefix: model.eval()(input_ids=ids, token_type_ids=tt, pixel_values=pix.to(model.dtype),
                                                 labels=ids).logits)
    before = kernels.launches["fwd"]
    with torch.no_grad():
        got, pt, want = run(fused), run(eager), run(ref)
        all_causal = run(ref, torch.ones_like(ids))
    assert kernels.launches["fwd"] - before == 3  # SigLIP's layer, then the two text layers
    assert Metric.measure(got, want, pt, DTYPE, 2.0).ok
    assert not torch.allclose(all_causal, want)


def gpt_oss_config():
    """gpt-oss: attention sinks (one learned logit per head), sliding (window 6) and full layers, GQA, MoE."""
    return transformers.GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=512, sliding_window=6, num_local_experts=2,
                                     num_experts_per_tok=1, layer_types=["sliding_attention", "full_attention"],
                                     experts_implementation="eager")  # grouped_mm takes no float64


def _large_sinks(model):
    """Sinks of a few units (the default init, std 0.02, would barely matter)."""
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)


def test_gpt_oss_sinks_match_eager():
    """gpt-oss's sinks (passed as s_aux) run in the kernels: logits and loss gradients -- the sinks' own included --
    against the float64 model, and greedy generation with the cache."""
    eager, fused, ref = family(gpt_oss_config, init=_large_sinks)
    ids = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(13)).to(DEVICE)
    before = kernels.launches.copy()
    got = logits_and_grads(fused, ids)
    assert kernels.launches["fwd"] - before["fwd"] == 2 and kernels.launches["bwd"] - before["bwd"] == 2
    assert any(name.endswith("sinks") for name in got[1])
    assert_matches(got, logits_and_grads(eager, ids), logits_and_grads(ref, ids))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(fused.generate(ids[:1, :6], **kw), ref.generate(ids[:1, :6], **kw))
