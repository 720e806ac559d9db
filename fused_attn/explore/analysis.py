"""What the explorer shows, without Streamlit: run a model on a text with its attention on the kernels, keep each
layer's q, k and the kernels' log-sum-exp, and rebuild the attention weights of the rows asked for."""
import threading
from dataclasses import dataclass

import torch

from .. import reference
from ..function import attention, attention_probs
from ..integrations.transformers import fused_attn_mask, kernel_kwargs
from ..numerics import FACTORS, Metric, lse_noise

NAME = "fused_attn_explore"  # the capturing attention implementation registered with transformers
_capture = threading.local()  # the layers of the run in progress on this thread (Streamlit runs pages in threads)


@dataclass
class Layer:
    q: torch.Tensor  # (1, Hq, S, D), after the position embedding, as the kernels got it
    k: torch.Tensor  # (1, Hkv, S, D)
    lse: torch.Tensor  # (1, Hq, S) float32, from the kernels
    kw: dict  # causal, window_size, scale, softcap as the kernels ran

    @property
    def mask(self) -> dict:
        return dict(causal=self.kw["causal"], window_size=self.kw["window_size"])


@dataclass
class Run:
    ids: list
    tokens: list  # one display string per token
    layers: list  # Layer per decoder layer
    eager: list  # per layer the eager model's weights (1, Hq, S, S), float32

    @property
    def heads(self) -> int:
        return self.layers[0].q.shape[1]


def _forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
             sliding_window=None, softcap=None, s_aux=None, **_):
    """transformers attention function: fused_attn.attention, keeping q, k and the lse of the layer."""
    if attention_mask is not None:
        raise ValueError("the explorer runs one unpadded sequence (no attention mask)")
    kw = kernel_kwargs(module, is_causal, sliding_window, scaling, softcap, dropout, s_aux)
    out, lse = attention(*(t.transpose(1, 2) for t in (query, key, value)), layout="bshd", return_lse=True, **kw)
    kw.pop("dropout_p")
    _capture.layers[module.layer_idx] = Layer(query.detach(), key.detach(), lse, kw)
    return out.contiguous(), None


def register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, _forward)
    AttentionMaskInterface.register(NAME, fused_attn_mask)


def tokenize(loaded, text: str) -> list:
    """Token ids of `text`; ValueError for an empty text or one longer than the model's positions."""
    if not text or not text.strip():
        raise ValueError("enter some text: there is nothing to attend to")
    ids = loaded.tokenizer(text)["input_ids"]
    limit = loaded.max_positions
    if limit and len(ids) > limit:
        raise ValueError(f"the text is {len(ids)} tokens long, more than the model's {limit} positions")
    return ids


@torch.no_grad()
def run(loaded, text: str) -> Run:
    """The model on `text` twice: with its attention on the kernels (capturing each layer's q, k, lse) and eager
    (for its attention weights)."""
    register()
    ids = tokenize(loaded, text)
    model = loaded.model
    x = torch.tensor([ids], device=model.device)
    _capture.layers = {}
    try:
        model.set_attn_implementation(NAME)
        model(x)
        layers = [_capture.layers[i] for i in sorted(_capture.layers)]
    finally:
        _capture.layers = None
        model.set_attn_implementation("eager")
    eager = [a.float() for a in model(x, output_attentions=True).attentions]
    return Run(ids, [loaded.tokenizer.decode([i]) for i in ids], layers, eager)


def weights(layer: Layer, rows: slice) -> torch.Tensor:
    """The attention weights (Hq, n_rows, S), float32, of query rows `rows`, rebuilt from the kernels' lse."""
    return attention_probs(layer.q, layer.k, layer.lse, queries=rows, **layer.kw)[0]


def errors(run: Run, rows: slice) -> list:
    """Per layer, over query rows `rows` and every head: the kernels' weights against the float64 reference
    computed from the same q and k (the numerics rule, with PyTorch in the model's dtype as the yardstick and the
    floor of weights rebuilt from a float32 lse, numerics.lse_noise), and against the eager model's weights."""
    table = []
    for i, (layer, eager) in enumerate(zip(run.layers, run.eager)):
        got = weights(layer, rows)
        ref = reference.probs(layer.q, layer.k, queries=rows, **layer.kw)[0]
        pt = reference.probs(layer.q, layer.k, queries=rows, upcast=None, **layer.kw)[0]
        m = Metric.measure(got, ref, pt, layer.q.dtype, FACTORS["out"], lse_noise(ref, layer.lse[0, :, rows]))
        table.append({"layer": i, "mask": describe(layer), "max |kernels - eager|": (got - eager[0, :, rows]).abs()
                      .max().item(), "max |kernels - float64|": m.err, "max |PyTorch - float64|": m.pt_err,
                      "allowed": m.budget, "within the rule": m.ok})
    return table


def describe(layer: Layer) -> str:
    left, right = layer.kw["window_size"]
    text = "causal" if layer.kw["causal"] else "bidirectional"
    if left >= 0:
        text += f", sliding window of {left + 1} (window_size=({left}, {right}))"
    return text + (f", softcap {layer.kw['softcap']:g}" if layer.kw["softcap"] else "")
