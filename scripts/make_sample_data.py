"""Generate MedLoRA's sample training data from our own hand-written disease table.

All text comes from ``data/diseases.json`` and the templates below, both written for
this project; nothing is copied from an external dataset. The generator is
deterministic (fixed string seeds, no reliance on hash or set order), so re-running
it reproduces the committed files byte for byte. Run from the repository root:

    python scripts/make_sample_data.py                     # regenerates data/*
    python scripts/make_sample_data.py --output-dir /tmp/x # writes elsewhere

Outputs (UTF-8, ``ensure_ascii=False``, sorted keys):

* ``sft/medical_chat_en.json``    -- JSON array of alpaca records (instruction/input/output)
* ``sft/medical_multiturn.jsonl`` -- ShareGPT conversations (system/human/gpt turns)
* ``sft/medical_chat_zh.jsonl`` -- Chinese OpenAI ``messages`` records
* ``sample_questions.json``   -- short English questions for demos

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DISEASES_PATH = REPO_ROOT / "data" / "diseases.json"

SEED = 20240611
# Records are generated round-robin over the disease table so that every condition is
# represented equally: 40 diseases x 9 = 360 English single-turn records, etc.
EN_RECORDS_PER_DISEASE = 9
MULTITURN_PER_DISEASE = 2
ZH_RECORDS_PER_DISEASE = 2
# Every EMPTY_INPUT_EVERY-th English record puts the whole question in `instruction`.
EMPTY_INPUT_EVERY = 5
# Every ZH_TWO_EXCHANGES_EVERY-th Chinese record gets a follow-up question.
ZH_TWO_EXCHANGES_EVERY = 5
# Keep answers short so a tiny model can learn from them quickly.
MIN_ANSWER_WORDS = 40
MAX_ANSWER_WORDS = 120
CHILD_AGE_LIMIT = 16

# Training files go to sft/, the folder finetune.py reads by default.
EN_FILE = "sft/medical_chat_en.json"
MULTITURN_FILE = "sft/medical_multiturn.jsonl"
ZH_FILE = "sft/medical_chat_zh.jsonl"
QUESTIONS_FILE = "sample_questions.json"

# --------------------------------------------------------------------------------------
# English templates
# --------------------------------------------------------------------------------------

INSTRUCTIONS = [
    "You are a doctor. Answer the patient's question based on their description.",
    "You are a helpful medical assistant. Read the patient's message and give careful, practical advice.",
    "Act as a physician. Based on the symptoms described, explain the likely cause and what the patient should do.",
    "Respond to the following patient inquiry as an experienced primary care doctor.",
    "As a medical professional, give a cautious assessment and self-care advice for the patient below.",
    "Answer this health question as a knowledgeable and careful doctor would.",
    "If you are a doctor, please answer the medical question based on the patient's description.",
]

ADULT_INTROS = [
    "Hi doctor, I'm {a_age}-year-old {noun}.",
    "Hello, I am {a_age}-year-old {noun}.",
    "I'm {age} years old ({sex}).",
    "{age}-year-old {noun} here.",
    "Good morning, doctor. I'm {age}.",
    "",
]
ADULT_SYMPTOM_LINES = [
    "For {duration} I've had {symptoms}.",
    "I've been dealing with {symptoms} for {duration}.",
    "{Duration} ago I started noticing {symptoms}.",
    "My main problems are {symptoms}, which began {duration} ago.",
    "It has been {duration} now with {symptoms}.",
]
ADULT_CONTEXT = [
    "",
    "",
    "I don't have any long-term medical conditions.",
    "I'm not taking any regular medication.",
    "It's starting to affect my work.",
    "I've tried resting but it hasn't helped much.",
]
ADULT_QUESTIONS = [
    "What could this be?",
    "What do you think is going on, and what should I do?",
    "Should I be worried?",
    "Is there anything I can do at home?",
    "Do I need to see a doctor?",
    "What is causing this and how can I treat it?",
    "Could you tell me what this might be?",
]
CHILD_SYMPTOM_LINES = [
    "My {age}-year-old {noun} has had {symptoms} for {duration}.",
    "Hello doctor, my {noun} is {age} and for {duration} {pronoun} has had {symptoms}.",
    "I'm worried about my {age}-year-old {noun}, who developed {symptoms} {duration} ago.",
]
CHILD_QUESTIONS = [
    "What should we do?",
    "Does {pronoun} need to see a doctor?",
    "What could this be?",
    "How can I help {object} feel better?",
    "Is this serious?",
]

OPENERS = [
    "Based on what you describe, this sounds most like {name}, although an examination is needed to be sure.",
    "{Symptoms} together most often point to {name}. Other causes are possible, so please treat this as a likely explanation rather than a diagnosis.",
    "Thank you for the details. The most likely cause is {name}, but other conditions can look similar.",
    "From your description, {name} is the most likely explanation, though I cannot confirm it without an examination.",
    "I'm sorry to hear that. These symptoms are typical of {name}, but a clinician should confirm it.",
    "{Symptoms} are common features of {name}, which is the most likely explanation here.",
]
ADVICE_LEADS = ["", "", "Here is what usually helps.", "In the meantime, a few things can help."]
TEST_SENTENCES = [
    "A doctor may confirm this with {tests}.",
    "Useful checks include {tests}.",
    "Your clinician may suggest {tests}.",
]
# Red flags often contain "or" themselves, so they are always listed with "and". The
# wording says "promptly" rather than "emergency" because some conditions' red flags
# (e.g. scarring acne) need a timely visit, not an ambulance.
RED_FLAG_SENTENCES = [
    "Seek medical care promptly if you notice warning signs such as {red_flags}.",
    "Warning signs that need prompt attention include {red_flags}.",
    "Please get checked quickly if there are red flags such as {red_flags}.",
]
CLOSINGS = [
    "Please see {specialist} if things are not improving or you are worried.",
    "It would be sensible to book an appointment with {specialist} for a proper assessment.",
    "Consider seeing {specialist}, especially if symptoms persist or get worse.",
    "If symptoms persist, {specialist} can assess this properly and tailor the treatment.",
]

# General questions that carry the whole query in `instruction` (empty `input`).
GENERAL_QUESTIONS = {
    "symptoms": [
        "What are the common symptoms of {name}?",
        "What symptoms does {name} usually cause?",
        "How can I tell if I have {name}?",
    ],
    "treatment": [
        "How is {name} usually treated?",
        "What can I do at home for {name}?",
        "What is the best way to manage {name}?",
    ],
    "warning_signs": [
        "When should someone with {name} see a doctor?",
        "What are the warning signs to watch for with {name}?",
        "When is {name} an emergency?",
    ],
    "tests": [
        "What tests are used to diagnose {name}?",
        "How do doctors diagnose {name}?",
        "Which examinations are needed to confirm {name}?",
    ],
}

SYSTEM_PROMPTS_EN = [
    "You are a knowledgeable, careful medical assistant. Give clear, practical information and recommend seeing a clinician when appropriate.",
    "You are a friendly doctor chatting with a patient. Be cautious and never claim a definite diagnosis without an examination.",
    "You are MedLoRA, an AI health assistant. Provide general medical information, not a diagnosis, and flag warning signs that need urgent care.",
    "You are a primary care physician answering questions online. Keep answers short, kind, and medically sound.",
]

# Follow-up questions in multi-turn chats, keyed by topic; "{we}" is "I" or "we".
FOLLOW_UP_QUESTIONS = {
    "duration": [
        "How long does this usually last?",
        "How long will it take to get better?",
        "It's already been {duration}. Is that normal?",
    ],
    "medication": [
        "Is there any medicine that can help?",
        "Should {we} use any medication for this?",
        "What about painkillers or other medicines?",
    ],
    "tests": [
        "Are any tests needed?",
        "How would a doctor confirm it?",
        "What tests might a doctor do?",
    ],
    "see_doctor": [
        "When should {we} see a doctor?",
        "At what point should {we} be worried?",
        "Do {we} need to go to the emergency room?",
    ],
    "home_care": [
        "Is there anything else {we} can do at home?",
        "What else can help while {we} wait for it to settle?",
        "Any other self-care tips?",
    ],
}
FIRST_REPLY_ENDINGS = [
    "Feel free to ask if you have more questions.",
    "Let me know if you would like more detail on anything.",
    "",
]
DURATION_ANSWERS = {
    "hours": "It varies, but {name} often settles within hours to a few days with the right care.",
    "days": "Most people start to feel better within a few days to two weeks, although some symptoms can linger a little longer.",
    "weeks": "It can take a few weeks to settle, and the pace varies from person to person.",
    "months": "{Name} is often a longer-term problem. Rather than clearing up in days, it usually improves gradually with the right treatment and lifestyle changes, and may need regular follow-up.",
}
# Advice sentences mentioning any of these are treated as medication advice.
MEDICINE_WORDS = (
    "medicine", "paracetamol", "ibuprofen", "antibiotic", "antiviral", "antihistamine",
    "inhaler", "spray", "cream", "gel", "lotion", "drops", "laxative", "tablet",
    "supplement", "injection", "antacid", "painkiller", "pain relief",
)
MEDICINE_SAFETY = (
    "Always follow the label, and check with a pharmacist or doctor first if you take "
    "other medicines, are pregnant, or have kidney, liver, or stomach problems."
)

# --------------------------------------------------------------------------------------
# Chinese templates
# --------------------------------------------------------------------------------------

ZH_ADULT_MESSAGES = [
    "医生您好，我今年{age}岁，{sex}。最近{duration}一直有{symptoms}的情况，请问这是怎么回事？",
    "您好，我{age}岁，{sex}性。{duration}前开始{symptoms}，需要去医院看看吗？",
    "医生，我是{age}岁的{sex}性，主要症状是{symptoms}，已经持续{duration}了，该怎么办？",
    "请问医生，{symptoms}持续了{duration}，可能是什么病？我今年{age}岁。",
]
ZH_CHILD_MESSAGES = [
    "医生您好，我家{child}今年{age}岁，最近{duration}出现了{symptoms}，请问要紧吗？",
    "孩子{age}岁，{symptoms}已经{duration}了，需要带去医院吗？",
]
ZH_OPENERS = [
    "根据您的描述，{symptoms}比较符合{name}的表现，但具体还需要医生面诊才能确定。",
    "您好，{symptoms}常见于{name}，不过其他疾病也可能有类似表现，这里只是初步判断。",
    "从这些症状来看，最可能是{name}，但线上咨询无法代替面诊。",
]
ZH_ADVICE_LEADS = ["", "可以先这样处理：", "日常可以注意以下几点："]
ZH_RED_FLAG_SENTENCES = [
    "如果出现{red_flags}等情况，请尽快就医。",
    "需要特别警惕的情况包括：{red_flags}，一旦出现请尽快去医院。",
    "若有{red_flags}，应及时就诊。",
]
ZH_CLOSINGS = [
    "如果症状持续不缓解或逐渐加重，建议及时到医院就诊。",
    "建议抽时间去医院请医生当面检查，以明确诊断。",
    "如有疑问，请尽早就医，由医生当面评估。",
]
ZH_SYSTEM_PROMPTS = [
    "你是一名耐心、专业的医生，请根据患者的描述给出谨慎的建议，必要时建议就医。",
    "你是一个医疗健康助手，提供一般性的健康信息，不能替代医生的面诊。",
    "你是经验丰富的全科医生，请用通俗易懂的中文回答患者的问题。",
]
ZH_FOLLOW_UP_QUESTIONS = {
    "medication": ["需要吃药吗？", "可以吃点什么药缓解一下吗？"],
    "see_doctor": ["什么情况下一定要去医院？", "需要马上去医院吗？"],
    "home_care": ["平时生活上要注意些什么？", "在家还能做些什么？"],
}
ZH_MEDICINE_SAFETY = "用药前请仔细阅读说明书；如果正在服用其他药物、怀孕或有肝肾疾病，请先咨询医生或药师。"
ZH_DURATIONS = {
    "hours": ["几个小时", "两个小时", "半天"],
    "days": ["两天", "三天", "四五天", "一两天"],
    "weeks": ["一周", "十来天", "两周", "三周"],
    "months": ["一个月", "两个月", "三个月", "半年"],
}
EN_DURATIONS = {
    "hours": ["a few hours", "two hours", "six hours", "half a day"],
    "days": ["two days", "three days", "four days", "five days", "a couple of days"],
    "weeks": ["a week", "ten days", "two weeks", "three weeks"],
    "months": ["a month", "two months", "three months", "six months", "several months"],
}

SAMPLE_QUESTIONS = [
    "I've had a runny nose and a sore throat for three days. Should I take antibiotics?",
    "What can I do at home to relieve a tension headache?",
    "My ankle is swollen after I twisted it playing football. Do I need an X-ray?",
    "I feel thirsty all the time and urinate a lot. Could this be diabetes?",
    "It burns when I urinate and I need to go very often. What could this be?",
    "How can I lower my blood pressure without medication?",
    "I have trouble falling asleep most nights. Any tips?",
    "When should I go to the emergency room for a fever?",
]


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    age: int
    is_female: bool

    @property
    def is_child(self) -> bool:
        return self.age < CHILD_AGE_LIMIT

    @property
    def noun(self) -> str:
        if self.is_child:
            return "daughter" if self.is_female else "son"
        return "woman" if self.is_female else "man"

    @property
    def pronoun(self) -> str:
        return "she" if self.is_female else "he"

    @property
    def object_pronoun(self) -> str:
        return "her" if self.is_female else "him"


def random_patient(rng: random.Random, disease: dict) -> Patient:
    low, high = disease["age_range"]
    return Patient(age=rng.randint(low, high), is_female=rng.random() < 0.5)


def join_en(items: list[str]) -> str:
    """'a', 'a and b', 'a, b, and c'; 'a; b; and c' when an item has its own commas."""
    if len(items) <= 2:
        return " and ".join(items)
    separator = "; " if any("," in item for item in items) else ", "
    return f"{separator.join(items[:-1])}{separator}and {items[-1]}"


def join_zh(items: list[str]) -> str:
    """'甲'、'甲和乙'、'甲、乙和丙'."""
    if len(items) == 1:
        return items[0]
    return f"{'、'.join(items[:-1])}和{items[-1]}"


def list_zh(items: list[str]) -> str:
    """'甲、乙、丙'; '甲；乙；丙' when an item already contains '、' or '，'."""
    separator = "；" if any("、" in item or "，" in item for item in items) else "、"
    return separator.join(items)


def with_article(age: int) -> str:
    """'a 34-year-old' but 'an 8-year-old', 'an 11-year-old', 'an 80-year-old'."""
    article = "an" if str(age).startswith("8") or age in (11, 18) else "a"
    return f"{article} {age}"


def capitalize_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def join_sentences(parts: list[str]) -> str:
    return " ".join(part for part in parts if part)


def word_count(text: str) -> int:
    return len(text.split())


def pick_symptom_indices(rng: random.Random, disease: dict) -> list[int]:
    """2-3 symptom indices, in random order.

    The table lists each condition's most characteristic symptom first; it is always
    included so the named condition is a reasonable guess (a mild fever alone is not
    shingles). Indices rather than strings keep English and Chinese aligned.
    """
    extra_count = min(rng.randint(1, 2), len(disease["symptoms"]) - 1)
    indices = [0, *rng.sample(range(1, len(disease["symptoms"])), extra_count)]
    rng.shuffle(indices)
    return indices


def pick_advice_indices(rng: random.Random, disease: dict, count: int) -> list[int]:
    """`count` advice indices in table order, always including the first one.

    The first advice sentence is the key one (e.g. "strep throat needs antibiotics");
    later ones may build on it ("finish the whole course"), so it is never left out.
    """
    extra_count = min(count, len(disease["advice"])) - 1
    return [0, *sorted(rng.sample(range(1, len(disease["advice"])), extra_count))]


def medicine_advice_indices(disease: dict) -> list[int]:
    return [
        index
        for index, sentence in enumerate(disease["advice"])
        if any(word in sentence.lower() for word in MEDICINE_WORDS)
    ]


def check_answer_length(text: str) -> str:
    words = word_count(text)
    if not MIN_ANSWER_WORDS <= words <= MAX_ANSWER_WORDS:
        raise ValueError(f"answer has {words} words, outside the allowed range: {text!r}")
    return text


# --------------------------------------------------------------------------------------
# English single-turn records
# --------------------------------------------------------------------------------------


def patient_message(rng: random.Random, patient: Patient, symptoms: list[str], duration: str) -> str:
    """A patient's first message: who they are, what they feel, for how long, and a question."""
    fields = {
        "age": patient.age,
        "a_age": with_article(patient.age),
        "noun": patient.noun,
        "sex": "female" if patient.is_female else "male",
        "pronoun": patient.pronoun,
        "object": patient.object_pronoun,
        "symptoms": join_en(symptoms),
        "duration": duration,
        "Duration": capitalize_first(duration),
    }
    if patient.is_child:
        parts = [rng.choice(CHILD_SYMPTOM_LINES), rng.choice(CHILD_QUESTIONS)]
    else:
        parts = [
            rng.choice(ADULT_INTROS),
            rng.choice(ADULT_SYMPTOM_LINES),
            rng.choice(ADULT_CONTEXT),
            rng.choice(ADULT_QUESTIONS),
        ]
    return join_sentences([part.format(**fields) for part in parts])


