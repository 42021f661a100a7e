"""What part of a run's transcript the model sees on each call, cut at turn boundaries.

See docs/agentkit.md, "Memory".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from agentkit.llm.base import LLM, Message, TokenCounter, estimate_tokens

MESSAGE_OVERHEAD_TOKENS = 4


@runtime_checkable
class Memory(Protocol):
    async def window(self, transcript: Sequence[Message], llm: LLM) -> list[Message]:
        """The messages to send to ``llm`` now, given the full transcript so far."""
        ...


def group_turns(messages: Sequence[Message]) -> list[list[Message]]:
    """Split messages into units that must be kept or dropped together."""
    groups: list[list[Message]] = []
    for m in messages:
        if m.role == "tool" and groups and groups[-1][0].role == "assistant" and groups[-1][0].tool_calls:
            groups[-1].append(m)
        else:
            groups.append([m])
    return groups


def _split_pinned(transcript: Sequence[Message]) -> tuple[list[Message], list[Message]]:
    """Leading system messages and the first user message (the goal) are always kept."""
    pinned: list[Message] = []
    index = 0
    while index < len(transcript) and transcript[index].role == "system":
        pinned.append(transcript[index])
        index += 1
    if index < len(transcript) and transcript[index].role == "user":
        pinned.append(transcript[index])
        index += 1
    return pinned, list(transcript[index:])


class BufferMemory:
    """Keep the newest turns that fit ``max_tokens``; drop the oldest whole turns.

    The system prompt and the goal are always kept, and so is the newest turn even if it alone is
    over budget (the model cannot act without its latest observation).
    """

    def __init__(self, max_tokens: int = 3000, *, counter: TokenCounter = estimate_tokens) -> None:
        if max_tokens <= 0:
            raise ValueError("max_tokens must be positive")
        self.max_tokens = max_tokens
        self.counter = counter

    def cost(self, messages: Sequence[Message]) -> int:
        return sum(self.counter(m.text()) + MESSAGE_OVERHEAD_TOKENS for m in messages)

    def split(
        self, transcript: Sequence[Message], budget: int | None = None
    ) -> tuple[list[Message], list[Message], list[Message]]:
        """``(pinned, dropped, kept)``: the cut the window is built from."""
        pinned, rest = _split_pinned(transcript)
        groups = group_turns(rest)
        remaining = (self.max_tokens if budget is None else budget) - self.cost(pinned)
        kept: list[list[Message]] = []
        for group in reversed(groups):
            cost = self.cost(group)
            if kept and cost > remaining:
                break
            kept.append(group)
            remaining -= cost
        kept.reverse()
        dropped_groups = groups[: len(groups) - len(kept)]
        return pinned, [m for g in dropped_groups for m in g], [m for g in kept for m in g]

    async def window(self, transcript: Sequence[Message], llm: LLM) -> list[Message]:
        pinned, _, kept = self.split(transcript)
        return pinned + kept


SUMMARY_PROMPT = (
    "Summarise the conversation below for an assistant that will continue the task without seeing "
    "it. Keep every fact, number, tool result and decision that may matter; drop pleasantries. "
    "Write at most {words} words."
)


class SummaryMemory:
    """Like ``BufferMemory``, but turns that fall out of the window are folded into a running
    summary written by the model, so early facts survive long runs.

    The summary is updated only with newly dropped turns (each turn is summarised once), and it
    is sent as a system message right after the pinned messages.
    """

    def __init__(
        self,
        max_tokens: int = 3000,
        *,
        summary_words: int = 150,
        counter: TokenCounter = estimate_tokens,
        llm: LLM | None = None,
    ) -> None:
        self.buffer = BufferMemory(max_tokens, counter=counter)
        self.summary_words = summary_words
        self.llm = llm
        self.summary = ""
        self._summarised = 0  # how many non-pinned messages the summary covers

    def _summary_message(self) -> Message:
        return Message.system(f"Summary of earlier steps: {self.summary}")

    async def window(self, transcript: Sequence[Message], llm: LLM) -> list[Message]:
        reserve = self.buffer.cost([self._summary_message()]) + self.summary_words * 2
        pinned, dropped, kept = self.buffer.split(transcript, self.buffer.max_tokens - reserve)
        if len(dropped) > self._summarised:
            fresh = dropped[self._summarised :]
            self.summary = await self._fold(fresh, self.llm or llm)
            self._summarised = len(dropped)
        elif len(dropped) < self._summarised:
            # The summary already covers turns that would fit again; never show them twice.
            _, rest = _split_pinned(transcript)
            kept = [m for g in group_turns(rest[self._summarised :]) for m in g]
        return pinned + ([self._summary_message()] if self.summary else []) + kept

    async def _fold(self, messages: Sequence[Message], llm: LLM) -> str:
        lines = []
        if self.summary:
            lines.append(f"Earlier summary: {self.summary}")
        for m in messages:
            who = f"tool {m.name}" if m.role == "tool" else m.role
            lines.append(f"{who}: {m.text()}")
        response = await llm.chat(
            [Message.system(SUMMARY_PROMPT.format(words=self.summary_words)), Message.user("\n".join(lines))],
            tool_choice="none",
        )
        return (response.content or "").strip() or self.summary
