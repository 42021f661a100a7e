"""Human approval of tool calls: a run pauses before a call that needs it, and resumes with the answer.

An agent given ``require_approval`` (a policy: does this call need a person's yes?) checks every
tool call of a step before it runs any of them. A call that needs approval and has no answer in
the run's journal ends the run ``input_required``, with the call in ``RunResult.pending``; nothing
waits in a thread. The host asks a person, appends the answer to the journal as
``JournalEntry.approval(...)`` and runs the agent again on that journal: the replay reaches the
same call, finds the answer, and either runs the call (approved) or gives the model the denial as
an error observation (``denial_message``), so the model can go on without it.
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
