"""The explorer's models: a local Hugging Face causal LM directory, or a built-in demo (a tiny random
Mistral-style model -- Llama's architecture with a sliding window -- and a byte-level BPE tokenizer trained here on
a paragraph of text). Nothing is downloaded."""
from dataclasses import dataclass
from pathlib import Path

import torch

# The demo tokenizer's training text (any text tokenizes: byte-level BPE falls back to bytes).
CORPUS = """Attention lets every token of a sequence look at the tokens before it and take a weighted average of
what it finds there. The weights come from a softmax over the scores of a query against every key, so each row
of the attention matrix sums to one. A causal mask hides the future; a sliding window also hides the distant
past. The kernels never store the whole matrix: they keep a running maximum and sum for each row, and return the
log-sum-exp, from which any row of the weights can be rebuilt exactly. The quick brown fox jumps over the lazy
dog. It was the best of times, it was the worst of times. In the beginning the model knew nothing at all."""

DEMO_WINDOW = 24  # the demo's sliding window (HF sliding_window), so longer texts show it


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    name: str
    demo: bool

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)


def demo_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def demo_model(tokenizer, attn_implementation: str):
    from transformers import AutoModelForCausalLM, MistralConfig
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           sliding_window=DEMO_WINDOW, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                           initializer_range=0.2)  # larger than trained models' 0.02: less uniform (still random)
    with torch.random.fork_rng(devices=[]):  # the same random weights every time, the caller's RNG untouched
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def load(model_dir=None, attn_implementation: str = "eager", device=None) -> Loaded:
    """The demo (model_dir None or empty) or the causal LM in a local directory (config, weights, tokenizer files),
    in eval mode on `device` (default: CUDA if present, else the CPU, in float32 -- the interpreter's dtype).
    Raises ValueError with what went wrong when the directory cannot be loaded."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not model_dir:
        tokenizer = demo_tokenizer()
        model, name, demo = demo_model(tokenizer, attn_implementation), "demo (tiny random Mistral-style)", True
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise ValueError(f"model directory {str(model_dir)!r} does not exist or is not a directory")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, attn_implementation=attn_implementation,
                dtype="auto" if device.type == "cuda" else torch.float32)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for unreadable directories
            raise ValueError(f"cannot load a causal LM and its tokenizer from {str(model_dir)!r}: "
                             f"{type(e).__name__}: {e}") from e
        name, demo = path.name, False
    dtype = torch.float32 if device.type == "cpu" else None
    return Loaded(model.to(device=device, dtype=dtype).eval(), tokenizer, name, demo)
