"""Write the example datasets (deterministic; nothing is copied from elsewhere).

    python examples/make_examples.py          # rewrites examples/<task>/{train,valid,test}.jsonl

Six small tasks, each with train/valid/test splits and a README:
  extraction     unstructured sentence -> JSON with name, age, job and city
  text_to_sql    question over a fixed schema -> one SQLite query (seed 000's task)
  movie_reviews  genre, subject and verdict -> a one-line review (seed 000)
  support        customer message -> polite support reply (seed 002)
  dolly          instruction/context/response rows in Dolly-15k's format (seed 003)
  tool_calling   a question -> a call to one of three tools, its result, an answer from it (OpenAI
                 tools / tool_calls / tool messages; Gemma 4)
  extraction_preferences  the extraction task as preference pairs: the exact JSON (chosen) against one
                 with a typical flaw (rejected), for DPO / ORPO (seed 002's better-worse pairs)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SPLITS = {"train": 160, "valid": 20, "test": 20}

FIRST = ["Maria", "Joao", "Aiko", "Liam", "Fatima", "Noah", "Ines", "Mateo", "Chloe", "Arjun", "Sofia", "Kwame",
         "Elena", "Omar", "Hana", "Lucas", "Priya", "Jonas", "Amara", "Diego", "Mei", "Tomas", "Leila", "Ivan"]
LAST = ["Lopez", "Silva", "Tanaka", "Murphy", "Haddad", "Becker", "Costa", "Rossi", "Martin", "Rao", "Novak",
        "Mensah", "Petrova", "Khan", "Kim", "Moreau", "Nair", "Berg", "Okafor", "Garcia", "Chen", "Horvat"]
JOBS = ["nurse", "teacher", "carpenter", "software engineer", "baker", "pilot", "architect", "librarian",
        "electrician", "chef", "pharmacist", "journalist", "gardener", "accountant", "photographer", "dentist"]
CITIES = ["Porto", "Lisbon", "Osaka", "Dublin", "Beirut", "Hamburg", "Turin", "Lyon", "Pune", "Accra", "Zagreb",
          "Seoul", "Montreal", "Bergen", "Lagos", "Valencia", "Taipei", "Nairobi", "Krakow", "Quito"]
EXTRACT_TEMPLATES = [
    "{name}, {age}, works as {a_job} in {city}.",
    "Meet {name}: a {age}-year-old {job} living in {city}.",
    "{name} is {age} years old and has been {a_job} in {city} for a while.",
    "In {city}, {name} ({age}) earns a living as {a_job}.",
    "Our new neighbour {name} moved to {city}; {age}, {a_job} by trade.",
    "The {job} {name}, aged {age}, was born and raised in {city}.",
]


def a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def extraction(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    age, job, city = rng.randint(19, 78), rng.choice(JOBS), rng.choice(CITIES)
    text = rng.choice(EXTRACT_TEMPLATES).format(name=name, age=age, job=job, a_job=a(job), city=city)
    answer = json.dumps({"name": name, "age": age, "job": job, "city": city})
    return {"messages": [
        {"role": "system", "content": "Extract the person's name, age, job and city. Reply with JSON only."},
        {"role": "user", "content": text},
        {"role": "assistant", "content": answer}]}


SCHEMA = ("employees(id INTEGER, name TEXT, department TEXT, salary INTEGER, hired_on DATE, city TEXT)\n"
          "departments(name TEXT, budget INTEGER, floor INTEGER)")
DEPTS = ["Sales", "Engineering", "Support", "Finance", "Marketing", "Legal", "Research", "Operations"]


def text_to_sql(rng: random.Random) -> dict:
    d, c = rng.choice(DEPTS), rng.choice(CITIES)
    n = rng.choice([40000, 50000, 60000, 75000, 90000, 120000])
    year = rng.randint(2012, 2025)
    k = rng.randint(2, 10)
    floor = rng.randint(1, 12)
    q, sql = rng.choice([
        (f"How many employees work in {d}?", f"SELECT COUNT(*) FROM employees WHERE department = '{d}';"),
        (f"List the names of employees in {c}.", f"SELECT name FROM employees WHERE city = '{c}';"),
        (f"What is the average salary in {d}?", f"SELECT AVG(salary) FROM employees WHERE department = '{d}';"),
        (f"Who earns more than {n}?", f"SELECT name FROM employees WHERE salary > {n};"),
        (f"Which employees were hired in {year}?",
         f"SELECT name FROM employees WHERE strftime('%Y', hired_on) = '{year}';"),
        (f"Show the {k} best paid employees.", f"SELECT name, salary FROM employees ORDER BY salary DESC LIMIT {k};"),
        (f"What is the budget of {d}?", f"SELECT budget FROM departments WHERE name = '{d}';"),
        (f"Which departments are on floor {floor}?", f"SELECT name FROM departments WHERE floor = {floor};"),
        (f"How many employees in {d} live in {c}?",
         f"SELECT COUNT(*) FROM employees WHERE department = '{d}' AND city = '{c}';"),
        (f"What is the highest salary in {c}?", f"SELECT MAX(salary) FROM employees WHERE city = '{c}';"),
    ])
    return {"messages": [
        {"role": "system", "content": f"Translate the question into one SQLite query over this schema:\n{SCHEMA}"},
        {"role": "user", "content": q},
        {"role": "assistant", "content": sql}]}


GENRES = ["thriller", "comedy", "drama", "science fiction film", "animated film", "western", "horror film",
          "musical", "documentary", "romance"]
SUBJECTS = ["a lighthouse keeper", "two rival chefs", "a stolen violin", "a mission to Europa", "a small-town election",
            "a retired boxer", "a talking fox", "a heist on a night train", "a family reunion", "a lost satellite"]
VERDICTS = {
    "positive": ["A {adj} {genre} about {subject} that earns every minute of its running time.",
                 "{Subject} has never been this {adj}: {a_genre} worth seeing twice.",
                 "This {genre} turns {subject} into something {adj} and unforgettable."],
    "negative": ["{A_genre} about {subject} that is {adj} in all the wrong ways.",
                 "Even {subject} cannot save this {adj}, overlong {genre}.",
                 "This {genre} makes {subject} feel {adj}; skip it."],
    "mixed": ["{A_genre} about {subject}: {adj} at its best, uneven at its worst.",
              "{Subject} carries this {adj} {genre} further than its script deserves.",
              "Half of this {genre} about {subject} is {adj}; the other half drifts."],
}
ADJ = {"positive": ["gripping", "warm", "dazzling", "sharp", "tender"],
       "negative": ["dull", "muddled", "lifeless", "shrill", "plodding"],
       "mixed": ["ambitious", "charming", "odd", "restless", "handsome"]}


def movie_review(rng: random.Random) -> dict:
    genre, subject = rng.choice(GENRES), rng.choice(SUBJECTS)
    verdict = rng.choice(list(VERDICTS))
    line = rng.choice(VERDICTS[verdict]).format(adj=rng.choice(ADJ[verdict]), genre=genre, subject=subject,
                                                Subject=subject[0].upper() + subject[1:], a_genre=a(genre),
                                                A_genre=a(genre).capitalize())
    return {"prompt": f"Write a one-line {verdict} review of {a(genre)} about {subject}.", "completion": line}


ISSUES = [("my order #{n} arrived damaged", ("I'm so sorry your order #{n} arrived damaged. I've arranged a free "
           "replacement, and you'll receive a prepaid return label by email today.")),
          ("I was charged twice for order #{n}", ("I apologise for the double charge on order #{n}. I've refunded the "
           "duplicate payment; it should appear on your statement within 3-5 business days.")),
          ("order #{n} still hasn't shipped", ("Thank you for your patience, and I'm sorry order #{n} is late. It "
           "ships tomorrow with express delivery at no extra cost, and I'll email you the tracking number.")),
          ("I can't log in to my account", ("I'm sorry you're locked out. I've sent a password reset link to the "
           "email on your account; if it doesn't arrive within ten minutes, reply here and I'll help right away.")),
          ("I want to cancel order #{n}", ("Of course. I've cancelled order #{n} and started a full refund, which "
           "usually takes 3-5 business days. Thank you for letting us know.")),
          ("the size I got for order #{n} is wrong", ("I'm sorry about the wrong size in order #{n}. I've sent the "
           "correct size today and attached a prepaid label for the return."))]
MOODS = ["Hi, {issue}.", "Hello, {issue}. Please help.", "{Issue}! This is really frustrating.",
         "Good morning, {issue} - what can you do?", "Hey, {issue}, and I need it sorted soon."]


def support(rng: random.Random) -> dict:
    issue, reply = rng.choice(ISSUES)
    n = rng.randint(10000, 99999)
    issue, reply = issue.format(n=n), reply.format(n=n)
    msg = rng.choice(MOODS).format(issue=issue, Issue=issue[0].upper() + issue[1:])
    name = rng.choice(FIRST)
    return {"messages": [
        {"role": "system", "content": "You are a polite, concise customer support agent for an online shop."},
        {"role": "user", "content": f"{msg} - {name}"},
        {"role": "assistant", "content": f"Hi {name}, {reply[0].lower()}{reply[1:]}"}]}


PLANETS = {"Mercury": (0, 88), "Venus": (0, 225), "Mars": (2, 687), "Jupiter": (95, 4333), "Saturn": (146, 10759),
           "Uranus": (28, 30687), "Neptune": (16, 60190)}
FRUIT = {"apple": "fruit", "carrot": "vegetable", "banana": "fruit", "spinach": "vegetable", "mango": "fruit",
         "broccoli": "vegetable", "cherry": "fruit", "leek": "vegetable", "plum": "fruit", "kale": "vegetable"}


def dolly(rng: random.Random) -> dict:
    kind = rng.choice(["closed_qa", "classification", "information_extraction", "brainstorming"])
    if kind == "closed_qa":
        p = rng.choice(list(PLANETS))
        moons, days = PLANETS[p]
        ctx = f"{p} has {moons} known moons and takes {days} Earth days to orbit the Sun."
        if rng.random() < 0.5:
            return {"instruction": f"How many moons does {p} have?", "context": ctx,
                    "response": f"{p} has {moons} known moons.", "category": kind}
        return {"instruction": f"How long is a year on {p}?", "context": ctx,
                "response": f"A year on {p} lasts {days} Earth days.", "category": kind}
    if kind == "classification":
        items = rng.sample(list(FRUIT), 4)
        return {"instruction": f"Classify each as a fruit or a vegetable: {', '.join(items)}.", "context": "",
                "response": "; ".join(f"{i}: {FRUIT[i]}" for i in items) + ".", "category": kind}
    if kind == "information_extraction":
        name, job, city = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(JOBS), rng.choice(CITIES)
        ctx = f"{name} trained in {city} and now works as {a(job)} there."
        return {"instruction": "Which city does the person work in?", "context": ctx, "response": city,
                "category": kind}
    job = rng.choice(JOBS)
    ideas = rng.sample(["keep a small notebook", "ask for feedback often", "learn from a mentor", "rest properly",
                        "take a short course", "teach someone else", "plan the week on Sunday"], 3)
    return {"instruction": f"Give three tips for someone starting out as {a(job)}.", "context": "",
            "response": "\n".join(f"{i + 1}. {t[0].upper()}{t[1:]}." for i, t in enumerate(ideas)),
            "category": kind}


WEATHER = ["sunny", "cloudy", "light rain", "windy", "foggy", "snowing", "clear"]
CURRENCIES = ["EUR", "USD", "GBP", "JPY", "CHF", "CAD"]
RATES = {"EUR": 1.0, "USD": 1.08, "GBP": 0.85, "JPY": 162.0, "CHF": 0.95, "CAD": 1.47}  # per euro, made up
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount of money between currencies.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number", "description": "The amount to convert"},
            "source": {"type": "string", "description": "ISO code of the currency to convert from"},
            "target": {"type": "string", "description": "ISO code of the currency to convert to"}},
            "required": ["amount", "source", "target"]}}},
    {"type": "function", "function": {
        "name": "count_employees", "description": "Number of employees in a department.",
        "parameters": {"type": "object", "properties": {
            "department": {"type": "string", "description": "Department name"}}, "required": ["department"]}}},
]
TOOL_SYSTEM = "You are a helpful assistant. Call a tool when you need live data; otherwise answer directly."


def tool_calling(rng: random.Random) -> dict:
    """A question that needs one tool (call, result, answer from the result), or none (3 in 20)."""
    kind = rng.choices(["weather", "currency", "employees", "none"], weights=[6, 6, 5, 3])[0]
    if kind == "weather":
        city, unit = rng.choice(CITIES), rng.choice(["celsius", "fahrenheit"])
        degrees = rng.randint(-5, 35) if unit == "celsius" else rng.randint(23, 95)
        sky = rng.choice(WEATHER)
        q = rng.choice([f"What's the weather like in {city}?", f"Is it warm in {city} right now?",
                        f"How is the weather in {city} today?"])
        q += " Use Fahrenheit." if unit == "fahrenheit" else ""
        args = {"city": city} | ({"unit": unit} if unit == "fahrenheit" else {})
        result = {"temperature": degrees, "unit": unit, "conditions": sky}
        answer = f"It is {degrees} degrees {unit.capitalize()} and {sky} in {city}."
        name = "get_weather"
    elif kind == "currency":
        source, target = rng.sample(CURRENCIES, 2)
        amount = rng.choice([5, 10, 20, 50, 75, 100, 250, 1000])
        value = round(amount * RATES[target] / RATES[source], 2)
        q = rng.choice([f"How much is {amount} {source} in {target}?", f"Convert {amount} {source} to {target}.",
                        f"I have {amount} {source}. What is that in {target}?"])
        args = {"amount": amount, "source": source, "target": target}
        result = {"amount": value, "currency": target}
        answer = f"{amount} {source} is {value} {target}."
        name = "convert_currency"
    elif kind == "employees":
        dept, n = rng.choice(DEPTS), rng.randint(3, 240)
        q = rng.choice([f"How many people work in {dept}?", f"What is the headcount of {dept}?",
                        f"How big is the {dept} team?"])
        args, result, answer, name = {"department": dept}, {"count": n}, f"{dept} has {n} employees.", "count_employees"
    else:
        city, k = rng.choice(CITIES), rng.randint(2, 19)
        q, answer = rng.choice([
            (f"Spell {city} backwards.", city[::-1].capitalize() + "."),
            (f"What is {k} times {k}?", f"{k * k}."),
            (f"How many letters are in {city}?", f"{len(city)}."),
        ])
        return {"tools": TOOLS, "messages": [{"role": "system", "content": TOOL_SYSTEM},
                                             {"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
    call_id = f"call_{rng.randint(1000, 9999)}"
    return {"tools": TOOLS, "messages": [
        {"role": "system", "content": TOOL_SYSTEM},
        {"role": "user", "content": q},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
        {"role": "assistant", "content": answer}]}


FLAWS = ("age", "city", "missing_job", "prose", "first_name", "fence")


def extraction_preferences(rng: random.Random) -> dict:
    """An extraction row as a pair: the exact JSON against the same JSON with one flaw a model makes."""
    row = extraction(rng)
    context, answer = row["messages"][:2], row["messages"][2]["content"]
    fields = json.loads(answer)
    flaw = rng.choice(FLAWS)
    if flaw == "age":
        fields["age"] += rng.choice([-1, 1]) * rng.randint(1, 9)
    elif flaw == "city":
        fields["city"] = rng.choice([c for c in CITIES if c != fields["city"]])
    elif flaw == "missing_job":
        del fields["job"]
    elif flaw == "first_name":
        fields["name"] = fields["name"].split()[0]
    rejected = json.dumps(fields)
    if flaw == "prose":
        rejected = f"Sure! Here is the information you asked for: {answer}"
    elif flaw == "fence":
        rejected = f"```json\n{answer}\n```"
    return {"messages": context, "chosen": answer, "rejected": rejected}


TASKS = {"extraction": extraction, "text_to_sql": text_to_sql, "movie_reviews": movie_review, "support": support,
         "dolly": dolly, "tool_calling": tool_calling, "extraction_preferences": extraction_preferences}


def build(task: str) -> dict[str, list[dict]]:
    """Rows per split; no row repeats, within or across splits."""
    rng = random.Random(f"mlx-gemma-tune/{task}")
    seen, out = set(), {}
    for split, n in SPLITS.items():
        rows = []
        while len(rows) < n:
            row = TASKS[task](rng)
            key = json.dumps(row, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append(row)
        out[split] = rows
    return out


def write(root: Path = HERE) -> None:
    for task in TASKS:
        for split, rows in build(task).items():
            path = root / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    # the tools alone, for `chat` / `generate --tools`
    (root / "tool_calling" / "tools.json").write_text(json.dumps(TOOLS, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write()
