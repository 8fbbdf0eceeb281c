"""Scoring medical multiple-choice questions and held-out perplexity (used by evaluate.py).

Questions and their prompts come from medlora/questions.py.

loglik (lm-evaluation-harness multiple-choice style): each option's reply is scored by the sum of the
log-probabilities of its tokens after the prompt (no EOS).  acc: the option with the highest sum is
right.  acc_norm: the highest sum divided by the reply's length in UTF-8 bytes is right.
generate (medAlpaca style): a greedy reply, from which `extract_choice` reads the chosen option.
Perplexity of an SFT file: exp(mean NLL over the reply tokens, encoded exactly as for training).
"""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medlora.errors import MedLoRAError
from medlora.questions import LETTERS, Question, conversation, reply_text
from medlora.tokenization import IGNORE_INDEX, ConversationEncoder


# ---- metrics and answer extraction ------------------------------------------------------------------------------
def choose_options(logliks: list, byte_lengths: list) -> tuple:
    """(acc prediction, acc_norm prediction) as lm-evaluation-harness: argmax of the summed loglik,
    and argmax of loglik per UTF-8 byte of the reply; ties go to the first option."""
    best = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    normalized = [loglik / length for loglik, length in zip(logliks, byte_lengths)]
    best_norm = max(range(len(normalized)), key=lambda i: (normalized[i], -i))
    return best, best_norm


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


@dataclass
class ModelResults:
    tasks: dict = field(default_factory=dict)  # file path -> task result
    perplexity: dict | None = None


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
                columns = torch.searchsorted(predict_at, torch.tensor(request.positions) - 1)
                targets = torch.tensor([request.input_ids[p] for p in request.positions])
                results[index] = (logprobs[row, columns, targets].sum().item(), len(request.positions))
        return results

    def loglik(self, questions: list, shots: list, desc: str) -> dict:
        conversations = [conversation(q, s, i) for q, s in zip(questions, shots) for i in range(len(q.options))]
        encoded = self.encoder.encode(conversations).examples
        requests = [ScoringRequest(e.input_ids, _final_reply_positions(e.labels)) for e in encoded]
        scores = iter(self.score_requests(requests, desc))
        rows = []
        for question in questions:
            logliks = [next(scores)[0] for _ in question.options]
            byte_lengths = [len(reply_text(question, i).encode("utf-8")) for i in range(len(question.options))]
            pred, pred_norm = choose_options(logliks, byte_lengths)
            rows.append(dict(_describe(question), pred=question.letters[pred], pred_norm=question.letters[pred_norm],
                             correct=pred == question.answer, correct_norm=pred_norm == question.answer,
                             option_loglik=logliks, option_bytes=byte_lengths))
        return {"acc": _mean(r["correct"] for r in rows), "acc_norm": _mean(r["correct_norm"] for r in rows),
                "n": len(rows), "questions": rows}

    def generate(self, questions: list, shots: list, desc: str) -> dict:
        prompts = [self.encoder.encode_prompt(conversation(q, s)) for q, s in zip(questions, shots)]
        responses = self.generate_replies(prompts, desc)
        rows = []
        for question, response in zip(questions, responses):
            choice = extract_choice(response, question.options)
            rows.append(dict(_describe(question), response=response,
                             pred=None if choice is None else question.letters[choice], correct=choice == question.answer))
        return {"acc": _mean(r["correct"] for r in rows), "unparsed": sum(r["pred"] is None for r in rows),
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


def _final_reply_positions(labels: list) -> list:
    """The last run of labelled positions: the option's reply (few-shot replies are labelled too)."""
    end = len(labels)
    start = end
    while start > 1 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(range(start, end))


def _describe(question: Question) -> dict:
    return {"source": question.source, "id": question.id, "answer": question.letters[question.answer]}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# ---- summary -------------------------------------------------------------------------------------------------------
def summary_table(results: dict, files: list, method: str, num_fewshot: int, perplexity_path: str = "") -> str:
    """Models side by side: one column per model, one row per metric."""
    names = list(results)
    lines = [f"{'':42s}" + "".join(f"{name:>12s}" for name in names)]

    def row(label, values, fmt="{:.4f}"):
        lines.append(f"  {label:40s}" + "".join(f"{fmt.format(v):>12s}" for v in values))

    for qfile in files:
        first = results[names[0]].tasks[qfile.path]
        lines.append(f"{Path(qfile.path).name} ({qfile.format}, {first['n']} questions, {method}, {num_fewshot}-shot)")
        for metric in (("acc", "acc_norm") if method == "loglik" else ("acc", "unparsed")):
            row(metric, [results[name].tasks[qfile.path][metric] for name in names], "{:.4f}" if metric != "unparsed" else "{}")
    if perplexity_path:
        first = results[names[0]].perplexity
        label = Path(perplexity_path).name if Path(perplexity_path).exists() else perplexity_path
        lines.append(f"{label} ({first['records']} records, {first['tokens']} reply tokens, "
                     f"{first['truncated']} truncated at cutoff_len, {first['dropped']} dropped)")
        row("perplexity", [results[name].perplexity["perplexity"] for name in names], "{:.3f}")
    return "\n".join(lines)
