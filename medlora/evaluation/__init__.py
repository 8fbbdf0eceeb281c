"""Scoring models: multiple-choice log-likelihoods and generation, perplexity, the report with
standard errors, and the lm-evaluation-harness bridge."""