def red_flag_sentence(rng: random.Random, disease: dict) -> str:
    return rng.choice(RED_FLAG_SENTENCES).format(red_flags=join_en(disease["red_flags"]))


def doctor_reply(rng: random.Random, disease: dict, symptoms: list[str]) -> str:
    """Cautious answer: likely condition, self-care, tests, red flags, when to see whom."""
    opener = rng.choice(OPENERS).format(name=disease["name"], Symptoms=capitalize_first(join_en(symptoms)))
    advice_lead = rng.choice(ADVICE_LEADS)
    advice = pick_advice_indices(rng, disease, rng.randint(2, 3))
    tests = rng.choice(TEST_SENTENCES).format(tests=join_en(disease["tests"]))
    red_flags = red_flag_sentence(rng, disease)
    closing = rng.choice(CLOSINGS).format(specialist=disease["specialist"])

    # Trim the least essential parts until the answer fits the word budget: first the
    # lead-in, then extra advice (keeping one), then the tests sentence. The opener,
    # red flags and the closing referral are always kept.
    while True:
        advice_text = [disease["advice"][index] for index in advice]
        text = join_sentences([opener, advice_lead, *advice_text, tests, red_flags, closing])
        if word_count(text) <= MAX_ANSWER_WORDS:
            return check_answer_length(text)
        if advice_lead:
            advice_lead = ""
        elif len(advice) > 1:
            advice.pop()
        elif tests:
            tests = ""
        else:
            return check_answer_length(text)  # raises: nothing left to trim


