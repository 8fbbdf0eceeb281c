"""Scoring medical multiple-choice questions and held-out perplexity (used by evaluate.py).

Questions and their prompts come from medlora/data/questions.py.

loglik (lm-evaluation-harness multiple-choice style): each option's reply is scored by the sum of the
log-probabilities of its own text's tokens after the prompt (not the template's closing text, not EOS).  With lm-eval's names: acc, the option with
the highest sum is right; acc_norm, the highest sum per character of the reply; acc_bytes, per UTF-8 byte.
Each comes with its standard error (medlora/evaluation/report.py).
generate (medAlpaca style): a greedy reply, from which `extract_choice` reads the chosen option.
Triage sets (questions with each option's urgency level) add under_triage, the share of emergencies answered with
a less urgent option (the dangerous error), and over_triage, the share of the other scenarios sent to the
emergency department, each with its standard error; the choice judged is acc's (loglik) or the one read from the
reply (generate, where an emergency answered with no readable choice counts as under-triaged).
Perplexity of an SFT file: exp(mean NLL over the reply tokens, encoded exactly as for training).
"""

import math
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from medlora.data.questions import LETTERS, Question, conversation, reply_text
from medlora.data.tokenization import IGNORE_INDEX, ConversationEncoder
from medlora.errors import MedLoRAError
from medlora.evaluation.report import mean_with_stderr


# ---- metrics and answer extraction ------------------------------------------------------------------------------
def choose_options(logliks: list, char_lengths: list, byte_lengths: list) -> tuple:
    """(acc, acc_norm, acc_bytes predictions) as lm-evaluation-harness's multiple_choice tasks: the argmax
    of the summed loglik, of loglik per character of the reply, and of loglik per UTF-8 byte; ties go to
    the first option (numpy's argmax)."""
    def first_best(scores):
        return max(range(len(scores)), key=lambda i: (scores[i], -i))

    return (first_best(logliks), first_best([ll / n for ll, n in zip(logliks, char_lengths)]),
            first_best([ll / n for ll, n in zip(logliks, byte_lengths)]))


_CUE = re.compile(r"\b(?:answer|option|choice)s?\b(?:\s+(?:is|would\s+be|will\s+be|should\s+be))?\s*[:=\-]?\s*"
                  r"(?:(?:option|choice)\b\s*)?", re.IGNORECASE)
_MARKUP = " \t\r\n*_`'\"([{<"
_DELIMITERS = ".):]}>*,;\n"


def extract_choice(response: str, options: list) -> int | None:
    """The option a generated reply chooses, or None when it cannot be told.

    In order: a letter or option text right after a cue ("The answer is (C)", "Answer: c", "option D");
    at the start ("C.", "**B**", "(A) Aspirin", "Yes, ..."); a bracketed or bold letter anywhere; a lone
    capital letter ("I would pick C"; "A" before a lowercase word is the article); the text of exactly
    one option anywhere. A letter beyond the options is never an answer.
    """
    letters = LETTERS[: len(options)]
    text = response.strip()
    for match in _CUE.finditer(text):
        found = _leading_choice(text[match.end():], options, letters, after_cue=True)
        if found is not None:
            return found
    found = _leading_choice(text, options, letters, after_cue=False)
    if found is not None:
        return found
    for pattern in (r"(?:\*\*|\(|\[)\s*([A-Za-z])\s*(?:\*\*|\)|\])", r"(?<![\w'])([A-Z])(?![\w'])"):
        chosen = set()
        for match in re.finditer(pattern, text):
            letter, rest = match.group(1), text[match.end():]
            if letter.upper() in letters and not (letter in "AI" and re.match(r"\s+[a-z]", rest)):
                chosen.add(letter.upper())
        if len(chosen) == 1:
            return letters.index(chosen.pop())
    lowered = text.lower()
    named = [index for index, option in enumerate(options)
             if re.search(rf"(?<!\w){re.escape(option.strip().lower())}(?!\w)", lowered)]
    return named[0] if len(named) == 1 else None


