"""Personal identifiers in training text: found with Presidio's pattern recognizers, counted by kind, and
replaced by typed placeholders with --scrub_pii.

    scanner = PiiScanner()
    scanner.find("Call me on +1 617 555 0199 or mail jo@example.org")   # [Finding(PHONE, 11, 26), Finding(EMAIL, ...)]
    scanner.scrub("...")                                                   # ("Call me on [PHONE] or mail [EMAIL]", [...])

What is found, and what is not (docs/data_hygiene.md says the same to users):
  EMAIL        Presidio's EmailRecognizer (its domain checked against the public suffix list bundled with
               tldextract; never fetched)
  PHONE        Presidio's PhoneRecognizer: Google's libphonenumber, valid numbers of Presidio's default regions
               (US, GB, DE, FR, IL, IN, CA, BR) and China; other countries' numbers without +code are missed
  URL          Presidio's URL pattern, for addresses with http(s):// or www.; a bare 'example.com' is not
               taken, since run-together sentences ('the diagnosis.Patient: ...') match it in real dialogues
  IP_ADDRESS   Presidio's IpRecognizer (IPv4 and IPv6)
  CREDIT_CARD  Presidio's CreditCardRecognizer (Luhn-checked)
  SSN          Presidio's UsSsnRecognizer
  IBAN         Presidio's IbanRecognizer (checksum-checked)
  ID           our one pattern: a run of 8 or more digits, optionally after up to 3 letters (record numbers,
               insurance and licence numbers), where no recognizer above claims it
Names and street addresses need a named-entity model, which MedLoRA cannot download offline: they are not found.

Speed: every recognizer runs only on text that passes a cheap necessary condition of its own ('@' for an e-mail,
seven digits for a phone number), so text without identifiers costs one regular-expression search.
"""

import re
from dataclasses import dataclass

# Presidio's entity names -> our placeholder types.
# The order breaks ties between equal spans: the more specific (checksummed) kind first.
PLACEHOLDER_TYPES = {"EMAIL_ADDRESS": "EMAIL", "URL": "URL", "IP_ADDRESS": "IP_ADDRESS", "CREDIT_CARD": "CREDIT_CARD",
                     "US_SSN": "SSN", "IBAN_CODE": "IBAN", "PHONE_NUMBER": "PHONE", "ID": "ID"}
# Presidio's default regions, and China's: HuaTuo's and MedicalGPT's data are Chinese.
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR", "CN")
KINDS = tuple(dict.fromkeys(PLACEHOLDER_TYPES.values()))
# Presidio scores a pattern's confidence; below this are its weakest guesses (an IPv6 '::' on its own).
MIN_SCORE = 0.3
# A necessary condition for each recognizer to find anything, cheap to test first.
SEVEN_DIGITS = r"\d(?:[ \t]?[-./()+]?[ \t]?\d){6}"
PREFILTERS = {
    "EMAIL_ADDRESS": re.compile("@"),
    "URL": re.compile(r"(?i:https?://|www\d{0,3}\.)"),
    "IP_ADDRESS": re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d|[0-9A-Fa-f]:[0-9A-Fa-f]{0,4}:"),  # a dotted quad, or IPv6's colons
    "PHONE_NUMBER": re.compile(SEVEN_DIGITS),
    "CREDIT_CARD": re.compile(SEVEN_DIGITS),
    "US_SSN": re.compile(SEVEN_DIGITS),
    "IBAN_CODE": re.compile(r"[A-Za-z]{2}\d\d"),
    "ID": re.compile(r"\d{8}"),
}
ANY_CANDIDATE = re.compile("|".join(dict.fromkeys(f"(?:{p.pattern})" for p in PREFILTERS.values())))


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS
    start: int
    end: int


def _recognizers() -> dict:
    """Presidio entity name -> recognizer; imported here, since Presidio takes seconds to import."""
    import logging

    import tldextract
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UrlRecognizer,
        UsSsnRecognizer,
    )

    logging.getLogger("presidio-analyzer").setLevel(logging.WARNING)  # not a line per recognizer loaded
    offline_domains = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)  # the bundled list, no download

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str):
            return offline_domains(pattern_text).fqdn != ""

    url_patterns = [Pattern("URL with scheme", r"(?i)https?://" + UrlRecognizer.BASE_URL_REGEX, 0.6),
                    Pattern("www URL", r"(?i)" + UrlRecognizer.BASE_URL_REGEX.replace(r"(www\d{0,3}[.])?",
                                                                                      r"(www\d{0,3}[.])", 1), 0.5)]
    long_number = PatternRecognizer(supported_entity="ID", name="LongNumberRecognizer",
                                    patterns=[Pattern("long number", r"\b[A-Za-z]{0,3}\d{8,}\b", 0.4)])
    recognizers = {"EMAIL_ADDRESS": OfflineEmailRecognizer(), "URL": UrlRecognizer(patterns=url_patterns),
                   "IP_ADDRESS": IpRecognizer(), "CREDIT_CARD": CreditCardRecognizer(), "US_SSN": UsSsnRecognizer(),
                   "IBAN_CODE": IbanRecognizer(), "PHONE_NUMBER": PhoneRecognizer(supported_regions=PHONE_REGIONS),
                   "ID": long_number}
    return {entity: recognizers[entity] for entity in PLACEHOLDER_TYPES}


class PiiScanner:
    """Presidio (and the spaCy it imports, seconds and 60 MB of wheels) is loaded only once some text passes the
    cheap conditions: data without a digit run, an '@' or a web address never imports it."""

    def __init__(self):
        self._recognizers = None

    @property
    def recognizers(self) -> dict:
        if self._recognizers is None:
            self._recognizers = _recognizers()
        return self._recognizers

    def find(self, text: str) -> list:
        """Findings in text order, overlaps resolved: the longer span wins (an e-mail over the domain in it),
        then the kind listed first in PLACEHOLDER_TYPES (an SSN over a phone number)."""
        if not ANY_CANDIDATE.search(text):
            return []
        spans = []
        for priority, (entity, recognizer) in enumerate(self.recognizers.items()):
            if PREFILTERS[entity].search(text):
                spans += [(result.start, -(result.end - result.start), priority, result.end,
                           PLACEHOLDER_TYPES[result.entity_type])
                          for result in recognizer.analyze(text, [entity], None) if result.score >= MIN_SCORE]
        findings, end_of_last = [], 0
        for start, _, _, end, kind in sorted(spans):
            if start >= end_of_last:
                findings.append(Finding(kind, start, end))
                end_of_last = end
        return findings

    def scrub(self, text: str) -> tuple:
        """(text with every finding replaced by its placeholder, e.g. '[PHONE]', the findings)."""
        findings = self.find(text)
        for finding in reversed(findings):
            text = f"{text[:finding.start]}[{finding.kind}]{text[finding.end:]}"
        return text, findings