def general_answer(rng: random.Random, disease: dict, topic: str) -> str:
    """Answer to a general question about a condition (no patient description)."""
    name = disease["name"]
    tests = join_en(disease["tests"])
    closing = rng.choice(CLOSINGS).format(specialist=disease["specialist"])
    if topic == "symptoms":
        parts = [
            f"Common symptoms of {name} include {join_en(disease['symptoms'])}.",
            "Symptoms vary between people, and other conditions can look similar.",
            rng.choice(TEST_SENTENCES).format(tests=tests),
            red_flag_sentence(rng, disease),
            closing,
        ]
    elif topic == "treatment":
        parts = [
            f"Treatment of {name} depends on how severe it is, but these general steps help.",
            *disease["advice"],
            red_flag_sentence(rng, disease),
            closing,
        ]
    elif topic == "warning_signs":
        parts = [
            f"With {name}, certain signs mean you should get medical help quickly.",
            red_flag_sentence(rng, disease),
            f"Even without these, see {disease['specialist']} if symptoms persist, get worse, or worry you.",
            rng.choice(TEST_SENTENCES).format(tests=tests),
            disease["advice"][0],
        ]
    elif topic == "tests":
        parts = [
            "A doctor usually starts by asking about your symptoms and examining you.",
            f"To confirm {name}, useful checks include {tests}.",
            "These also help rule out other conditions with similar symptoms.",
            disease["advice"][0],
            closing,
        ]
    else:
        raise ValueError(f"unknown topic {topic!r}")
    return check_answer_length(join_sentences(parts))


