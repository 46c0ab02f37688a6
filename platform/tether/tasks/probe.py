"""The forgetting probe: short, general prompts of tether's own writing.

At the start of a run θ* answers each greedily (cached by θ*'s identity); at every evaluation
the model's mean NLL of those answers, minus θ*'s own, is ``eval/forgetting``: 0 at the start,
growing as the model loses what θ* could do. Facts, instructions, small reasoning and
everyday chat, so it covers more than any one fine-tuning task. A user file (JSONL with a
``prompt`` field per line) replaces it: ``eval.forgetting_probe: path/to/probe.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tether.errors import DataError

PROBE_PROMPTS: tuple[str, ...] = (
    # facts
    "What is the capital of France?",
    "How many days are there in a leap year?",
    "What gas do plants absorb from the air?",
    "Which planet is closest to the sun?",
    "What is the boiling point of water at sea level in Celsius?",
    "Who wrote the play Romeo and Juliet?",
    "What is the largest ocean on Earth?",
    "How many legs does a spider have?",
    "What language is spoken in Brazil?",
    "What is the chemical symbol for gold?",
    "What is the tallest mountain in the world?",
    "Which organ pumps blood through the body?",
    "What is the freezing point of water in Fahrenheit?",
    "How many continents are there?",
    # instructions
    "Write one sentence describing a rainy morning.",
    "List three fruits that are yellow.",
    "Give me a synonym for the word happy.",
    "Translate 'thank you' into Spanish.",
    "Write a short title for a story about a lost dog.",
    "Name two things you might pack for a beach trip.",
    "Rewrite this sentence in the past tense: I walk to school.",
    "Suggest a name for a small bakery.",
    "Write a haiku about autumn leaves.",
    "Explain what a verb is in one sentence.",
    "Give one tip for sleeping better.",
    "Summarise in one sentence: The meeting moved from Monday to Wednesday because the room was booked.",
    # small reasoning
    "What is 12 plus 15?",
    "If I have 3 apples and eat one, how many are left?",
    "What is 7 times 8?",
    "Which is heavier, a kilogram of iron or a kilogram of feathers?",
    "If today is Tuesday, what day is it tomorrow?",
    "What is half of 50?",
    "Is 17 an even or an odd number?",
    "A train leaves at 3 pm and the trip takes 2 hours. When does it arrive?",
    "Put these numbers in order from smallest to largest: 9, 2, 5.",
    "What comes next in the sequence 2, 4, 6, 8?",
    "How many minutes are in two hours?",
    "If a shirt costs 20 dollars and is half price, what does it cost?",
    # everyday chat
    "Hi! How are you today?",
    "Can you recommend a good way to start learning to cook?",
    "I feel a bit tired this afternoon. Any advice?",
    "What should I do if I forget my umbrella and it starts raining?",
    "Tell me a fun fact about cats.",
    "What is a nice thing to say to a friend who passed an exam?",
    "How do I politely decline an invitation?",
    "What are some good habits for staying organised?",
    "Can you help me think of a weekend activity?",
    "Why do people enjoy listening to music?",
    "What is a good breakfast before a long walk?",
    "How can I keep my plants healthy indoors?",
    "What makes a good team member?",
    "Say something encouraging for a Monday morning.",
)


def read_probe_prompts(path: str | Path) -> list[str]:
    """The ``prompt`` of each line of a user's probe file (JSONL; blank lines skipped).

    Read as UTF-8 with an optional byte-order mark: editors on Windows write one, and json
    would refuse the first line for it."""
    prompts = []
    text = Path(path).read_text(encoding="utf-8-sig")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(
                f"eval.forgetting_probe: {path} line {number} needs a 'prompt' field"
            ) from None
        prompts.append(str(prompt))
    return prompts
