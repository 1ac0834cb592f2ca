"""Synthetic children's stories from a small grammar: an offline stand-in for TinyStories.

The stories are generated, not real text: they exercise the pipeline (tokenizer, preparation,
training) on any machine without a download, but a model trained on them learns the grammar only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tangle_ray.names import check_output_dir

_HEROES = [  # (name, description, pronoun, possessive)
    ("Lily", "a little girl", "she", "her"),
    ("Tom", "a little boy", "he", "his"),
    ("Mia", "a curious girl", "she", "her"),
    ("Ben", "a brave boy", "he", "his"),
    ("Sue", "a kind girl", "she", "her"),
    ("Max", "a brown dog", "he", "his"),
    ("Bella", "a small cat", "she", "her"),
    ("Sam", "a happy frog", "he", "his"),
    ("Lucy", "a tiny bird", "she", "her"),
    ("Tim", "a shy bunny", "he", "his"),
    ("Anna", "a smart girl", "she", "her"),
    ("Jack", "a funny boy", "he", "his"),
    ("Daisy", "a gentle cow", "she", "her"),
    ("Leo", "a young lion", "he", "his"),
]
_HELPERS = [  # (first mention, later mentions)
    ("Mom", "Mom"),
    ("Dad", "Dad"),
    ("Grandma", "Grandma"),
    ("a wise owl", "the owl"),
    ("a friendly bear", "the bear"),
    ("an old man", "the old man"),
    ("a big duck", "the duck"),
    ("a little mouse", "the mouse"),
]
_PLACES = [
    "the park",
    "the forest",
    "the beach",
    "the garden",
    "the farm",
    "the lake",
    "the big hill",
    "the town",
    "the zoo",
    "the river",
    "the old house",
    "the playground",
    "the meadow",
    "the shop",
]
_ADJECTIVES = [
    "red",
    "blue",
    "shiny",
    "soft",
    "big",
    "little",
    "green",
    "yellow",
    "pretty",
    "old",
    "new",
    "funny",
]
_OBJECTS = [
    "ball",
    "kite",
    "key",
    "box",
    "hat",
    "book",
    "flower",
    "toy car",
    "balloon",
    "cup",
    "shell",
    "stone",
    "boat",
    "drum",
    "doll",
    "apple",
    "cake",
    "crayon",
    "rope",
    "bell",
]
_ACTIVITIES = [
    "play outside",
    "sing songs",
    "run fast",
    "draw pictures",
    "jump in puddles",
    "read books",
    "dance in the sun",
    "build towers",
    "look at the stars",
    "splash in the water",
    "climb trees",
]
_OBSTACLES = ["a tall tree", "a deep hole", "a thorny bush", "the muddy pond", "a narrow pipe", "a dark cave"]
_GLAD = ["happy", "glad", "cheerful", "proud", "joyful"]
_TIMES = ["day", "morning", "afternoon", "evening", "sunny day", "rainy day", "cold night"]
_MORALS = [
    "sharing is a good thing",
    "friends help each other",
    "it is good to be brave",
    "being kind makes everyone happy",
    "you should always say thank you",
    "it is fun to try new things",
]


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _story(rng: random.Random) -> str:
    name, desc, he, his = rng.choice(_HEROES)
    helper, helper_ref = rng.choice(_HELPERS)
    place, obj = rng.choice(_PLACES), f"{rng.choice(_ADJECTIVES)} {rng.choice(_OBJECTS)}"
    s = [
        rng.choice(
            [
                f"Once upon a time, there was {desc} named {name}.",
                f"{name} was {desc} who lived near {place}.",
                f"There once was {desc}. {his.capitalize()} name was {name}.",
            ]
        )
    ]
    if rng.random() < 0.7:
        s.append(f"{he.capitalize()} loved to {rng.choice(_ACTIVITIES)}.")
    s.append(
        rng.choice(
            [
                f"One {rng.choice(_TIMES)}, {name} went to {place} and found {_a(obj)}.",
                f"One {rng.choice(_TIMES)}, {name} saw {_a(obj)} at {place}.",
                f"{name} had {_a(obj)} that {he} took everywhere.",
            ]
        )
    )
    s.append(f"{he.capitalize()} felt very {rng.choice(['happy', 'excited', 'curious', 'proud'])}.")
    s.append(
        rng.choice(
            [
                f"But then the {obj} got stuck in {rng.choice(_OBSTACLES)}.",
                f"But the wind blew and the {obj} was gone. {name} could not find it.",
                f"Suddenly, it started to rain and {name} was {rng.choice(['scared', 'sad', 'worried'])}.",
            ]
        )
    )
    if rng.random() < 0.6:
        s.append(f'{name} saw {helper} and asked, "Can you help me?"')
        s.append(f'"Yes, I can help you," said {helper_ref}.')
    else:
        s.append(f"{helper[0].upper() + helper[1:]} came and helped {name}.")
    s.append(
        rng.choice(
            [
                f"Together they got the {obj} back, and {name} was {rng.choice(_GLAD)} again.",
                f"Soon the sun came out and {name} smiled.",
                f"{name} said thank you and gave {helper_ref} a big hug.",
            ]
        )
    )
    s.append(
        rng.choice(
            [
                f"That day, {name} learned that {rng.choice(_MORALS)}.",
                f"From that day on, {name} kept {his} {obj} safe.",
                f"They played at {place} until the sun went down.",
                f"{he.capitalize()} went home and told {his} friends all about it.",
            ]
        )
    )
    return " ".join(s)


def generate_stories(n: int, seed: int) -> list[str]:
    """Return ``n`` synthetic children's stories, deterministic for a given ``seed``."""
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n)]


def write_demo_corpus(out_dir: str | Path, n_train: int = 2000, n_valid: int = 200, seed: int = 0) -> Path:
    """Write a synthetic corpus as ``train.jsonl`` and ``validation.jsonl`` (one ``{"text": story}`` a line)."""
    out = Path(out_dir)
    check_output_dir(out, "corpus folder")  # not a file, not under /proc, below a writable folder
    out.mkdir(parents=True, exist_ok=True)
    stories = generate_stories(n_train + n_valid, seed)
    for name, part in (("train", stories[:n_train]), ("validation", stories[n_train:])):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in part)
    return out