def english_record(rng: random.Random, disease: dict, empty_input: bool) -> dict:
    patient = random_patient(rng, disease)
    symptoms = [disease["symptoms"][i] for i in pick_symptom_indices(rng, disease)]
    duration = rng.choice(EN_DURATIONS[disease["typical_duration"]])
    if not empty_input:
        return {
            "instruction": rng.choice(INSTRUCTIONS),
            "input": patient_message(rng, patient, symptoms, duration),
            "output": doctor_reply(rng, disease, symptoms),
        }
    # Empty-input records: either the patient's own story or a general question.
    topic = rng.choice(["patient", *GENERAL_QUESTIONS])
    if topic == "patient":
        question = patient_message(rng, patient, symptoms, duration)
        answer = doctor_reply(rng, disease, symptoms)
    else:
        question = rng.choice(GENERAL_QUESTIONS[topic]).format(name=disease["name"])
        answer = general_answer(rng, disease, topic)
    return {"instruction": question, "input": "", "output": answer}


def build_english_records(diseases: list[dict], seed: int = SEED) -> list[dict]:
    rng = random.Random(f"{seed}-en")
    records: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    for index in range(EN_RECORDS_PER_DISEASE * len(diseases)):
        disease = diseases[index % len(diseases)]
        empty_input = index % EMPTY_INPUT_EVERY == 0
        # Re-draw on the (rare) exact duplicate so every record is unique.
        for _ in range(100):
            record = english_record(rng, disease, empty_input)
            key = (record["instruction"], record["input"], record["output"])
            if key not in seen:
                break
        else:
            raise RuntimeError(f"could not make a unique record for {disease['name']}")
        seen.add(key)
        records.append(record)
    rng.shuffle(records)
    return records