def _leading_choice(segment: str, options: list, letters: str, after_cue: bool) -> int | None:
    segment = segment.lstrip(_MARKUP)
    if segment[:1].upper() in letters and segment[:1].isalpha() and not segment[1:2].isalnum():
        rest = segment[1:]
        if not rest.strip() or rest[0] in _DELIMITERS or (after_cue and segment[0].isupper()):
            return letters.index(segment[0].upper())
    lowered, best = segment.lower(), None
    for index, option in enumerate(options):
        option = option.strip().lower()
        fits = option and lowered.startswith(option) and not lowered[len(option):len(option) + 1].isalnum()
        if fits and (best is None or len(option) > len(options[best].strip())):
            best = index
    return best


# ---- running a model ---------------------------------------------------------------------------------------------
@dataclass
class ScoringRequest:
    """A token sequence and the positions whose tokens are scored (each predicted from the one before)."""

    input_ids: list
    positions: list


class Evaluator:
    def __init__(self, model, tokenizer, template, batch_size: int = 8, max_new_tokens: int = 32):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.encoder = ConversationEncoder(tokenizer, template, cutoff_len=None, add_eos_token=False)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def padded_batches(self, sequences: list, desc: str, left: bool):
        """(indices, input_ids, attention_mask) per batch of batch_size sequences, longest first (an
        out-of-memory error shows at once, and similar lengths waste less padding)."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, unit="batch", leave=False):
            indices = order[start:start + self.batch_size]
            width = max(len(sequences[i]) for i in indices)
            input_ids = torch.full((len(indices), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, index in enumerate(indices):
                length = len(sequences[index])
                span = slice(width - length, width) if left else slice(0, length)
                input_ids[row, span], attention_mask[row, span] = torch.tensor(sequences[index]), 1
            yield indices, input_ids.to(self.device), attention_mask.to(self.device)

    def score_requests(self, requests: list, desc: str) -> list:
        """[(sum of log-probabilities, token count)] per request. Right padding: every real position
        keeps its position ids and sees only the tokens before it, exactly as unpadded."""
        results = [None] * len(requests)
        for indices, input_ids, attention_mask in self.padded_batches([r.input_ids for r in requests], desc, left=False):
            batch = [requests[i] for i in indices]
            # Logits only where a scored token is predicted: prompts need none.
            predict_at = torch.tensor(sorted({p - 1 for r in batch for p in r.positions}), dtype=torch.long)
            with torch.no_grad():
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                    logits_to_keep=predict_at.to(self.device), use_cache=False).logits
            logprobs = logits.float().log_softmax(dim=-1).cpu()
            for row, (index, request) in enumerate(zip(indices, batch)):
                columns = torch.searchsorted(predict_at, torch.tensor(request.positions, dtype=torch.long) - 1)
                targets = torch.tensor([request.input_ids[p] for p in request.positions], dtype=torch.long)
                results[index] = (logprobs[row, columns, targets].sum().item(), len(request.positions))
        return results

    def loglik(self, questions: list, shots: list, desc: str) -> dict:
        conversations = [conversation(q, s, i) for q, s in zip(questions, shots) for i in range(len(q.options))]
        requests = [ScoringRequest(ids, positions) for ids, positions in self.encoder.encode_final_reply(conversations)]
        scores = iter(self.score_requests(requests, desc))
        rows = []
        for question in questions:
            logliks = [next(scores)[0] for _ in question.options]
            replies = [reply_text(question, i) for i in range(len(question.options))]
            chars, byte_counts = [len(r) for r in replies], [len(r.encode("utf-8")) for r in replies]
            pred, pred_norm, pred_bytes = choose_options(logliks, chars, byte_counts)
            letters, answer = question.letters, question.answer
            rows.append(dict(_describe(question), pred=letters[pred], pred_norm=letters[pred_norm],
                             pred_bytes=letters[pred_bytes], correct=pred == answer, correct_norm=pred_norm == answer,
                             correct_bytes=pred_bytes == answer, option_loglik=logliks, option_chars=chars,
                             option_bytes=byte_counts))
        return {**mean_with_stderr("acc", [r["correct"] for r in rows]),
                **mean_with_stderr("acc_norm", [r["correct_norm"] for r in rows]),
                **mean_with_stderr("acc_bytes", [r["correct_bytes"] for r in rows]),
                **triage_metrics(questions, [q.letters.index(r["pred"]) for q, r in zip(questions, rows)]),
                "n": len(rows), "questions": rows}

    def generate(self, questions: list, shots: list, desc: str) -> dict:
        prompts = [self.encoder.encode_prompt(conversation(q, s)) for q, s in zip(questions, shots)]
        responses = self.generate_replies(prompts, desc)
        rows = []
        for question, response in zip(questions, responses):
            choice = extract_choice(response, question.options)
            rows.append(dict(_describe(question), response=response,
                             pred=None if choice is None else question.letters[choice], correct=choice == question.answer))
        return {**mean_with_stderr("acc", [r["correct"] for r in rows]), "unparsed": sum(r["pred"] is None for r in rows),
                **triage_metrics(questions, [None if r["pred"] is None else q.letters.index(r["pred"])
                                             for q, r in zip(questions, rows)]),
                "n": len(rows), "questions": rows}

    def generate_replies(self, prompts: list, desc: str) -> list:
        """Greedy replies, batched with left padding (generate derives positions from the attention
        mask), cut at the template's stop strings."""
        replies = [None] * len(prompts)
        stop = list(self.template.stop) or None
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos_ids = sorted({self.tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
                         - {None})  # an instruct model's config may add its end-of-turn id
        for indices, input_ids, attention_mask in self.padded_batches(prompts, desc, left=True):
            with torch.no_grad():
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=self.max_new_tokens,
                    do_sample=False, temperature=None, top_p=None, top_k=None,
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos_ids or None,
                    stop_strings=stop, tokenizer=self.tokenizer if stop else None)
            for index, ids in zip(indices, output[:, input_ids.shape[1]:].tolist()):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                for marker in self.template.stop:
                    text = text.split(marker)[0]
                replies[index] = text.strip()
        return replies

    def perplexity(self, conversations: list, cutoff_len: int | None, add_eos_token: bool, desc: str) -> dict:
        """exp(mean NLL) over the reply tokens of an SFT file, encoded as finetune.py encodes it."""
        encoder = ConversationEncoder(self.tokenizer, self.template, cutoff_len, train_on_inputs=False,
                                      add_eos_token=add_eos_token)
        report = encoder.encode(conversations)
        if not report.examples:
            raise MedLoRAError(f"--perplexity_path: no record has a reply token left after truncation at "
                               f"cutoff_len {cutoff_len}")
        requests = [ScoringRequest(e.input_ids, [p for p in range(1, len(e.labels)) if e.labels[p] != IGNORE_INDEX])
                    for e in report.examples]
        scores = self.score_requests(requests, desc)
        tokens = sum(count for _, count in scores)
        nll = -sum(total for total, _ in scores) / max(tokens, 1)
        return {"perplexity": math.exp(nll), "mean_nll": nll, "tokens": tokens, "records": len(report.examples),
                "dropped": sum(report.dropped.values()), "truncated": report.truncated}


def triage_metrics(questions: list, chosen: list) -> dict:
    """under_triage and over_triage with their standard errors, for questions that carry urgency levels ({} for
    others). chosen: the option index each question was answered with, None when no choice could be read."""
    if not questions or any(q.urgency is None for q in questions):
        return {}
    emergencies = [(q, c) for q, c in zip(questions, chosen) if q.urgency[q.answer] == "emergency"]
    others = [(q, c) for q, c in zip(questions, chosen) if q.urgency[q.answer] != "emergency"]
    return {**mean_with_stderr("under_triage", [c is None or q.urgency[c] != "emergency" for q, c in emergencies]),
            **mean_with_stderr("over_triage", [c is not None and q.urgency[c] == "emergency" for q, c in others]),
            "emergencies": len(emergencies), "non_emergencies": len(others)}


def _describe(question: Question) -> dict:
    return {"source": question.source, "id": question.id, "answer": question.letters[question.answer]}
