"""Regenerate the shipped NIAH haystack (``valley-*.txt``) byte for byte.

The haystack is original, procedurally generated prose (a chronicle of an invented river valley),
so the project owns it outright and can ship it; it deliberately avoids cities, numbers, codes and
instructions, the material the needles are made of, so a needle stands out as the one sentence of
its kind. Run ``python data/haystack/make_haystack.py`` from the repository root; the output depends
only on ``SEED`` and the word lists below (``random.Random`` with an int seed; the test suite
checks that the shipped files still regenerate exactly, which would catch a Python release that
changed ``choice``/``sample``/``randint``).
"""
from __future__ import annotations

import random
import textwrap
from pathlib import Path

SEED = 20240423
CHAPTERS = 6
PARAGRAPHS_PER_CHAPTER = 40

PEOPLE = ["Alder Wren", "Maud Fennick", "old Tobias", "the miller's widow", "Hester Crane", "young Piers",
          "the ferryman", "Agnes Lowe", "the schoolmistress", "Corwin Ashby", "the two Beck sisters",
          "Ned Halloway", "the shepherd from the upper farm", "Rosalind Marsh", "the blacksmith",
          "Elspeth Varley", "the curate", "Jonah Pell", "the innkeeper's boy", "Winifred Stott"]
PLACES = ["the lower meadow", "the mill race", "the old stone bridge", "the orchard behind the chapel",
          "the ridge path", "the market square", "the reed beds", "the long barn", "the beech wood",
          "the ford below the weir", "the sheep walk", "the kitchen gardens", "the churchyard wall",
          "the hollow lane", "the water meadows", "the top of Gorse Hill", "the willow bank"]
SEASONS = ["early spring", "the wet end of April", "midsummer", "the first weeks of harvest",
           "late autumn", "the dead of winter", "the thaw", "a long dry August", "the frosty mornings of November"]
WEATHER = ["a thin rain drifted across the valley", "the wind came hard from the west",
           "mist lay in the hollows until noon", "the sky stayed low and grey for days",
           "the sun came out warm after a week of cloud", "a hard frost silvered every hedge",
           "thunder rolled along the ridge without bringing rain", "the air was still and heavy",
           "snow settled lightly on the thatch", "a bright cold wind scoured the fields"]
ANIMALS = ["the geese", "the herons", "the rooks", "the cattle", "the starlings", "the swallows",
           "the jackdaws", "the bees", "the ewes and their lambs", "the lapwings", "the pigs", "the farm dogs"]
CRAFTS = ["mending nets", "thatching the cart shed", "splitting ash for hurdles", "weaving rush baskets",
          "tanning hides", "repairing the sluice gate", "laying a hedge", "carving spoons from sycamore",
          "pressing apples for cider", "spinning wool by the fire", "whitewashing the dairy"]
GOODS = ["eggs and butter", "bundles of withies", "honey in stoneware jars", "wool", "cheeses wrapped in cloth",
         "baskets of plums", "salted eels", "turnips and leeks", "hand-made rope", "candles", "smoked bacon"]
FEELINGS = ["quietly pleased", "uneasy", "tired but content", "restless", "hopeful", "stubborn",
            "thoughtful", "cheerful", "worried", "proud"]
ADVERBS = ["slowly", "without hurry", "as usual", "more carefully than before", "with some difficulty",
           "in good spirits", "before anyone else was awake", "while the light lasted"]

