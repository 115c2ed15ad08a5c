"""Seeded tasks with checkable answers for the RL runs of benches/RESULTS.md (issue 14).

  python benches/make_rl_tasks.py arithmetic OUT.jsonl [N]  # "What is a + b? Reply with only the number."
  python benches/make_rl_tasks.py wordcount OUT.jsonl       # "Describe X in exactly five words."

arithmetic: rows {"prompt", "answer"} (a, b in 1..9), for `--reward match:answer`.
wordcount: one row per topic below {"prompt", "topic"}, for `--reward length:5`.
"""
import json, random, sys

TOPICS = """the ocean|a cat|winter|coffee|a library|the moon|a thunderstorm|bread|a bicycle|the desert|
a forest|music|a train station|snow|a lighthouse|chess|a volcano|tea|a city at night|the wind|a garden|
a river|an old map|autumn|a dog|the sun|a mountain|rain|a violin|a market|a bridge|summer|a candle|
a whale|the sky|a castle|spring|an island|a clock|a painting|a kitchen|a storm at sea|a cactus|a hospital|
an airport|a museum|a school|a farm|a wedding|a robot|the internet|a smartphone|a rocket|a beach|
a waterfall|a cave|a meadow|a glacier|a jungle|a swamp|a canyon|a harbor|a village|a skyscraper|
a subway|a highway|a festival|a circus|a zoo|a fox|an owl|a bee|a butterfly|a shark|an elephant|a lion|
a horse|a penguin|a spider|a dragon|a ghost|a wizard|a pirate|a knight|a queen|a detective|a chef|
a teacher|a doctor|a painter|a poet|a sailor|a soldier|friendship|love|fear|hope|time|silence|memory|
a dream|a journey|a secret|a promise|a mistake|a victory|a holiday|a birthday|chocolate|pizza|soup|
an apple|a lemon|honey|cheese|a sandwich|ice cream|a pencil|a book|a letter|a key|a door|a window|
a mirror|a hat|shoes|a blanket|a pillow|a lamp|a chair""".replace("\n", "")

task, out = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 400
r = random.Random(0)
with open(out, "w") as f:
    if task == "arithmetic":
        for _ in range(n):
            a, b = r.randint(1, 9), r.randint(1, 9)
            row = {"prompt": f"What is {a} + {b}? Reply with only the number.", "answer": str(a + b)}
            f.write(json.dumps(row) + "\n")
    elif task == "wordcount":
        for t in TOPICS.split("|"):
            f.write(json.dumps({"prompt": f"Describe {t.strip()} in exactly five words.", "topic": t.strip()}) + "\n")
    else:
        sys.exit(f"unknown task {task!r}: arithmetic or wordcount")
