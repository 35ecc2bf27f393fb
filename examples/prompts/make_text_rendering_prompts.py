"""Write this folder's text-rendering prompt set: ``text_rendering_train.txt`` and ``text_rendering_test.txt``.

Each prompt asks for one short text (1 to 4 words of ASCII letters and digits) between double quotes, placed in a
scene (a shop sign, a t-shirt, a book cover, neon, a cake...), which is what ``OCRReward`` reads its target from.
The texts and scene templates below were written for this project; the split and the pairing of texts with scenes
are drawn with a fixed seed, so running the script again rewrites the same files:

    python examples/prompts/make_text_rendering_prompts.py

The test texts are held out: no test prompt asks for a text that a training prompt asks for, so the evaluation
measures spelling of unseen words, not recall of trained ones. Scenes are shared by both splits.
"""

from __future__ import annotations

import os
import random
import re

SEED = 2026
"""Seed of the split and of the pairing of texts with scenes."""
NUM_TEST_TEXTS = 50
"""Texts held out for the test prompts (one prompt each)."""
PROMPTS_PER_TRAIN_TEXT = 2
"""Training prompts per training text, each in a different scene."""

TEXTS = tuple(
    text.strip()
    for line in """
# single words
Open, Closed, Bakery, Coffee, Library, Pharmacy, Garage, Exit, Welcome, Danger
Silence, Harbor, Lemonade, Tickets, Museum, Florist, Bicycle, Paradise, Thunder, Galaxy
Pancakes, Workshop, Sunrise, Jazz, Noodles, Pizza, Tacos, Records, Vintage, Hotel
Motel, Diner, Laundry, Bookstore, Cinema, Arcade, Gym, Yoga, Dojo, Bistro
Orchard, Greenhouse, Observatory, Lighthouse, Aquarium, Zoo, Circus, Carnival, Theater
Studio, Gallery, Market, Butcher, Cheese, Chocolate, Donuts, Bagels, Waffles, Smoothies
Ramen, Sushi, Dumplings, Curry, Burgers, Fries, Milkshake, Espresso, Tea, Honey
Pretzels, Candy, Toys, Puzzles, Maps, Stamps, Vinyl, Guitars, Pianos, Violins
Drums, Comet, Nebula, Orbit, Rocket, Meteor, Aurora, Glacier, Canyon, Volcano
Tornado, Blizzard, Rainbow, Meadow, Willow, Maple, Cactus, Lotus, Tulip, Sunflower
# two to four words
Fresh Bread, Hot Soup, Free WiFi, No Parking, Keep Out, Stay Calm, Good Vibes, Dream Big
Be Kind, Happy Birthday, Just Married, Grand Opening, Last Call, Open Late, Sold Out
For Sale, Now Hiring, Live Music, Night Owl, Moon River, Blue Lagoon, Red Planet
Golden Gate, Silver Lake, Iron Works, Stone Bridge, Paper Moon, Wild West, Deep Space
Cosmic Cafe, Pixel Art, Retro Games, Snack Bar, Ice Cream, Fish Market, Flower Shop
Pet Store, Bike Repair, Book Club, Chess Club, Art Class, Gate 7, Room 42, Platform 9
Route 66, Studio 54, Apartment 3B, Locker 12, Bus 21, Highway 1, Exit 13, Area 51
Year 2030, Since 1999, Est 1875, Mission Control, Happy New Year, See You Soon
Thank You, Follow Your Heart, Coffee First, Love Wins, Never Give Up, Home Sweet Home
Game Over, Level Up, Press Start, Hello World, Good Morning, Good Night, Best Dad Ever
World Champion, Team Blue, Go Tigers, Save The Bees, Plant More Trees, Ocean Breeze
Mountain Air, Desert Rose, Midnight Snack, Morning Glory, Summer Camp, Winter Sale
Spring Fair, Autumn Harvest, Farm Fresh Eggs, Local Honey, Organic Apples, Fresh Oysters
Handmade Soap, Open 24 Hours, Back In 5, Under Construction, Wet Paint, Mind The Gap
Quiet Please, Private Road, Dead End, One Way, Slow Down, Stop Here, Push, Pull
""".splitlines()
    if line and not line.startswith("#")
    for text in line.split(",")
)
"""The texts to render, each 1 to 4 words of ASCII letters and digits, all different (case ignored)."""

