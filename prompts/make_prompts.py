"""Write the prompt sets of this folder (one prompt per line, for --prompts / --eval-prompts):

  geneval_train.txt / geneval_test.txt  GenEval's six categories over the 80 COCO objects and ten colours,
                                        in the grammar rewards.parse_geneval reads ("a photo of ...")
  ocr_train.txt / ocr_test.txt          scenes with a quoted text to render; the two splits share no text
  general.txt                           varied prompts for preference rewards (pickscore, aesthetic, ...)

Everything comes from the templates and word lists below and a fixed seed: `python prompts/make_prompts.py`
rewrites the same files. Splits are disjoint by construction (each candidate goes to exactly one split).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from rewards import (GENEVAL_COLORS, GENEVAL_NUMBERS, GENEVAL_OBJECTS, GENEVAL_RELATIONS,  # noqa: E402
                     article, plural)

SEED = 0
TEST_FRACTION = 0.2
GENEVAL_PER_CATEGORY = 500  # candidates drawn per category (single_object has only 80)


def _a(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def geneval_candidates(rng: random.Random) -> dict[str, list[str]]:
    """Distinct prompts per GenEval category, in a seeded order."""
    objs, cols = list(GENEVAL_OBJECTS), list(GENEVAL_COLORS)

    def draw(make, n):
        out: dict[str, None] = {}
        for _ in range(50 * n):
            out[make()] = None
            if len(out) == n:
                break
        return list(out)

    def two():
        a, b = rng.sample(objs, 2)
        return a, b

    n = GENEVAL_PER_CATEGORY
    single = [f"a photo of {_a(o)}" for o in objs]
    rng.shuffle(single)
    counting = [f"a photo of {GENEVAL_NUMBERS[k - 1]} {plural(o)}" for o in objs for k in (2, 3, 4)]
    rng.shuffle(counting)
    return {
        "single_object": single,
        "two_object": draw(lambda: "a photo of {} and {}".format(*map(_a, two())), n),
        "counting": counting[:n],
        "colors": draw(lambda: f"a photo of {_a(rng.choice(cols) + ' ' + rng.choice(objs))}", n),
        "position": draw(lambda: "a photo of {} {} {}".format(
            _a((p := two())[0]), rng.choice(GENEVAL_RELATIONS), _a(p[1])), n),
        "color_attr": draw(lambda: "a photo of {} and {}".format(
            *(_a(f"{c} {o}") for c, o in zip(rng.sample(cols, 2), two()))), n),
    }


OCR_WORDS = (
    "OPEN", "CLOSED", "SALE", "FRESH", "BREAD", "COFFEE", "PIZZA", "BOOKS", "MUSIC", "EXIT", "STOP", "HELLO",
    "WELCOME", "LATE", "NIGHT", "SUMMER", "WINTER", "GARDEN", "BAKERY", "HOTEL", "CINEMA", "MARKET", "DREAM",
    "FOCUS", "RELAX", "SMILE", "THANK YOU", "NO PARKING", "GOOD LUCK", "HAPPY BIRTHDAY", "TEA", "JAZZ", "RAIN",
    "OCEAN", "ROBOT", "PIXEL", "FLOW", "REWARD", "TACOS", "NOODLES", "VINTAGE", "LIBRARY", "STATION", "DANGER",
    "QUIET", "LOVE", "HOME", "CAFE", "GYM", "FARM", "BIKES", "TOYS", "SOUP", "DONUTS", "SUSHI", "TICKETS",
)
OCR_NUMBERS = ("24/7", "2025", "50% OFF", "NO. 9", "ROUTE 66", "42")
OCR_TEMPLATES = (
    'a storefront sign that says "{}"', 'a neon sign glowing with the words "{}"', 'a coffee mug printed with "{}"',
    'a chalkboard menu that reads "{}"', 'a t-shirt with "{}" written across the chest', 'a street sign reading "{}"',
    'a birthday cake with "{}" written in icing', 'a book cover titled "{}"', 'a poster with the word "{}" in bold letters',
    'a wooden plank with "{}" carved into it', 'a license plate that says "{}"', 'graffiti on a brick wall spelling "{}"',
    'a banner at a festival reading "{}"', 'a cardboard box labelled "{}"', 'a movie theater marquee showing "{}"',
    'a handwritten note that says "{}"', 'a billboard on a highway with the text "{}"', 'a doormat that says "{}"',
)


def ocr_texts(rng: random.Random) -> list[str]:
    """Single words, numbers, and word pairs (seeded sample): the texts to render."""
    pairs = [f"{a} {b}" for a in OCR_WORDS for b in OCR_WORDS if a != b and " " not in a + b]
    rng.shuffle(pairs)
    return list(OCR_WORDS) + list(OCR_NUMBERS) + pairs[:140]


SUBJECTS = (
    "an old lighthouse", "a red fox", "a bowl of ramen", "a vintage bicycle", "a snowy mountain village",
    "a robot gardener", "a cup of cappuccino", "a koi pond", "an astronaut", "a sailboat", "a city street at night",
    "a field of sunflowers", "a steam locomotive", "a cozy reading nook", "a hummingbird", "a desert canyon",
    "a medieval castle", "a bustling fish market", "a jellyfish", "a treehouse", "an owl", "a glass greenhouse",
    "a tiger", "a bakery window", "a mountain lake", "a paper boat", "a dragon", "a violin", "a lighthouse keeper",
    "a cat wearing a scarf", "a waterfall", "a futuristic skyline", "a bonsai tree", "a vintage typewriter",
    "a herd of elephants", "a chess board", "a hot air balloon", "a tropical beach", "a fire-breathing chef",
    "a polar bear",
)
STYLES = (
    "a photograph of", "an oil painting of", "a watercolor of", "a pencil sketch of", "a 3D render of",
    "a studio portrait of", "an isometric illustration of", "a pixel art image of", "a cinematic still of",
    "an ukiyo-e print of",
)
SETTINGS = (
    "at golden hour", "in the rain", "under a starry sky", "in soft morning light", "in a misty forest",
    "on a sunny afternoon", "in winter", "surrounded by flowers", "in dramatic lighting", "by the sea",
    "in autumn", "at dusk",
)


def general(rng: random.Random, n: int = 360) -> list[str]:
    out: dict[str, None] = {}
    while len(out) < n:
        out[f"{rng.choice(STYLES)} {rng.choice(SUBJECTS)} {rng.choice(SETTINGS)}"] = None
    return list(out)


def split(items: list[str], rng: random.Random) -> tuple[list[str], list[str]]:
    """(train, test): a seeded TEST_FRACTION (at least one) of the items is held out."""
    items = list(items)
    rng.shuffle(items)
    n_test = max(1, round(TEST_FRACTION * len(items)))
    return items[n_test:], items[:n_test]


def build() -> dict[str, list[str]]:
    """Every file's lines, by file name."""
    rng = random.Random(SEED)
    train, test = [], []
    for prompts in geneval_candidates(rng).values():
        a, b = split(prompts, rng)
        train, test = train + a, test + b
    texts_train, texts_test = split(ocr_texts(rng), rng)

    def ocr(texts):
        return [rng.choice(OCR_TEMPLATES).format(t) for t in texts for _ in range(3)]

    ocr_train, ocr_test = list(dict.fromkeys(ocr(texts_train))), list(dict.fromkeys(ocr(texts_test)))
    return {"geneval_train.txt": train, "geneval_test.txt": test, "ocr_train.txt": ocr_train,
            "ocr_test.txt": ocr_test, "general.txt": general(rng)}


def main(out_dir: Path = HERE) -> None:
    for name, lines in build().items():
        (out_dir / name).write_text("\n".join(lines) + "\n")
        print(f"{name}: {len(lines)} prompts")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
