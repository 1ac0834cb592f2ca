"""Data: ``data.text`` (stories, tokenizers, sources, token files, windows), ``data.images`` (sources, prepared
folders, augmentation, batches) and what both share (``data.folder``). The text API is re-exported here."""

from tangle_ray.data.text.prepare import load_split, prepare_text, read_meta, token_dtype
from tangle_ray.data.text.sampler import WindowSampler, eval_windows
from tangle_ray.data.text.sources import TextSource, load_text_source
from tangle_ray.data.text.synth import generate_stories, write_demo_corpus
from tangle_ray.data.text.tokenizer import Tokenizer, get_tokenizer

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