TEMPLATES = {
    "weather": [
        "In {season} {weather}, and {animal} kept close to {place}.",
        "Nobody could remember a {season_adj} season like it; {weather}.",
        "By evening {weather}, and the lamps were lit early in every cottage.",
        "{Person} said the weather would turn, and for once {pronoun} was right.",
        "The river rose a hand's breadth overnight and brown water spread over {place}.",
        "For three days {weather}, so the work in the fields went {adverb}.",
        "The almanac promised a mild {season_word}, but the almanac was wrong as often as not.",
        "Towards dawn {weather}, and the chimneys smoked sideways over the roofs.",
        "Rain or no rain, the cows had to be milked and the water carried up from the well.",
    ],
    "work": [
        "{Person} spent the morning {craft} near {place}.",
        "Most of the valley was {craft} {adverb}, because the season demanded it.",
        "It was {person} who taught the younger ones the knack of {craft}.",
        "There was always more to do than hands to do it, and {craft} came last.",
        "{Person} worked {adverb}, stopping now and then to watch {animal}.",
        "After the midday meal {person} went back to {craft}, feeling {feeling}.",
        "The tools hung in a row on the barn wall, each one worn smooth by hands long gone.",
        "{Person} had a way of {craft} that the others could never quite copy.",
        "By the end of the week the job was done, though not as well as {person} would have liked.",
    ],
    "market": [
        "On market day {person} carried {goods} down to {place}.",
        "The stalls were thin that week, with little on them but {goods}.",
        "{Person} bargained {adverb} over {goods} and came home {feeling}.",
        "Prices had risen since {season}, and people grumbled about it over their cups.",
        "Someone had brought {goods} from over the ridge, and they sold before noon.",
        "The talk in the square was all of the weather and of {person}.",
        "A pedlar came through with ribbons and needles and a great deal of news, most of it untrue.",
        "{Person} counted the coins twice on the way home and still could not make them come out right.",
    ],
    "river": [
        "The river ran quick and clear past {place}, and {animal} fished the shallows.",
        "{Person} rowed across at dusk, the oars dripping, while {animal} called from the reeds.",
        "Where the water slowed below the weir, the children hunted for crayfish under the stones.",
        "In {season} the ford was too deep to cross, and carts went the long way round by {place}.",
        "The ferryman kept a lantern on the post so that late travellers could find the landing.",
        "Nobody trusted the river after dark, however calm it looked from {place}.",
        "Once, long before anyone now living, the river had changed its course in a single night.",
        "{Person} liked to sit on {place} and watch the water go by, thinking of nothing at all.",
    ],
    "people": [
        "{Person} had lived in the valley all {pronoun_pos} life and had never once crossed the ridge.",
        "Everyone agreed that {person} was {feeling} that year, though nobody quite knew why.",
        "{Person} and {person2} had not spoken since the quarrel over the boundary stones.",
        "When {person} fell ill, the neighbours took turns at {craft} for the best part of a month.",
        "{Person} never said much at the inn, but people listened when {pronoun} did.",
        "The house where {person} lived stood a little apart, at the far end of {place}.",
        "As a child {person} had been afraid of the river, and some of that fear had never left.",
        "{Person} kept a small book of the weather, written in a careful slanting hand.",
        "It was said that {person} could tell the hour from the shadows on {place}.",
    ],
    "evening": [
        "In the evenings the family sat by the fire and {person} told the old stories again.",
        "By lamplight {person} was {craft}, and the room smelled of woodsmoke and wet wool.",
        "The bells rang for evensong, and the sound carried all the way to {place}.",
        "When the last light left the hills, {animal} settled and the valley went quiet.",
        "Supper was bread, a little cheese and whatever the garden could spare.",
        "{Person} walked home along {place}, listening to {animal} in the dark.",
        "Somebody fetched a fiddle, and for an hour the kitchen was full of noise and dancing.",
        "Late at night {person} lay awake, going over the work that still had to be done.",
    ],
    "animals": [
        "{Animal} were restless all that week, which the old people took as a sign.",
        "{Person} would not have the dogs in the house, whatever the weather.",
        "The old grey mare had carried three generations to market and seemed set on carrying a fourth.",
        "A fox had been at the hens again, and {person} sat up two nights to watch for it.",
        "In {season} {animal} gathered on {place} in great numbers.",
        "{Person} claimed that {animal} knew the weather better than any almanac.",
        "The lambs came late, but most of them lived, and {person} was {feeling}.",
        "The bees swarmed in the orchard, and it took half the afternoon to hive them again.",
    ],
    "land": [
        "The soil on the lower fields was heavy clay, slow to warm and slow to drain.",
        "{Person} walked the hedges with a billhook, cutting back what the summer had grown.",
        "Beyond {place} the ground rose into rough pasture and then into gorse and bracken.",
        "The old track along {place} had sunk so deep that the banks rose above a rider's head.",
        "Every field had a name, and most of the names were older than anyone could explain.",
        "In {season} the furrows filled with water and shone like strips of pewter.",
        "From the top of the ridge the whole valley could be seen, laid out like a patched quilt.",
        "{Person} knew every gate and stile between the mill and {place}.",
    ],
}
CONNECTIVES = ["Even so, ", "Later, ", "Meanwhile, ", "That year, ", "As it happened, ", "Afterwards, ",
               "In those days, "]
