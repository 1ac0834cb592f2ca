"""Data: synthetic stories, tokenizers, text sources, token-file preparation, window sampling, images."""

from tangle_ray.data.images import (
    EvalTransform,
    ImageDataset,
    ImageSource,
    TrainTransform,
    load_image_source,
    split_balanced,
)
from tangle_ray.data.prepare import load_split, prepare_text, read_meta, token_dtype
from tangle_ray.data.sampler import WindowSampler, eval_windows
from tangle_ray.data.sources import TextSource, load_text_source
from tangle_ray.data.synth import generate_stories, write_demo_corpus
from tangle_ray.data.tokenizer import Tokenizer, get_tokenizer

__all__ = [
    "EvalTransform",
    "ImageDataset",
    "ImageSource",
    "TextSource",
    "Tokenizer",
    "TrainTransform",
    "WindowSampler",
    "eval_windows",
    "generate_stories",
    "get_tokenizer",
    "load_image_source",
    "load_split",
    "load_text_source",
    "prepare_text",
    "read_meta",
    "split_balanced",
    "token_dtype",
    "write_demo_corpus",
]
