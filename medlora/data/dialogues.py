"""Whole dialogues packed into one field, found and (with --split_dialogues) turned into real turns.

Some real datasets put a conversation into one `instruction` with speaker markers, e.g.
`<user>: ... <bot>: ...`, `Human: ... Assistant: ...`, `Patient: ... Doctor: ...` or `患者：... 医生：...`.
Trained as they are, the markers become text and every turn but the last is masked as prompt. A field
counts as a packed dialogue when one marker pair occurs with at least one assistant turn, each marker at the
start of the text or of a line (or after whitespace, for the bracketed ones). Splitting gives the text before
the first marker to the first user turn, merges repeated speakers, and leaves the record's `output` as the last
reply: the instruction must then end with a user turn, or with an assistant marker and nothing after it.
"""

import re

from medlora.errors import MedLoRAError

# (user marker, assistant marker) words; a marker is the word followed by ':' or '：'.
SPEAKER_PAIRS = [("<user>", "<bot>"), ("Human", "Assistant"), ("User", "Assistant"), ("Patient", "Doctor"),
                 ("患者", "医生"), ("病人", "医生"), ("用户", "助手"), ("问", "答")]


def _marker_pattern(user: str, assistant: str) -> re.Pattern:
    words = "|".join(re.escape(word) for word in (user, assistant))
    # Bracketed markers may follow any whitespace; word markers must open the text or a line.
    start = r"(?:^|(?<=\s))" if user.startswith("<") else r"(?:^|(?<=\n))[ \t]*"
    return re.compile(rf"{start}({words})\s*[:：]", re.MULTILINE)


PATTERNS = [(user, assistant, _marker_pattern(user, assistant)) for user, assistant in SPEAKER_PAIRS]


def find_packed_dialogue(text: str) -> tuple | None:
    """(user marker, assistant marker) when text is a dialogue packed with one of SPEAKER_PAIRS, else None."""
    for user, assistant, pattern in PATTERNS:
        speakers = [match.group(1) for match in pattern.finditer(text)]
        if user in speakers and assistant in speakers:
            return user, assistant
    return None


def split_packed_dialogue(text: str, markers: tuple, reply: str, where: str) -> list:
    """The messages of a packed dialogue, ending with `reply` (the record's output) as the last assistant turn."""
    user, assistant = markers
    pattern = next(p for u, a, p in PATTERNS if (u, a) == markers)
    matches = list(pattern.finditer(text))
    turns = []
    preamble = text[:matches[0].start()].strip()
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        role = "user" if match.group(1) == user else "assistant"
        content = text[match.end():end].strip()
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = f"{turns[-1]['content']}\n{content}".strip()
        else:
            turns.append({"role": role, "content": content})
    if preamble:
        if turns[0]["role"] == "user":
            turns[0]["content"] = f"{preamble}\n{turns[0]['content']}".strip()
        else:
            turns.insert(0, {"role": "user", "content": preamble})
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()  # "... Assistant:" with the reply in the output field
    if turns[0]["role"] != "user":
        raise MedLoRAError(f"{where}: field 'instruction': the packed dialogue opens with '{assistant}:' and no "
                           "user text before it")
    if turns[-1]["role"] != "user":
        raise MedLoRAError(f"{where}: field 'instruction': the packed dialogue ends with an '{assistant}:' turn, "
                           "so 'output' would not answer the user; end it with the user's turn")
    empty = [turn["role"] for turn in turns if not turn["content"]]
    if empty:
        raise MedLoRAError(f"{where}: field 'instruction': the packed dialogue has an empty {empty[0]} turn")
    return turns + [{"role": "assistant", "content": reply}]
