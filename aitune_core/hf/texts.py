"""Built-in sample texts for a Hugging Face folder: the accuracy gate needs no files from the user.

Varied on purpose: one word to a long paragraph (longer than most models' limit, so truncation is
exercised), several languages and scripts, punctuation, numbers, names and places (something for a
token classifier to find), emoji, and an empty string.
"""

from __future__ import annotations

from pathlib import Path

from aitune_core.errors import ArchiveError

SAMPLE_TEXTS = [
    "Hello.",
    "",
    "The cat sat on the warm windowsill all afternoon.",
    "Angela Merkel met Emmanuel Macron in Paris on Tuesday to discuss the budget.",
    "Apple opened a new office in Berlin, hiring 300 engineers from Google and Microsoft.",
    "Interest rates rose again this quarter, and mortgages followed.",
    "How do I reset my password if I no longer have access to my email?",
    "I'd like a refund: the headphones stopped working after two days.",
    "What a wonderful surprise, thank you so much!",
    "This is the worst service I have ever had. Never again.",
    "The train to Lyon leaves at 7:42 from platform 3.",
    "Error 503: service unavailable. Try again later.",
    "Photosynthesis converts light, water and carbon dioxide into sugar and oxygen.",
    "Le chat dort sur le canapé pendant que la pluie tombe sur Montréal.",
    "Der Zug nach München hat heute zwanzig Minuten Verspätung.",
    "El Museo del Prado en Madrid abre todos los días a las diez.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "مرحبا بكم في القاهرة",
    "Great job!!! 🎉🎉 See you at 5pm 👍",
    "e-mail: jane.doe@example.com, tel. +1 (555) 010-9999; ref #4471/B.",
    "Rust's borrow checker prevents data races at compile time.",
    "The quick brown fox jumps over the lazy dog.",
    "Shakespeare wrote Hamlet around 1600, when Elizabeth I ruled England.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "Q: Is this restaurant open on Sundays? A: Yes, from noon.",
    ("In the early morning, before the market opened, the fishermen sorted their catch on the pier, shouting "
     "prices to the restaurant buyers who had come down from the old town with empty crates, while gulls "
     "circled overhead and the smell of salt, diesel and fresh bread drifted from the bakery on the corner. ") * 6,
]


def read_sample_texts(path: Path) -> list[str]:
    """One text per line of ``path`` (UTF-8; blank lines kept as empty texts, trailing newline ignored)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise ArchiveError(f"--sample-texts {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise ArchiveError(f"--sample-texts {path} is not UTF-8 text: {error.reason} at byte {error.start}") from None
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ArchiveError(f"--sample-texts {path} is empty: expected one text per line")
    return lines


def with_one_mask(texts: list[str], mask_token: str) -> list[str]:
    """Each text with exactly one ``mask_token``: kept when it has one, else one of its first words masked
    (an early word, so that truncating a long text never cuts the mask off)."""
    masked = []
    for text in texts:
        count = text.count(mask_token)
        if count == 1:
            masked.append(text)
            continue
        words = text.replace(mask_token, " ").split()
        if not words:
            masked.append(mask_token)
            continue
        words[min(len(words) // 2, 8)] = mask_token
        masked.append(" ".join(words))
    return masked