SEASON_ADJ = {"early spring": "cold", "the wet end of April": "wet", "midsummer": "hot",
              "the first weeks of harvest": "busy", "late autumn": "gloomy", "the dead of winter": "bitter",
              "the thaw": "muddy", "a long dry August": "dry", "the frosty mornings of November": "sharp"}
SEASON_WORD = {"early spring": "spring", "the wet end of April": "spring", "midsummer": "summer",
               "the first weeks of harvest": "harvest", "late autumn": "autumn", "the dead of winter": "winter",
               "the thaw": "spring", "a long dry August": "summer", "the frosty mornings of November": "winter"}


def _pronoun(person: str) -> tuple[str, str]:
    female = ("Maud", "widow", "Hester", "Agnes", "schoolmistress", "sisters", "Rosalind", "Elspeth", "Winifred")
    if "sisters" in person:
        return "they", "their"
    return ("she", "her") if any(f in person for f in female) else ("he", "his")


def sentence(rng: random.Random, topic: str, lead: str) -> str:
    tpl = rng.choice(TEMPLATES[topic])
    person, person2 = rng.sample(PEOPLE, 2)
    if rng.random() < 0.6 and lead != person2:  # a paragraph mostly follows one person
        person = lead
    season = rng.choice(SEASONS)
    pron, pron_pos = _pronoun(person)
    animal = rng.choice(ANIMALS)
    s = tpl.format(person=person, Person=person[0].upper() + person[1:], person2=person2, place=rng.choice(PLACES),
                   season=season, season_adj=SEASON_ADJ[season], season_word=SEASON_WORD[season],
                   weather=rng.choice(WEATHER), animal=animal,
                   Animal=animal[0].upper() + animal[1:], craft=rng.choice(CRAFTS), goods=rng.choice(GOODS),
                   feeling=rng.choice(FEELINGS), adverb=rng.choice(ADVERBS), pronoun=pron, pronoun_pos=pron_pos)
    if rng.random() > 0.15:
        return s
    proper = any(s.startswith(p) for p in PEOPLE if p[0].isupper())
    return rng.choice(CONNECTIVES) + (s if proper else s[0].lower() + s[1:])


def paragraph(rng: random.Random) -> str:
    topics = list(TEMPLATES)
    main, lead = rng.choice(topics), rng.choice(PEOPLE)
    out, seen = [], set()
    n = rng.randint(4, 7)
    while len(out) < n:
        topic = main if rng.random() < 0.6 else rng.choice(topics)
        s = sentence(rng, topic, lead)
        if s not in seen:  # no sentence twice in a paragraph
            seen.add(s)
            out.append(s)
    return " ".join(out)


def chapter(rng: random.Random, n: int) -> str:
    title = f"Chapter {['One', 'Two', 'Three', 'Four', 'Five', 'Six'][n]}"
    paras = [textwrap.fill(paragraph(rng), width=100) for _ in range(PARAGRAPHS_PER_CHAPTER)]
    return title + "\n\n" + "\n\n".join(paras) + "\n"


def main(out: Path = Path(__file__).parent) -> None:
    rng = random.Random(SEED)
    for n in range(CHAPTERS):
        (Path(out) / f"valley-{n + 1:02d}.txt").write_text(chapter(rng, n))


if __name__ == "__main__":
    main()
