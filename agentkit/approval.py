"""Human approval of tool calls: a run pauses before a call that needs it, and resumes with the answer.

The pause is a ``RunResult`` (``input_required``), the answer a journal entry; nothing waits.
See docs/agentkit.md, "Approval: a run that waits for a person".
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from agentkit.llm.base import ToolCall


class Approval(BaseModel):
    """A person's answer to one tool call: ``by`` who (None: nobody, e.g. it timed out), and why."""

    approved: bool
    by: str | None = None
    note: str | None = None


class PendingApproval(BaseModel):
    """The call an ``input_required`` run stopped at: answer it with ``JournalEntry.approval``
    for this ``ordinal`` and ``step``, then run again on the same journal."""

    ordinal: int = Field(ge=1, description="The run's nth tool call (the journal key).")
    step: int = Field(ge=0)
    call: ToolCall


def denial_message(approval: Approval) -> str:
    """The error observation the model reads for a denied call."""
    who = f" by {approval.by}" if approval.by else ""
    why = f": {approval.note}" if approval.note else ""
    return (
        f"Not run: this call needed a person's approval and was denied{who}{why}. "
        "Do not repeat it; go on without it or explain in your answer why it is needed."
    )