# --------------------------------------------------------------------------------------
# English multi-turn conversations (ShareGPT)
# --------------------------------------------------------------------------------------


def follow_up_answer(rng: random.Random, disease: dict, topic: str, unused_advice: list[int]) -> str:
    name = disease["name"]
    specialist = disease["specialist"]
    if topic == "duration":
        parts = [DURATION_ANSWERS[disease["typical_duration"]].format(name=name, Name=capitalize_first(name))]
        parts += [sentence for sentence in disease["advice"] if "within" in sentence][:1]
        parts.append(f"If things are not improving as expected, or new symptoms appear, see {specialist}.")
    elif topic == "medication":
        medicine = [disease["advice"][i] for i in medicine_advice_indices(disease)]
        if not medicine:
            medicine = [f"Medicine is usually not the main treatment for {name}.", disease["advice"][0]]
        parts = [*medicine, MEDICINE_SAFETY]
    elif topic == "tests":
        parts = [
            f"To confirm {name}, a doctor may use {join_en(disease['tests'])}.",
            "These also help rule out other conditions with similar symptoms.",
            f"{capitalize_first(specialist)} can tell you which ones are needed in your case.",
        ]
    elif topic == "see_doctor":
        parts = [
            red_flag_sentence(rng, disease),
            f"Otherwise, book an appointment with {specialist} if symptoms last longer than expected, keep coming back, or worry you.",
        ]
    elif topic == "home_care":
        if unused_advice:
            parts = [disease["advice"][i] for i in unused_advice]
        else:
            parts = ["To recap:", *disease["advice"]]
        parts.append("Keep track of how symptoms change so you can describe them clearly to a doctor if needed.")
    else:
        raise ValueError(f"unknown topic {topic!r}")
    return join_sentences(parts)


