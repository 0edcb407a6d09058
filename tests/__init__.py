"""gptserve test suite."""
