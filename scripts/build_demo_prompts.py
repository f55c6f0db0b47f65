"""Build the demo task's prompt files (deterministic; no downloads).

    python scripts/build_demo_prompts.py   # writes selm/data/demo/{train,eval,evidence_eval}_prompts.jsonl

Prompts ask for one short sentence about a mundane, mostly neutral topic. Training and evaluation
topics are disjoint, so evaluation measures what training taught in general, not per topic.
Each row also carries the topic's keywords, which the gold judge uses to check that a response
stays on topic (the prompt text alone is what the model sees).
"""

import hashlib
import json
import random
from pathlib import Path

TEMPLATES = [
    "Write one sentence about {t}.",
    "Describe {t} in one sentence.",
    "Write a one-line review of {t}.",
    "Tell a friend about {t} in a single sentence.",
    "Write a short caption for a photo of {t}.",
    "Give me one sentence describing {t}.",
    "In one sentence, what do you think of {t}?",
    "Write a one-sentence note about {t}.",
]

# topic -> keywords a response must mention (any, case-insensitive prefix match) to be on topic.
TRAIN_TOPICS = {
    "a Monday morning": ["monday", "morning"], "the bus ride to work": ["bus", "ride", "commute"],
    "a parking lot": ["parking", "car", "lot"], "an office meeting": ["meeting", "office"],
    "a tax form": ["tax", "form"], "a grey sky": ["sky", "grey", "gray", "cloud"],
    "a queue at the bank": ["queue", "line", "bank"], "a cup of tea": ["tea", "cup"],
    "a rainy afternoon": ["rain", "afternoon"], "a used notebook": ["notebook"],
    "a kitchen sink": ["sink", "kitchen", "dish"], "a train station": ["train", "station", "platform"],
    "a wooden chair": ["chair", "wood"], "a laundry day": ["laundry", "wash", "clothes"],
    "a city street": ["street", "city", "road"], "an old bicycle": ["bicycle", "bike"],
    "a supermarket": ["supermarket", "grocer", "store", "shop"], "a library": ["library", "book"],
    "a winter coat": ["coat", "winter"], "a school bus": ["bus", "school"],
    "a cardboard box": ["box", "cardboard"], "a lunch break": ["lunch", "break"],
    "a pair of socks": ["sock"], "a traffic light": ["traffic", "light", "signal"],
    "an email inbox": ["email", "inbox", "mail"], "a houseplant": ["plant", "leaf", "leaves"],
    "a loaf of bread": ["bread", "loaf"], "a dentist appointment": ["dentist", "appointment", "teeth", "tooth"],
    "a rainy bus stop": ["bus", "stop", "rain"], "a desk lamp": ["lamp", "light", "desk"],
    "a spreadsheet": ["spreadsheet", "cell", "excel", "data"], "a bowl of soup": ["soup", "bowl"],
    "a wet umbrella": ["umbrella"], "a phone charger": ["charger", "phone", "cable"],
    "a ceiling fan": ["fan", "ceiling"], "a quiet hallway": ["hallway", "corridor", "hall"],
    "a grocery list": ["grocer", "list", "shopping"], "a paper map": ["map"],
    "a river bank": ["river", "bank", "water"], "a small village": ["village", "town"],
    "a pencil sharpener": ["sharpener", "pencil"], "a garden hose": ["hose", "garden", "water"],
    "a coffee mug": ["mug", "coffee", "cup"], "a weekly meeting": ["meeting", "week"],
    "a long queue": ["queue", "line", "wait"], "a cloudy beach": ["beach", "cloud", "sand", "sea"],
    "a bag of apples": ["apple"], "a tired dog": ["dog"], "a neighbour's cat": ["cat", "neighbo"],
    "a hardware store": ["hardware", "store", "shop", "tool"], "a printer": ["printer", "print", "paper"],
    "a set of keys": ["key"], "a windowsill": ["window", "sill"], "a bus timetable": ["timetable", "bus", "schedule"],
    "a pile of dishes": ["dish", "plate"], "a gravel path": ["gravel", "path", "trail"],
    "a school cafeteria": ["cafeteria", "school", "lunch"], "a petrol station": ["petrol", "gas", "station", "fuel"],
}
EVAL_TOPICS = {
    "a waiting room": ["waiting", "room"], "a laundromat": ["laundromat", "laundry", "wash"],
    "a rainy car park": ["car", "park", "rain"], "a train delay": ["train", "delay", "late"],
    "an elevator": ["elevator", "lift"], "a pot of rice": ["rice", "pot"],
    "a pair of boots": ["boot"], "a kettle": ["kettle", "water", "tea"],
    "a filing cabinet": ["cabinet", "file", "filing", "drawer"], "a foggy morning": ["fog", "morning"],
    "a bus shelter": ["shelter", "bus"], "a stack of papers": ["paper", "stack", "pile"],
    "a doormat": ["doormat", "mat", "door"], "a post office": ["post", "office", "mail", "letter"],
    "a bowl of oatmeal": ["oat", "porridge", "bowl"],
}