def build_conversation(rng: random.Random, disease: dict, with_system: bool) -> dict:
    patient = random_patient(rng, disease)
    symptoms = [disease["symptoms"][i] for i in pick_symptom_indices(rng, disease)]
    duration = rng.choice(EN_DURATIONS[disease["typical_duration"]])

    # The first reply gives the likely cause and a little advice; follow-ups cover the rest.
    advice = pick_advice_indices(rng, disease, 2)
    first_reply = join_sentences([
        rng.choice(OPENERS).format(name=disease["name"], Symptoms=capitalize_first(join_en(symptoms))),
        *(disease["advice"][i] for i in advice),
        rng.choice(FIRST_REPLY_ENDINGS),
    ])
    turns = []
    if with_system:
        turns.append({"from": "system", "value": rng.choice(SYSTEM_PROMPTS_EN)})
    turns.append({"from": "human", "value": patient_message(rng, patient, symptoms, duration)})
    turns.append({"from": "gpt", "value": first_reply})

    unused_advice = [i for i in range(len(disease["advice"])) if i not in advice]
    topics = rng.sample(list(FOLLOW_UP_QUESTIONS), rng.randint(1, 3))
    for topic in topics:
        question = rng.choice(FOLLOW_UP_QUESTIONS[topic]).format(
            we="we" if patient.is_child else "I", duration=duration
        )
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": follow_up_answer(rng, disease, topic, unused_advice)})
    return {"conversations": turns}


