"""Multiple-choice scoring with every prompt template, on the real default model (SmolLM2-135M-Instruct, whose
`chat` template closes each reply with "<|im_end|>\\n") and on the tiny one (issue 28).

Each option's log-likelihood must equal a direct computation: the option's tokens, their log-probabilities
summed by hand from one unpadded forward pass. --method generate must continue exactly
the prompt that the option scores are conditioned on, and its greedy reply must be the one a plain argmax loop
gives. Both models run in fp32 (the reference) whatever the CPU's `auto` precision."""

import pytest
import torch

from medlora.data.questions import Question, conversation, reply_text
from medlora.data.templates import PromptTemplate, available_templates
from medlora.evaluation.scoring import Evaluator
from medlora.models import smollm2

pytestmark = pytest.mark.slow

QUESTION = Question("A 30-year-old woman has fever, a stiff neck and a rash that does not fade under a glass. "
                    "What is the most likely diagnosis?",
                    ["Migraine", "Meningococcal meningitis", "Tension headache", "Sinusitis"], 1, source="test: record 1")
SHOT = Question("Which vitamin deficiency causes scurvy?", ["Vitamin A", "Vitamin B12", "Vitamin C", "Vitamin D"], 2,
                source="test: record 2")


@pytest.fixture(scope="module", params=["smollm2", "tiny"])
def loaded(request, tiny_model_path):
    from transformers import AutoModelForCausalLM

    from medlora.models.loading import load_tokenizer

    folder = smollm2.ensure_smollm2() if request.param == "smollm2" else tiny_model_path
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, load_tokenizer(str(folder))


def direct_logliks(model, tokenizer, template, question, shots) -> list:
    """Each option's log-likelihood by hand: the conversation up to the end of the option's reply tokenized
    whole, the reply's tokens being the shortest run of last tokens that spells it, their log-probabilities
    summed from one forward pass. (lm-evaluation-harness splits context and continuation by the context's own
    token count instead: the same tokens, except where a byte-level BPE tokenizer splits a prompt's closing
    run of newlines differently when text follows it, as SmolLM2's does after llama3's "\n\n"; it then also
    scores one newline of the prompt.)"""
    values = []
    for index in range(len(question.options)):
        reply = reply_text(question, index)
        text = template.render(conversation(question, shots, index), tokenizer).text
        text = text[:text.rindex(reply) + len(reply)]
        special = not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        first = next(k for k in range(len(ids) - 1, 0, -1) if tokenizer.decode(ids[k:]).strip() == reply)
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        values.append(sum(logprobs[position - 1, ids[position]].item() for position in range(first, len(ids))))
    return values


def greedy_reply(model, tokenizer, template, prompt_ids: list, max_new_tokens: int) -> str:
    """An argmax loop without cache, stopped at EOS, cut at the template's stop strings."""
    eos = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id]
                                     if isinstance(model.generation_config.eos_token_id, int)
                                     else model.generation_config.eos_token_id or [])}
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
        if token in eos:
            break
        ids.append(token)
    text = tokenizer.decode(ids[len(prompt_ids):], skip_special_tokens=True)
    for marker in template.stop:
        text = text.split(marker)[0]
    return text.strip()


@pytest.mark.parametrize("template_name", available_templates())
@pytest.mark.parametrize("shots", [[], [SHOT]], ids=["0-shot", "1-shot"])
def test_option_logliks_equal_a_direct_computation(loaded, template_name, shots):
    model, tokenizer = loaded
    template = PromptTemplate.load(template_name)
    evaluator = Evaluator(model, tokenizer, template, batch_size=3)
    row = evaluator.loglik([QUESTION], [shots], "test")["questions"][0]
    expected = direct_logliks(model, tokenizer, template, QUESTION, shots)
    assert row["option_loglik"] == pytest.approx(expected, abs=2e-3)
    assert all(value < 0 for value in row["option_loglik"])
    # the scored tokens are the reply's own text: no template closing text, no EOS
    for index, (ids, positions) in enumerate(
            evaluator.encoder.encode_final_reply([conversation(QUESTION, shots, i) for i in range(4)])):
        assert positions == list(range(positions[0], positions[-1] + 1))
        assert tokenizer.decode([ids[p] for p in positions]).strip() == reply_text(QUESTION, index)


@pytest.mark.parametrize("template_name", available_templates())
def test_generate_continues_the_scored_prompt_greedily(loaded, template_name):
    model, tokenizer = loaded
    template = PromptTemplate.load(template_name)
    evaluator = Evaluator(model, tokenizer, template, max_new_tokens=6)
    prompt = evaluator.encoder.encode_prompt(conversation(QUESTION, [SHOT]))
    ids, positions = evaluator.encoder.encode_final_reply([conversation(QUESTION, [SHOT], 0)])[0]
    # the same text (a byte-level BPE may split a closing "\n\n" differently when no reply follows it)
    assert tokenizer.decode(prompt) == tokenizer.decode(ids[:positions[0]])
    result = evaluator.generate([QUESTION], [[SHOT]], "test")
    assert result["n"] == 1
    assert result["questions"][0]["response"] == greedy_reply(model, tokenizer, template, prompt, 6)
