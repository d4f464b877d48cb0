"""Prompt templates: a ``{text}`` placeholder that the text replaces before tokenisation."""

from __future__ import annotations

__all__ = ["Prompts", "apply_prompt", "resolve_prompt"]


class Prompts:
    """The AnglE prompt catalogue.

    ``A`` and ``B`` turn a decoder LLM's last token into a sentence summary; ``C`` marks
    retrieval queries. Any other string with one ``{text}`` placeholder works as a prompt too.
    """

    A = 'Summarize sentence "{text}" in one word:"'
    B = 'You can only output one word. Summarize "{text}":"'
    C = "Represent this sentence for searching relevant passages: {text}"

    @classmethod
    def names(cls) -> dict[str, str]:
        """The catalogue as ``{"A": template, ...}``."""
        return {name: getattr(cls, name) for name in ("A", "B", "C")}


def resolve_prompt(prompt: str | None) -> str | None:
    """A catalogue name (``"A"``, ``"B"``, ``"C"``) or a template, checked for ``{text}``."""
    if prompt is None:
        return None
    template = Prompts.names().get(prompt, prompt)
    try:
        template.format(text="")
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ValueError(f"prompt {prompt!r} is not a valid template: {e}") from None
    if template.format(text="x") == template.format(text=""):  # e.g. no {text}, or {{text}}
        raise ValueError(
            f"prompt {prompt!r} has no {{text}} placeholder; use a template such as "
            f"{Prompts.C!r} or one of {sorted(Prompts.names())}"
        )
    return template


def apply_prompt(template: str | None, texts: list[str]) -> list[str]:
    """The texts with the template applied (unchanged when ``template`` is ``None``)."""
    if template is None:
        return list(texts)
    return [template.format(text=t) for t in texts]