def build_multiturn_conversations(diseases: list[dict], seed: int = SEED) -> list[dict]:
    rng = random.Random(f"{seed}-multiturn")
    conversations = [
        build_conversation(rng, diseases[index % len(diseases)], with_system=index % 2 == 0)
        for index in range(MULTITURN_PER_DISEASE * len(diseases))
    ]
    rng.shuffle(conversations)
    return conversations


# --------------------------------------------------------------------------------------
# Chinese records (OpenAI messages)
# --------------------------------------------------------------------------------------


def zh_patient_message(rng: random.Random, patient: Patient, symptoms: list[str], duration: str) -> str:
    fields = {
        "age": patient.age,
        "sex": "女" if patient.is_female else "男",
        "child": "女儿" if patient.is_female else "儿子",
        "symptoms": join_zh(symptoms),
        "duration": duration,
    }
    templates = ZH_CHILD_MESSAGES if patient.is_child else ZH_ADULT_MESSAGES
    return rng.choice(templates).format(**fields)


def zh_red_flag_sentence(rng: random.Random, disease: dict) -> str:
    return rng.choice(ZH_RED_FLAG_SENTENCES).format(red_flags=list_zh(disease["red_flags_zh"]))


def zh_doctor_reply(rng: random.Random, disease: dict, symptoms: list[str], advice: list[int]) -> str:
    return "".join([
        rng.choice(ZH_OPENERS).format(symptoms=join_zh(symptoms), name=disease["name_zh"]),
        rng.choice(ZH_ADVICE_LEADS),
        *(disease["advice_zh"][i] for i in advice),
        zh_red_flag_sentence(rng, disease),
        rng.choice(ZH_CLOSINGS),
    ])


