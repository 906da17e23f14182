"""The model side's one error type, in a module of its own so that the adapter (mllm) and the
token budget (budget) can both raise it without importing each other."""


class MLLMError(ValueError):
    """A model, layer or input that the adapter cannot use, with the reason."""
