"""Data: synthetic stories, tokenizers, text sources, token-file preparation, window sampling, images
(``tangle_ray.data.images``)."""

from tangle_ray.data.prepare import load_split, prepare_text, read_meta, token_dtype
from tangle_ray.data.sampler import WindowSampler, eval_windows
from tangle_ray.data.sources import TextSource, load_text_source
from tangle_ray.data.synth import generate_stories, write_demo_corpus
from tangle_ray.data.tokenizer import Tokenizer, get_tokenizer

__all__ = [
    "TextSource",
    "Tokenizer",
    "WindowSampler",
    "eval_windows",
    "generate_stories",
    "get_tokenizer",
    "load_split",
    "load_text_source",
    "prepare_text",
    "read_meta",
    "token_dtype",
    "write_demo_corpus",
]