SCENES = (
    'a wooden shop sign above a bakery door that reads "{text}"',
    'a glowing pink neon sign on a brick wall that says "{text}"',
    'a white t-shirt on a hanger printed with the words "{text}"',
    'a hardcover book lying on a desk, its cover titled "{text}"',
    'a birthday cake with "{text}" written in blue icing',
    'a chalkboard menu outside a cafe with "{text}" in large letters',
    'a vintage movie poster with the title "{text}"',
    'a street sign on a metal pole that reads "{text}"',
    'a coffee mug on a kitchen table with "{text}" printed on it',
    'a billboard beside a highway at sunset showing the words "{text}"',
    'graffiti on a concrete wall spelling "{text}" in bold colors',
    'a handwritten note on yellow paper that says "{text}"',
    'a storefront window with "{text}" painted in gold letters',
    'a license plate on a red car that reads "{text}"',
    'a baseball cap embroidered with "{text}"',
    'a cardboard protest sign held up in a crowd reading "{text}"',
    'a wooden trail marker in a forest carved with "{text}"',
    'a magazine cover on a newsstand with the headline "{text}"',
    'a lit marquee above a theater entrance spelling "{text}"',
    'a sticker on a laptop lid that says "{text}"',
    'a doormat in front of a green door with the word "{text}"',
    'a glass jar on a shelf with a paper label reading "{text}"',
    'the side of a delivery truck painted with "{text}"',
    'a banner hanging across a town square that says "{text}"',
    'letters made of sand on a beach spelling "{text}"',
    'a computer screen in a dark room displaying "{text}"',
    'a vintage postage stamp with "{text}" printed along its edge',
    'a bottle of wine with "{text}" on its label, studio lighting',
    'a wooden crate at a market stamped with "{text}"',
    'a skywriting plane leaving the words "{text}" in a blue sky',
)
"""Scenes, each with one ``{text}`` between double quotes; no other double quote."""


_TEXT = re.compile(r"[A-Za-z0-9]+( [A-Za-z0-9]+){0,3}")


def check_inputs(texts: tuple[str, ...], scenes: tuple[str, ...]) -> None:
    """Raise a ValueError naming the first text or scene that breaks the set's rules."""
    seen = set()
    for text in texts:
        if not _TEXT.fullmatch(text):
            raise ValueError(f"Text {text!r}: use 1 to 4 words of ASCII letters and digits, single spaces.")
        if text.lower() in seen:
            raise ValueError(f"Text {text!r} appears twice (case ignored): keep one.")
        seen.add(text.lower())
    for scene in scenes:
        if scene.count('"') != 2 or '"{text}"' not in scene:
            raise ValueError(f"Scene {scene!r}: it needs exactly one quoted {{text}} and no other double quote.")


def make_prompts(seed: int = SEED) -> tuple[list[str], list[str]]:
    """The training and test prompts: ``NUM_TEST_TEXTS`` texts held out for the test prompts (one scene each), the
    others in ``PROMPTS_PER_TRAIN_TEXT`` different scenes each; both lists shuffled."""
    check_inputs(TEXTS, SCENES)
    rng = random.Random(seed)
    texts = list(TEXTS)
    rng.shuffle(texts)
    test_texts, train_texts = texts[:NUM_TEST_TEXTS], texts[NUM_TEST_TEXTS:]
    train = [scene.format(text=text) for text in train_texts for scene in rng.sample(SCENES, PROMPTS_PER_TRAIN_TEXT)]
    test = [rng.choice(SCENES).format(text=text) for text in test_texts]
    rng.shuffle(train)
    return train, test


def main() -> None:
    """Write the two prompt files next to this script."""
    folder = os.path.dirname(os.path.abspath(__file__))
    for name, prompts in zip(("train", "test"), make_prompts(), strict=True):
        path = os.path.join(folder, f"text_rendering_{name}.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("".join(prompt + "\n" for prompt in prompts))
        print(f"{len(prompts)} prompts -> {path}")


if __name__ == "__main__":
    main()
