"""A fixed set of sentences written for this repository: the accuracy gate of the MiniLM archives.

Varied lengths (one word to a long paragraph), topics and punctuation; RELATED and UNRELATED
pairs check that the served embeddings still rank meaning correctly.
"""

SENTENCES = [
    "Hello.",
    "Quantization trades a little accuracy for a lot of memory.",
    "The cat sat on the warm windowsill all afternoon.",
    "A kitten was sleeping in the sun by the window.",
    "Interest rates rose again this quarter, and mortgages followed.",
    "The central bank raised its benchmark rate by a quarter point.",
    "She ran the marathon in under three hours!",
    "How do I reset my password if I no longer have access to my email?",
    "Forgot my login password; the recovery mail never arrives.",
    "Photosynthesis converts light, water and carbon dioxide into sugar and oxygen.",
    "Plants use sunlight to make their food.",
    "The train to Lyon leaves at 7:42 from platform 3.",
    "Is this restaurant open on Sundays?",
    "GPU memory bandwidth often limits the speed of large language models.",
    "The recipe calls for two cups of flour, one egg, and a pinch of salt.",
    "Mix the flour with an egg and some salt to make the dough.",
    "Volcanoes form where tectonic plates pull apart or collide.",
    "The striker scored twice in the second half; the crowd went wild.",
    "Our football team won the match with two late goals.",
    "Please find attached the invoice for October (reference #4471).",
    "Shakespeare wrote Hamlet around 1600.",
    "The museum's new exhibit features Impressionist paintings from private collections.",
    "Why is the sky blue?",
    "Rayleigh scattering makes short blue wavelengths dominate the daytime sky.",
    "I'd like a refund: the headphones stopped working after two days.",
    "The laptop battery drains in an hour, even when idle.",
    "Bake at 180 degrees for forty minutes, or until golden.",
    "Neural networks learn by adjusting weights to reduce a loss function.",
    "Gradient descent updates the parameters in the direction that lowers the error.",
    "The hikers reached the summit just before the storm rolled in.",
    "Dolphins communicate with clicks, whistles and body language.",
    "Traffic on the ring road is backed up for five kilometres after an accident.",
    "A single word: serendipity.",
    "Error 503: service unavailable. Try again later.",
    "The committee postponed the vote until all members could attend.",
    "Coffee, tea, or water -- what would you like?",
    "He plays the cello in a small orchestra on weekends.",
    "Rust's borrow checker prevents data races at compile time.",
    "The quick brown fox jumps over the lazy dog.",
    "Wind turbines generated a record share of the country's electricity last winter.",
    "Solar panels and wind farms now produce much of the nation's power.",
    "My grandmother grows tomatoes, basil and zucchini in her garden.",
    "The patient was advised to rest, drink fluids and take ibuprofen for the fever.",
    "Stock markets fell sharply after the earnings report disappointed investors.",
    "Children learn languages faster than most adults do.",
    "Mount Everest is the highest mountain above sea level, at 8,849 metres.",
    "The contract ends on 31 December unless either party gives notice.",
    "Can you recommend a good book about the history of mathematics?",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "Keep the server's ports on loopback and put a proxy in front of them.",
    (
        "In the early morning, before the market opened, the fishermen sorted their catch on the pier, "
        "shouting prices to the restaurant buyers who had come down from the old town with empty crates, "
        "while gulls circled overhead and the smell of salt, diesel and fresh bread drifted from the bakery "
        "on the corner, where the first customers were already queuing for warm loaves and strong coffee."
    ),
    (
        "Terms and conditions: by using this service you agree that your data may be processed to provide "
        "and improve the service, that you are responsible for keeping your credentials secret, that we may "
        "suspend accounts that break these rules, and that disputes are settled under the law of the country "
        "where the provider is registered. " * 3
    ).strip(),
    "ok",
    "",
    "Ünïcödé, émojis 🙂 and CJK 漢字 are text too.",
    "What time is it in Tokyo right now?",
    "The violinist tuned her instrument before the concert began.",
    "A loaf of sourdough needs a long, slow fermentation.",
]

# (sentence, a related sentence, an unrelated sentence): related must score higher.
TRIPLES = [
    ("The cat sat on the warm windowsill all afternoon.", "A kitten was sleeping in the sun by the window.",
     "Interest rates rose again this quarter, and mortgages followed."),
    ("How do I reset my password if I no longer have access to my email?",
     "Forgot my login password; the recovery mail never arrives.", "Shakespeare wrote Hamlet around 1600."),
    ("The striker scored twice in the second half; the crowd went wild.",
     "Our football team won the match with two late goals.", "Plants use sunlight to make their food."),
    ("Wind turbines generated a record share of the country's electricity last winter.",
     "Solar panels and wind farms now produce much of the nation's power.",
     "He plays the cello in a small orchestra on weekends."),
]