def zh_follow_up_answer(rng: random.Random, disease: dict, topic: str, unused_advice: list[int]) -> str:
    if topic == "medication":
        medicine = [disease["advice_zh"][i] for i in medicine_advice_indices(disease)]
        if not medicine:
            medicine = ["这种情况一般不以药物治疗为主。", disease["advice_zh"][0]]
        return "".join([*medicine, ZH_MEDICINE_SAFETY])
    if topic == "see_doctor":
        return "".join([
            zh_red_flag_sentence(rng, disease),
            "即使没有这些情况，如果症状持续不见好转或反复发作，也建议尽早到医院就诊。",
        ])
    if topic == "home_care":
        advice = unused_advice or range(len(disease["advice_zh"]))
        return "".join([*(disease["advice_zh"][i] for i in advice), "平时注意观察症状变化，如有加重请及时就医。"])
    raise ValueError(f"unknown topic {topic!r}")


def build_zh_record(rng: random.Random, disease: dict, with_system: bool, with_follow_up: bool) -> dict:
    patient = random_patient(rng, disease)
    symptom_indices = pick_symptom_indices(rng, disease)
    symptoms = [disease["symptoms_zh"][i] for i in symptom_indices]
    duration = rng.choice(ZH_DURATIONS[disease["typical_duration"]])
    advice = pick_advice_indices(rng, disease, 2)

    messages = []
    if with_system:
        messages.append({"role": "system", "content": rng.choice(ZH_SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": zh_patient_message(rng, patient, symptoms, duration)})
    messages.append({"role": "assistant", "content": zh_doctor_reply(rng, disease, symptoms, advice)})
    if with_follow_up:
        topic = rng.choice(list(ZH_FOLLOW_UP_QUESTIONS))
        unused_advice = [i for i in range(len(disease["advice_zh"])) if i not in advice]
        messages.append({"role": "user", "content": rng.choice(ZH_FOLLOW_UP_QUESTIONS[topic])})
        messages.append({"role": "assistant", "content": zh_follow_up_answer(rng, disease, topic, unused_advice)})
    return {"messages": messages}


def build_zh_records(diseases: list[dict], seed: int = SEED) -> list[dict]:
    rng = random.Random(f"{seed}-zh")
    records = [
        build_zh_record(
            rng,
            diseases[index % len(diseases)],
            # Offset by one so system prompts and follow-ups are not always on the same records.
            with_system=index % 2 == 1,
            with_follow_up=index % ZH_TWO_EXCHANGES_EVERY == 0,
        )
        for index in range(ZH_RECORDS_PER_DISEASE * len(diseases))
    ]
    rng.shuffle(records)
    return records


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def to_json(obj: object, indent: int | None = None) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=indent)


def write_text(path: Path, text: str) -> None:
    # newline="\n" keeps the bytes identical on every platform.
    path.write_text(text, encoding="utf-8", newline="\n")


def write_json(path: Path, obj: object) -> None:
    write_text(path, to_json(obj, indent=2) + "\n")


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(to_json(record) + "\n" for record in records))


def load_diseases(path: Path = DISEASES_PATH) -> list[dict]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def main(output_dir: str | Path = "data", diseases_path: str | Path = DISEASES_PATH) -> dict[str, Path]:
    """Regenerate all sample data files into ``output_dir``; returns {file name: path}."""
    diseases = load_diseases(Path(diseases_path))
    output = Path(output_dir)
    paths = {name: output / name for name in (EN_FILE, MULTITURN_FILE, ZH_FILE, QUESTIONS_FILE)}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_json(paths[EN_FILE], build_english_records(diseases))
    write_jsonl(paths[MULTITURN_FILE], build_multiturn_conversations(diseases))
    write_jsonl(paths[ZH_FILE], build_zh_records(diseases))
    write_json(paths[QUESTIONS_FILE], SAMPLE_QUESTIONS)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir",
        default=str(REPO_ROOT / "data"),
        help="folder to write the generated files to (default: the repository's data/)",
    )
    args = parser.parse_args()
    for written in main(args.output_dir).values():
        print(f"wrote {written}")