# More held-out topics for the evidence study's larger evaluation set (selm/data/demo/
# evidence_eval_prompts.jsonl = EVAL_TOPICS + these; disjoint from TRAIN_TOPICS): 120 prompts from 15
# topics cannot pin a win rate down to a few points.
EXTRA_EVAL_TOPICS = {
    "a vending machine": ["vending", "machine", "snack"], "a stapler": ["stapler", "staple"],
    "a bathroom tile": ["tile", "bathroom"], "a parking meter": ["meter", "parking", "coin"],
    "a shopping trolley": ["trolley", "cart", "shopping"], "a tram stop": ["tram", "stop"],
    "a recycling bin": ["recycl", "bin"], "a doorbell": ["doorbell", "bell", "door"],
    "a wall clock": ["clock", "time"], "a dish rack": ["rack", "dish"],
    "a bookshelf": ["bookshelf", "shelf", "book"], "a tin of beans": ["bean", "tin", "can"],
    "a light switch": ["switch", "light"], "a staircase": ["stair", "step"],
    "a photocopier": ["photocop", "copier", "copy"], "a bus ticket": ["ticket", "bus", "fare"],
    "a sofa cushion": ["cushion", "sofa", "couch"], "a car wash": ["wash", "car"],
    "a tool shed": ["shed", "tool"], "a hotel lobby": ["lobby", "hotel"],
    "a ferry crossing": ["ferry", "crossing", "boat"], "a shoe box": ["shoe", "box"],
    "a water bottle": ["bottle", "water"], "a sandwich": ["sandwich", "bread"],
    "a noticeboard": ["notice", "board"], "a rubbish truck": ["rubbish", "truck", "garbage", "trash"],
    "a picnic bench": ["bench", "picnic"], "a mailbox": ["mailbox", "mail", "letter", "post"],
    "a toaster": ["toast"], "a hospital corridor": ["hospital", "corridor", "hall"],
    "a bank statement": ["statement", "bank"], "a wooden fence": ["fence", "wood"],
    "a ticket machine": ["ticket", "machine"], "a baggage carousel": ["baggage", "luggage", "carousel", "bag"],
    "a lecture hall": ["lecture", "hall"], "a street lamp": ["lamp", "street", "light"],
    "a bicycle rack": ["rack", "bicycle", "bike"], "a roll of tape": ["tape", "roll"],
    "a calendar": ["calendar", "date"], "a frozen pizza": ["pizza", "frozen"],
    "a bag of rice": ["rice", "bag"], "a shower curtain": ["curtain", "shower"],
    "a car battery": ["battery", "car"], "a fire escape": ["fire", "escape", "stair"],
    "a flower pot": ["pot", "flower", "plant"],
}


def rows(topics: dict) -> list[dict]:
    out = []
    for topic, keywords in topics.items():
        for tmpl in TEMPLATES:
            prompt = tmpl.format(t=topic)
            out.append({"prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "prompt": prompt,
                        "topic": topic, "keywords": keywords})
    random.Random(0).shuffle(out)
    return out


def main() -> None:
    dest = Path(__file__).resolve().parents[1] / "selm" / "data" / "demo"
    dest.mkdir(parents=True, exist_ok=True)
    for name, topics in (("train_prompts.jsonl", TRAIN_TOPICS), ("eval_prompts.jsonl", EVAL_TOPICS),
                         ("evidence_eval_prompts.jsonl", {**EVAL_TOPICS, **EXTRA_EVAL_TOPICS})):
        data = rows(topics)
        (dest / name).write_text("".join(json.dumps(r) + "\n" for r in data))
        print(f"{dest / name}: {len(data)} prompts")


if __name__ == "__main__":
    main()
