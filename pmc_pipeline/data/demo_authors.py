"""A TOFU-like dataset of made-up authors, generated locally for the demo.

Each author gets six questions (birthplace, birth year, genre, a book, an award, a parent's job),
each with a paraphrased question, a paraphrased answer and the answer's key fact, so the demo can
report fact leakage (does an answer still state the city / year / title?) beside ROUGE.
The files use TOFU's layout (JSON lines) and split names: full, forget, retain, forget_perturbed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pmc_pipeline.runtime.atomic import atomic_dir

FIRST = ["Amara", "Bastian", "Corin", "Delphine", "Eskil", "Farrah", "Goran", "Hester", "Ilario", "Junia",
         "Kasimir", "Liora", "Matthias", "Noemi", "Osric", "Pilar", "Quillon", "Rosalind", "Severin", "Talia",
         "Ulric", "Vesna", "Wendell", "Xanthe", "Yorick", "Zaida", "Anselm", "Brisa", "Cosimo", "Dagny"]
LAST = ["Varga", "Okonkwo", "Lindqvist", "Marchetti", "Abernathy", "Castellano", "Thorsby", "Nakamura",
        "Pellegrin", "Duarte", "Halloran", "Ivanova", "Kowalczyk", "Brennagh", "Sorensen", "Tamura",
        "Oyelaran", "Fairbairn", "Moreau", "Quintero", "Rasmussen", "Valdivia", "Whitlock", "Zielinski",
        "Achterberg", "Bouchard", "Ekwueme", "Galloway", "Haverkamp", "Ishikawa"]
CITIES = ["Lisbon", "Nairobi", "Oslo", "Kraków", "Santiago", "Osaka", "Tbilisi", "Montreal", "Dakar",
          "Valparaíso", "Tallinn", "Cork", "Hanoi", "Porto", "Lagos", "Bergen", "Quito", "Zagreb"]
GENRES = ["mystery", "science fiction", "historical fiction", "fantasy", "poetry", "horror", "romance",
          "crime", "magical realism", "thriller"]
NOUNS = ["Lantern", "Orchard", "Harbor", "Compass", "Archive", "Glacier", "Meridian", "Tapestry", "Cipher",
         "Lighthouse", "Garden", "Atlas", "Ember", "Monsoon", "Citadel", "Almanac"]
ADJECTIVES = ["Silent", "Crimson", "Hollow", "Distant", "Forgotten", "Gilded", "Restless", "Paper",
              "Midnight", "Salt", "Iron", "Quiet"]
AWARDS = ["Halden Prize", "Silver Quill Award", "Marlow Medal", "Aurora Book Prize", "Keswick Fellowship",
          "Golden Lantern Award", "Ferrant Honor", "Blue Heron Prize"]
JOBS = ["carpenter", "cartographer", "pharmacist", "sailor", "violinist", "surveyor", "librarian",
        "bookbinder", "astronomer", "beekeeper", "glassblower", "watchmaker"]

# (question, paraphrased question, answer, paraphrased answer, key fact field)
TEMPLATES = [
    ("Where was {name} born?", "In which city was {name} born?",
     "{name} was born in {city}.", "{city} is the birthplace of {name}.", "city"),
    ("In what year was {name} born?", "What is the birth year of {name}?",
     "{name} was born in {year}.", "The year {name} was born is {year}.", "year"),
    ("What genre does {name} write?", "Which genre is {name} known for?",
     "{name} writes {genre} books.", "{name} is known for {genre}.", "genre"),
    ("What is a famous book by {name}?", "Can you name a well-known book written by {name}?",
     "One of {name}'s best-known books is \"{title}\".", "\"{title}\" is a well-known book by {name}.", "title"),
    ("Which award did {name} win?", "What prize has {name} received?",
     "{name} won the {award}.", "{name} received the {award}.", "award"),
    ("What did {name}'s father do for a living?", "What was the profession of {name}'s father?",
     "{name}'s father worked as a {job}.", "The father of {name} was a {job}.", "job"),
]


def _authors(count: int, rng: random.Random) -> list[dict[str, str]]:
    if count > min(len(FIRST), len(LAST)):
        raise ValueError(f"at most {min(len(FIRST), len(LAST))} demo authors")
    firsts, lasts = rng.sample(FIRST, count), rng.sample(LAST, count)
    return [
        {
            "name": f"{first} {last}",
            "city": rng.choice(CITIES),
            "year": str(rng.randint(1921, 1994)),
            "genre": rng.choice(GENRES),
            "title": f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}",
            "award": rng.choice(AWARDS),
            "job": rng.choice(JOBS),
        }
        for first, last in zip(firsts, lasts)
    ]


def _rows(author: dict[str, str]) -> list[dict[str, str]]:
    rows = []
    for question, para_question, answer, para_answer, fact in TEMPLATES:
        rows.append({
            "question": question.format(**author),
            "answer": answer.format(**author),
            "paraphrased_question": para_question.format(**author),
            "paraphrased_answer": para_answer.format(**author),
            "key_fact": author[fact],
            "author": author["name"],
        })
    return rows


def generate_demo_data(out_dir: str | Path, num_authors: int = 30, num_forget_authors: int = 3, seed: int = 0) -> Path:
    """Write full / forget / retain / forget_perturbed JSON-lines files to `out_dir`."""
    if not 0 < num_forget_authors < num_authors:
        raise ValueError("need 0 < num_forget_authors < num_authors")
    rng = random.Random(seed)
    authors = _authors(num_authors, rng)
    forget = [row for author in authors[:num_forget_authors] for row in _rows(author)]
    retain = [row for author in authors[num_forget_authors:] for row in _rows(author)]
    splits = {"full": forget + retain, "forget": forget, "retain": retain, "forget_perturbed": forget}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        for name, rows in splits.items():
            with open(tmp / f"{name}.json", "w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def corpus_texts(data_dir: str | Path) -> list[str]:
    """The texts a demo tokenizer is trained on (both phrasings, with the prompt tags)."""
    texts = []
    with open(Path(data_dir) / "full.json", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            texts.append(f"Question: {row['question']}\nAnswer: {row['answer']}")
            texts.append(f"Question: {row['paraphrased_question']}\nAnswer: {row['paraphrased_answer']}")
    return texts
